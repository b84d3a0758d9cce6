//! The command line, and the checked VM configuration it turns into.
//!
//! Everything a user can get wrong is checked here, before any VM exists: a bad flag, a missing
//! or unreadable file, a kernel that is not an arm64 Image, an initramfs that does not fit.

use std::fs::File;
use std::path::PathBuf;

use bulkhead_firmware::image::{BootLayout, GuestArch, ImageError, KernelImage, LayoutError};
use bulkhead_firmware::layout::{MAX_PCI_SLOTS, MAX_VCPUS_GICV3, RAM_MAX_SIZE, RAM_MIN_SIZE};
use clap::Parser;

use crate::memory::{self, Mechanism, RamBacking};

/// Kernel command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyAMA0";
/// Longest command line an arm64 kernel accepts (COMMAND_LINE_SIZE), including the NUL.
const CMDLINE_MAX: usize = 2048;

/// Bulkhead: a microVM monitor whose devices run as separate, jailed processes.
#[derive(Clone, Debug, Parser)]
#[command(name = "bulkhead", version, about)]
pub struct Args {
    /// Guest kernel: an arm64 `Image`. Without it and `--firmware`, the VMM waits on
    /// `--api-socket` for `vm.create` and `vm.boot` (docs/api.md).
    #[arg(long, value_name = "PATH", required_unless_present_any = ["firmware", "api_socket"])]
    pub kernel: Option<PathBuf>,
    /// UEFI firmware instead of a kernel: an edk2 ArmVirtQemu build (Debian's
    /// qemu-efi-aarch64: AAVMF_CODE.fd or QEMU_EFI.fd), executed in place from flash bank 0;
    /// it boots the disks' `\EFI\BOOT\BOOTAA64.EFI` (docs/uefi.md).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["kernel", "initramfs", "cmdline"])]
    pub firmware: Option<PathBuf>,
    /// The UEFI variable store (flash bank 1) kept in this file, so variables survive the VM;
    /// created from AAVMF_VARS.fd beside the firmware when missing. Without it variables live
    /// in memory for the VMM's life.
    #[arg(long, value_name = "PATH")]
    pub firmware_vars: Option<PathBuf>,
    /// Initramfs (cpio, optionally compressed) handed to the kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// vCPUs: `boot=N`; `affinity=[V@[C,C-C],...]` pins vCPU V's thread to those host CPUs;
    /// `pauth=on|off`: pointer authentication (default: where the host offers it).
    #[arg(
        long,
        value_name = "boot=N[,affinity=..][,pauth=on|off]",
        default_value = "boot=1"
    )]
    pub cpus: String,
    /// Guest RAM: `size=SIZE` (K, M or G suffix); `hugepages=on[,hugepage_size=SIZE]` for the
    /// host's hugetlbfs pool; `thp=off` for no transparent huge pages (docs/memory.md).
    #[arg(
        long,
        value_name = "size=SIZE[,hugepages=on[,hugepage_size=SIZE]][,thp=on|off]",
        default_value = "size=512M"
    )]
    pub memory: String,
    /// Guest console (the PL011): `tty` (this process's stdin and stdout), `file=PATH`, or `off`.
    #[arg(long, value_name = "tty|file=PATH|off", default_value = "tty")]
    pub serial: String,
    /// A virtio console (`hvc0` in the guest), served by a `bulkhead-console` process on a
    /// host end the VMM opens: `off` (none), `tty` (this process's terminal; needs `--serial`
    /// other than `tty`), `pty` (a new pty, its path printed and in `vm.info`),
    /// `file=PATH` (output appended), `socket=PATH` (a Unix socket the VMM listens on, one
    /// client at a time) (docs/console.md).
    #[arg(
        long,
        value_name = "off|tty|pty|file=PATH|socket=PATH",
        default_value = "off"
    )]
    pub console: String,
    /// A disk, repeatable: `path=IMG[,readonly=on][,serial=S][,num_queues=N]` is served by a
    /// `bulkhead-block` process the VMM starts; `socket=PATH[,num_queues=N]` connects to a
    /// vhost-user-blk backend already listening at PATH. `id=NAME` names it (default diskN);
    /// `memory_max=SIZE` and `pids_max=N` override its process's limits (docs/jail-resources.md).
    /// Rate limits (Firecracker's token buckets, one per device): `bw_size`, `bw_one_time_burst`,
    /// `bw_refill_time`, `ops_size`, `ops_one_time_burst`, `ops_refill_time` (docs/disks.md).
    /// `poll_us=N`: its queue workers poll their rings N microseconds before sleeping (off).
    /// A device process that dies is restarted (`restart=on-failure`, the default, with
    /// `restart_max=N` (10) and `restart_backoff_ms=MS` (10, doubled each time); a seccomp
    /// kill only with `restart_on_violation=on`), or not (`restart=never`) (docs/restart.md);
    /// `restart_standby=on` keeps a second process started ahead of need, to take over at once.
    /// `fault=crash_after=N|eio=N|eio=FIRST-LAST|delay_ms=N`: a fault armed in each of its
    /// processes from the start, for testing a guest with a flaky disk (it aborts as it takes
    /// its Nth request; every Nth read or write, or those touching the sectors, fail; every
    /// request waits N ms) (docs/fault-injection.md).
    #[arg(
        long,
        value_name = "path=IMG[,readonly=on][,serial=S][,num_queues=N][,socket=PATH][,id=NAME][,memory_max=SIZE][,pids_max=N][,bw_size=B,bw_refill_time=MS][,ops_size=N,ops_refill_time=MS][,poll_us=N][,restart=on-failure|never][,restart_max=N][,restart_backoff_ms=MS][,restart_on_violation=on][,restart_standby=on][,fault=crash_after=N|eio=N|eio=A-B|delay_ms=N]"
    )]
    pub disk: Vec<String>,
    /// A network interface, repeatable, served by a `bulkhead-net` process on a tap:
    /// `tap=NAME[,mac=MAC][,ip=IP,mask=MASK][,mtu=N][,num_queues=N][,queue_size=N][,id=ID]`
    /// (the VMM opens or creates the tap), `fd=N[:M...]` (tap queues the caller opened, one
    /// per queue pair), or `socket=PATH` (a vhost-user-net backend already listening). Rate
    /// limits: `bw_size`, `bw_one_time_burst`, `bw_refill_time`, `ops_size`,
    /// `ops_one_time_burst`, `ops_refill_time`, each also with an `rx_` or `tx_` prefix
    /// (docs/net.md).
    #[arg(
        long,
        value_name = "tap=NAME|fd=N[:M...]|socket=PATH[,mac=MAC][,ip=IP,mask=MASK][,mtu=N][,num_queues=N][,queue_size=N][,id=ID][,restart=on-failure|never][,restart_max=N][,restart_backoff_ms=MS][,restart_on_violation=on][,restart_standby=on][,fault=drop=N|corrupt=N]"
    )]
    pub net: Vec<String>,
    /// A memory balloon, served by a `bulkhead-balloon` process: `size=SIZE` is the first
    /// target (how much of guest RAM the guest gives back; changed at run time with the API's
    /// `vm.resize`), `deflate_on_oom=on` lets the guest take pages back before an OOM kill,
    /// `free_page_reporting=on` releases the free pages the guest reports,
    /// `stats_polling_interval_s=N` asks for the guest's memory statistics every N seconds
    /// (`vm.balloon-statistics`; 0, the default: none) (docs/balloon.md).
    #[arg(
        long,
        value_name = "size=SIZE[,deflate_on_oom=on][,free_page_reporting=on][,stats_polling_interval_s=N]"
    )]
    pub balloon: Option<String>,
    /// Run device processes as this host uid (and gid; default: the uid's number). Only for a
    /// VMM running as root.
    #[arg(long, value_name = "UID[:GID]")]
    pub device_uid: Option<String>,
    /// The cgroup v2 directory under which each VM's device cgroups are made (default: the
    /// VMM's own cgroup, which the VMM then leaves for a leaf of its own).
    #[arg(long, value_name = "PATH")]
    pub cgroup_parent: Option<PathBuf>,
    /// PCIe root ports, each a slot for one device: 1 to 31.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub pci_slots: usize,
    /// Seccomp filters on the VMM's threads (and, later, the device processes' jails): `on`,
    /// or `off` to debug a filter (insecure; a loud warning is printed).
    #[arg(long, value_name = "on|off", default_value = "on")]
    pub sandbox: String,
    /// The REST API (docs/api.md): a Unix socket the VMM creates with mode 0600 (`PATH` or
    /// `path=PATH`), or a listening Unix stream socket it inherits (`fd=N`), as Cloud
    /// Hypervisor's `--api-socket`.
    #[arg(long, value_name = "PATH|path=PATH|fd=N")]
    pub api_socket: Option<String>,
    /// More log output on stderr (-v info, -vv debug); RUST_LOG overrides it.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// A configuration error: the VM is not started.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A `key=value` option list did not parse.
    #[error("--{flag}: {reason}")]
    Option {
        /// The flag.
        flag: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A file could not be opened.
    #[error("cannot open {what} {path:?}")]
    Open {
        /// What the file was for.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is not a usable arm64 Image.
    #[error("kernel {path:?}")]
    Kernel {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: ImageError,
    },
    /// Kernel, initramfs and device tree do not fit in RAM.
    #[error("the boot images do not fit in {ram_mib} MiB of RAM")]
    Layout {
        /// Size of RAM.
        ram_mib: u64,
        /// Why.
        #[source]
        source: LayoutError,
    },
    /// The kernel command line is not acceptable.
    #[error("--cmdline: {0}")]
    Cmdline(String),
    /// The firmware or its variable store is not usable.
    #[error(transparent)]
    Firmware(#[from] crate::legacy::cfi_flash::FlashError),
}

/// Where the guest console goes.
#[derive(Debug)]
pub enum SerialConfig {
    /// This process's stdin and stdout.
    Tty,
    /// Output appended to a file; no input.
    File(File),
    /// Output discarded; no input. The PL011 is still there.
    Off,
}

/// `--console`: where the virtio console's host end is (Cloud Hypervisor's names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// No virtio console (the default; the PL011 is always there).
    Off,
    /// The VMM's own terminal (stdin and stdout).
    Tty,
    /// A new pty.
    Pty,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// A Unix socket the VMM binds and listens on; the device accepts one client at a time.
    Socket(PathBuf),
}

/// `--console off|tty|pty|file=PATH|socket=PATH`; `serial` is the PL011's setting (`tty` for
/// both is refused: one terminal cannot feed two consoles).
pub(crate) fn parse_console(
    value: &str,
    serial: &SerialConfig,
) -> Result<ConsoleConfig, ConfigError> {
    let bad = |reason: String| ConfigError::Option {
        flag: "console",
        reason,
    };
    let console = match value {
        "off" => ConsoleConfig::Off,
        "tty" => ConsoleConfig::Tty,
        "pty" => ConsoleConfig::Pty,
        _ => match value.split_once('=') {
            Some(("file", path)) if !path.is_empty() => ConsoleConfig::File(path.into()),
            Some(("socket", path)) if !path.is_empty() => {
                // sun_path holds 108 bytes, the terminating NUL included.
                if path.len() > 107 {
                    return Err(bad(format!(
                        "socket={path:?}: a Unix socket path is at most 107 bytes"
                    )));
                }
                ConsoleConfig::Socket(path.into())
            }
            _ => {
                return Err(bad(format!(
                    "expected off, tty, pty, file=PATH or socket=PATH, got {value:?}"
                )))
            }
        },
    };
    if console == ConsoleConfig::Tty && matches!(serial, SerialConfig::Tty) {
        return Err(bad(
            "tty: the terminal is already the serial console's (--serial tty, the default); \
             give --serial off or --serial file=PATH, or another --console"
                .into(),
        ));
    }
    Ok(console)
}

/// Most queues a disk may have.
pub const MAX_DISK_QUEUES: u16 = 16;
/// Entries per disk queue unless `queue_size=` says otherwise.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Largest `poll_us` of a disk (bulkhead-block's `--poll-us` bound).
pub const MAX_DISK_POLL_US: u32 = 10_000;
/// Most entries a disk queue may have.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Longest disk serial (virtio-blk's GET_ID buffer).
const MAX_SERIAL: usize = 20;

/// Who serves a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskBackend {
    /// A `bulkhead-block` process the VMM starts on this image.
    Process {
        /// The image.
        path: PathBuf,
        /// Refuse writes.
        readonly: bool,
        /// Serial number the guest reads (GET_ID).
        serial: Option<String>,
        /// Bypass the host page cache (O_DIRECT).
        direct: bool,
        /// `bw_*`, `ops_*`: the device's token buckets (one limiter for all its queues).
        rate_limit: RateLimit,
        /// `poll_us=N`: microseconds a queue worker polls its ring before it sleeps (0: off;
        /// bulkhead-block `--poll-us`).
        poll_us: u32,
    },
    /// A vhost-user-blk backend someone else started, listening here.
    Socket(PathBuf),
}

/// One `--disk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Who serves it.
    pub backend: DiskBackend,
    /// Number of queues.
    pub num_queues: u16,
    /// Entries per queue, at most.
    pub queue_size: u16,
    /// `id=`: the device's name in logs and its cgroup (default diskN).
    pub id: Option<String>,
    /// `memory_max=`: the device process's own memory budget in bytes.
    pub memory_max: Option<u64>,
    /// `pids_max=`: the device process's task limit.
    pub pids_max: Option<u64>,
    /// `restart=`, `restart_max=`, `restart_backoff_ms=`, `restart_on_violation=`,
    /// `restart_standby=` (docs/restart.md).
    pub restart: crate::device::restart::RestartPolicy,
    /// `fault=`: a fault armed in each of its processes from the start
    /// (docs/fault-injection.md).
    pub fault: Option<String>,
}

/// `--disk`: the options, then a check that the image opens as its process will need it.
fn parse_disk(value: &str) -> Result<DiskConfig, ConfigError> {
    let disk = parse_disk_options(value)?;
    check_disk_image(&disk)?;
    Ok(disk)
}

/// The image of a disk served by a process opens as its process will need it.
fn check_disk_image(disk: &DiskConfig) -> Result<(), ConfigError> {
    if let DiskBackend::Process { path, readonly, .. } = &disk.backend {
        File::options()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|source| ConfigError::Open {
                what: "disk image",
                path: path.clone(),
                source,
            })?;
    }
    Ok(())
}

/// `--disk`'s options, checked without touching any file (the API's `vm.add-disk` parses
/// them in a thread that may open nothing).
pub fn parse_disk_options(value: &str) -> Result<DiskConfig, ConfigError> {
    let bad = |reason: String| ConfigError::Option {
        flag: "disk",
        reason,
    };
    let opts = parse_options(
        "disk",
        value,
        &[
            "path",
            "readonly",
            "serial",
            "num_queues",
            "queue_size",
            "direct",
            "socket",
            "id",
            "memory_max",
            "pids_max",
            "poll_us",
            "restart",
            "restart_max",
            "restart_backoff_ms",
            "restart_on_violation",
            "restart_standby",
            "fault",
        ]
        .into_iter()
        .chain(RATE_LIMIT_OPTIONS)
        .collect::<Vec<_>>(),
    )?;
    let get = |k: &str| opts.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
    let poll_us = match get("poll_us") {
        None => 0,
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| *n <= MAX_DISK_POLL_US)
            .ok_or_else(|| bad(format!("poll_us={v:?}: expected 0 to {MAX_DISK_POLL_US}")))?,
    };
    let restart = crate::device::restart::RestartPolicy::parse(get).map_err(bad)?;
    let fault = match get("fault") {
        None => None,
        Some(f) if is_nic_fault(f) => return Err(bad(format!("fault={f:?}: a NIC's fault"))),
        Some(f) => {
            check_fault(f, true).map_err(|e| bad(format!("fault={f:?}: {e}")))?;
            Some(f.to_string())
        }
    };
    let readonly = match get("readonly") {
        None | Some("off") => false,
        Some("on") => true,
        Some(v) => return Err(bad(format!("readonly={v:?}: expected on or off"))),
    };
    let direct = match get("direct") {
        None | Some("off") => false,
        Some("on") => true,
        Some(v) => return Err(bad(format!("direct={v:?}: expected on or off"))),
    };
    let num_queues = match get("num_queues") {
        None => 1,
        Some(v) => v
            .parse::<u16>()
            .ok()
            .filter(|n| (1..=MAX_DISK_QUEUES).contains(n))
            .ok_or_else(|| bad(format!("num_queues={v:?}: expected 1 to {MAX_DISK_QUEUES}")))?,
    };
    let queue_size = match get("queue_size") {
        None => DEFAULT_QUEUE_SIZE,
        Some(v) => v
            .parse::<u16>()
            .ok()
            .filter(|n| n.is_power_of_two() && (2..=MAX_QUEUE_SIZE).contains(n))
            .ok_or_else(|| {
                bad(format!(
                    "queue_size={v:?}: expected a power of two from 2 to {MAX_QUEUE_SIZE}"
                ))
            })?,
    };
    let id = get("id").map(str::to_string);
    if let Some(id) = &id {
        let ok = !id.is_empty()
            && id.len() <= 32
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && id != "vmm";
        if !ok {
            return Err(bad(format!(
                "id={id:?}: 1 to 32 letters, digits, '-' or '_' (and not \"vmm\")"
            )));
        }
    }
    let memory_max = match get("memory_max") {
        None => None,
        Some(v) => Some(
            parse_size(v)
                .filter(|n| *n >= 16 << 20)
                .ok_or_else(|| bad(format!("memory_max={v:?}: expected a size of 16M or more")))?,
        ),
    };
    let pids_max = match get("pids_max") {
        None => None,
        Some(v) => Some(
            v.parse::<u64>()
                .ok()
                .filter(|n| (8..=65536).contains(n))
                .ok_or_else(|| bad(format!("pids_max={v:?}: expected 8 to 65536")))?,
        ),
    };
    let rate_limit = parse_rate_limit("disk", "", get)?;
    let serial = get("serial").map(str::to_string);
    if let Some(s) = &serial {
        if s.len() > MAX_SERIAL || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad(format!(
                "serial={s:?}: at most {MAX_SERIAL} printable ASCII characters"
            )));
        }
    }
    let backend = match (get("path"), get("socket")) {
        (Some(path), None) if !path.is_empty() => DiskBackend::Process {
            path: path.into(),
            readonly,
            serial,
            direct,
            rate_limit,
            poll_us,
        },
        (None, Some(socket)) if !socket.is_empty() => {
            if readonly || serial.is_some() || direct || !rate_limit.is_empty() || poll_us > 0 {
                return Err(bad(
                    "readonly, serial, direct, poll_us and the rate limits belong to the backend's own options with socket="
                        .into(),
                ));
            }
            DiskBackend::Socket(socket.into())
        }
        (Some(_), Some(_)) => return Err(bad("give path= or socket=, not both".into())),
        _ => return Err(bad("path=IMG or socket=PATH is required".into())),
    };
    if (restart != crate::device::restart::RestartPolicy::default() || fault.is_some())
        && matches!(backend, DiskBackend::Socket(_))
    {
        return Err(bad(
            "the restart options are for a device process the VMM starts (path=), not socket="
                .into(),
        ));
    }
    Ok(DiskConfig {
        backend,
        num_queues,
        queue_size,
        id,
        memory_max,
        pids_max,
        restart,
        fault,
    })
}

/// Most queue pairs a network interface may have.
pub const MAX_NET_QUEUE_PAIRS: u16 = 16;
/// The token-bucket options of `--disk` and (without their `rx_`/`tx_` prefix) `--net`
/// (Cloud Hypervisor's names; sizes in bytes or operations, refill times in milliseconds).
pub const RATE_LIMIT_OPTIONS: [&str; 6] = [
    "bw_size",
    "bw_one_time_burst",
    "bw_refill_time",
    "ops_size",
    "ops_one_time_burst",
    "ops_refill_time",
];

/// The token-bucket options [`RATE_LIMIT_OPTIONS`] that `lookup` finds (it is given the
/// option's name without `prefix`, which only names it in errors): each a positive number
/// (a one-time burst may be 0), a bucket's size and refill time together, its one-time burst
/// only with them.
fn parse_rate_limit<'a>(
    flag: &'static str,
    prefix: &str,
    lookup: impl Fn(&str) -> Option<&'a str>,
) -> Result<RateLimit, ConfigError> {
    let bad = |reason: String| ConfigError::Option { flag, reason };
    let mut limit = RateLimit::new();
    for o in RATE_LIMIT_OPTIONS {
        let Some(v) = lookup(o) else {
            continue;
        };
        let n = v
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0 || o.ends_with("one_time_burst"))
            .ok_or_else(|| bad(format!("{prefix}{o}={v:?}: expected a positive number")))?;
        limit.push((o, n));
    }
    for kind in ["bw", "ops"] {
        let has = |s: &str| limit.iter().any(|(k, _)| *k == format!("{kind}_{s}"));
        if has("size") != has("refill_time") || (has("one_time_burst") && !has("size")) {
            return Err(bad(format!(
                "{prefix}{kind}: a token bucket needs {kind}_size and {kind}_refill_time (ms) together, and {kind}_one_time_burst only with them"
            )));
        }
    }
    Ok(limit)
}

/// Who serves a network interface, and on what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackend {
    /// A `bulkhead-net` process on tap `name`, which the VMM opens (creating it if needed).
    Tap {
        /// The interface name.
        name: String,
        /// `ip=`, `mask=`: the host side's address, set when the VM starts.
        addr: Option<(std::net::Ipv4Addr, std::net::Ipv4Addr)>,
    },
    /// A `bulkhead-net` process on tap queues the caller opened (inherited descriptors, one
    /// per queue pair, checked with TUNGETIFF); the tap's name as the kernel reports it.
    Fds {
        /// The descriptors.
        fds: Vec<std::os::fd::RawFd>,
        /// The tap they are queues of.
        name: String,
    },
    /// A vhost-user-net backend someone else started, listening here.
    Socket(PathBuf),
}

/// Token-bucket limits of one direction: (option without prefix, value), in
/// [`RATE_LIMIT_OPTIONS`] order, only those given.
pub type RateLimit = Vec<(&'static str, u64)>;

/// `--balloon`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalloonConfig {
    /// The first target, in bytes: what the guest gives back.
    pub size: u64,
    /// VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// VIRTIO_BALLOON_F_REPORTING.
    pub free_page_reporting: bool,
    /// VIRTIO_BALLOON_F_STATS_VQ when not zero: seconds between statistics requests.
    pub stats_polling_interval_s: u32,
}

/// The longest statistics polling interval (a day), as `bulkhead-balloon` accepts it.
pub const BALLOON_MAX_STATS_INTERVAL_S: u32 = 86_400;

/// `--balloon size=SIZE[,deflate_on_oom=on|off][,free_page_reporting=on|off]
/// [,stats_polling_interval_s=N]` for a guest of `ram_size` bytes.
pub(crate) fn parse_balloon(value: &str, ram_size: u64) -> Result<BalloonConfig, ConfigError> {
    let bad = |reason: String| ConfigError::Option {
        flag: "balloon",
        reason,
    };
    let opts = parse_options(
        "balloon",
        value,
        &[
            "size",
            "deflate_on_oom",
            "free_page_reporting",
            "stats_polling_interval_s",
        ],
    )?;
    let get = |k: &str| opts.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
    let text =
        get("size").ok_or_else(|| bad("size=SIZE is required (0 to start deflated)".into()))?;
    let size = parse_size(text).ok_or_else(|| {
        bad(format!(
            "size={text:?} is not a size (examples: 0, 512M, 1G)"
        ))
    })?;
    if size % 4096 != 0 {
        return Err(bad(format!(
            "size={text} is not a multiple of 4K (the balloon's page)"
        )));
    }
    if size > ram_size {
        return Err(bad(format!(
            "size={text} is larger than guest RAM ({}M)",
            ram_size >> 20
        )));
    }
    let switch = |k: &str| match get(k) {
        None | Some("off") => Ok(false),
        Some("on") => Ok(true),
        Some(v) => Err(bad(format!("{k}={v:?}: expected on or off"))),
    };
    let stats_polling_interval_s = match get("stats_polling_interval_s") {
        None => 0,
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| *n <= BALLOON_MAX_STATS_INTERVAL_S)
            .ok_or_else(|| {
                bad(format!(
                    "stats_polling_interval_s={v:?}: expected seconds, 0 to {BALLOON_MAX_STATS_INTERVAL_S}"
                ))
            })?,
    };
    Ok(BalloonConfig {
        size,
        deflate_on_oom: switch("deflate_on_oom")?,
        free_page_reporting: switch("free_page_reporting")?,
        stats_polling_interval_s,
    })
}

/// One `--net`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Who serves it.
    pub backend: NetBackend,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// `mtu=`: advertised to the guest (VIRTIO_NET_F_MTU) and set on a tap the VMM opens.
    pub mtu: Option<u16>,
    /// Queues (rx + tx): twice the queue pairs.
    pub num_queues: u16,
    /// Entries per queue, at most.
    pub queue_size: u16,
    /// `id=`: the device's name in logs and its cgroup (default netN).
    pub id: Option<String>,
    /// Receive (guest-bound) limits.
    pub rx_limit: RateLimit,
    /// Transmit (guest-sent) limits.
    pub tx_limit: RateLimit,
    /// `restart=`, `restart_max=`, `restart_backoff_ms=`, `restart_on_violation=`,
    /// `restart_standby=` (docs/restart.md).
    pub restart: crate::device::restart::RestartPolicy,
    /// `fault=drop=N` or `fault=corrupt=N`: a fault armed in each of its processes from the start
    /// (docs/fault-injection.md).
    pub fault: Option<String>,
}

impl NetConfig {
    /// Queue pairs.
    pub fn queue_pairs(&self) -> u16 {
        self.num_queues / 2
    }
}

/// Formats a MAC address as `52:54:00:12:34:56`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `XX:XX:XX:XX:XX:XX` (hex digits, `:` or `-`), refusing multicast and all-zero
/// addresses, which no NIC may have.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    (mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

/// The default MAC of interface `id`: locally administered, unicast, and the same for the
/// same id every time (FNV-1a of the id), so a guest keeps its address across runs. Two VMs
/// on one segment need different ids or `mac=`.
pub fn default_mac(id: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    // 0x52: bit 1 set (locally administered), bit 0 clear (unicast), as QEMU's 52:54:...
    [0x52, b[3], b[4], b[5], b[6], b[7]]
}

/// Whether `id` is a usable device id: 1 to 32 letters, digits, `-` or `_`, not `vmm`.
pub(crate) fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 32
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && id != "vmm"
}

/// Every device id is used once: the disks' and network interfaces' (`id=`, or `diskN` and
/// `netN`), and the fixed ids of the console and the balloon when there is one
/// (`device::CONSOLE_ID`, `device::BALLOON_ID`), which a disk or interface may not take.
fn check_device_ids(
    disks: &[DiskConfig],
    nets: &[NetConfig],
    console: bool,
    balloon: bool,
) -> Result<(), ConfigError> {
    let mut ids: Vec<String> = Vec::new();
    if console {
        ids.push(crate::device::CONSOLE_ID.to_string());
    }
    if balloon {
        ids.push(crate::device::BALLOON_ID.to_string());
    }
    let disk_ids = disks
        .iter()
        .enumerate()
        .map(|(i, d)| ("disk", d.id.clone().unwrap_or_else(|| format!("disk{i}"))));
    let net_ids = nets
        .iter()
        .enumerate()
        .map(|(i, n)| ("net", n.id.clone().unwrap_or_else(|| format!("net{i}"))));
    for (flag, id) in disk_ids.chain(net_ids) {
        if ids.contains(&id) {
            return Err(ConfigError::Option {
                flag,
                reason: format!("id={id:?} is used twice (the console is \"console\", the balloon \"balloon0\")"),
            });
        }
        ids.push(id);
    }
    Ok(())
}

/// Longest `delay_ms=` fault (the device refuses more too).
pub const MAX_FAULT_DELAY_MS: u64 = 60_000;

/// Whether `fault` is one only a NIC takes (`drop=N`, `corrupt=N`).
fn is_nic_fault(fault: &str) -> bool {
    fault.starts_with("drop=") || fault.starts_with("corrupt=")
}

/// Checks a fault for a device process (docs/fault-injection.md): at start (`fault=` of
/// `--disk`) `crash_after=N`, `eio=N`, `eio=A-B` or `delay_ms=N`; through the API also
/// `crash`, `seccomp`, `hang`, `oom` and `clear`. The device process checks again (it trusts
/// nobody); this gives the caller a clear error before anything is sent.
pub fn check_fault(fault: &str, at_start: bool) -> Result<(), String> {
    let number = |what: &str, n: &str, min: u64, max: u64| {
        n.parse::<u64>()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .map(|_| ())
            .ok_or_else(|| format!("{what}={n:?}: expected a number from {min} to {max}"))
    };
    let expected = if at_start {
        "crash_after=N, eio=N, eio=A-B (sectors), delay_ms=N (disks), drop=N or corrupt=N (NICs)"
    } else {
        "crash, seccomp, hang, oom, clear, crash_after=N, eio=N, eio=A-B (sectors), delay_ms=N, drop=N or corrupt=N"
    };
    match fault.split_once('=') {
        Some(("crash_after", n)) => number("crash_after", n, 1, u64::MAX),
        Some(("delay_ms", n)) => number("delay_ms", n, 1, MAX_FAULT_DELAY_MS),
        Some(("drop", n)) => number("drop", n, 1, u64::MAX),
        Some(("corrupt", n)) => number("corrupt", n, 1, u64::MAX),
        Some(("eio", v)) => match v.split_once('-') {
            None => number("eio", v, 1, u64::MAX),
            Some((a, b)) => match (a.parse::<u64>(), b.parse::<u64>()) {
                (Ok(a), Ok(b)) if a <= b => Ok(()),
                (Ok(_), Ok(_)) => Err(format!("eio={v}: the first sector is after the last")),
                _ => Err(format!("eio={v:?}: expected N or FIRST-LAST (sectors)")),
            },
        },
        None if !at_start && ["crash", "seccomp", "hang", "oom", "clear"].contains(&fault) => {
            Ok(())
        }
        _ => Err(format!("unknown fault {fault:?}: expected {expected}")),
    }
}

/// One PCIe slot per device: the disks, the network interfaces, the console (if any) and the
/// balloon (if any) together fit in `slots`, in that order (device::specs); the error names
/// the option of the first device left without a slot.
fn check_device_slots(
    disks: usize,
    nets: usize,
    console: bool,
    balloon: bool,
    slots: usize,
) -> Result<(), ConfigError> {
    if disks + nets > slots {
        return Err(ConfigError::Option {
            flag: "net",
            reason: format!(
                "{disks} disks and {nets} network interfaces but {slots} PCIe slots, one per device (raise --pci-slots)"
            ),
        });
    }
    if console && disks + nets >= slots {
        return Err(ConfigError::Option {
            flag: "console",
            reason: format!(
                "{disks} disks, {nets} network interfaces and the console but {slots} PCIe slots, one per device (raise --pci-slots)"
            ),
        });
    }
    if balloon && disks + nets + usize::from(console) >= slots {
        let console = if console { " and the console" } else { "" };
        return Err(ConfigError::Option {
            flag: "balloon",
            reason: format!(
                "no PCIe slot left for the balloon after {disks} disks, {nets} network interfaces{console} (raise --pci-slots)"
            ),
        });
    }
    Ok(())
}

/// `--net`; `index` names it when `id=` is not given (`net0`, `net1`...).
pub(crate) fn parse_net(value: &str, index: usize) -> Result<NetConfig, ConfigError> {
    let bad = |reason: String| ConfigError::Option {
        flag: "net",
        reason,
    };
    let mut known = vec![
        "tap",
        "fd",
        "socket",
        "mac",
        "ip",
        "mask",
        "mtu",
        "num_queues",
        "queue_size",
        "id",
    ];
    let prefixed: Vec<String> = ["rx_", "tx_"]
        .iter()
        .flat_map(|p| RATE_LIMIT_OPTIONS.iter().map(move |o| format!("{p}{o}")))
        .collect();
    known.extend(RATE_LIMIT_OPTIONS);
    known.extend(prefixed.iter().map(String::as_str));
    known.extend(crate::device::restart::OPTIONS);
    known.push("fault");
    let opts = parse_options("net", value, &known)?;
    let get = |k: &str| opts.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);

    let id = get("id").map(str::to_string);
    if let Some(id) = &id {
        if !valid_device_id(id) {
            return Err(bad(format!(
                "id={id:?}: 1 to 32 letters, digits, '-' or '_' (and not \"vmm\")"
            )));
        }
    }
    let name = id.clone().unwrap_or_else(|| format!("net{index}"));
    let mac = match get("mac") {
        None => default_mac(&name),
        Some(v) => parse_mac(v).ok_or_else(|| {
            bad(format!(
                "mac={v:?}: expected six hex bytes like 52:54:00:12:34:56, unicast (even first byte) and not all zero"
            ))
        })?,
    };
    let mtu = match get("mtu") {
        None => None,
        Some(v) => Some(
            v.parse::<u16>()
                .ok()
                .filter(|n| *n >= 68)
                .ok_or_else(|| bad(format!("mtu={v:?}: expected 68 to 65535")))?,
        ),
    };
    let num_queues = match get("num_queues") {
        None => None,
        Some(v) => {
            let n = v
                .parse::<u16>()
                .ok()
                .filter(|n| (2..=2 * MAX_NET_QUEUE_PAIRS).contains(n));
            let n = n.ok_or_else(|| {
                bad(format!(
                    "num_queues={v:?}: expected an even number from 2 to {} (an rx and a tx queue per pair)",
                    2 * MAX_NET_QUEUE_PAIRS
                ))
            })?;
            if n % 2 != 0 {
                return Err(bad(format!(
                    "num_queues={n} is odd: queues come in pairs (one rx, one tx), give 2, 4, ..."
                )));
            }
            Some(n)
        }
    };
    let queue_size = match get("queue_size") {
        None => DEFAULT_QUEUE_SIZE,
        Some(v) => v
            .parse::<u16>()
            .ok()
            .filter(|n| n.is_power_of_two() && (2..=MAX_QUEUE_SIZE).contains(n))
            .ok_or_else(|| {
                bad(format!(
                    "queue_size={v:?}: expected a power of two from 2 to {MAX_QUEUE_SIZE}"
                ))
            })?,
    };
    let ipv4 = |k: &str| -> Result<Option<std::net::Ipv4Addr>, ConfigError> {
        get(k)
            .map(|v| {
                v.parse::<std::net::Ipv4Addr>()
                    .map_err(|_| bad(format!("{k}={v:?}: expected an IPv4 address")))
            })
            .transpose()
    };
    let addr = match (ipv4("ip")?, ipv4("mask")?) {
        (Some(ip), Some(mask)) => {
            let m = u32::from(mask);
            if m.leading_ones() + m.trailing_zeros() != 32 {
                return Err(bad(format!(
                    "mask={mask}: not a netmask (ones, then zeros)"
                )));
            }
            Some((ip, mask))
        }
        (None, None) => None,
        _ => return Err(bad("ip= and mask= go together".into())),
    };
    // A direction's own option wins over the one for both directions.
    let rx_limit = parse_rate_limit("net", "rx_", |o| get(&format!("rx_{o}")).or_else(|| get(o)))?;
    let tx_limit = parse_rate_limit("net", "tx_", |o| get(&format!("tx_{o}")).or_else(|| get(o)))?;

    let backend = match (get("tap"), get("fd"), get("socket")) {
        (Some(tap), None, None) => {
            if !crate::tap::valid_name(tap) {
                return Err(bad(format!(
                    "tap={tap:?}: an interface name is 1 to {} letters, digits, '-', '_' or '.'",
                    crate::tap::MAX_NAME
                )));
            }
            NetBackend::Tap {
                name: tap.into(),
                addr,
            }
        }
        (None, Some(fds), None) => {
            let list = fds
                .split(':')
                .map(|f| f.parse::<std::os::fd::RawFd>().ok().filter(|n| *n >= 3))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    bad(format!(
                        "fd={fds:?}: expected descriptor numbers (3 or more) separated by ':'"
                    ))
                })?;
            if list.len() > usize::from(MAX_NET_QUEUE_PAIRS) {
                return Err(bad(format!(
                    "fd={fds}: at most {MAX_NET_QUEUE_PAIRS} queues"
                )));
            }
            if (1..list.len()).any(|i| list[..i].contains(&list[i])) {
                return Err(bad(format!("fd={fds}: a descriptor is given twice")));
            }
            if let Some(n) = num_queues {
                if usize::from(n) != 2 * list.len() {
                    return Err(bad(format!(
                        "num_queues={n} but fd= gives {} tap queues (one per queue pair)",
                        list.len()
                    )));
                }
            }
            if addr.is_some() {
                return Err(bad(
                    "ip= and mask= configure a tap the VMM opens (tap=), not one handed in with fd="
                        .into(),
                ));
            }
            let name = crate::tap::check_queue_fds(&list).map_err(|e| bad(e.to_string()))?;
            NetBackend::Fds { fds: list, name }
        }
        (None, None, Some(socket)) if !socket.is_empty() => {
            if addr.is_some() || !rx_limit.is_empty() || !tx_limit.is_empty() {
                return Err(bad(
                    "ip=, mask= and the rate limits belong to the backend's own options with socket="
                        .into(),
                ));
            }
            NetBackend::Socket(socket.into())
        }
        (None, None, None) => {
            return Err(bad(
                "tap=NAME, fd=N[:M...] or socket=PATH is required".into()
            ))
        }
        _ => return Err(bad("give one of tap=, fd= and socket=".into())),
    };
    let num_queues = match &backend {
        NetBackend::Fds { fds, .. } => 2 * fds.len() as u16,
        _ => num_queues.unwrap_or(2),
    };
    let restart = crate::device::restart::RestartPolicy::parse(get).map_err(bad)?;
    if restart != crate::device::restart::RestartPolicy::default()
        && matches!(backend, NetBackend::Socket(_))
    {
        return Err(bad(
            "the restart options are for a device process the VMM starts (tap= or fd=), not socket="
                .into(),
        ));
    }
    let fault = match get("fault") {
        None => None,
        Some(_) if matches!(backend, NetBackend::Socket(_)) => {
            return Err(bad(
                "fault= is for a device process the VMM starts (tap= or fd=), not socket=".into(),
            ))
        }
        Some(f) if is_nic_fault(f) => {
            check_fault(f, true).map_err(|e| bad(format!("fault={f:?}: {e}")))?;
            Some(f.to_string())
        }
        Some(f) => {
            return Err(bad(format!(
                "fault={f:?}: a NIC takes drop=N or corrupt=N at start"
            )))
        }
    };
    Ok(NetConfig {
        backend,
        mac,
        mtu,
        num_queues,
        queue_size,
        id,
        rx_limit,
        tx_limit,
        restart,
        fault,
    })
}

/// What the boot vCPU starts in.
#[derive(Debug)]
pub enum BootConfig {
    /// A Linux kernel loaded into RAM (`--kernel`).
    Kernel {
        /// The kernel file and what its header says.
        kernel: (File, KernelImage),
        /// The initramfs file, if any.
        initramfs: Option<File>,
        /// Where everything goes in RAM.
        layout: BootLayout,
    },
    /// UEFI firmware executed in place from flash (`--firmware`).
    Firmware {
        /// The firmware file, mapped into flash bank 0.
        code: File,
        /// Its instruction set, from its first instruction.
        arch: GuestArch,
        /// What backs flash bank 1.
        vars: crate::legacy::cfi_flash::VarsStore,
    },
}

impl BootConfig {
    /// The instruction set the guest starts in: the kernel's or the firmware's.
    pub fn guest_arch(&self) -> GuestArch {
        match self {
            Self::Kernel {
                kernel: (_, image), ..
            } => image.arch,
            Self::Firmware { arch, .. } => *arch,
        }
    }
}

/// `--firmware` and `--firmware-vars`, checked and opened (the vars file created if missing).
fn firmware_boot(
    firmware: &std::path::Path,
    vars: Option<&PathBuf>,
) -> Result<BootConfig, ConfigError> {
    use crate::legacy::cfi_flash::{check_firmware, open_vars, vars_template, VarsStore};
    use std::os::unix::fs::FileExt;
    let code = check_firmware(firmware)?;
    let mut first = [0u8; 4];
    code.read_exact_at(&mut first, 0)
        .map_err(|source| ConfigError::Open {
            what: "firmware",
            path: firmware.to_path_buf(),
            source,
        })?;
    let word = u32::from_le_bytes(first);
    let arch = bulkhead_firmware::image::firmware_arch(word).unwrap_or_else(|| {
        log::warn!(
            "firmware {}: its first word {word:#010x} is neither an A64 nor an A32 branch; \
             starting it as arm64 code",
            firmware.display()
        );
        GuestArch::Aarch64
    });
    log::info!("firmware {}: {arch} code", firmware.display());
    let vars = match vars {
        Some(path) => VarsStore::File(open_vars(path, vars_template(firmware, arch).as_deref())?),
        None => VarsStore::Memory,
    };
    Ok(BootConfig::Firmware { code, arch, vars })
}

/// `--kernel` and `--initramfs`, checked and opened, and where they go in RAM.
fn kernel_boot(
    args: &Args,
    kernel_path: &PathBuf,
    ram_size: u64,
) -> Result<BootConfig, ConfigError> {
    let mut kernel = open("kernel", kernel_path)?;
    let image = KernelImage::from_file(&mut kernel).map_err(|source| ConfigError::Kernel {
        path: kernel_path.clone(),
        source,
    })?;
    let initramfs = args
        .initramfs
        .as_ref()
        .map(|p| open("initramfs", p))
        .transpose()?;
    let initramfs_size = initramfs
        .as_ref()
        .zip(args.initramfs.as_ref())
        .map(|(f, p)| {
            f.metadata()
                .map(|m| m.len())
                .map_err(|source| ConfigError::Open {
                    what: "initramfs",
                    path: p.clone(),
                    source,
                })
        })
        .transpose()?;
    let layout = BootLayout::new(ram_size, &image, initramfs_size).map_err(|source| {
        ConfigError::Layout {
            ram_mib: ram_size >> 20,
            source,
        }
    })?;
    Ok(BootConfig::Kernel {
        kernel: (kernel, image),
        initramfs,
        layout,
    })
}

/// Where the REST API listens (`--api-socket`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiSocket {
    /// A socket the VMM creates at this path.
    Path(PathBuf),
    /// A listening socket the VMM inherited at this descriptor.
    Fd(std::os::fd::RawFd),
}

/// `--api-socket PATH|path=PATH|fd=N` (Cloud Hypervisor's forms).
pub fn parse_api_socket(value: &str) -> Result<ApiSocket, ConfigError> {
    let bad = |reason: String| ConfigError::Option {
        flag: "api-socket",
        reason,
    };
    if let Some(fd) = value.strip_prefix("fd=") {
        return fd
            .parse::<std::os::fd::RawFd>()
            .ok()
            .filter(|n| *n >= 3)
            .map(ApiSocket::Fd)
            .ok_or_else(|| {
                bad(format!(
                    "fd={fd:?}: expected a descriptor number, 3 or more"
                ))
            });
    }
    let path = value.strip_prefix("path=").unwrap_or(value);
    if path.is_empty() {
        return Err(bad("expected PATH, path=PATH or fd=N".into()));
    }
    // sun_path holds 108 bytes, the terminating NUL included.
    if path.len() > 107 {
        return Err(bad(format!(
            "{path:?}: a Unix socket path is at most 107 bytes"
        )));
    }
    Ok(ApiSocket::Path(path.into()))
}

/// Whether the command line leaves the VM to `vm.create` (no `--kernel`, no `--firmware`).
pub fn waits_for_create(args: &Args) -> bool {
    args.kernel.is_none() && args.firmware.is_none()
}

/// What a VMM waiting for `vm.create` needs from its command line: `--sandbox` and
/// `--api-socket` (required). The VM's own options (`--cpus`, `--memory`, `--cmdline`,
/// `--serial`, `--console`, `--pci-slots`) are the defaults of `vm.create`'s body, checked
/// here so a bad one is refused at once; its devices come in the body only.
pub fn vmm_options(args: &Args) -> Result<(bool, ApiSocket), ConfigError> {
    let api_socket = args
        .api_socket
        .as_deref()
        .map(parse_api_socket)
        .transpose()?;
    let Some(api_socket) = api_socket else {
        return Err(ConfigError::Option {
            flag: "kernel",
            reason: "--kernel, --firmware or --api-socket (to wait for vm.create) is required"
                .into(),
        });
    };
    for (given, flag) in [
        (!args.disk.is_empty(), "disk"),
        (!args.net.is_empty(), "net"),
        (args.balloon.is_some(), "balloon"),
        (args.initramfs.is_some(), "initramfs"),
        (args.firmware_vars.is_some(), "firmware-vars"),
    ] {
        if given {
            return Err(ConfigError::Option {
                flag,
                reason: "without --kernel or --firmware the VM comes from vm.create: give it in its body (docs/api.md)".into(),
            });
        }
    }
    parse_cpus(&args.cpus)?;
    parse_memory(&args.memory)?;
    check_cmdline(&args.cmdline)?;
    if !(1..=MAX_PCI_SLOTS).contains(&args.pci_slots) {
        return Err(ConfigError::Option {
            flag: "pci-slots",
            reason: format!("{}: expected 1 to {MAX_PCI_SLOTS}", args.pci_slots),
        });
    }
    if let Some(d) = args.device_uid.as_deref() {
        parse_device_uid(d)?;
    }
    Ok((parse_sandbox(&args.sandbox)?, api_socket))
}

impl VmConfig {
    /// `vm.add-disk` before `vm.boot`: the disk joins the configuration, checked as a
    /// `--disk` is (its image opens; a free slot, a unique id). Nothing changes on an error.
    pub fn add_disk(&mut self, disk: DiskConfig) -> Result<(), ConfigError> {
        check_disk_image(&disk)?;
        self.disks.push(disk);
        let checked = self.check_devices();
        if checked.is_err() {
            self.disks.pop();
        }
        checked
    }

    /// `vm.add-net` before `vm.boot`: the interface joins the configuration (a free slot, a
    /// unique id); its tap is opened at boot. Nothing changes on an error.
    pub fn add_net(&mut self, net: NetConfig) -> Result<(), ConfigError> {
        self.nets.push(net);
        let checked = self.check_devices();
        if checked.is_err() {
            self.nets.pop();
        }
        checked
    }

    /// `vm.remove-device` before `vm.boot`: the disk or interface named `id` leaves the
    /// configuration; false when there is none.
    pub fn remove_device(&mut self, id: &str) -> bool {
        let named = |given: &Option<String>, prefix: &str, i: usize| {
            given.clone().unwrap_or_else(|| format!("{prefix}{i}")) == id
        };
        if let Some(i) = (0..self.disks.len()).find(|&i| named(&self.disks[i].id, "disk", i)) {
            self.disks.remove(i);
            return true;
        }
        if let Some(i) = (0..self.nets.len()).find(|&i| named(&self.nets[i].id, "net", i)) {
            self.nets.remove(i);
            return true;
        }
        false
    }

    /// The devices fit the slots and their ids are unique.
    fn check_devices(&self) -> Result<(), ConfigError> {
        let console = self.console != ConsoleConfig::Off;
        check_device_slots(
            self.disks.len(),
            self.nets.len(),
            console,
            self.balloon.is_some(),
            self.pci_slots,
        )?;
        check_device_ids(&self.disks, &self.nets, console, self.balloon.is_some())
    }
}

/// A checked VM configuration, with its boot files open.
#[derive(Debug)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// The host CPUs each vCPU's thread is pinned to (`--cpus affinity=`); `None`: anywhere.
    pub vcpu_affinity: VcpuAffinity,
    /// Pointer authentication for a 64-bit guest's vCPUs (`--cpus pauth=`).
    pub ptrauth: PtrAuth,
    /// Bytes of guest RAM.
    pub ram_size: u64,
    /// What backs guest RAM (`--memory hugepages=`, `thp=`).
    pub ram_backing: RamBacking,
    /// Kernel command line.
    pub cmdline: String,
    /// What the guest boots: a kernel, or UEFI firmware.
    pub boot: BootConfig,
    /// Guest console.
    pub serial: SerialConfig,
    /// The virtio console (`--console`).
    pub console: ConsoleConfig,
    /// Disks, in slot order.
    pub disks: Vec<DiskConfig>,
    /// Network interfaces, in slot order after the disks.
    pub nets: Vec<NetConfig>,
    /// The memory balloon (`--balloon`), in the slot after the network interfaces.
    pub balloon: Option<BalloonConfig>,
    /// Number of PCIe root ports.
    pub pci_slots: usize,
    /// Confine the VMM's threads with seccomp filters (`--sandbox on`, the default).
    pub sandbox: bool,
    /// `--device-uid`: host uid and gid of the device processes.
    pub device_ids: Option<(u32, u32)>,
    /// `--cgroup-parent`.
    pub cgroup_parent: Option<PathBuf>,
    /// `--api-socket`.
    pub api_socket: Option<ApiSocket>,
}

/// `--device-uid UID[:GID]`: only a root VMM may run devices as another uid.
fn parse_device_uid(value: &str) -> Result<(u32, u32), ConfigError> {
    let bad = |reason: String| ConfigError::Option {
        flag: "device-uid",
        reason,
    };
    let (u, g) = value.split_once(':').unwrap_or((value, value));
    let (Ok(uid), Ok(gid)) = (u.parse::<u32>(), g.parse::<u32>()) else {
        return Err(bad(format!("{value:?}: expected UID or UID:GID (numbers)")));
    };
    if uid == 0 || gid == 0 {
        return Err(bad(format!(
            "{value:?}: device processes must not run as root"
        )));
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(bad(
            "only a VMM running as root can run devices as another uid; drop the option".into(),
        ));
    }
    Ok((uid, gid))
}

/// `--sandbox on|off`.
fn parse_sandbox(value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        v => Err(ConfigError::Option {
            flag: "sandbox",
            reason: format!("{v:?}: expected on or off"),
        }),
    }
}

/// Splits `s` at the commas outside square brackets (`a=1,b=[2,3]` is two items); `None`
/// when the brackets do not balance.
fn split_top_level(s: &str) -> Option<Vec<&str>> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0usize, 0);
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.checked_sub(1)?,
            ',' if depth == 0 => {
                items.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    (depth == 0).then(|| {
        items.push(&s[start..]);
        items
    })
}

/// Splits `a=1,b=2` into pairs, refusing keys outside `known` and repeated keys. A value may
/// hold commas inside square brackets (`affinity=[0@[0,1]]`).
fn parse_options<'a>(
    flag: &'static str,
    value: &'a str,
    known: &[&str],
) -> Result<Vec<(&'a str, &'a str)>, ConfigError> {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    let items = split_top_level(value).ok_or_else(|| ConfigError::Option {
        flag,
        reason: format!("unbalanced brackets in {value:?}"),
    })?;
    for item in items {
        let (key, val) = item.split_once('=').ok_or_else(|| ConfigError::Option {
            flag,
            reason: format!("expected key=value, got {item:?}"),
        })?;
        if !known.contains(&key) {
            return Err(ConfigError::Option {
                flag,
                reason: format!("unknown option {key:?} (known: {})", known.join(", ")),
            });
        }
        if pairs.iter().any(|(k, _)| *k == key) {
            return Err(ConfigError::Option {
                flag,
                reason: format!("option {key:?} given twice"),
            });
        }
        pairs.push((key, val));
    }
    Ok(pairs)
}

/// Parses `512M`, `1G`, `65536K` or a plain byte count.
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        b'0'..=b'9' => (s, 0),
        _ => return None,
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// The highest host CPU number `affinity=` takes (the kernel's default `cpu_set_t` size).
const MAX_HOST_CPU: usize = 1023;

/// Per vCPU, the host CPUs its thread is pinned to (`None`: anywhere).
pub type VcpuAffinity = Vec<Option<Vec<usize>>>;

/// Pointer authentication for a 64-bit guest (`--cpus pauth=`; docs/boot.md "vCPU features").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PtrAuth {
    /// Where the host's KVM offers it (the default).
    Auto,
    /// Required: a host without it, or a 32-bit guest, is refused before anything starts.
    On,
    /// Never.
    Off,
}

/// `--cpus boot=N[,affinity=[V@[C,C-C],...]][,pauth=on|off]`: the vCPU count, which host CPUs
/// each listed vCPU's thread may run on (Cloud Hypervisor's syntax; unlisted vCPUs run
/// anywhere), and pointer authentication.
fn parse_cpus(value: &str) -> Result<(u32, VcpuAffinity, PtrAuth), ConfigError> {
    let bad = |reason: String| ConfigError::Option {
        flag: "cpus",
        reason,
    };
    let opts = parse_options("cpus", value, &["boot", "affinity", "pauth"])?;
    let ptrauth = match opts.iter().find(|(k, _)| *k == "pauth") {
        None => PtrAuth::Auto,
        Some((_, "on")) => PtrAuth::On,
        Some((_, "off")) => PtrAuth::Off,
        Some((_, v)) => return Err(bad(format!("pauth={v:?}: expected on or off"))),
    };
    let boot = opts
        .iter()
        .find(|(k, _)| *k == "boot")
        .ok_or_else(|| bad("boot=N is required".into()))?
        .1;
    let n: u32 = boot
        .parse()
        .map_err(|_| bad(format!("boot={boot:?} is not a number")))?;
    if n == 0 || n > MAX_VCPUS_GICV3 {
        return Err(bad(format!(
            "boot={n}: a VM has between 1 and {MAX_VCPUS_GICV3} vCPUs"
        )));
    }
    let mut affinity = vec![None; n as usize];
    if let Some((_, list)) = opts.iter().find(|(k, _)| *k == "affinity") {
        let inner = list
            .strip_prefix('[')
            .and_then(|l| l.strip_suffix(']'))
            .ok_or_else(|| bad(format!("affinity={list:?}: expected [VCPU@[CPUS],...]")))?;
        for entry in split_top_level(inner).unwrap_or_default() {
            let (vcpu, cpus) = entry
                .split_once('@')
                .ok_or_else(|| bad(format!("affinity entry {entry:?}: expected VCPU@[CPUS]")))?;
            let vcpu: usize = vcpu
                .parse()
                .ok()
                .filter(|&v| v < n as usize)
                .ok_or_else(|| bad(format!("affinity: {vcpu:?} is not a vCPU (0 to {})", n - 1)))?;
            if affinity[vcpu].is_some() {
                return Err(bad(format!("affinity: vCPU {vcpu} is given twice")));
            }
            affinity[vcpu] = Some(
                parse_host_cpus(cpus)
                    .map_err(|reason| bad(format!("affinity of vCPU {vcpu}: {reason}")))?,
            );
        }
    }
    Ok((n, affinity, ptrauth))
}

/// `over`'s `key=value` items, then those of `base` whose keys `over` does not give: how
/// `vm.create`'s `cpus` (`boot=N`) lands on the command line's `--cpus`, which keeps its
/// `affinity=` and `pauth=` (Cloud Hypervisor's `CpusConfig` has neither). Items are split as
/// [`parse_options`] splits them; checking them is left to it.
pub fn overlay_options(base: &str, over: &str) -> String {
    let key = |item: &str| item.split_once('=').map_or(item, |(k, _)| k).to_string();
    let given: Vec<String> = split_top_level(over)
        .unwrap_or_default()
        .into_iter()
        .map(key)
        .collect();
    let mut items = vec![over];
    items.extend(
        split_top_level(base)
            .unwrap_or_default()
            .into_iter()
            .filter(|item| !item.is_empty() && !given.contains(&key(item))),
    );
    items.join(",")
}

/// `[0,2-3]`: host CPU numbers, sorted and without repeats.
fn parse_host_cpus(list: &str) -> Result<Vec<usize>, String> {
    let inner = list
        .strip_prefix('[')
        .and_then(|l| l.strip_suffix(']'))
        .filter(|l| !l.is_empty())
        .ok_or_else(|| format!("{list:?}: expected [CPU,CPU-CPU,...]"))?;
    let cpu = |s: &str| {
        s.parse::<usize>()
            .ok()
            .filter(|&c| c <= MAX_HOST_CPU)
            .ok_or_else(|| format!("{s:?} is not a host CPU number (0 to {MAX_HOST_CPU})"))
    };
    let mut cpus = Vec::new();
    for part in inner.split(',') {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (cpu(a)?, cpu(b)?),
            None => (cpu(part)?, cpu(part)?),
        };
        if first > last {
            return Err(format!("{part:?} is an empty range"));
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// `--memory size=SIZE[,hugepages=on[,hugepage_size=SIZE]][,thp=on|off]`: the RAM size and
/// what backs it (docs/memory.md). `thp=tmpfs|madvise|collapse` insists on one mechanism.
fn parse_memory(value: &str) -> Result<(u64, RamBacking), ConfigError> {
    let bad = |reason: String| ConfigError::Option {
        flag: "memory",
        reason,
    };
    let opts = parse_options(
        "memory",
        value,
        &["size", "hugepages", "hugepage_size", "thp"],
    )?;
    let get = |k: &str| opts.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
    let size = get("size").ok_or_else(|| bad("size=SIZE is required".into()))?;
    let bytes = parse_size(size).ok_or_else(|| {
        bad(format!(
            "size={size:?} is not a size (examples: 512M, 2G, 131072K)"
        ))
    })?;
    if bytes < RAM_MIN_SIZE {
        return Err(bad(format!(
            "size={size} is too small: at least {}M",
            RAM_MIN_SIZE >> 20
        )));
    }
    if bytes > RAM_MAX_SIZE {
        return Err(bad(format!(
            "size={size} is too large: at most {}M",
            RAM_MAX_SIZE >> 20
        )));
    }
    if bytes % (2 << 20) != 0 {
        return Err(bad(format!("size={size} is not a multiple of 2M")));
    }
    let hugepages = match get("hugepages") {
        None | Some("off") => false,
        Some("on") => true,
        Some(v) => return Err(bad(format!("hugepages={v:?}: expected on or off"))),
    };
    let thp = match get("thp") {
        None | Some("on") => RamBacking::Thp,
        Some("off") => RamBacking::Off,
        Some(v) => RamBacking::Only(Mechanism::from_option(v).ok_or_else(|| {
            bad(format!(
                "thp={v:?}: expected on, off, or one mechanism: tmpfs, madvise, collapse"
            ))
        })?),
    };
    if !hugepages {
        if let Some(v) = get("hugepage_size") {
            return Err(bad(format!("hugepage_size={v} needs hugepages=on")));
        }
        return Ok((bytes, thp));
    }
    if get("thp").is_some() {
        return Err(bad(
            "thp= and hugepages=on exclude each other (hugetlbfs pages are not transparent)".into(),
        ));
    }
    let offered = memory::hugetlb_sizes();
    let list = || {
        offered
            .iter()
            .map(|s| format!("{}K", s >> 10))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let page = match get("hugepage_size") {
        Some(v) => {
            let p = parse_size(v)
                .ok_or_else(|| bad(format!("hugepage_size={v:?} is not a size (example: 2M)")))?;
            if !offered.contains(&p) {
                return Err(bad(format!(
                    "hugepage_size={v}: this host offers {}",
                    if offered.is_empty() {
                        "no huge pages".to_string()
                    } else {
                        list()
                    }
                )));
            }
            p
        }
        None => memory::default_hugetlb_size()
            .filter(|p| offered.contains(p))
            .or_else(|| offered.first().copied())
            .ok_or_else(|| bad("hugepages=on: this host offers no huge pages".into()))?,
    };
    if bytes % page != 0 {
        return Err(bad(format!(
            "size={size} is not a multiple of the huge page size {}K",
            page >> 10
        )));
    }
    Ok((bytes, RamBacking::HugeTlb(page)))
}

fn parse_serial(value: &str) -> Result<SerialConfig, ConfigError> {
    match value {
        "tty" => Ok(SerialConfig::Tty),
        "off" => Ok(SerialConfig::Off),
        _ => match value.split_once('=') {
            Some(("file", path)) if !path.is_empty() => File::options()
                .append(true)
                .create(true)
                .open(path)
                .map(SerialConfig::File)
                .map_err(|source| ConfigError::Open {
                    what: "serial output file",
                    path: path.into(),
                    source,
                }),
            _ => Err(ConfigError::Option {
                flag: "serial",
                reason: format!("expected tty, file=PATH or off, got {value:?}"),
            }),
        },
    }
}

fn check_cmdline(cmdline: &str) -> Result<(), ConfigError> {
    let mut c = linux_loader::cmdline::Cmdline::new(CMDLINE_MAX)
        .map_err(|e| ConfigError::Cmdline(e.to_string()))?;
    c.insert_str(cmdline)
        .map_err(|e| ConfigError::Cmdline(e.to_string()))
}

fn open(what: &'static str, path: &PathBuf) -> Result<File, ConfigError> {
    File::open(path).map_err(|source| ConfigError::Open {
        what,
        path: path.clone(),
        source,
    })
}

impl TryFrom<Args> for VmConfig {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        let (vcpus, vcpu_affinity, ptrauth) = parse_cpus(&args.cpus)?;
        let (ram_size, ram_backing) = parse_memory(&args.memory)?;
        check_cmdline(&args.cmdline)?;
        if args.firmware_vars.is_some() && args.firmware.is_none() {
            return Err(ConfigError::Option {
                flag: "firmware-vars",
                reason: "needs --firmware".into(),
            });
        }
        let boot = match (&args.firmware, &args.kernel) {
            (Some(firmware), _) => firmware_boot(firmware, args.firmware_vars.as_ref())?,
            (None, Some(kernel)) => kernel_boot(&args, kernel, ram_size)?,
            // clap requires one of them.
            (None, None) => {
                return Err(ConfigError::Option {
                    flag: "kernel",
                    reason: "--kernel or --firmware is required".into(),
                })
            }
        };
        if !(1..=MAX_PCI_SLOTS).contains(&args.pci_slots) {
            return Err(ConfigError::Option {
                flag: "pci-slots",
                reason: format!("{}: expected 1 to {MAX_PCI_SLOTS}", args.pci_slots),
            });
        }
        let disks = args
            .disk
            .iter()
            .map(|d| parse_disk(d))
            .collect::<Result<Vec<_>, _>>()?;
        if disks.len() > args.pci_slots {
            return Err(ConfigError::Option {
                flag: "disk",
                reason: format!(
                    "{} disks but {} PCIe slots (raise --pci-slots)",
                    disks.len(),
                    args.pci_slots
                ),
            });
        }
        let nets = args
            .net
            .iter()
            .enumerate()
            .map(|(i, n)| parse_net(n, i))
            .collect::<Result<Vec<_>, _>>()?;
        let balloon = args
            .balloon
            .as_deref()
            .map(|b| parse_balloon(b, ram_size))
            .transpose()?;
        let mut net_fds: Vec<std::os::fd::RawFd> = Vec::new();
        for n in &nets {
            if let NetBackend::Fds { fds, .. } = &n.backend {
                if let Some(fd) = fds.iter().find(|f| net_fds.contains(f)) {
                    return Err(ConfigError::Option {
                        flag: "net",
                        reason: format!("fd={fd} is given to two network interfaces"),
                    });
                }
                net_fds.extend(fds);
            }
        }
        let serial = parse_serial(&args.serial)?;
        let console = parse_console(&args.console, &serial)?;
        check_device_slots(
            disks.len(),
            nets.len(),
            console != ConsoleConfig::Off,
            balloon.is_some(),
            args.pci_slots,
        )?;
        let sandbox = parse_sandbox(&args.sandbox)?;
        let device_ids = args
            .device_uid
            .as_deref()
            .map(parse_device_uid)
            .transpose()?;
        let api_socket = args
            .api_socket
            .as_deref()
            .map(parse_api_socket)
            .transpose()?;
        check_device_ids(
            &disks,
            &nets,
            console != ConsoleConfig::Off,
            balloon.is_some(),
        )?;
        Ok(Self {
            vcpus,
            vcpu_affinity,
            ptrauth,
            ram_size,
            ram_backing,
            cmdline: args.cmdline,
            boot,
            serial,
            console,
            disks,
            nets,
            balloon,
            pci_slots: args.pci_slots,
            sandbox,
            device_ids,
            cgroup_parent: args.cgroup_parent,
            api_socket,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_sandbox_on_off_only() {
        assert!(parse_sandbox("on").expect("valid"));
        assert!(!parse_sandbox("off").expect("valid"));
        assert!(parse_sandbox("yes").is_err());
        assert!(parse_sandbox("").is_err());
        let args = Args::try_parse_from(["bulkhead", "--kernel", "k"]).expect("parses");
        assert_eq!(args.sandbox, "on");
    }

    #[test]
    fn test_parse_balloon_options_and_bad_input() {
        let b = parse_balloon("size=512M", 1 << 30).expect("valid");
        assert_eq!(
            b,
            BalloonConfig {
                size: 512 << 20,
                deflate_on_oom: false,
                free_page_reporting: false,
                stats_polling_interval_s: 0,
            }
        );
        let b = parse_balloon(
            "size=0,deflate_on_oom=on,free_page_reporting=on,stats_polling_interval_s=5",
            1 << 30,
        )
        .expect("valid");
        assert!(b.deflate_on_oom && b.free_page_reporting);
        assert_eq!((b.size, b.stats_polling_interval_s), (0, 5));
        for (value, want) in [
            ("deflate_on_oom=on", "size=SIZE is required"),
            ("size=2G", "larger than guest RAM"),
            ("size=100", "multiple of 4K"),
            ("size=lots", "not a size"),
            ("size=0,deflate_on_oom=yes", "expected on or off"),
            ("size=0,stats_polling_interval_s=-1", "expected seconds"),
            ("size=0,stats_polling_interval_s=86401", "expected seconds"),
            ("size=0,free_page_hinting=on", "unknown option"),
        ] {
            let e = parse_balloon(value, 1 << 30).expect_err(value).to_string();
            assert!(e.contains(want), "{value}: {e}");
            assert!(e.starts_with("--balloon: "), "{e}");
        }
        let args = Args::try_parse_from([
            "bulkhead",
            "--kernel",
            "k",
            "--balloon",
            "size=64M",
            "--pci-slots",
            "1",
            "--net",
            "tap=a",
        ])
        .expect("parses");
        assert_eq!(args.balloon.as_deref(), Some("size=64M"));
    }

    #[test]
    fn test_parse_size_suffixes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("64k"), Some(64 << 10));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("banana"), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("-1M"), None);
        assert_eq!(parse_size("99999999999999999999G"), None);
    }

    #[test]
    fn test_parse_cpus_bounds() {
        assert_eq!(parse_cpus("boot=4").expect("valid").0, 4);
        assert!(parse_cpus("boot=0").is_err());
        assert!(parse_cpus("boot=124").is_err());
        assert!(parse_cpus("boot=x").is_err());
        assert!(parse_cpus("max=2").is_err());
        assert!(parse_cpus("boot=1,boot=2").is_err());
        assert!(parse_cpus("4").is_err());
    }

    #[test]
    fn test_overlay_options_keeps_what_over_does_not_give() {
        assert_eq!(overlay_options("boot=1", "boot=2"), "boot=2");
        assert_eq!(
            overlay_options("boot=1,affinity=[0@[0,1]],pauth=off", "boot=2"),
            "boot=2,affinity=[0@[0,1]],pauth=off"
        );
    }

    #[test]
    fn test_parse_cpus_pauth() {
        assert_eq!(parse_cpus("boot=1").expect("valid").2, PtrAuth::Auto);
        assert_eq!(parse_cpus("boot=1,pauth=on").expect("valid").2, PtrAuth::On);
        assert_eq!(
            parse_cpus("pauth=off,boot=2").expect("valid").2,
            PtrAuth::Off
        );
        for bad in [
            "boot=1,pauth=yes",
            "boot=1,pauth=",
            "boot=1,pauth=on,pauth=off",
        ] {
            let e = parse_cpus(bad).expect_err(bad);
            assert!(e.to_string().contains("cpus"), "{bad}: {e}");
        }
    }

    #[test]
    fn test_parse_cpus_affinity() {
        let (n, a, _) = parse_cpus("boot=3,affinity=[0@[0],2@[1-3,5,2]]").expect("valid");
        assert_eq!(n, 3);
        assert_eq!(a, vec![Some(vec![0]), None, Some(vec![1, 2, 3, 5])]);
        // Cloud Hypervisor's order: affinity before boot.
        assert_eq!(
            parse_cpus("affinity=[1@[4]],boot=2").expect("valid").1,
            vec![None, Some(vec![4])]
        );
        for bad in [
            "boot=2,affinity=[2@[0]]",       // no vCPU 2
            "boot=2,affinity=[0@[0],0@[1]]", // vCPU 0 twice
            "boot=2,affinity=[0@[]]",        // no CPU
            "boot=2,affinity=[0@[3-1]]",     // empty range
            "boot=2,affinity=[0@[1024]]",    // past cpu_set_t
            "boot=2,affinity=[0@[x]]",       // not a number
            "boot=2,affinity=[0@[0]",        // unbalanced
            "boot=2,affinity=0@[0]",         // no outer brackets
            "boot=2,affinity=[0[0]]",        // no @
            "boot=2,affinity=[0@[0]]]",      // unbalanced
        ] {
            let e = parse_cpus(bad).expect_err(bad);
            assert!(e.to_string().contains("cpus"), "{bad}: {e}");
        }
    }

    #[test]
    fn test_parse_memory_bounds() {
        assert_eq!(
            parse_memory("size=1G").expect("valid"),
            (1 << 30, RamBacking::Thp)
        );
        assert_eq!(
            parse_memory("size=64M,thp=off").expect("valid").1,
            RamBacking::Off
        );
        assert_eq!(
            parse_memory("size=64M,thp=tmpfs").expect("valid").1,
            RamBacking::Only(Mechanism::Tmpfs)
        );
        assert!(parse_memory("size=64M,thp=maybe").is_err());
        assert!(parse_memory("size=64M,hugepages=yes").is_err());
        assert!(parse_memory("size=64M,hugepage_size=2M").is_err());
        assert!(parse_memory("size=64M,hugepages=on,thp=off").is_err());
        assert!(parse_memory("size=64M,hugepages=on,hugepage_size=3M").is_err());
        if memory::hugetlb_sizes().contains(&(2 << 20)) {
            assert_eq!(
                parse_memory("size=64M,hugepages=on,hugepage_size=2M")
                    .expect("valid")
                    .1,
                RamBacking::HugeTlb(2 << 20)
            );
        }
        assert!(parse_memory("size=1M").is_err());
        assert!(parse_memory("size=banana").is_err());
        assert!(parse_memory("size=65M").is_err());
        assert!(parse_memory("size=1024G").is_err());
        assert!(parse_memory("sz=1G").is_err());
    }

    #[test]
    fn test_parse_console_forms_and_tty_conflict() {
        let off = SerialConfig::Off;
        assert_eq!(parse_console("off", &off).expect("off"), ConsoleConfig::Off);
        assert_eq!(parse_console("tty", &off).expect("tty"), ConsoleConfig::Tty);
        assert_eq!(parse_console("pty", &off).expect("pty"), ConsoleConfig::Pty);
        assert_eq!(
            parse_console("file=/tmp/c.log", &off).expect("file"),
            ConsoleConfig::File("/tmp/c.log".into())
        );
        assert_eq!(
            parse_console("socket=/run/c.sock", &SerialConfig::Tty).expect("socket"),
            ConsoleConfig::Socket("/run/c.sock".into())
        );
        for bad in ["", "file=", "socket=", "serial", "pty=1", "tty,", "on"] {
            assert!(parse_console(bad, &off).is_err(), "{bad:?}");
        }
        assert!(parse_console(&format!("socket=/{}", "a".repeat(107)), &off).is_err());
        let Err(e) = parse_console("tty", &SerialConfig::Tty) else {
            panic!("tty twice accepted");
        };
        assert!(e.to_string().contains("--serial off"), "{e}");
        let args = Args::try_parse_from(["bulkhead", "--kernel", "k"]).expect("parses");
        assert_eq!(args.console, "off");
    }

    #[test]
    fn test_parse_serial_forms() {
        assert!(matches!(parse_serial("tty"), Ok(SerialConfig::Tty)));
        assert!(matches!(parse_serial("off"), Ok(SerialConfig::Off)));
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("pty").is_err());
        assert!(parse_serial("file=/nonexistent-dir/x").is_err());
    }

    #[test]
    fn test_check_cmdline_refuses_oversize_and_nul() {
        assert!(check_cmdline("console=ttyAMA0").is_ok());
        assert!(check_cmdline(&"x".repeat(4096)).is_err());
        assert!(check_cmdline("a\0b").is_err());
    }

    #[test]
    fn test_parse_disk_forms_and_errors() {
        let img = std::env::temp_dir().join(format!("bulkhead-disk-test-{}", std::process::id()));
        std::fs::write(&img, [0u8; 512]).expect("image");
        let p = img.to_str().expect("utf-8");
        let d =
            parse_disk(&format!("path={p},readonly=on,serial=abc,num_queues=4")).expect("valid");
        assert_eq!(d.num_queues, 4);
        assert_eq!(
            d.backend,
            DiskBackend::Process {
                path: img.clone(),
                readonly: true,
                serial: Some("abc".into()),
                direct: false,
                rate_limit: vec![],
                poll_us: 0,
            }
        );
        let DiskBackend::Process { poll_us, .. } = parse_disk(&format!("path={p},poll_us=50"))
            .expect("valid")
            .backend
        else {
            panic!("a process disk");
        };
        assert_eq!(poll_us, 50);
        assert!(parse_disk(&format!("path={p},poll_us=10001")).is_err());
        assert!(parse_disk("socket=/s,poll_us=5").is_err());
        assert_eq!(
            parse_disk("socket=/run/blk.sock").expect("valid").backend,
            DiskBackend::Socket("/run/blk.sock".into())
        );
        for bad in [
            "path=/nonexistent/img".to_string(),
            format!("path={p},readonly=yes"),
            format!("path={p},num_queues=0"),
            format!("path={p},num_queues=17"),
            format!("path={p},serial=this-serial-is-far-too-long"),
            format!("path={p},socket=/x"),
            "socket=/x,readonly=on".into(),
            "readonly=on".into(),
            format!("path={p},colour=blue"),
            p.to_string(),
            format!("path={p},queue_size=100"),
            format!("path={p},queue_size=2048"),
        ] {
            assert!(parse_disk(&bad).is_err(), "{bad} should be refused");
        }
        std::fs::remove_file(&img).expect("cleanup");
    }

    #[test]
    fn test_parse_disk_restart_and_fault_options() {
        let img =
            std::env::temp_dir().join(format!("bulkhead-disk-restart-{}", std::process::id()));
        std::fs::write(&img, [0u8; 512]).expect("image");
        let p = img.to_str().expect("utf-8");
        let d = parse_disk(&format!(
            "path={p},restart_max=3,restart_backoff_ms=0,fault=crash_after=100"
        ))
        .expect("valid");
        assert_eq!(d.restart.max, 3);
        assert_eq!(d.restart.backoff, std::time::Duration::ZERO);
        assert_eq!(d.fault.as_deref(), Some("crash_after=100"));
        assert_eq!(
            parse_disk(&format!("path={p},restart=never"))
                .expect("valid")
                .restart
                .mode,
            crate::device::restart::RestartMode::Never
        );
        for good in ["eio=100-199", "eio=7", "delay_ms=20"] {
            let d = parse_disk(&format!("path={p},fault={good}")).expect("valid");
            assert_eq!(d.fault.as_deref(), Some(good));
        }
        for bad in [
            format!("path={p},fault=crash"),
            format!("path={p},fault=hang"),
            format!("path={p},fault=eio=9-3"),
            format!("path={p},fault=delay_ms=0"),
            format!("path={p},fault=crash_after=0"),
            format!("path={p},restart=sometimes"),
            "socket=/run/b.sock,restart=never".to_string(),
            "socket=/run/b.sock,fault=crash_after=1".to_string(),
        ] {
            assert!(parse_disk(&bad).is_err(), "{bad} accepted");
        }
        let _ = std::fs::remove_file(&img);
    }

    #[test]
    fn test_parse_disk_rate_limits() {
        let img = std::env::temp_dir().join(format!("bulkhead-disk-rate-{}", std::process::id()));
        std::fs::write(&img, [0u8; 512]).expect("image");
        let p = img.to_str().expect("utf-8");
        let d = parse_disk(&format!(
            "path={p},ops_refill_time=1000,bw_size=1048576,bw_refill_time=100,ops_size=500,bw_one_time_burst=0"
        ))
        .expect("valid");
        let DiskBackend::Process { rate_limit, .. } = d.backend else {
            panic!("a process backend");
        };
        assert_eq!(
            rate_limit,
            vec![
                ("bw_size", 1 << 20),
                ("bw_one_time_burst", 0),
                ("bw_refill_time", 100),
                ("ops_size", 500),
                ("ops_refill_time", 1000),
            ],
            "in option order, only those given"
        );
        for (bad, says) in [
            (
                format!("path={p},bw_size=1048576"),
                "bw_size and bw_refill_time",
            ),
            (
                format!("path={p},ops_refill_time=10"),
                "ops_size and ops_refill_time",
            ),
            (
                format!("path={p},bw_one_time_burst=10"),
                "bw_one_time_burst only with them",
            ),
            (
                format!("path={p},bw_size=0,bw_refill_time=10"),
                "bw_size=\"0\"",
            ),
            (
                format!("path={p},bw_size=1M,bw_refill_time=10"),
                "expected a positive number",
            ),
            (
                format!("path={p},ops_size=-1,ops_refill_time=10"),
                "ops_size=\"-1\"",
            ),
            (format!("path={p},bw_sizes=1"), "bw_sizes"),
            ("socket=/s,bw_size=1,bw_refill_time=1".into(), "rate limits"),
        ] {
            let e = parse_disk(&bad).expect_err(&bad).to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        std::fs::remove_file(&img).expect("cleanup");
    }

    #[test]
    fn test_parse_net_fault_drop_or_corrupt_only() {
        let n = parse_net("tap=t0,fault=drop=4", 0).expect("valid");
        assert_eq!(n.fault.as_deref(), Some("drop=4"));
        let n = parse_net("tap=t0,fault=corrupt=9", 0).expect("valid");
        assert_eq!(n.fault.as_deref(), Some("corrupt=9"));
        for bad in [
            "tap=t0,fault=eio=3",
            "tap=t0,fault=drop=0",
            "tap=t0,fault=corrupt=0",
            "tap=t0,fault=corrupt=x",
            "tap=t0,fault=crash",
            "socket=/run/n.sock,fault=drop=2",
        ] {
            assert!(parse_net(bad, 0).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn test_parse_net_tap_forms_and_defaults() {
        let n = parse_net("tap=bh0", 0).expect("valid");
        assert_eq!(
            n.backend,
            NetBackend::Tap {
                name: "bh0".into(),
                addr: None
            }
        );
        assert_eq!((n.num_queues, n.queue_pairs(), n.queue_size), (2, 1, 256));
        assert_eq!(n.mac, default_mac("net0"));
        assert_eq!(n.mtu, None);
        let n = parse_net(
            "tap=bh1,mac=52:54:00:12:34:56,ip=192.168.249.1,mask=255.255.255.0,mtu=9000,num_queues=4,queue_size=512,id=lan",
            3,
        )
        .expect("valid");
        assert_eq!(n.mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(n.mtu, Some(9000));
        assert_eq!((n.num_queues, n.queue_pairs(), n.queue_size), (4, 2, 512));
        assert_eq!(n.id.as_deref(), Some("lan"));
        assert_eq!(
            n.backend,
            NetBackend::Tap {
                name: "bh1".into(),
                addr: Some(([192, 168, 249, 1].into(), [255, 255, 255, 0].into()))
            }
        );
        assert_eq!(
            parse_net("socket=/run/net.sock,num_queues=4", 0)
                .expect("valid")
                .backend,
            NetBackend::Socket("/run/net.sock".into())
        );
    }

    #[test]
    fn test_default_mac_stable_local_unicast_per_id() {
        let a = default_mac("net0");
        assert_eq!(a, default_mac("net0"));
        assert_ne!(a, default_mac("net1"));
        assert_eq!(a[0] & 0b11, 0b10, "locally administered, unicast");
        assert_eq!(
            parse_net("tap=x,id=web", 5).expect("valid").mac,
            default_mac("web")
        );
        assert_eq!(
            format_mac(&[0x52, 0x54, 0, 0xab, 0x0c, 0xff]),
            "52:54:00:ab:0c:ff"
        );
        assert_eq!(
            parse_mac("52-54-00-AB-0C-FF"),
            Some([0x52, 0x54, 0, 0xab, 0x0c, 0xff])
        );
    }

    #[test]
    fn test_parse_net_rate_limits_per_direction() {
        let n = parse_net(
            "tap=t,bw_size=1000,bw_refill_time=100,tx_bw_size=10485760,tx_bw_refill_time=1000,rx_ops_size=50,rx_ops_refill_time=10,rx_ops_one_time_burst=5",
            0,
        )
        .expect("valid");
        assert_eq!(
            n.tx_limit,
            vec![("bw_size", 10485760), ("bw_refill_time", 1000)]
        );
        assert_eq!(
            n.rx_limit,
            vec![
                ("bw_size", 1000),
                ("bw_refill_time", 100),
                ("ops_size", 50),
                ("ops_one_time_burst", 5),
                ("ops_refill_time", 10)
            ]
        );
        for bad in [
            "tap=t,bw_size=100",
            "tap=t,tx_bw_refill_time=100",
            "tap=t,ops_one_time_burst=5",
            "tap=t,bw_size=0,bw_refill_time=10",
            "tap=t,bw_size=x,bw_refill_time=10",
            "socket=/s,bw_size=1,bw_refill_time=1",
        ] {
            assert!(parse_net(bad, 0).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn test_parse_net_bad_input_refused_with_reason() {
        let reason = |v: &str| match parse_net(v, 0) {
            Err(e) => e.to_string(),
            Ok(n) => panic!("{v} accepted: {n:?}"),
        };
        assert!(reason("tap=bh0,num_queues=3").contains("odd"));
        assert!(reason("tap=bh0,num_queues=0").contains("even number"));
        assert!(reason("tap=bh0,num_queues=34").contains("even number"));
        assert!(reason("tap=bh0,mac=52:54:00:12:34").contains("mac="));
        assert!(reason("tap=bh0,mac=01:00:5e:00:00:01").contains("unicast"));
        assert!(reason("tap=bh0,mac=00:00:00:00:00:00").contains("mac="));
        assert!(reason("tap=bh0,mac=zz:54:00:12:34:56").contains("mac="));
        assert!(reason("tap=bh0,mtu=67").contains("68 to 65535"));
        assert!(reason("tap=bh0,mtu=65536").contains("68 to 65535"));
        assert!(reason("tap=bh0,ip=10.0.0.1").contains("together"));
        assert!(reason("tap=bh0,ip=10.0.0.1,mask=255.0.255.0").contains("netmask"));
        assert!(reason("tap=bh0,ip=10.0.0.300,mask=255.0.0.0").contains("IPv4"));
        assert!(reason("tap=bh0,queue_size=100").contains("power of two"));
        assert!(reason("tap=this-name-is-too-long").contains("interface name"));
        assert!(reason("tap=a/b").contains("interface name"));
        assert!(reason("tap=bh0,socket=/s").contains("one of"));
        assert!(reason("mac=52:54:00:12:34:56").contains("required"));
        assert!(reason("tap=bh0,id=vmm").contains("id="));
        assert!(reason("tap=bh0,colour=blue").contains("unknown option"));
        assert!(reason("fd=x").contains("descriptor numbers"));
        assert!(reason("fd=2").contains("descriptor numbers"));
        assert!(reason("fd=7:7").contains("twice"));
        // A descriptor that is not a tap (TUNGETIFF fails), and one that is not open.
        let f = File::open("/dev/null").expect("/dev/null");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        assert!(reason(&format!("fd={fd}")).contains("not an attached tap queue"));
        assert!(reason("fd=4000").contains("not an open descriptor"));
        assert!(reason(&format!("fd={fd},num_queues=4")).contains("one per queue pair"));
    }

    #[test]
    fn test_device_slots_one_per_device() {
        assert!(check_device_slots(2, 1, false, false, 3).is_ok());
        let e = check_device_slots(1, 2, false, false, 2).expect_err("3 devices, 2 slots");
        assert!(
            e.to_string()
                .contains("1 disks and 2 network interfaces but 2 PCIe slots"),
            "{e}"
        );
        // The console and the balloon take a slot each, after the disks and interfaces.
        let disk = parse_disk("socket=/run/a.sock,id=console").expect("valid");
        assert!(check_device_ids(std::slice::from_ref(&disk), &[], false, true).is_ok());
        let e = check_device_ids(&[disk], &[], true, false).expect_err("the console's id");
        assert!(
            e.to_string()
                .starts_with("--disk: id=\"console\" is used twice"),
            "{e}"
        );
        let net = parse_net("tap=t0,id=balloon0", 0).expect("valid");
        let e = check_device_ids(&[], &[net], true, true).expect_err("the balloon's id");
        assert!(e.to_string().starts_with("--net: id=\"balloon0\""), "{e}");
        assert!(check_device_slots(1, 1, true, true, 4).is_ok());
        let e = check_device_slots(1, 1, true, false, 2).expect_err("no slot for the console");
        assert!(e.to_string().starts_with("--console: "), "{e}");
        let e = check_device_slots(1, 1, false, true, 2).expect_err("no slot for the balloon");
        assert!(e.to_string().starts_with("--balloon: "), "{e}");
        let e = check_device_slots(1, 1, true, true, 3).expect_err("the console took the last");
        assert!(
            e.to_string().contains(
                "no PCIe slot left for the balloon after 1 disks, 1 network interfaces and the console"
            ),
            "{e}"
        );
        let args = Args::parse_from([
            "bulkhead", "--kernel", "k", "--net", "tap=a", "--net", "fd=3:4",
        ]);
        assert_eq!(args.net, ["tap=a", "fd=3:4"]);
    }

    #[test]
    fn test_firmware_flags() {
        // --firmware replaces --kernel, and excludes it and what only a kernel uses.
        assert!(Args::try_parse_from(["bulkhead", "--firmware", "f"]).is_ok());
        assert!(Args::try_parse_from(["bulkhead"]).is_err());
        for extra in [["--kernel", "k"], ["--initramfs", "i"], ["--cmdline", "c"]] {
            let mut argv = vec!["bulkhead", "--firmware", "f"];
            argv.extend(extra);
            assert!(Args::try_parse_from(argv).is_err(), "{extra:?}");
        }
        let args = Args::parse_from(["bulkhead", "--kernel", "k", "--firmware-vars", "v"]);
        assert!(matches!(
            VmConfig::try_from(args),
            Err(ConfigError::Option {
                flag: "firmware-vars",
                ..
            })
        ));
        // A missing firmware file is bad input.
        let args = Args::parse_from(["bulkhead", "--firmware", "/nonexistent/QEMU_EFI.fd"]);
        assert!(matches!(
            VmConfig::try_from(args),
            Err(ConfigError::Firmware(_))
        ));
    }

    #[test]
    fn test_config_missing_kernel_is_error() {
        let args = Args::parse_from(["bulkhead", "--kernel", "/nonexistent/Image"]);
        assert!(matches!(
            VmConfig::try_from(args),
            Err(ConfigError::Open { what: "kernel", .. })
        ));
    }

    #[test]
    fn test_config_non_image_kernel_is_error() {
        let exe = std::env::current_exe().expect("test binary path");
        let args = Args::parse_from(["bulkhead", "--kernel", exe.to_str().expect("utf-8")]);
        assert!(matches!(
            VmConfig::try_from(args),
            Err(ConfigError::Kernel { .. })
        ));
    }
}
