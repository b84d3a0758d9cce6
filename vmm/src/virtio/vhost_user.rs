//! The VMM's side of a vhost-user device: the device process (started here or by someone
//! else), the handshake, and handing it guest memory, rings, kick and call eventfds.
//!
//! After the handshake, the connection belongs to the device's worker thread
//! (`<name>-vhost`): the transport hands it jobs (activate, reset, configuration writes) and
//! never waits for them, so no vCPU ever blocks on a device process. Every request has a
//! deadline ([`REQUEST_TIMEOUT`]), kept by the device's `<name>-deadline` thread: a request
//! that misses it gets its socket shut down, which ends it at once (the vhost crate retries
//! EAGAIN forever, so socket timeouts alone would spin, not end it). A missed deadline, a
//! broken socket or a reply that breaks the protocol fails the device
//! ([`super::FailureHandle`]).

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info, Level};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};

use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceShared, FailureHandle, QueueErrorWatch};

/// Deadline of every vhost-user request, from sending it to the end of its reply. A backend
/// that misses it is declared failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes of configuration space the VMM caches: every virtio configuration structure
/// Bulkhead serves fits (virtio-blk's is 60 bytes). A backend that serves less (it refuses
/// the read) is asked again for less.
pub const CONFIG_CACHE_SIZE: u32 = 0x100;

/// `VHOST_USER_F_PROTOCOL_FEATURES`: a vhost-user feature bit, never offered to the guest.
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Protocol features Bulkhead uses when the backend offers them.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// Work for a device's worker thread, in the order the transport asked for it.
pub(crate) enum Job {
    /// Start the data path (the driver set DRIVER_OK).
    Activate {
        memory: GuestMemoryMmap,
        features: u64,
        rings: Vec<Option<RingConfig>>,
        kicks: Vec<Arc<EventFd>>,
        calls: Vec<Arc<EventFd>>,
    },
    /// Stop it (device reset by the driver, or a VM reboot); ends the reset the transport
    /// shows as pending.
    Deactivate,
    /// The driver wrote the configuration space.
    WriteConfig { offset: u32, data: Vec<u8> },
    /// The backend said its configuration changed.
    RefreshConfig,
    /// A new process of the device is connected on `frontend` (the old one died): replay the
    /// session. `socket` is a duplicate of the stream for shutting it down; `died_at` when the
    /// old process was seen to end.
    Reconnect {
        frontend: Frontend,
        socket: OwnedFd,
        died_at: Option<Instant>,
    },
}

/// What the driver set up, as the VMM keeps it to replay it to a new device process.
#[derive(Clone)]
struct Session {
    memory: GuestMemoryMmap,
    features: u64,
    rings: Vec<Option<RingConfig>>,
    kicks: Vec<Arc<EventFd>>,
    calls: Vec<Arc<EventFd>>,
}

/// Most configuration-space writes kept for replay (the last write of each offset).
const MAX_CONFIG_WRITES: usize = 64;

/// The backend's requests (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG): the worker re-reads the
/// configuration, then the generation moves on and the configuration interrupt fires.
struct ConfigChange {
    jobs: Sender<Job>,
}

impl VhostUserFrontendReqHandler for ConfigChange {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        // The worker may be busy: the request is queued, never waited for here.
        let _ = self.jobs.send(Job::RefreshConfig);
        Ok(0)
    }
}

/// Tells a device's worker that the backend's configuration changed because the VMM changed
/// it over the device's control channel (the balloon's target, the console's size): the
/// worker re-reads the configuration, then the generation moves on and the configuration
/// interrupt fires, as for a backend's VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (the vhost crate's
/// backend has no sender for that message, so the VMM triggers the re-read itself). One
/// mechanism for every device ([`VhostUserDevice::config_refresh`]). Never waits.
#[derive(Clone)]
pub struct ConfigRefresh(Sender<Job>);

impl ConfigRefresh {
    /// Queues the re-read; false if the device's worker is gone.
    pub fn refresh(&self) -> bool {
        self.0.send(Job::RefreshConfig).is_ok()
    }
}

impl std::fmt::Debug for ConfigRefresh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConfigRefresh")
    }
}

/// Errors talking to a device process.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// Connecting to a backend's socket failed.
    #[error("connecting to vhost-user backend at {0:?}")]
    Connect(PathBuf, #[source] vhost::Error),
    /// A vhost-user request failed.
    #[error("vhost-user {0} failed")]
    Request(&'static str, #[source] vhost::Error),
    /// The backend lacks something required.
    #[error("the vhost-user backend {0}")]
    Backend(String),
    /// A thread or eventfd for the device could not be created.
    #[error("creating the {0} of the device")]
    Resource(&'static str, #[source] std::io::Error),
    /// The device was declared failed; no request is sent any more.
    #[error("the device has failed")]
    Failed,
    /// A guest ring address is not in guest RAM.
    #[error("queue {0}: ring address {1:#x} (+{2} bytes) is not in guest RAM")]
    RingAddress(usize, u64, usize),
}

fn req<T>(what: &'static str, r: vhost::Result<T>) -> Result<T, VhostUserError> {
    r.map_err(|e| VhostUserError::Request(what, e))
}

/// Whether `e` is the backend refusing a request in good order (a negative REPLY_ACK, a
/// reply saying it cannot) rather than a broken, late or malformed exchange, after which the
/// stream cannot be trusted.
fn is_refusal(e: &VhostUserError) -> bool {
    use vhost::vhost_user::Error as U;
    match e {
        VhostUserError::Request(_, vhost::Error::VhostUserProtocol(u)) => matches!(
            u,
            U::BackendInternalError | U::ReqHandlerError(_) | U::InvalidParam
        ),
        VhostUserError::Request(..) | VhostUserError::Failed => false,
        _ => true,
    }
}

/// A duplicate of the stream, for shutting it down without the frontend's lock.
fn dup_socket(frontend: &Frontend) -> Result<OwnedFd, VhostUserError> {
    let fd = frontend.as_raw_fd();
    // SAFETY: F_DUPFD_CLOEXEC takes integer arguments; the result, if valid, is a new
    // descriptor owned by nothing else.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(VhostUserError::Resource(
            "socket duplicate",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `dup` was just returned by fcntl and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// Keeps the deadline of the request in flight: a thread that fails the device (shutting its
/// socket down, which ends the request) when a request outlives its deadline.
struct Watchdog {
    state: Arc<(Mutex<WatchState>, Condvar)>,
    timeout: Duration,
}

struct WatchState {
    /// The deadline and name of the request in flight.
    armed: Option<(Instant, &'static str)>,
    stop: bool,
}

impl Watchdog {
    fn start(shared: Arc<DeviceShared>, timeout: Duration) -> Result<Self, VhostUserError> {
        let state = Arc::new((
            Mutex::new(WatchState {
                armed: None,
                stop: false,
            }),
            Condvar::new(),
        ));
        let s = state.clone();
        bulkhead_sandbox::thread_builder()
            .name(format!("{}-deadline", shared.name))
            .spawn(move || {
                if !crate::seccomp::apply_or_end_thread(crate::seccomp::ThreadKind::VhostWorker) {
                    shared.fail("its deadline thread could not be confined");
                    return;
                }
                let (lock, cv) = &*s;
                let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
                while !g.stop {
                    match g.armed {
                        None => g = cv.wait(g).unwrap_or_else(|e| e.into_inner()),
                        Some((deadline, what)) => {
                            let now = Instant::now();
                            if now >= deadline {
                                g.armed = None;
                                // A restartable device's process is killed (then restarted).
                                shared.process_failed(&format!(
                                    "vhost-user {what} missed its deadline ({} ms)",
                                    timeout.as_millis()
                                ));
                            } else {
                                g = cv
                                    .wait_timeout(g, deadline - now)
                                    .unwrap_or_else(|e| e.into_inner())
                                    .0;
                            }
                        }
                    }
                }
            })
            .map_err(|e| VhostUserError::Resource("deadline thread", e))?;
        Ok(Self { state, timeout })
    }

    fn set(&self, armed: Option<(Instant, &'static str)>) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap_or_else(|e| e.into_inner()).armed = armed;
        cv.notify_one();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        cv.notify_one();
    }
}

/// Sizes to ask for when reading the configuration space: the cache size, then smaller ones
/// for backends that refuse reads past their structure (libvhost-user's blk server).
fn config_read_sizes() -> impl Iterator<Item = u32> {
    [CONFIG_CACHE_SIZE, 128]
        .into_iter()
        .chain((1..32).rev().map(|n| n * 4))
}

/// A ring as the guest driver set it up.
#[derive(Clone, Copy, Debug, Default)]
pub struct RingConfig {
    /// Queue size.
    pub size: u16,
    /// Guest addresses of the descriptor table, driver (avail) and device (used) areas.
    pub desc: u64,
    /// Driver area.
    pub driver: u64,
    /// Device area.
    pub device: u64,
}

/// A connected vhost-user backend, handed to [`super::pci::VirtioPci::new`]. The connection
/// itself lives on the device's worker thread.
pub struct VhostUserDevice {
    /// Features the backend offers, less vhost-user's own bit.
    pub features: u64,
    /// Queues the backend has.
    pub num_queues: usize,
    /// Name for logs.
    pub name: String,
    pub(crate) shared: Arc<DeviceShared>,
    jobs: Sender<Job>,
}

/// The worker thread's side: the frontend and what was set up on it.
struct Connection {
    frontend: Frontend,
    watchdog: Watchdog,
    protocol: Option<VhostUserProtocolFeatures>,
    num_queues: usize,
    shared: Arc<DeviceShared>,
    /// Size of the configuration space the backend serves.
    config_size: u32,
    /// Whether the data path is (perhaps partly) set up.
    active: bool,
    /// Features the backend offered at the handshake (with vhost-user's own bit): a new
    /// process must offer the same.
    offered: u64,
    /// The driver's set-up, kept while the device is active, replayed after a restart.
    session: Option<Session>,
    /// The driver's configuration writes since the last reset, replayed after a restart.
    config_writes: Vec<(u32, Vec<u8>)>,
    /// A duplicate of the backend channel's device end (`SET_BACKEND_REQ_FD`), handed again to
    /// a new process; the channel's VMM end and thread live on.
    backend_req_tx: Option<OwnedFd>,
    /// The inflight region the backend gave (GET_INFLIGHT_FD) for this activation: handed
    /// again to a restarted process (SET_INFLIGHT_FD) so it resubmits what its predecessor had
    /// in flight; a new one is asked for at the next activation after a reset.
    inflight: Option<(VhostUserInflight, std::fs::File)>,
    /// After a replay: the used rings to watch for the first completion of the new process.
    resume: Option<ResumeWatch>,
}

/// The first completion after a restart, seen from the VMM: the used index of a resumed ring
/// moves past where the dead process left it. The worker looks every [`RESUME_POLL`] until
/// then, for at most [`RESUME_WATCH`]; the data path itself never passes through the VMM.
struct ResumeWatch {
    /// When the process ended.
    died_at: Instant,
    /// Looked at until then (a guest with nothing to do completes nothing).
    until: Instant,
    memory: GuestMemoryMmap,
    /// Each resumed ring's used index address and its value when the process ended.
    used: Vec<(GuestAddress, u16)>,
    /// Requests the driver had made available and not seen completed when the process ended
    /// (0: the first completion waited for the guest's next request too).
    waiting: u32,
}

/// How often a restarted device's used rings are looked at until its first completion.
const RESUME_POLL: Duration = Duration::from_micros(500);
/// How long a restarted device's used rings are looked at, at most.
const RESUME_WATCH: Duration = Duration::from_secs(2);

impl ResumeWatch {
    /// The used indexes of the session's rings as the dead process left them.
    fn new(session: &Session, died_at: Instant) -> Option<Self> {
        let mut waiting = 0u32;
        let used: Vec<_> = session
            .rings
            .iter()
            .flatten()
            .filter_map(|r| {
                let at = GuestAddress(r.device.wrapping_add(2));
                let idx = session.memory.read_obj::<u16>(at).ok()?;
                let avail = GuestAddress(r.driver.wrapping_add(2));
                if let Ok(a) = session.memory.read_obj::<u16>(avail) {
                    // Bounded by the ring's size, whatever the guest wrote.
                    waiting += u32::from(a.wrapping_sub(idx).min(r.size));
                }
                Some((at, idx))
            })
            .collect();
        (!used.is_empty()).then(|| Self {
            died_at,
            until: Instant::now() + RESUME_WATCH,
            memory: session.memory.clone(),
            used,
            waiting,
        })
    }

    /// Whether a used index moved.
    fn completed(&self) -> bool {
        self.used.iter().any(|&(at, idx)| {
            self.memory
                .load::<u16>(at, std::sync::atomic::Ordering::Acquire)
                .is_ok_and(|now| now != idx)
        })
    }
}

impl VhostUserDevice {
    /// Handshakes over `frontend` with a backend that should have `num_queues` queues, then
    /// starts the device's worker thread. Every request has [`REQUEST_TIMEOUT`].
    pub fn handshake(
        name: String,
        frontend: Frontend,
        num_queues: usize,
    ) -> Result<Self, VhostUserError> {
        Self::handshake_with_timeout(name, frontend, num_queues, REQUEST_TIMEOUT)
    }

    pub(crate) fn handshake_with_timeout(
        name: String,
        frontend: Frontend,
        num_queues: usize,
        timeout: Duration,
    ) -> Result<Self, VhostUserError> {
        let socket = dup_socket(&frontend)?;
        let config_irq = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| VhostUserError::Resource("configuration eventfd", e))?,
        );
        let mut shared = DeviceShared::new(name.clone(), config_irq, Some(socket));
        shared.queue_errors = (0..num_queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<Result<_, _>>()
            .map_err(|e| VhostUserError::Resource("queue error eventfd", e))?;
        let shared = Arc::new(shared);
        let mut conn = Connection {
            frontend,
            watchdog: Watchdog::start(shared.clone(), timeout)?,
            protocol: None,
            num_queues,
            shared: shared.clone(),
            config_size: CONFIG_CACHE_SIZE,
            active: false,
            offered: 0,
            session: None,
            config_writes: Vec::new(),
            backend_req_tx: None,
            inflight: None,
            resume: None,
        };
        let (offered, acked) = conn.negotiate(num_queues)?;
        conn.offered = offered;
        let queues = conn.num_queues;
        let (jobs, inbox) = channel();
        // The first read of the configuration space: the guest reads only the cache.
        let config = conn.read_config_sized()?;
        shared.set_config(config, false);
        if acked.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            let mut handler =
                FrontendReqHandler::new(Arc::new(ConfigChange { jobs: jobs.clone() }))
                    .map_err(|e| VhostUserError::Backend(format!("backend channel: {e}")))?;
            handler.set_reply_ack_flag(acked.contains(VhostUserProtocolFeatures::REPLY_ACK));
            let tx = handler.get_tx_raw_fd();
            conn.call("SET_BACKEND_REQ_FD", |f| f.set_backend_request_fd(&tx))?;
            // Kept to hand the same channel to a restarted process.
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) on the handler's open socket; checked below.
            let tx_dup = unsafe { libc::fcntl(tx, libc::F_DUPFD_CLOEXEC, 0) };
            if tx_dup < 0 {
                return Err(VhostUserError::Resource(
                    "backend request socket",
                    std::io::Error::last_os_error(),
                ));
            }
            // SAFETY: a fresh descriptor owned by nobody else.
            conn.backend_req_tx = Some(unsafe { OwnedFd::from_raw_fd(tx_dup) });
            // The handler keeps `tx` open too, so the device's end closing (its process
            // died, or it is stopped) never ends the thread's read: the device's failure or
            // teardown shuts this duplicate down instead.
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) on the handler's open socket; the result is
            // checked before it is owned.
            let dup = unsafe { libc::fcntl(handler.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                return Err(VhostUserError::Resource(
                    "backend request socket",
                    std::io::Error::last_os_error(),
                ));
            }
            // SAFETY: a fresh descriptor owned by nobody else.
            shared.set_backend_req(unsafe { OwnedFd::from_raw_fd(dup) });
            bulkhead_sandbox::thread_builder()
                .name(format!("{name}-backend-req"))
                .spawn(move || {
                    if crate::seccomp::apply_or_end_thread(crate::seccomp::ThreadKind::BackendReq) {
                        while handler.handle_request().is_ok() {}
                    }
                })
                .map_err(|e| VhostUserError::Resource("backend request thread", e))?;
        }
        bulkhead_sandbox::thread_builder()
            .name(format!("{name}-vhost"))
            .spawn(move || {
                if crate::seccomp::apply_or_end_thread(crate::seccomp::ThreadKind::VhostWorker) {
                    conn.run(inbox);
                } else {
                    conn.shared.fail("its worker thread could not be confined");
                }
            })
            .map_err(|e| VhostUserError::Resource("worker thread", e))?;
        info!("{name}: vhost-user backend connected, features {offered:#x}, protocol {acked:?}");
        Ok(Self {
            features: offered & !F_PROTOCOL_FEATURES,
            num_queues: queues,
            name,
            shared,
            jobs,
        })
    }

    /// The handle that makes the worker re-read the configuration and announce it, as on
    /// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (the balloon's target, the console's size).
    pub fn config_refresh(&self) -> ConfigRefresh {
        ConfigRefresh(self.jobs.clone())
    }

    /// Queues `job` for the worker; never waits. A worker that is gone fails the device.
    pub(crate) fn submit(&self, job: Job) {
        if self.jobs.send(job).is_err() {
            self.shared.fail("its worker thread has ended");
        }
    }

    /// Hands a new process's connection to the worker thread, which replays the session.
    pub(crate) fn reconnect(
        &self,
        stream: std::os::unix::net::UnixStream,
        died_at: Option<Instant>,
    ) -> Result<(), VhostUserError> {
        let frontend = Frontend::from_stream(stream, self.num_queues as u64);
        let socket = dup_socket(&frontend)?;
        self.submit(Job::Reconnect {
            frontend,
            socket,
            died_at,
        });
        Ok(())
    }

    /// A handle that fails this device from anywhere.
    pub fn failure_handle(&self) -> FailureHandle {
        FailureHandle(self.shared.clone())
    }

    /// Duplicates of the queues' error eventfds, for the device monitor to watch.
    pub fn queue_error_watch(&self) -> std::io::Result<QueueErrorWatch> {
        let fds = self
            .shared
            .queue_errors
            .iter()
            .map(|e| {
                // SAFETY: into_raw_fd hands over a fresh duplicate, owned by nobody else.
                e.try_clone()
                    .map(|e| unsafe { OwnedFd::from_raw_fd(e.into_raw_fd()) })
            })
            .collect::<std::io::Result<_>>()?;
        Ok(QueueErrorWatch {
            fds,
            handle: self.failure_handle(),
        })
    }
}

impl Connection {
    /// SET_OWNER, features, protocol features, queue count: the start of every session (the
    /// first, and each replay). Returns the features offered and the protocol features acked.
    fn negotiate(
        &mut self,
        num_queues: usize,
    ) -> Result<(u64, VhostUserProtocolFeatures), VhostUserError> {
        self.call("SET_OWNER", |f| f.set_owner())?;
        let offered = self.call("GET_FEATURES", |f| f.get_features())?;
        if offered & F_PROTOCOL_FEATURES != 0 {
            let theirs = self.call("GET_PROTOCOL_FEATURES", |f| f.get_protocol_features())?;
            let acked = theirs & wanted_protocol_features();
            self.call("SET_PROTOCOL_FEATURES", |f| f.set_protocol_features(acked))?;
            self.protocol = Some(acked);
        } else {
            self.protocol = None;
        }
        let acked = self
            .protocol
            .unwrap_or_else(VhostUserProtocolFeatures::empty);
        if !acked.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VhostUserError::Backend(
                "does not offer its configuration space (VHOST_USER_PROTOCOL_F_CONFIG)".into(),
            ));
        }
        if acked.contains(VhostUserProtocolFeatures::MQ) {
            let max = self.call("GET_QUEUE_NUM", |f| f.get_queue_num())?;
            if max < num_queues as u64 {
                return Err(VhostUserError::Backend(format!(
                    "has {max} queues, {num_queues} are needed"
                )));
            }
            self.num_queues = num_queues;
        } else {
            self.num_queues = 1;
        }
        Ok((offered, acked))
    }

    /// Sends one request under its deadline.
    fn call<T>(
        &mut self,
        what: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, VhostUserError> {
        if self.shared.failed() || self.shared.down() {
            return Err(VhostUserError::Failed);
        }
        self.watchdog
            .set(Some((Instant::now() + self.watchdog.timeout, what)));
        let r = f(&mut self.frontend);
        self.watchdog.set(None);
        if self.shared.failed() || self.shared.down() {
            // The deadline passed (or the device was failed) while the request ran.
            return Err(VhostUserError::Failed);
        }
        req(what, r)
    }

    /// Runs jobs until the transport is gone (the device was unplugged): then the frontend
    /// is dropped and the socket closed, which ends an orderly device process.
    fn run(&mut self, inbox: Receiver<Job>) {
        loop {
            let job = if self.resume.is_some() {
                match inbox.recv_timeout(RESUME_POLL) {
                    Ok(job) => Some(job),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match inbox.recv() {
                    Ok(job) => Some(job),
                    Err(_) => break,
                }
            };
            if let Some(job) = job {
                self.run_job(job);
            }
            self.watch_resume();
        }
        debug!("{}: worker ends", self.shared.name);
    }

    /// Logs the restarted process's first completion, or that none came in time.
    fn watch_resume(&mut self) {
        let Some(w) = &self.resume else { return };
        let name = &self.shared.name;
        if self.shared.down() || self.shared.failed() || self.session.is_none() {
            // Died again, or the driver reset the device: the next replay watches anew.
            self.resume = None;
        } else if w.completed() {
            // A warning, as the death it follows: the operator sees both at the default level.
            log::warn!(
                "{name}: I/O resumed: first request completed {} ms after its process ended ({} request(s) were waiting)",
                w.died_at.elapsed().as_millis(),
                w.waiting
            );
            self.resume = None;
        } else if Instant::now() >= w.until {
            info!(
                "{name}: no request completed in the {} s after the replay (the guest had none to do)",
                RESUME_WATCH.as_secs()
            );
            self.resume = None;
        }
    }

    fn run_job(&mut self, job: Job) {
        let name = self.shared.name.clone();
        match job {
            Job::Activate { .. } | Job::WriteConfig { .. } | Job::RefreshConfig
                if self.shared.failed() => {}
            Job::Reconnect {
                frontend,
                socket,
                died_at,
            } => self.reconnect(frontend, socket, died_at),
            Job::Activate {
                memory,
                features,
                rings,
                kicks,
                calls,
            } if self.shared.down() => {
                // Replayed to the next process.
                self.session = Some(Session {
                    memory,
                    features,
                    rings,
                    kicks,
                    calls,
                });
            }
            Job::WriteConfig { offset, data } if self.shared.down() => {
                self.record_config_write(offset, data);
            }
            Job::RefreshConfig if self.shared.down() => {}
            Job::Activate {
                memory,
                features,
                rings,
                kicks,
                calls,
            } => {
                self.session = Some(Session {
                    memory: memory.clone(),
                    features,
                    rings: rings.clone(),
                    kicks: kicks.clone(),
                    calls: calls.clone(),
                });
                if self.active {
                    // Activation is idempotent: a second one starts from a clean backend.
                    if let Err(e) = self.teardown() {
                        return self.failed_on(&e);
                    }
                }
                self.active = true;
                match self.activate(&memory, features, &rings, &kicks, &calls, false) {
                    Ok(()) => info!(
                        "{name}: activated, {} of {} queues, features {features:#x}",
                        rings.iter().flatten().count(),
                        rings.len()
                    ),
                    // The process died meanwhile: the activation is replayed to the next one.
                    Err(_) if self.shared.down() => {}
                    Err(e) => {
                        crate::log_limited!(
                            self.shared.log_limit,
                            Level::Error,
                            "{name}: activating the device process: {e}"
                        );
                        // A half-done activation never stays: the backend is torn down.
                        match self.teardown() {
                            Ok(()) if is_refusal(&e) => self.shared.set_needs_reset(),
                            Ok(()) => self.failed_on(&e),
                            Err(t) => self.failed_on(&t),
                        }
                    }
                }
            }
            Job::Deactivate => {
                self.session = None;
                self.config_writes.clear();
                self.inflight = None;
                if self.shared.down() {
                    // The next process starts from its reset state anyway.
                    self.active = false;
                } else if self.active && !self.shared.failed() {
                    if let Err(e) = self.teardown() {
                        self.failed_on(&e);
                    }
                }
                self.shared.reset_done();
            }
            Job::WriteConfig { offset, data } => {
                self.record_config_write(offset, data.clone());
                let r = self.call("SET_CONFIG", |f| {
                    f.set_config(offset, VhostUserConfigFlags::WRITABLE, &data)
                });
                match r {
                    Err(e) if !is_refusal(&e) => self.failed_on(&e),
                    Err(e) => debug!("{name}: {e}"),
                    Ok(()) => {}
                }
            }
            Job::RefreshConfig => match self.read_config(self.config_size) {
                Ok(config) => self.shared.set_config(config, true),
                Err(e) => self.failed_on(&e),
            },
        }
    }

    fn failed_on(&mut self, e: &VhostUserError) {
        if self.shared.down() {
            // The process is gone; what failed is replayed to the next one.
            return;
        }
        self.active = false;
        self.shared.process_failed(&error_chain(e));
    }

    fn record_config_write(&mut self, offset: u32, data: Vec<u8>) {
        self.config_writes
            .retain(|(o, d)| *o != offset || d.len() != data.len());
        if self.config_writes.len() >= MAX_CONFIG_WRITES {
            self.config_writes.remove(0);
        }
        self.config_writes.push((offset, data));
    }

    /// A new process of the device is connected: the session is replayed from the VMM's state
    /// (features, protocol features, configuration writes, then, if the driver had started
    /// the device, the memory table and every ring with its size, addresses, base and the
    /// same kick, call and error eventfds). Any error kills the new process too (and the
    /// monitor decides again).
    fn reconnect(&mut self, frontend: Frontend, socket: OwnedFd, died_at: Option<Instant>) {
        let name = self.shared.name.clone();
        if self.shared.failed() || self.shared.is_disconnected() {
            return;
        }
        self.frontend = frontend;
        self.shared.replace_socket(socket);
        let start = Instant::now();
        // Read before the new process has the rings: the dead one's last completions.
        self.resume = self
            .session
            .as_ref()
            .zip(died_at)
            .and_then(|(s, d)| ResumeWatch::new(s, d));
        match self.replay() {
            Ok(queues) => {
                let away = died_at.map_or(String::new(), |d| {
                    format!(", {} ms after its process ended", d.elapsed().as_millis())
                });
                // A warning, as the death it follows: the operator sees both at the default level.
                log::warn!(
                    "{name}: device process restarted: session replayed in {} ms ({queues} queue(s) resumed){away}",
                    start.elapsed().as_millis()
                );
            }
            Err(e) => {
                crate::log_limited!(
                    self.shared.log_limit,
                    Level::Error,
                    "{name}: replaying the session to the restarted process: {}",
                    error_chain(&e)
                );
                self.resume = None;
                self.active = false;
                self.shared.process_failed(&error_chain(&e));
            }
        }
    }

    /// Replays the session; returns how many queues were resumed.
    fn replay(&mut self) -> Result<usize, VhostUserError> {
        let (offered, _) = self.negotiate(self.num_queues.max(1))?;
        if offered != self.offered {
            return Err(VhostUserError::Backend(format!(
                "offers features {offered:#x} after its restart, {:#x} before",
                self.offered
            )));
        }
        let config = self.read_config(self.config_size)?;
        self.shared.set_config(config, false);
        if let Some(tx) = self.backend_req_tx.take() {
            let r = self.call("SET_BACKEND_REQ_FD", |f| f.set_backend_request_fd(&tx));
            self.backend_req_tx = Some(tx);
            r?;
        }
        for (offset, data) in self.config_writes.clone() {
            let r = self.call("SET_CONFIG", |f| {
                f.set_config(offset, VhostUserConfigFlags::WRITABLE, &data)
            });
            match r {
                Err(e) if !is_refusal(&e) => return Err(e),
                _ => {}
            }
        }
        let Some(s) = self.session.clone() else {
            self.active = false;
            return Ok(0);
        };
        self.active = true;
        self.activate(&s.memory, s.features, &s.rings, &s.kicks, &s.calls, true)?;
        // Completions the old process published without signalling them: one interrupt per
        // queue (a spurious one is harmless).
        for (q, ring) in s.rings.iter().enumerate() {
            if ring.is_some() {
                if let Some(call) = s.calls.get(q) {
                    let _ = call.write(1);
                }
            }
        }
        Ok(s.rings.iter().flatten().count())
    }

    fn read_config(&mut self, size: u32) -> Result<Vec<u8>, VhostUserError> {
        let buf = vec![0u8; size as usize];
        let (_, payload) = self.call("GET_CONFIG", |f| {
            f.get_config(0, size, VhostUserConfigFlags::WRITABLE, &buf)
        })?;
        if payload.len() != buf.len() {
            return Err(VhostUserError::Backend(format!(
                "answered GET_CONFIG of {size} bytes with {}",
                payload.len()
            )));
        }
        Ok(payload)
    }

    /// Reads the configuration space at the largest size the backend serves.
    fn read_config_sized(&mut self) -> Result<Vec<u8>, VhostUserError> {
        let mut last = None;
        for size in config_read_sizes() {
            match self.read_config(size) {
                Ok(c) => {
                    self.config_size = size;
                    return Ok(c);
                }
                Err(e) if is_refusal(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(VhostUserError::Failed))
    }

    /// Starts the data path: features, guest memory, and each ring with its kick and call
    /// eventfds. `rings[i]` is `None` for queues the driver did not enable.
    fn activate(
        &mut self,
        memory: &GuestMemoryMmap,
        features: u64,
        rings: &[Option<RingConfig>],
        kicks: &[Arc<EventFd>],
        calls: &[Arc<EventFd>],
        replay: bool,
    ) -> Result<(), VhostUserError> {
        let f = features
            | if self.protocol.is_some() {
                F_PROTOCOL_FEATURES
            } else {
                0
            };
        self.call("SET_FEATURES", |fr| fr.set_features(f))?;
        let regions = memory
            .iter()
            .map(|r| {
                let fo = r.file_offset().ok_or_else(|| {
                    VhostUserError::Backend("guest RAM is not file-backed".into())
                })?;
                Ok(VhostUserMemoryRegionInfo {
                    guest_phys_addr: r.start_addr().0,
                    memory_size: r.len(),
                    userspace_addr: r.as_ptr() as u64,
                    mmap_offset: fo.start(),
                    mmap_handle: fo.file().as_raw_fd(),
                })
            })
            .collect::<Result<Vec<_>, VhostUserError>>()?;
        self.call("SET_MEM_TABLE", |f| f.set_mem_table(&regions))?;
        self.set_inflight(rings, replay)?;
        let protocol = self.protocol.is_some();
        for (q, ring) in rings.iter().enumerate().take(self.num_queues) {
            let Some(ring) = ring else { continue };
            let (Some(kick), Some(call)) = (kicks.get(q), calls.get(q)) else {
                return Err(VhostUserError::Backend(format!(
                    "queue {q} has no eventfds"
                )));
            };
            let n = usize::from(ring.size);
            let host = |addr: u64, len: usize| -> Result<u64, VhostUserError> {
                memory
                    .get_slice(GuestAddress(addr), len)
                    .map(|s| s.ptr_guard().as_ptr() as u64)
                    .map_err(|_| VhostUserError::RingAddress(q, addr, len))
            };
            let config = VringConfigData {
                queue_max_size: ring.size,
                queue_size: ring.size,
                flags: 0,
                desc_table_addr: host(ring.desc, 16 * n)?,
                used_ring_addr: host(ring.device, 6 + 8 * n)?,
                avail_ring_addr: host(ring.driver, 6 + 2 * n)?,
                log_addr: None,
            };
            // A fresh ring starts at 0. After a crash GET_VRING_BASE cannot be asked: the base
            // is the used index in guest memory (as the vhost-user specification and QEMU
            // do), so what was taken and not completed is taken again.
            let base = if replay {
                memory
                    .read_obj::<u16>(GuestAddress(ring.device.wrapping_add(2)))
                    .map_err(|_| VhostUserError::RingAddress(q, ring.device, 4))?
            } else {
                0
            };
            self.call("SET_VRING_NUM", |f| f.set_vring_num(q, ring.size))?;
            self.call("SET_VRING_ADDR", |f| f.set_vring_addr(q, &config))?;
            self.call("SET_VRING_BASE", |f| f.set_vring_base(q, base))?;
            self.call("SET_VRING_KICK", |f| f.set_vring_kick(q, kick))?;
            self.call("SET_VRING_CALL", |f| f.set_vring_call(q, call))?;
            // The backend signals it when the driver broke the queue (the device monitor
            // then shows the guest DEVICE_NEEDS_RESET).
            let shared = self.shared.clone();
            if let Some(err) = shared.queue_errors.get(q) {
                self.call("SET_VRING_ERR", |f| f.set_vring_err(q, err))?;
            }
            if protocol {
                self.call("SET_VRING_ENABLE", |f| f.set_vring_enable(q, true))?;
            }
        }
        Ok(())
    }

    /// In-flight tracking, when the backend offers it: a new region at a fresh activation
    /// (GET_INFLIGHT_FD, then SET_INFLIGHT_FD), the kept one at a replay, before the rings.
    fn set_inflight(
        &mut self,
        rings: &[Option<RingConfig>],
        replay: bool,
    ) -> Result<(), VhostUserError> {
        if !self
            .protocol
            .is_some_and(|p| p.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD))
        {
            return Ok(());
        }
        if !replay || self.inflight.is_none() {
            let queue_size = rings.iter().flatten().map(|r| r.size).max().unwrap_or(0);
            if queue_size == 0 {
                return Ok(());
            }
            let ask = VhostUserInflight::new(0, 0, self.num_queues as u16, queue_size);
            let (info, file) = self.call("GET_INFLIGHT_FD", |f| f.get_inflight_fd(&ask))?;
            if info.num_queues != ask.num_queues || info.queue_size != ask.queue_size {
                return Err(VhostUserError::Backend(format!(
                    "answered GET_INFLIGHT_FD for {} queue(s) of {} with {} of {}",
                    ask.num_queues, ask.queue_size, info.num_queues, info.queue_size
                )));
            }
            self.inflight = Some((info, file));
        }
        if let Some((info, file)) = self.inflight.take() {
            let r = self.call("SET_INFLIGHT_FD", |f| {
                f.set_inflight_fd(&info, file.as_raw_fd())
            });
            self.inflight = Some((info, file));
            r?;
        }
        Ok(())
    }

    /// Stops the data path and puts the backend back to its reset state, whatever part of
    /// an activation happened: VHOST_USER_RESET_DEVICE when the backend offers it, else
    /// every ring is disabled and stopped (GET_VRING_BASE), refusals ignored (a ring that
    /// never started may refuse).
    fn teardown(&mut self) -> Result<(), VhostUserError> {
        self.active = false;
        if self
            .protocol
            .is_some_and(|p| p.contains(VhostUserProtocolFeatures::RESET_DEVICE))
        {
            return self.call("RESET_DEVICE", |f| f.reset_device());
        }
        let protocol = self.protocol.is_some();
        for q in 0..self.num_queues {
            if protocol {
                match self.call("SET_VRING_ENABLE", |f| f.set_vring_enable(q, false)) {
                    Err(e) if !is_refusal(&e) => return Err(e),
                    _ => {}
                }
            }
            match self.call("GET_VRING_BASE", |f| f.get_vring_base(q)) {
                Err(e) if !is_refusal(&e) => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::super::fake_backend::*;
    use super::*;
    use std::time::Instant;

    const T: Duration = Duration::from_millis(300);
    const CONFIG: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

    fn handshake(fake: &mut Fake) -> Result<VhostUserDevice, VhostUserError> {
        let frontend = fake.frontend.take().expect("frontend");
        VhostUserDevice::handshake_with_timeout("fake".into(), frontend, 1, T)
    }

    /// A fake that is honest except for messages `evil` answers (`Some`).
    fn fake_with(mut evil: impl FnMut(&Msg) -> Option<Action> + Send + 'static) -> Fake {
        Fake::start(move |m| evil(m).unwrap_or_else(|| honest(&CONFIG, 1, m)))
    }

    /// Handshakes against `fake`: the result must be an error, within a few deadlines.
    fn assert_refused(mut fake: Fake, what: &str) {
        let start = Instant::now();
        let r = handshake(&mut fake);
        assert!(r.is_err(), "{what}: handshake accepted");
        assert!(
            start.elapsed() < 10 * T,
            "{what}: took {:?}",
            start.elapsed()
        );
        println!(
            "malicious backend, {what}: refused ({})",
            error_chain(&r.err().expect("err"))
        );
    }

    #[test]
    fn test_vhost_user_honest_backend_config_cached_without_round_trip() {
        let mut fake = fake_with(|_| None);
        let dev = handshake(&mut fake).expect("handshake");
        let mut b = [0u8; 4];
        let before = fake.codes().len();
        dev.shared.read_config(2, &mut b);
        assert_eq!(b, [3, 4, 5, 6]);
        let mut past = [9u8; 4];
        dev.shared.read_config(0x1000, &mut past);
        assert_eq!(past, [0; 4], "bytes past the space read as zero");
        assert_eq!(fake.codes().len(), before, "a config read sent a request");
    }

    #[test]
    fn test_vhost_user_malicious_backend_never_replies_hits_deadline() {
        assert_refused(
            fake_with(|m| (m.code == GET_FEATURES).then_some(Action::Nothing)),
            "never replies",
        );
    }

    #[test]
    fn test_vhost_user_malicious_backend_wrong_reply_type() {
        assert_refused(
            fake_with(|m| (m.code == GET_FEATURES).then(|| reply(GET_QUEUE_NUM, &[0; 8]))),
            "wrong reply type",
        );
    }

    #[test]
    fn test_vhost_user_malicious_backend_wrong_reply_size() {
        assert_refused(
            fake_with(|m| (m.code == GET_FEATURES).then(|| reply(GET_FEATURES, &[0; 4]))),
            "short reply",
        );
        assert_refused(
            fake_with(|m| (m.code == GET_FEATURES).then(|| reply(GET_FEATURES, &[0; 64]))),
            "long reply",
        );
    }

    #[test]
    fn test_vhost_user_malicious_backend_huge_counts() {
        assert_refused(
            fake_with(|m| {
                (m.code == GET_QUEUE_NUM).then(|| reply(GET_QUEUE_NUM, &u64::MAX.to_le_bytes()))
            }),
            "huge queue count",
        );
        assert_refused(
            fake_with(|m| {
                (m.code == GET_CONFIG).then(|| {
                    let mut b = m.body[..12].to_vec();
                    b[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
                    reply(GET_CONFIG, &b)
                })
            }),
            "huge config size",
        );
        let mut huge_header = reply(GET_FEATURES, &[]);
        if let Action::Send(bytes, _) = &mut huge_header {
            bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        }
        let mut once = Some(huge_header);
        assert_refused(
            fake_with(move |m| {
                if m.code == GET_FEATURES {
                    once.take()
                } else {
                    None
                }
            }),
            "huge size in the header",
        );
    }

    #[test]
    fn test_vhost_user_malicious_backend_fds_on_replies() {
        // A short, unsealed memfd on a reply that carries none, and a flood of descriptors.
        assert_refused(
            fake_with(|m| {
                (m.code == GET_CONFIG).then(|| {
                    let Action::Send(b, _) = honest(&CONFIG, 1, m) else {
                        unreachable!()
                    };
                    Action::Send(b, vec![memfd(1)])
                })
            }),
            "short unsealed memfd on GET_CONFIG",
        );
        assert_refused(
            fake_with(|m| {
                (m.code == GET_FEATURES).then(|| {
                    let Action::Send(b, _) = honest(&CONFIG, 1, m) else {
                        unreachable!()
                    };
                    Action::Send(b, (0..200).map(|_| memfd(0)).collect())
                })
            }),
            "200 descriptors on GET_FEATURES",
        );
    }

    #[test]
    fn test_vhost_user_config_refresh_timeout_and_failure_handle() {
        // Honest for the handshake, silent afterwards.
        let mut n = 0;
        let mut fake = fake_with(move |m| {
            if m.code == GET_CONFIG {
                n += 1;
                if n > 1 {
                    return Some(Action::Nothing);
                }
            }
            None
        });
        let dev = handshake(&mut fake).expect("handshake");
        let _ = dev.shared.config_irq.read();
        let start = Instant::now();
        dev.submit(Job::RefreshConfig);
        while !dev.shared.failed() && start.elapsed() < 10 * T {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            dev.shared.failed(),
            "a request past its deadline fails the device"
        );
        assert!(dev.shared.needs_reset());
        assert!(
            dev.shared.config_irq.read().is_ok(),
            "configuration interrupt raised"
        );
        // Config reads still come from the cache, at once.
        let mut b = [0u8; 2];
        dev.shared.read_config(0, &mut b);
        assert_eq!(b, [1, 2]);
        // Later jobs are dropped without a request.
        let before = fake.codes().len();
        dev.submit(Job::WriteConfig {
            offset: 0,
            data: vec![1],
        });
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(fake.codes().len(), before);
    }

    /// Whether this process has a thread named `name`.
    fn thread_named(name: &str) -> bool {
        std::fs::read_dir("/proc/self/task")
            .expect("tasks")
            .filter_map(Result::ok)
            .any(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
            })
    }

    /// The backend-request thread of a failed device ends (its socket is shut down), though
    /// the device never closes its end; and that of a device the VMM let go of ends too.
    #[test]
    fn test_vhost_user_backend_req_thread_ends_on_failure_and_disconnect() {
        const BACKEND_REQ: u64 = 1 << 5;
        // Thread names are cut at 15 bytes: short device names.
        for (name, fail) in [("bf", true), ("bd", false)] {
            let mut fake = fake_with(|m| {
                (m.code == GET_PROTOCOL_FEATURES)
                    .then(|| reply(m.code, &(PROTOCOL | BACKEND_REQ).to_le_bytes()))
            });
            let frontend = fake.frontend.take().expect("frontend");
            let dev = VhostUserDevice::handshake_with_timeout(name.into(), frontend, 1, T)
                .expect("handshake");
            let thread = format!("{name}-backend-req");
            let start = Instant::now();
            while !thread_named(&thread) && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(thread_named(&thread), "{thread} did not start");
            std::thread::sleep(Duration::from_millis(100));
            assert!(thread_named(&thread), "{thread} ended on its own");
            if fail {
                dev.failure_handle().fail("test");
            } else {
                dev.shared.disconnect();
            }
            let start = Instant::now();
            while thread_named(&thread) && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(!thread_named(&thread), "{thread} still blocked");
            println!(
                "{thread}: ended {:?} after the device's {}",
                start.elapsed(),
                if fail { "failure" } else { "disconnect" }
            );
            drop(dev);
        }
    }

    #[test]
    fn test_vhost_user_failure_handle_shuts_socket_down() {
        let mut fake = fake_with(|_| None);
        let dev = handshake(&mut fake).expect("handshake");
        let h = dev.failure_handle();
        let h2 = h.clone();
        std::thread::spawn(move || h2.fail("the device process died"))
            .join()
            .expect("join");
        assert!(h.is_failed());
        assert!(dev.shared.needs_reset());
        // The socket is shut down: the VMM's next request fails at once.
        let r = dev.shared.socket.lock().expect("lock").as_ref().map(|s| {
            // SAFETY: send(2) of a valid buffer on our descriptor.
            unsafe { libc::send(s.as_raw_fd(), [0u8].as_ptr().cast(), 1, libc::MSG_NOSIGNAL) }
        });
        assert_eq!(r, Some(-1));
    }
}
