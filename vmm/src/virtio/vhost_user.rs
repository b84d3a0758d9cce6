//! The VMM's side of a vhost-user device: the device process (started here or by someone
//! else), the handshake, and handing it guest memory, rings, kick and call eventfds.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use log::{debug, info};
use std::sync::atomic::{AtomicU8, Ordering};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};

use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

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

/// Configuration changes the backend reports (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG): the
/// generation the driver sees moves on and the configuration interrupt fires.
pub struct ConfigChange {
    /// Signalled on a change; bound to the configuration MSI-X vector.
    pub irq: Arc<EventFd>,
    /// `config_generation` as the driver reads it.
    pub generation: AtomicU8,
}

impl VhostUserFrontendReqHandler for ConfigChange {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.irq.write(1)?;
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
    /// A guest ring address is not in guest RAM.
    #[error("queue {0}: ring address {1:#x} (+{2} bytes) is not in guest RAM")]
    RingAddress(usize, u64, usize),
}

fn req<T>(what: &'static str, r: vhost::Result<T>) -> Result<T, VhostUserError> {
    r.map_err(|e| VhostUserError::Request(what, e))
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

/// A connected vhost-user backend.
pub struct VhostUserDevice {
    frontend: Frontend,
    /// Features the backend offers, less vhost-user's own bit.
    pub features: u64,
    protocol: Option<VhostUserProtocolFeatures>,
    /// Queues the backend has.
    pub num_queues: usize,
    /// Where configuration changes land.
    pub config_change: Arc<ConfigChange>,
    /// Name for logs.
    pub name: String,
}

impl VhostUserDevice {
    /// Handshakes over `stream` with a backend that should have `num_queues` queues.
    pub fn handshake(
        name: String,
        frontend: Frontend,
        num_queues: usize,
    ) -> Result<Self, VhostUserError> {
        let mut frontend = frontend;
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
        let config_change = Arc::new(ConfigChange {
            irq: Arc::new(
                EventFd::new(libc::EFD_NONBLOCK)
                    .map_err(|e| VhostUserError::Backend(format!("eventfd: {e}")))?,
            ),
            generation: AtomicU8::new(0),
        });
        if acked.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            let mut handler = FrontendReqHandler::new(config_change.clone())
                .map_err(|e| VhostUserError::Backend(format!("backend channel: {e}")))?;
            handler.set_reply_ack_flag(acked.contains(VhostUserProtocolFeatures::REPLY_ACK));
            req(
                "SET_BACKEND_REQ_FD",
                frontend.set_backend_request_fd(&handler.get_tx_raw_fd()),
            )?;
            let thread_name = format!("{name}-backend-req");
            std::thread::Builder::new()
                .name(thread_name)
                .spawn(move || {
                    if crate::seccomp::apply_or_end_thread(crate::seccomp::ThreadKind::BackendReq) {
                        while handler.handle_request().is_ok() {}
                    }
                })
                .map_err(|e| VhostUserError::Backend(format!("backend channel thread: {e}")))?;
        }
        if !acked.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VhostUserError::Backend(
                "does not offer its configuration space (VHOST_USER_PROTOCOL_F_CONFIG)".into(),
            ));
        }
        let mut queues = num_queues;
        if acked.contains(VhostUserProtocolFeatures::MQ) {
            let max = req("GET_QUEUE_NUM", frontend.get_queue_num())? as usize;
            if max < num_queues {
                return Err(VhostUserError::Backend(format!(
                    "has {max} queues, {num_queues} are needed"
                )));
            }
        } else {
            queues = 1;
        }
        info!("{name}: vhost-user backend connected, features {offered:#x}, protocol {acked:?}");
        Ok(Self {
            frontend,
            features: offered & !F_PROTOCOL_FEATURES,
            protocol,
            num_queues: queues,
            config_change,
            name,
        })
    }

    /// Reads the device configuration space; bytes the backend does not serve read as zero.
    pub fn read_config(&mut self, offset: u32, data: &mut [u8]) {
        data.fill(0);
        let buf = vec![0u8; data.len()];
        match self.frontend.get_config(
            offset,
            data.len() as u32,
            VhostUserConfigFlags::WRITABLE,
            &buf,
        ) {
            Ok((_, payload)) if payload.len() == data.len() => data.copy_from_slice(&payload),
            Ok(_) => debug!("{}: short GET_CONFIG reply at {offset:#x}", self.name),
            Err(e) => debug!("{}: GET_CONFIG at {offset:#x}: {e}", self.name),
        }
    }

    /// Writes the device configuration space.
    pub fn write_config(&mut self, offset: u32, data: &[u8]) {
        if let Err(e) = self
            .frontend
            .set_config(offset, VhostUserConfigFlags::WRITABLE, data)
        {
            debug!("{}: SET_CONFIG at {offset:#x}: {e}", self.name);
        }
    }

    /// Starts the data path: features, guest memory, and each ring with its kick and call
    /// eventfds. `rings[i]` is `None` for queues the driver did not enable.
    pub fn activate(
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
        for (q, ring) in rings.iter().enumerate() {
            let Some(ring) = ring else { continue };
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
            req("SET_VRING_KICK", self.frontend.set_vring_kick(q, &kicks[q]))?;
            req("SET_VRING_CALL", self.frontend.set_vring_call(q, &calls[q]))?;
            if self.protocol.is_some() {
                req("SET_VRING_ENABLE", self.frontend.set_vring_enable(q, true))?;
            }
        }
        Ok(())
    }

    /// Stops the data path (device reset by the driver, or a VM reboot).
    pub fn deactivate(&mut self, rings: &[Option<RingConfig>]) -> Result<(), VhostUserError> {
        for (q, ring) in rings.iter().enumerate() {
            if ring.is_some() {
                if self.protocol.is_some() {
                    req("SET_VRING_ENABLE", self.frontend.set_vring_enable(q, false))?;
                }
                req("GET_VRING_BASE", self.frontend.get_vring_base(q))?;
            }
        }
        if let Some(p) = self.protocol {
            if p.contains(VhostUserProtocolFeatures::RESET_DEVICE) {
                req("RESET_DEVICE", self.frontend.reset_device())?;
            }
        }
        Ok(())
    }
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
