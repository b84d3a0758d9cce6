//! The `VhostUserBackend` of the virtio-balloon device: features, the configuration space
//! (`num_pages`, the target, and `actual`, what the guest says it gave), the queues and the
//! statistics timer.
//!
//! All queues are served by the runtime's one worker thread (`handle_event`); the stats timer
//! is a thread of the device's own, started at the first memory table (after landlock and
//! seccomp, so it inherits both): every `stats_polling_interval_s` it gives the guest its
//! stats buffer back, and the guest refills it. Its epoll and exit eventfd are created with
//! the backend, before the filter.
//!
//! The target comes on the control channel (`resize BYTES`, crate::BalloonControl); the VMM
//! then re-reads the configuration space and raises the configuration interrupt, and the guest
//! inflates or deflates towards `num_pages`.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bulkhead_device_runtime::loglimit::LogLimiter;
use bulkhead_device_runtime::{queue_error_signal, QueueErrorSignal};
use log::{debug, error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::queue::{
    process_pages, request_stats, roles, take_stats, Counters, GuestStats, RequestError, Role,
    F_DEFLATE_ON_OOM, F_REPORTING, F_STATS_VQ, STAT_NAMES,
};
use crate::ram::{GuestRam, BALLOON_PAGE};

/// Largest queue size accepted on the command line.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// `struct virtio_balloon_config`: num_pages, actual, free_page_hint_cmd_id, poison_val.
pub const CONFIG_SPACE_SIZE: usize = 16;
/// The largest offset + size GET_CONFIG may ask for (VHOST_USER_CONFIG_SIZE).
const MAX_CONFIG_REQUEST: u64 = 0x1000;
/// Longest stats polling interval, in seconds (a day).
pub const MAX_STATS_INTERVAL_S: u32 = 86_400;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("queue {0} does not exist")]
    NoSuchQueue(usize),
    #[error("cannot create the statistics timer")]
    CreateTimer(#[source] io::Error),
    #[error("cannot start the statistics timer thread")]
    SpawnTimer(#[source] io::Error),
    #[error("the new memory table cannot be released from")]
    Memory(#[source] crate::ram::RamError),
}

impl From<BackendError> for io::Error {
    fn from(e: BackendError) -> io::Error {
        io::Error::other(e)
    }
}

/// What the device is, fixed before serving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalloonParams {
    /// The first target, in bytes (`size=`).
    pub size: u64,
    /// VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// VIRTIO_BALLOON_F_REPORTING.
    pub free_page_reporting: bool,
    /// VIRTIO_BALLOON_F_STATS_VQ when not zero: the guest's figures are asked this often.
    pub stats_interval_s: u32,
    pub queue_size: u16,
}

impl BalloonParams {
    /// The queues the device can have: inflate, deflate, then stats and reporting if offered.
    pub fn num_queues(&self) -> usize {
        2 + usize::from(self.stats_interval_s > 0) + usize::from(self.free_page_reporting)
    }
}

/// The features the device offers.
pub fn offered_features(params: &BalloonParams) -> u64 {
    let mut f = (1u64 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if params.stats_interval_s > 0 {
        f |= 1 << F_STATS_VQ;
    }
    if params.deflate_on_oom {
        f |= 1 << F_DEFLATE_ON_OOM;
    }
    if params.free_page_reporting {
        f |= 1 << F_REPORTING;
    }
    f
}

/// Balloon pages (4 KiB) for a target of `bytes`, rounded down, at most u32::MAX.
pub fn pages_of(bytes: u64) -> u32 {
    u32::try_from(bytes / BALLOON_PAGE).unwrap_or(u32::MAX)
}

/// Why a target was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("{0:?} is not a size in bytes")]
    NotANumber(String),
    #[error("a balloon of {bytes} bytes is larger than guest RAM ({ram} bytes)")]
    LargerThanRam { bytes: u64, ram: u64 },
}

struct Inner {
    params: BalloonParams,
    features: u64,
    acked: AtomicU64,
    target_pages: AtomicU32,
    actual_pages: AtomicU32,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    ram: Mutex<GuestRam>,
    ram_size: AtomicU64,
    guest_stats: Mutex<(GuestStats, Option<Instant>)>,
    /// The stats buffer the device holds, to give back at the next poll.
    stats_head: Mutex<Option<u16>>,
    /// The vrings, learned at the first event (for the timer thread).
    vrings: Mutex<Vec<VringRwLock>>,
    errors: Mutex<Option<QueueErrorSignal>>,
    counters: Counters,
    timer: Mutex<Option<(Epoll, EventFd)>>,
    timer_exit: EventFd,
    timer_started: AtomicBool,
    log: Mutex<LogLimiter>,
}

/// The virtio-balloon vhost-user backend. Clones share state.
#[derive(Clone)]
pub struct BalloonBackend {
    inner: Arc<Inner>,
}

const TOKEN_EXIT: u64 = 1;

impl BalloonBackend {
    /// A backend with `params`; creates the timer's epoll and eventfd now, before the filter.
    pub fn new(params: BalloonParams) -> Result<BalloonBackend, BackendError> {
        let epoll = Epoll::new().map_err(BackendError::CreateTimer)?;
        let exit = EventFd::new(EFD_NONBLOCK).map_err(BackendError::CreateTimer)?;
        epoll
            .ctl(
                ControlOperation::Add,
                exit.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_EXIT),
            )
            .map_err(BackendError::CreateTimer)?;
        let timer_exit = exit.try_clone().map_err(BackendError::CreateTimer)?;
        Ok(BalloonBackend {
            inner: Arc::new(Inner {
                features: offered_features(&params),
                acked: AtomicU64::new(0),
                target_pages: AtomicU32::new(pages_of(params.size)),
                actual_pages: AtomicU32::new(0),
                mem: RwLock::new(None),
                ram: Mutex::new(GuestRam::default()),
                ram_size: AtomicU64::new(0),
                guest_stats: Mutex::new((GuestStats::default(), None)),
                stats_head: Mutex::new(None),
                vrings: Mutex::new(Vec::new()),
                errors: Mutex::new(None),
                counters: Counters::default(),
                timer: Mutex::new(Some((epoll, exit))),
                timer_exit,
                timer_started: AtomicBool::new(false),
                log: Mutex::new(LogLimiter::default()),
                params,
            }),
        })
    }

    /// The configuration space (`struct virtio_balloon_config`, little endian).
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut c = [0u8; CONFIG_SPACE_SIZE];
        c[..4].copy_from_slice(
            &self
                .inner
                .target_pages
                .load(Ordering::Acquire)
                .to_le_bytes(),
        );
        c[4..8].copy_from_slice(
            &self
                .inner
                .actual_pages
                .load(Ordering::Acquire)
                .to_le_bytes(),
        );
        c
    }

    /// Sets the target to `bytes` (control channel `resize`): refused beyond guest RAM once
    /// the memory table is known.
    pub fn set_target(&self, bytes: u64) -> Result<u32, TargetError> {
        let ram = self.inner.ram_size.load(Ordering::Acquire);
        if ram > 0 && bytes > ram {
            return Err(TargetError::LargerThanRam { bytes, ram });
        }
        let pages = pages_of(bytes);
        let before = self.inner.target_pages.swap(pages, Ordering::AcqRel);
        if before != pages {
            info!(
                "balloon target {} MiB ({pages} pages), was {} MiB",
                bytes >> 20,
                (u64::from(before) * BALLOON_PAGE) >> 20
            );
        }
        Ok(pages)
    }

    pub fn target_pages(&self) -> u32 {
        self.inner.target_pages.load(Ordering::Acquire)
    }

    pub fn actual_pages(&self) -> u32 {
        self.inner.actual_pages.load(Ordering::Acquire)
    }

    /// What the device did so far (control channel `stats`).
    pub fn stats_line(&self) -> String {
        format!(
            "target_pages={} actual_pages={} {}",
            self.target_pages(),
            self.actual_pages(),
            self.inner.counters
        )
    }

    /// The balloon's statistics (control channel `statistics`), `key=value` separated by
    /// spaces, in Firecracker's names: the target and actual size, then each figure the guest
    /// reported, and how many seconds ago it did (`stats_age_s`).
    pub fn statistics_line(&self) -> String {
        let target = u64::from(self.target_pages());
        let actual = u64::from(self.actual_pages());
        let mut line = format!(
            "target_pages={target} actual_pages={actual} target_mib={} actual_mib={}",
            (target * BALLOON_PAGE) >> 20,
            (actual * BALLOON_PAGE) >> 20
        );
        let guard = self
            .inner
            .guest_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (stats, updated) = &*guard;
        for (name, value) in STAT_NAMES.iter().zip(stats.iter()) {
            if let Some(v) = value {
                line.push_str(&format!(" {name}={v}"));
            }
        }
        if let Some(t) = updated {
            line.push_str(&format!(" stats_age_s={}", t.elapsed().as_secs()));
        }
        line
    }

    /// Starts the stats timer thread (once; none without STATS_VQ).
    fn start_timer(&self) -> Result<(), BackendError> {
        let interval = self.inner.params.stats_interval_s;
        if interval == 0 || self.inner.timer_started.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let Some((epoll, exit)) = self
            .inner
            .timer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return Ok(());
        };
        let inner = self.inner.clone();
        bulkhead_sandbox::thread_builder()
            .name("balloon-stats".into())
            .spawn(move || run_timer(&inner, &epoll, &exit, Duration::from_secs(interval.into())))
            .map_err(BackendError::SpawnTimer)?;
        Ok(())
    }

    /// Stops the timer thread (it ends at its next wake-up).
    pub fn stop_timer(&self) {
        let _ = self.inner.timer_exit.write(1);
    }

    /// Asks the guest for fresh statistics now: gives its buffer back (no-op without one).
    pub fn poll_stats(&self) {
        self.inner.poll_stats();
    }

    /// One round over queue `index` with `vring` (the worker thread, and tests).
    pub fn process_queue(&self, index: usize, vring: &VringRwLock) -> io::Result<()> {
        self.inner.process_queue(index, vring)
    }
}

impl Inner {
    fn memory(&self) -> Option<vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap>> {
        let slot = self.mem.read().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().map(|m| m.memory())
    }

    fn refused(&self, role: Role, e: &RequestError) {
        let mut log = self.log.lock().unwrap_or_else(|x| x.into_inner());
        if let Some(suppressed) = log.admit() {
            let more = if suppressed > 0 {
                format!(" ({suppressed} similar lines suppressed)")
            } else {
                String::new()
            };
            warn!(
                "{role:?} queue: request refused: {}{more}",
                bulkhead_device_runtime::chain(e)
            );
        }
    }

    fn role(&self, index: usize) -> Option<Role> {
        roles(self.acked.load(Ordering::Acquire))
            .get(index)
            .copied()
    }

    fn process_queue(&self, index: usize, vring: &VringRwLock) -> io::Result<()> {
        let role = self.role(index).ok_or(BackendError::NoSuchQueue(index))?;
        let Some(mem) = self.memory() else {
            return Ok(());
        };
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return Ok(());
        }
        let queue = state.get_queue_mut();
        let result = match role {
            Role::Stats => {
                let mut guard = self.guest_stats.lock().unwrap_or_else(|e| e.into_inner());
                let taken = take_stats(queue, &mem, &mut guard.0, &self.counters, |r, e| {
                    self.refused(r, e)
                });
                match taken {
                    Ok(Some(head)) => {
                        guard.1 = Some(Instant::now());
                        let mut held = self.stats_head.lock().unwrap_or_else(|e| e.into_inner());
                        // A buffer still held is replaced: the older one goes back.
                        let old = held.replace(head);
                        drop(held);
                        match old {
                            Some(old) if old != head => {
                                request_stats(queue, &mem, old).map(|()| crate::queue::Round {
                                    used: 1,
                                    ..Default::default()
                                })
                            }
                            _ => Ok(crate::queue::Round::default()),
                        }
                    }
                    Ok(None) => Ok(crate::queue::Round::default()),
                    Err(e) => Err(e),
                }
            }
            _ => {
                let mut ram = self.ram.lock().unwrap_or_else(|e| e.into_inner());
                process_pages(role, queue, &mem, &mut ram, &self.counters, |r, e| {
                    self.refused(r, e)
                })
            }
        };
        match result {
            Ok(round) => {
                if round.used > 0 {
                    let needed = state
                        .get_queue_mut()
                        .needs_notification(&*mem)
                        .map_err(io::Error::other)?;
                    if needed {
                        state.signal_used_queue()?;
                    }
                }
                if round.more {
                    // The rest waits for the next kick or the runtime's retry.
                    bulkhead_device_runtime::retry_queue_after(
                        u16::try_from(index).unwrap_or(0),
                        Duration::ZERO,
                    );
                }
                Ok(())
            }
            Err(e) => {
                Counters::add(&self.counters.broken_queues, 1);
                error!("{role:?} queue: {}", bulkhead_device_runtime::chain(&e));
                let errors = self
                    .errors
                    .lock()
                    .unwrap_or_else(|x| x.into_inner())
                    .clone();
                if !errors.is_some_and(|s| s.signal(index)) {
                    debug!("queue {index}: the frontend gave no error eventfd");
                }
                Err(io::Error::other(e))
            }
        }
    }

    fn poll_stats(&self) {
        let Some(index) = roles(self.acked.load(Ordering::Acquire))
            .iter()
            .position(|r| *r == Role::Stats)
        else {
            return;
        };
        let Some(vring) = self
            .vrings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(index)
            .cloned()
        else {
            return;
        };
        let Some(mem) = self.memory() else {
            return;
        };
        let Some(head) = self
            .stats_head
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let mut state = vring.get_mut();
        if !state.get_queue().ready() {
            return;
        }
        if let Err(e) = request_stats(state.get_queue_mut(), &mem, head) {
            warn!("stats queue: cannot give the buffer back: {e}");
            return;
        }
        if let Err(e) = state.signal_used_queue() {
            warn!("stats queue: cannot notify the guest: {e}");
        }
    }
}

/// The stats timer: every `interval`, the guest's stats buffer goes back to it.
fn run_timer(inner: &Inner, epoll: &Epoll, exit: &EventFd, interval: Duration) {
    let mut events = vec![EpollEvent::default(); 2];
    let ms = i32::try_from(interval.as_millis()).unwrap_or(i32::MAX);
    loop {
        match epoll.wait(ms, &mut events) {
            Ok(0) => inner.poll_stats(),
            Ok(_) => {
                let _ = exit.read();
                debug!("stats timer exiting");
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                error!("stats timer: epoll failed: {e}");
                return;
            }
        }
    }
}

impl VhostUserBackend for BalloonBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.inner.params.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.inner.params.queue_size)
    }

    fn features(&self) -> u64 {
        self.inner.features
    }

    fn acked_features(&self, features: u64) {
        self.inner.acked.store(features, Ordering::Release);
        info!("features {features:#x}: queues {:?}", roles(features));
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let end = u64::from(offset) + u64::from(size);
        if end > MAX_CONFIG_REQUEST {
            return Vec::new();
        }
        let config = self.config_space();
        (offset..offset + size)
            .map(|i| config.get(i as usize).copied().unwrap_or(0))
            .collect()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only `actual` (4..8) is the driver's to write.
        if offset == 4 && buf.len() == 4 {
            let actual = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let before = self.inner.actual_pages.swap(actual, Ordering::AcqRel);
            if before != actual {
                debug!("guest balloon now {actual} pages");
            }
            return Ok(());
        }
        let mut log = self.inner.log.lock().unwrap_or_else(|p| p.into_inner());
        if log.admit().is_some() {
            warn!("ignoring config write of {} bytes at {offset}", buf.len());
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        let ram = GuestRam::from_memory(&mem.memory()).map_err(BackendError::Memory)?;
        let size = ram.size();
        let pages: Vec<u64> = ram.regions.iter().map(|r| r.page_size).collect();
        // A new table: partly inflated host pages are forgotten (their balloon pages stay
        // inflated in the guest; they are simply not released).
        *self.inner.ram.lock().unwrap_or_else(|e| e.into_inner()) = ram;
        self.inner.ram_size.store(size, Ordering::Release);
        *self.inner.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        info!(
            "guest RAM {} MiB in {} region(s), host pages {pages:?}",
            size >> 20,
            pages.len()
        );
        self.start_timer()?;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![(1u64 << self.num_queues()) - 1]
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if self.inner.role(queue_index as usize) == Some(Role::Stats) {
            *self
                .inner
                .stats_head
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = None;
        }
        Ok(())
    }

    fn reset_device(&self) {
        *self
            .inner
            .stats_head
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        self.inner
            .ram
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .partial
            .clear();
        self.inner.actual_pages.store(0, Ordering::Release);
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        {
            let mut known = self.inner.vrings.lock().unwrap_or_else(|e| e.into_inner());
            if known.is_empty() {
                *known = vrings.to_vec();
            }
            let mut errors = self.inner.errors.lock().unwrap_or_else(|e| e.into_inner());
            if errors.is_none() {
                *errors = queue_error_signal();
            }
        }
        let index = usize::from(device_event);
        let vring = vrings.get(index).ok_or(BackendError::NoSuchQueue(index))?;
        self.inner.process_queue(index, vring)
    }
}

#[cfg(test)]
mod tests;
