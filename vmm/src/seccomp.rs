//! Seccomp filters for the VMM's own threads, one per thread type (docs/vmm-seccomp.md).
//!
//! Every thread installs its filter itself, for itself only (no TSYNC), when it starts:
//! helper threads (`signals`, `serial-in`, device watchers, `*-backend-req`) first thing in
//! their body; the main thread once the device processes are started and before the first
//! boot; vCPU threads first thing in their body. vCPU threads are started by the main thread
//! after its filter is in place, so both filters apply to them: the main thread's filter
//! therefore allows everything the vCPU filter does, plus what a new thread does before it
//! installs its own filter. A syscall outside a thread's filter kills the whole process
//! (SIGSYS, exit status 159 from a shell).
//!
//! Syscall numbers are per architecture ([`SYSCALLS`]), so every filter can be compiled, and
//! tested, for x86_64 and aarch64 from either host.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// The VMM's thread types, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread: VM creation, boot, reboot, shutdown.
    Main,
    /// A vCPU thread: KVM_RUN and MMIO exits.
    Vcpu,
    /// `signals`: turns SIGTERM/SIGINT/SIGHUP into events.
    Signals,
    /// `serial-in`: copies stdin to the guest console.
    SerialIn,
    /// `watch-<device>`: waits for a device process to end.
    DeviceWatcher,
    /// `<device>-backend-req`: serves a vhost-user backend's requests.
    BackendReq,
}

impl ThreadKind {
    /// Every thread type.
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Signals,
        ThreadKind::SerialIn,
        ThreadKind::DeviceWatcher,
        ThreadKind::BackendReq,
    ];

    /// Name for messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Signals => "signals",
            ThreadKind::SerialIn => "serial-in",
            ThreadKind::DeviceWatcher => "device watcher",
            ThreadKind::BackendReq => "backend-req",
        }
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A filter names a syscall missing from [`SYSCALLS`].
    #[error(
        "the {thread} thread's filter names syscall {syscall}, which has no number for {arch:?}"
    )]
    UnknownSyscall {
        /// The thread type.
        thread: &'static str,
        /// The syscall.
        syscall: &'static str,
        /// The target.
        arch: TargetArch,
    },
    /// seccompiler refused a rule or the filter.
    #[error("building the seccomp filter of the {0} thread")]
    Build(&'static str, #[source] BackendError),
    /// The filter could not be installed.
    #[error("installing the seccomp filter of the {0} thread")]
    Install(&'static str, #[source] seccompiler::Error),
    /// [`init`] was called twice.
    #[error("the seccomp filters were already set up")]
    AlreadyInitialised,
}

/// Syscall numbers on x86_64 and aarch64 (from seccompiler's tables, Linux 6.12), for the
/// syscalls the filters name. aarch64 has no `open`, `poll`, `select`...: none is used here.
const SYSCALLS: &[(&str, i64, i64)] = &[
    ("brk", 12, 214),
    ("clock_gettime", 228, 113),
    ("clock_nanosleep", 230, 115),
    ("clone", 56, 220),
    ("clone3", 435, 435),
    ("close", 3, 57),
    ("exit", 60, 93),
    ("exit_group", 231, 94),
    ("fstat", 5, 80),
    ("futex", 202, 98),
    ("getpid", 39, 172),
    ("getrandom", 318, 278),
    ("getrusage", 98, 165),
    ("gettid", 186, 178),
    ("ioctl", 16, 29),
    ("lseek", 8, 62),
    ("madvise", 28, 233),
    ("mmap", 9, 222),
    ("mprotect", 10, 226),
    ("mremap", 25, 216),
    ("munmap", 11, 215),
    ("nanosleep", 35, 101),
    ("newfstatat", 262, 79),
    ("pread64", 17, 67),
    ("prctl", 157, 167),
    ("read", 0, 63),
    ("readv", 19, 65),
    ("epoll_ctl", 233, 21),
    ("epoll_pwait", 281, 22),
    ("recvfrom", 45, 207),
    ("recvmsg", 47, 212),
    ("restart_syscall", 219, 128),
    ("rseq", 334, 293),
    ("rt_sigprocmask", 14, 135),
    ("rt_sigreturn", 15, 139),
    ("rt_sigtimedwait", 128, 137),
    ("sched_getaffinity", 204, 123),
    ("sched_yield", 24, 124),
    ("seccomp", 317, 277),
    ("sendmsg", 46, 211),
    ("set_robust_list", 273, 99),
    ("sigaltstack", 131, 132),
    ("socket", 41, 198),
    ("statx", 332, 291),
    ("tgkill", 234, 131),
    ("tkill", 200, 130),
    ("wait4", 61, 260),
    ("waitid", 247, 95),
    ("write", 1, 64),
    ("writev", 20, 66),
];

fn syscall_nr(name: &str, arch: TargetArch) -> Option<i64> {
    SYSCALLS
        .iter()
        .find(|(n, _, _)| *n == name)
        .and_then(|&(_, x86, arm)| match arch {
            TargetArch::x86_64 => Some(x86),
            TargetArch::aarch64 => Some(arm),
            _ => None,
        })
}

/// The architecture this binary runs on.
pub fn native_arch() -> TargetArch {
    if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else {
        TargetArch::x86_64
    }
}

// ioctl request numbers (asm-generic encoding, the same on x86_64 and aarch64).
const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const KVMIO: u64 = 0xae;

const fn kvm_ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (KVMIO << 8) | nr
}

/// KVM_CHECK_EXTENSION, `_IO(KVMIO, 0x03)`.
pub const KVM_CHECK_EXTENSION: u64 = kvm_ioc(IOC_NONE, 0x03, 0);
/// KVM_CREATE_VM, `_IO(KVMIO, 0x01)`.
pub const KVM_CREATE_VM: u64 = kvm_ioc(IOC_NONE, 0x01, 0);
/// KVM_GET_VCPU_MMAP_SIZE, `_IO(KVMIO, 0x04)`.
pub const KVM_GET_VCPU_MMAP_SIZE: u64 = kvm_ioc(IOC_NONE, 0x04, 0);
/// KVM_CREATE_VCPU, `_IO(KVMIO, 0x41)`.
pub const KVM_CREATE_VCPU: u64 = kvm_ioc(IOC_NONE, 0x41, 0);
/// KVM_SET_USER_MEMORY_REGION, `_IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)`.
pub const KVM_SET_USER_MEMORY_REGION: u64 = kvm_ioc(IOC_WRITE, 0x46, 32);
/// KVM_IRQ_LINE, `_IOW(KVMIO, 0x61, struct kvm_irq_level)`.
pub const KVM_IRQ_LINE: u64 = kvm_ioc(IOC_WRITE, 0x61, 8);
/// KVM_SET_GSI_ROUTING, `_IOW(KVMIO, 0x6a, struct kvm_irq_routing)`.
pub const KVM_SET_GSI_ROUTING: u64 = kvm_ioc(IOC_WRITE, 0x6a, 8);
/// KVM_IRQFD, `_IOW(KVMIO, 0x76, struct kvm_irqfd)`.
pub const KVM_IRQFD: u64 = kvm_ioc(IOC_WRITE, 0x76, 32);
/// KVM_IOEVENTFD, `_IOW(KVMIO, 0x79, struct kvm_ioeventfd)`.
pub const KVM_IOEVENTFD: u64 = kvm_ioc(IOC_WRITE, 0x79, 64);
/// KVM_RUN, `_IO(KVMIO, 0x80)`.
pub const KVM_RUN: u64 = kvm_ioc(IOC_NONE, 0x80, 0);
/// KVM_SIGNAL_MSI, `_IOW(KVMIO, 0xa5, struct kvm_msi)`.
pub const KVM_SIGNAL_MSI: u64 = kvm_ioc(IOC_WRITE, 0xa5, 32);
/// KVM_GET_ONE_REG, `_IOW(KVMIO, 0xab, struct kvm_one_reg)`.
pub const KVM_GET_ONE_REG: u64 = kvm_ioc(IOC_WRITE, 0xab, 16);
/// KVM_SET_ONE_REG, `_IOW(KVMIO, 0xac, struct kvm_one_reg)`.
pub const KVM_SET_ONE_REG: u64 = kvm_ioc(IOC_WRITE, 0xac, 16);
/// KVM_ARM_VCPU_INIT, `_IOW(KVMIO, 0xae, struct kvm_vcpu_init)`.
pub const KVM_ARM_VCPU_INIT: u64 = kvm_ioc(IOC_WRITE, 0xae, 32);
/// KVM_ARM_PREFERRED_TARGET, `_IOR(KVMIO, 0xaf, struct kvm_vcpu_init)`.
pub const KVM_ARM_PREFERRED_TARGET: u64 = kvm_ioc(IOC_READ, 0xaf, 32);
/// KVM_CREATE_DEVICE, `_IOWR(KVMIO, 0xe0, struct kvm_create_device)`.
pub const KVM_CREATE_DEVICE: u64 = kvm_ioc(IOC_READ | IOC_WRITE, 0xe0, 12);
/// KVM_SET_DEVICE_ATTR, `_IOW(KVMIO, 0xe1, struct kvm_device_attr)`.
pub const KVM_SET_DEVICE_ATTR: u64 = kvm_ioc(IOC_WRITE, 0xe1, 24);
/// KVM_HAS_DEVICE_ATTR, `_IOW(KVMIO, 0xe3, struct kvm_device_attr)`.
pub const KVM_HAS_DEVICE_ATTR: u64 = kvm_ioc(IOC_WRITE, 0xe3, 24);
/// TCGETS (asm-generic termbits).
const TCGETS: u64 = 0x5401;
/// TCSETS.
const TCSETS: u64 = 0x5402;
/// TIOCGWINSZ.
const TIOCGWINSZ: u64 = 0x5413;

/// How a syscall is allowed: always, or when any of the rules matches its arguments.
enum Allow {
    Always,
    When(Vec<SeccompRule>),
}

/// A filter under construction: syscall name -> how it is allowed.
#[derive(Default)]
struct Rules(BTreeMap<&'static str, Allow>);

impl Rules {
    /// Allows `syscall` whatever its arguments.
    fn allow(&mut self, syscall: &'static str) -> &mut Self {
        self.0.insert(syscall, Allow::Always);
        self
    }

    /// Allows `syscall` when argument `arg` (compared as 32 bits) is one of `values`; adds to
    /// what is allowed already.
    fn allow_arg(
        &mut self,
        syscall: &'static str,
        arg: u8,
        values: &[u64],
    ) -> Result<&mut Self, BackendError> {
        let mut rules = values
            .iter()
            .map(|&v| {
                SeccompRule::new(vec![SeccompCondition::new(
                    arg,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    v,
                )?])
            })
            .collect::<Result<Vec<_>, _>>()?;
        match self.0.get_mut(syscall) {
            Some(Allow::Always) => {}
            Some(Allow::When(existing)) => existing.append(&mut rules),
            None => {
                self.0.insert(syscall, Allow::When(rules));
            }
        }
        Ok(self)
    }

    /// Allows `ioctl` with one of these request numbers.
    fn allow_ioctls(&mut self, requests: &[u64]) -> Result<&mut Self, BackendError> {
        self.allow_arg("ioctl", 1, requests)
    }

    fn compile(self, thread: ThreadKind, arch: TargetArch) -> Result<BpfProgram, SeccompError> {
        let mut map = BTreeMap::new();
        for (name, allow) in self.0 {
            let nr = syscall_nr(name, arch).ok_or(SeccompError::UnknownSyscall {
                thread: thread.name(),
                syscall: name,
                arch,
            })?;
            let rules = match allow {
                Allow::Always => Vec::new(),
                Allow::When(rules) => rules,
            };
            map.insert(nr, rules);
        }
        let build = |e| SeccompError::Build(thread.name(), e);
        let filter =
            SeccompFilter::new(map, SeccompAction::KillProcess, SeccompAction::Allow, arch)
                .map_err(build)?;
        BpfProgram::try_from(filter).map_err(build)
    }
}

/// What every thread does: memory, locks, logging, ending itself, and aborting on a panic.
fn common_rules(abort_signal: u64) -> Result<Rules, BackendError> {
    let mut r = Rules::default();
    // Mutex, Condvar, mpsc channels, thread join (std's futex-based locks).
    r.allow("futex");
    // The allocator (musl mallocng and glibc malloc alike: brk/mmap/mremap for blocks,
    // madvise/munmap to give them back, mprotect for glibc's per-thread arenas).
    r.allow("brk")
        .allow("mmap")
        .allow("munmap")
        .allow("mremap")
        .allow("madvise")
        .allow("mprotect");
    // Log lines on stderr (env_logger) and their timestamps (vDSO fallback).
    r.allow("write").allow("writev").allow("clock_gettime");
    // std's HashMap keys, seeded per thread on first use.
    r.allow("getrandom");
    // Spin-then-yield in std's locks.
    r.allow("sched_yield");
    // Returning from a signal handler (the vCPU kick) and restarting what it interrupted.
    r.allow("rt_sigreturn").allow("restart_syscall");
    // Thread exit: musl's pthread_exit blocks signals, Rust removes its sigaltstack, glibc
    // unregisters rseq and advises its stack away (madvise above), then exit.
    r.allow("rt_sigprocmask")
        .allow("sigaltstack")
        .allow("rseq")
        .allow("exit");
    // Process exit, and abort() on a panic (panic = "abort"): raise(SIGABRT) is
    // getpid + gettid + tgkill on glibc, tkill on musl.
    r.allow("exit_group").allow("getpid").allow("gettid");
    r.allow_arg("tgkill", 2, &[abort_signal])?;
    r.allow_arg("tkill", 1, &[abort_signal])?;
    // isatty() on stderr (env_logger's colour choice): TCGETS on glibc, TIOCGWINSZ on musl.
    r.allow_ioctls(&[TCGETS, TIOCGWINSZ])?;
    Ok(r)
}

/// The vCPU thread: KVM_RUN and the devices its MMIO exits reach.
fn vcpu_rules(r: &mut Rules) -> Result<(), BackendError> {
    r.allow_ioctls(&[
        // VcpuThread::run_loop.
        KVM_RUN,
        // Pl011 output and receive interrupts (KvmIrqLine::set_level).
        KVM_IRQ_LINE,
        // virtio-pci BAR 0 moves (Transport::remap/unmap): an ioeventfd per queue notify.
        KVM_IOEVENTFD,
        // MSI-X vector mask/unmask and table writes (Msix): irqfds and GSI routes.
        KVM_IRQFD,
        KVM_SET_GSI_ROUTING,
        KVM_SIGNAL_MSI,
    ])?;
    // PL011 output to stdout or the --serial file (write), queue notifies without an
    // ioeventfd (eventfd write), logs.
    r.allow("write");
    // Draining stale kicks on a device reset (Transport::reset_device, eventfd read).
    r.allow("read");
    // vhost-user requests from virtio-pci register writes (VhostUserDevice::activate,
    // deactivate, read_config, write_config): messages with SCM_RIGHTS over a unix socket.
    r.allow("sendmsg").allow("recvmsg");
    // File descriptors that vhost-user replies carry and that are dropped.
    r.allow("close");
    // The "first KVM_RUN" start-up milestone (milestone::log).
    r.allow("getrusage");
    Ok(())
}

/// The main thread, from just before the first boot to the end: VM creation and boot (again
/// on every guest reset), starting the vCPU threads, shutdown. Includes the vCPU rules, as
/// vCPU threads inherit this filter.
fn main_rules(r: &mut Rules, kick_signal: u64) -> Result<(), BackendError> {
    vcpu_rules(r)?;
    r.allow_ioctls(&[
        // Vm::boot: Kvm::create_vm (KVM_CAP_ARM_VM_IPA_SIZE check, vCPU mmap size).
        KVM_CHECK_EXTENSION,
        KVM_CREATE_VM,
        KVM_GET_VCPU_MMAP_SIZE,
        // Vm::boot: guest RAM and vCPUs.
        KVM_SET_USER_MEMORY_REGION,
        KVM_CREATE_VCPU,
        // arch::create_machine and arch::set_boot_regs.
        KVM_ARM_PREFERRED_TARGET,
        KVM_ARM_VCPU_INIT,
        KVM_GET_ONE_REG,
        KVM_SET_ONE_REG,
        // gic::create: the vGICv3 + ITS or vGICv2.
        KVM_CREATE_DEVICE,
        KVM_SET_DEVICE_ATTR,
        KVM_HAS_DEVICE_ATTR,
        // terminal::restore on the way out.
        TCGETS,
        TCSETS,
    ])?;
    // Vm::boot: the kvm_run area of each vCPU (mmap, munmap when dropped); closing the old
    // VM's, vCPUs' and GIC's descriptors on a reboot; device connections on shutdown.
    r.allow("close");
    // Vm::boot: the kernel and initramfs are read again on every boot (lseek + read), and
    // the rng-seed from /dev/urandom (read); std's File may ask for the size.
    r.allow("read")
        .allow("readv")
        .allow("pread64")
        .allow("lseek")
        .allow("fstat")
        .allow("newfstatat")
        .allow("statx");
    // Vm::boot starts the vCPU threads: clone with CLONE_THREAD (musl), clone3 (glibc;
    // its flags are in memory, out of seccomp's reach).
    r.allow_masked("clone", 0, libc::CLONE_THREAD as u64)?;
    r.allow("clone3");
    // What a new thread does before its own filter: glibc registers its robust futex list
    // and rseq, reads its affinity (pthread_getattr_np); Rust names it (PR_SET_NAME) and
    // gives it a sigaltstack; then seccomp::apply sets NO_NEW_PRIVS and adds its filter.
    r.allow("set_robust_list").allow("sched_getaffinity");
    r.allow_arg(
        "prctl",
        0,
        &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64],
    )?;
    r.allow_arg("seccomp", 0, &[u64::from(libc::SECCOMP_SET_MODE_FILTER)])?;
    // Running::stop kicks vCPU threads out of KVM_RUN: pthread_kill is tgkill on glibc,
    // tkill on musl.
    r.allow_arg("tgkill", 2, &[kick_signal])?;
    r.allow_arg("tkill", 1, &[kick_signal])?;
    // Running::stop and Vm::shutdown_devices poll in short sleeps.
    r.allow("nanosleep").allow("clock_nanosleep");
    // The start-up milestones of the first boot (milestone::log).
    r.allow("getrusage");
    Ok(())
}

impl Rules {
    /// Allows `syscall` when the bits `mask` of argument `arg` are all set.
    fn allow_masked(
        &mut self,
        syscall: &'static str,
        arg: u8,
        mask: u64,
    ) -> Result<(), BackendError> {
        let rule = SeccompRule::new(vec![SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(mask),
            mask,
        )?])?;
        self.0.insert(syscall, Allow::When(vec![rule]));
        Ok(())
    }
}

/// The rules of one thread type.
fn rules(thread: ThreadKind, signals: &Signals) -> Result<Rules, BackendError> {
    let mut r = common_rules(signals.abort)?;
    match thread {
        ThreadKind::Main => main_rules(&mut r, signals.kick)?,
        ThreadKind::Vcpu => vcpu_rules(&mut r)?,
        ThreadKind::Signals => {
            // forward_signals: sigwait for SIGTERM/SIGINT/SIGHUP.
            r.allow("rt_sigtimedwait");
        }
        ThreadKind::SerialIn => {
            // forward_stdin: reading stdin.
            r.allow("read");
            // SharedPl011::feed raises the receive interrupt (KvmIrqLine::set_level).
            r.allow_ioctls(&[KVM_IRQ_LINE])?;
        }
        ThreadKind::DeviceWatcher => {
            // vhost_user::watch_device: Child::wait and JailedChild::wait (waitpid is wait4 on
            // musl and glibc); JailedChild releases its pidfd once the child is reaped (close).
            r.allow("wait4").allow("waitid").allow("close");
            // device::monitor::Monitor::run: epoll over the device log pipes, pidfds and the
            // spawner's report socket (epoll_pwait, called directly: aarch64 has no
            // epoll_wait; epoll_ctl DEL of an ended pipe or pidfd), reading log pipes (read)
            // and exit reports (recv is recvfrom); the device's log lines go to stderr (write).
            r.allow("epoll_pwait")
                .allow("epoll_ctl")
                .allow("read")
                .allow("recvfrom");
        }
        ThreadKind::BackendReq => {
            // FrontendReqHandler::handle_request: requests (recvmsg, with any fds) and
            // REPLY_ACK replies (sendmsg); received fds are closed.
            r.allow("recvmsg").allow("sendmsg").allow("close");
            // ConfigChange::handle_config_change signals the configuration interrupt
            // (eventfd write; in the common rules).
        }
    }
    Ok(r)
}

/// Signal numbers the filters allow sending (they differ between C libraries).
struct Signals {
    /// The vCPU kick (SIGRTMIN: 34 on glibc, 35 on musl).
    kick: u64,
    /// SIGABRT, for abort().
    abort: u64,
}

impl Signals {
    fn native() -> Self {
        Self {
            kick: crate::vcpu::kick_signal() as u64,
            abort: libc::SIGABRT as u64,
        }
    }
}

/// Compiles the filter of `thread` for `arch`.
pub fn compile(thread: ThreadKind, arch: TargetArch) -> Result<BpfProgram, SeccompError> {
    rules(thread, &Signals::native())
        .map_err(|e| SeccompError::Build(thread.name(), e))?
        .compile(thread, arch)
}

/// The compiled filters, or `None` when the sandbox is off.
static FILTERS: OnceLock<Option<BTreeMap<ThreadKind, BpfProgram>>> = OnceLock::new();

/// Compiles every thread type's filter for this host (`enabled`), or records that threads
/// run unfiltered (`--sandbox off`). Call once, before any thread calls [`apply`].
pub fn init(enabled: bool) -> Result<(), SeccompError> {
    let filters = if enabled {
        let arch = native_arch();
        Some(
            ThreadKind::ALL
                .iter()
                .map(|&t| compile(t, arch).map(|p| (t, p)))
                .collect::<Result<BTreeMap<_, _>, _>>()?,
        )
    } else {
        None
    };
    FILTERS
        .set(filters)
        .map_err(|_| SeccompError::AlreadyInitialised)
}

/// Installs the filter of `thread` on the calling thread. Does nothing when the sandbox is off
/// or [`init`] was not called (unit tests, library use).
pub fn apply(thread: ThreadKind) -> Result<(), SeccompError> {
    let Some(Some(filters)) = FILTERS.get() else {
        return Ok(());
    };
    let Some(program) = filters.get(&thread) else {
        return Ok(());
    };
    seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(thread.name(), e))?;
    log::debug!("seccomp filter of the {} thread installed", thread.name());
    Ok(())
}

/// Installs the filter of a helper thread at its start; a thread that cannot be confined
/// logs why and ends rather than run unconfined.
pub fn apply_or_end_thread(thread: ThreadKind) -> bool {
    match apply(thread) {
        Ok(()) => true,
        Err(e) => {
            log::error!("{e}: {}; the thread ends", error_chain(&e));
            false
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut causes = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        causes.push(s.to_string());
        source = s.source();
    }
    causes.join(": ")
}

/// Test-only: a guest write here makes the vCPU thread leave its filter (`seccomp-trigger`
/// feature). An address no device claims.
#[cfg(feature = "seccomp-trigger")]
pub const SECCOMP_TRIGGER_ADDR: u64 = 0x0a00_1000;

/// Test-only (`seccomp-trigger` feature): issues `socket(AF_INET, SOCK_STREAM, 0)`, which no
/// VMM thread's filter allows, so a sandboxed VMM dies of SIGSYS here.
#[cfg(feature = "seccomp-trigger")]
pub fn trigger_violation() {
    log::warn!("seccomp-trigger: the guest asked this vCPU thread to call socket()");
    // SAFETY: socket() takes no pointers; the descriptor, if any, is closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        // SAFETY: `fd` was just returned by socket() and is owned by nothing else.
        unsafe { libc::close(fd) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_seccomp_every_filter_compiles_for_x86_64_and_aarch64() {
        for arch in [TargetArch::x86_64, TargetArch::aarch64] {
            for thread in ThreadKind::ALL {
                let prog =
                    compile(thread, arch).unwrap_or_else(|e| panic!("{thread:?} on {arch:?}: {e}"));
                assert!(!prog.is_empty(), "{thread:?} on {arch:?}");
            }
        }
    }

    #[test]
    fn test_seccomp_syscall_table_matches_libc_on_this_host() {
        let arch = native_arch();
        let libc_nr: &[(&str, libc::c_long)] = &[
            ("brk", libc::SYS_brk),
            ("clock_gettime", libc::SYS_clock_gettime),
            ("clone", libc::SYS_clone),
            ("close", libc::SYS_close),
            ("futex", libc::SYS_futex),
            ("ioctl", libc::SYS_ioctl),
            ("mmap", libc::SYS_mmap),
            ("read", libc::SYS_read),
            ("recvmsg", libc::SYS_recvmsg),
            ("rt_sigtimedwait", libc::SYS_rt_sigtimedwait),
            ("sendmsg", libc::SYS_sendmsg),
            ("socket", libc::SYS_socket),
            ("tgkill", libc::SYS_tgkill),
            ("tkill", libc::SYS_tkill),
            ("wait4", libc::SYS_wait4),
            ("write", libc::SYS_write),
        ];
        for (name, nr) in libc_nr {
            assert_eq!(syscall_nr(name, arch), Some(*nr), "{name}");
        }
    }

    #[test]
    fn test_seccomp_kvm_ioctl_numbers() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_CREATE_VM, 0xae01);
        assert_eq!(KVM_IRQ_LINE, 0x4008_ae61);
        assert_eq!(KVM_IRQFD, 0x4020_ae76);
        assert_eq!(KVM_IOEVENTFD, 0x4040_ae79);
        assert_eq!(KVM_SET_GSI_ROUTING, 0x4008_ae6a);
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020_ae46);
        assert_eq!(KVM_SET_ONE_REG, 0x4010_aeac);
        assert_eq!(KVM_ARM_VCPU_INIT, 0x4020_aeae);
        assert_eq!(KVM_ARM_PREFERRED_TARGET, 0x8020_aeaf);
        assert_eq!(KVM_CREATE_DEVICE, 0xc00c_aee0);
        assert_eq!(KVM_SET_DEVICE_ATTR, 0x4018_aee1);
        // Struct sizes the encodings assume, where this host's kvm-bindings has the struct.
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_irqfd>(), 32);
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_ioeventfd>(), 64);
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_irq_routing>(), 8);
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_one_reg>(), 16);
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_device_attr>(), 24);
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_create_device>(), 12);
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_msi>(), 32);
        assert_eq!(
            std::mem::size_of::<kvm_bindings::kvm_userspace_memory_region>(),
            32
        );
    }

    #[test]
    fn test_seccomp_vcpu_filter_omits_what_vcpus_never_need() {
        // Checked on the rule level: the vCPU may not create sockets, fork or exec.
        let r = rules(ThreadKind::Vcpu, &Signals::native()).expect("rules");
        for s in ["socket", "clone", "clone3", "wait4", "prctl", "seccomp"] {
            assert!(!r.0.contains_key(s), "vCPU filter allows {s}");
        }
        let main = rules(ThreadKind::Main, &Signals::native()).expect("rules");
        assert!(!main.0.contains_key("socket"));
        // The main filter covers every vCPU syscall, since vCPU threads inherit it.
        for s in r.0.keys() {
            assert!(main.0.contains_key(s), "main filter lacks vCPU syscall {s}");
        }
    }

    /// In a forked child (so nothing else runs there): the vCPU filter lets an allowed
    /// syscall through and kills the process with SIGSYS on `socket`.
    #[test]
    #[cfg_attr(
        not(target_arch = "x86_64"),
        ignore = "installs a real filter: the cross-built test runs under qemu-user, which cannot; runs on x86_64"
    )]
    fn test_seccomp_vcpu_filter_kills_on_socket() {
        let prog = compile(ThreadKind::Vcpu, native_arch()).expect("compile");
        // SAFETY: the child only makes raw syscalls and _exits; it never returns to the test
        // harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            // SAFETY: prctl/seccomp/getrusage/socket/_exit with valid arguments.
            unsafe {
                if seccompiler::apply_filter(&prog).is_err() {
                    libc::_exit(2);
                }
                let mut ru: libc::rusage = std::mem::zeroed();
                libc::getrusage(libc::RUSAGE_SELF, &mut ru);
                libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child; `status` is valid.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "child status {status:#x}"
        );
    }
}
