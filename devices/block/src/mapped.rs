//! Requests on a tmpfs image served from a mapping of the file, without a system call.
//!
//! On tmpfs a 4 KiB `preadv` spends as much time finding the page (the file's xarray walk,
//! `filemap_get_entry`), entering the kernel and updating the access time as copying it: the
//! depth-1 profile in docs/benchmarks.md. Mapped into the device process (`MAP_SHARED`: the same
//! page-cache pages the syscalls use, so both ways stay coherent), the image is copied to and
//! from guest memory with no system call, and a page that is mapped once is found by the MMU.
//!
//! Three things the syscalls did and a mapping must not get wrong:
//!
//! - **A fault is an error, not a crash.** Touching the mapping past the file's end (the host
//!   shrank the image), a page tmpfs cannot allocate or a poisoned page raises SIGBUS. The copy
//!   is a small assembly routine ([`copy`]) whose faulting instructions this module's SIGBUS
//!   handler recognises by address and resumes at the routine's fix-up, which returns "faulted";
//!   the request then goes through the syscalls, which report the error the usual way, and the
//!   mapping is not used again. A SIGBUS anywhere else goes to the handler that was there before
//!   (Rust's, or the default: the process dies as it would have). No crate does this:
//!   vm-memory's and std's copies are plain loads and stores whose faults cannot be told apart.
//! - **Holes stay holes.** A read fault on a hole of a tmpfs file allocates a page (a `read`
//!   returns zeros without one), so a guest reading a sparse image could make the host allocate
//!   memory it never wrote, even on a read-only disk. Only chunks that held data from end to end
//!   when the image was opened (`SEEK_DATA`/`SEEK_HOLE`) are served from the mapping, and a
//!   chunk leaves it, for good, before any part of it is punched (discard, write zeroes).
//! - **Only tmpfs.** ramfs and hugetlbfs keep the syscalls (hugetlbfs maps only whole huge
//!   pages; neither reports holes), and so do block devices and regular file systems, where the
//!   page cache can miss and a fault would wait for the disk in the middle of a copy.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use log::{info, warn};

/// The granule of the data map: 256 KiB, so the map of a 1 TiB image is 512 KiB.
const CHUNK_SHIFT: u32 = 18;

/// The largest image that is mapped. Every 4 KiB page the guest touches costs the process 8
/// bytes of page table, charged to its memory budget (docs/jail-resources.md, 256 MiB by
/// default): at most 64 MiB for an image of this size.
const MAX_MAPPED: u64 = 32 << 30;

/// A tmpfs image mapped into the process.
pub struct MappedImage {
    base: *mut u8,
    len: usize,
    writable: bool,
    /// One bit per chunk: set while the chunk is all data (see the module doc).
    data: Vec<AtomicU64>,
    /// Set once a copy faulted: the file changed under the mapping; the syscalls take over.
    faulted: AtomicBool,
}

// SAFETY: the mapping is shared memory that the kernel keeps coherent; `MappedImage` only copies
// through it with `copy`, which tolerates concurrent changes (the same guarantees a concurrent
// `preadv`/`pwritev` on the file would give), and the bitmap is atomic.
unsafe impl Send for MappedImage {}
// SAFETY: as above.
unsafe impl Sync for MappedImage {}

impl MappedImage {
    /// Maps the first `len` bytes of `fd` (a tmpfs file opened for reading, and for writing if
    /// `writable`), and finds its all-data chunks. `None` (after a log line saying why) if the
    /// image is better served by the syscalls.
    pub fn new(fd: RawFd, len: u64, writable: bool) -> Option<MappedImage> {
        if len > MAX_MAPPED {
            info!(
                "the image is larger than {} GiB: it is read and written with syscalls (its \
                 page tables would weigh on the device's memory budget)",
                MAX_MAPPED >> 30
            );
            return None;
        }
        let len = usize::try_from(len).ok().filter(|&l| l > 0)?;
        if let Err(e) = install_handler() {
            warn!("cannot install the SIGBUS handler ({e}): the image is read with syscalls");
            return None;
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a new shared mapping of our own descriptor at an address the kernel picks;
        // nothing else is touched.
        let base = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
        if base == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            warn!("cannot map the image ({e}): it is read with syscalls");
            return None;
        }
        let chunks = len.div_ceil(1 << CHUNK_SHIFT);
        let map = MappedImage {
            base: base.cast(),
            len,
            writable,
            data: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            faulted: AtomicBool::new(false),
        };
        match map.find_data(fd) {
            Ok(n) => info!(
                "the image is mapped: {n} of its {chunks} chunks ({} KiB each) hold data and \
                 are read and written without a system call, the rest with syscalls",
                (1 << CHUNK_SHIFT) >> 10
            ),
            Err(e) => {
                warn!("cannot find the image's holes ({e}): it is read with syscalls");
                return None;
            }
        }
        Some(map)
    }

    /// Sets the bit of every chunk that holds data from end to end; returns how many.
    fn find_data(&self, fd: RawFd) -> std::io::Result<usize> {
        let len = self.len as u64;
        let mut pos = 0u64;
        let mut found = 0;
        while pos < len {
            let Some(start) = seek(fd, pos, libc::SEEK_DATA)? else {
                break;
            };
            let end = seek(fd, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
            if end <= start {
                break;
            }
            // Chunks wholly inside [start, end); the file's last chunk may be short.
            let first = start.div_ceil(1 << CHUNK_SHIFT);
            let last = if end == len {
                len.div_ceil(1 << CHUNK_SHIFT)
            } else {
                end >> CHUNK_SHIFT
            };
            for chunk in first..last {
                self.set(chunk);
                found += 1;
            }
            pos = end;
        }
        Ok(found)
    }

    /// The word of the data map that holds `chunk`'s bit, and the bit.
    fn bit(&self, chunk: u64) -> Option<(&AtomicU64, u64)> {
        let word = self.data.get(usize::try_from(chunk / 64).ok()?)?;
        Some((word, 1 << (chunk % 64)))
    }

    fn set(&self, chunk: u64) {
        if let Some((word, bit)) = self.bit(chunk) {
            word.fetch_or(bit, Ordering::Relaxed);
        }
    }

    /// Whether `[offset, offset + len)` is inside the image and all of it in data chunks.
    fn covers(&self, offset: u64, len: usize) -> bool {
        let Some(end) = offset.checked_add(len as u64) else {
            return false;
        };
        if len == 0 || end > self.len as u64 || self.faulted.load(Ordering::Relaxed) {
            return false;
        }
        let (first, last) = (offset >> CHUNK_SHIFT, (end - 1) >> CHUNK_SHIFT);
        (first..=last).all(|c| {
            self.bit(c)
                .is_some_and(|(word, bit)| word.load(Ordering::Acquire) & bit != 0)
        })
    }

    /// Takes every chunk that `[offset, offset + len)` touches off the mapping, for good: call
    /// it before punching a hole there.
    pub fn forget(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> CHUNK_SHIFT;
        let last = offset.saturating_add(len - 1) >> CHUNK_SHIFT;
        let last = last.min(((self.len as u64).saturating_sub(1)) >> CHUNK_SHIFT);
        for c in first..=last {
            if let Some((word, bit)) = self.bit(c) {
                word.fetch_and(!bit, Ordering::AcqRel);
            }
        }
    }

    /// Copies the image's bytes at `offset` into `iovecs` through the mapping. False if it
    /// cannot (not all data, or a fault): the caller uses the syscalls for the whole request.
    ///
    /// # Safety
    /// Every iovec must describe memory valid for writes and mapped for the call.
    pub unsafe fn read(&self, iovecs: &[libc::iovec], offset: u64) -> bool {
        // SAFETY: forwarded.
        unsafe { self.transfer(iovecs, offset, false) }
    }

    /// Copies `iovecs` into the image at `offset` through the mapping; false as for `read`.
    ///
    /// # Safety
    /// Every iovec must describe memory valid for reads and mapped for the call.
    pub unsafe fn write(&self, iovecs: &[libc::iovec], offset: u64) -> bool {
        // SAFETY: forwarded.
        self.writable && unsafe { self.transfer(iovecs, offset, true) }
    }

    unsafe fn transfer(&self, iovecs: &[libc::iovec], offset: u64, write: bool) -> bool {
        let total: usize = iovecs.iter().map(|v| v.iov_len).sum();
        if !self.covers(offset, total) {
            return false;
        }
        let mut at = offset as usize;
        for v in iovecs {
            // SAFETY: `covers` put [offset, offset + total) inside the mapping.
            let image = unsafe { self.base.add(at) };
            let guest = v.iov_base.cast::<u8>();
            let (dst, src) = if write {
                (image, guest.cast_const())
            } else {
                (guest, image.cast_const())
            };
            // SAFETY: both ranges are mapped for the call (the caller's contract and `covers`);
            // a fault in either is caught and reported by `copy`.
            if unsafe { copy(dst, src, v.iov_len) }.is_err() {
                if !self.faulted.swap(true, Ordering::Relaxed) {
                    warn!(
                        "a copy through the image's mapping faulted at offset {at} (was the \
                         image shrunk?): requests go through syscalls from now on"
                    );
                }
                return false;
            }
            at += v.iov_len;
        }
        true
    }
}

impl std::fmt::Debug for MappedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedImage")
            .field("len", &self.len)
            .field("writable", &self.writable)
            .field("faulted", &self.faulted)
            .finish_non_exhaustive()
    }
}

impl Drop for MappedImage {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; no copy runs (we hold `&mut`).
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// lseek(SEEK_DATA/SEEK_HOLE): `None` at ENXIO (no data at or after `pos`).
fn seek(fd: RawFd, pos: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let pos = libc::off_t::try_from(pos).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: lseek on our descriptor; the I/O paths use positioned calls, so moving the file
    // offset disturbs nothing.
    let r = unsafe { libc::lseek(fd, pos, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

/// A copy through the mapping faulted (SIGBUS).
#[derive(Debug)]
pub struct Fault;

/// Copies `len` bytes from `src` to `dst`; a fault while touching either ends the copy with
/// `Err(Fault)` instead of killing the process (see the module doc), once [`install_handler`]
/// has run.
///
/// # Safety
/// `src` and `dst` must not overlap, and must each be `len` bytes of memory this process may
/// read and write respectively, except that pages there may fault.
pub unsafe fn copy(dst: *mut u8, src: *const u8, len: usize) -> Result<(), Fault> {
    // SAFETY: forwarded; the routine only loads from `src` and stores to `dst`, `len` bytes.
    match unsafe { bulkhead_block_mcopy(dst, src, len) } {
        0 => Ok(()),
        _ => Err(Fault),
    }
}

unsafe extern "C" {
    /// Returns 0 after copying, 1 if a load or store faulted (the SIGBUS handler moved the
    /// program counter to `bulkhead_block_mcopy_fault`).
    fn bulkhead_block_mcopy(dst: *mut u8, src: *const u8, len: usize) -> u64;
    /// The first instruction after the ones that may fault.
    fn bulkhead_block_mcopy_end();
    /// Where a fault resumes.
    fn bulkhead_block_mcopy_fault();
}

// x86_64 (System V): rdi = dst, rsi = src, rdx = len; `rep movsb` is the fast copy on every
// CPU with ERMS/FSRM and the only instruction that touches memory. The stack is untouched, so
// the fix-up can return straight to the caller.
#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".text",
    ".balign 16",
    ".globl bulkhead_block_mcopy",
    ".type bulkhead_block_mcopy, @function",
    "bulkhead_block_mcopy:",
    "mov rcx, rdx",
    "rep movsb",
    ".globl bulkhead_block_mcopy_end",
    "bulkhead_block_mcopy_end:",
    "xor eax, eax",
    "ret",
    ".globl bulkhead_block_mcopy_fault",
    ".type bulkhead_block_mcopy_fault, @function",
    "bulkhead_block_mcopy_fault:",
    "mov eax, 1",
    "ret",
);

// aarch64: x0 = dst, x1 = src, x2 = len; 32 bytes a step through q0/q1 (caller-saved), then
// bytes. No call and no stack: the link register still holds the caller's return address at
// the fix-up.
#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(
    ".text",
    ".balign 16",
    ".globl bulkhead_block_mcopy",
    ".type bulkhead_block_mcopy, %function",
    "bulkhead_block_mcopy:",
    "cmp x2, #32",
    "b.lo 2f",
    "1:",
    "ldp q0, q1, [x1], #32",
    "stp q0, q1, [x0], #32",
    "sub x2, x2, #32",
    "cmp x2, #32",
    "b.hs 1b",
    "2:",
    "cbz x2, 3f",
    "ldrb w3, [x1], #1",
    "strb w3, [x0], #1",
    "sub x2, x2, #1",
    "b 2b",
    "3:",
    ".globl bulkhead_block_mcopy_end",
    "bulkhead_block_mcopy_end:",
    "mov x0, #0",
    "ret",
    ".globl bulkhead_block_mcopy_fault",
    ".type bulkhead_block_mcopy_fault, %function",
    "bulkhead_block_mcopy_fault:",
    "mov x0, #1",
    "ret",
);

/// The SIGBUS action that was installed before ours, for faults that are not a copy's.
static PREVIOUS: OnceLock<Result<libc::sigaction, i32>> = OnceLock::new();

/// Installs the SIGBUS handler (once per process; before the seccomp filter, which allows
/// `rt_sigaction` and `rt_sigreturn` anyway).
pub fn install_handler() -> Result<(), std::io::Error> {
    let r = PREVIOUS.get_or_init(|| {
        // SAFETY: all-zero is a valid sigaction; the fields are set below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: all-zero is a valid sigaction to receive the old one.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: sigemptyset initialises the mask it is given.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: `action` is a valid handler for SIGBUS with SA_SIGINFO; `old` receives the
        // previous one.
        if unsafe { libc::sigaction(libc::SIGBUS, &action, &mut old) } != 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        Ok(old)
    });
    r.as_ref()
        .map(|_| ())
        .map_err(|&e| std::io::Error::from_raw_os_error(e))
}

extern "C" fn on_sigbus(sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let start = bulkhead_block_mcopy as *const () as usize;
    let end = bulkhead_block_mcopy_end as *const () as usize;
    // SAFETY: the kernel passes a valid ucontext to an SA_SIGINFO handler.
    let uc = unsafe { &mut *ctx.cast::<libc::ucontext_t>() };
    let pc = program_counter(uc);
    if (start..end).contains(&pc) {
        set_program_counter(uc, bulkhead_block_mcopy_fault as *const () as usize);
        return;
    }
    // Not a copy's fault: put the previous action back and let the instruction fault again
    // under it (SIG_DFL: the process dies of SIGBUS, as without this handler).
    match PREVIOUS.get() {
        Some(Ok(old)) => {
            // SAFETY: sigaction is async-signal-safe; `old` is the action the kernel gave us.
            unsafe { libc::sigaction(sig, old, std::ptr::null_mut()) };
        }
        _ => {
            // SAFETY: as above, with the default action.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn program_counter(uc: &libc::ucontext_t) -> usize {
    uc.uc_mcontext.gregs[libc::REG_RIP as usize] as usize
}

#[cfg(target_arch = "x86_64")]
fn set_program_counter(uc: &mut libc::ucontext_t, pc: usize) {
    uc.uc_mcontext.gregs[libc::REG_RIP as usize] = pc as libc::greg_t;
}

#[cfg(target_arch = "aarch64")]
fn program_counter(uc: &libc::ucontext_t) -> usize {
    uc.uc_mcontext.pc as usize
}

#[cfg(target_arch = "aarch64")]
fn set_program_counter(uc: &mut libc::ucontext_t, pc: usize) {
    uc.uc_mcontext.pc = pc as _;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    /// A file in /dev/shm (tmpfs), `len` bytes of `fill`, already unlinked.
    fn shm_file(len: usize, fill: u8) -> std::fs::File {
        let path = format!(
            "/dev/shm/bulkhead-mapped-test.{}.{:?}",
            std::process::id(),
            std::thread::current().id()
        );
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("a file in /dev/shm");
        let _ = std::fs::remove_file(&path);
        f.write_all(&vec![fill; len]).expect("fill");
        f
    }

    /// A shared read-only mapping of two pages over the one-page file `f`: its second page
    /// faults (SIGBUS). Unmap it with `munmap(p, 8192)`.
    fn past_the_end(f: &std::fs::File) -> *mut libc::c_void {
        // SAFETY: a new shared mapping of our own descriptor at an address the kernel picks.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p
    }

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn test_copy_copies_and_reports_a_fault() {
        let src: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut dst = vec![0u8; 1000];
        install_handler().expect("handler");
        for len in [0, 1, 31, 32, 33, 1000] {
            dst.fill(0);
            // SAFETY: two distinct vectors of 1000 bytes.
            unsafe { copy(dst.as_mut_ptr(), src.as_ptr(), len) }.expect("copy");
            assert_eq!(dst[..len], src[..len], "len {len}");
            assert!(
                dst[len..].iter().all(|&b| b == 0),
                "len {len}: wrote past the end"
            );
        }
        // A page past the end of a file: SIGBUS, caught.
        let f = shm_file(4096, 7);
        let p = past_the_end(&f);
        let mut buf = vec![0u8; 8192];
        // SAFETY: the first page is backed by the file, the second faults (SIGBUS).
        assert!(unsafe { copy(buf.as_mut_ptr(), p.cast(), 4096) }.is_ok());
        assert!(buf[..4096].iter().all(|&b| b == 7));
        // SAFETY: as above.
        assert!(unsafe { copy(buf.as_mut_ptr(), p.cast(), 8192) }.is_err());
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, 8192) };
    }

    #[test]
    fn test_mapped_image_reads_writes_and_keeps_off_holes() {
        let chunk = 1usize << CHUNK_SHIFT;
        let f = shm_file(4 * chunk, 0xa5);
        // Chunk 2 gets a hole in its middle.
        // SAFETY: fallocate on our file.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (2 * chunk + 4096) as i64,
                4096,
            )
        };
        assert_eq!(r, 0);
        let map = MappedImage::new(f.as_raw_fd(), (4 * chunk) as u64, true).expect("mapped");
        let mut buf = vec![0u8; 8192];
        // SAFETY: `buf` is ours for each call.
        unsafe {
            assert!(map.read(&[iov(&mut buf)], 0));
            assert!(buf.iter().all(|&b| b == 0xa5));
            // Across chunks 0 and 1: both data.
            assert!(map.read(&[iov(&mut buf)], (chunk - 4096) as u64));
            // Chunk 2 has a hole: syscalls.
            assert!(!map.read(&[iov(&mut buf)], (2 * chunk) as u64));
            // Past the end: refused.
            assert!(!map.read(&[iov(&mut buf)], (4 * chunk - 4096) as u64));
            // A write lands in the file.
            buf.fill(0x3c);
            assert!(map.write(&[iov(&mut buf)], (3 * chunk) as u64));
        }
        let mut back = vec![0u8; 8192];
        // SAFETY: pread into `back`.
        let n = unsafe {
            libc::pread(
                f.as_raw_fd(),
                back.as_mut_ptr().cast(),
                back.len(),
                (3 * chunk) as i64,
            )
        };
        assert_eq!(n, 8192);
        assert!(back.iter().all(|&b| b == 0x3c));
        // A chunk that is forgotten (about to be punched) is not used again.
        map.forget((3 * chunk + 100) as u64, 1);
        // SAFETY: as above.
        assert!(!unsafe { map.read(&[iov(&mut buf)], (3 * chunk) as u64) });
        // SAFETY: as above.
        assert!(unsafe { map.read(&[iov(&mut buf)], chunk as u64) });
    }

    #[test]
    fn test_image_over_the_cap_is_not_mapped() {
        let f = shm_file(0, 0);
        // Sparse: no memory is allocated.
        f.set_len(MAX_MAPPED + 4096).expect("size");
        assert!(MappedImage::new(f.as_raw_fd(), MAX_MAPPED + 4096, false).is_none());
    }

    #[test]
    fn test_mapped_image_shrunk_under_it_faults_once_then_refuses() {
        let chunk = 1usize << CHUNK_SHIFT;
        let f = shm_file(2 * chunk, 1);
        let map = MappedImage::new(f.as_raw_fd(), (2 * chunk) as u64, false).expect("mapped");
        f.set_len(chunk as u64).expect("shrink");
        let mut buf = vec![0u8; 4096];
        // SAFETY: `buf` is ours; the page past the new end faults (SIGBUS), which is caught.
        assert!(!unsafe { map.read(&[iov(&mut buf)], (chunk + 4096) as u64) });
        // The mapping is not trusted any more, even where the file still is.
        // SAFETY: as above.
        assert!(!unsafe { map.read(&[iov(&mut buf)], 0) });
        // A read-only mapping never writes.
        // SAFETY: as above.
        assert!(!unsafe { map.write(&[iov(&mut buf)], 0) });
    }

    /// Under bulkhead-block's own seccomp filter, a faulting copy returns an error and the
    /// process goes on (the handler's return is `rt_sigreturn`).
    #[test]
    fn test_copy_fault_is_survived_under_the_block_filter() {
        use bulkhead_sandbox::seccomp::{enforcement, run_in_child, ChildEnd, Enforcement};
        let prog = crate::seccomp::seccomp_filter().expect("filter");
        if enforcement(&prog) != Enforcement::Enforced {
            // As the real-kernel matrix: the x86_64 run checks this on the kernel.
            println!("seccomp filters are not enforced here (qemu-user?): test not run");
            return;
        }
        install_handler().expect("handler");
        let f = shm_file(4096, 9);
        let p = past_the_end(&f);
        let mut buf = vec![0u8; 8192];
        let dst = buf.as_mut_ptr();
        // SAFETY: the child only runs the copy (no allocation, no lock) and _exit.
        let end = unsafe {
            run_in_child(&prog, || {
                let ok = copy(dst, p.cast(), 4096).is_ok();
                let faulted = copy(dst, p.cast(), 8192).is_err();
                libc::_exit(if ok && faulted { 0 } else { 1 });
            })
        };
        assert!(matches!(end, ChildEnd::Exited(0)), "{end:?}");
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, 8192) };
    }
}
