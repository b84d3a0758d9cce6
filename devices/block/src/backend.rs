//! The `VhostUserBackend` implementation: features, config space and queue events of the
//! virtio-blk device.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::disk::{DiskImage, SECTOR_SIZE};
use crate::engine::Engine;
use crate::queue::{LogLimiter, QueueError, QueueWorker, Serial, SIZE_MAX};
use crate::request::Limits;
use bulkhead_device_runtime::rate::{LimiterConfig, RateLimiter};

/// Most discard / write-zeroes segments per request (Linux caps its own at 256).
pub const MAX_DISCARD_SEG: u32 = 32;
/// Most sectors in one discard / write-zeroes segment (just under 2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = (1 << 22) - 1;
/// Size of `struct virtio_blk_config` up to and including the zoned characteristics.
pub const CONFIG_SPACE_SIZE: usize = 96;
/// The largest offset + size GET_CONFIG may ask for (VHOST_USER_CONFIG_SIZE).
const MAX_CONFIG_REQUEST: u64 = 0x1000;

/// Most queues a device may have (queues map to worker threads through a 64-bit mask).
pub const MAX_QUEUES: u16 = 64;
/// Longest a queue worker stays in one round of processing and polling before it goes back
/// through its epoll loop (which serves the worker's exit and wake-up events).
const MAX_POLL_STRETCH: Duration = Duration::from_millis(10);
/// Largest `--poll-us`.
pub const MAX_POLL_US: u32 = 10_000;
/// How long a polling queue worker spins on its ring between yields of its CPU. sched_yield
/// costs about 0.3 µs in a nested guest's host, as long as a look at the ring: yielding at
/// every look delayed the sight of a new request by that much. Yielding every 2 µs still lets
/// a vCPU or device thread that shares the CPU run before long.
const POLL_YIELD_EVERY: Duration = Duration::from_micros(2);

/// Largest queue size accepted on the command line.
pub const MAX_QUEUE_SIZE: u16 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("queue {0} does not exist")]
    NoSuchQueue(usize),
    #[error("guest memory has not been set up yet")]
    NoGuestMemory,
    #[error("failed to signal the guest for queue {queue}")]
    SignalUsedQueue {
        queue: usize,
        #[source]
        source: io::Error,
    },
}

impl From<BackendError> for io::Error {
    fn from(e: BackendError) -> io::Error {
        io::Error::other(e)
    }
}

/// Everything the device needs, fixed before serving.
pub struct BlockDeviceConfig {
    pub disk: DiskImage,
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: Serial,
    /// The rate limit, shared by all queues (none when no bucket is set).
    pub rate_limit: LimiterConfig,
    /// How long a queue worker keeps looking at its avail ring for more requests, with the
    /// driver's notifications off, before it goes back to sleep (`--poll-us`; zero: never).
    pub poll: Duration,
}

/// The virtio-blk vhost-user backend. Clones share state.
#[derive(Clone)]
pub struct BlockBackend {
    inner: Arc<Inner>,
}

struct Inner {
    disk: Arc<DiskImage>,
    num_queues: u16,
    queue_size: u16,
    seg_max: u32,
    features: u64,
    acked_features: AtomicU64,
    event_idx: AtomicBool,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    /// One per queue, indexed by worker thread (= queue) index.
    workers: Vec<Mutex<QueueWorker>>,
    /// Rate limit of the config-write log line.
    config_log: Mutex<LogLimiter>,
    /// See [`BlockDeviceConfig::poll`].
    poll: Duration,
}

impl BlockBackend {
    /// The disk this backend serves.
    pub fn disk(&self) -> Arc<DiskImage> {
        self.inner.disk.clone()
    }

    pub fn new(config: BlockDeviceConfig) -> BlockBackend {
        let disk = Arc::new(config.disk);
        let num_queues = config.num_queues.clamp(1, MAX_QUEUES);
        let queue_size = config.queue_size.max(2);
        let mut workers = Vec::with_capacity(usize::from(num_queues));
        let mut uring_error = None;
        let limiter = config
            .rate_limit
            .is_limit()
            .then(|| Arc::new(Mutex::new(RateLimiter::new(&config.rate_limit))));
        for _ in 0..num_queues {
            let (engine, err) = Engine::new(u32::from(queue_size));
            if let Some(e) = err {
                uring_error = Some(e);
            }
            let mut worker = QueueWorker::new(disk.clone(), config.serial, engine);
            worker.set_limiter(limiter.clone());
            workers.push(Mutex::new(worker));
        }
        match uring_error {
            Some(e) => warn!("io_uring unavailable ({e}); using synchronous I/O"),
            None => info!("using io_uring, one ring per queue"),
        }

        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if disk.read_only() {
            // A read-only disk offers nothing that changes it.
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }

        BlockBackend {
            inner: Arc::new(Inner {
                disk,
                num_queues,
                queue_size,
                // Header and status take two descriptors of a chain, and a driver without
                // indirect descriptors must fit a request in the ring: Linux then uses
                // seg_max + 2 descriptors at most.
                seg_max: u32::from(queue_size - 2).clamp(1, 1022),
                features,
                acked_features: AtomicU64::new(0),
                event_idx: AtomicBool::new(false),
                mem: RwLock::new(None),
                workers,
                config_log: Mutex::new(LogLimiter::default()),
                poll: config.poll,
            }),
        }
    }

    /// Whether the queue workers use io_uring.
    pub fn uses_io_uring(&self) -> bool {
        self.inner
            .workers
            .iter()
            .all(|w| w.lock().map(|w| w.engine().is_uring()).unwrap_or(false))
    }

    /// The limits requests are checked against, given the negotiated features.
    pub fn limits(&self) -> Limits {
        let acked = self.inner.acked_features.load(Ordering::Acquire);
        Limits {
            capacity_sectors: self.inner.disk.capacity_sectors(),
            seg_max: self.inner.seg_max,
            // A driver that did not negotiate VIRTIO_BLK_F_SIZE_MAX may send a segment of any
            // length (virtio 1.2, 5.2.6.1): edk2's VirtioBlkDxe reads a whole kernel in one.
            size_max: if acked & (1 << VIRTIO_BLK_F_SIZE_MAX) != 0 {
                SIZE_MAX
            } else {
                u32::MAX
            },
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEG,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEG,
            read_only: self.inner.disk.read_only(),
            discard: acked & (1 << VIRTIO_BLK_F_DISCARD) != 0,
            write_zeroes: acked & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0,
        }
    }

    /// The device configuration space (`struct virtio_blk_config`, little endian).
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut c = [0u8; CONFIG_SPACE_SIZE];
        let mut put = |offset: usize, bytes: &[u8]| {
            if let Some(dst) = c.get_mut(offset..offset + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        };
        let block_size = self.inner.disk.logical_block_size();
        let block_sectors = block_size / SECTOR_SIZE as u32;
        put(0, &self.inner.disk.capacity_sectors().to_le_bytes()); // capacity
        put(8, &SIZE_MAX.to_le_bytes()); // size_max
        put(12, &self.inner.seg_max.to_le_bytes()); // seg_max
        put(20, &block_size.to_le_bytes()); // blk_size
        put(34, &self.inner.num_queues.to_le_bytes()); // num_queues
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        put(40, &MAX_DISCARD_SEG.to_le_bytes()); // max_discard_seg
        put(44, &block_sectors.to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_DISCARD_SEG.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        c
    }

    fn process_vring(
        &self,
        vring: &VringRwLock,
        local: u16,
        queue: usize,
    ) -> Result<(), BackendError> {
        let atomic = self
            .inner
            .mem
            .read()
            .map_err(|_| BackendError::NoGuestMemory)?
            .clone()
            .ok_or(BackendError::NoGuestMemory)?;
        // Holding the guard keeps this memory table mapped until the batch is done, even if
        // the frontend replaces it meanwhile.
        let mem = atomic.memory();
        let worker = self
            .inner
            .workers
            .get(queue)
            .ok_or(BackendError::NoSuchQueue(queue))?;
        let limits = self.limits();
        let event_idx = self.inner.event_idx.load(Ordering::Acquire);
        let poll = self.inner.poll;
        // Only a polling device looks at the clock.
        let started = (!poll.is_zero()).then(Instant::now);
        loop {
            let polling = {
                let mut worker = worker.lock().unwrap_or_else(|p| p.into_inner());
                worker.inflight = crate::inflight::Tracker::for_queue(queue);
                let mut state = vring.get_mut();
                if !state.get_queue().ready() {
                    return Ok(());
                }
                let was_broken = worker.broken().is_some();
                let result = Self::process_batches(
                    &mut worker,
                    &mut state,
                    &mem,
                    &limits,
                    event_idx,
                    !poll.is_zero(),
                    local,
                    queue,
                );
                if !was_broken && worker.broken().is_some() {
                    // The guest broke the queue: the frontend learns it through the vring's
                    // error eventfd and shows the driver DEVICE_NEEDS_RESET; the queue stays
                    // stopped until the driver resets the device.
                    if !bulkhead_device_runtime::signal_queue_error(queue) {
                        debug!("queue {queue}: the frontend gave no error eventfd");
                    }
                }
                result?
            };
            if !polling {
                return Ok(());
            }
            // The ring is empty and the driver's notifications are off: look at it for `poll`
            // without holding the queue's locks (the frontend may stop the vring meanwhile).
            if Self::poll_avail(vring, &mem, poll) {
                if started.is_some_and(|t| t.elapsed() < MAX_POLL_STRETCH) {
                    continue;
                }
                // Back through the worker's epoll loop (exit, frontend wake-ups), and here
                // again at once: the requests are there and nobody will kick for them.
                bulkhead_device_runtime::retry_queue_after(local, Duration::ZERO);
                return Ok(());
            }
            // Nothing came: notifications on again, and one last look (a request may have
            // come just before the driver could see them on).
            let _worker = worker.lock().unwrap_or_else(|p| p.into_inner());
            let mut state = vring.get_mut();
            if !state.get_queue().ready() {
                return Ok(());
            }
            match state.get_queue_mut().enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => return Ok(()),
                // The next batch finds and reports what is wrong with the ring.
                Err(_) => continue,
            }
        }
    }

    /// Spins (yielding the CPU to whoever else wants it) until the avail ring of `vring` has
    /// a request this device has not taken, for at most `budget`. False if none came, the
    /// queue was stopped, or the index cannot be read.
    fn poll_avail(vring: &VringRwLock, mem: &GuestMemoryMmap, budget: Duration) -> bool {
        let start = Instant::now();
        let mut last_yield = start;
        loop {
            {
                let state = vring.get_ref();
                let q = state.get_queue();
                if !q.ready() || !state.is_enabled() {
                    return false;
                }
                match q.avail_idx(mem, Ordering::Acquire) {
                    Ok(idx) if idx.0 != q.next_avail() => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
            let now = Instant::now();
            if now.duration_since(start) >= budget {
                return false;
            }
            if now.duration_since(last_yield) >= POLL_YIELD_EVERY {
                // sched_yield: free when the CPU has nothing else to run, and a vCPU or
                // another device thread on this CPU is not starved by the poll for long.
                std::thread::yield_now();
                last_yield = Instant::now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Runs batches until the queue is empty. With `poll`, returns true if it left the
    /// driver's notifications off for the caller to poll the ring (instead of turning them on
    /// again and checking once more).
    #[allow(clippy::too_many_arguments)]
    fn process_batches(
        worker: &mut QueueWorker,
        state: &mut VringState<GuestMemoryAtomic<GuestMemoryMmap>>,
        mem: &GuestMemoryMmap,
        limits: &Limits,
        event_idx: bool,
        poll: bool,
        local: u16,
        queue: usize,
    ) -> Result<bool, BackendError> {
        // Batches until the queue is empty: a batch stops at its budgets, and the requests left
        // in the ring are not announced again by the driver.
        loop {
            if worker.broken().is_some() {
                break;
            }
            // Without EVENT_IDX this sets VRING_USED_F_NO_NOTIFY, which only a polling worker
            // wants (it clears it when it stops polling).
            if event_idx || poll {
                if let Err(e) = state.get_queue_mut().disable_notification(mem) {
                    worker.mark_broken(QueueError::Notification(e));
                    break;
                }
            }
            // Not logged: the guest decides how often this runs.
            let batch = worker.process_queue(state.get_queue_mut(), mem, limits);
            if batch.notify {
                state
                    .signal_used_queue()
                    .map_err(|source| BackendError::SignalUsedQueue { queue, source })?;
            }
            if let Some(wait) = batch.throttled {
                // The limiter refused the next request: it stays in the ring, and the worker
                // comes back to it when the tokens are there (its epoll timeout), kick or not.
                bulkhead_device_runtime::retry_queue_after(local, wait);
                break;
            }
            if batch.more {
                continue;
            }
            if poll {
                return Ok(true);
            }
            if !event_idx {
                break;
            }
            // Re-enable notifications; if requests arrived meanwhile, go round again.
            match state.get_queue_mut().enable_notification(mem) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    worker.mark_broken(QueueError::Notification(e));
                    break;
                }
            }
        }
        Ok(false)
    }
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.inner.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.inner.queue_size)
    }

    fn features(&self) -> u64 {
        self.inner.features
    }

    fn acked_features(&self, features: u64) {
        debug!("acked virtio features {features:#x}");
        self.inner.acked_features.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            // Tracked by the queue workers (crate::inflight); the runtime withdraws it when
            // the VMM handed no region.
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let end = u64::from(offset) + u64::from(size);
        if end > MAX_CONFIG_REQUEST {
            return Vec::new();
        }
        // Bytes past the structure read as zero.
        let config = self.config_space();
        (offset..offset + size)
            .map(|i| config.get(i as usize).copied().unwrap_or(0))
            .collect()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Nothing in the config space is writable without VIRTIO_BLK_F_CONFIG_WCE. The guest
        // decides how often this comes, so the line is rate-limited.
        let mut log = self
            .inner
            .config_log
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(suppressed) = log.admit() {
            debug!(
                "ignoring config write of {} bytes at {offset} ({suppressed} suppressed before)",
                buf.len()
            );
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        let mut slot = self
            .inner
            .mem
            .write()
            .map_err(|_| io::Error::other("guest memory lock poisoned"))?;
        *slot = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.num_queues).map(|i| 1u64 << i).collect()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // A batch in progress finishes before its worker lock is released. The frontend stops
        // a vring when the driver resets the device or the queue: a queue the guest broke is
        // processed again once it is set up anew.
        if let Some(worker) = self.inner.workers.get(queue_index as usize) {
            worker.lock().unwrap_or_else(|p| p.into_inner()).reset();
        }
        Ok(())
    }

    fn reset_device(&self) {
        for worker in &self.inner.workers {
            worker.lock().unwrap_or_else(|p| p.into_inner()).reset();
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            warn!("queue {thread_id}: unexpected event set {evset:?}");
            return Ok(());
        }
        // One queue per thread: the thread index is the queue index.
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or(BackendError::NoSuchQueue(thread_id))?;
        self.process_vring(vring, device_event, thread_id)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::OpenMode;
    use std::io::Write;
    use vmm_sys_util::tempfile::TempFile;

    fn backend(read_only: bool) -> (TempFile, BlockBackend) {
        let tmp = TempFile::new().expect("temp file");
        tmp.as_file().write_all(&[0u8; 8192]).expect("fill");
        let disk = DiskImage::open(
            tmp.as_path(),
            OpenMode {
                read_only,
                direct: false,
            },
        )
        .expect("open");
        let backend = BlockBackend::new(BlockDeviceConfig {
            disk,
            num_queues: 3,
            queue_size: 128,
            serial: Serial::default(),
            rate_limit: Default::default(),
            poll: Duration::ZERO,
        });
        (tmp, backend)
    }

    fn le32(c: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(c[at..at + 4].try_into().expect("4 bytes"))
    }

    #[test]
    fn test_config_space_fields_little_endian() {
        let (_tmp, b) = backend(false);
        let c = b.config_space();
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().expect("8")), 16);
        assert_eq!(le32(&c, 8), SIZE_MAX);
        assert_eq!(le32(&c, 12), 126);
        assert_eq!(le32(&c, 20), 512);
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 3);
        assert_eq!(le32(&c, 36), MAX_DISCARD_SECTORS);
        assert_eq!(le32(&c, 40), MAX_DISCARD_SEG);
        assert_eq!(le32(&c, 44), 1);
        assert_eq!(le32(&c, 48), MAX_DISCARD_SECTORS);
        assert_eq!(le32(&c, 52), MAX_DISCARD_SEG);
        assert_eq!(c[56], 1);
    }

    #[test]
    fn test_size_max_and_seg_max_advertised_and_enforced() {
        let (_tmp, b) = backend(false);
        assert_ne!(b.features() & (1 << VIRTIO_BLK_F_SIZE_MAX), 0);
        assert_ne!(b.features() & (1 << VIRTIO_BLK_F_SEG_MAX), 0);
        // Enforced once negotiated; without it (edk2) a segment may be of any length.
        assert_eq!(b.limits().size_max, u32::MAX);
        b.acked_features(b.features());
        let limits = b.limits();
        assert_eq!(limits.size_max, SIZE_MAX);
        assert_eq!(limits.seg_max, 126);
    }

    #[test]
    fn test_odd_queue_sizes_keep_seg_max_positive() {
        for (queue_size, seg_max) in [(0, 1), (1, 1), (2, 1), (3, 1), (100, 98), (1024, 1022)] {
            let tmp = TempFile::new().expect("temp file");
            tmp.as_file().write_all(&[0u8; 4096]).expect("fill");
            let disk = DiskImage::open(tmp.as_path(), OpenMode::default()).expect("open");
            let b = BlockBackend::new(BlockDeviceConfig {
                disk,
                num_queues: 1,
                queue_size,
                serial: Serial::default(),
                rate_limit: Default::default(),
                poll: Duration::ZERO,
            });
            assert_eq!(b.limits().seg_max, seg_max, "queue size {queue_size}");
            assert!(b.max_queue_size() >= 2);
        }
    }

    #[test]
    fn test_process_vring_runs_deferred_requests_without_another_kick() {
        use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_T_IN;
        use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::{Bytes, GuestAddress};

        const MIB: u64 = 1 << 20;
        let tmp = TempFile::new().expect("temp file");
        tmp.as_file().set_len(8 * MIB).expect("size");
        let disk = DiskImage::open(tmp.as_path(), OpenMode::default()).expect("open");
        let b = BlockBackend::new(BlockDeviceConfig {
            disk,
            num_queues: 1,
            queue_size: 64,
            serial: Serial::default(),
            rate_limit: Default::default(),
            poll: Duration::ZERO,
        });
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * MIB as usize)])
            .expect("guest memory");
        let atomic = GuestMemoryAtomic::new(mem.clone());
        b.update_memory(atomic.clone()).expect("memory");

        // Three reads of 8 MiB (8 segments of size_max each): two fit in a batch's 16 MiB.
        let next = VRING_DESC_F_NEXT as u16;
        let write = VRING_DESC_F_WRITE as u16;
        let mut descs = Vec::new();
        for i in 0..3u64 {
            let hdr = MIB + i * 0x100;
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
            mem.write_slice(&header, GuestAddress(hdr)).expect("header");
            let first = descs.len() as u16;
            descs.push(Descriptor::new(hdr, 16, next, first + 1));
            for j in 0..8u16 {
                let data = 16 * MIB + u64::from(j) * MIB;
                descs.push(Descriptor::new(data, SIZE_MAX, next | write, first + 2 + j));
            }
            descs.push(Descriptor::new(2 * MIB + i, 1, write, 0));
        }
        let raw: Vec<RawDescriptor> = descs.into_iter().map(RawDescriptor::from).collect();
        let vq = MockSplitQueue::new(&mem, 64);
        vq.add_desc_chains(&raw, 0).expect("chains");

        let vring = VringRwLock::new(atomic, 64).expect("vring");
        vring.set_queue_size(64);
        vring
            .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            .expect("queue addresses");
        vring.set_queue_ready(true);
        // One kick: all three complete, the third in a second batch.
        b.process_vring(&vring, 0, 0).expect("process");
        assert_eq!(vq.used().idx().load(), 3);
        assert_eq!(b.disk().stats.deferred.load(Ordering::Relaxed), 1);
        for i in 0..3 {
            let status: u8 = mem.read_obj(GuestAddress(2 * MIB + i)).expect("status");
            assert_eq!(status, 0);
        }
    }

    #[test]
    fn test_process_vring_polling_serves_then_turns_notifications_back_on() {
        use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_T_IN;
        use virtio_bindings::bindings::virtio_ring::{
            VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
        };
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::{Bytes, GuestAddress};

        const MIB: u64 = 1 << 20;
        let tmp = TempFile::new().expect("temp file");
        tmp.as_file().set_len(MIB).expect("size");
        let disk = DiskImage::open(tmp.as_path(), OpenMode::default()).expect("open");
        let b = BlockBackend::new(BlockDeviceConfig {
            disk,
            num_queues: 1,
            queue_size: 16,
            serial: Serial::default(),
            rate_limit: Default::default(),
            poll: Duration::from_micros(300),
        });
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 * MIB as usize)])
            .expect("guest memory");
        let atomic = GuestMemoryAtomic::new(mem.clone());
        b.update_memory(atomic.clone()).expect("memory");
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        mem.write_slice(&header, GuestAddress(MIB)).expect("header");
        let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
        let raw: Vec<RawDescriptor> = [
            Descriptor::new(MIB, 16, next, 1),
            Descriptor::new(2 * MIB, 4096, next | write, 2),
            Descriptor::new(3 * MIB, 1, write, 0),
        ]
        .into_iter()
        .map(RawDescriptor::from)
        .collect();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&raw, 0).expect("chain");
        let vring = VringRwLock::new(atomic, 16).expect("vring");
        vring.set_queue_size(16);
        vring
            .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            .expect("queue addresses");
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let start = Instant::now();
        b.process_vring(&vring, 0, 0).expect("process");
        // Served, then polled the empty ring for its budget, then notifications on again.
        assert_eq!(vq.used().idx().load(), 1);
        assert!(start.elapsed() >= Duration::from_micros(300));
        let used_flags: u16 = mem.read_obj(vq.used_addr()).expect("used flags");
        assert_eq!(used_flags & VRING_USED_F_NO_NOTIFY as u16, 0);
        let status: u8 = mem.read_obj(GuestAddress(3 * MIB)).expect("status");
        assert_eq!(status, 0);
    }

    #[test]
    fn test_get_config_partial_and_out_of_range() {
        let (_tmp, b) = backend(false);
        assert_eq!(b.get_config(34, 2), vec![3, 0]);
        // Past the structure: zeroes, up to VHOST_USER_CONFIG_SIZE.
        assert_eq!(b.get_config(200, 4), vec![0; 4]);
        assert!(b.get_config(0x1000, 1).is_empty());
        assert!(b.get_config(u32::MAX, u32::MAX).is_empty());
    }

    #[test]
    fn test_features_read_only_adds_ro() {
        let (_tmp, rw) = backend(false);
        let (_tmp2, ro) = backend(true);
        assert_eq!(rw.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let changing = (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        assert_eq!(
            ro.features() & changing,
            0,
            "read-only offers no discard or write-zeroes"
        );
        assert_eq!(
            ro.features() & !(1 << VIRTIO_BLK_F_RO),
            rw.features() & !changing
        );
        assert_eq!(rw.queues_per_thread(), vec![1, 2, 4]);
        assert!(rw
            .protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
    }

    #[test]
    fn test_limits_follow_acked_features() {
        let (_tmp, b) = backend(false);
        assert!(!b.limits().discard && !b.limits().write_zeroes);
        b.acked_features(b.features());
        assert!(b.limits().discard && b.limits().write_zeroes);
        assert_eq!(b.limits().capacity_sectors, 16);
    }

    #[test]
    fn test_handle_event_without_memory_fails_cleanly() {
        let (_tmp, b) = backend(false);
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let vring = VringRwLock::new(mem, 128).expect("vring");
        assert!(b
            .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
            .is_err());
        // Out-of-range vring or queue index: an error, not a panic.
        assert!(b.handle_event(5, EventSet::IN, &[vring], 0).is_err());
    }
}
