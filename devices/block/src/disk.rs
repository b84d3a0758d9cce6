//! The raw disk image behind the device: opened once before serving, then used only through
//! its file descriptor (no path lookups afterwards).

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use log::{info, warn};

use crate::mapped::MappedImage;

/// The virtio-blk sector: every `sector` field in the protocol counts 512-byte units.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;

/// Largest number of iovecs one preadv/pwritev (or io_uring READV/WRITEV) accepts (UIO_MAXIOV).
pub const MAX_IOVECS: usize = 1024;

/// Size of the zero-filled buffer used when write-zeroes has to fall back to plain writes.
const ZERO_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("descriptor for disk image {} cannot be used", path.display())]
    ImageFd {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot inspect disk image {}", path.display())]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {} is neither a regular file nor a block device", path.display())]
    NotFileOrBlockDevice { path: PathBuf },
    #[error("disk image {} is {size} bytes, smaller than one 512-byte sector", path.display())]
    TooSmall { path: PathBuf, size: u64 },
    #[error("cannot query the O_DIRECT alignment of disk image {}", path.display())]
    DirectAlignment {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {} needs O_DIRECT alignment {offset_align} (offset) / {mem_align} (memory), which is unsupported (must be a power of two from 512 to 4096 / up to 4096)", path.display())]
    UnsupportedDirectAlignment {
        path: PathBuf,
        offset_align: u32,
        mem_align: u32,
    },
}

/// What O_DIRECT needs from every request: file offsets and segment lengths aligned to
/// `offset_align`, buffer addresses aligned to `mem_align`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectAlignment {
    pub offset_align: u32,
    pub mem_align: u32,
}

/// How the image is opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenMode {
    pub read_only: bool,
    pub direct: bool,
}

/// An open raw disk image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    capacity_sectors: u64,
    read_only: bool,
    direct: Option<DirectAlignment>,
    /// A regular file in memory (tmpfs, ramfs, hugetlbfs): see [`DiskImage::memory_backed`].
    memory_backed: bool,
    /// Set once `FALLOC_FL_PUNCH_HOLE` turned out unsupported, so later requests skip it.
    no_punch_hole: AtomicBool,
    /// Set once `FALLOC_FL_ZERO_RANGE` turned out unsupported.
    no_zero_range: AtomicBool,
    /// What the guest asked of this disk so far.
    pub stats: RequestStats,
    /// A tmpfs image's mapping, which serves the requests on its data without a syscall.
    mapped: Option<MappedImage>,
}

/// Requests served, by kind, for the operator (logged when the frontend disconnects).
#[derive(Debug, Default)]
pub struct RequestStats {
    /// Read requests and bytes read into the guest.
    pub reads: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Write requests.
    pub writes: AtomicU64,
    /// Bytes written from the guest.
    pub write_bytes: AtomicU64,
    /// Flush requests.
    pub flushes: AtomicU64,
    /// Discard requests.
    pub discards: AtomicU64,
    /// Write-zeroes requests.
    pub write_zeroes: AtomicU64,
    /// GET_ID requests.
    pub get_ids: AtomicU64,
    /// Requests completed with an error status.
    pub errors: AtomicU64,
    /// Chains refused without a status byte (malformed, over seg_max or size_max, duplicate).
    pub refused: AtomicU64,
    /// Times a request waited for the next batch because a batch budget was reached.
    pub deferred: AtomicU64,
    /// Times a queue was marked broken by its driver.
    pub broken_queues: AtomicU64,
    /// Times a queue stopped taking requests because the rate limiter refused the next one.
    pub throttled: AtomicU64,
}

impl std::fmt::Display for RequestStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "reads={} read_bytes={} writes={} write_bytes={} flushes={} discards={} write_zeroes={} get_ids={} errors={} refused={} deferred={} broken_queues={} throttled={}",
            g(&self.reads),
            g(&self.read_bytes),
            g(&self.writes),
            g(&self.write_bytes),
            g(&self.flushes),
            g(&self.discards),
            g(&self.write_zeroes),
            g(&self.get_ids),
            g(&self.errors),
            g(&self.refused),
            g(&self.deferred),
            g(&self.broken_queues),
            g(&self.throttled)
        )
    }
}

impl DiskImage {
    /// Opens `path` (a regular file or a block device).
    pub fn open(path: &Path, mode: OpenMode) -> Result<Self, DiskError> {
        let mut flags = libc::O_CLOEXEC;
        if mode.direct {
            flags |= libc::O_DIRECT;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!mode.read_only)
            .custom_flags(flags)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_owned(),
                source,
            })?;
        Self::from_file(file, path, mode)
    }

    /// Takes an image opened by someone else (the VMM, which hands a jailed device process its
    /// image as a descriptor); `name` only names it in messages. The descriptor must be open
    /// for reading, and for writing unless `mode.read_only`; with `mode.direct` O_DIRECT is set
    /// on it here.
    pub fn from_fd(fd: OwnedFd, name: &Path, mode: OpenMode) -> Result<Self, DiskError> {
        let bad = |source| DiskError::ImageFd {
            path: name.to_owned(),
            source,
        };
        // SAFETY: F_GETFL on a descriptor we own only returns its flags.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(bad(io::Error::last_os_error()));
        }
        // O_ACCMODE (not in the libc crate's Linux bindings).
        let access = flags & 3;
        if access == libc::O_WRONLY || (access == libc::O_RDONLY && !mode.read_only) {
            return Err(bad(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the descriptor is not open for reading and writing (use --readonly for a read-only one)",
            )));
        }
        if mode.direct && flags & libc::O_DIRECT == 0 {
            // SAFETY: F_SETFL on a descriptor we own changes only its status flags.
            if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_DIRECT) } < 0 {
                return Err(bad(io::Error::last_os_error()));
            }
        }
        // SAFETY: F_SETFD on a descriptor we own changes only its descriptor flags.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(bad(io::Error::last_os_error()));
        }
        Self::from_file(File::from(fd), name, mode)
    }

    fn from_file(mut file: File, path: &Path, mode: OpenMode) -> Result<Self, DiskError> {
        let inspect = |source| DiskError::Inspect {
            path: path.to_owned(),
            source,
        };
        let file_type = file.metadata().map_err(inspect)?.file_type();
        if !file_type.is_file() && !file_type.is_block_device() {
            return Err(DiskError::NotFileOrBlockDevice {
                path: path.to_owned(),
            });
        }
        // Seeking to the end gives the size of block devices as well as of files.
        let size = file.seek(SeekFrom::End(0)).map_err(inspect)?;
        if size < SECTOR_SIZE {
            return Err(DiskError::TooSmall {
                path: path.to_owned(),
                size,
            });
        }
        if size % SECTOR_SIZE != 0 {
            warn!(
                "disk image {} is {size} bytes, not a multiple of 512: the last {} bytes are not visible to the guest",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        let direct = if mode.direct {
            let align = direct_alignment(&file).map_err(|source| DiskError::DirectAlignment {
                path: path.to_owned(),
                source,
            })?;
            let offset_ok =
                align.offset_align.is_power_of_two() && (512..=4096).contains(&align.offset_align);
            let mem_ok = align.mem_align.is_power_of_two() && align.mem_align <= 4096;
            if !offset_ok || !mem_ok {
                return Err(DiskError::UnsupportedDirectAlignment {
                    path: path.to_owned(),
                    offset_align: align.offset_align,
                    mem_align: align.mem_align,
                });
            }
            info!(
                "O_DIRECT: offset alignment {}, memory alignment {}",
                align.offset_align, align.mem_align
            );
            Some(align)
        } else {
            None
        };
        let memory_fs = file_type
            .is_file()
            .then(|| memory_file_system(&file))
            .flatten();
        let memory_backed = memory_fs.is_some();
        if memory_backed {
            info!("the image is in memory (tmpfs): its reads and writes are done inline");
        }
        let capacity_sectors = size >> SECTOR_SHIFT;
        let mapped = (memory_fs == Some(MemoryFs::Tmpfs))
            .then(|| {
                MappedImage::new(
                    file.as_raw_fd(),
                    capacity_sectors << SECTOR_SHIFT,
                    !mode.read_only,
                )
            })
            .flatten();
        Ok(DiskImage {
            file,
            capacity_sectors,
            read_only: mode.read_only,
            direct,
            memory_backed,
            no_punch_hole: AtomicBool::new(false),
            no_zero_range: AtomicBool::new(false),
            stats: RequestStats::default(),
            mapped,
        })
    }

    /// Size of the image in 512-byte sectors (a trailing partial sector is not counted).
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether the image is a file in a memory file system (tmpfs, ramfs, hugetlbfs). Its
    /// reads and writes never wait for a device, and io_uring cannot issue them inline: such
    /// a file system does not declare `FMODE_NOWAIT`, so io_uring hands every request on it to
    /// an io-wq worker thread, two context switches and a wake-up per request (the QD1 profile
    /// in docs/benchmarks.md). The engine does them with plain syscalls instead.
    pub fn memory_backed(&self) -> bool {
        self.memory_backed
    }

    /// The O_DIRECT alignment, if the image was opened with O_DIRECT.
    pub fn direct_alignment(&self) -> Option<DirectAlignment> {
        self.direct
    }

    /// The logical block size to advertise: 512, or the O_DIRECT offset alignment if larger.
    pub fn logical_block_size(&self) -> u32 {
        self.direct.map_or(SECTOR_SIZE as u32, |a| {
            a.offset_align.max(SECTOR_SIZE as u32)
        })
    }

    /// Whether `FALLOC_FL_PUNCH_HOLE` is still believed to work.
    pub(crate) fn punch_hole_supported(&self) -> bool {
        !self.no_punch_hole.load(Ordering::Relaxed)
    }

    /// Whether `FALLOC_FL_ZERO_RANGE` is still believed to work.
    pub(crate) fn zero_range_supported(&self) -> bool {
        !self.no_zero_range.load(Ordering::Relaxed)
    }

    pub(crate) fn note_punch_hole_unsupported(&self) {
        if !self.no_punch_hole.swap(true, Ordering::Relaxed) {
            info!("the image does not support hole punching; discard is a no-op");
        }
    }

    pub(crate) fn note_zero_range_unsupported(&self) {
        if !self.no_zero_range.swap(true, Ordering::Relaxed) {
            info!("the image does not support FALLOC_FL_ZERO_RANGE; using fallbacks");
        }
    }

    /// Reads exactly the bytes described by `iovecs` from `offset`, retrying short reads.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for writes and stays mapped for the
    /// duration of the call.
    pub(crate) unsafe fn read_vectored_at(
        &self,
        iovecs: &[libc::iovec],
        offset: u64,
    ) -> io::Result<()> {
        if let Some(m) = &self.mapped {
            // SAFETY: forwarded from the caller's contract.
            if unsafe { m.read(iovecs, offset) } {
                return Ok(());
            }
        }
        // SAFETY: forwarded from the caller's contract.
        unsafe { rw_vectored_all(self.fd(), iovecs, offset, false) }
    }

    /// Writes exactly the bytes described by `iovecs` at `offset`, retrying short writes.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for reads and stays mapped for the
    /// duration of the call.
    pub(crate) unsafe fn write_vectored_at(
        &self,
        iovecs: &[libc::iovec],
        offset: u64,
    ) -> io::Result<()> {
        if let Some(m) = &self.mapped {
            // SAFETY: forwarded from the caller's contract.
            if unsafe { m.write(iovecs, offset) } {
                return Ok(());
            }
        }
        // SAFETY: forwarded from the caller's contract.
        unsafe { rw_vectored_all(self.fd(), iovecs, offset, true) }
    }

    /// Makes completed writes stable (VIRTIO_BLK_T_FLUSH).
    pub(crate) fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates `len` bytes at `offset` (VIRTIO_BLK_T_DISCARD). Discard is a hint, so an image
    /// that cannot punch holes completes it without doing anything.
    pub(crate) fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.punch_hole_supported() {
            return Ok(());
        }
        match self.fallocate(punch_hole_mode(), offset, len) {
            Err(e) if is_unsupported(&e) => {
                self.note_punch_hole_unsupported();
                Ok(())
            }
            other => other,
        }
    }

    /// Makes `len` bytes at `offset` read back as zeroes (VIRTIO_BLK_T_WRITE_ZEROES), preferring
    /// to deallocate when `unmap` is set; falls back to writing zeroes.
    pub(crate) fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let order: [(bool, i32); 2] = if unmap {
            [(true, punch_hole_mode()), (false, zero_range_mode())]
        } else {
            [(false, zero_range_mode()), (true, punch_hole_mode())]
        };
        for (is_punch, mode) in order {
            let supported = if is_punch {
                self.punch_hole_supported()
            } else {
                self.zero_range_supported()
            };
            if !supported {
                continue;
            }
            match self.fallocate(mode, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if is_unsupported(&e) => {
                    if is_punch {
                        self.note_punch_hole_unsupported();
                    } else {
                        self.note_zero_range_unsupported();
                    }
                }
                Err(e) => return Err(e),
            }
        }
        self.write_zero_buffers(offset, len)
    }

    fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        let align = self.direct.map_or(8, |a| a.mem_align.max(512) as usize);
        let zeroes = AlignedBuf::new(ZERO_CHUNK, align)?;
        let mut done = 0u64;
        while done < len {
            let chunk = usize::try_from(len - done).map_or(ZERO_CHUNK, |n| n.min(ZERO_CHUNK));
            let iov = [libc::iovec {
                iov_base: zeroes.as_ptr() as *mut libc::c_void,
                iov_len: chunk,
            }];
            let at = offset
                .checked_add(done)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: the iovec covers `chunk <= ZERO_CHUNK` bytes of `zeroes`, alive until the
            // end of this function.
            unsafe { self.write_vectored_at(&iov, at)? };
            done += chunk as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        if let Some(m) = &self.mapped {
            // Before the hole exists: a read through the mapping must never fault one in.
            m.forget(offset, len);
        }
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let len =
            libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        loop {
            // SAFETY: fallocate only acts on our open descriptor; no memory is passed.
            let ret = unsafe { libc::fallocate(self.fd(), mode, offset, len) };
            if ret == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

pub(crate) fn punch_hole_mode() -> i32 {
    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
}

pub(crate) fn zero_range_mode() -> i32 {
    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
}

/// Whether a fallocate error means "this mode is not available here" rather than an I/O error.
pub(crate) fn is_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENOTTY)
    )
}

/// preadv/pwritev until every byte of `iovecs` is transferred.
///
/// # Safety
/// Every iovec must describe memory valid for the access (writes for reads from the file, reads
/// for writes to it) and stay mapped for the duration of the call.
unsafe fn rw_vectored_all(
    fd: RawFd,
    iovecs: &[libc::iovec],
    offset: u64,
    write: bool,
) -> io::Result<()> {
    // The usual case, one call that transfers everything: no copy of the iovecs (a request's
    // only allocation here).
    if !iovecs.is_empty() && iovecs.len() <= MAX_IOVECS {
        let want: usize = iovecs.iter().map(|v| v.iov_len).sum();
        if let Ok(off) = libc::off_t::try_from(offset) {
            let count = iovecs.len() as libc::c_int;
            let ret = if write {
                // SAFETY: `iovecs` holds `count` valid iovecs; the caller guarantees the memory
                // they describe is readable and mapped.
                unsafe { libc::pwritev(fd, iovecs.as_ptr(), count, off) }
            } else {
                // SAFETY: as above, with the memory writable.
                unsafe { libc::preadv(fd, iovecs.as_ptr(), count, off) }
            };
            if usize::try_from(ret).is_ok_and(|n| n == want) {
                return Ok(());
            }
            // A short transfer, an interruption or an error: the loop below goes on from the
            // start (repeating the bytes done is harmless) and reports what persists.
        }
    }
    let mut iovecs: Vec<libc::iovec> = iovecs.iter().filter(|v| v.iov_len > 0).copied().collect();
    let mut offset = offset;
    let mut first = 0usize;
    while first < iovecs.len() {
        let rest = iovecs.get(first..).unwrap_or_default();
        let count = rest.len().min(MAX_IOVECS);
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let ret = if write {
            // SAFETY: `rest` holds `count` valid iovecs; the caller guarantees the memory they
            // describe is readable and mapped.
            unsafe { libc::pwritev(fd, rest.as_ptr(), count as libc::c_int, off) }
        } else {
            // SAFETY: as above, with the memory writable.
            unsafe { libc::preadv(fd, rest.as_ptr(), count as libc::c_int, off) }
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if ret == 0 {
            return Err(if write {
                io::Error::from(io::ErrorKind::WriteZero)
            } else {
                io::Error::from(io::ErrorKind::UnexpectedEof)
            });
        }
        let mut done = ret as usize;
        offset += done as u64;
        // Skip the fully transferred iovecs and shorten the partly transferred one.
        while done > 0 {
            let Some(v) = iovecs.get_mut(first) else {
                break;
            };
            if done >= v.iov_len {
                done -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: `done < iov_len`, so the advanced pointer stays inside the iovec.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(done) }.cast();
                v.iov_len -= done;
                done = 0;
            }
        }
    }
    Ok(())
}

/// A file system whose data is memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MemoryFs {
    /// tmpfs and shmem: its holes are reported, so it can be mapped (crate::mapped).
    Tmpfs,
    /// ramfs or hugetlbfs.
    Other,
}

/// Which memory file system `file` lives in (tmpfs and shmem, ramfs, hugetlbfs); `None` for
/// any other, or when the question cannot be answered.
fn memory_file_system(file: &File) -> Option<MemoryFs> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    // SAFETY: all-zero is a valid statfs.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into `st`, a statfs of the right size, for a descriptor we own.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on x86_64, u64 on aarch64 (musl)
    let magic = st.f_type as i64;
    match magic {
        TMPFS_MAGIC => Some(MemoryFs::Tmpfs),
        RAMFS_MAGIC | HUGETLBFS_MAGIC => Some(MemoryFs::Other),
        _ => None,
    }
}

/// Queries the O_DIRECT alignment with statx(STATX_DIOALIGN), falling back to 512/512 on kernels
/// or file systems that do not report it.
fn direct_alignment(file: &File) -> io::Result<DirectAlignment> {
    // SAFETY: statx is plain old data; all-zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is an empty NUL-terminated string with AT_EMPTY_PATH, so statx inspects
    // our descriptor; `stx` is a valid, writable statx buffer.
    let ret = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if ret != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOSYS) {
            return Ok(DirectAlignment {
                offset_align: 512,
                mem_align: 512,
            });
        }
        return Err(err);
    }
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        warn!("the kernel does not report the O_DIRECT alignment; assuming 512");
        return Ok(DirectAlignment {
            offset_align: 512,
            mem_align: 512,
        });
    }
    Ok(DirectAlignment {
        offset_align: stx.stx_dio_offset_align,
        mem_align: stx.stx_dio_mem_align.max(1),
    })
}

/// A zero-initialised heap buffer with a chosen alignment, for O_DIRECT bounce buffers.
pub(crate) struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: Layout,
}

// SAFETY: AlignedBuf exclusively owns its allocation, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to `align` (a power of two); `len` may be 0.
    pub(crate) fn new(len: usize, align: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(1), align)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(AlignedBuf { ptr, layout })
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: the allocation holds `layout.size()` initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated in `new` with exactly this layout and is freed only here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vmm_sys_util::tempfile::TempFile;

    #[test]
    fn test_memory_backed_only_for_tmpfs_files() {
        // /dev/shm is tmpfs wherever the mount table says so; elsewhere there is nothing to
        // check here.
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        if mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/dev/shm") && l.contains(" tmpfs "))
        {
            let tmp = TempFile::new_in(Path::new("/dev/shm")).expect("temp file in /dev/shm");
            tmp.as_file().set_len(4096).expect("size");
            let disk = DiskImage::open(tmp.as_path(), OpenMode::default()).expect("open");
            assert!(disk.memory_backed());
        }
    }

    /// A tmpfs image read and written through its mapping keeps the file's contents, a discard
    /// reads back as zeros, and reading the discarded range does not allocate it again.
    #[test]
    fn test_tmpfs_image_mapped_discard_reads_zero_without_allocating() {
        const MIB: usize = 1 << 20;
        let tmp = TempFile::new_in(Path::new("/dev/shm")).expect("temp file in /dev/shm");
        tmp.as_file().write_all(&vec![0x11; 4 * MIB]).expect("fill");
        let disk = DiskImage::open(tmp.as_path(), OpenMode::default()).expect("open");
        assert!(
            disk.mapped.is_some(),
            "a tmpfs image that holds data is mapped"
        );
        let mut buf = vec![0x5au8; 64 << 10];
        let iov = |b: &mut [u8]| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        };
        // SAFETY: `buf` is ours and mapped for each call.
        unsafe { disk.write_vectored_at(&[iov(&mut buf)], MIB as u64) }.expect("write");
        let mut back = vec![0u8; 64 << 10];
        // SAFETY: as above.
        unsafe { disk.read_vectored_at(&[iov(&mut back)], MIB as u64) }.expect("read");
        assert!(
            back.iter().all(|&b| b == 0x5a),
            "read back what was written"
        );
        let mut file = vec![0u8; 64 << 10];
        // SAFETY: pread into `file`.
        let n = unsafe {
            libc::pread(
                tmp.as_file().as_raw_fd(),
                file.as_mut_ptr().cast(),
                file.len(),
                MIB as i64,
            )
        };
        assert_eq!(n as usize, file.len());
        assert_eq!(file, back, "the write reached the file");
        let blocks = |f: &File| {
            f.metadata()
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m))
        };
        disk.discard(2 * MIB as u64, MIB as u64).expect("discard");
        let after_discard = blocks(tmp.as_file()).expect("stat");
        let mut big = vec![0x77u8; MIB];
        // SAFETY: as above.
        unsafe { disk.read_vectored_at(&[iov(&mut big)], 2 * MIB as u64) }.expect("read hole");
        assert!(
            big.iter().all(|&b| b == 0),
            "a discarded range reads as zeros"
        );
        assert_eq!(
            blocks(tmp.as_file()).expect("stat"),
            after_discard,
            "reading the hole allocated memory"
        );
        // The rest is still served, and still right.
        // SAFETY: as above.
        unsafe { disk.read_vectored_at(&[iov(&mut back)], 3 * MIB as u64) }.expect("read");
        assert!(back.iter().all(|&b| b == 0x11));
    }

    fn image(len: usize) -> TempFile {
        let tmp = TempFile::new().expect("temp file");
        tmp.as_file().write_all(&vec![0xaa; len]).expect("fill");
        tmp
    }

    #[test]
    fn test_open_missing_file_fails() {
        let err = DiskImage::open(Path::new("/nonexistent/bulkhead.img"), OpenMode::default())
            .expect_err("must fail");
        assert!(matches!(err, DiskError::Open { .. }));
    }

    #[test]
    fn test_open_tiny_file_too_small() {
        let tmp = image(100);
        let err = DiskImage::open(tmp.as_path(), OpenMode::default()).expect_err("must fail");
        assert!(matches!(err, DiskError::TooSmall { size: 100, .. }));
    }

    #[test]
    fn test_open_directory_rejected() {
        let err = DiskImage::open(
            Path::new("/tmp"),
            OpenMode {
                read_only: true,
                direct: false,
            },
        )
        .expect_err("must fail");
        assert!(matches!(err, DiskError::NotFileOrBlockDevice { .. }));
    }

    #[test]
    fn test_open_partial_sector_capacity_rounds_down() {
        let tmp = image(4096 + 100);
        let disk = DiskImage::open(tmp.as_path(), OpenMode::default()).expect("open");
        assert_eq!(disk.capacity_sectors(), 8);
        assert_eq!(disk.logical_block_size(), 512);
    }

    #[test]
    fn test_write_zeroes_without_unmap_reads_zero() {
        let tmp = image(8192);
        let disk = DiskImage::open(tmp.as_path(), OpenMode::default()).expect("open");
        disk.write_zeroes(512, 1024, false).expect("write zeroes");
        let data = std::fs::read(tmp.as_path()).expect("read back");
        assert!(data[..512].iter().all(|&b| b == 0xaa));
        assert!(data[512..1536].iter().all(|&b| b == 0));
        assert!(data[1536..].iter().all(|&b| b == 0xaa));
    }

    #[test]
    fn test_zero_buffer_fallback_reads_zero() {
        let tmp = image(3 * ZERO_CHUNK);
        let disk = DiskImage::open(tmp.as_path(), OpenMode::default()).expect("open");
        disk.note_punch_hole_unsupported();
        disk.note_zero_range_unsupported();
        disk.write_zeroes(512, (ZERO_CHUNK + 1024) as u64, true)
            .expect("write zeroes");
        let data = std::fs::read(tmp.as_path()).expect("read back");
        assert!(data[..512].iter().all(|&b| b == 0xaa));
        assert!(data[512..512 + ZERO_CHUNK + 1024].iter().all(|&b| b == 0));
        assert!(data[512 + ZERO_CHUNK + 1024..].iter().all(|&b| b == 0xaa));
    }

    #[test]
    fn test_rw_vectored_split_iovecs_roundtrip() {
        let tmp = image(4096);
        let disk = DiskImage::open(tmp.as_path(), OpenMode::default()).expect("open");
        let mut a = vec![1u8; 512];
        let mut b = vec![2u8; 1024];
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        // SAFETY: the iovecs describe `a` and `b`, alive for the call.
        unsafe { disk.write_vectored_at(&iov, 1024).expect("write") };
        let mut out = vec![0u8; 1536];
        let iov = [libc::iovec {
            iov_base: out.as_mut_ptr().cast(),
            iov_len: out.len(),
        }];
        // SAFETY: the iovec describes `out`, alive for the call.
        unsafe { disk.read_vectored_at(&iov, 1024).expect("read") };
        assert!(out[..512].iter().all(|&x| x == 1));
        assert!(out[512..].iter().all(|&x| x == 2));
    }

    #[test]
    fn test_read_past_end_fails_with_eof() {
        let tmp = image(1024);
        let disk = DiskImage::open(tmp.as_path(), OpenMode::default()).expect("open");
        let mut out = vec![0u8; 1024];
        let iov = [libc::iovec {
            iov_base: out.as_mut_ptr().cast(),
            iov_len: out.len(),
        }];
        // SAFETY: the iovec describes `out`, alive for the call.
        let err = unsafe { disk.read_vectored_at(&iov, 512) }.expect_err("short read");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn test_aligned_buf_alignment_holds() {
        let buf = AlignedBuf::new(1000, 4096).expect("alloc");
        assert_eq!(buf.as_ptr() as usize % 4096, 0);
        assert_eq!(buf.as_slice().len(), 1000);
        assert!(buf.as_slice().iter().all(|&b| b == 0));
    }
}
