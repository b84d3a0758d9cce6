//! Kernel images and where their pieces go in guest RAM: the arm64 `Image` and the 32-bit arm
//! `zImage`.
//!
//! An arm64 Image follows the kernel's Documentation/arch/arm64/booting.rst: a 64-byte header
//! with `text_offset`, `image_size` and `flags`, magic `ARM\x64` at byte 56; the image is placed
//! at a 2 MiB aligned base plus `text_offset`, and `image_size` bytes from there (the image plus
//! its BSS) belong to the kernel.
//!
//! A zImage follows Documentation/arch/arm/booting.rst: magic 0x016f2818 at byte 0x24, its start
//! and end at 0x28 and 0x2c, the endianness flag at 0x30. It decompresses the kernel to the
//! 128 MiB aligned base of where it runs plus the kernel's TEXT_OFFSET, and moves itself out of
//! the way first when it sits there. Kernels since 4.15 carry a table (pointed to from 0x38,
//! after the 0x45454545 marker at 0x34) with TEXT_OFFSET, the BSS size and where the
//! decompressed size is: with it the zImage is loaded just above the decompressed kernel (no
//! self-move, and the initramfs and device tree can be checked to be clear of both). Without
//! it, the convention of base + 32 KiB is used and the first 128 MiB of RAM are left to the
//! decompressor, as booting.rst advises. The device tree and initramfs of a 32-bit guest must be
//! in its low memory: they go below the first 256 MiB of RAM (kvmtool's choice).
//!
//! linux-loader's `pe` loader covers only the copy into memory, exists only in aarch64 builds
//! (so a config could not be checked, nor this code unit-tested, on any other host) and ignores
//! `image_size`, which is what decides where the initramfs may go; it has no zImage loader for
//! arm. Parsing a few header words here lets every input be checked before a VM exists.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryMmap, ReadVolatile, VolatileMemoryError, VolatileSlice,
};

use crate::layout::{FDT_MAX_SIZE, KERNEL_ALIGN, PAGE_SIZE, RAM_START};

/// Size of the arm64 Image header.
pub const HEADER_SIZE: usize = 64;
/// `ARM\x64`, little endian, at byte 56.
pub const MAGIC: u32 = 0x644d_5241;
/// The magic number of a 32-bit arm zImage, at byte 0x24 (Documentation/arch/arm/booting.rst).
const ZIMAGE_MAGIC: u32 = 0x016f_2818;
/// The zImage endianness flag (byte 0x30) of a little-endian kernel.
const ZIMAGE_LE: u32 = 0x0403_0201;
/// The zImage endianness flag of a big-endian kernel.
const ZIMAGE_BE: u32 = 0x0102_0304;
/// Marker at 0x34 saying that 0x38 holds the offset of the zImage's data table.
const ZIMAGE_TABLE_MARKER: u32 = 0x4545_4545;
/// Tag of the table entry with the decompressed size, BSS size and TEXT_OFFSET ("KLSZ").
const ZIMAGE_TAG_KERNEL_SIZE: u32 = 0x5a53_4c4b;
/// Where a zImage without the table is loaded: RAM base + 32 KiB, booting.rst's convention.
const ZIMAGE_LEGACY_OFFSET: u64 = 0x8000;
/// The decompressor's destination is the 128 MiB aligned base of where it runs.
const ZIMAGE_ZRELADDR_ALIGN: u64 = 128 << 20;
/// Room after the zImage for the decompressor's BSS, stack and heap (its heap is 64 KiB in
/// every kernel whose table says; this leaves room for all three).
const ZIMAGE_SCRATCH: u64 = 1 << 20;
/// A 32-bit guest's device tree and initramfs go below this much RAM: its low memory.
pub const ARM32_LOWMEM_WINDOW: u64 = 256 << 20;
/// `text_offset` that kernels older than 3.17 (which have `image_size` 0) assume.
const LEGACY_TEXT_OFFSET: u64 = 0x8_0000;

/// The instruction set a guest kernel runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestArch {
    /// AArch64: an arm64 `Image`.
    Aarch64,
    /// AArch32: a 32-bit arm `zImage`.
    Arm,
}

impl std::fmt::Display for GuestArch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Aarch64 => "64-bit arm64",
            Self::Arm => "32-bit arm",
        })
    }
}

/// The instruction set of a UEFI firmware image, from its first instruction: edk2's
/// ArmVirtQemu (like U-Boot and most boot ROMs) starts with a branch over its header, an A64
/// `B` (0x14000000 | imm26) in the arm64 build and an A32 `B` (0xea000000 | imm24, condition
/// "always") in the 32-bit one. `None` when the first word is neither.
pub fn firmware_arch(first_word: u32) -> Option<GuestArch> {
    match first_word >> 24 {
        0x14..=0x17 => Some(GuestArch::Aarch64),
        0xea => Some(GuestArch::Arm),
        _ => None,
    }
}

/// Errors in an Image file or in fitting a boot into RAM.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file is shorter than an Image header.
    #[error("file is {0} bytes, shorter than an arm64 Image header ({HEADER_SIZE} bytes)")]
    TooShort(u64),
    /// Neither an arm64 Image nor a zImage.
    #[error("not an arm64 Image (no \"ARM\\x64\" magic at byte 56, found {0:#010x}) nor a 32-bit arm zImage (no 0x016f2818 at byte 0x24)")]
    BadMagic(u32),
    /// The kernel was built big-endian.
    #[error("big-endian kernels are not supported")]
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
}

/// What a kernel's header says: which instruction set it runs in and where it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelImage {
    /// arm64 Image or 32-bit zImage.
    pub arch: GuestArch,
    /// Offset from the start of RAM at which the file is loaded (and entered).
    pub load_offset: u64,
    /// Bytes from the load address that belong to the kernel: an Image's BSS included, a
    /// zImage's decompressor scratch included (its decompressed kernel lies below the load
    /// address).
    pub footprint: u64,
    /// Size of the file.
    pub file_size: u64,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

impl KernelImage {
    /// Reads and checks the header of a kernel file: an arm64 Image or a 32-bit arm zImage.
    pub fn from_file(file: &mut File) -> Result<Self, ImageError> {
        let size = file.metadata().map_err(ImageError::Read)?.len();
        Self::parse(file, size)
    }

    /// Checks the kernel in `r`, a file of `file_size` bytes.
    pub fn parse<R: Read + Seek>(r: &mut R, file_size: u64) -> Result<Self, ImageError> {
        let mut header = [0u8; HEADER_SIZE];
        if file_size < HEADER_SIZE as u64 {
            return Err(ImageError::TooShort(file_size));
        }
        read_at(r, 0, &mut header)?;
        let magic = u32_at(&header, 56);
        if magic != MAGIC && u32_at(&header, 0x24) == ZIMAGE_MAGIC {
            return Self::parse_zimage(r, &header, file_size);
        }
        if magic != MAGIC {
            return Err(ImageError::BadMagic(magic));
        }
        let u64_at = |off: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[off..off + 8]);
            u64::from_le_bytes(b)
        };
        let (text_offset, image_size, flags) = (u64_at(8), u64_at(16), u64_at(24));
        if image_size == 0 {
            // Pre-3.17 kernel: the header carries no size, so the file is all we know.
            return Ok(Self {
                arch: GuestArch::Aarch64,
                load_offset: LEGACY_TEXT_OFFSET,
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
            arch: GuestArch::Aarch64,
            load_offset: text_offset,
            footprint: image_size.max(file_size),
            file_size,
        })
    }

    /// A zImage: its endianness, and from its size table where it can go.
    fn parse_zimage<R: Read + Seek>(
        r: &mut R,
        header: &[u8; HEADER_SIZE],
        file_size: u64,
    ) -> Result<Self, ImageError> {
        match u32_at(header, 0x30) {
            ZIMAGE_LE => {}
            ZIMAGE_BE => return Err(ImageError::BigEndian),
            flag => {
                return Err(ImageError::BadField {
                    field: "zImage endianness flag",
                    value: flag.into(),
                })
            }
        }
        let (start, end) = (u32_at(header, 0x28), u32_at(header, 0x2c));
        if end < start || u64::from(end - start) > file_size {
            return Err(ImageError::BadField {
                field: "zImage end",
                value: end.into(),
            });
        }
        let legacy = Self {
            arch: GuestArch::Arm,
            load_offset: ZIMAGE_LEGACY_OFFSET,
            footprint: (ZIMAGE_ZRELADDR_ALIGN - ZIMAGE_LEGACY_OFFSET)
                .max(file_size + ZIMAGE_SCRATCH),
            file_size,
        };
        if u32_at(header, 0x34) != ZIMAGE_TABLE_MARKER {
            return Ok(legacy);
        }
        // The table: a count of words, then (tag, values...) entries; the size entry is
        // KLSZ, the offset of the decompressed size, the BSS size, TEXT_OFFSET, heap size.
        let table = u64::from(u32_at(header, 0x38));
        let mut words = [0u8; 28];
        if table.saturating_add(words.len() as u64) > file_size {
            return Err(ImageError::BadField {
                field: "zImage table offset",
                value: table,
            });
        }
        read_at(r, table, &mut words)?;
        let word = |i: usize| u64::from(u32_at(&words, i * 4));
        if word(0) < 6 || word(1) != u64::from(ZIMAGE_TAG_KERNEL_SIZE) {
            // A table without the size entry: as old kernels.
            return Ok(legacy);
        }
        let (size_at, bss, text_offset, heap) = (word(2), word(3), word(4), word(5));
        if size_at.saturating_add(4) > file_size {
            return Err(ImageError::BadField {
                field: "zImage decompressed size offset",
                value: size_at,
            });
        }
        let mut size = [0u8; 4];
        read_at(r, size_at, &mut size)?;
        let decompressed = u64::from(u32::from_le_bytes(size));
        // The zImage goes just above the kernel it decompresses, which starts at the 128 MiB
        // aligned base of the zImage's own address plus TEXT_OFFSET: so it must sit in the
        // first 128 MiB of RAM.
        let load_offset = (text_offset + decompressed + bss).next_multiple_of(KERNEL_ALIGN);
        if load_offset >= ZIMAGE_ZRELADDR_ALIGN {
            return Err(ImageError::BadField {
                field: "zImage decompressed size",
                value: decompressed,
            });
        }
        if heap > ZIMAGE_SCRATCH {
            return Err(ImageError::BadField {
                field: "zImage decompressor heap size",
                value: heap,
            });
        }
        Ok(Self {
            arch: GuestArch::Arm,
            load_offset,
            footprint: file_size + ZIMAGE_SCRATCH + heap,
            file_size,
        })
    }
}

fn read_at<R: Read + Seek>(r: &mut R, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
    r.seek(SeekFrom::Start(offset)).map_err(ImageError::Read)?;
    r.read_exact(buf).map_err(ImageError::Read)
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
    /// Places a kernel at the bottom of RAM, the FDT in the last 2 MiB block (of a 32-bit
    /// guest's low memory window) and the initramfs right below the FDT.
    pub fn new(
        ram_size: u64,
        image: &KernelImage,
        initramfs_size: Option<u64>,
    ) -> Result<Self, LayoutError> {
        let window = match image.arch {
            GuestArch::Aarch64 => ram_size,
            GuestArch::Arm => ram_size.min(ARM32_LOWMEM_WINDOW),
        };
        let ram_end = RAM_START + window;
        let fdt_addr = (ram_end.saturating_sub(FDT_MAX_SIZE)) & !(KERNEL_ALIGN - 1);
        let kernel_addr = RAM_START + image.load_offset;
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
        kernel: &File,
        image: &KernelImage,
        initramfs: Option<&File>,
        fdt: &[u8],
    ) -> Result<(), LoadError> {
        self.load_files(mem, kernel, image, initramfs)?;
        self.write_fdt(mem, fdt)
    }

    /// Copies the kernel and the initramfs (when there is one) into guest memory with
    /// positioned reads straight into guest pages: the files' offsets are neither used nor
    /// moved, so a duplicate of a descriptor may be read on another thread.
    pub fn load_files(
        &self,
        mem: &GuestMemoryMmap,
        kernel: &File,
        image: &KernelImage,
        initramfs: Option<&File>,
    ) -> Result<(), LoadError> {
        let mut from = ReadAt {
            file: kernel,
            offset: 0,
        };
        mem.read_exact_volatile_from(
            GuestAddress(self.kernel_addr),
            &mut from,
            image.file_size as usize,
        )
        .map_err(|e| LoadError::Kernel(self.kernel_addr, e))?;
        if let (Some(file), Some((addr, size))) = (initramfs, self.initramfs) {
            let mut from = ReadAt { file, offset: 0 };
            mem.read_exact_volatile_from(GuestAddress(addr), &mut from, size as usize)
                .map_err(|e| LoadError::Initramfs(addr, e))?;
        }
        Ok(())
    }

    /// Writes the FDT into guest memory.
    pub fn write_fdt(&self, mem: &GuestMemoryMmap, fdt: &[u8]) -> Result<(), LoadError> {
        mem.write_slice(fdt, GuestAddress(self.fdt_addr))
            .map_err(|e| LoadError::Fdt(self.fdt_addr, e))
    }
}

/// A file read from `offset` on with pread(2). vm-memory reads into guest memory from a
/// `File` only at the file's own offset (read(2)), which a duplicate descriptor shares.
struct ReadAt<'a> {
    file: &'a File,
    offset: u64,
}

impl ReadVolatile for ReadAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = libc::off_t::try_from(self.offset).map_err(|_| {
            VolatileMemoryError::IOError(std::io::Error::from(std::io::ErrorKind::InvalidInput))
        })?;
        let guard = buf.ptr_guard_mut();
        // SAFETY: pread writes at most `buf.len()` bytes at the slice's pointer, which is valid
        // for writes of that length (VolatileSlice's invariant), from our own open file.
        let n = unsafe {
            libc::pread(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        if n < 0 {
            buf.bitmap().mark_dirty(0, buf.len());
            return Err(VolatileMemoryError::IOError(std::io::Error::last_os_error()));
        }
        let n = n as usize;
        buf.bitmap().mark_dirty(0, n);
        self.offset += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Write};

    /// Parses `bytes` as the start of a file of `file_size` bytes.
    fn parse(bytes: &[u8], file_size: u64) -> Result<KernelImage, ImageError> {
        KernelImage::parse(&mut Cursor::new(bytes), file_size)
    }

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
        let img = parse(&header(0, 40 << 20, 0b1010), 30 << 20).expect("valid");
        assert_eq!(img.arch, GuestArch::Aarch64);
        assert_eq!(img.load_offset, 0);
        assert_eq!(img.footprint, 40 << 20);
        assert_eq!(img.file_size, 30 << 20);
    }

    #[test]
    fn test_image_parse_legacy_header_assumes_text_offset() {
        let img = parse(&header(0x1234, 0, 0), 8 << 20).expect("valid");
        assert_eq!(img.load_offset, 0x8_0000);
        assert_eq!(img.footprint, 8 << 20);
    }

    #[test]
    fn test_image_parse_bad_magic_is_error() {
        let mut h = header(0, 1 << 20, 0);
        h[56] = b'M';
        assert!(matches!(parse(&h, 1 << 20), Err(ImageError::BadMagic(_))));
    }

    /// A zImage of `len` bytes as Debian's 6.1 armmp-lpae kernel has it: TEXT_OFFSET
    /// 0x208000, 22.6 MiB decompressed, 384 KiB of BSS, a 64 KiB decompressor heap.
    fn zimage(len: usize, table: bool) -> Vec<u8> {
        let mut z = vec![0u8; len];
        let mut put = |off: usize, v: u32| z[off..off + 4].copy_from_slice(&v.to_le_bytes());
        put(0x24, ZIMAGE_MAGIC);
        put(0x28, 0);
        put(0x2c, len as u32);
        put(0x30, ZIMAGE_LE);
        if table {
            put(0x34, ZIMAGE_TABLE_MARKER);
            put(0x38, 0x1000);
            let size_at = len as u32 - 0x100 + 1; // unaligned, as in real zImages
            for (i, v) in [
                6,
                ZIMAGE_TAG_KERNEL_SIZE,
                size_at,
                0x5ffb8,
                0x20_8000,
                0x1_0000,
                0,
            ]
            .into_iter()
            .enumerate()
            {
                put(0x1000 + 4 * i, v);
            }
            put(size_at as usize, 0x015a_52d0);
        }
        z
    }

    #[test]
    fn test_zimage_with_table_is_loaded_above_its_decompressed_kernel() {
        let z = zimage(0x1_0000, true);
        let img = parse(&z, z.len() as u64).expect("valid zImage");
        assert_eq!(img.arch, GuestArch::Arm);
        // 0x208000 + 0x15a52d0 + 0x5ffb8 = 0x180d288, up to the next 2 MiB.
        assert_eq!(img.load_offset, 0x1a0_0000);
        assert_eq!(img.footprint, 0x1_0000 + ZIMAGE_SCRATCH + 0x1_0000);
        assert_eq!(img.file_size, 0x1_0000);
    }

    #[test]
    fn test_zimage_without_table_leaves_the_first_128_mib_to_the_decompressor() {
        let z = zimage(0x1_0000, false);
        let img = parse(&z, z.len() as u64).expect("valid zImage");
        assert_eq!(img.arch, GuestArch::Arm);
        assert_eq!(img.load_offset, 0x8000);
        assert_eq!(img.load_offset + img.footprint, 128 << 20);
    }

    #[test]
    fn test_zimage_bad_fields_are_errors() {
        let mut be = zimage(0x1_0000, true);
        be[0x30..0x34].copy_from_slice(&ZIMAGE_BE.to_le_bytes());
        assert!(matches!(parse(&be, 0x1_0000), Err(ImageError::BigEndian)));
        let mut end = zimage(0x1_0000, true);
        end[0x2c..0x30].copy_from_slice(&0x2_0000u32.to_le_bytes());
        assert!(matches!(
            parse(&end, 0x1_0000),
            Err(ImageError::BadField {
                field: "zImage end",
                ..
            })
        ));
        let mut table = zimage(0x1_0000, true);
        table[0x38..0x3c].copy_from_slice(&0xfff0u32.to_le_bytes());
        assert!(matches!(
            parse(&table, 0x1_0000),
            Err(ImageError::BadField {
                field: "zImage table offset",
                ..
            })
        ));
        // A decompressed size that would put the zImage past the first 128 MiB.
        let mut huge = zimage(0x1_0000, true);
        let at = 0x1_0000 - 0x100 + 1;
        huge[at..at + 4].copy_from_slice(&(200u32 << 20).to_le_bytes());
        assert!(matches!(
            parse(&huge, 0x1_0000),
            Err(ImageError::BadField {
                field: "zImage decompressed size",
                ..
            })
        ));
        // A file that ends before the table it points to: a read error, not a panic.
        assert!(matches!(
            parse(&zimage(0x1_0000, true)[..0x800], 0x1_0000),
            Err(ImageError::Read(_))
        ));
    }

    #[test]
    fn test_layout_arm32_keeps_fdt_and_initramfs_in_low_memory() {
        let z = zimage(5 << 20, true);
        let img = parse(&z, z.len() as u64).expect("valid zImage");
        let l = BootLayout::new(1 << 30, &img, Some(2 << 20)).expect("fits");
        assert_eq!(l.kernel_addr, RAM_START + 0x1a0_0000);
        assert_eq!(l.fdt_addr, RAM_START + (254 << 20));
        let (start, size) = l.initramfs.expect("placed");
        assert!(start >= l.kernel_end);
        assert_eq!(start + size, l.fdt_addr);
        // 64 MiB of RAM: everything still fits, below the end of RAM.
        let l = BootLayout::new(64 << 20, &img, Some(2 << 20)).expect("fits");
        assert_eq!(l.fdt_addr, RAM_START + (62 << 20));
        // The legacy placement needs the first 128 MiB for the decompressor.
        let legacy = parse(&zimage(5 << 20, false), 5 << 20).expect("valid zImage");
        assert!(matches!(
            BootLayout::new(64 << 20, &legacy, None),
            Err(LayoutError::KernelTooLarge { .. })
        ));
        assert!(BootLayout::new(256 << 20, &legacy, Some(1 << 20)).is_ok());
    }

    #[test]
    fn test_firmware_arch_from_first_instruction() {
        // Debian's QEMU_EFI.fd (qemu-efi-aarch64) and AAVMF32_CODE.fd (qemu-efi-arm).
        assert_eq!(firmware_arch(0x1400_0400), Some(GuestArch::Aarch64));
        assert_eq!(firmware_arch(0xea00_03fe), Some(GuestArch::Arm));
        assert_eq!(firmware_arch(0), None);
        assert_eq!(firmware_arch(0xffff_ffff), None);
    }

    #[test]
    fn test_image_parse_short_file_is_error() {
        assert!(matches!(
            parse(b"#!/bin/sh\n", 10),
            Err(ImageError::TooShort(10))
        ));
        assert!(matches!(
            parse(&[0u8; HEADER_SIZE], HEADER_SIZE as u64),
            Err(ImageError::BadMagic(0))
        ));
    }

    #[test]
    fn test_image_parse_big_endian_is_error() {
        assert!(matches!(
            parse(&header(0, 1 << 20, 1), 1 << 20),
            Err(ImageError::BigEndian)
        ));
    }

    #[test]
    fn test_image_parse_unaligned_text_offset_is_error() {
        assert!(matches!(
            parse(&header(0x123, 1 << 20, 0), 1 << 20),
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
        let img = KernelImage::from_file(&mut f).expect("valid");
        assert_eq!(img.file_size, HEADER_SIZE as u64 + 1000);
        assert_eq!(img.load_offset, 0x8_0000);
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
        let img = KernelImage {
            arch: GuestArch::Aarch64,
            load_offset: 0,
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
    fn test_load_files_on_another_thread_ignores_the_file_offsets() {
        let ram = 64u64 << 20;
        let img = KernelImage {
            arch: GuestArch::Aarch64,
            load_offset: 0x8_0000,
            footprint: 12 << 20,
            file_size: (9 << 20) + 123,
        };
        let l = BootLayout::new(ram, &img, Some((5 << 20) + 9)).expect("fits");
        let fill = |len: u64, seed: u8| {
            let mut f = tempfile();
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ seed).collect();
            f.write_all(&data).expect("write");
            (f, data)
        };
        // Both files are left with their offsets at the end (just written) and moved while
        // a duplicate is read on another thread.
        let (mut kernel, kdata) = fill(img.file_size, 0x5a);
        let (initramfs, idata) = fill(l.initramfs.expect("placed").1, 0xa5);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(RAM_START), ram as usize)])
            .expect("guest memory");
        std::thread::scope(|s| {
            let (k, i) = (
                kernel.try_clone().expect("dup"),
                initramfs.try_clone().expect("dup"),
            );
            let (m, l, img) = (&mem, &l, &img);
            let t = s.spawn(move || l.load_files(m, &k, img, Some(&i)));
            kernel.seek(SeekFrom::Start(4096)).expect("seek");
            t.join().expect("no panic").expect("load");
        });
        l.write_fdt(&mem, b"fdt").expect("fdt");
        let read = |addr: u64, len: usize| {
            let mut v = vec![0u8; len];
            mem.read_slice(&mut v, GuestAddress(addr)).expect("read");
            v
        };
        let (iaddr, isize) = l.initramfs.expect("placed");
        assert_eq!(read(l.kernel_addr, kdata.len()), kdata);
        assert_eq!(read(iaddr, isize as usize), idata);
        assert_eq!(read(l.fdt_addr, 3), b"fdt");
        // A file shorter than the layout says is an error, not a partial load.
        let (short, _) = fill(1000, 0);
        assert!(matches!(
            l.load_files(&mem, &short, &img, None),
            Err(LoadError::Kernel(..))
        ));
    }

    #[test]
    fn test_layout_text_offset_is_added_to_aligned_base() {
        let img = KernelImage {
            arch: GuestArch::Aarch64,
            load_offset: 0x8_0000,
            footprint: 1 << 20,
            file_size: 1 << 20,
        };
        let l = BootLayout::new(128 << 20, &img, None).expect("fits");
        assert_eq!(l.kernel_addr, RAM_START + 0x8_0000);
        assert_eq!(l.initramfs, None);
    }

    #[test]
    fn test_layout_initramfs_larger_than_ram_is_error() {
        let img = KernelImage {
            arch: GuestArch::Aarch64,
            load_offset: 0,
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
        let img = KernelImage {
            arch: GuestArch::Aarch64,
            load_offset: 0,
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
        let img = KernelImage::from_file(&mut kernel).expect("valid");
        let l = BootLayout::new(64 << 20, &img, Some(15)).expect("fits");
        l.load(&mem, &kernel, &img, Some(&initrd), b"\xd0\x0d\xfe\xed")
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
