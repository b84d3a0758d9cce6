//! The arm64 `Image` format and where its pieces go in guest RAM.
//!
//! Follows the kernel's Documentation/arch/arm64/booting.rst: a 64-byte header with
//! `text_offset`, `image_size` and `flags`, magic `ARM\x64` at byte 56; the image is placed at
//! a 2 MiB aligned base plus `text_offset`, and `image_size` bytes from there (the image plus
//! its BSS) belong to the kernel.
//!
//! linux-loader's `pe` loader covers only the copy into memory, exists only in aarch64 builds
//! (so a config could not be checked, nor this code unit-tested, on any other host) and ignores
//! `image_size`, which is what decides where the initramfs may go. Parsing 64 bytes here lets
//! every input be checked before a VM exists.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{FDT_MAX_SIZE, KERNEL_ALIGN, PAGE_SIZE, RAM_START};

/// Size of the arm64 Image header.
pub const HEADER_SIZE: usize = 64;
/// `ARM\x64`, little endian, at byte 56.
pub const MAGIC: u32 = 0x644d_5241;
/// The magic number of a 32-bit arm zImage, at byte 0x24 (Documentation/arch/arm/booting.rst).
const ZIMAGE_MAGIC: u32 = 0x016f_2818;
/// `text_offset` that kernels older than 3.17 (which have `image_size` 0) assume.
const LEGACY_TEXT_OFFSET: u64 = 0x8_0000;

/// Errors in an Image file or in fitting a boot into RAM.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file is shorter than an Image header.
    #[error("file is {0} bytes, shorter than an arm64 Image header ({HEADER_SIZE} bytes)")]
    TooShort(u64),
    /// The magic number is not `ARM\x64`.
    #[error("not an arm64 Image: no \"ARM\\x64\" magic at byte 56 (found {0:#010x})")]
    BadMagic(u32),
    /// The kernel is a 32-bit arm zImage.
    #[error("a 32-bit arm zImage: 32-bit guests are not supported yet (an arm64 Image is needed)")]
    Arm32ZImage,
    /// The kernel was built big-endian.
    #[error("big-endian arm64 kernels are not supported")]
    BigEndian,
    /// A header field is out of range.
    #[error("arm64 Image header field {field} is out of range ({value:#x})")]
    BadField {
        /// Name of the field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// The file could not be read.
    #[error("reading the Image file")]
    Read(#[source] std::io::Error),
}

/// Errors placing a kernel, initramfs and FDT in guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The kernel and the FDT do not fit in RAM.
    #[error("the kernel needs {needed} bytes from the start of RAM, but only {room} fit beside the device tree")]
    KernelTooLarge {
        /// Bytes the kernel needs from the start of RAM.
        needed: u64,
        /// Bytes available.
        room: u64,
    },
    /// The initramfs does not fit between kernel and FDT.
    #[error(
        "the initramfs is {size} bytes, but only {room} bytes of RAM are free after the kernel"
    )]
    InitramfsTooLarge {
        /// Size of the initramfs.
        size: u64,
        /// Bytes available.
        room: u64,
    },
}

/// Errors copying boot images into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The kernel could not be copied into guest memory.
    #[error("loading the kernel at {0:#x}")]
    Kernel(u64, #[source] vm_memory::GuestMemoryError),
    /// The initramfs could not be copied into guest memory.
    #[error("loading the initramfs at {0:#x}")]
    Initramfs(u64, #[source] vm_memory::GuestMemoryError),
    /// The FDT could not be written to guest memory.
    #[error("writing the device tree at {0:#x}")]
    Fdt(u64, #[source] vm_memory::GuestMemoryError),
    /// A file could not be rewound.
    #[error("rewinding a boot file")]
    Seek(#[source] std::io::Error),
}

/// What the header of an arm64 Image says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arm64Image {
    /// Offset from the 2 MiB aligned base at which the image is loaded.
    pub text_offset: u64,
    /// Bytes the kernel occupies from its load address, BSS included.
    pub footprint: u64,
    /// Size of the file.
    pub file_size: u64,
}

impl Arm64Image {
    /// Checks an Image header; `file_size` is the size of the whole file.
    pub fn parse(header: &[u8], file_size: u64) -> Result<Self, ImageError> {
        let header: &[u8; HEADER_SIZE] = header
            .get(..HEADER_SIZE)
            .and_then(|h| h.try_into().ok())
            .ok_or(ImageError::TooShort(file_size.min(header.len() as u64)))?;
        let u64_at = |off: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[off..off + 8]);
            u64::from_le_bytes(b)
        };
        let magic = u32::from_le_bytes([header[56], header[57], header[58], header[59]]);
        if magic != MAGIC
            && u32::from_le_bytes([header[0x24], header[0x25], header[0x26], header[0x27]])
                == ZIMAGE_MAGIC
        {
            return Err(ImageError::Arm32ZImage);
        }
        if magic != MAGIC {
            return Err(ImageError::BadMagic(magic));
        }
        let (text_offset, image_size, flags) = (u64_at(8), u64_at(16), u64_at(24));
        if image_size == 0 {
            // Pre-3.17 kernel: the header carries no size, so the file is all we know.
            return Ok(Self {
                text_offset: LEGACY_TEXT_OFFSET,
                footprint: file_size,
                file_size,
            });
        }
        if flags & 1 != 0 {
            return Err(ImageError::BigEndian);
        }
        if text_offset >= KERNEL_ALIGN || text_offset % PAGE_SIZE != 0 {
            return Err(ImageError::BadField {
                field: "text_offset",
                value: text_offset,
            });
        }
        if image_size > (1 << 40) {
            return Err(ImageError::BadField {
                field: "image_size",
                value: image_size,
            });
        }
        Ok(Self {
            text_offset,
            footprint: image_size.max(file_size),
            file_size,
        })
    }

    /// Reads and checks the header of an Image file.
    pub fn from_file(file: &mut File) -> Result<Self, ImageError> {
        let size = file.metadata().map_err(ImageError::Read)?.len();
        let mut header = vec![0u8; HEADER_SIZE.min(size as usize)];
        file.seek(SeekFrom::Start(0)).map_err(ImageError::Read)?;
        file.read_exact(&mut header).map_err(ImageError::Read)?;
        Self::parse(&header, size)
    }
}

/// Where the kernel, initramfs and FDT go in guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootLayout {
    /// Guest address of the kernel's first byte, which is also its entry point.
    pub kernel_addr: u64,
    /// First guest address after the kernel's footprint.
    pub kernel_end: u64,
    /// Guest address and size of the initramfs.
    pub initramfs: Option<(u64, u64)>,
    /// Guest address of the FDT; it may use up to `FDT_MAX_SIZE` bytes.
    pub fdt_addr: u64,
}

impl BootLayout {
    /// Places a kernel at the bottom of RAM, the FDT in the last 2 MiB block and the initramfs
    /// right below the FDT.
    pub fn new(
        ram_size: u64,
        image: &Arm64Image,
        initramfs_size: Option<u64>,
    ) -> Result<Self, LayoutError> {
        let ram_end = RAM_START + ram_size;
        let fdt_addr = (ram_end.saturating_sub(FDT_MAX_SIZE)) & !(KERNEL_ALIGN - 1);
        let kernel_addr = RAM_START + image.text_offset;
        let kernel_end = kernel_addr.saturating_add(image.footprint);
        if fdt_addr < RAM_START || kernel_end > fdt_addr {
            return Err(LayoutError::KernelTooLarge {
                needed: kernel_end - RAM_START,
                room: fdt_addr.saturating_sub(RAM_START),
            });
        }
        let free_start = kernel_end.next_multiple_of(PAGE_SIZE);
        let initramfs = match initramfs_size {
            None => None,
            Some(size) => {
                let room = fdt_addr.saturating_sub(free_start);
                let start = fdt_addr.saturating_sub(size) & !(PAGE_SIZE - 1);
                if size > room || start < free_start {
                    return Err(LayoutError::InitramfsTooLarge { size, room });
                }
                Some((start, size))
            }
        };
        Ok(Self {
            kernel_addr,
            kernel_end,
            initramfs,
            fdt_addr,
        })
    }

    /// Copies kernel, initramfs and FDT into guest memory.
    pub fn load(
        &self,
        mem: &GuestMemoryMmap,
        kernel: &mut File,
        image: &Arm64Image,
        initramfs: Option<&mut File>,
        fdt: &[u8],
    ) -> Result<(), LoadError> {
        kernel.seek(SeekFrom::Start(0)).map_err(LoadError::Seek)?;
        mem.read_exact_volatile_from(
            GuestAddress(self.kernel_addr),
            kernel,
            image.file_size as usize,
        )
        .map_err(|e| LoadError::Kernel(self.kernel_addr, e))?;
        if let (Some(file), Some((addr, size))) = (initramfs, self.initramfs) {
            file.seek(SeekFrom::Start(0)).map_err(LoadError::Seek)?;
            mem.read_exact_volatile_from(GuestAddress(addr), file, size as usize)
                .map_err(|e| LoadError::Initramfs(addr, e))?;
        }
        mem.write_slice(fdt, GuestAddress(self.fdt_addr))
            .map_err(|e| LoadError::Fdt(self.fdt_addr, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn header(text_offset: u64, image_size: u64, flags: u64) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_SIZE];
        h[8..16].copy_from_slice(&text_offset.to_le_bytes());
        h[16..24].copy_from_slice(&image_size.to_le_bytes());
        h[24..32].copy_from_slice(&flags.to_le_bytes());
        h[56..60].copy_from_slice(&MAGIC.to_le_bytes());
        h
    }

    #[test]
    fn test_image_parse_modern_header_uses_image_size() {
        let img = Arm64Image::parse(&header(0, 40 << 20, 0b1010), 30 << 20).expect("valid");
        assert_eq!(img.text_offset, 0);
        assert_eq!(img.footprint, 40 << 20);
        assert_eq!(img.file_size, 30 << 20);
    }

    #[test]
    fn test_image_parse_legacy_header_assumes_text_offset() {
        let img = Arm64Image::parse(&header(0x1234, 0, 0), 8 << 20).expect("valid");
        assert_eq!(img.text_offset, 0x8_0000);
        assert_eq!(img.footprint, 8 << 20);
    }

    #[test]
    fn test_image_parse_bad_magic_is_error() {
        let mut h = header(0, 1 << 20, 0);
        h[56] = b'M';
        assert!(matches!(
            Arm64Image::parse(&h, 1 << 20),
            Err(ImageError::BadMagic(_))
        ));
    }

    #[test]
    fn test_image_parse_zimage_is_named() {
        let mut h = vec![0u8; HEADER_SIZE];
        h[0x24..0x28].copy_from_slice(&ZIMAGE_MAGIC.to_le_bytes());
        let e = Arm64Image::parse(&h, 5 << 20).expect_err("not arm64");
        assert!(matches!(e, ImageError::Arm32ZImage));
        assert!(e.to_string().contains("32-bit"));
    }

    #[test]
    fn test_image_parse_short_file_is_error() {
        assert!(matches!(
            Arm64Image::parse(b"#!/bin/sh\n", 10),
            Err(ImageError::TooShort(10))
        ));
    }

    #[test]
    fn test_image_parse_big_endian_is_error() {
        assert!(matches!(
            Arm64Image::parse(&header(0, 1 << 20, 1), 1 << 20),
            Err(ImageError::BigEndian)
        ));
    }

    #[test]
    fn test_image_parse_unaligned_text_offset_is_error() {
        assert!(matches!(
            Arm64Image::parse(&header(0x123, 1 << 20, 0), 1 << 20),
            Err(ImageError::BadField {
                field: "text_offset",
                ..
            })
        ));
    }

    #[test]
    fn test_image_from_file_reads_header() {
        let mut f = tempfile();
        f.write_all(&header(0x8_0000, 3 << 20, 0)).expect("write");
        f.write_all(&[0u8; 1000]).expect("write");
        let img = Arm64Image::from_file(&mut f).expect("valid");
        assert_eq!(img.file_size, HEADER_SIZE as u64 + 1000);
        assert_eq!(img.text_offset, 0x8_0000);
    }

    fn tempfile() -> File {
        let path = std::env::temp_dir().join(format!(
            "bulkhead-image-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("temp file");
        std::fs::remove_file(&path).expect("unlink temp file");
        f
    }

    #[test]
    fn test_layout_places_kernel_initramfs_fdt_in_order() {
        let img = Arm64Image {
            text_offset: 0,
            footprint: 40 << 20,
            file_size: 30 << 20,
        };
        let l = BootLayout::new(512 << 20, &img, Some(10 << 20 | 123)).expect("fits");
        assert_eq!(l.kernel_addr, RAM_START);
        assert_eq!(l.kernel_addr % KERNEL_ALIGN, 0);
        assert_eq!(l.fdt_addr, RAM_START + (510 << 20));
        assert_eq!(l.fdt_addr % KERNEL_ALIGN, 0);
        let (start, size) = l.initramfs.expect("initramfs placed");
        assert_eq!(start % PAGE_SIZE, 0);
        assert!(start >= l.kernel_end);
        assert!(start + size <= l.fdt_addr);
        assert_eq!(size, 10 << 20 | 123);
    }

    #[test]
    fn test_layout_text_offset_is_added_to_aligned_base() {
        let img = Arm64Image {
            text_offset: 0x8_0000,
            footprint: 1 << 20,
            file_size: 1 << 20,
        };
        let l = BootLayout::new(128 << 20, &img, None).expect("fits");
        assert_eq!(l.kernel_addr, RAM_START + 0x8_0000);
        assert_eq!(l.initramfs, None);
    }

    #[test]
    fn test_layout_initramfs_larger_than_ram_is_error() {
        let img = Arm64Image {
            text_offset: 0,
            footprint: 40 << 20,
            file_size: 30 << 20,
        };
        assert!(matches!(
            BootLayout::new(128 << 20, &img, Some(128 << 20)),
            Err(LayoutError::InitramfsTooLarge { .. })
        ));
        // Exactly the room left fits.
        let room = (126 << 20) - (40 << 20);
        assert!(BootLayout::new(128 << 20, &img, Some(room)).is_ok());
        assert!(BootLayout::new(128 << 20, &img, Some(room + 1)).is_err());
    }

    #[test]
    fn test_layout_kernel_larger_than_ram_is_error() {
        let img = Arm64Image {
            text_offset: 0,
            footprint: 200 << 20,
            file_size: 30 << 20,
        };
        assert!(matches!(
            BootLayout::new(128 << 20, &img, None),
            Err(LayoutError::KernelTooLarge { .. })
        ));
    }

    #[test]
    fn test_layout_load_copies_files_into_memory() {
        use vm_memory::GuestMemoryBackend;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(RAM_START), 64 << 20)])
            .expect("guest memory");
        let mut kernel = tempfile();
        let mut kbytes = header(0, 8192, 0);
        kbytes.resize(5000, 0xab);
        kernel.write_all(&kbytes).expect("write");
        let mut initrd = tempfile();
        initrd.write_all(b"070701initramfs").expect("write");
        let img = Arm64Image::from_file(&mut kernel).expect("valid");
        let l = BootLayout::new(64 << 20, &img, Some(15)).expect("fits");
        l.load(
            &mem,
            &mut kernel,
            &img,
            Some(&mut initrd),
            b"\xd0\x0d\xfe\xed",
        )
        .expect("load");
        let mut got = vec![0u8; 5000];
        mem.read_slice(&mut got, GuestAddress(l.kernel_addr))
            .expect("read");
        assert_eq!(got, kbytes);
        let (addr, _) = l.initramfs.expect("placed");
        let mut got = [0u8; 15];
        mem.read_slice(&mut got, GuestAddress(addr)).expect("read");
        assert_eq!(&got, b"070701initramfs");
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(l.fdt_addr)).expect("read"),
            0xedfe0dd0
        );
        assert!(mem.last_addr().0 >= l.fdt_addr);
    }
}
