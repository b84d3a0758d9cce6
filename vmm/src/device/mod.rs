//! The device manager: devices are data ([`DeviceSpec`]: an id, a kind, a PCI slot, a backend
//! and a jail policy), and one code path starts, connects, handshakes, fronts with virtio-pci
//! and tears down every kind. Adding a device kind adds a [`DeviceKind`] variant (its program,
//! virtio type, PCI class and jail policy) and a crate under `devices/`; nothing else here.
//! The VMM links no device crate. See `docs/devices.md`.

pub mod cgroup;
pub mod control;
pub mod lock;
pub mod monitor;
pub mod restart;
pub mod spawner;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};
use vm_memory::GuestMemoryMmap;

use crate::config::{
    BalloonConfig, ConsoleConfig, DiskBackend, DiskConfig, NetBackend, NetConfig, VmConfig,
};
use crate::console::{ConsoleError, ConsoleHost};
use crate::mmio::MmioBus;
use crate::tap::TapError;
use crate::virtio::pci::{VirtioPci, VirtioPciError};
use crate::virtio::vhost_user::{VhostUserDevice, VhostUserError};
use control::ControlChannel;
use lock::LockError;
use monitor::Monitor;
use restart::{Respawn, RestartMode, RestartPolicy};
use spawner::{CgroupRequest, SpawnRequest, Spawner, SpawnerError};

/// Descriptor numbers of the device-process contract.
pub const LOG_FD: i32 = 2;
/// The connected vhost-user socket (`--socket-fd 3`).
pub const SOCKET_FD: i32 = 3;
/// The control channel (`--control-fd 4`).
pub const CONTROL_FD: i32 = 4;
/// The first kind-specific descriptor (block: the image, `--image-fd 5`).
pub const FIRST_KIND_FD: i32 = 5;

/// How long shutdown waits for device processes to exit after their disconnect before the
/// spawner kills them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// How long shutdown waits for the spawner to kill, reap and end.
pub const SPAWNER_EXIT_WAIT: Duration = Duration::from_secs(2);

/// Default own memory budget of a device process (RLIMIT_DATA, and memory.max above guest
/// RAM), overridable per device with `memory_max=`.
pub const DEFAULT_MEMORY_MAX: u64 = 256 << 20;
/// oom_score_adj of device processes: the OOM killer picks a runaway device before the VMM.
pub const DEVICE_OOM_SCORE_ADJ: i32 = 800;

/// virtio-net features that need the control queue: CTRL_VQ (17) and CTRL_GUEST_OFFLOADS (2),
/// CTRL_RX (18), CTRL_VLAN (19), GUEST_ANNOUNCE (21), MQ (22), CTRL_MAC_ADDR (23). Taken from
/// what a `socket=` backend offers, whose transport has no control queue (Cloud Hypervisor's
/// and bulkhead-net both offer CTRL_VQ; the guest would look for a queue that is not there).
const NET_NEEDS_CTRL_VQ: u64 = 1 << 17 | 1 << 2 | 1 << 18 | 1 << 19 | 1 << 21 | 1 << 22 | 1 << 23;

/// What of the features a backend offers its transport passes on to the guest: all of them,
/// except for a network device whose transport has no control queue (an even queue count:
/// pairs only, an external backend), which must not offer one nor what needs one.
fn features_for_guest(kind: DeviceKind, queues: u16, offered: u64) -> u64 {
    if kind == DeviceKind::Net && queues.is_multiple_of(2) {
        offered & !NET_NEEDS_CTRL_VQ
    } else {
        offered
    }
}

/// A kind of device process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-blk, served by `bulkhead-block`.
    Block,
    /// virtio-net, served by `bulkhead-net` on a tap.
    Net,
    /// virtio-console, served by `bulkhead-console` on a host end the VMM opened.
    Console,
    /// virtio-balloon, served by `bulkhead-balloon` on the guest-RAM files of the memory
    /// table.
    Balloon,
}

impl DeviceKind {
    /// Every kind.
    pub const ALL: [DeviceKind; 4] = [
        DeviceKind::Block,
        DeviceKind::Net,
        DeviceKind::Console,
        DeviceKind::Balloon,
    ];

    /// Its short name: the program is `bulkhead-<name>`.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Block => "block",
            DeviceKind::Net => "net",
            DeviceKind::Console => "console",
            DeviceKind::Balloon => "balloon",
        }
    }

    /// The program's file name, also argv[0] and the process's comm.
    pub fn program_name(self) -> String {
        format!("bulkhead-{}", self.name())
    }

    /// The virtio device type.
    pub fn virtio_type(self) -> u16 {
        match self {
            DeviceKind::Block => 2,
            DeviceKind::Net => 1,
            DeviceKind::Console => 3,
            DeviceKind::Balloon => 5,
        }
    }

    /// The PCI class code.
    pub fn pci_class(self) -> u32 {
        match self {
            // Mass storage, other.
            DeviceKind::Block => 0x01_80_00,
            // Network controller, Ethernet.
            DeviceKind::Net => 0x02_00_00,
            // Simple communication controller, other.
            DeviceKind::Console => 0x07_80_00,
            // Memory controller, other.
            DeviceKind::Balloon => 0x05_80_00,
        }
    }

    /// The kind's jail policy for a device with `queues` queues.
    pub fn policy(self, queues: u16, sandbox: bool) -> JailPolicy {
        let q = u64::from(queues.max(1));
        match self {
            // Descriptors: 64 + 8 per queue (kick, call and error eventfds, an io_uring and an
            // epoll per queue, guest memory regions); tasks: 64 + 4 per queue (a worker per
            // queue, io_uring's kernel workers).
            DeviceKind::Block => JailPolicy {
                nofile: 64 + 8 * q,
                nproc: 64 + 4 * q,
                memory_max: DEFAULT_MEMORY_MAX,
                pids_max: 64 + 4 * q,
                oom_score_adj: DEVICE_OOM_SCORE_ADJ,
                jail: sandbox,
                seccomp: sandbox,
                landlock: sandbox,
                restart: RestartPolicy::default(),
            },
            // Descriptors: 64 + 8 per queue (its tap queue, kick, call and error eventfds, an
            // epoll per worker, guest memory regions); tasks: 64 + 2 per queue pair (a worker
            // per pair, the rate limiters' timers).
            DeviceKind::Net => {
                let pairs = q / 2;
                JailPolicy {
                    nofile: 64 + 8 * q,
                    nproc: 64 + 2 * pairs,
                    memory_max: DEFAULT_MEMORY_MAX,
                    pids_max: 64 + 2 * pairs,
                    oom_score_adj: DEVICE_OOM_SCORE_ADJ,
                    jail: sandbox,
                    seccomp: sandbox,
                    landlock: sandbox,
                    restart: RestartPolicy::default(),
                }
            }
            // Descriptors: 64 (two queues' kick, call and error eventfds, its worker's epoll and
            // eventfds, guest memory regions, its host end and one socket client); tasks: 64
            // (the runtime's threads and the console worker). As devices/console/src/jail.rs.
            DeviceKind::Console => JailPolicy {
                nofile: 64,
                nproc: 64,
                memory_max: DEFAULT_MEMORY_MAX,
                pids_max: 64,
                oom_score_adj: DEVICE_OOM_SCORE_ADJ,
                jail: sandbox,
                seccomp: sandbox,
                landlock: sandbox,
                restart: RestartPolicy::default(),
            },
            // Descriptors: 64 + 8 per queue (kick, call and error eventfds, guest memory
            // regions, the stats timer's epoll and eventfd); tasks: 64 (the runtime's threads
            // and the stats timer).
            DeviceKind::Balloon => JailPolicy {
                nofile: 64 + 8 * q,
                nproc: 64,
                memory_max: DEFAULT_MEMORY_MAX,
                pids_max: 64,
                oom_score_adj: DEVICE_OOM_SCORE_ADJ,
                jail: sandbox,
                seccomp: sandbox,
                landlock: sandbox,
                restart: RestartPolicy::default(),
            },
        }
    }
}

/// How a device process is confined and bounded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailPolicy {
    /// RLIMIT_NOFILE.
    pub nofile: u64,
    /// RLIMIT_NPROC.
    pub nproc: u64,
    /// The device's own memory budget: RLIMIT_DATA, and memory.max = this + guest RAM.
    pub memory_max: u64,
    /// pids.max of its cgroup leaf.
    pub pids_max: u64,
    /// oom_score_adj.
    pub oom_score_adj: i32,
    /// Namespaces, empty root, no capabilities (off with `--sandbox off`).
    pub jail: bool,
    /// The device installs its seccomp filter (`--seccomp on|off`).
    pub seccomp: bool,
    /// The device applies landlock (`--landlock on|off`).
    pub landlock: bool,
    /// Whether, how often and how soon its process is started again when it dies
    /// (`restart=`, `restart_max=`, `restart_backoff_ms=`, `restart_on_violation=`).
    pub restart: RestartPolicy,
}

/// A file the VMM opens (and locks) for a device; handed over from descriptor 5 on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceFile {
    /// Its path.
    pub path: PathBuf,
    /// Opened read-only, with a read lock (else read-write, with a write lock).
    pub readonly: bool,
}

/// The tap queues the VMM opens for a net device, handed over from descriptor 5 on, one per
/// queue pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TapQueues {
    /// Open (creating it if needed) tap `name` and set up its host side.
    Open {
        /// The interface.
        name: String,
        /// Queue pairs: one queue each (`IFF_MULTI_QUEUE` when more than one).
        pairs: u16,
        /// Host address and netmask to set.
        addr: Option<(std::net::Ipv4Addr, std::net::Ipv4Addr)>,
        /// MTU to set.
        mtu: Option<u16>,
    },
    /// Copies of the tap queue descriptors the VMM was handed (`fd=`).
    Fds(Vec<std::os::fd::RawFd>),
}

/// Who serves a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A program the VMM starts (through the spawner) and jails.
    Spawn {
        /// Files the VMM opens for it, at descriptors 5, 6, ...
        files: Vec<DeviceFile>,
        /// Its kind-specific options (the common ones are added here).
        args: Vec<String>,
    },
    /// A program the VMM starts (through the spawner) and jails, handed tap queues.
    SpawnOnTap {
        /// The tap queues it gets, at descriptors 5, 6, ...
        tap: TapQueues,
        /// Its kind-specific options (the common ones are added here).
        args: Vec<String>,
    },
    /// A program the VMM starts (through the spawner) and jails, handed the console's host
    /// end.
    SpawnOnConsole {
        /// The host end it gets, at descriptors 5, 6.
        host: ConsoleHost,
        /// Its kind-specific options (the common ones are added here).
        args: Vec<String>,
    },
    /// A vhost-user backend someone else started, listening at this path.
    Socket(PathBuf),
}

/// A device, as data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Its name in logs and its cgroup leaf's name (`disk0`, or `id=`).
    pub id: String,
    /// What it is.
    pub kind: DeviceKind,
    /// The PCIe slot (root port) it sits in.
    pub slot: usize,
    /// Number of queues.
    pub queues: u16,
    /// Largest queue size.
    pub queue_size: u16,
    /// Who serves it.
    pub backend: Backend,
    /// How its process is confined.
    pub policy: JailPolicy,
}

/// The devices a configuration asks for: the disks, then the network interfaces, then the
/// console, then the balloon, each in the next slot.
pub fn specs(config: &VmConfig) -> Vec<DeviceSpec> {
    let mut specs = disk_specs(config);
    let first = specs.len();
    specs.extend(
        config
            .nets
            .iter()
            .enumerate()
            .map(|(i, net)| net_spec(net, i, first + i, config.sandbox)),
    );
    let slot = specs.len();
    specs.extend(console_spec(&config.console, slot, config.sandbox));
    if let Some(balloon) = &config.balloon {
        let slot = specs.len();
        specs.push(balloon_spec(balloon, slot, config.sandbox));
    }
    specs
}

/// The balloon's device id (one per VM, as in Cloud Hypervisor).
pub const BALLOON_ID: &str = "balloon0";

/// The queues of the balloon: inflate and deflate, then stats and reporting when asked for
/// (bulkhead-balloon's `BalloonParams::num_queues`).
pub fn balloon_queues(balloon: &BalloonConfig) -> u16 {
    2 + u16::from(balloon.stats_polling_interval_s > 0) + u16::from(balloon.free_page_reporting)
}

/// The `bulkhead-balloon` options of `balloon`.
fn balloon_args(balloon: &BalloonConfig) -> Vec<String> {
    let mut args = vec![
        "--size".to_string(),
        balloon.size.to_string(),
        "--stats-polling-interval-s".to_string(),
        balloon.stats_polling_interval_s.to_string(),
        "--queue-size".to_string(),
        BALLOON_QUEUE_SIZE.to_string(),
    ];
    if balloon.deflate_on_oom {
        args.push("--deflate-on-oom".into());
    }
    if balloon.free_page_reporting {
        args.push("--free-page-reporting".into());
    }
    args
}

/// The balloon's queue size (Linux's balloon driver sends at most 256 page frames per
/// request and 32 runs per report).
pub const BALLOON_QUEUE_SIZE: u16 = 128;

/// The spec of the balloon, in `slot`. It is handed no file: guest RAM reaches it in the
/// vhost-user memory table.
pub fn balloon_spec(balloon: &BalloonConfig, slot: usize, sandbox: bool) -> DeviceSpec {
    let queues = balloon_queues(balloon);
    DeviceSpec {
        id: BALLOON_ID.to_string(),
        kind: DeviceKind::Balloon,
        slot,
        queues,
        queue_size: BALLOON_QUEUE_SIZE,
        backend: Backend::Spawn {
            files: Vec::new(),
            args: balloon_args(balloon),
        },
        policy: DeviceKind::Balloon.policy(queues, sandbox),
    }
}

/// The virtio console's device id (one per VM).
pub const CONSOLE_ID: &str = "console";

/// Queue size of the console's two queues.
pub const CONSOLE_QUEUE_SIZE: u16 = 256;

/// The spec of the virtio console, `console`, in `slot` (none for `--console off`).
pub fn console_spec(console: &ConsoleConfig, slot: usize, sandbox: bool) -> Option<DeviceSpec> {
    let host = match console {
        ConsoleConfig::Off => return None,
        ConsoleConfig::Tty => ConsoleHost::Tty,
        ConsoleConfig::Pty => ConsoleHost::Pty,
        ConsoleConfig::File(p) => ConsoleHost::File(p.clone()),
        ConsoleConfig::Socket(p) => ConsoleHost::Socket(p.clone()),
    };
    let mut args = host.args(FIRST_KIND_FD);
    // The console's size follows the VMM's terminal with `tty`; 80x24 until resized otherwise.
    let (cols, rows) = match host {
        ConsoleHost::Tty => crate::console::terminal_size().unwrap_or((80, 24)),
        _ => (80, 24),
    };
    args.extend([
        "--cols".to_string(),
        cols.to_string(),
        "--rows".to_string(),
        rows.to_string(),
        "--queue-size".to_string(),
        CONSOLE_QUEUE_SIZE.to_string(),
    ]);
    Some(DeviceSpec {
        id: CONSOLE_ID.into(),
        kind: DeviceKind::Console,
        slot,
        queues: 2,
        queue_size: CONSOLE_QUEUE_SIZE,
        backend: Backend::SpawnOnConsole { host, args },
        policy: DeviceKind::Console.policy(2, sandbox),
    })
}

/// The `bulkhead-net` options of interface `net` (its tap queues at 5, 6, ...).
fn net_args(net: &NetConfig) -> Vec<String> {
    let pairs = net.queue_pairs();
    let mut args = Vec::new();
    for i in 0..i32::from(pairs) {
        args.extend(["--tap-fd".to_string(), (FIRST_KIND_FD + i).to_string()]);
    }
    args.extend([
        "--mac".to_string(),
        crate::config::format_mac(&net.mac),
        "--queue-pairs".to_string(),
        pairs.to_string(),
        "--queue-size".to_string(),
        net.queue_size.to_string(),
    ]);
    if let Some(mtu) = net.mtu {
        args.extend(["--mtu".to_string(), mtu.to_string()]);
    }
    for (dir, limit) in [("rx", &net.rx_limit), ("tx", &net.tx_limit)] {
        for (option, value) in limit {
            args.push(format!("--{dir}-{}", option.replace('_', "-")));
            args.push(value.to_string());
        }
    }
    if let Some(fault) = &net.fault {
        args.extend(["--fault".to_string(), fault.clone()]);
    }
    args
}

/// The spec of network interface `net`, the `index`th, in `slot`.
pub fn net_spec(net: &NetConfig, index: usize, slot: usize, sandbox: bool) -> DeviceSpec {
    let pairs = net.queue_pairs();
    let (backend, queues) = match &net.backend {
        NetBackend::Tap { name, addr } => (
            Backend::SpawnOnTap {
                tap: TapQueues::Open {
                    name: name.clone(),
                    pairs,
                    addr: *addr,
                    mtu: net.mtu,
                },
                args: net_args(net),
            },
            // rx and tx per pair, then the control queue, which bulkhead-net serves.
            2 * pairs + 1,
        ),
        NetBackend::Fds { fds, .. } => (
            Backend::SpawnOnTap {
                tap: TapQueues::Fds(fds.clone()),
                args: net_args(net),
            },
            2 * pairs + 1,
        ),
        // An external backend: the queue pairs only (Cloud Hypervisor's vhost_user_net, for
        // one, has no control queue).
        NetBackend::Socket(path) => (Backend::Socket(path.clone()), 2 * pairs),
    };
    let mut policy = DeviceKind::Net.policy(queues, sandbox);
    policy.restart = net.restart;
    DeviceSpec {
        id: net.id.clone().unwrap_or_else(|| format!("net{index}")),
        kind: DeviceKind::Net,
        slot,
        queues,
        queue_size: net.queue_size,
        backend,
        policy,
    }
}

/// The `bulkhead-block` options for `disk` (none for a disk served on a socket).
fn block_args(disk: &DiskConfig) -> Vec<String> {
    let DiskBackend::Process {
        path,
        readonly,
        serial,
        direct,
        rate_limit,
        poll_us,
    } = &disk.backend
    else {
        return Vec::new();
    };
    let mut args = vec![
        "--path".to_string(),
        path.display().to_string(),
        "--image-fd".to_string(),
        FIRST_KIND_FD.to_string(),
        "--num-queues".to_string(),
        disk.num_queues.to_string(),
        "--queue-size".to_string(),
        disk.queue_size.to_string(),
    ];
    if *readonly {
        args.push("--readonly".into());
    }
    if *direct {
        args.push("--direct".into());
    }
    if let Some(s) = serial {
        args.extend(["--serial".to_string(), s.clone()]);
    }
    for (option, value) in rate_limit {
        args.push(format!("--{}", option.replace('_', "-")));
        args.push(value.to_string());
    }
    if *poll_us > 0 {
        args.extend(["--poll-us".to_string(), poll_us.to_string()]);
    }
    if let Some(fault) = &disk.fault {
        args.extend(["--fault".to_string(), fault.clone()]);
    }
    args
}

/// The specs of the disks, in slots 0, 1, ...
fn disk_specs(config: &VmConfig) -> Vec<DeviceSpec> {
    config
        .disks
        .iter()
        .enumerate()
        .map(|(index, disk)| disk_spec(disk, index, index, config.sandbox))
        .collect()
}

/// The spec of disk `disk`, the `index`th (named `disk<index>` without `id=`), in `slot`.
pub fn disk_spec(disk: &DiskConfig, index: usize, slot: usize, sandbox: bool) -> DeviceSpec {
    let mut policy = DeviceKind::Block.policy(disk.num_queues, sandbox);
    if let Some(m) = disk.memory_max {
        policy.memory_max = m;
    }
    if let Some(p) = disk.pids_max {
        policy.pids_max = p;
    }
    policy.restart = disk.restart;
    let backend = match &disk.backend {
        DiskBackend::Process { path, readonly, .. } => {
            let args = block_args(disk);
            Backend::Spawn {
                files: vec![DeviceFile {
                    path: path.clone(),
                    readonly: *readonly,
                }],
                args,
            }
        }
        DiskBackend::Socket(path) => Backend::Socket(path.clone()),
    };
    DeviceSpec {
        id: disk.id.clone().unwrap_or_else(|| format!("disk{index}")),
        kind: DeviceKind::Block,
        slot,
        queues: disk.num_queues,
        queue_size: disk.queue_size,
        backend,
        policy,
    }
}

/// Errors setting up devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A file for a device could not be opened or locked.
    #[error("{id}: {}", path.display())]
    File {
        /// The device.
        id: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: LockError,
    },
    /// A socket, pipe or the monitor could not be set up.
    #[error("{0}: setting up its descriptors")]
    Descriptors(String, #[source] std::io::Error),
    /// The spawner could not start the device process.
    #[error("{0}: starting its device process")]
    Spawn(String, #[source] SpawnerError),
    /// Connecting to an external backend failed.
    #[error("{0}: connecting to the vhost-user backend at {1:?}")]
    Connect(String, PathBuf, #[source] std::io::Error),
    /// The vhost-user handshake failed.
    #[error("{0}: setting up its device process")]
    Handshake(String, #[source] VhostUserError),
    /// The transport could not be built.
    #[error("{0}: creating its virtio-pci function")]
    Transport(String, #[source] VirtioPciError),
    /// A tap could not be opened, checked or configured.
    #[error("{0}")]
    Tap(String, #[source] TapError),
    /// The console's host end could not be opened.
    #[error("{0}")]
    Console(String, #[source] ConsoleError),
}

impl DeviceError {
    /// Whether the error is the user's to fix (exit status 2: nothing was started).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            DeviceError::File {
                source: LockError::InUse(_) | LockError::Open(_),
                ..
            } | DeviceError::Tap(..)
                | DeviceError::Console(..)
        )
    }
}

/// What the device manager needs from the VM.
pub struct DeviceEnv<'a> {
    /// Guest RAM, shared with the devices.
    pub memory: &'a GuestMemoryMmap,
    /// The MMIO bus the transports' BARs go on.
    pub bus: &'a Arc<MmioBus>,
    /// The spawner.
    pub spawner: &'a Arc<Spawner>,
    /// The VM's cgroup group, if any.
    pub cgroup: Option<&'a Path>,
    /// Host ids for device processes.
    pub device_ids: Option<(u32, u32)>,
    /// Bytes of guest RAM.
    pub ram_size: u64,
}

/// A running device process the VMM started.
#[derive(Debug)]
pub struct DeviceProcess {
    /// Its id.
    pub id: String,
    /// Its pid.
    pub pid: u32,
    /// Its control channel.
    pub control: Arc<ControlChannel>,
}

/// The VM's devices: their processes, and the thread watching them.
#[derive(Debug)]
pub struct Devices {
    /// Processes started, in spec order.
    pub processes: Vec<DeviceProcess>,
    monitor: Arc<Monitor>,
    spawner: Arc<Spawner>,
    /// The configuration re-read of each device whose configuration the VMM changes on its
    /// control channel (the console's size, the balloon's target), by device id: after the
    /// device took the change, the transport re-reads the configuration space and raises the
    /// configuration interrupt. One mechanism for both (`ConfigRefresh`).
    config_refresh: HashMap<String, crate::virtio::vhost_user::ConfigRefresh>,
}

/// Why a balloon request failed.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// The VM has no `--balloon`.
    #[error("the VM has no balloon (start it with --balloon size=0)")]
    NoBalloon,
    /// The device refused the request (its reason says what to change).
    #[error("the balloon refused: {0}")]
    Refused(String),
    /// The device's control channel failed.
    #[error("the balloon device did not answer")]
    Control(#[source] control::ControlError),
}

/// A pipe, close-on-exec: (read, write).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the local array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// What the spawner may run: the program of every device kind, jailed when `sandbox`.
pub fn spawner_policy(sandbox: bool) -> spawner::SpawnerPolicy {
    spawner::SpawnerPolicy {
        programs: DeviceKind::ALL.iter().map(|k| program(*k)).collect(),
        require_jail: sandbox,
    }
}

/// The program of `kind`: beside the running `bulkhead`, else on PATH.
pub fn program(kind: DeviceKind) -> PathBuf {
    let name = kind.program_name();
    let beside = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(&name)))
        .filter(|p| p.exists());
    if let Some(p) = beside {
        return p;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(&name))
                .find(|p| p.exists())
        })
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Waits up to `grace` for a removed device's process `pid` to exit after its disconnect,
/// then kills it; returns when it has ended (the spawner reaps it and removes its cgroup
/// leaf), or after a further bounded wait. True if it exited by itself.
pub fn end_process(monitor: &Monitor, pid: u32, grace: Duration) -> bool {
    if monitor.wait_ended(pid, grace) {
        return true;
    }
    warn!("device process {pid} did not exit within {grace:?} of its removal; killing it");
    monitor.kill(pid);
    monitor.wait_ended(pid, SPAWNER_EXIT_WAIT);
    false
}

/// SIGKILL through a pidfd.
fn kill_pidfd(pidfd: &OwnedFd) {
    // SAFETY: pidfd_send_signal with our pidfd, no siginfo, no flags.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
}

/// Where and how device processes are started.
pub struct SpawnEnv<'a> {
    /// The spawner.
    pub spawner: &'a Spawner,
    /// The VM's cgroup group, if any.
    pub cgroup: Option<&'a Path>,
    /// The process's leaf in it (default: the device id).
    pub cgroup_leaf: Option<&'a str>,
    /// Host ids for device processes.
    pub device_ids: Option<(u32, u32)>,
    /// Bytes of guest RAM (added to memory.max).
    pub ram_size: u64,
}

impl DeviceEnv<'_> {
    fn spawn_env(&self) -> SpawnEnv<'_> {
        SpawnEnv {
            spawner: self.spawner,
            cgroup: self.cgroup,
            cgroup_leaf: None,
            device_ids: self.device_ids,
            ram_size: self.ram_size,
        }
    }
}

/// A device process just started: the VMM's ends of its descriptors.
#[derive(Debug)]
pub struct StartedProcess {
    /// Its pid.
    pub pid: u32,
    /// A pidfd of it.
    pub pidfd: OwnedFd,
    /// The VMM's end of the vhost-user socket.
    pub stream: UnixStream,
    /// The VMM's end of the control channel.
    pub control: ControlChannel,
    /// The read end of its stderr.
    pub log: OwnedFd,
}

/// Opens and locks the files `spec`'s backend lists, or opens its tap queues and sets up the
/// tap's host side (none for a socket backend).
pub fn open_files(spec: &DeviceSpec) -> Result<Vec<File>, DeviceError> {
    let mut files = Vec::new();
    if let Backend::SpawnOnConsole { host, .. } = &spec.backend {
        return crate::console::open(host, &spec.id)
            .map_err(|e| DeviceError::Console(spec.id.clone(), e));
    }
    if let Backend::SpawnOnTap { tap, .. } = &spec.backend {
        let tap_error = |e| DeviceError::Tap(spec.id.clone(), e);
        return match tap {
            TapQueues::Open {
                name,
                pairs,
                addr,
                mtu,
            } => {
                let queues = crate::tap::open_queues(name, *pairs).map_err(tap_error)?;
                crate::tap::configure_host(name, *addr, *mtu).map_err(tap_error)?;
                info!(
                    "{}: tap {name}, {pairs} queue(s){}",
                    spec.id,
                    addr.map(|(ip, mask)| format!(", host side {ip}/{mask}"))
                        .unwrap_or_default()
                );
                Ok(queues)
            }
            TapQueues::Fds(fds) => crate::tap::dup_queues(fds).map_err(tap_error),
        };
    }
    if let Backend::Spawn { files: wanted, .. } = &spec.backend {
        for f in wanted {
            let file =
                lock::open_locked(&f.path, f.readonly).map_err(|source| DeviceError::File {
                    id: spec.id.clone(),
                    path: f.path.clone(),
                    source,
                })?;
            files.push(file);
        }
    }
    Ok(files)
}

/// Starts the process of spawned device `spec` through the spawner, handing it its log pipe,
/// vhost-user socket, control channel and `files` (descriptors 2, 3, 4, 5...). The one spawn
/// path of every device kind (the VMM's and the spawn benchmark's).
pub fn spawn_process(
    spec: &DeviceSpec,
    files: Vec<File>,
    env: &SpawnEnv<'_>,
) -> Result<StartedProcess, DeviceError> {
    spawn_program(spec, &program(spec.kind), files, env)
}

/// [`spawn_process`] with the program already resolved (a restart: the device monitor's
/// filter reads no directory).
pub(crate) fn spawn_program(
    spec: &DeviceSpec,
    program: &Path,
    files: Vec<File>,
    env: &SpawnEnv<'_>,
) -> Result<StartedProcess, DeviceError> {
    let id = &spec.id;
    let io = |e| DeviceError::Descriptors(id.clone(), e);
    let (Backend::Spawn { args, .. }
    | Backend::SpawnOnTap { args, .. }
    | Backend::SpawnOnConsole { args, .. }) = &spec.backend
    else {
        return Err(io(std::io::ErrorKind::InvalidInput.into()));
    };
    let (ours, theirs) = UnixStream::pair().map_err(io)?;
    let (control_ours, control_theirs) = control::seqpacket_pair().map_err(io)?;
    let (log_read, log_write) = pipe().map_err(io)?;
    let program = program.to_path_buf();
    let mut argv = vec![
        spec.kind.program_name(),
        "--socket-fd".to_string(),
        SOCKET_FD.to_string(),
    ];
    argv.extend(["--control-fd".to_string(), CONTROL_FD.to_string()]);
    argv.extend(args.iter().cloned());
    if !spec.policy.seccomp {
        argv.extend(["--seccomp".to_string(), "off".to_string()]);
    }
    if !spec.policy.landlock {
        argv.extend(["--landlock".to_string(), "off".to_string()]);
    }
    let mut fds = vec![log_write.as_fd(), theirs.as_fd(), control_theirs.as_fd()];
    let mut numbers = vec![LOG_FD, SOCKET_FD, CONTROL_FD];
    for (i, f) in files.iter().enumerate() {
        fds.push(f.as_fd());
        numbers.push(FIRST_KIND_FD + i as i32);
    }
    let request = SpawnRequest {
        program: program.clone(),
        argv,
        fds: numbers,
        jail: spec.policy.jail,
        nofile: spec.policy.nofile,
        nproc: spec.policy.nproc,
        data: Some(spec.policy.memory_max),
        cgroup: env.cgroup.map(|parent| CgroupRequest {
            parent: parent.to_path_buf(),
            name: env.cgroup_leaf.map_or_else(|| id.clone(), str::to_string),
            // Guest RAM is charged to whoever faults a page first: the device's limit leaves
            // room for all of it (docs/jail-resources.md).
            memory_max: spec.policy.memory_max.saturating_add(env.ram_size),
            pids_max: spec.policy.pids_max,
        }),
        ids: env.device_ids,
        oom_score_adj: Some(spec.policy.oom_score_adj),
    };
    let spawned = env
        .spawner
        .spawn(&request, &fds)
        .map_err(|e| DeviceError::Spawn(id.clone(), e))?;
    drop(fds);
    // The VMM keeps no copy of the device's files: it is not on the data path. The lock is
    // the open file description's, which the device process holds.
    drop((theirs, control_theirs, log_write, files));
    info!(
        "{id}: started {} (pid {}{})",
        program.display(),
        spawned.pid,
        if spec.policy.jail {
            ", jailed"
        } else {
            ", NOT jailed"
        },
    );
    let control = match ControlChannel::new(control_ours, control::DEFAULT_DEADLINE) {
        Ok(c) => c,
        Err(e) => {
            kill_pidfd(&spawned.pidfd);
            return Err(io(e));
        }
    };
    Ok(StartedProcess {
        pid: spawned.pid,
        pidfd: spawned.pidfd,
        stream: ours,
        control,
        log: log_read,
    })
}

/// A device whose process is started (or whose socket is connected), not yet handshaken.
struct Launched {
    /// Its vhost-user connection.
    stream: UnixStream,
    /// A pidfd of its process, if Bulkhead started one.
    pidfd: Option<OwnedFd>,
    spawned_pid: Option<u32>,
    /// Its process's control channel.
    first_control: Option<Arc<ControlChannel>>,
    /// Duplicates of its files for the next process (a restartable device).
    kept: Vec<File>,
    restartable: bool,
}

impl Devices {
    /// Opens and locks every device's files first (so that a locked image starts nothing),
    /// then starts or connects each device and puts a virtio-pci function in front of it.
    /// Returns the devices and each transport with its slot.
    pub fn start(
        specs: &[DeviceSpec],
        env: &DeviceEnv<'_>,
    ) -> Result<(Devices, Vec<(usize, VirtioPci)>), DeviceError> {
        let mut files = specs
            .iter()
            .map(open_files)
            .collect::<Result<Vec<_>, _>>()?;
        let mut specs = specs.to_vec();
        for (spec, files) in specs.iter_mut().zip(files.iter_mut()) {
            restart::add_inflight_region(spec, files)
                .map_err(|e| DeviceError::Descriptors(spec.id.clone(), e))?;
        }
        let specs = &specs[..];
        let monitor = Monitor::new(env.spawner.take_events())
            .map_err(|e| DeviceError::Descriptors("device monitor".into(), e))?;
        let mut devices = Devices {
            processes: Vec::new(),
            monitor,
            spawner: env.spawner.clone(),
            config_refresh: HashMap::new(),
        };
        // Every process is started before the first handshake: each one's start-up (exec,
        // jail, serving its socket) overlaps the others' and the handshakes before it.
        let launched = specs
            .iter()
            .zip(files)
            .map(|(spec, files)| devices.launch(spec, files, env))
            .collect::<Result<Vec<_>, _>>()?;
        let mut transports = Vec::with_capacity(specs.len());
        for (spec, launched) in specs.iter().zip(launched) {
            let transport = devices.connect(spec, launched, env)?;
            transports.push((spec.slot, transport));
        }
        devices
            .monitor
            .start()
            .map_err(|e| DeviceError::Descriptors("device monitor thread".into(), e))?;
        Ok((devices, transports))
    }

    /// A device's first half: spawns and watches its process (or connects to its socket).
    /// Every device goes through it and then [`connect`](Self::connect).
    fn launch(
        &mut self,
        spec: &DeviceSpec,
        files: Vec<File>,
        env: &DeviceEnv<'_>,
    ) -> Result<Launched, DeviceError> {
        let id = &spec.id;
        let io = |e| DeviceError::Descriptors(id.clone(), e);
        let mut spawned_pid = None;
        let mut first_control = None;
        // A device that may be restarted: the VMM keeps duplicates of its files (the image
        // and its lock, the tap queues) to hand the next process; it never reads or writes
        // them.
        let restartable = spec.policy.restart.mode == RestartMode::OnFailure
            && !matches!(spec.backend, Backend::Socket(_));
        let kept = if restartable {
            files
                .iter()
                .map(|f| f.try_clone())
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(io)?
        } else {
            Vec::new()
        };
        let (stream, pidfd) = match &spec.backend {
            Backend::Spawn { .. } | Backend::SpawnOnTap { .. } | Backend::SpawnOnConsole { .. } => {
                let started = spawn_process(spec, files, &env.spawn_env())?;
                let pidfd_copy = started.pidfd.try_clone().map_err(io)?;
                if let Err(e) = self
                    .monitor
                    .watch(id, started.pid, started.log, started.pidfd)
                {
                    kill_pidfd(&pidfd_copy);
                    return Err(io(e));
                }
                let control = Arc::new(started.control);
                first_control = Some(control.clone());
                self.processes.push(DeviceProcess {
                    id: id.clone(),
                    pid: started.pid,
                    control,
                });
                spawned_pid = Some(started.pid);
                (started.stream, Some(pidfd_copy))
            }
            Backend::Socket(path) => {
                let s = UnixStream::connect(path)
                    .map_err(|e| DeviceError::Connect(id.clone(), path.clone(), e))?;
                (s, None)
            }
        };
        Ok(Launched {
            stream,
            pidfd,
            spawned_pid,
            first_control,
            kept,
            restartable,
        })
    }

    /// A device's second half: the vhost-user handshake with its process, the virtio-pci
    /// function in front of it, and its restart or failure handling.
    // The device type is a u16 here and a u32 in the transport branch's VirtioPci::new.
    #[allow(clippy::useless_conversion)]
    fn connect(
        &mut self,
        spec: &DeviceSpec,
        launched: Launched,
        env: &DeviceEnv<'_>,
    ) -> Result<VirtioPci, DeviceError> {
        let id = &spec.id;
        let io = |e| DeviceError::Descriptors(id.clone(), e);
        let pidfd = launched.pidfd;
        let fail = |e| {
            if let Some(p) = &pidfd {
                kill_pidfd(p);
            }
            e
        };
        // A device that stops answering fails the handshake instead of hanging the VMM: every
        // request has a deadline kept by the transport's deadline thread, which shuts the
        // socket down (socket timeouts would not do: the vhost crate retries EAGAIN forever).
        let frontend =
            vhost::vhost_user::Frontend::from_stream(launched.stream, u64::from(spec.queues));
        let mut backend =
            VhostUserDevice::handshake(id.clone(), frontend, usize::from(spec.queues))
                .map_err(|e| fail(DeviceError::Handshake(id.clone(), e)))?;
        backend.features = features_for_guest(spec.kind, spec.queues, backend.features);
        let transport = VirtioPci::new(
            spec.kind.virtio_type().into(),
            spec.kind.pci_class(),
            spec.queue_size,
            backend,
            env.memory.clone(),
            env.bus.clone(),
        )
        .map_err(|e| fail(DeviceError::Transport(id.clone(), e)))?;
        if matches!(spec.kind, DeviceKind::Console | DeviceKind::Balloon) {
            self.config_refresh
                .insert(spec.id.clone(), transport.config_refresh());
        }
        match (launched.spawned_pid, &pidfd) {
            (Some(pid), Some(pidfd)) if launched.restartable => {
                // The process's end marks the device down at once; the monitor restarts it
                // under its policy (device::restart).
                let current = restart::CurrentProcess::default();
                current.set(pidfd.try_clone().map_err(|e| fail(io(e)))?);
                let handle = transport.restart_handle();
                let killer = current.clone();
                handle.set_kill_hook(Arc::new(move || killer.kill()));
                self.monitor.restartable(
                    pid,
                    Respawn {
                        spec: spec.clone(),
                        program: program(spec.kind),
                        files: launched.kept,
                        spawner: env.spawner.clone(),
                        cgroup: env.cgroup.map(Path::to_path_buf),
                        device_ids: env.device_ids,
                        ram_size: env.ram_size,
                        handle,
                        current,
                        pid,
                        restarts: 0,
                        died_at: None,
                        last_cause: None,
                        retired: false,
                        missed_pings: 0,
                        control: launched.first_control,
                        standby: None,
                        alt_leaf: false,
                        standby_losses: 0,
                        early: None,
                    },
                );
            }
            (Some(pid), _) => {
                // The process's end marks the device failed at once: its socket is shut down,
                // the guest sees DEVICE_NEEDS_RESET and a configuration interrupt.
                let failure = transport.failure_handle();
                self.monitor
                    .on_end(pid, Box::new(move |reason| failure.fail(reason)));
            }
            _ => {}
        }
        // A queue the guest broke reaches the guest as DEVICE_NEEDS_RESET (monitor.rs).
        let watch = transport.queue_error_watch().map_err(|e| fail(io(e)))?;
        self.monitor
            .watch_queue_errors(id, watch)
            .map_err(|e| fail(io(e)))?;
        Ok(transport)
    }

    /// Sends `request` on device `id`'s control channel (its current process's, after a
    /// restart) and returns the payload of the `ok` reply; `fault crash` and `fault seccomp`
    /// inject those faults (docs/restart.md). `None`: no such device process.
    pub fn control_request(
        &self,
        id: &str,
        request: &str,
    ) -> Option<Result<String, control::ControlError>> {
        self.control_channel(id).map(|c| c.request(request))
    }

    /// Device `id`'s control channel (its current process's, after a restart); `None`: no
    /// such device process.
    pub fn control_channel(&self, id: &str) -> Option<Arc<ControlChannel>> {
        self.monitor.current_control(id).or_else(|| {
            self.processes
                .iter()
                .find(|p| p.id == id)
                .map(|p| p.control.clone())
        })
    }

    /// `vm.resize` `desired_balloon`: the balloon's new target, in bytes. The device takes it
    /// on its control channel (`resize BYTES`); then the transport re-reads the configuration
    /// space and raises the configuration interrupt, and the guest inflates or deflates.
    pub fn balloon_resize(&self, bytes: u64) -> Result<(), BalloonError> {
        let refresh = self
            .config_refresh
            .get(BALLOON_ID)
            .ok_or(BalloonError::NoBalloon)?;
        match self.control_request(BALLOON_ID, &format!("resize {bytes}")) {
            None => Err(BalloonError::NoBalloon),
            Some(Err(control::ControlError::Refused(reason))) => Err(BalloonError::Refused(reason)),
            Some(Err(e)) => Err(BalloonError::Control(e)),
            Some(Ok(_)) => {
                // A restarted balloon starts from this target, not from `size=`.
                self.monitor
                    .set_respawn_option(BALLOON_ID, "--size", &bytes.to_string());
                if !refresh.refresh() {
                    warn!(
                        "{BALLOON_ID}: its transport is gone; the guest is not told the new target"
                    );
                }
                Ok(())
            }
        }
    }

    /// `vm.balloon-statistics`: the balloon's `statistics` reply, as (name, value) pairs.
    pub fn balloon_statistics(&self) -> Result<Vec<(String, u64)>, BalloonError> {
        if !self.config_refresh.contains_key(BALLOON_ID) {
            return Err(BalloonError::NoBalloon);
        }
        let line = match self.control_request(BALLOON_ID, "statistics") {
            None => return Err(BalloonError::NoBalloon),
            Some(Err(control::ControlError::Refused(reason))) => {
                return Err(BalloonError::Refused(reason))
            }
            Some(Err(e)) => return Err(BalloonError::Control(e)),
            Some(Ok(line)) => line,
        };
        Ok(line
            .split_whitespace()
            .filter_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect())
    }

    /// Sets the virtio console's size (VIRTIO_CONSOLE_F_SIZE): the console's process takes it
    /// on its control channel, then the transport re-reads the configuration space and raises
    /// the configuration interrupt, and the guest resizes `hvc0`. `Err`: no console, or why
    /// the process refused.
    pub fn resize_console(&self, cols: u16, rows: u16) -> Result<(), String> {
        let Some(refresh) = self.config_refresh.get(CONSOLE_ID) else {
            return Err("this VM has no virtio console (--console)".into());
        };
        match self.control_request(CONSOLE_ID, &format!("resize {cols} {rows}")) {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("the console's process: {e}")),
            None => return Err("the console has no process".into()),
        }
        if !refresh.refresh() {
            return Err("the console's transport is gone".into());
        }
        Ok(())
    }

    /// Every device process's id and its current control channel, in start order.
    pub fn control_channels(&self) -> Vec<(String, Arc<ControlChannel>)> {
        let mut seen = Vec::<String>::new();
        let mut out = Vec::new();
        for p in &self.processes {
            if seen.contains(&p.id) {
                continue;
            }
            seen.push(p.id.clone());
            if let Some(c) = self.control_channel(&p.id) {
                out.push((p.id.clone(), c));
            }
        }
        out
    }

    /// Restarts per restartable device, with the last cause (for `vm.info`, `vm.counters`).
    pub fn restarts(&self) -> Vec<restart::RestartInfo> {
        self.monitor.restarts()
    }

    /// Starts one more device while the VM runs (hot-plug): opens and locks its files (or
    /// its tap), spawns and jails its process (or connects to its socket), handshakes and
    /// puts a virtio-pci function in front of it, as [`Devices::start`] does for each device.
    pub fn add(
        &mut self,
        spec: &DeviceSpec,
        env: &DeviceEnv<'_>,
    ) -> Result<VirtioPci, DeviceError> {
        let mut files = open_files(spec)?;
        // A restartable disk gets its inflight region as at boot (the main thread's filter
        // allows the memfd for it).
        let mut spec = spec.clone();
        restart::add_inflight_region(&mut spec, &mut files)
            .map_err(|e| DeviceError::Descriptors(spec.id.clone(), e))?;
        let launched = self.launch(&spec, files, env)?;
        self.connect(&spec, launched, env)
    }

    /// Forgets device `id` after its function was removed (its transport dropped, so its
    /// process saw the connection close and is exiting): no restart of it, and the monitor
    /// closes what it kept for it. Returns the process's pid and the
    /// monitor that watches it (see [`end_process`]); `None` for a device with no process.
    pub fn remove(&mut self, id: &str) -> Option<(u32, Arc<Monitor>)> {
        self.monitor.forget_device(id);
        let index = self.processes.iter().position(|p| p.id == id)?;
        let process = self.processes.remove(index);
        Some((process.pid, self.monitor.clone()))
    }

    /// The process serving device `id`, and whether it has ended (`None`: the VMM started
    /// no process for it, an external vhost-user backend serves it). For `vm.info`.
    /// After a restart this is the current process (the restart table's pid).
    pub fn process_state(&self, id: &str) -> Option<(u32, bool)> {
        let p = self.processes.iter().rev().find(|p| p.id == id)?;
        let pid = self
            .monitor
            .restarts()
            .into_iter()
            .find(|r| r.id == id)
            .map_or(p.pid, |r| r.pid);
        Some((pid, self.monitor.process_ended(pid).unwrap_or(true)))
    }

    /// After the transports were dropped (the devices saw their sockets close): waits up to
    /// `grace` for the device processes to exit, then hangs up the spawner, which SIGKILLs
    /// the rest (a stopped process too), reaps them (removing their cgroup leaves) and ends;
    /// waits up to [`SPAWNER_EXIT_WAIT`] for that. Bounded: never waits on a device.
    pub fn shutdown(&self, grace: Duration) {
        // No restart from here on; the files kept for one are closed.
        self.monitor.forget_respawns();
        if !self.monitor.wait_all_reaped(grace) {
            warn!(
                "a device process did not exit within {} s of disconnect; killing it",
                grace.as_secs()
            );
        }
        self.spawner.hang_up();
        if !self.monitor.wait_spawner_gone(SPAWNER_EXIT_WAIT) {
            warn!("the device spawner did not end in time; it dies with the VMM");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The directory the workspace's programs were built in (this test binary's grandparent),
    /// if `program` was built there; `None`, saying so, otherwise (the test is skipped), except
    /// under `BULKHEAD_TEST_STRICT=1` (the test command, which builds them first): a failure.
    pub(crate) fn built_programs(program: &str) -> Option<PathBuf> {
        let dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().and_then(|d| d.parent()).map(Path::to_path_buf))?;
        if !dir.join(program).exists() {
            assert!(
                std::env::var_os("BULKHEAD_TEST_STRICT").is_none(),
                "no {} (BULKHEAD_TEST_STRICT is set, so this fails)",
                dir.join(program).display()
            );
            eprintln!("skipped: no {}", dir.join(program).display());
            return None;
        }
        Some(dir)
    }

    /// 1 MiB of anonymous guest memory at 0x8000_0000.
    pub(crate) fn anonymous_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0x8000_0000), 1 << 20)])
            .expect("memory")
    }

    /// What the tests that start real device processes share: an unjailed spawner, guest
    /// memory and an MMIO bus, and the [`DeviceEnv`] over them.
    pub(crate) struct TestEnv {
        pub spawner: Arc<Spawner>,
        pub memory: GuestMemoryMmap,
        pub bus: Arc<MmioBus>,
    }

    impl TestEnv {
        pub fn new(memory: GuestMemoryMmap) -> Self {
            Self {
                spawner: Arc::new(Spawner::fork(spawner_policy(false)).expect("spawner")),
                memory,
                bus: Arc::new(MmioBus::default()),
            }
        }

        pub fn env(&self) -> DeviceEnv<'_> {
            use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
            DeviceEnv {
                memory: &self.memory,
                bus: &self.bus,
                spawner: &self.spawner,
                cgroup: None,
                device_ids: None,
                ram_size: self.memory.iter().map(|r| r.len()).sum(),
            }
        }
    }

    /// The unjailed `disk0` of the block tests on `image` (one queue of 128), as `--disk` with
    /// `extra` options would make it.
    pub(crate) fn disk0_spec(image: &Path, extra: &str) -> DeviceSpec {
        let value = format!("path={},id=disk0,queue_size=128{extra}", image.display());
        let disk = crate::config::parse_disk_options(&value).expect("disk options");
        disk_spec(&disk, 0, 0, false)
    }

    /// The whole path against the real block device process (unjailed: a debug build is
    /// dynamically linked and cannot run in the jail's empty root): spawn through the
    /// spawner, handshake, transport; then a second start on the same writable image is
    /// refused as bad input before anything is spawned. Skipped without a built
    /// `bulkhead-block` in the target directory.
    #[test]
    fn test_devices_start_block_then_second_writer_refused() {
        let Some(dir) = built_programs("bulkhead-block") else {
            return;
        };
        // SAFETY (not unsafe in edition 2021): only this test reads PATH for programs.
        std::env::set_var("PATH", &dir);
        let image =
            std::env::temp_dir().join(format!("bulkhead-devices-{}.img", std::process::id()));
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(1 << 20))
            .expect("image");
        let fixture = TestEnv::new(anonymous_memory());
        let env = fixture.env();
        let spec = disk0_spec(&image, "");
        let (devices, transports) =
            Devices::start(std::slice::from_ref(&spec), &env).expect("start");
        assert_eq!(transports.len(), 1);
        assert_eq!(devices.processes.len(), 1);
        let pid = devices.processes[0].pid;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_eq!(comm.trim(), "bulkhead-block");
        let Err(second) = Devices::start(std::slice::from_ref(&spec), &env) else {
            panic!("a second writer of the image was not refused");
        };
        assert!(second.is_bad_input(), "{second:?}");
        let cause = std::error::Error::source(&second).map(|s| s.to_string());
        assert!(cause.unwrap_or_default().contains("in use"), "{second:?}");
        drop(transports);
        devices.shutdown(Duration::from_secs(3));
        assert!(
            !Path::new(&format!("/proc/{pid}/comm")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .unwrap_or_default()
                    .trim()
                    != "bulkhead-block"
        );
        let _ = std::fs::remove_file(&image);
    }

    /// The whole path against the real balloon process (unjailed, as the block test): spawn
    /// with no file, handshake (inflate, deflate, stats, reporting), transport; the API's
    /// resize goes to the device on its control channel and reaches the guest's view of the
    /// configuration space (`num_pages` at BAR 0 + 0x2000) through the refresh; statistics
    /// come back in Firecracker's names; a target beyond u32 pages is clamped by the device,
    /// garbage refused. Skipped without a built `bulkhead-balloon`.
    #[test]
    fn test_devices_start_balloon_resize_reaches_config_space() {
        let Some(dir) = built_programs("bulkhead-balloon") else {
            return;
        };
        // SAFETY (not unsafe in edition 2021): only this test reads PATH for programs.
        std::env::set_var("PATH", &dir);
        let fixture = TestEnv::new(anonymous_memory());
        let env = fixture.env();
        let config = BalloonConfig {
            size: 1 << 20,
            deflate_on_oom: true,
            free_page_reporting: true,
            stats_polling_interval_s: 1,
        };
        let mut spec = balloon_spec(&config, 0, false);
        spec.policy = DeviceKind::Balloon.policy(spec.queues, false);
        let (devices, transports) =
            Devices::start(std::slice::from_ref(&spec), &env).expect("start");
        let (_, transport) = transports.first().expect("transport");
        let num_pages = || {
            let mut b = [0u8; 4];
            transport.bar_read_for_fuzzing(0x2000, &mut b);
            u32::from_le_bytes(b)
        };
        assert_eq!(num_pages(), 256, "size=1M at start");
        devices.balloon_resize(64 << 20).expect("resize");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while num_pages() != 16384 {
            assert!(
                std::time::Instant::now() < deadline,
                "num_pages {}",
                num_pages()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let respawn = devices
            .monitor
            .respawn_args(BALLOON_ID)
            .expect("restartable");
        assert_eq!(
            respawn.get(..2),
            Some(&["--size".to_string(), (64u64 << 20).to_string()][..]),
            "a restarted balloon keeps the target"
        );
        let stats = devices.balloon_statistics().expect("statistics");
        assert_eq!(
            &stats[..4],
            &[
                ("target_pages".to_string(), 16384),
                ("actual_pages".to_string(), 0),
                ("target_mib".to_string(), 64),
                ("actual_mib".to_string(), 0),
            ]
        );
        let pid = devices.processes[0].pid;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        // The comm is 15 bytes at most.
        assert_eq!(comm.trim(), "bulkhead-balloo");
        drop(transports);
        devices.shutdown(Duration::from_secs(3));
    }

    /// Where a built `bulkhead-balloon` is (and PATH set to find it), or None (skipped).
    fn balloon_program() -> Option<PathBuf> {
        let dir = built_programs("bulkhead-balloon")?;
        // SAFETY (not unsafe in edition 2021): only these tests read PATH for programs.
        std::env::set_var("PATH", &dir);
        Some(dir)
    }

    /// A driver's whole inflate against the real balloon process (unjailed, under its seccomp
    /// filter unless seccomp is not enforced here), on guest RAM `memory` (one region, every
    /// page touched, its file `file`): the transport is brought up through BAR 0 as a driver
    /// does (VERSION_1, the inflate queue), activation sends the memory table; an inflate of
    /// 2 MiB (512 page frames, 2 MiB-aligned: a whole huge page too) is answered and its pages
    /// leave the file; a request naming a page outside guest RAM is answered and releases
    /// nothing.
    fn balloon_inflate_end_to_end(memory: &GuestMemoryMmap, file: &File) {
        use std::os::unix::fs::MetadataExt;
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
        let region = memory.iter().next().expect("one region");
        let base = region.start_addr().0;
        let size = region.len();
        let allocated = || file.metadata().expect("metadata").blocks() * 512;
        let spawner = Arc::new(Spawner::fork(spawner_policy(false)).expect("spawner"));
        let bus = Arc::new(MmioBus::default());
        let env = DeviceEnv {
            memory,
            bus: &bus,
            spawner: &spawner,
            cgroup: None,
            device_ids: None,
            ram_size: size,
        };
        let config = BalloonConfig {
            size: 0,
            deflate_on_oom: false,
            free_page_reporting: false,
            stats_polling_interval_s: 0,
        };
        let mut spec = balloon_spec(&config, 0, false);
        // Its own seccomp filter on (the jail needs a static build): the memory table (fstat)
        // and the hole punch (fallocate) must pass it.
        spec.policy.seccomp = true;
        let (devices, transports) =
            Devices::start(std::slice::from_ref(&spec), &env).expect("start");
        let (_, p) = transports.first().expect("transport");
        let w8 = |off: u64, v: u8| p.bar_write_for_fuzzing(off, &[v]);
        let w16 = |off: u64, v: u16| p.bar_write_for_fuzzing(off, &v.to_le_bytes());
        let w32 = |off: u64, v: u32| p.bar_write_for_fuzzing(off, &v.to_le_bytes());
        let w64 = |off: u64, v: u64| p.bar_write_for_fuzzing(off, &v.to_le_bytes());
        // Rings at base, base + 4K, base + 8K; page frame numbers at base + 12K.
        let (desc, avail, used, pfns) = (base, base + 0x1000, base + 0x2000, base + 0x3000);
        w8(0x14, 1);
        w8(0x14, 3);
        w32(0x08, 0);
        w32(0x0c, 0);
        w32(0x08, 1);
        w32(0x0c, 1);
        w8(0x14, 0xb);
        w16(0x16, 0);
        w16(0x18, 16);
        w64(0x20, desc);
        w64(0x28, avail);
        w64(0x30, used);
        w16(0x1c, 1);
        memory
            .write_slice(&[0u8; 0x3000], GuestAddress(base))
            .expect("rings");
        w8(0x14, 0xf);
        // One chain of 512 page frames: 8 MiB..10 MiB of guest RAM.
        let first = ((base + (8 << 20)) >> 12) as u32;
        let frames: Vec<u8> = (first..first + 512).flat_map(u32::to_le_bytes).collect();
        memory
            .write_slice(&frames, GuestAddress(pfns))
            .expect("pfns");
        let mut d = Vec::new();
        d.extend_from_slice(&pfns.to_le_bytes());
        d.extend_from_slice(&2048u32.to_le_bytes());
        d.extend_from_slice(&[0; 4]);
        // A second chain: a page frame just past guest RAM.
        let outside = ((base + size) >> 12) as u32;
        memory
            .write_slice(&outside.to_le_bytes(), GuestAddress(pfns + 0x1000))
            .expect("pfn");
        d.extend_from_slice(&(pfns + 0x1000).to_le_bytes());
        d.extend_from_slice(&4u32.to_le_bytes());
        d.extend_from_slice(&[0; 4]);
        memory.write_slice(&d, GuestAddress(desc)).expect("desc");
        let before = allocated();
        let used_idx = || {
            memory
                .read_obj::<u16>(GuestAddress(used + 2))
                .expect("used")
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for (n, head) in [(1u16, 0u16), (2, 1)] {
            memory
                .write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(n - 1)))
                .expect("ring");
            memory.write_obj(n, GuestAddress(avail + 2)).expect("idx");
            // The inflate queue's notify slot (no ioeventfd here: the transport kicks).
            w16(0x3000, 0);
            while used_idx() != n {
                assert!(
                    std::time::Instant::now() < deadline,
                    "chain {n} not answered"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            if n == 1 {
                assert_eq!(before - allocated(), 2 << 20, "2 MiB left the file");
            }
        }
        assert_eq!(
            before - allocated(),
            2 << 20,
            "the bad request released nothing"
        );
        let mut b = [0u8; 4];
        memory
            .read_slice(&mut b, GuestAddress(base + (8 << 20)))
            .expect("read");
        assert_eq!(b, [0; 4], "an inflated page reads as zeros");
        let stats = devices
            .control_request(BALLOON_ID, "stats")
            .expect("device")
            .expect("stats");
        assert!(
            stats.contains("inflated_pages=512") && stats.contains("bad_requests=1"),
            "{stats}"
        );
        println!("balloon: {stats}");
        drop(transports);
        devices.shutdown(Duration::from_secs(3));
    }

    /// [`balloon_inflate_end_to_end`] on a plain memfd (`thp=off`). Skipped without a built
    /// `bulkhead-balloon`.
    #[test]
    fn test_devices_balloon_inflate_punches_guest_ram_end_to_end() {
        use std::os::unix::fs::FileExt;
        use vm_memory::{FileOffset, GuestAddress};
        if balloon_program().is_none() {
            return;
        }
        const SIZE: u64 = 16 << 20;
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"bulkhead-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor owned by nobody else.
        let file = Arc::new(unsafe { File::from_raw_fd(fd) });
        file.set_len(SIZE).expect("size");
        file.write_all_at(&vec![0x5a; SIZE as usize], 0)
            .expect("touch");
        let memory = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0x8000_0000),
            SIZE as usize,
            Some(FileOffset::from_arc(file.clone(), 0)),
        )])
        .expect("memory");
        balloon_inflate_end_to_end(&memory, &file);
    }

    /// [`balloon_inflate_end_to_end`] on the VMM's own default guest RAM where the host allows
    /// it: a file on a private tmpfs mounted `huge=within_size` (memory::create, thp=tmpfs),
    /// whose block size is the 2 MiB huge page, so the device releases whole huge pages.
    /// Skipped without a built `bulkhead-balloon` or where that tmpfs cannot be made.
    #[test]
    fn test_devices_balloon_inflate_on_huge_tmpfs_releases_a_huge_page() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
        if balloon_program().is_none() {
            return;
        }
        let ram = match crate::memory::create(
            16 << 20,
            crate::memory::RamBacking::Only(crate::memory::Mechanism::Tmpfs),
        ) {
            Ok(ram) => ram,
            Err(e) => {
                eprintln!("skipped: no huge tmpfs here ({e})");
                return;
            }
        };
        let region = ram.memory.iter().next().expect("region");
        let file = region
            .file_offset()
            .expect("a file")
            .file()
            .try_clone()
            .expect("file");
        ram.memory
            .write_slice(&vec![0x5a; 16 << 20], GuestAddress(region.start_addr().0))
            .expect("touch");
        balloon_inflate_end_to_end(&ram.memory, &file);
    }

    /// The whole path against the real net device process on a real two-pair tap the VMM
    /// creates (unjailed, as the block test): spawn with the tap queues at 5 and 6, handshake
    /// (2 pairs + the control queue), transport, comm; the VMM keeps no tap queue. Skipped
    /// without a built `bulkhead-net` or without CAP_NET_ADMIN.
    #[test]
    fn test_devices_start_net_on_tap() {
        let Some(dir) = built_programs("bulkhead-net") else {
            return;
        };
        let name = format!("bhdev{}", std::process::id() % 100_000);
        if let Err(e) = crate::tap::open_queues(&name, 1) {
            eprintln!("skipped: {e}");
            return;
        }
        std::env::set_var("PATH", &dir);
        let fixture = TestEnv::new(anonymous_memory());
        let env = fixture.env();
        let net = NetConfig {
            backend: NetBackend::Tap {
                name: name.clone(),
                addr: Some(([198, 18, 253, 1].into(), [255, 255, 255, 0].into())),
            },
            mac: [0x52, 0x54, 0, 1, 2, 3],
            mtu: Some(1400),
            num_queues: 4,
            queue_size: 256,
            id: None,
            rx_limit: vec![],
            tx_limit: vec![],
            restart: RestartPolicy::default(),
            fault: None,
        };
        let spec = net_spec(&net, 0, 0, false);
        let (devices, transports) =
            Devices::start(std::slice::from_ref(&spec), &env).expect("start");
        assert_eq!(transports.len(), 1);
        let pid = devices.processes[0].pid;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_eq!(comm.trim(), "bulkhead-net");
        let mut taps = 0;
        for fd in [5, 6] {
            let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).expect("fd");
            assert!(info.contains(&format!("iff:\t{name}")), "fd {fd}: {info}");
            taps += 1;
        }
        assert_eq!(taps, 2);
        let ours = std::fs::read_dir("/proc/self/fd")
            .expect("fds")
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l == Path::new("/dev/net/tun"))
            .count();
        // One duplicate per queue, kept to hand a restarted process (restart=on-failure).
        assert_eq!(
            ours, 2,
            "the VMM keeps exactly the tap queues, for a restart"
        );
        let mtu = std::fs::read_to_string(format!("/sys/class/net/{name}/mtu")).expect("mtu");
        assert_eq!(mtu.trim(), "1400");
        let stats = devices.processes[0]
            .control
            .request("stats")
            .expect("stats");
        assert!(stats.contains("rx_packets="), "{stats}");
        drop(transports);
        devices.shutdown(Duration::from_secs(3));
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !Path::new(&format!("/sys/class/net/{name}")).exists(),
            "the tap outlived its queues"
        );
    }

    #[test]
    fn test_socket_net_offers_no_control_queue_features() {
        // Cloud Hypervisor's vhost_user_net offers 0x141427fa3 (CTRL_VQ and MQ among them).
        let ch = 0x1_4142_7fa3_u64;
        let got = features_for_guest(DeviceKind::Net, 2, ch);
        for bit in [2, 17, 18, 19, 21, 22, 23] {
            assert_eq!(
                got & (1 << bit),
                0,
                "bit {bit} offered without a control queue"
            );
        }
        assert_eq!(
            got | NET_NEEDS_CTRL_VQ,
            ch | NET_NEEDS_CTRL_VQ,
            "nothing else taken"
        );
        assert_ne!(got & (1 << 32), 0, "VERSION_1 stays");
        // bulkhead-net on a tap the VMM opened: 2 pairs + the control queue, all offered.
        assert_eq!(features_for_guest(DeviceKind::Net, 5, ch), ch);
        assert_eq!(features_for_guest(DeviceKind::Block, 2, ch), ch);
    }

    #[test]
    fn test_net_spec_args_fds_slot_and_policy() {
        let net = NetConfig {
            backend: NetBackend::Tap {
                name: "bh0".into(),
                addr: None,
            },
            mac: [0x52, 0x54, 0, 1, 2, 3],
            mtu: Some(9000),
            num_queues: 4,
            queue_size: 512,
            id: None,
            rx_limit: vec![],
            tx_limit: vec![("bw_size", 10 << 20), ("bw_refill_time", 1000)],
            restart: RestartPolicy::default(),
            fault: Some("drop=4".into()),
        };
        let spec = net_spec(&net, 1, 3, true);
        assert_eq!(spec.id, "net1");
        assert_eq!(spec.slot, 3);
        assert_eq!(spec.kind.program_name(), "bulkhead-net");
        assert_eq!(
            (spec.kind.virtio_type(), spec.kind.pci_class()),
            (1, 0x02_00_00)
        );
        assert_eq!(spec.queues, 5, "2 pairs and the control queue");
        let Backend::SpawnOnTap { tap, args } = &spec.backend else {
            panic!("{:?}", spec.backend);
        };
        assert_eq!(
            *tap,
            TapQueues::Open {
                name: "bh0".into(),
                pairs: 2,
                addr: None,
                mtu: Some(9000)
            }
        );
        assert_eq!(
            args.join(" "),
            "--tap-fd 5 --tap-fd 6 --mac 52:54:00:01:02:03 --queue-pairs 2 --queue-size 512 \
             --mtu 9000 --tx-bw-size 10485760 --tx-bw-refill-time 1000 --fault drop=4"
        );
        // Contract: nofile 64 + 8 per queue, pids 64 + 2 per pair.
        assert_eq!(spec.policy.nofile, 64 + 8 * 5);
        assert_eq!(spec.policy.pids_max, 64 + 2 * 2);
        let socket = NetConfig {
            backend: NetBackend::Socket("/run/n.sock".into()),
            id: Some("ext".into()),
            ..net
        };
        let spec = net_spec(&socket, 0, 0, false);
        assert_eq!((spec.id.as_str(), spec.queues), ("ext", 4));
        assert_eq!(spec.backend, Backend::Socket("/run/n.sock".into()));
        assert!(!spec.policy.jail);
    }

    #[test]
    fn test_resize_console_without_console_is_an_error() {
        let spawner = Arc::new(Spawner::fork(spawner_policy(false)).expect("spawner"));
        let devices = Devices {
            processes: Vec::new(),
            monitor: Monitor::new(spawner.take_events()).expect("monitor"),
            spawner,
            config_refresh: HashMap::new(),
        };
        let e = devices.resize_console(80, 24).expect_err("no console");
        assert!(e.contains("no virtio console"), "{e}");
    }

    #[test]
    fn test_console_spec_args_slot_and_policy() {
        assert!(console_spec(&ConsoleConfig::Off, 0, true).is_none());
        let spec =
            console_spec(&ConsoleConfig::Socket("/run/c.sock".into()), 3, true).expect("spec");
        assert_eq!(
            (spec.id.as_str(), spec.slot, spec.queues),
            ("console", 3, 2)
        );
        assert_eq!(spec.kind.program_name(), "bulkhead-console");
        assert_eq!(
            (spec.kind.virtio_type(), spec.kind.pci_class()),
            (3, 0x07_80_00)
        );
        let Backend::SpawnOnConsole { host, args } = &spec.backend else {
            panic!("{:?}", spec.backend);
        };
        assert_eq!(*host, ConsoleHost::Socket("/run/c.sock".into()));
        assert_eq!(
            args.join(" "),
            "--listen-fd 5 --cols 80 --rows 24 --queue-size 256"
        );
        assert_eq!((spec.policy.nofile, spec.policy.pids_max), (64, 64));
        assert!(spec.policy.jail && spec.policy.seccomp && spec.policy.landlock);
        let pty = console_spec(&ConsoleConfig::Pty, 0, false).expect("spec");
        let Backend::SpawnOnConsole { args, .. } = &pty.backend else {
            panic!("{:?}", pty.backend);
        };
        assert!(args.join(" ").starts_with("--pty-fd 5 --pty-slave-fd 6 "));
        assert!(!pty.policy.jail);
    }

    /// The whole path against the real console device process (unjailed, as the block test)
    /// on a socket the VMM binds: spawn with the listening socket at 5, handshake (two
    /// queues), transport, comm, and a resize on its control channel. Skipped without a built
    /// `bulkhead-console`.
    #[test]
    fn test_devices_start_console_on_socket() {
        let Some(dir) = built_programs("bulkhead-console") else {
            return;
        };
        std::env::set_var("PATH", &dir);
        let fixture = TestEnv::new(anonymous_memory());
        let env = fixture.env();
        let path = std::env::temp_dir().join(format!("bh-console-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let spec = console_spec(&ConsoleConfig::Socket(path.clone()), 0, false).expect("spec");
        let (devices, transports) =
            Devices::start(std::slice::from_ref(&spec), &env).expect("start");
        assert_eq!(transports.len(), 1);
        let pid = devices.processes[0].pid;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        // comm holds 15 bytes.
        assert_eq!(comm.trim(), "bulkhead-consol");
        assert!(
            std::os::unix::net::UnixStream::connect(&path).is_ok(),
            "the device listens on the VMM's socket"
        );
        // The configuration space the guest reads (BAR 0 at 0x2000): 80x24, then the resize.
        let cfg = |t: &VirtioPci| {
            let mut b = [0u8; 4];
            t.bar_read_for_fuzzing(0x2000, &mut b);
            b
        };
        assert_eq!(cfg(&transports[0].1), [80, 0, 24, 0]);
        devices.resize_console(120, 40).expect("resize");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while cfg(&transports[0].1) != [120, 0, 40, 0] {
            assert!(
                std::time::Instant::now() < deadline,
                "the transport did not re-read the configuration: {:?}",
                cfg(&transports[0].1)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let stats = devices.processes[0]
            .control
            .request("stats")
            .expect("stats");
        assert!(stats.contains("resizes=1 "), "{stats}");
        drop(transports);
        devices.shutdown(Duration::from_secs(3));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn test_devices_console_and_balloon_each_refresh_their_own_config_space() {
        let (Some(dir), Some(_)) = (
            built_programs("bulkhead-console"),
            built_programs("bulkhead-balloon"),
        ) else {
            return;
        };
        // SAFETY (not unsafe in edition 2021): the tests that set PATH set the same directory.
        std::env::set_var("PATH", &dir);
        let fixture = TestEnv::new(anonymous_memory());
        let env = fixture.env();
        let path = std::env::temp_dir().join(format!("bh-both-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let balloon = BalloonConfig {
            size: 0,
            deflate_on_oom: false,
            free_page_reporting: false,
            stats_polling_interval_s: 0,
        };
        // As specs() places them: the console, then the balloon.
        let specs = [
            console_spec(&ConsoleConfig::Socket(path.clone()), 0, false).expect("spec"),
            balloon_spec(&balloon, 1, false),
        ];
        let (devices, transports) = Devices::start(&specs, &env).expect("start");
        assert_eq!(transports.len(), 2);
        let cfg = |t: &VirtioPci| {
            let mut b = [0u8; 4];
            t.bar_read_for_fuzzing(0x2000, &mut b);
            b
        };
        let (console, balloon) = (&transports[0].1, &transports[1].1);
        assert_eq!(cfg(console), [80, 0, 24, 0]);
        assert_eq!(cfg(balloon), [0; 4], "num_pages 0");
        let wait_for = |t: &VirtioPci, want: [u8; 4]| {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while cfg(t) != want {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the transport did not re-read the configuration: {:?}, not {want:?}",
                    cfg(t)
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        devices.balloon_resize(1 << 20).expect("balloon resize");
        wait_for(balloon, 256u32.to_le_bytes());
        devices.resize_console(132, 43).expect("console resize");
        wait_for(console, [132, 0, 43, 0]);
        assert_eq!(
            cfg(balloon),
            256u32.to_le_bytes(),
            "the balloon's is unchanged"
        );
        drop(transports);
        devices.shutdown(Duration::from_secs(3));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn test_block_args_pass_rate_limits() {
        let disk = DiskConfig {
            backend: DiskBackend::Process {
                path: "/img".into(),
                readonly: false,
                serial: None,
                direct: true,
                rate_limit: vec![
                    ("bw_size", 1 << 20),
                    ("bw_refill_time", 100),
                    ("ops_size", 10),
                    ("ops_one_time_burst", 5),
                    ("ops_refill_time", 1000),
                ],
                poll_us: 50,
            },
            num_queues: 2,
            queue_size: 128,
            id: None,
            memory_max: None,
            pids_max: None,
            restart: RestartPolicy::default(),
            fault: Some("crash_after=7".into()),
        };
        assert_eq!(
            block_args(&disk).join(" "),
            "--path /img --image-fd 5 --num-queues 2 --queue-size 128 --direct \
             --bw-size 1048576 --bw-refill-time 100 --ops-size 10 --ops-one-time-burst 5 \
             --ops-refill-time 1000 --poll-us 50 --fault crash_after=7"
        );
    }

    #[test]
    fn test_block_policy_scales_with_queues() {
        let p = DeviceKind::Block.policy(4, true);
        assert_eq!(p.nofile, 96);
        assert_eq!(p.pids_max, 80);
        assert!(p.jail && p.seccomp && p.landlock);
        let off = DeviceKind::Block.policy(1, false);
        assert!(!off.jail && !off.seccomp && !off.landlock);
        assert_eq!(DeviceKind::Block.program_name(), "bulkhead-block");
    }

    #[test]
    fn test_balloon_spec_args_queues_slot_and_no_files() {
        let b = BalloonConfig {
            size: 256 << 20,
            deflate_on_oom: true,
            free_page_reporting: true,
            stats_polling_interval_s: 2,
        };
        let spec = balloon_spec(&b, 3, true);
        assert_eq!(spec.id, "balloon0");
        assert_eq!(
            (spec.kind, spec.slot, spec.queues),
            (DeviceKind::Balloon, 3, 4)
        );
        assert_eq!(DeviceKind::Balloon.virtio_type(), 5);
        assert_eq!(DeviceKind::Balloon.program_name(), "bulkhead-balloon");
        let Backend::Spawn { files, args } = &spec.backend else {
            panic!("{:?}", spec.backend);
        };
        assert!(files.is_empty(), "guest RAM comes in the memory table");
        assert_eq!(
            args.join(" "),
            "--size 268435456 --stats-polling-interval-s 2 --queue-size 128 --deflate-on-oom --free-page-reporting"
        );
        let plain = BalloonConfig {
            size: 0,
            deflate_on_oom: false,
            free_page_reporting: false,
            stats_polling_interval_s: 0,
        };
        assert_eq!(balloon_queues(&plain), 2);
        let with_reporting = BalloonConfig {
            free_page_reporting: true,
            ..plain
        };
        assert_eq!(balloon_queues(&with_reporting), 3);
        assert!(spawner_policy(true)
            .programs
            .iter()
            .any(|p| p.ends_with("bulkhead-balloon")));
    }
}
