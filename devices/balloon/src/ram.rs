//! Guest RAM as the balloon releases it: the frontend's memory-table regions, each a file
//! (a memfd, or a file in a private tmpfs or hugetlbfs) mapped shared by the VMM and by every
//! device process. Freeing a page of such a mapping with `madvise(MADV_DONTNEED)` frees
//! nothing (the page stays in the file); punching a hole in the file
//! (`fallocate(PUNCH_HOLE|KEEP_SIZE)`) drops it from the file and from every mapping at once,
//! and the next guest access finds a fresh zero page.
//!
//! Only whole host pages are released: a host page is the file's block size (`st_blksize`:
//! the huge page size on hugetlbfs and on a tmpfs mounted `huge=within_size`) and at least the
//! host's base page (4 KiB or 64 KiB). A balloon page is 4 KiB (VIRTIO_BALLOON_PFN_SHIFT);
//! inflated balloon pages that cover only part of a host page are remembered ([`Partial`])
//! until the rest of that host page is inflated too, and forgotten when the guest deflates one
//! of them, as Cloud Hypervisor does.
//! Reported free pages (FREE_PAGE_REPORTING) are never remembered: the guest may reuse them as
//! soon as the report is answered.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The balloon's page: 4 KiB, whatever the guest's or the host's page size.
pub const BALLOON_PAGE: u64 = 1 << 12;

/// `fallocate` mode: the only one the device's seccomp filter lets through.
pub const PUNCH_HOLE_KEEP_SIZE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

#[derive(Debug, thiserror::Error)]
pub enum RamError {
    #[error("memory region at guest {gpa:#x} has no file: it cannot be released")]
    NoFile { gpa: u64 },
    #[error("cannot learn the page size of the memory region at guest {gpa:#x}")]
    PageSize {
        gpa: u64,
        #[source]
        source: io::Error,
    },
    #[error("guest range {gpa:#x}+{len:#x} is not in guest RAM")]
    OutsideRam { gpa: u64, len: u64 },
    #[error(
        "cannot punch a hole at file offset {offset:#x}+{len:#x} of the region at guest {gpa:#x}"
    )]
    PunchHole {
        gpa: u64,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
}

/// One memory-table region.
#[derive(Clone, Debug)]
pub struct RamRegion {
    /// Guest physical address of its first byte.
    pub gpa: u64,
    /// Its size in bytes.
    pub len: u64,
    /// The file the frontend sent (SCM_RIGHTS) and its `mmap_offset`.
    pub file: FileOffset,
    /// Its host page size: what is released at a time.
    pub page_size: u64,
}

impl RamRegion {
    /// The file offset of guest address `gpa` (inside the region).
    fn file_offset(&self, gpa: u64) -> u64 {
        self.file.start() + (gpa - self.gpa)
    }
}

/// The most bitmap words [`Partial`] holds (8 MiB): a guest that inflates one balloon page of
/// every host page cannot make the device grow past its memory budget; beyond it, partly
/// inflated host pages are not remembered (and so not released).
pub const MAX_PARTIAL_WORDS: usize = 1 << 20;

/// Inflated balloon pages of host pages not yet wholly inflated: (region, host page index in
/// the file) -> a bitmap of its balloon pages.
#[derive(Debug, Default)]
pub struct Partial {
    pages: HashMap<(usize, u64), Vec<u64>>,
    /// Bitmap words held, at most [`MAX_PARTIAL_WORDS`].
    words: usize,
}

impl Partial {
    /// Host pages with some but not all balloon pages inflated.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    pub fn clear(&mut self) {
        self.pages.clear();
        self.words = 0;
    }

    /// Forgets the host pages `forget` selects.
    fn forget(&mut self, mut forget: impl FnMut(&(usize, u64)) -> bool) {
        let words = &mut self.words;
        self.pages.retain(|key, map| {
            let drop = forget(key);
            if drop {
                *words -= map.len();
            }
            !drop
        });
    }
}

/// The host page size of `file`: its block size, at least the host's base page.
pub fn host_page_size(file: &File) -> io::Result<u64> {
    // SAFETY: sysconf reads a constant.
    let base = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    // SAFETY: `stat` is plain data, zeroed is a valid value; fstat writes into it only.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // The raw system call (not the C library's, which may use newfstatat or statx): the
    // filter allows `fstat` only.
    // SAFETY: fstat on an open descriptor, writing into `st`.
    let ret = unsafe { libc::syscall(libc::SYS_fstat, file.as_raw_fd(), &mut st) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    let block = u64::try_from(st.st_blksize).unwrap_or(0);
    let size = base.max(block);
    if !size.is_power_of_two() {
        return Ok(base);
    }
    Ok(size)
}

/// Punches out `len` bytes at `offset` of `file`; the file keeps its size.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate on an open descriptor; it touches no memory of ours.
    let ret = unsafe { libc::fallocate(file.as_raw_fd(), PUNCH_HOLE_KEEP_SIZE, off, l) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Guest RAM as the current memory table gives it.
#[derive(Debug, Default)]
pub struct GuestRam {
    pub regions: Vec<RamRegion>,
    /// Partly inflated host pages (inflate only).
    pub partial: Partial,
}

impl GuestRam {
    /// The regions of `mem` (the memory table the frontend sent), with their files and host
    /// page sizes.
    pub fn from_memory(mem: &GuestMemoryMmap) -> Result<GuestRam, RamError> {
        let mut regions = Vec::new();
        for region in mem.iter() {
            let gpa = region.start_addr().0;
            let file = region
                .file_offset()
                .cloned()
                .ok_or(RamError::NoFile { gpa })?;
            let page_size =
                host_page_size(file.file()).map_err(|source| RamError::PageSize { gpa, source })?;
            regions.push(RamRegion {
                gpa,
                len: region.len(),
                file,
                page_size,
            });
        }
        Ok(GuestRam {
            regions,
            partial: Partial::default(),
        })
    }

    /// Bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// The region holding all of `gpa..gpa+len` (a balloon page never straddles regions:
    /// they are 4 KiB aligned).
    fn region_of(&self, gpa: u64, len: u64) -> Option<(usize, &RamRegion)> {
        let end = gpa.checked_add(len)?;
        self.regions
            .iter()
            .enumerate()
            .find(|(_, r)| gpa >= r.gpa && end <= r.gpa + r.len)
    }

    /// Fails unless every byte of `gpa..gpa+len` is guest RAM (checked before anything of a
    /// request is released: a bad request changes nothing).
    pub fn check(&self, gpa: u64, len: u64) -> Result<(), RamError> {
        self.region_of(gpa, len)
            .map(|_| ())
            .ok_or(RamError::OutsideRam { gpa, len })
    }

    /// Releases the whole host pages inside `gpa..gpa+len`; with `track`, remembers the
    /// balloon pages of partly covered host pages and releases such a host page once all of it
    /// is inflated. Returns the bytes released.
    pub fn release(&mut self, gpa: u64, len: u64, track: bool) -> Result<u64, RamError> {
        let (index, region) = self
            .region_of(gpa, len)
            .ok_or(RamError::OutsideRam { gpa, len })?;
        let region = region.clone();
        let page = region.page_size;
        let start = region.file_offset(gpa);
        let end = start + len;
        let first_whole = start.div_ceil(page) * page;
        let last_whole = end / page * page;
        let mut released = 0;
        let mut punch = |offset: u64, n: u64| -> Result<(), RamError> {
            punch_hole(region.file.file(), offset, n).map_err(|source| RamError::PunchHole {
                gpa: region.gpa,
                offset,
                len: n,
                source,
            })?;
            released += n;
            Ok(())
        };
        if first_whole < last_whole {
            punch(first_whole, last_whole - first_whole)?;
            if track {
                let (a, b) = (first_whole / page, last_whole / page);
                self.partial
                    .forget(|(r, p)| *r == index && *p >= a && *p < b);
            }
        }
        if track && page > BALLOON_PAGE {
            // The parts outside the whole pages: head and tail.
            let mut parts = Vec::new();
            if first_whole >= last_whole {
                parts.push((start, end));
            } else {
                parts.push((start, first_whole));
                parts.push((last_whole, end));
            }
            for (a, b) in parts {
                if a >= b {
                    continue;
                }
                let host = a / page;
                let bits = (page / BALLOON_PAGE) as usize;
                let partial = &mut self.partial;
                if !partial.pages.contains_key(&(index, host)) {
                    if partial.words + bits.div_ceil(64) > MAX_PARTIAL_WORDS {
                        continue;
                    }
                    partial.words += bits.div_ceil(64);
                }
                let map = partial
                    .pages
                    .entry((index, host))
                    .or_insert_with(|| vec![0; bits.div_ceil(64)]);
                let mut sub = (a - host * page) / BALLOON_PAGE;
                let sub_end = (b - host * page).div_ceil(BALLOON_PAGE);
                while sub < sub_end {
                    if let Some(word) = map.get_mut((sub / 64) as usize) {
                        *word |= 1 << (sub % 64);
                    }
                    sub += 1;
                }
                let full =
                    (0..bits).all(|i| map.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0));
                if full {
                    if let Some(map) = self.partial.pages.remove(&(index, host)) {
                        self.partial.words -= map.len();
                    }
                    punch(host * page, page)?;
                }
            }
        }
        Ok(released)
    }

    /// Forgets the partly inflated host pages that `gpa..gpa+len` (deflated) touches.
    pub fn deflate(&mut self, gpa: u64, len: u64) -> Result<(), RamError> {
        let (index, region) = self
            .region_of(gpa, len)
            .ok_or(RamError::OutsideRam { gpa, len })?;
        let page = region.page_size;
        if page <= BALLOON_PAGE || self.partial.is_empty() {
            return Ok(());
        }
        let start = region.file_offset(gpa);
        let (a, b) = (start / page, (start + len).div_ceil(page));
        self.partial
            .forget(|(r, p)| *r == index && *p >= a && *p < b);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_device_runtime::testing::memfd;
    use std::sync::Arc;

    /// Bytes of `file` actually allocated (st_blocks is in 512-byte units).
    pub(crate) fn allocated(file: &File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        file.metadata().expect("metadata").blocks() * 512
    }

    pub(crate) fn touch(file: &File, offset: u64, len: u64) {
        use std::os::unix::fs::FileExt;
        let data = vec![0xa5u8; len as usize];
        file.write_all_at(&data, offset).expect("write");
    }

    fn ram(size: u64, page: u64) -> (GuestRam, Arc<File>) {
        let file = Arc::new(memfd(size));
        let region = RamRegion {
            gpa: 0x4000_0000,
            len: size,
            file: FileOffset::from_arc(file.clone(), 0),
            page_size: page,
        };
        (
            GuestRam {
                regions: vec![region],
                partial: Partial::default(),
            },
            file,
        )
    }

    const BASE: u64 = 0x4000_0000;

    #[test]
    fn test_release_whole_pages_frees_memfd_blocks() {
        let (mut ram, file) = ram(1 << 20, 4096);
        touch(&file, 0, 1 << 20);
        assert_eq!(allocated(&file), 1 << 20);
        let n = ram.release(BASE + 0x1000, 0x8000, false).expect("release");
        assert_eq!(n, 0x8000);
        assert_eq!(allocated(&file), (1 << 20) - 0x8000);
        assert_eq!(file.metadata().expect("md").len(), 1 << 20, "size kept");
    }

    #[test]
    fn test_release_large_host_page_only_whole_pages() {
        // A 64 KiB host page over a 4 KiB memfd: only whole 64 KiB pages are punched.
        let (mut ram, file) = ram(1 << 20, 0x1_0000);
        touch(&file, 0, 1 << 20);
        // 0x8000..0x28000: the whole page 0x10000..0x20000 only.
        let n = ram
            .release(BASE + 0x8000, 0x2_0000, false)
            .expect("release");
        assert_eq!(n, 0x1_0000);
        assert_eq!(allocated(&file), (1 << 20) - 0x1_0000);
        // Reported (untracked): nothing is remembered.
        assert!(ram.partial.is_empty());
    }

    #[test]
    fn test_inflate_partial_host_page_released_when_complete() {
        let (mut ram, file) = ram(1 << 20, 0x1_0000);
        touch(&file, 0, 1 << 20);
        for i in 0..15 {
            assert_eq!(ram.release(BASE + i * 0x1000, 0x1000, true).expect("r"), 0);
        }
        assert_eq!(ram.partial.len(), 1);
        assert_eq!(allocated(&file), 1 << 20, "nothing released yet");
        assert_eq!(
            ram.release(BASE + 0xf000, 0x1000, true).expect("r"),
            0x1_0000
        );
        assert!(ram.partial.is_empty());
        assert_eq!(allocated(&file), (1 << 20) - 0x1_0000);
    }

    #[test]
    fn test_deflate_forgets_partial_host_page() {
        let (mut ram, file) = ram(1 << 20, 0x1_0000);
        touch(&file, 0, 1 << 20);
        for i in 0..8 {
            ram.release(BASE + i * 0x1000, 0x1000, true).expect("r");
        }
        ram.deflate(BASE + 0x3000, 0x1000).expect("deflate");
        assert!(ram.partial.is_empty());
        for i in 8..16 {
            ram.release(BASE + i * 0x1000, 0x1000, true).expect("r");
        }
        assert_eq!(
            allocated(&file),
            1 << 20,
            "a deflated page was not released"
        );
    }

    #[test]
    fn test_partial_bounded_then_untracked() {
        // 2 MiB host pages (8 words each): one balloon page in each of two host pages.
        let (mut ram, _file) = ram(64 << 20, 2 << 20);
        ram.partial.words = MAX_PARTIAL_WORDS - 8;
        ram.release(BASE, 0x1000, true).expect("first");
        assert_eq!(ram.partial.len(), 1);
        ram.release(BASE + (2 << 20), 0x1000, true).expect("second");
        assert_eq!(ram.partial.len(), 1, "past the bound: not remembered");
        assert_eq!(ram.partial.words, MAX_PARTIAL_WORDS);
        ram.deflate(BASE, 0x1000).expect("deflate");
        assert_eq!(ram.partial.words, MAX_PARTIAL_WORDS - 8);
    }

    #[test]
    fn test_outside_ram_rejected_nothing_released() {
        let (mut ram, file) = ram(1 << 20, 4096);
        touch(&file, 0, 1 << 20);
        for (gpa, len) in [
            (0, 0x1000),
            (BASE - 0x1000, 0x2000),
            (BASE + (1 << 20) - 0x1000, 0x2000),
            (BASE + (1 << 20), 0x1000),
            (u64::MAX - 0xfff, 0x1000),
        ] {
            assert!(ram.check(gpa, len).is_err(), "{gpa:#x}+{len:#x}");
            assert!(matches!(
                ram.release(gpa, len, true),
                Err(RamError::OutsideRam { .. })
            ));
        }
        assert_eq!(allocated(&file), 1 << 20);
    }

    #[test]
    fn test_from_memory_finds_file_and_page_size() {
        let file = memfd(1 << 20);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            vm_memory::GuestAddress(BASE),
            1 << 20,
            Some(FileOffset::new(file, 0)),
        )])
        .expect("mem");
        let ram = GuestRam::from_memory(&mem).expect("ram");
        assert_eq!(ram.regions.len(), 1);
        assert_eq!(ram.size(), 1 << 20);
        // SAFETY: sysconf reads a constant.
        let base = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        assert!(ram.regions[0].page_size >= base);
        let anon = GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 16)])
            .expect("m");
        assert!(matches!(
            GuestRam::from_memory(&anon),
            Err(RamError::NoFile { .. })
        ));
    }
}
