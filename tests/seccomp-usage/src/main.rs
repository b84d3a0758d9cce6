//! `bulkhead-seccomp-usage`: the seccomp rule usage check (test only, never shipped; see
//! `docs/jail-seccomp.md`, "Rule usage trace").
//!
//! ```text
//! bulkhead-seccomp-usage record OUT STOPFILE
//! bulkhead-seccomp-usage check FAMILIES VMM_PID USAGE [FAMILIES VMM_PID USAGE ...]
//! ```
//!
//! `record` reads the kernel log (`/dev/kmsg`) from its current end and counts the audit
//! records (type 1326) of calls a seccomp filter allowed with SECCOMP_RET_LOG, which is how the
//! filters answer in the trace mode (`BULKHEAD_SECCOMP_TRACE`). It notes every sign of a lost
//! record (a read that says records were overwritten, a gap in the sequence numbers, the audit
//! subsystem's own "lost" and rate-limit messages). Once STOPFILE exists and the log has been
//! quiet for a second, it writes the counts to OUT.
//!
//! Each count also names the VMM the calling process belongs to: the topmost of the process
//! and its ancestors named `bulkhead` (a device process is the VMM's spawner's child; a child
//! the VMM forked is named `bulkhead` until it renames itself or execs), so that VMMs traced
//! at the same time share one recording.
//!
//! `check` takes each traced run as the families it traced (the variable's value), the VMM's
//! pid and the recorded counts (runs that ran at the same time name the same file), takes the
//! calls of that VMM's processes, attributes every logged call to the one filter that logged
//! it (by process, and for the VMM's threads by thread name), and prints every rule of every
//! filter with the runs that used it. It fails when a rule was never used and the exception
//! table below does not give the reason, when a record was lost, when a run logged nothing,
//! or when a logged call is not in the filter it was attributed to.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bulkhead::seccomp::ThreadKind;
use bulkhead_sandbox::seccomp::{native_arch, syscall_name, syscall_nr, Allow, Rules, TraceFamily};

/// The rules every VMM thread kind has (`common_rules` in `vmm/src/seccomp.rs`).
const VMM_COMMON: &str = "vmm-common";
/// The rules every device process has (`runtime_rules` in `devices/runtime/src/seccomp.rs`).
const RUNTIME: &str = "runtime";

/// SECCOMP_RET_LOG, as the audit record's `code=` shows it.
const CODE_LOG: u32 = 0x7ffc_0000;
/// AUDIT_SECCOMP.
const TYPE_SECCOMP: &str = "type=1326";

/// Rules a normal run of the trace scenario cannot reach, with the reason; the check prints
/// them and does not fail on them. (filter, syscall, reason). Filters: `vmm-common` (the rules
/// every VMM thread kind has), the VMM thread kinds' names (their own rules), `runtime` (the
/// rules every device gets from the runtime), `bulkhead-block`, `bulkhead-net` and
/// `bulkhead-balloon` (their own rules), `bulkhead-spawn`.
const EXCEPTIONS: &[(&str, &str, &str)] = &[
    // ---- Every VMM thread (common_rules).
    ("vmm-common", "brk", ALLOCATOR),
    ("vmm-common", "madvise", ALLOCATOR),
    ("vmm-common", "mremap", ALLOCATOR),
    ("vmm-common", "clock_gettime", VDSO),
    ("vmm-common", "getpid", GLIBC_ABORT),
    ("vmm-common", "tgkill", GLIBC_ABORT),
    ("vmm-common", "rseq", GLIBC_THREADS),
    ("vmm-common", "restart_syscall", "a signal (the vCPU kick) interrupting a restartable sleep: timing"),
    ("vmm-common", "sched_yield", "std's locks spin, then yield, under contention: timing"),
    ("vmm-common", "getrandom", "std's RandomState seeds a HashMap from getrandom once per thread: the main thread's keys are seeded before its filter (Devices::start's map of configuration refreshes), and the other VMM threads make no HashMap in these runs"),
    ("vmm-common", "writev", "std's Stderr passes a vectored write on as writev; this build's logger writes each line with write"),
    // ---- The main thread (vCPU threads inherit its filter).
    ("main", "pidfd_send_signal", HOTPLUG),
    ("main", "socket", HOTPLUG),
    ("main", "statx", "std on glibc asks statx first for a path's metadata (device::program's Path::exists); on musl (this build) std uses newfstatat"),
    ("main", "getrusage", MILESTONES),
    ("main", "sched_getaffinity", GLIBC_THREADS),
    ("main", "sched_setaffinity", "a vCPU thread pins itself only under --cpus affinity= (scenarios/boot-arm32.sh), which the trace's VMs do not use; unit test test_pin_self_sets_the_thread_affinity makes the call"),
    ("main", "set_robust_list", GLIBC_THREADS),
    // ---- Thread kinds.
    ("vCPU", "getrusage", MILESTONES),
    ("vCPU", "shutdown", "error path: KVM refused an MSI-X route, irqfd or ioeventfd, so the device fails"),
    ("vhost worker", "shutdown", "error path: a vhost-user request past its deadline fails the device (nested device-sigstop, not traced)"),
    ("vhost worker", "pidfd_send_signal", "error path: a restartable device's vhost-user request past its deadline kills its process for a restart (nested device-sigstop, not traced)"),
    ("device watcher", "pidfd_send_signal", "error path: a restartable device that missed its liveness pings is killed for a restart (nested device-sigstop, not traced)"),
    ("api", "nanosleep", ACCEPT_FAILED),
    ("api", "clock_nanosleep", ACCEPT_FAILED),
    ("api", "shutdown", "error path: an error answer to a request not read in full (api::linger; nested api, not traced)"),
    ("api", "fcntl", "std's debug builds check a descriptor is open before closing it (F_GETFD); this build is a release build"),
    ("backend-req", "close", NO_BACKEND_REQ),
    ("backend-req", "recvmsg", NO_BACKEND_REQ),
    ("backend-req", "sendmsg", NO_BACKEND_REQ),
    // ---- Every device process (runtime_rules).
    ("runtime", "brk", ALLOCATOR),
    ("runtime", "madvise", ALLOCATOR),
    ("runtime", "mremap", ALLOCATOR),
    ("runtime", "clock_gettime", VDSO),
    ("runtime", "getpid", GLIBC_ABORT),
    ("runtime", "tgkill", GLIBC_ABORT),
    ("runtime", "tkill", MUSL_ABORT),
    ("runtime", "rt_sigaction", MUSL_ABORT),
    ("runtime", "rseq", GLIBC_THREADS),
    ("runtime", "sched_getaffinity", GLIBC_THREADS),
    ("runtime", "set_robust_list", GLIBC_THREADS),
    ("runtime", "getrandom", "std's RandomState seeds a HashMap from getrandom once per thread; the maps of this run were seeded before the filter"),
    // ---- bulkhead-block.
    ("bulkhead-block", "pwritev", SYNC_ENGINE),
    ("bulkhead-block", "fdatasync", SYNC_ENGINE),
    ("bulkhead-block", "fallocate", SYNC_ENGINE),
    ("bulkhead-block", "io_uring_enter", IN_MEMORY),
    ("bulkhead-block", "sched_yield", "engine::run_uring yields while its submission queue is full: load"),
    ("bulkhead-block", "rt_sigreturn", MAPPED_FAULT),
    // ---- The spawner, and every device process for life.
    ("bulkhead-spawn", "pidfd_send_signal", "the VMM hung up while devices still run (it was killed): the spawner kills them"),
    ("bulkhead-spawn", "setgroups", DEVICE_UID),
    ("bulkhead-spawn", "setgid", DEVICE_UID),
    ("bulkhead-spawn", "setuid", DEVICE_UID),
    ("bulkhead-spawn", "accept4", "bulkhead-console's socket clients (--console socket=): the trace scenario starts no console"),
    ("bulkhead-spawn", "getrlimit", "close_from's fallback, on kernels without close_range (before 5.9)"),
    ("bulkhead-spawn", "statfs", "statvfs of a bind mount's source (Jail::bind): no device kind of this build binds a path"),
    ("bulkhead-spawn", "landlock_add_rule", "a landlock ruleset that allows a path: no device kind of this build opens one"),
    ("bulkhead-spawn", "restart_syscall", "a stopped device continued in a restartable wait (SIGSTOP, SIGCONT): device-sigstop, not traced"),
    ("bulkhead-spawn", "statx", "std on glibc asks statx first for a file's metadata (cgroup set-up, std::fs); on musl (this build) std uses fstat and newfstatat"),
    ("bulkhead-spawn", "rt_sigreturn", "a signal handler returns: none runs here (std's stack overflow handler on a fault)"),
    ("bulkhead-spawn", "clock_gettime", IN_A_DEVICE),
    ("bulkhead-spawn", "getpid", IN_A_DEVICE),
    ("bulkhead-spawn", "tgkill", IN_A_DEVICE),
    ("bulkhead-spawn", "tkill", IN_A_DEVICE),
    ("bulkhead-spawn", "getrandom", IN_A_DEVICE),
    ("bulkhead-spawn", "madvise", IN_A_DEVICE),
    ("bulkhead-spawn", "mremap", IN_A_DEVICE),
    ("bulkhead-spawn", "rseq", IN_A_DEVICE),
    ("bulkhead-spawn", "sched_getaffinity", IN_A_DEVICE),
    ("bulkhead-spawn", "set_robust_list", IN_A_DEVICE),
    ("bulkhead-spawn", "sched_yield", IN_A_DEVICE),
    ("bulkhead-spawn", "pwritev", IN_A_DEVICE),
    ("bulkhead-spawn", "fdatasync", IN_A_DEVICE),
    ("bulkhead-spawn", "fallocate", IN_A_DEVICE),
    ("bulkhead-spawn", "io_uring_enter", IN_A_DEVICE),
];

const ACCEPT_FAILED: &str = "error path: api::worker pauses 100 ms after a failed accept (EMFILE)";
const IN_MEMORY: &str =
    "the images of this run are files in L1's memory file systems, whose reads \
     and writes are done inline (DiskImage::memory_backed), not through io_uring; unit test \
     test_seccomp_block_matrix_real_kernel makes every allowed call, io_uring_enter included, \
     under this filter";

const MAPPED_FAULT: &str =
    "mapped::on_sigbus returns from a SIGBUS that a copy through the image's mapping took (an \
     image shrunk under the device): no traced run shrinks one; the disk-rate scenario does, \
     untraced, and unit test test_copy_fault_is_survived_under_the_block_filter makes the call \
     under this filter";

const ALLOCATOR: &str =
    "the allocator: glibc grows its main arena with brk and gives memory back with \
     madvise, realloc of a mapped block is mremap; musl's mallocng (this build) did neither here";
const VDSO: &str = "the vDSO answers it; the syscall is only its fallback";
const GLIBC_ABORT: &str = "panic -> abort on glibc (raise: getpid, gettid, tgkill SIGABRT); \
     unit test panic_under_filter_ends: SIGABRT, not SIGSYS";
const MUSL_ABORT: &str =
    "panic -> abort (musl resets SIGABRT's action, rt_sigaction, and raises it \
     with tkill); unit test panic_under_filter_ends: SIGABRT, not SIGSYS";
const GLIBC_THREADS: &str = "glibc's thread start and exit (robust futex list, rseq, \
     pthread_getattr_np's affinity); musl (this build) does not make these calls";
const HOTPLUG: &str = "hot-plug on the main thread after its filter (Vm::plug): run 2 plugs and \
     unplugs a disk, not a NIC (a NIC's plug opens /dev/net/tun and sets the tap's host side \
     through an AF_INET socket: nested hotplug, not traced), and an unplugged device that does \
     not exit is killed (pidfd_send_signal)";
const MILESTONES: &str = "milestone::log, only at debug level (-vv): the start-up milestones";
const NO_BACKEND_REQ: &str = "the thread starts only for a backend that offers \
     VHOST_USER_PROTOCOL_F_BACKEND_REQ; neither block nor net does yet";
const SYNC_ENGINE: &str =
    "the synchronous engine, used where io_uring cannot be set up (no io_uring, \
     io_uring_disabled, a refused ring); L1's kernel has io_uring, whose rings did the writes, \
     flushes and discards (io_uring_enter)";
const DEVICE_UID: &str = "--device-uid (nested device-uid scenario, not traced)";
const IN_A_DEVICE: &str =
    "in a device's allowlist, which the spawner's must cover (filters stack; \
     outside_spawner): unused in the trace for the reason given there";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("record") if args.len() == 3 => record(Path::new(&args[1]), Path::new(&args[2])),
        Some("check") if args.len() >= 4 && (args.len() - 1).is_multiple_of(3) => {
            let mut runs = Vec::new();
            for (i, c) in args[1..].chunks(3).enumerate() {
                let families = TraceFamily::parse_list(&c[0]);
                if families.is_empty() {
                    bail!("run {}: no trace family in '{}'", i + 1, c[0]);
                }
                let vmm_pid: u32 = c[1].parse().context("VMM pid")?;
                let usage = Usage::read(Path::new(&c[2]))?;
                runs.push(Run {
                    number: i + 1,
                    families,
                    vmm_pid,
                    usage_path: c[2].clone(),
                    usage,
                });
            }
            let ok = check(&runs)?;
            std::process::exit(if ok { 0 } else { 1 });
        }
        _ => bail!(
            "usage: bulkhead-seccomp-usage record OUT STOPFILE | \
             check FAMILIES VMM_PID USAGE [FAMILIES VMM_PID USAGE ...]"
        ),
    }
}

// ---- record ----------------------------------------------------------------------------------

/// One logged call, as counted: which VMM's (0: none found), which process (and its name),
/// which thread, which syscall.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    vmm: u32,
    pid: u32,
    process: String,
    thread: String,
    arch: u32,
    nr: i64,
}

/// What `record` wrote.
#[derive(Debug, Default)]
struct Usage {
    calls: BTreeMap<Key, u64>,
    /// Signs of lost records, each with how often it was seen.
    lost: BTreeMap<String, u64>,
    records: u64,
}

impl Usage {
    fn write(&self, out: &Path) -> Result<()> {
        let mut f = File::create(out).with_context(|| format!("creating {}", out.display()))?;
        writeln!(f, "# records {}", self.records)?;
        for (l, n) in &self.lost {
            writeln!(f, "# lost {n} {}", l.replace('\n', " "))?;
        }
        for (k, n) in &self.calls {
            writeln!(
                f,
                "{}\t{}\t{}\t{}\t{:x}\t{}\t{}",
                k.vmm, k.pid, k.process, k.thread, k.arch, k.nr, n
            )?;
        }
        Ok(())
    }

    fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut u = Usage::default();
        for line in text.lines() {
            if let Some(n) = line.strip_prefix("# records ") {
                u.records = n.trim().parse()?;
            } else if let Some(l) = line.strip_prefix("# lost ") {
                let (n, what) = l.split_once(' ').unwrap_or((l, ""));
                u.lost.insert(what.to_string(), n.parse()?);
            } else if !line.is_empty() {
                let f: Vec<&str> = line.split('\t').collect();
                if f.len() != 7 {
                    bail!("{}: bad line '{line}'", path.display());
                }
                u.calls.insert(
                    Key {
                        vmm: f[0].parse()?,
                        pid: f[1].parse()?,
                        process: f[2].to_string(),
                        thread: f[3].to_string(),
                        arch: u32::from_str_radix(f[4], 16)?,
                        nr: f[5].parse()?,
                    },
                    f[6].parse()?,
                );
            }
        }
        Ok(u)
    }
}

/// A seccomp audit record's fields.
#[derive(Debug, PartialEq, Eq)]
struct Record {
    pid: u32,
    comm: String,
    arch: u32,
    nr: i64,
    code: u32,
}

/// The value of ` key=` in an audit message.
fn field<'a>(msg: &'a str, key: &str) -> Option<&'a str> {
    let at = msg.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &msg[at..];
    if let Some(q) = rest.strip_prefix('"') {
        return q.split('"').next();
    }
    rest.split(' ').next()
}

/// An audit string field: quoted text, or hex when it holds special characters.
fn audit_string(msg: &str, key: &str) -> Option<String> {
    let at = msg.find(&format!(" {key}="))? + key.len() + 2;
    if msg[at..].starts_with('"') {
        return field(msg, key).map(str::to_string);
    }
    let hex = field(msg, key)?;
    let bytes = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// Parses a seccomp audit record (`type=1326 ... pid= comm= ... arch= syscall= ... code=`).
fn parse_record(msg: &str) -> Option<Record> {
    if !msg.contains(TYPE_SECCOMP) {
        return None;
    }
    Some(Record {
        pid: field(msg, "pid")?.parse().ok()?,
        comm: audit_string(msg, "comm")?,
        arch: u32::from_str_radix(field(msg, "arch")?, 16).ok()?,
        nr: field(msg, "syscall")?.parse().ok()?,
        code: u32::from_str_radix(field(msg, "code")?.trim_start_matches("0x"), 16).ok()?,
    })
}

/// Whether a kernel message says audit records were dropped.
fn says_lost(msg: &str) -> bool {
    (msg.contains("kauditd") && msg.contains("suppressed"))
        || msg.contains("audit_lost=")
        || msg.contains("backlog limit exceeded")
        || msg.contains("hold queue overflow")
        || msg.contains("rate limit exceeded")
}

/// The sequence number and message of a /dev/kmsg record ("PRI,SEQ,TS,FLAGS;MESSAGE\n...").
fn split_kmsg(rec: &str) -> Option<(u64, &str)> {
    let (head, rest) = rec.split_once(';')?;
    let seq = head.split(',').nth(1)?.parse().ok()?;
    Some((seq, rest.lines().next().unwrap_or("")))
}

fn record(out: &Path, stop: &Path) -> Result<()> {
    let mut kmsg = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .context("opening /dev/kmsg")?;
    // SAFETY: lseek on a descriptor we own; SEEK_END on /dev/kmsg moves past every record
    // written so far.
    if unsafe { libc::lseek(kmsg.as_raw_fd(), 0, libc::SEEK_END) } < 0 {
        bail!("seeking /dev/kmsg: {}", std::io::Error::last_os_error());
    }
    let mut usage = Usage::default();
    let mut processes: HashMap<u32, (String, u32)> = HashMap::new();
    let mut next_seq: Option<u64> = None;
    let mut buf = vec![0u8; 16384];
    let mut quiet_since: Option<Instant> = None;
    loop {
        let mut got_any = false;
        loop {
            match kmsg.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    got_any = true;
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    let Some((seq, msg)) = split_kmsg(&rec) else {
                        continue;
                    };
                    if let Some(want) = next_seq {
                        if seq > want {
                            *usage
                                .lost
                                .entry("kernel log records skipped".into())
                                .or_insert(0) += seq - want;
                        }
                    }
                    next_seq = Some(seq + 1);
                    if says_lost(msg) {
                        *usage.lost.entry(msg.to_string()).or_insert(0) += 1;
                    }
                    let Some(r) = parse_record(msg) else {
                        continue;
                    };
                    if r.code != CODE_LOG {
                        continue;
                    }
                    usage.records += 1;
                    let (process, vmm) = processes
                        .entry(r.pid)
                        .or_insert_with(|| {
                            let (name, _) = proc_stat(r.pid).unwrap_or_else(|| ("?".into(), 0));
                            (name, vmm_of(r.pid))
                        })
                        .clone();
                    *usage
                        .calls
                        .entry(Key {
                            vmm,
                            pid: r.pid,
                            process,
                            thread: r.comm.replace(['\t', '\n'], " "),
                            arch: r.arch,
                            nr: r.nr,
                        })
                        .or_insert(0) += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                    *usage
                        .lost
                        .entry("the kernel log overwrote records before they were read".into())
                        .or_insert(0) += 1;
                    next_seq = None;
                }
                Err(e) => return Err(e).context("reading /dev/kmsg"),
            }
        }
        if stop.exists() {
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if got_any {
                quiet_since = Some(Instant::now());
            } else if since.elapsed() > Duration::from_secs(1) {
                break;
            }
        }
        let mut pfd = libc::pollfd {
            fd: kmsg.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 200) };
    }
    usage.write(out)
}

/// A process's name and parent pid, from `/proc/PID/stat` ("PID (NAME) STATE PPID ...").
fn proc_stat(pid: u32) -> Option<(String, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (name, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
    let ppid = rest.split(' ').nth(1)?.parse().ok()?;
    Some((name.to_string(), ppid))
}

/// The VMM `pid` belongs to: the topmost of itself and its ancestors named `bulkhead`; 0 if
/// none. Topmost, because a process the VMM forks is named `bulkhead` too until it names
/// itself (the spawner) or execs (a device program).
fn vmm_of(mut pid: u32) -> u32 {
    let mut vmm = 0;
    for _ in 0..32 {
        let Some((name, ppid)) = proc_stat(pid) else {
            break;
        };
        if name == "bulkhead" {
            vmm = pid;
        }
        if ppid <= 1 {
            break;
        }
        pid = ppid;
    }
    vmm
}

// ---- check -----------------------------------------------------------------------------------

struct Run {
    number: usize,
    families: Vec<TraceFamily>,
    vmm_pid: u32,
    /// The recording the run's calls are in (shared by runs traced at the same time).
    usage_path: String,
    usage: Usage,
}

/// A filter whose rules are checked.
struct Filter {
    name: String,
    rules: Rules,
    /// Syscall -> who used it (run and thread kind or process) -> calls.
    used: BTreeMap<&'static str, BTreeMap<String, u64>>,
}

/// The VMM thread kind a thread name belongs to (`std::thread::Builder::name` in the VMM;
/// comm is cut at 15 bytes).
/// Whether thread name `thread` (a comm: the kernel keeps 15 bytes of a longer name) is a
/// name ending in `suffix`, maybe cut: `balloon0-deadline` is `balloon0-deadli`.
fn cut_suffix(thread: &str, suffix: &str) -> bool {
    thread.ends_with(suffix)
        || (thread.len() == 15 && (2..suffix.len()).any(|k| thread.ends_with(&suffix[..k])))
}

fn thread_kind(thread: &str) -> Option<ThreadKind> {
    if thread == "bulkhead" {
        Some(ThreadKind::Main)
    } else if thread.starts_with("vcpu") {
        Some(ThreadKind::Vcpu)
    } else if thread == "signals" {
        Some(ThreadKind::Signals)
    } else if thread == "serial-in" {
        Some(ThreadKind::SerialIn)
    } else if thread == "devices" || thread == "devices-probe" {
        // The device monitor and its liveness probe, under the same filter.
        Some(ThreadKind::DeviceWatcher)
    } else if thread.contains("-backend") || cut_suffix(thread, "-backend-req") {
        Some(ThreadKind::BackendReq)
    } else if cut_suffix(thread, "-vhost") || cut_suffix(thread, "-deadline") {
        Some(ThreadKind::VhostWorker)
    } else if thread
        .strip_prefix("api")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    {
        Some(ThreadKind::Api)
    } else {
        None
    }
}

fn check(runs: &[Run]) -> Result<bool> {
    let arch = native_arch();
    let mut filters: Vec<Filter> = Vec::new();
    let mut add = |name: &str, rules: Rules| {
        filters.push(Filter {
            name: name.to_string(),
            rules,
            used: BTreeMap::new(),
        })
    };
    // What every VMM thread kind allows (common_rules: allocating, locking, logging, thread
    // exit, abort on a panic): judged on all VMM threads together, as any thread takes those
    // paths; each kind's own rules on that kind.
    let kinds: Vec<(ThreadKind, Rules)> = ThreadKind::ALL
        .iter()
        .map(|&k| (k, bulkhead::seccomp::rules(k)))
        .collect();
    let mut common = kinds[0].1.clone();
    common
        .allowed
        .retain(|name, _| kinds.iter().all(|(_, r)| r.allowed.contains_key(name)));
    common.enosys.clear();
    let minus = |all: &Rules, shared: &Rules| {
        let mut r = all.clone();
        r.allowed
            .retain(|name, _| !shared.allowed.contains_key(name));
        r
    };
    add(VMM_COMMON, common.clone());
    for (kind, rules) in &kinds {
        add(kind.name(), minus(rules, &common));
    }
    // The device runtime's rules are judged on every device process together, a device's own
    // rules on that device.
    let runtime = bulkhead_device_runtime::seccomp::runtime_rules();
    add(RUNTIME, runtime.clone());
    add(
        "bulkhead-block",
        minus(&bulkhead_block::seccomp::rules(), &runtime),
    );
    add(
        "bulkhead-net",
        minus(&bulkhead_net::seccomp::rules(), &runtime),
    );
    add(
        "bulkhead-balloon",
        minus(&bulkhead_balloon::seccomp::rules(), &runtime),
    );
    add(
        "bulkhead-spawn",
        bulkhead_sandbox::spawner_filter::spawner_rules(),
    );
    let index = |filters: &[Filter], name: &str| {
        filters
            .iter()
            .position(|f| f.name == name)
            .expect("a filter of the list")
    };
    let mut ok = true;
    let mut misattributed = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        // The runs recorded in the same file: the first of them reports what belongs to none.
        let sharing: Vec<&Run> = runs
            .iter()
            .filter(|r| r.usage_path == run.usage_path)
            .collect();
        let first_of_file = !runs[..i].iter().any(|r| r.usage_path == run.usage_path);
        if first_of_file {
            for (k, n) in &run.usage.calls {
                if !sharing.iter().any(|r| r.vmm_pid == k.vmm) {
                    misattributed.push(format!(
                        "{}: {n} calls by pid {} ({}/{}) of VMM pid {} (0: none found), which no run names",
                        run.usage_path, k.pid, k.process, k.thread, k.vmm
                    ));
                }
            }
        }
        let calls: Vec<(&Key, u64)> = run
            .usage
            .calls
            .iter()
            .filter(|(k, _)| k.vmm == run.vmm_pid)
            .map(|(k, &n)| (k, n))
            .collect();
        let records: u64 = calls.iter().map(|(_, n)| n).sum();
        let fam: Vec<&str> = run.families.iter().map(|f| f.name()).collect();
        println!(
            "[seccomp-usage] run {} ({}): {} records of its VMM's processes ({} in {}), VMM pid {}",
            run.number,
            fam.join(","),
            records,
            run.usage.records,
            run.usage_path,
            run.vmm_pid
        );
        let has = |f| run.families.contains(&f);
        if has(TraceFamily::VmmMain) && has(TraceFamily::VmmThreads) {
            bail!("run {}: vmm-main and vmm-threads stack on vCPU threads: trace them in separate runs", run.number);
        }
        if has(TraceFamily::Devices) && has(TraceFamily::Spawner) {
            bail!("run {}: devices and spawner stack on device processes: trace them in separate runs", run.number);
        }
        for (l, n) in run.usage.lost.iter().filter(|_| first_of_file) {
            println!(
                "[seccomp-usage] run {}: LOST RECORDS: {l} ({n} times)",
                run.number
            );
            ok = false;
        }
        if records == 0 {
            println!("[seccomp-usage] run {}: no record at all (is the trace on, and are seccomp's log actions logged?)", run.number);
            ok = false;
        }
        for (k, n) in calls {
            let Some(name) = syscall_name(k.nr, arch) else {
                misattributed.push(format!(
                    "run {}: pid {} ({}/{}) syscall {} has no name here",
                    run.number, k.pid, k.process, k.thread, k.nr
                ));
                continue;
            };
            let (targets, by): (Vec<&str>, String) = if k.pid == run.vmm_pid {
                if has(TraceFamily::VmmMain) {
                    (
                        vec![VMM_COMMON, ThreadKind::Main.name()],
                        format!("run {} main filter ({})", run.number, k.thread),
                    )
                } else if has(TraceFamily::VmmThreads) {
                    match thread_kind(&k.thread) {
                        Some(kind) if kind != ThreadKind::Main => (
                            vec![VMM_COMMON, kind.name()],
                            format!("run {} {}", run.number, kind.name()),
                        ),
                        _ => (vec![], String::new()),
                    }
                } else {
                    (vec![], String::new())
                }
            } else if has(TraceFamily::Spawner) {
                (
                    vec!["bulkhead-spawn"],
                    format!("run {} {}", run.number, k.process),
                )
            } else if has(TraceFamily::Devices) {
                match k.process.as_str() {
                    p @ ("bulkhead-block" | "bulkhead-net") => {
                        (vec![RUNTIME, p], format!("run {} {p}", run.number))
                    }
                    // The comm is 15 bytes at most.
                    "bulkhead-balloo" => (
                        vec![RUNTIME, "bulkhead-balloon"],
                        format!("run {} bulkhead-balloon", run.number),
                    ),
                    _ => (vec![], String::new()),
                }
            } else {
                (vec![], String::new())
            };
            // The call must be in one of the filters it is attributed to (a device's own
            // rules or the runtime's).
            let mut placed = false;
            for t in &targets {
                let i = index(&filters, t);
                if let Some((&key, _)) = filters[i].rules.allowed.get_key_value(name) {
                    *filters[i]
                        .used
                        .entry(key)
                        .or_default()
                        .entry(by.clone())
                        .or_insert(0) += n;
                    placed = true;
                    break;
                }
            }
            if !placed {
                misattributed.push(format!(
                    "run {}: {name} x{n} by pid {} (process {}, thread {}) is in none of the filters {:?}",
                    run.number, k.pid, k.process, k.thread, targets
                ));
            }
        }
    }
    for m in &misattributed {
        println!("[seccomp-usage] UNATTRIBUTED: {m}");
        ok = false;
    }
    let mut unused_total = 0;
    for f in &filters {
        println!(
            "[seccomp-usage] filter {}: {} syscalls allowed",
            f.name,
            f.rules.allowed.len()
        );
        for (&name, allow) in &f.rules.allowed {
            let args = match allow {
                Allow::Always => "",
                Allow::When(_) => " (argument-checked; values not traced)",
            };
            let exception = EXCEPTIONS
                .iter()
                .find(|(filter, s, _)| *filter == f.name && *s == name)
                .map(|(_, _, why)| *why);
            match f.used.get(name) {
                Some(by) => {
                    let runs: Vec<String> = by.iter().map(|(r, n)| format!("{r}: {n}")).collect();
                    println!(
                        "[seccomp-usage]   {:<24} used ({}){args}",
                        name,
                        runs.join(", ")
                    );
                    if exception.is_some() {
                        println!(
                            "[seccomp-usage]   {:<24} (its exception is not needed in this run)",
                            ""
                        );
                    }
                }
                None if syscall_nr(name, arch).is_none() => {
                    println!(
                        "[seccomp-usage]   {:<24} not on {arch:?} (left out of this filter here)",
                        name
                    );
                }
                None => match exception {
                    Some(why) => {
                        println!("[seccomp-usage]   {:<24} unused, exception: {why}", name)
                    }
                    None => {
                        println!("[seccomp-usage]   {:<24} UNUSED{args}", name);
                        unused_total += 1;
                    }
                },
            }
        }
        for name in &f.rules.enosys {
            println!(
                "[seccomp-usage]   {:<24} ENOSYS entry (an errno answer, never logged)",
                name
            );
        }
    }
    for (filter, s, _) in EXCEPTIONS {
        let known = filters
            .iter()
            .any(|f| f.name == *filter && f.rules.allowed.contains_key(s));
        if !known {
            println!("[seccomp-usage] STALE EXCEPTION: {filter} has no rule {s}");
            ok = false;
        }
    }
    let used_filters: BTreeSet<&str> = filters
        .iter()
        .filter(|f| !f.used.is_empty())
        .map(|f| f.name.as_str())
        .collect();
    for f in &filters {
        // A filter whose every rule has an exception (a thread no device starts) may be silent.
        let all_excused = f.rules.allowed.keys().all(|name| {
            EXCEPTIONS
                .iter()
                .any(|(filter, s, _)| *filter == f.name && s == name)
        });
        if !used_filters.contains(f.name.as_str()) && !all_excused {
            println!(
                "[seccomp-usage] filter {} logged nothing in any run",
                f.name
            );
            ok = false;
        }
    }
    if unused_total > 0 {
        println!("[seccomp-usage] {unused_total} rules unused without a listed reason");
        ok = false;
    }
    println!(
        "[seccomp-usage] {}",
        if ok {
            "every rule was used or has a listed reason"
        } else {
            "FAILED"
        }
    );
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_seccomp_log_record() {
        let msg = "audit: type=1326 audit(1796122325.460:3551): auid=4294967295 uid=0 gid=0 \
                   ses=4294967295 pid=7367 comm=\"d0-backend-req\" exe=\"/bin/bulkhead\" sig=0 \
                   arch=c00000b7 syscall=63 compat=0 ip=0x7f26be53d4f7 code=0x7ffc0000";
        assert_eq!(
            parse_record(msg),
            Some(Record {
                pid: 7367,
                comm: "d0-backend-req".into(),
                arch: 0xc000_00b7,
                nr: 63,
                code: CODE_LOG
            })
        );
        let hex = msg.replace("comm=\"d0-backend-req\"", "comm=612062");
        assert_eq!(parse_record(&hex).map(|r| r.comm), Some("a b".into()));
        assert_eq!(parse_record("audit: type=1300 pid=1"), None);
    }

    #[test]
    fn test_kmsg_split_and_loss_messages() {
        assert_eq!(
            split_kmsg("5,1234,5678,-;audit: type=1326 x\n SUBSYSTEM=y\n"),
            Some((1234, "audit: type=1326 x"))
        );
        assert!(says_lost("kauditd_printk_skb: 108 callbacks suppressed"));
        assert!(says_lost(
            "audit: audit_lost=3 audit_rate_limit=0 audit_backlog_limit=64"
        ));
        assert!(!says_lost("audit: type=1326 audit(1:2): pid=1"));
    }

    #[test]
    fn test_thread_names_map_to_kinds() {
        assert_eq!(thread_kind("bulkhead"), Some(ThreadKind::Main));
        assert_eq!(thread_kind("vcpu1"), Some(ThreadKind::Vcpu));
        assert_eq!(thread_kind("d0-backend-req"), Some(ThreadKind::BackendReq));
        assert_eq!(thread_kind("data-backend-re"), Some(ThreadKind::BackendReq));
        assert_eq!(thread_kind("d0-vhost"), Some(ThreadKind::VhostWorker));
        assert_eq!(thread_kind("d0-deadline"), Some(ThreadKind::VhostWorker));
        assert_eq!(
            thread_kind("balloon0-deadli"),
            Some(ThreadKind::VhostWorker)
        );
        assert_eq!(
            thread_kind("console-deadlin"),
            Some(ThreadKind::VhostWorker)
        );
        assert_eq!(
            thread_kind("a-long-id-vhost"),
            Some(ThreadKind::VhostWorker)
        );
        assert_eq!(
            thread_kind("a-long-id1-vhos"),
            Some(ThreadKind::VhostWorker)
        );
        assert_eq!(thread_kind("balloon0-backen"), Some(ThreadKind::BackendReq));
        assert_eq!(thread_kind("short-dead"), None, "not cut: no match");
        assert_eq!(thread_kind("devices"), Some(ThreadKind::DeviceWatcher));
        assert_eq!(
            thread_kind("devices-probe"),
            Some(ThreadKind::DeviceWatcher)
        );
        assert_eq!(thread_kind("api0"), Some(ThreadKind::Api));
        assert_eq!(thread_kind("api"), None);
        assert_eq!(thread_kind("queue0"), None);
    }

    #[test]
    fn test_exceptions_name_rules_that_exist() {
        for (filter, s, why) in EXCEPTIONS {
            assert!(!why.is_empty(), "{filter} {s}: no reason");
        }
    }

    #[test]
    fn test_calls_belong_to_the_topmost_bulkhead_ancestor() {
        // A shell named bulkhead (the VMM) with a child (a device process).
        let dir = std::env::temp_dir().join(format!("seccomp-usage-vmm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let vmm = dir.join("bulkhead");
        std::fs::copy("/bin/sh", &vmm).expect("copy /bin/sh");
        let mut sh = std::process::Command::new(&vmm)
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the shell");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(sh.stdout.as_mut().expect("stdout")),
            &mut line,
        )
        .expect("the child's pid");
        let child: u32 = line.trim().parse().expect("a pid");
        // Until it execs sleep, the child is a `bulkhead` too (and belongs to its parent).
        let before_exec = vmm_of(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while proc_stat(child).is_some_and(|(n, _)| n != "sleep") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let found = (vmm_of(sh.id()), vmm_of(child), vmm_of(std::process::id()));
        let name = proc_stat(child).map(|(n, ppid)| (n, ppid == sh.id()));
        // SAFETY: kill(2) on our own children.
        unsafe {
            libc::kill(child as i32, libc::SIGKILL);
        }
        sh.wait().ok();
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(before_exec, sh.id());
        assert_eq!(found, (sh.id(), sh.id(), 0));
        assert_eq!(name, Some(("sleep".to_string(), true)));
    }

    #[test]
    fn test_usage_file_round_trip() {
        let mut u = Usage {
            records: 3,
            lost: BTreeMap::from([("x y".to_string(), 2)]),
            ..Usage::default()
        };
        u.calls.insert(
            Key {
                vmm: 4,
                pid: 5,
                process: "bulkhead-block".into(),
                thread: "queue0".into(),
                arch: 0xc000_00b7,
                nr: 63,
            },
            3,
        );
        let p = std::env::temp_dir().join(format!("seccomp-usage-{}", std::process::id()));
        u.write(&p).expect("write");
        let back = Usage::read(&p).expect("read");
        std::fs::remove_file(&p).ok();
        assert_eq!(back.records, 3);
        assert_eq!(back.lost, u.lost);
        assert_eq!(back.calls, u.calls);
    }
}
