//! In-flight I/O tracking: VHOST_USER_GET_INFLIGHT_FD / SET_INFLIGHT_FD with the split-ring
//! layout of the vhost-user specification ("Inflight I/O tracking"), so that a frontend can
//! give a restarted device process what its predecessor had taken from the rings and not
//! completed.
//!
//! rust-vmm's vhost-user-backend answers both messages "not supported" (its `VhostUserHandler`
//! has no inflight state), so this runtime implements them. One more thing differs from
//! libvhost-user and DPDK: a device process cannot create the region. Its jail forbids
//! `memfd_create` (the spawner's filter, stacked on every device, refuses it, and landlock
//! leaves no path to create a file in), so the VMM creates the memfd and hands it in at start
//! (`--inflight-fd N`); GET_INFLIGHT_FD lays the region out afresh in it (zeroed, each queue's
//! header set) and returns a duplicate; SET_INFLIGHT_FD maps what the frontend hands back (the
//! same memfd, after a restart holding the dead process's state).
//!
//! Layout, per queue, `queue_region_size(queue_size)` bytes (aligned to 64, as DPDK's
//! `get_pervq_shm_size_split`), queues one after the other:
//!
//! ```text
//! struct QueueRegionSplit { u64 features; u16 version (1); u16 desc_num; u16 last_batch_head;
//!                           u16 used_idx; DescStateSplit desc[desc_num]; }
//! struct DescStateSplit   { u8 inflight; u8 padding[5]; u16 next; u64 counter; }
//! ```
//!
//! A device marks a head in flight when it takes it from the available ring (a counter that
//! grows per queue, then `inflight = 1`), and, for each head it completes, links it into the
//! last batch (`next = last_batch_head; last_batch_head = head`) before the used ring's index
//! moves, then clears `inflight` and copies the used index. On reconnection, if the region's
//! used index is behind the used ring's, the last batch was published but not cleared: it is
//! cleared now; what is left in flight is resubmitted in counter order.
//!
//! The region is hostile input (it comes from the frontend, and holds what a process that may
//! have been compromised wrote): every index is bounds-checked, and it only says *which*
//! requests to take again; the requests themselves are read from the guest's rings as always.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Alignment of each queue's region.
pub const INFLIGHT_ALIGNMENT: u64 = 64;
/// `version` of the split-ring layout.
pub const VERSION: u16 = 1;
const HEADER: u64 = 16;
const DESC: u64 = 16;

/// Bytes of one queue's region for a queue of `queue_size` entries.
pub fn queue_region_size(queue_size: u16) -> u64 {
    (HEADER + DESC * u64::from(queue_size)).div_ceil(INFLIGHT_ALIGNMENT) * INFLIGHT_ALIGNMENT
}

/// Bytes of the whole region for `num_queues` queues of `queue_size` entries.
pub fn region_size(num_queues: u16, queue_size: u16) -> u64 {
    u64::from(num_queues) * queue_region_size(queue_size)
}

/// A mapped inflight region.
pub struct Region {
    ptr: *mut u8,
    len: usize,
    num_queues: u16,
    queue_size: u16,
    /// The counter of each queue's last taken request.
    counters: Vec<AtomicU64>,
}

// SAFETY: the mapping is shared memory accessed only through atomics at checked offsets; the
// pointer stays valid until drop.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this struct made, once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("len", &self.len)
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

impl Region {
    /// Maps `size` bytes of `file` at `offset` for `num_queues` queues of `queue_size`; the file
    /// must cover them (checked by reading the last byte: a short file would mean SIGBUS).
    pub fn map(
        file: &File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Region> {
        let need = region_size(num_queues, queue_size);
        if num_queues == 0 || queue_size == 0 || size < need || need == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{size} bytes for {num_queues} queue(s) of {queue_size}: {need} needed"),
            ));
        }
        let len = usize::try_from(need).map_err(|_| io::ErrorKind::InvalidInput)?;
        let last = offset
            .checked_add(need - 1)
            .and_then(|l| libc::off_t::try_from(l).ok())
            .ok_or(io::ErrorKind::InvalidInput)?;
        let mut byte = 0u8;
        let iov = libc::iovec {
            iov_base: (&mut byte as *mut u8).cast(),
            iov_len: 1,
        };
        // SAFETY: preadv writes at most one byte into `byte`; `file` is open.
        if unsafe { libc::preadv(file.as_raw_fd(), &iov, 1, last) } != 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the inflight file does not cover the region",
            ));
        }
        let off = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: a new shared mapping of an open file, checked below; never executable.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let region = Region {
            ptr: ptr.cast(),
            len,
            num_queues,
            queue_size,
            counters: (0..num_queues).map(|_| AtomicU64::new(0)).collect(),
        };
        Ok(region)
    }

    fn at<T>(&self, offset: u64) -> Option<&T> {
        let size = std::mem::size_of::<T>() as u64;
        let end = offset.checked_add(size)?;
        if end > self.len as u64 || !offset.is_multiple_of(size) {
            return None;
        }
        // SAFETY: in bounds and aligned (the mapping is page-aligned); the atomic types used
        // here have no invalid bit patterns.
        Some(unsafe { &*self.ptr.add(offset as usize).cast::<T>() })
    }

    fn queue_base(&self, queue: u16) -> u64 {
        u64::from(queue) * queue_region_size(self.queue_size)
    }

    /// Zeroes the region and writes each queue's header (GET_INFLIGHT_FD: a new region).
    pub fn reset(&self) {
        // SAFETY: the whole mapping, which this struct owns.
        unsafe { std::ptr::write_bytes(self.ptr, 0, self.len) };
        for q in 0..self.num_queues {
            let base = self.queue_base(q);
            if let Some(v) = self.at::<AtomicU16>(base + 8) {
                v.store(VERSION, Ordering::Release);
            }
            if let Some(n) = self.at::<AtomicU16>(base + 10) {
                n.store(self.queue_size, Ordering::Release);
            }
            self.counters[usize::from(q)].store(0, Ordering::Release);
        }
    }

    /// Queue `queue`'s tracker, if the region has that queue.
    pub fn queue(self: &Arc<Self>, queue: usize) -> Option<InflightQueue> {
        let q = u16::try_from(queue).ok().filter(|q| *q < self.num_queues)?;
        Some(InflightQueue {
            region: self.clone(),
            queue: q,
        })
    }
}

/// One queue of the region, as a device's worker uses it.
#[derive(Clone, Debug)]
pub struct InflightQueue {
    region: Arc<Region>,
    queue: u16,
}

/// What recovery found in a queue's region.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Entries of the last batch cleared because the used ring already had them.
    pub batch_fixed: u16,
    /// Heads taken and not completed, in the order they were taken.
    pub heads: Vec<u16>,
}

impl InflightQueue {
    fn base(&self) -> u64 {
        self.region.queue_base(self.queue)
    }

    fn desc(&self, head: u16) -> Option<u64> {
        (head < self.region.queue_size).then(|| self.base() + HEADER + DESC * u64::from(head))
    }

    /// `head` was taken from the available ring.
    pub fn taken(&self, head: u16) {
        let Some(d) = self.desc(head) else { return };
        let counter =
            self.region.counters[usize::from(self.queue)].fetch_add(1, Ordering::AcqRel) + 1;
        if let Some(c) = self.region.at::<AtomicU64>(d + 8) {
            c.store(counter, Ordering::Release);
        }
        if let Some(f) = self.region.at::<AtomicU8>(d) {
            f.store(1, Ordering::Release);
        }
    }

    /// `head` goes into the used ring: linked into the last batch first.
    pub fn before_used(&self, head: u16) {
        let Some(d) = self.desc(head) else { return };
        let base = self.base();
        if let (Some(last), Some(next)) = (
            self.region.at::<AtomicU16>(base + 12),
            self.region.at::<AtomicU16>(d + 6),
        ) {
            next.store(last.load(Ordering::Acquire), Ordering::Release);
            last.store(head, Ordering::Release);
        }
    }

    /// `head` is in the used ring and the used index is now `used_idx`.
    pub fn after_used(&self, head: u16, used_idx: u16) {
        let Some(d) = self.desc(head) else { return };
        if let Some(f) = self.region.at::<AtomicU8>(d) {
            f.store(0, Ordering::Release);
        }
        if let Some(u) = self.region.at::<AtomicU16>(self.base() + 14) {
            u.store(used_idx, Ordering::Release);
        }
    }

    /// On reconnection, with the used ring's index `used_idx`: clears the last batch if the
    /// used ring already has it, and returns the heads still in flight in the order they were
    /// taken (their flags are cleared: the device marks them again as it takes them again).
    /// The counter goes on from the largest found.
    pub fn recover(&self, used_idx: u16) -> Recovery {
        let r = &self.region;
        let base = self.base();
        let mut out = Recovery::default();
        let (Some(version), Some(desc_num), Some(last), Some(region_used)) = (
            r.at::<AtomicU16>(base + 8),
            r.at::<AtomicU16>(base + 10),
            r.at::<AtomicU16>(base + 12),
            r.at::<AtomicU16>(base + 14),
        ) else {
            return out;
        };
        if version.load(Ordering::Acquire) != VERSION
            || desc_num.load(Ordering::Acquire) != r.queue_size
        {
            return out;
        }
        let behind = used_idx.wrapping_sub(region_used.load(Ordering::Acquire));
        if behind != 0 {
            // The last batch was published, not cleared: clear it (at most a queue's worth,
            // following the links, every index checked).
            let mut head = last.load(Ordering::Acquire);
            for _ in 0..behind.min(r.queue_size) {
                let Some(d) = self.desc(head) else { break };
                if let Some(f) = r.at::<AtomicU8>(d) {
                    if f.swap(0, Ordering::AcqRel) == 1 {
                        out.batch_fixed += 1;
                    }
                }
                head = r
                    .at::<AtomicU16>(d + 6)
                    .map_or(u16::MAX, |n| n.load(Ordering::Acquire));
            }
            region_used.store(used_idx, Ordering::Release);
        }
        let mut taken: Vec<(u64, u16)> = (0..r.queue_size)
            .filter_map(|h| {
                let d = self.desc(h)?;
                // Cleared now: taking the request again marks it again.
                let on = r.at::<AtomicU8>(d)?.swap(0, Ordering::AcqRel) == 1;
                on.then(|| {
                    (
                        r.at::<AtomicU64>(d + 8)
                            .map_or(0, |c| c.load(Ordering::Acquire)),
                        h,
                    )
                })
            })
            .collect();
        taken.sort_unstable();
        let max = taken.last().map_or(0, |(c, _)| *c);
        r.counters[usize::from(self.queue)].fetch_max(max, Ordering::AcqRel);
        out.heads = taken.into_iter().map(|(_, h)| h).collect();
        out
    }
}

/// The memfd the VMM handed in (`--inflight-fd`), laid out again by each GET_INFLIGHT_FD.
static HANDED: Mutex<Option<File>> = Mutex::new(None);
/// The region the frontend set (SET_INFLIGHT_FD), which the device's workers track into.
static CURRENT: RwLock<Option<Arc<Region>>> = RwLock::new(None);

/// Adopts descriptor `fd` (`--inflight-fd`) as the memfd GET_INFLIGHT_FD answers with.
pub fn adopt(fd: RawFd) {
    // SAFETY: the runtime checked `fd` is open and hands it over here, once.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    *HANDED.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
}

/// Whether this process can track inflight I/O (it was handed a memfd).
pub fn available() -> bool {
    HANDED.lock().unwrap_or_else(|p| p.into_inner()).is_some()
}

/// GET_INFLIGHT_FD: lays out a new region for `num_queues` queues of `queue_size` in the
/// handed memfd; returns its size and a duplicate of the memfd.
pub fn get(num_queues: u16, queue_size: u16) -> io::Result<(u64, File)> {
    let handed = HANDED.lock().unwrap_or_else(|p| p.into_inner());
    let file = handed.as_ref().ok_or(io::ErrorKind::Unsupported)?;
    let size = region_size(num_queues, queue_size);
    let region = Region::map(file, 0, size, num_queues, queue_size)?;
    region.reset();
    Ok((size, file.try_clone()?))
}

/// SET_INFLIGHT_FD: maps the region the frontend hands (the one it got, or after a restart the
/// one the previous process filled); the workers track into it from now on.
pub fn set(
    file: &File,
    offset: u64,
    size: u64,
    num_queues: u16,
    queue_size: u16,
) -> io::Result<()> {
    let region = Region::map(file, offset, size, num_queues, queue_size)?;
    *CURRENT.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(region));
    Ok(())
}

/// Drops the region (the frontend reset the device).
pub fn clear() {
    *CURRENT.write().unwrap_or_else(|p| p.into_inner()) = None;
}

/// Queue `queue`'s tracker, if the frontend set a region.
pub fn queue(queue: usize) -> Option<InflightQueue> {
    CURRENT
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .and_then(|r| r.queue(queue))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(len: u64) -> File {
        // SAFETY: memfd_create with a static name; checked.
        let fd = unsafe { libc::memfd_create(c"inflight-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor.
        let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        f.set_len(len).expect("len");
        f
    }

    #[test]
    fn test_inflight_layout_sizes_match_the_spec() {
        // 16-byte header + 16 bytes per descriptor, aligned to 64.
        assert_eq!(queue_region_size(256), 16 + 16 * 256 + 48);
        assert_eq!(queue_region_size(2), 64);
        assert_eq!(region_size(4, 128), 4 * (16 + 16 * 128 + 48));
    }

    #[test]
    fn test_inflight_track_then_recover_in_submission_order_and_fix_last_batch() {
        let file = memfd(region_size(2, 8));
        let r = Arc::new(Region::map(&file, 0, region_size(2, 8), 2, 8).expect("map"));
        r.reset();
        let q = r.queue(1).expect("queue 1");
        // Taken: 5, 2, 7, 0 (in that order); 5 completed (used 1); 2 published (used 2) but
        // the process died before clearing it.
        for h in [5, 2, 7, 0] {
            q.taken(h);
        }
        q.before_used(5);
        q.after_used(5, 1);
        q.before_used(2);
        // A new process maps the same file.
        let again = Arc::new(Region::map(&file, 0, region_size(2, 8), 2, 8).expect("map"));
        let rec = again.queue(1).expect("queue").recover(2);
        assert_eq!(rec.batch_fixed, 1, "head 2 was in the used ring already");
        assert_eq!(rec.heads, vec![7, 0], "in the order they were taken");
        // Queue 0 untouched; a bad head is ignored.
        assert_eq!(again.queue(0).expect("q0").recover(0), Recovery::default());
        q.taken(200);
        assert!(again.queue(2).is_none());
    }

    #[test]
    fn test_inflight_garbage_region_is_harmless() {
        let file = memfd(region_size(1, 4));
        let r = Arc::new(Region::map(&file, 0, region_size(1, 4), 1, 4).expect("map"));
        // SAFETY: the test's own mapping.
        unsafe { std::ptr::write_bytes(r.ptr, 0xff, r.len) };
        let rec = r.queue(0).expect("q").recover(3);
        assert!(
            rec.heads.is_empty(),
            "a region with a wrong version is ignored"
        );
        assert!(Region::map(&file, 0, 8, 1, 4).is_err(), "too small");
        assert!(
            Region::map(&memfd(10), 0, region_size(1, 4), 1, 4).is_err(),
            "file too short"
        );
    }
}
