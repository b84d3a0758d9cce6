//! The VMM's side of a vhost-user device: the device process (started here or by someone
//! else), the handshake, and handing it guest memory, rings, kick and call eventfds.
//!
//! After the handshake, the connection belongs to the device's worker thread
//! (`<name>-vhost`): the transport hands it jobs (activate, reset, configuration writes) and
//! never waits for them, so no vCPU ever blocks on a device process. Every request has a
//! deadline ([`REQUEST_TIMEOUT`], socket send and receive timeouts on the stream); a request
//! that misses it, a broken socket or a reply that breaks the protocol fails the device
//! ([`super::FailureHandle`]).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, info, Level};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};

use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceShared, FailureHandle};

/// Deadline of every vhost-user request: the send and the reply each get this long (socket
/// timeouts). A backend that misses it is declared failed.
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
}

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

/// Errors talking to a device process.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The device process could not be started.
    #[error("starting device process {0:?}")]
    Spawn(PathBuf, #[source] std::io::Error),
    /// The device process's jail could not be set up; it did not run.
    #[error("starting device process {0:?} in its jail")]
    Jail(PathBuf, #[source] bulkhead_sandbox::SpawnError),
    /// The disk image could not be opened for the device process.
    #[error("opening {0:?} for the device process")]
    OpenImage(PathBuf, #[source] std::io::Error),
    /// The socket pair could not be created.
    #[error("creating the vhost-user socket pair")]
    SocketPair(#[source] std::io::Error),
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

/// Puts the request deadline on the stream and returns a duplicate of it for shutting it down.
fn arm_socket(frontend: &Frontend, timeout: Duration) -> Result<OwnedFd, VhostUserError> {
    let fd = frontend.as_raw_fd();
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: `tv` is a valid timeval for the duration of the call and its size is passed.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(VhostUserError::Resource(
                "socket deadline",
                std::io::Error::last_os_error(),
            ));
        }
    }
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

/// Sizes to ask for when reading the configuration space: the cache size, then smaller ones
/// for backends that refuse reads past their structure (libvhost-user's blk server).
fn config_read_sizes() -> impl Iterator<Item = u32> {
    [CONFIG_CACHE_SIZE, 128]
        .into_iter()
        .chain((1..32).rev().map(|n| n * 4))
}

/// Starts device program `program` with `args`, connected over a socket pair whose other end
/// it gets as fd 3 (`--socket-fd 3`). It dies with the VMM (PR_SET_PDEATHSIG).
pub fn spawn_device(
    program: &Path,
    args: &[String],
) -> Result<(Child, UnixStream), VhostUserError> {
    let (ours, theirs) = UnixStream::pair().map_err(VhostUserError::SocketPair)?;
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.arg("--socket-fd")
        .arg("3")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (dup2, prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            // dup2 clears close-on-exec on the copy.
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The VMM may have died before PR_SET_PDEATHSIG took effect.
            if libc::getppid() == 1 {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| VhostUserError::Spawn(program.to_path_buf(), e))?;
    drop(theirs);
    Ok((child, ours))
}

/// Where the device program `name` is: beside the running `bulkhead`, else on PATH.
pub fn device_program(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
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
    protocol: Option<VhostUserProtocolFeatures>,
    num_queues: usize,
    shared: Arc<DeviceShared>,
    /// Size of the configuration space the backend serves.
    config_size: u32,
    /// Whether the data path is (perhaps partly) set up.
    active: bool,
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
        let mut frontend = frontend;
        let socket = arm_socket(&frontend, timeout)?;
        req("SET_OWNER", frontend.set_owner())?;
        let offered = req("GET_FEATURES", frontend.get_features())?;
        let mut protocol = None;
        if offered & F_PROTOCOL_FEATURES != 0 {
            let theirs = req("GET_PROTOCOL_FEATURES", frontend.get_protocol_features())?;
            let acked = theirs & wanted_protocol_features();
            req(
                "SET_PROTOCOL_FEATURES",
                frontend.set_protocol_features(acked),
            )?;
            protocol = Some(acked);
        }
        let acked = protocol.unwrap_or_else(VhostUserProtocolFeatures::empty);
        if !acked.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VhostUserError::Backend(
                "does not offer its configuration space (VHOST_USER_PROTOCOL_F_CONFIG)".into(),
            ));
        }
        let mut queues = num_queues;
        if acked.contains(VhostUserProtocolFeatures::MQ) {
            let max = req("GET_QUEUE_NUM", frontend.get_queue_num())?;
            if max < num_queues as u64 {
                return Err(VhostUserError::Backend(format!(
                    "has {max} queues, {num_queues} are needed"
                )));
            }
        } else {
            queues = 1;
        }
        let config_irq = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| VhostUserError::Resource("configuration eventfd", e))?,
        );
        let shared = Arc::new(DeviceShared::new(name.clone(), config_irq, Some(socket)));
        let (jobs, inbox) = channel();
        let mut conn = Connection {
            frontend,
            protocol,
            num_queues: queues,
            shared: shared.clone(),
            config_size: CONFIG_CACHE_SIZE,
            active: false,
        };
        // The first read of the configuration space: the guest reads only the cache.
        let config = conn.read_config_sized()?;
        shared.set_config(config, false);
        if acked.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            let mut handler =
                FrontendReqHandler::new(Arc::new(ConfigChange { jobs: jobs.clone() }))
                    .map_err(|e| VhostUserError::Backend(format!("backend channel: {e}")))?;
            handler.set_reply_ack_flag(acked.contains(VhostUserProtocolFeatures::REPLY_ACK));
            req(
                "SET_BACKEND_REQ_FD",
                conn.frontend
                    .set_backend_request_fd(&handler.get_tx_raw_fd()),
            )?;
            std::thread::Builder::new()
                .name(format!("{name}-backend-req"))
                .spawn(move || {
                    if crate::seccomp::apply_or_end_thread(crate::seccomp::ThreadKind::BackendReq) {
                        while handler.handle_request().is_ok() {}
                    }
                })
                .map_err(|e| VhostUserError::Resource("backend request thread", e))?;
        }
        std::thread::Builder::new()
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

    /// Queues `job` for the worker; never waits. A worker that is gone fails the device.
    pub(crate) fn submit(&self, job: Job) {
        if self.jobs.send(job).is_err() {
            self.shared.fail("its worker thread has ended");
        }
    }

    /// A handle that fails this device from anywhere.
    pub fn failure_handle(&self) -> FailureHandle {
        FailureHandle(self.shared.clone())
    }
}

impl Connection {
    /// Runs jobs until the transport is gone (the device was unplugged): then the frontend
    /// is dropped and the socket closed, which ends an orderly device process.
    fn run(&mut self, inbox: Receiver<Job>) {
        while let Ok(job) = inbox.recv() {
            self.run_job(job);
        }
        debug!("{}: worker ends", self.shared.name);
    }

    fn run_job(&mut self, job: Job) {
        let name = self.shared.name.clone();
        match job {
            Job::Activate { .. } | Job::WriteConfig { .. } | Job::RefreshConfig
                if self.shared.failed() => {}
            Job::Activate {
                memory,
                features,
                rings,
                kicks,
                calls,
            } => {
                if self.active {
                    // Activation is idempotent: a second one starts from a clean backend.
                    if let Err(e) = self.teardown() {
                        return self.failed_on(&e);
                    }
                }
                self.active = true;
                match self.activate(&memory, features, &rings, &kicks, &calls) {
                    Ok(()) => info!(
                        "{name}: activated, {} of {} queues, features {features:#x}",
                        rings.iter().flatten().count(),
                        rings.len()
                    ),
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
                if self.active && !self.shared.failed() {
                    if let Err(e) = self.teardown() {
                        self.failed_on(&e);
                    }
                }
                self.shared.reset_done();
            }
            Job::WriteConfig { offset, data } => {
                let r = req(
                    "SET_CONFIG",
                    self.frontend
                        .set_config(offset, VhostUserConfigFlags::WRITABLE, &data),
                );
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
        self.active = false;
        self.shared.fail(&error_chain(e));
    }

    fn read_config(&mut self, size: u32) -> Result<Vec<u8>, VhostUserError> {
        let buf = vec![0u8; size as usize];
        let (_, payload) = req(
            "GET_CONFIG",
            self.frontend
                .get_config(0, size, VhostUserConfigFlags::WRITABLE, &buf),
        )?;
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
    ) -> Result<(), VhostUserError> {
        let f = features
            | if self.protocol.is_some() {
                F_PROTOCOL_FEATURES
            } else {
                0
            };
        req("SET_FEATURES", self.frontend.set_features(f))?;
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
        req("SET_MEM_TABLE", self.frontend.set_mem_table(&regions))?;
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
            req("SET_VRING_NUM", self.frontend.set_vring_num(q, ring.size))?;
            req("SET_VRING_ADDR", self.frontend.set_vring_addr(q, &config))?;
            req("SET_VRING_BASE", self.frontend.set_vring_base(q, 0))?;
            req("SET_VRING_KICK", self.frontend.set_vring_kick(q, kick))?;
            req("SET_VRING_CALL", self.frontend.set_vring_call(q, call))?;
            if self.protocol.is_some() {
                req("SET_VRING_ENABLE", self.frontend.set_vring_enable(q, true))?;
            }
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
            return req("RESET_DEVICE", self.frontend.reset_device());
        }
        for q in 0..self.num_queues {
            if self.protocol.is_some() {
                match req("SET_VRING_ENABLE", self.frontend.set_vring_enable(q, false)) {
                    Err(e) if !is_refusal(&e) => return Err(e),
                    _ => {}
                }
            }
            match req("GET_VRING_BASE", self.frontend.get_vring_base(q)) {
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

/// A device process the VMM started.
pub enum DeviceProcess {
    /// Started without a jail (`--sandbox off`).
    Plain(Child),
    /// Started in its jail.
    Jailed(bulkhead_sandbox::JailedChild),
}

impl DeviceProcess {
    /// Its pid, as the VMM sees it.
    pub fn id(&self) -> u32 {
        match self {
            Self::Plain(c) => c.id(),
            Self::Jailed(c) => c.id(),
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) -> std::io::Result<()> {
        match self {
            Self::Plain(c) => c.kill(),
            Self::Jailed(c) => c.kill(),
        }
    }

    /// Waits for it to end.
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match self {
            Self::Plain(c) => c.wait(),
            Self::Jailed(c) => c.wait(),
        }
    }
}

/// Starts a device program in the jail `jail` describes (the jail passes the program its
/// socket end at fd 3 and whatever else it lists).
pub fn spawn_jailed(
    program: &Path,
    args: &[String],
    jail: bulkhead_sandbox::Jail,
) -> Result<DeviceProcess, VhostUserError> {
    jail.spawn(program, args)
        .map(DeviceProcess::Jailed)
        .map_err(|e| VhostUserError::Jail(program.to_path_buf(), e))
}

/// Watches a device process the VMM started: logs how it ended, and never lets the VM
/// depend on it being alive.
pub fn watch_device(name: String, mut child: DeviceProcess) -> Option<std::thread::JoinHandle<()>> {
    let pid = child.id();
    let spawned = std::thread::Builder::new()
        .name(format!("watch-{name}"))
        .spawn(move || {
            if !crate::seccomp::apply_or_end_thread(crate::seccomp::ThreadKind::DeviceWatcher) {
                return;
            }
            match child.wait() {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    match status.signal() {
                        Some(sig) => log::error!(
                            "{name}: device process {pid} was killed by signal {sig}{}; the VM goes on without it",
                            if sig == libc::SIGSYS { " (seccomp)" } else { "" }
                        ),
                        None if status.success() => {
                            log::info!("{name}: device process {pid} exited")
                        }
                        None => log::warn!("{name}: device process {pid} exited with {status}"),
                    }
                }
                Err(e) => log::warn!("{name}: waiting for device process {pid}: {e}"),
            }
        });
    spawned
        .map_err(|e| log::warn!("cannot watch device process {pid}: {e}"))
        .ok()
}

/// Connects to a backend someone else started, listening at `path`.
pub fn connect(path: &Path, max_queues: u64) -> Result<Frontend, VhostUserError> {
    Frontend::connect(path, max_queues).map_err(|e| VhostUserError::Connect(path.to_path_buf(), e))
}
