//! Serving one vhost-user frontend over an already connected stream socket, for any device
//! that implements [`VhostUserBackend`].
//!
//! `vhost-user-backend` 0.24's `VhostUserDaemon` can only listen on or connect to a socket
//! *path*, and its request handler type is private, so it cannot serve the socketpair end the
//! VMM hands us. `vhost` 0.18 can (`BackendReqHandler::from_stream`) given any
//! `VhostUserBackendReqHandlerMut`. [`VhostUserConnection`] is that handler: it follows
//! `vhost-user-backend`'s own `VhostUserHandler` (same vring state machine, same
//! `VhostUserBackend` callbacks, `VringRwLock` vrings, one epoll worker thread per entry of
//! `queues_per_thread`), so the device code is an ordinary [`VhostUserBackend`] and could move
//! back to `VhostUserDaemon` unchanged once the daemon accepts a stream.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    BackendReqHandler, Error as VhostUserError, GpuBackend, Result as VhostUserResult,
    VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The most memory regions accepted (what vhost-user-backend and the kernel's vhost allow).
const MAX_MEM_SLOTS: u64 = 509;
/// Epoll token of a worker's exit eventfd.
const EXIT_TOKEN: u64 = u64::MAX;
/// Epoll token of a worker's "vrings became ready" eventfd.
const WAKE_TOKEN: u64 = u64::MAX - 1;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create the vring of queue {queue}")]
    CreateVring {
        queue: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("cannot create the event loop of worker {worker}")]
    CreateWorker {
        worker: usize,
        #[source]
        source: io::Error,
    },
    #[error("cannot spawn worker thread {worker}")]
    SpawnWorker {
        worker: usize,
        #[source]
        source: io::Error,
    },
    #[error("vhost-user protocol error")]
    Protocol(#[source] VhostUserError),
}

/// A worker thread's epoll loop, shared between the thread and the control thread (which adds
/// and removes kick descriptors).
struct WorkerLoop {
    epoll: Epoll,
    exit: EventFd,
    wake: EventFd,
    /// Thread-local indices of vrings to process once, without a kick, when woken.
    pending: Mutex<BTreeSet<u16>>,
}

/// The error eventfds the frontend gave for each vring (VHOST_USER_SET_VRING_ERR), shared by a
/// connection's request handler and its worker threads. The vhost-user-backend crate keeps its
/// own copy private, so the runtime keeps these duplicates.
#[derive(Default)]
struct QueueErrors {
    fds: Mutex<Vec<Option<EventFd>>>,
}

impl QueueErrors {
    fn set(&self, queue: usize, fd: Option<EventFd>) {
        let mut fds = self.fds.lock().unwrap_or_else(|p| p.into_inner());
        if fds.len() <= queue {
            fds.resize_with(queue + 1, || None);
        }
        fds[queue] = fd;
    }

    fn signal(&self, queue: usize) -> bool {
        let fds = self.fds.lock().unwrap_or_else(|p| p.into_inner());
        match fds.get(queue).and_then(Option::as_ref) {
            Some(fd) => fd.write(1).is_ok(),
            None => false,
        }
    }
}

thread_local! {
    /// The queue errors of the connection whose worker runs on this thread.
    static WORKER_QUEUE_ERRORS: std::cell::RefCell<Option<Arc<QueueErrors>>> =
        const { std::cell::RefCell::new(None) };
}

/// Tells the frontend that the device stopped vring `queue` because of the driver (a queue the
/// guest broke: rings outside memory, a bad index): the vring's error eventfd
/// (VHOST_USER_SET_VRING_ERR) is signalled, and the frontend shows the guest
/// DEVICE_NEEDS_RESET. Call it from the backend's `handle_event`, on the worker thread that
/// serves the vring. Returns whether an eventfd was signalled (the frontend may have given
/// none).
pub fn signal_queue_error(queue: usize) -> bool {
    queue_error_signal().is_some_and(|e| e.signal(queue))
}

/// The connection's vring error eventfds, as a handle a backend can keep and hand to threads
/// of its own (bulkhead-net's pair workers stop queues off the runtime's worker threads).
#[derive(Clone)]
pub struct QueueErrorSignal(Arc<QueueErrors>);

impl QueueErrorSignal {
    /// As [`signal_queue_error`], from any thread.
    pub fn signal(&self, queue: usize) -> bool {
        self.0.signal(queue)
    }
}

/// The handle for the connection whose worker runs on this thread (call it from the backend's
/// `handle_event`); `None` elsewhere.
pub fn queue_error_signal() -> Option<QueueErrorSignal> {
    WORKER_QUEUE_ERRORS.with(|e| e.borrow().clone().map(QueueErrorSignal))
}

thread_local! {
    /// Vrings (thread-local indices) this worker handles again, without a kick, at a time.
    static WORKER_RETRIES: RefCell<BTreeMap<u16, Instant>> = const { RefCell::new(BTreeMap::new()) };
}

/// Asks the worker thread that serves vring `local` (the thread-local index `handle_event`
/// was given) to call `handle_event` for it again after `after`, without a kick: a throttled
/// queue (rate limiting) resumes when its tokens are there. The wait is the worker's epoll
/// timeout (no timer descriptor, no busy loop); an earlier retry of the same vring wins. Call
/// it from `handle_event`, on that worker thread.
pub fn retry_queue_after(local: u16, after: Duration) {
    let at = Instant::now() + after;
    WORKER_RETRIES.with(|r| {
        let mut r = r.borrow_mut();
        let entry = r.entry(local).or_insert(at);
        *entry = (*entry).min(at);
    });
}

/// The epoll timeout until the earliest retry, rounded up to whole milliseconds (-1: none).
fn retry_timeout(now: Instant) -> i32 {
    WORKER_RETRIES.with(|r| {
        r.borrow().values().min().map_or(-1, |at| {
            let wait = at.saturating_duration_since(now);
            let ms = wait.as_nanos().div_ceil(1_000_000);
            i32::try_from(ms).unwrap_or(i32::MAX)
        })
    })
}

/// Takes the retries that are due.
fn due_retries(now: Instant) -> Vec<u16> {
    WORKER_RETRIES.with(|r| {
        let mut r = r.borrow_mut();
        let due: Vec<u16> = r
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(l, _)| *l)
            .collect();
        for l in &due {
            r.remove(l);
        }
        due
    })
}

struct Worker {
    event_loop: Arc<WorkerLoop>,
    thread: Option<JoinHandle<()>>,
}

/// The backend side of one vhost-user connection; see the module documentation.
pub struct VhostUserConnection<T: VhostUserBackend<Bitmap = (), Vring = VringRwLock>> {
    backend: T,
    owned: bool,
    acked_features: u64,
    acked_protocol_features: u64,
    max_queue_size: usize,
    queues_per_thread: Vec<u64>,
    /// Frontend virtual address ranges of the memory regions: (frontend VA, size, guest PA).
    mappings: Vec<(u64, u64, u64)>,
    atomic_mem: GuestMemoryAtomic<GuestMemoryMmap>,
    vrings: Vec<VringRwLock>,
    workers: Vec<Worker>,
    queue_errors: Arc<QueueErrors>,
}

impl<T> VhostUserConnection<T>
where
    T: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
{
    /// Creates the vrings and starts the worker threads.
    pub fn new(backend: T) -> Result<Self, ServeError> {
        let atomic_mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let max_queue_size = backend.max_queue_size();
        let queue_size = u16::try_from(max_queue_size).unwrap_or(u16::MAX);
        let mut vrings = Vec::new();
        for queue in 0..backend.num_queues() {
            let vring = VringRwLock::new(atomic_mem.clone(), queue_size)
                .map_err(|source| ServeError::CreateVring { queue, source })?;
            vrings.push(vring);
        }
        let queues_per_thread = backend.queues_per_thread();
        let mut connection = VhostUserConnection {
            backend,
            owned: false,
            acked_features: 0,
            acked_protocol_features: 0,
            max_queue_size,
            queues_per_thread: queues_per_thread.clone(),
            mappings: Vec::new(),
            atomic_mem,
            vrings,
            workers: Vec::new(),
            queue_errors: Arc::new(QueueErrors::default()),
        };
        for (worker, mask) in queues_per_thread.iter().enumerate() {
            let thread_vrings: Vec<VringRwLock> = connection
                .vrings
                .iter()
                .enumerate()
                .filter(|(i, _)| *i < 64 && (mask >> i) & 1 == 1)
                .map(|(_, v)| v.clone())
                .collect();
            let event_loop = Arc::new(
                WorkerLoop::new().map_err(|source| ServeError::CreateWorker { worker, source })?,
            );
            let thread_loop = event_loop.clone();
            let thread_backend = connection.backend.clone();
            let thread_errors = connection.queue_errors.clone();
            let thread = bulkhead_sandbox::thread_builder()
                .name(format!("queue{worker}"))
                .spawn(move || {
                    WORKER_QUEUE_ERRORS.with(|e| *e.borrow_mut() = Some(thread_errors));
                    thread_loop.run(&thread_backend, &thread_vrings, worker)
                })
                .map_err(|source| ServeError::SpawnWorker { worker, source })?;
            connection.workers.push(Worker {
                event_loop,
                thread: Some(thread),
            });
        }
        Ok(connection)
    }

    /// Stops and joins the worker threads.
    pub fn stop_workers(&mut self) {
        for worker in &self.workers {
            if let Err(e) = worker.event_loop.exit.write(1) {
                error!("cannot stop a queue worker: {e}");
            }
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                if thread.join().is_err() {
                    error!("a queue worker panicked");
                }
            }
        }
    }

    fn vring(&self, index: usize) -> VhostUserResult<&VringRwLock> {
        self.vrings.get(index).ok_or(VhostUserError::InvalidParam)
    }

    /// Starts or stops watching vring `index`'s kick descriptor, so a worker processes the
    /// vring exactly while it is both started and enabled.
    fn update_vring_registration(&self, index: usize) -> VhostUserResult<()> {
        let vring = self.vring(index)?;
        let state = vring.get_ref();
        let Some(kick) = state.get_kick() else {
            return Ok(());
        };
        let fd = kick.as_raw_fd();
        for (worker_index, mask) in self.queues_per_thread.iter().enumerate() {
            if index >= 64 || (mask >> index) & 1 == 0 {
                continue;
            }
            // Position of the vring among this worker's vrings.
            let local = (mask & ((1u64 << index) - 1)).count_ones() as u16;
            let Some(worker) = self.workers.get(worker_index) else {
                return Err(VhostUserError::BackendInternalError);
            };
            let event_loop = &worker.event_loop;
            if state.get_queue().ready() && state.is_enabled() {
                // Edge-triggered, and the worker never reads the kick's count: every kick
                // (an eventfd write, KVM's ioeventfd included) queues the descriptor on the
                // epoll again, which is all the worker needs to know. That saves a `read` per
                // kick, a system call per request at queue depth 1. The count cannot wrap:
                // at a million kicks a second it would take half a million years.
                match event_loop.epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, u64::from(local)),
                ) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(VhostUserError::ReqHandlerError(e)),
                }
                // Requests may already be waiting, their kick consumed before we listened.
                event_loop
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(local);
                event_loop
                    .wake
                    .write(1)
                    .map_err(VhostUserError::ReqHandlerError)?;
            } else {
                // Not registered (or already closed) is fine.
                let _ = event_loop.epoll.ctl(
                    ControlOperation::Delete,
                    fd,
                    EpollEvent::new(EventSet::IN, u64::from(local)),
                );
            }
            break;
        }
        Ok(())
    }

    fn start_vring_if_configured(&self, index: usize) -> VhostUserResult<()> {
        let vring = self.vring(index)?;
        let needs_start = {
            let state = vring.get_ref();
            !state.get_queue().ready() && state.get_kick().is_some()
        };
        if needs_start {
            vring.set_queue_ready(true);
            self.recover_inflight(index);
            self.update_vring_registration(index)?;
        }
        Ok(())
    }

    /// A vring starts: what the inflight region says the previous process had taken and not
    /// completed is resubmitted, in the order it took it. The requests are read again from
    /// the available ring from the base the frontend set (the used index after a crash): a
    /// device that completes in the order it takes (bulkhead-block does, batch by batch) has
    /// exactly those in flight, which is checked here and logged; where the region disagrees
    /// (a device that completed out of order, or a region a compromised process scribbled
    /// on), the guest's ring wins and the disagreement is logged.
    fn recover_inflight(&self, index: usize) {
        let Some(tracker) = crate::inflight::queue(index) else {
            return;
        };
        let Ok(vring) = self.vring(index) else {
            return;
        };
        let Ok(used) = vring.queue_used_idx() else {
            return;
        };
        let recovery = tracker.recover(used);
        if recovery.heads.is_empty() && recovery.batch_fixed == 0 {
            return;
        }
        let (avail, size, next_avail) = {
            let state = vring.get_ref();
            let q = state.get_queue();
            (q.avail_ring(), q.size(), q.next_avail())
        };
        let mem = self.atomic_mem.memory();
        let ring: Vec<u16> = (0..recovery.heads.len())
            .map_while(|k| {
                let pos = next_avail.wrapping_add(k as u16) % size.max(1);
                let addr = avail.checked_add(4 + 2 * u64::from(pos))?;
                vm_memory::Bytes::read_obj::<u16>(&*mem, GuestAddress(addr))
                    .ok()
                    .map(u16::from_le)
            })
            .collect();
        if ring == recovery.heads {
            info!(
                "queue {index}: {} request(s) the previous process had in flight are resubmitted in the order it took them (from ring position {next_avail}); {} completion(s) of its last batch were already in the used ring",
                recovery.heads.len(),
                recovery.batch_fixed
            );
        } else {
            warn!(
                "queue {index}: the inflight region lists heads {:?} in flight, the available ring holds {ring:?} from position {next_avail}: resuming from the ring",
                recovery.heads
            );
        }
    }

    /// Refuses inflight requests the device cannot serve: no region handed in, more queues
    /// than it has, queues larger than its maximum.
    fn check_inflight(&self, inflight: &VhostUserInflight) -> VhostUserResult<()> {
        if !crate::inflight::available()
            || self.backend.protocol_features() & VhostUserProtocolFeatures::INFLIGHT_SHMFD
                != VhostUserProtocolFeatures::INFLIGHT_SHMFD
        {
            return Err(VhostUserError::InvalidOperation(
                "inflight tracking needs a device that tracks and a region from the VMM",
            ));
        }
        if inflight.num_queues == 0
            || usize::from(inflight.num_queues) > self.vrings.len()
            || inflight.queue_size == 0
            || usize::from(inflight.queue_size) > self.max_queue_size
        {
            error!(
                "inflight request refused: {} queue(s) of {}",
                inflight.num_queues, inflight.queue_size
            );
            return Err(VhostUserError::InvalidParam);
        }
        Ok(())
    }

    fn frontend_va_to_gpa(&self, va: u64) -> VhostUserResult<u64> {
        self.mappings
            .iter()
            .find(|(base, size, _)| va >= *base && va - *base < *size)
            .and_then(|(base, _, gpa)| gpa.checked_add(va - base))
            .ok_or(VhostUserError::InvalidParam)
    }

    /// Refuses a region that is empty or whose frontend address, guest address or file offset
    /// range wraps, or that overlaps a region already mapped (in guest or frontend addresses).
    fn check_region(
        &self,
        user_addr: u64,
        size: u64,
        gpa: u64,
        mmap_offset: u64,
    ) -> VhostUserResult<()> {
        let wraps = |base: u64| base.checked_add(size).is_none();
        if size == 0 || wraps(user_addr) || wraps(gpa) || wraps(mmap_offset) {
            error!("memory region refused: size {size:#x} at guest {gpa:#x}, frontend {user_addr:#x}, offset {mmap_offset:#x}");
            return Err(VhostUserError::InvalidParam);
        }
        let overlaps = |a: u64, b: u64, len: u64| a < b + len && b < a + size;
        if self
            .mappings
            .iter()
            .any(|(va, len, pa)| overlaps(user_addr, *va, *len) || overlaps(gpa, *pa, *len))
        {
            error!("memory region at guest {gpa:#x} overlaps one already mapped");
            return Err(VhostUserError::InvalidParam);
        }
        Ok(())
    }

    fn map_region(region: &VhostUserMemoryRegion, file: File) -> VhostUserResult<GuestRegionMmap> {
        check_file_covers(&file, region.mmap_offset, region.memory_size)?;
        GuestRegionMmap::new(
            region.mmap_region(file)?,
            GuestAddress(region.guest_phys_addr),
        )
        .ok_or(VhostUserError::InvalidParam)
    }

    fn publish_memory(&mut self, mem: GuestMemoryMmap) -> VhostUserResult<()> {
        self.atomic_mem
            .lock()
            .map_err(|_| VhostUserError::BackendInternalError)?
            .replace(mem);
        self.backend
            .update_memory(self.atomic_mem.clone())
            .map_err(VhostUserError::ReqHandlerError)
    }
}

/// Refuses a region whose file ends before `offset + size`: mmap would accept it, and the
/// first access past the end of the file would kill the process with SIGBUS. Reads the region's
/// last byte with `preadv` (a call the device filters already allow; `fstat` is not). A
/// frontend could still shrink the file afterwards; see docs/device-runtime.md.
fn check_file_covers(file: &File, offset: u64, size: u64) -> VhostUserResult<()> {
    let last = offset
        .checked_add(size)
        .and_then(|end| end.checked_sub(1))
        .and_then(|last| libc::off_t::try_from(last).ok())
        .ok_or(VhostUserError::InvalidParam)?;
    let mut byte = 0u8;
    let iov = libc::iovec {
        iov_base: (&mut byte as *mut u8).cast(),
        iov_len: 1,
    };
    // SAFETY: preadv writes at most one byte into `byte`, which `iov` describes; `file` is an
    // open descriptor.
    let n = unsafe { libc::preadv(file.as_raw_fd(), &iov, 1, last) };
    if n != 1 {
        error!(
            "memory region refused: its file does not cover offset {offset:#x} + size {size:#x}"
        );
        return Err(VhostUserError::InvalidParam);
    }
    Ok(())
}

impl<T: VhostUserBackend<Bitmap = (), Vring = VringRwLock>> Drop for VhostUserConnection<T> {
    fn drop(&mut self) {
        for worker in &self.workers {
            let _ = worker.event_loop.exit.write(1);
        }
    }
}

impl WorkerLoop {
    fn new() -> io::Result<WorkerLoop> {
        let epoll = Epoll::new()?;
        let exit = EventFd::new(EFD_NONBLOCK)?;
        let wake = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            exit.as_raw_fd(),
            EpollEvent::new(EventSet::IN, EXIT_TOKEN),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE_TOKEN),
        )?;
        Ok(WorkerLoop {
            epoll,
            exit,
            wake,
            pending: Mutex::new(BTreeSet::new()),
        })
    }

    fn run<T: VhostUserBackend<Bitmap = (), Vring = VringRwLock>>(
        &self,
        backend: &T,
        vrings: &[VringRwLock],
        worker: usize,
    ) {
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let count = match self.epoll.wait(retry_timeout(Instant::now()), &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("queue worker {worker}: epoll failed: {e}");
                    return;
                }
            };
            for local in due_retries(Instant::now()) {
                let enabled = vrings
                    .get(usize::from(local))
                    .is_some_and(|v| v.get_ref().is_enabled());
                if enabled {
                    handle(backend, local, vrings, worker);
                }
            }
            for event in events.iter().take(count) {
                match event.data() {
                    EXIT_TOKEN => {
                        debug!("queue worker {worker}: exiting");
                        return;
                    }
                    WAKE_TOKEN => {
                        let _ = self.wake.read();
                        let pending = std::mem::take(
                            &mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()),
                        );
                        for local in pending {
                            let enabled = vrings
                                .get(usize::from(local))
                                .is_some_and(|v| v.get_ref().is_enabled());
                            if enabled {
                                handle(backend, local, vrings, worker);
                            }
                        }
                    }
                    token => {
                        let Ok(local) = u16::try_from(token) else {
                            continue;
                        };
                        let Some(vring) = vrings.get(usize::from(local)) else {
                            continue;
                        };
                        // The kick's count is not read: its descriptor is registered
                        // edge-triggered, so each kick reports it once (see
                        // `update_vring_registration`).
                        if vring.get_ref().is_enabled() {
                            handle(backend, local, vrings, worker);
                        }
                    }
                }
            }
        }
    }
}

fn handle<T: VhostUserBackend<Bitmap = (), Vring = VringRwLock>>(
    backend: &T,
    local: u16,
    vrings: &[VringRwLock],
    worker: usize,
) {
    if let Err(e) = backend.handle_event(local, EventSet::IN, vrings, worker) {
        // A guest that broke its own queue (e.g. a used ring outside its memory) only stalls
        // that queue; the worker keeps serving.
        error!("queue worker {worker}: {e}");
    }
}

impl<T> VhostUserBackendReqHandlerMut for VhostUserConnection<T>
where
    T: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
{
    fn set_owner(&mut self) -> VhostUserResult<()> {
        if self.owned {
            return Err(VhostUserError::InvalidOperation("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostUserResult<()> {
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VhostUserResult<()> {
        for index in 0..self.vrings.len() {
            self.vring(index)?.set_enabled(false);
            self.update_vring_registration(index)?;
        }
        self.acked_features = 0;
        self.backend.reset_device();
        Ok(())
    }

    fn get_features(&mut self) -> VhostUserResult<u64> {
        Ok(self.backend.features())
    }

    fn set_features(&mut self, features: u64) -> VhostUserResult<()> {
        if features & !self.backend.features() != 0 {
            return Err(VhostUserError::InvalidParam);
        }
        self.acked_features = features;
        // Without VHOST_USER_F_PROTOCOL_FEATURES, rings are enabled from the start.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for index in 0..self.vrings.len() {
                self.vring(index)?.set_enabled(true);
                self.update_vring_registration(index)?;
            }
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for vring in &self.vrings {
            vring.set_queue_event_idx(event_idx);
        }
        self.backend.set_event_idx(event_idx);
        self.backend.acked_features(features);
        info!("features negotiated: {features:#x}");
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(VhostUserError::InvalidOperation("postcopy not supported"));
        }
        if ctx.len() != files.len() || ctx.is_empty() || ctx.len() as u64 > MAX_MEM_SLOTS {
            error!(
                "memory table refused: {} region(s), {} descriptor(s)",
                ctx.len(),
                files.len()
            );
            return Err(VhostUserError::InvalidParam);
        }
        // Checked against each other, not against the table this one replaces.
        let previous = std::mem::take(&mut self.mappings);
        let mut regions = Vec::with_capacity(ctx.len());
        for (region, file) in ctx.iter().zip(files) {
            let checked = self
                .check_region(
                    region.user_addr,
                    region.memory_size,
                    region.guest_phys_addr,
                    region.mmap_offset,
                )
                .and_then(|()| Self::map_region(region, file));
            match checked {
                Ok(mapped) => regions.push(mapped),
                Err(e) => {
                    self.mappings = previous;
                    return Err(e);
                }
            }
            self.mappings
                .push((region.user_addr, region.memory_size, region.guest_phys_addr));
        }
        let mem = match GuestMemoryMmap::from_regions(regions) {
            Ok(mem) => mem,
            Err(e) => {
                self.mappings = previous;
                return Err(VhostUserError::ReqHandlerError(io::Error::other(e)));
            }
        };
        if let Err(e) = self.publish_memory(mem) {
            self.mappings = previous;
            return Err(e);
        }
        info!("guest memory table set: {} region(s)", ctx.len());
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostUserResult<()> {
        let vring = self.vring(index as usize)?;
        if num == 0 || num as usize > self.max_queue_size || !num.is_power_of_two() {
            error!(
                "queue {index}: size {num} refused (1..={})",
                self.max_queue_size
            );
            return Err(VhostUserError::InvalidParam);
        }
        vring.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostUserResult<()> {
        let desc_table = self.frontend_va_to_gpa(descriptor)?;
        let avail_ring = self.frontend_va_to_gpa(available)?;
        let used_ring = self.frontend_va_to_gpa(used)?;
        let vring = self.vring(index as usize)?;
        vring
            .set_queue_info(desc_table, avail_ring, used_ring)
            .map_err(|_| VhostUserError::InvalidParam)?;
        // After a driver restart the used index in guest memory is the truth (as in
        // vhost-user-backend and libvhost-user).
        let idx = vring
            .queue_used_idx()
            .map_err(|_| VhostUserError::BackendInternalError)?;
        vring.set_queue_next_used(idx);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostUserResult<()> {
        let vring = self.vring(index as usize)?;
        let base = u16::try_from(base).map_err(|_| VhostUserError::InvalidParam)?;
        vring.set_queue_next_avail(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostUserResult<VhostUserVringState> {
        let vring = self.vring(index as usize)?.clone();
        // Stop the ring: no more kicks are handled, and a batch in progress finishes first.
        vring.set_queue_ready(false);
        self.update_vring_registration(index as usize)?;
        self.backend
            .stop_vring(index)
            .map_err(VhostUserError::ReqHandlerError)?;
        let next_avail = vring.queue_next_avail();
        vring.set_kick(None);
        vring.set_call(None);
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, file: Option<File>) -> VhostUserResult<()> {
        self.vring(usize::from(index))?.set_kick(file);
        self.start_vring_if_configured(usize::from(index))
    }

    fn set_vring_call(&mut self, index: u8, file: Option<File>) -> VhostUserResult<()> {
        self.vring(usize::from(index))?.set_call(file);
        self.start_vring_if_configured(usize::from(index))
    }

    fn set_vring_err(&mut self, index: u8, file: Option<File>) -> VhostUserResult<()> {
        let vring = self.vring(usize::from(index))?;
        let ours = match &file {
            Some(f) => Some(
                f.try_clone()
                    .map(|f| {
                        // SAFETY: a fresh duplicate of the frontend's eventfd, owned by nobody
                        // else.
                        unsafe { EventFd::from_raw_fd(f.into_raw_fd()) }
                    })
                    .map_err(VhostUserError::ReqHandlerError)?,
            ),
            None => None,
        };
        self.queue_errors.set(usize::from(index), ours);
        vring.set_err(file);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostUserResult<VhostUserProtocolFeatures> {
        let mut features = self.backend.protocol_features();
        if !crate::inflight::available() {
            // Inflight tracking needs the region the VMM hands in (--inflight-fd).
            features.remove(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        }
        Ok(features)
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostUserResult<()> {
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostUserResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostUserResult<()> {
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(VhostUserError::InactiveFeature(
                VhostUserVirtioFeatures::PROTOCOL_FEATURES,
            ));
        }
        self.vring(index as usize)?.set_enabled(enable);
        self.update_vring_registration(index as usize)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<Vec<u8>> {
        Ok(self.backend.get_config(offset, size))
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<()> {
        self.backend
            .set_config(offset, buf)
            .map_err(VhostUserError::ReqHandlerError)
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostUserResult<()> {
        Err(VhostUserError::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostUserResult<File> {
        Err(VhostUserError::InvalidOperation("no shared objects"))
    }

    // vhost-user-backend answers both "not supported"; this runtime implements them
    // (crate::inflight), for devices that track what they take (the backend offers
    // INFLIGHT_SHMFD) and were handed a region by the VMM.
    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VhostUserResult<(VhostUserInflight, File)> {
        self.check_inflight(inflight)?;
        let (size, file) = crate::inflight::get(inflight.num_queues, inflight.queue_size)
            .map_err(VhostUserError::ReqHandlerError)?;
        info!(
            "inflight region: {} queue(s) of {}, {size} bytes",
            inflight.num_queues, inflight.queue_size
        );
        Ok((
            VhostUserInflight::new(size, 0, inflight.num_queues, inflight.queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VhostUserResult<()> {
        self.check_inflight(inflight)?;
        crate::inflight::set(
            &file,
            inflight.mmap_offset,
            inflight.mmap_size,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(|e| {
            error!("inflight region refused: {e}");
            VhostUserError::InvalidParam
        })
    }

    fn get_max_mem_slots(&mut self) -> VhostUserResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        file: File,
        postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(VhostUserError::InvalidOperation("postcopy not supported"));
        }
        if self.mappings.len() as u64 >= MAX_MEM_SLOTS {
            error!("memory region refused: all {MAX_MEM_SLOTS} slots are in use");
            return Err(VhostUserError::InvalidParam);
        }
        self.check_region(
            region.user_addr,
            region.memory_size,
            region.guest_phys_addr,
            region.mmap_offset,
        )?;
        let guest_region = Arc::new(Self::map_region(region, file)?);
        let mem = self
            .atomic_mem
            .memory()
            .insert_region(guest_region)
            .map_err(|e| VhostUserError::ReqHandlerError(io::Error::other(e)))?;
        self.publish_memory(mem)?;
        self.mappings
            .push((region.user_addr, region.memory_size, region.guest_phys_addr));
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostUserResult<()> {
        let (mem, _) = self
            .atomic_mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(|e| VhostUserError::ReqHandlerError(io::Error::other(e)))?;
        self.publish_memory(mem)?;
        self.mappings
            .retain(|(_, _, gpa)| *gpa != region.guest_phys_addr);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _file: File,
    ) -> VhostUserResult<Option<File>> {
        Err(VhostUserError::InvalidOperation("migration not supported"))
    }

    fn check_device_state(&mut self) -> VhostUserResult<()> {
        Err(VhostUserError::InvalidOperation("migration not supported"))
    }

    fn get_shmem_config(&mut self) -> VhostUserResult<VhostUserShMemConfig> {
        Err(VhostUserError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostUserResult<()> {
        Err(VhostUserError::InvalidOperation(
            "dirty logging not supported",
        ))
    }
}

/// Serves the frontend connected to `stream` with `backend` until it disconnects.
///
/// Returns `Ok(())` when the frontend hangs up, an error if it broke the protocol.
pub fn serve_stream<T>(stream: UnixStream, backend: T) -> Result<(), ServeError>
where
    T: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
{
    let connection = Arc::new(Mutex::new(VhostUserConnection::new(backend)?));
    let mut handler = BackendReqHandler::from_stream(stream, connection.clone());
    let result = loop {
        match handler.handle_request() {
            Ok(()) => {}
            // QEMU sends VHOST_USER_SET_VRING_ENABLE before any SET_FEATURES (virtio-net's
            // multiqueue set-up disables the extra pairs at realize, before a driver exists;
            // QEMU only checks that the bit is offered). The vhost crate refuses it while
            // VHOST_USER_F_PROTOCOL_FEATURES is not acked, before our handler sees it; the
            // message was read whole and no reply is due before negotiation, so it is dropped
            // and the session goes on. Rings start disabled once the bit is acked, and QEMU
            // enables the pairs it uses after SET_FEATURES.
            Err(VhostUserError::InactiveFeature(f))
                if f == VhostUserVirtioFeatures::PROTOCOL_FEATURES =>
            {
                warn!("SET_VRING_ENABLE before SET_FEATURES ignored (QEMU sends it at realize)");
            }
            Err(e) => break e,
        }
    };
    connection
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .stop_workers();
    match result {
        VhostUserError::Disconnected
        | VhostUserError::PartialMessage
        | VhostUserError::SocketBroken(_) => {
            info!("frontend disconnected");
            Ok(())
        }
        e => Err(ServeError::Protocol(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_retry_queue_after_sets_epoll_timeout_then_due() {
        // Margins of hundreds of ms: under qemu-user the registrations themselves take ms.
        let now = Instant::now();
        assert_eq!(retry_timeout(now), -1, "no retry: wait for a kick");
        retry_queue_after(1, Duration::from_millis(500));
        retry_queue_after(1, Duration::from_millis(20));
        retry_queue_after(0, Duration::from_millis(2000));
        let t = Instant::now();
        let timeout = retry_timeout(t);
        assert!(
            (0..=21).contains(&timeout),
            "the earliest retry wins: {timeout}"
        );
        assert!(due_retries(now).is_empty());
        assert_eq!(due_retries(t + Duration::from_millis(30)), vec![1]);
        assert!(retry_timeout(t) > 1000, "queue 0's retry is next");
        assert_eq!(due_retries(t + Duration::from_secs(3)), vec![0]);
        let now = t;
        assert_eq!(retry_timeout(now), -1);
    }
}
