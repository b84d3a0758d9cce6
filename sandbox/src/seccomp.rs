//! Bulkhead's one seccomp layer, shared by the VMM's per-thread filters (`vmm/src/seccomp.rs`)
//! and every device process's filter (`devices/<kind>/src/seccomp.rs`): the syscall table of
//! both architectures, the rule helpers, compiling with seccompiler (default action
//! KillProcess, an ENOSYS prefix for syscalls such as `clone3` whose arguments a filter cannot
//! read), installing for the process or one thread, and a classic-BPF evaluator that unit
//! tests run filters on. See `docs/jail-seccomp.md` and `docs/vmm-seccomp.md`.
//!
//! Filters name syscalls, not numbers ([`SYSCALLS`]), so each can be compiled, and tested,
//! for x86_64 and aarch64 from either host.

use std::collections::BTreeMap;

use seccompiler::{BackendError, SeccompFilter};
pub use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule,
    TargetArch,
};

/// Errors building or installing a seccomp filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The running architecture has no seccomp support here.
    #[error("this architecture ({0}) has no seccomp filter")]
    Arch(&'static str, #[source] seccompiler::BackendError),
    /// A filter names a syscall missing from [`SYSCALLS`].
    #[error("the {filter} filter names syscall {syscall}, which has no number here")]
    UnknownSyscall {
        /// The filter.
        filter: String,
        /// The syscall.
        syscall: &'static str,
    },
    /// seccompiler refused a rule or the filter.
    #[error("cannot build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    /// seccompiler could not produce BPF.
    #[error("cannot compile the seccomp filter to BPF")]
    Compile(#[source] seccompiler::BackendError),
    /// The program is longer than the kernel takes.
    #[error("the seccomp filter is too long ({0} instructions)")]
    TooLong(usize),
    /// PR_SET_NO_NEW_PRIVS failed.
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] std::io::Error),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// Syscall numbers on x86_64 and aarch64 (Linux 6.12 tables; `None`: the architecture has
/// no such syscall, and a rule naming it is left out of that architecture's filter).
pub const SYSCALLS: &[(&str, Option<i64>, Option<i64>)] = &[
    ("accept4", Some(288), Some(242)),
    ("access", Some(21), None),
    ("arch_prctl", Some(158), None),
    ("brk", Some(12), Some(214)),
    ("capget", Some(125), Some(90)),
    ("capset", Some(126), Some(91)),
    ("chdir", Some(80), Some(49)),
    ("clock_gettime", Some(228), Some(113)),
    ("clock_nanosleep", Some(230), Some(115)),
    ("clone", Some(56), Some(220)),
    ("clone3", Some(435), Some(435)),
    ("close", Some(3), Some(57)),
    ("close_range", Some(436), Some(436)),
    ("connect", Some(42), Some(203)),
    ("dup", Some(32), Some(23)),
    ("dup2", Some(33), None),
    ("dup3", Some(292), Some(24)),
    ("epoll_create1", Some(291), Some(20)),
    ("epoll_ctl", Some(233), Some(21)),
    ("epoll_pwait", Some(281), Some(22)),
    ("epoll_wait", Some(232), None),
    ("eventfd2", Some(290), Some(19)),
    ("execve", Some(59), Some(221)),
    ("execveat", Some(322), Some(281)),
    ("exit", Some(60), Some(93)),
    ("exit_group", Some(231), Some(94)),
    ("faccessat", Some(269), Some(48)),
    ("faccessat2", Some(439), Some(439)),
    ("fallocate", Some(285), Some(47)),
    ("fchdir", Some(81), Some(50)),
    ("fcntl", Some(72), Some(25)),
    ("fdatasync", Some(75), Some(83)),
    ("fork", Some(57), None),
    ("fstat", Some(5), Some(80)),
    ("fstatfs", Some(138), Some(44)),
    ("fsync", Some(74), Some(82)),
    ("ftruncate", Some(77), Some(46)),
    ("futex", Some(202), Some(98)),
    ("getcwd", Some(79), Some(17)),
    ("getdents64", Some(217), Some(61)),
    ("getegid", Some(108), Some(177)),
    ("geteuid", Some(107), Some(175)),
    ("getgid", Some(104), Some(176)),
    ("getpid", Some(39), Some(172)),
    ("getppid", Some(110), Some(173)),
    ("getrandom", Some(318), Some(278)),
    ("getrlimit", Some(97), Some(163)),
    ("getrusage", Some(98), Some(165)),
    ("getsockopt", Some(55), Some(209)),
    ("gettid", Some(186), Some(178)),
    ("getuid", Some(102), Some(174)),
    ("io_uring_enter", Some(426), Some(426)),
    ("io_uring_register", Some(427), Some(427)),
    ("io_uring_setup", Some(425), Some(425)),
    ("ioctl", Some(16), Some(29)),
    ("kill", Some(62), Some(129)),
    ("landlock_add_rule", Some(445), Some(445)),
    ("landlock_create_ruleset", Some(444), Some(444)),
    ("landlock_restrict_self", Some(446), Some(446)),
    ("lseek", Some(8), Some(62)),
    ("madvise", Some(28), Some(233)),
    ("memfd_create", Some(319), Some(279)),
    ("mkdir", Some(83), None),
    ("mkdirat", Some(258), Some(34)),
    ("mmap", Some(9), Some(222)),
    ("mount", Some(165), Some(40)),
    ("mprotect", Some(10), Some(226)),
    ("mremap", Some(25), Some(216)),
    ("munmap", Some(11), Some(215)),
    ("nanosleep", Some(35), Some(101)),
    ("newfstatat", Some(262), Some(79)),
    ("open", Some(2), None),
    ("openat", Some(257), Some(56)),
    ("pidfd_open", Some(434), Some(434)),
    ("pidfd_send_signal", Some(424), Some(424)),
    ("pipe2", Some(293), Some(59)),
    ("pivot_root", Some(155), Some(41)),
    ("poll", Some(7), None),
    ("ppoll", Some(271), Some(73)),
    ("prctl", Some(157), Some(167)),
    ("pread64", Some(17), Some(67)),
    ("preadv", Some(295), Some(69)),
    ("prlimit64", Some(302), Some(261)),
    ("ptrace", Some(101), Some(117)),
    ("pwrite64", Some(18), Some(68)),
    ("pwritev", Some(296), Some(70)),
    ("read", Some(0), Some(63)),
    ("readlink", Some(89), None),
    ("readlinkat", Some(267), Some(78)),
    ("readv", Some(19), Some(65)),
    ("recvfrom", Some(45), Some(207)),
    ("recvmsg", Some(47), Some(212)),
    ("restart_syscall", Some(219), Some(128)),
    ("rmdir", Some(84), None),
    ("rseq", Some(334), Some(293)),
    ("rt_sigaction", Some(13), Some(134)),
    ("rt_sigprocmask", Some(14), Some(135)),
    ("rt_sigreturn", Some(15), Some(139)),
    ("rt_sigtimedwait", Some(128), Some(137)),
    ("sched_getaffinity", Some(204), Some(123)),
    ("sched_setaffinity", Some(203), Some(122)),
    ("sched_yield", Some(24), Some(124)),
    ("seccomp", Some(317), Some(277)),
    ("sendmsg", Some(46), Some(211)),
    ("sendto", Some(44), Some(206)),
    ("set_robust_list", Some(273), Some(99)),
    ("set_tid_address", Some(218), Some(96)),
    ("setgid", Some(106), Some(144)),
    ("setgroups", Some(116), Some(159)),
    ("sethostname", Some(170), Some(161)),
    ("setns", Some(308), Some(268)),
    ("setresgid", Some(119), Some(149)),
    ("setresuid", Some(117), Some(147)),
    ("setrlimit", Some(160), Some(164)),
    ("setsockopt", Some(54), Some(208)),
    ("setuid", Some(105), Some(146)),
    ("shutdown", Some(48), Some(210)),
    ("sigaltstack", Some(131), Some(132)),
    ("socket", Some(41), Some(198)),
    ("socketpair", Some(53), Some(199)),
    ("statfs", Some(137), Some(43)),
    ("statx", Some(332), Some(291)),
    ("tgkill", Some(234), Some(131)),
    ("timerfd_create", Some(283), Some(85)),
    ("timerfd_gettime", Some(287), Some(87)),
    ("timerfd_settime", Some(286), Some(86)),
    ("tkill", Some(200), Some(130)),
    ("umount2", Some(166), Some(39)),
    ("uname", Some(63), Some(160)),
    ("unlinkat", Some(263), Some(35)),
    ("unshare", Some(272), Some(97)),
    ("wait4", Some(61), Some(260)),
    ("waitid", Some(247), Some(95)),
    ("write", Some(1), Some(64)),
    ("writev", Some(20), Some(66)),
];

/// Whether `name` is in [`SYSCALLS`].
pub fn is_known(name: &str) -> bool {
    SYSCALLS.iter().any(|(n, _, _)| *n == name)
}

/// The number of `name` on `arch` (`None`: unknown, or absent on that architecture).
pub fn syscall_nr(name: &str, arch: TargetArch) -> Option<i64> {
    SYSCALLS
        .iter()
        .find(|(n, _, _)| *n == name)
        .and_then(|&(_, x86, arm)| match arch {
            TargetArch::x86_64 => x86,
            TargetArch::aarch64 => arm,
            TargetArch::riscv64 => None,
        })
}

/// The name of syscall `nr` on `arch`, if [`SYSCALLS`] has it.
pub fn syscall_name(nr: i64, arch: TargetArch) -> Option<&'static str> {
    SYSCALLS
        .iter()
        .find(|&&(_, x86, arm)| {
            let n = match arch {
                TargetArch::x86_64 => x86,
                TargetArch::aarch64 => arm,
                TargetArch::riscv64 => None,
            };
            n == Some(nr)
        })
        .map(|&(name, _, _)| name)
}

/// The architecture this binary runs on.
pub fn native_arch() -> TargetArch {
    if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else {
        TargetArch::x86_64
    }
}

/// One argument check: `(arg & mask) == value`, on the low 32 bits (`Dword`: every argument
/// the filters check is an `int` or a flag word the kernel reads as 32 bits) or all 64.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cond {
    /// Argument index, 0-5.
    pub arg: u8,
    /// Bits compared.
    pub mask: u64,
    /// Their wanted value.
    pub value: u64,
    /// Whether all 64 bits are compared.
    pub qword: bool,
}

impl Cond {
    /// `arg == value` (low 32 bits).
    pub const fn eq(arg: u8, value: u64) -> Self {
        Self {
            arg,
            mask: 0xffff_ffff,
            value,
            qword: false,
        }
    }

    /// `(arg & mask) == value` (low 32 bits).
    pub const fn masked(arg: u8, mask: u64, value: u64) -> Self {
        Self {
            arg,
            mask,
            value,
            qword: false,
        }
    }

    /// Whether argument values `args` satisfy it.
    pub fn holds(&self, args: &[u64; 6]) -> bool {
        let a = args[usize::from(self.arg)];
        let width = if self.qword { u64::MAX } else { 0xffff_ffff };
        a & self.mask & width == self.value & self.mask & width
    }

    fn to_seccompiler(self) -> Result<SeccompCondition, BackendError> {
        let (len, mask, value) = if self.qword {
            (SeccompCmpArgLen::Qword, self.mask, self.value)
        } else {
            (
                SeccompCmpArgLen::Dword,
                self.mask & 0xffff_ffff,
                self.value & 0xffff_ffff,
            )
        };
        let op = if mask == 0xffff_ffff || mask == u64::MAX {
            SeccompCmpOp::Eq
        } else {
            SeccompCmpOp::MaskedEq(mask)
        };
        SeccompCondition::new(self.arg, len, op, value & mask)
    }
}

/// How a syscall is allowed: always, or when all conditions of one of the rules hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allow {
    /// Whatever the arguments.
    Always,
    /// When one of these rules (each a list of conditions that must all hold) matches.
    When(Vec<Vec<Cond>>),
}

/// A filter under construction: syscall name -> how it is allowed. Syscalls in `enosys`
/// fail with ENOSYS instead of killing the process.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    /// The allowed syscalls.
    pub allowed: BTreeMap<&'static str, Allow>,
    /// Syscalls answered with ENOSYS.
    pub enosys: Vec<&'static str>,
}

impl Rules {
    /// Allows `syscall` whatever its arguments.
    pub fn allow(&mut self, syscall: &'static str) -> &mut Self {
        self.allowed.insert(syscall, Allow::Always);
        self
    }

    /// Allows `syscall` when all of `conds` hold; adds to what is allowed already.
    pub fn allow_when(&mut self, syscall: &'static str, conds: Vec<Cond>) -> &mut Self {
        match self.allowed.get_mut(syscall) {
            Some(Allow::Always) => {}
            Some(Allow::When(rules)) => rules.push(conds),
            None => {
                self.allowed.insert(syscall, Allow::When(vec![conds]));
            }
        }
        self
    }

    /// Allows `syscall` when argument `arg` is one of `values`.
    pub fn allow_arg(&mut self, syscall: &'static str, arg: u8, values: &[u64]) -> &mut Self {
        for &v in values {
            self.allow_when(syscall, vec![Cond::eq(arg, v)]);
        }
        self
    }

    /// Allows `ioctl` with one of these request numbers.
    pub fn allow_ioctls(&mut self, requests: &[u64]) -> &mut Self {
        self.allow_arg("ioctl", 1, requests)
    }

    /// Answers `syscall` with ENOSYS.
    pub fn enosys(&mut self, syscall: &'static str) -> &mut Self {
        if !self.enosys.contains(&syscall) {
            self.enosys.push(syscall);
        }
        self
    }

    /// Whether the rules let `syscall` with `args` through (`None`: ENOSYS; `Some(false)`:
    /// the process is killed). What the compiled filter does, without BPF.
    pub fn verdict(&self, syscall: &str, args: &[u64; 6]) -> Option<bool> {
        if self.enosys.contains(&syscall) {
            return None;
        }
        Some(match self.allowed.get(syscall) {
            None => false,
            Some(Allow::Always) => true,
            Some(Allow::When(rules)) => rules.iter().any(|r| r.iter().all(|c| c.holds(args))),
        })
    }

    /// Compiles the rules for `arch`; `filter` names them in errors.
    pub fn compile(&self, filter: &str, arch: TargetArch) -> Result<BpfProgram, SeccompError> {
        self.compile_with(filter, arch, SeccompAction::Allow)
    }

    /// Compiles the rules for this host, as the filter of `family` that a process installs:
    /// as [`Rules::compile`] does, except in the test-only trace mode ([`TRACE_ENV`] names
    /// `family`), where every call a rule allows is allowed and logged (SECCOMP_RET_LOG)
    /// instead of silently allowed. Everything outside the rules is killed (or gets its errno)
    /// exactly as without the trace.
    pub fn compile_installed(
        &self,
        filter: &str,
        family: TraceFamily,
    ) -> Result<BpfProgram, SeccompError> {
        let allowed = if traced(family) {
            log::warn!(
                "{TRACE_ENV}: the {filter} filter logs every call it allows to the kernel log \
                 (seccomp rule usage trace; test only)"
            );
            SeccompAction::Log
        } else {
            SeccompAction::Allow
        };
        self.compile_with(filter, native_arch(), allowed)
    }

    /// Compiles the rules for `arch`, answering the calls they allow with `allowed`.
    fn compile_with(
        &self,
        filter: &str,
        arch: TargetArch,
        allowed: SeccompAction,
    ) -> Result<BpfProgram, SeccompError> {
        let mut map = BTreeMap::new();
        for (&name, allow) in &self.allowed {
            if !is_known(name) {
                return Err(SeccompError::UnknownSyscall {
                    filter: filter.to_string(),
                    syscall: name,
                });
            }
            // A syscall the architecture lacks cannot be called there.
            let Some(nr) = syscall_nr(name, arch) else {
                continue;
            };
            let rules = match allow {
                Allow::Always => Vec::new(),
                Allow::When(rules) => rules
                    .iter()
                    .map(|conds| {
                        let c = conds
                            .iter()
                            .map(|c| c.to_seccompiler())
                            .collect::<Result<Vec<_>, _>>()?;
                        SeccompRule::new(c)
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(SeccompError::Build)?,
            };
            map.insert(nr, rules);
        }
        let mut enosys = Vec::new();
        for &name in &self.enosys {
            if !is_known(name) {
                return Err(SeccompError::UnknownSyscall {
                    filter: filter.to_string(),
                    syscall: name,
                });
            }
            enosys.extend(syscall_nr(name, arch));
        }
        compile_numbers(map, &enosys, arch, allowed)
    }
}

/// The environment variable that turns on the seccomp rule usage trace (test only; see
/// `docs/jail-seccomp.md`, "Rule usage trace"): a comma-separated list of [`TraceFamily`]
/// names. The filters of the families it names answer the calls their rules allow with
/// SECCOMP_RET_LOG (allow, and write an audit record to the kernel log) instead of
/// SECCOMP_RET_ALLOW; nothing else changes: a call outside the rules is killed, or gets its
/// errno, as always. It weakens no filter; it only floods the kernel log, which is why only the
/// nested test harness sets it. The jail passes it on to device processes (their environment
/// is otherwise empty).
pub const TRACE_ENV: &str = "BULKHEAD_SECCOMP_TRACE";

/// Which filters a trace covers. Filters that stack on one thread (the VMM's main filter on
/// its vCPU threads; the spawner's on every device process) are traced in separate runs, so
/// that each logged call is known to come from one filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceFamily {
    /// The VMM main thread's filter (and so its vCPU threads, which inherit it): `vmm-main`.
    VmmMain,
    /// The VMM's other thread filters (vCPU, signals, serial-in, devices, backend-req, vhost
    /// worker): `vmm-threads`.
    VmmThreads,
    /// Every device process's filter: `devices`.
    Devices,
    /// The device spawner's filter, which every device process keeps too: `spawner`.
    Spawner,
}

impl TraceFamily {
    /// Every family.
    pub const ALL: [TraceFamily; 4] = [
        TraceFamily::VmmMain,
        TraceFamily::VmmThreads,
        TraceFamily::Devices,
        TraceFamily::Spawner,
    ];

    /// Its name in [`TRACE_ENV`].
    pub fn name(self) -> &'static str {
        match self {
            TraceFamily::VmmMain => "vmm-main",
            TraceFamily::VmmThreads => "vmm-threads",
            TraceFamily::Devices => "devices",
            TraceFamily::Spawner => "spawner",
        }
    }

    /// The families a [`TRACE_ENV`] value names (unknown names are ignored).
    pub fn parse_list(value: &str) -> Vec<TraceFamily> {
        value
            .split(',')
            .filter_map(|n| TraceFamily::ALL.into_iter().find(|f| f.name() == n.trim()))
            .collect()
    }
}

/// Whether [`TRACE_ENV`] names `family` in this process's environment (read once).
pub fn traced(family: TraceFamily) -> bool {
    static TRACED: std::sync::OnceLock<Vec<TraceFamily>> = std::sync::OnceLock::new();
    TRACED
        .get_or_init(|| {
            std::env::var(TRACE_ENV)
                .map(|v| TraceFamily::parse_list(&v))
                .unwrap_or_default()
        })
        .contains(&family)
}

/// An allowlist by number: syscall number to the rules one of which its arguments must match
/// (an empty list allows any arguments). [`Rules`] is the named form filters are written in.
pub type Allowlist = BTreeMap<i64, Vec<SeccompRule>>;

/// A condition matching when argument `index` (a 64-bit value) equals `value`.
pub fn arg_eq(index: u8, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value)
        .map_err(SeccompError::Build)
}

/// A condition matching when the bits `mask` of argument `index` equal `value`.
pub fn arg_masked_eq(index: u8, mask: u64, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(
        index,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )
    .map_err(SeccompError::Build)
}

/// A rule made of `conditions`, all of which must hold.
pub fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conditions).map_err(SeccompError::Build)
}

/// Compiles a numeric `allow` for the running architecture; the syscalls in `enosys` fail
/// with ENOSYS.
pub fn compile(allow: Allowlist, enosys: &[i64]) -> Result<BpfProgram, SeccompError> {
    compile_numbers(allow, enosys, native_arch(), SeccompAction::Allow)
}

/// Most instructions a classic BPF program may have (BPF_MAXINSNS).
const MAX_INSNS: usize = 4096;

fn compile_numbers(
    allow: Allowlist,
    enosys: &[i64],
    arch: TargetArch,
    allowed: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(allow, SeccompAction::KillProcess, allowed, arch)
        .map_err(SeccompError::Build)?;
    let body: BpfProgram = filter.try_into().map_err(SeccompError::Compile)?;
    let program = with_errno_prefix(audit_arch(arch), enosys, libc::ENOSYS as u32, body);
    if program.len() > MAX_INSNS {
        return Err(SeccompError::TooLong(program.len()));
    }
    Ok(program)
}

const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_JGT_K: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
const BPF_JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const BPF_JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const BPF_JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const BPF_AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
/// Offsets in `struct seccomp_data`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const DATA_ARGS: u32 = 16;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_AARCH64: u32 = 0xc000_00b7;
/// SECCOMP_RET_ERRNO.
pub const RET_ERRNO: u32 = 0x0005_0000;
/// SECCOMP_RET_ALLOW.
pub const RET_ALLOW: u32 = 0x7fff_0000;
/// SECCOMP_RET_KILL_PROCESS.
pub const RET_KILL_PROCESS: u32 = 0x8000_0000;
/// SECCOMP_RET_LOG: the rule usage trace's answer to an allowed call.
pub const RET_LOG: u32 = 0x7ffc_0000;

/// The AUDIT_ARCH value of `arch`.
pub fn audit_arch(arch: TargetArch) -> u32 {
    match arch {
        TargetArch::x86_64 => AUDIT_ARCH_X86_64,
        TargetArch::aarch64 => AUDIT_ARCH_AARCH64,
        // riscv64: AUDIT_ARCH_RISCV64.
        TargetArch::riscv64 => 0xc000_00f3,
    }
}

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> seccompiler::sock_filter {
    seccompiler::sock_filter { code, jt, jf, k }
}

/// Puts in front of `body` a check that returns `errno` for the syscalls in `nrs` (on `arch`
/// only; other architectures fall through to `body`, which kills them).
fn with_errno_prefix(arch: u32, nrs: &[i64], errno: u32, body: BpfProgram) -> BpfProgram {
    if nrs.is_empty() {
        return body;
    }
    // Layout: 0 load arch; 1 arch? else -> body; 2 load nr; 3..3+k nr == n_i? -> ret;
    // 3+k jump -> body; 4+k ret errno; body at 5+k.
    let k = nrs.len().min(250);
    let body_at = 5 + k;
    let mut prog = Vec::with_capacity(body_at + body.len());
    prog.push(insn(BPF_LD_W_ABS, 0, 0, DATA_ARCH));
    prog.push(insn(BPF_JEQ_K, 0, (body_at - 2) as u8, arch));
    prog.push(insn(BPF_LD_W_ABS, 0, 0, DATA_NR));
    for (i, nr) in nrs.iter().take(k).enumerate() {
        let here = 3 + i;
        let ret_at = 4 + k;
        prog.push(insn(BPF_JEQ_K, (ret_at - here - 1) as u8, 0, *nr as u32));
    }
    prog.push(insn(BPF_JA, 0, 0, 1));
    prog.push(insn(BPF_RET_K, 0, 0, RET_ERRNO | (errno & 0xffff)));
    prog.extend(body);
    prog
}

/// Runs `prog` as the kernel would on the `struct seccomp_data` of syscall `nr` with `args`
/// on `arch`, and returns the action (`RET_ALLOW`, `RET_KILL_PROCESS`, `RET_ERRNO | errno`).
/// For tests: it knows the instructions seccompiler and this module emit, and returns
/// `None` on any other, or a jump out of the program.
pub fn evaluate(
    prog: &[seccompiler::sock_filter],
    arch: u32,
    nr: i64,
    args: &[u64; 6],
) -> Option<u32> {
    let word = |k: u32| -> Option<u32> {
        match k {
            DATA_NR => Some(nr as u32),
            DATA_ARCH => Some(arch),
            k if (DATA_ARGS..DATA_ARGS + 48).contains(&k) && k.is_multiple_of(4) => {
                let i = ((k - DATA_ARGS) / 8) as usize;
                let a = args[i];
                Some(if (k - DATA_ARGS).is_multiple_of(8) {
                    a as u32
                } else {
                    (a >> 32) as u32
                })
            }
            _ => None,
        }
    };
    let mut acc = 0u32;
    let mut pc = 0usize;
    for _ in 0..=prog.len() {
        let i = prog.get(pc)?;
        let jump = |cond: bool| 1 + usize::from(if cond { i.jt } else { i.jf });
        pc += match i.code {
            BPF_LD_W_ABS => {
                acc = word(i.k)?;
                1
            }
            BPF_AND_K => {
                acc &= i.k;
                1
            }
            BPF_JEQ_K => jump(acc == i.k),
            BPF_JGT_K => jump(acc > i.k),
            BPF_JGE_K => jump(acc >= i.k),
            BPF_JSET_K => jump(acc & i.k != 0),
            BPF_JA => 1 + i.k as usize,
            BPF_RET_K => return Some(i.k),
            _ => return None,
        };
    }
    None
}

/// Installs `filter` on every thread of the calling process, after setting no_new_privs
/// (which the kernel requires of a process without CAP_SYS_ADMIN, and which the jail has set
/// already). From here on a syscall outside the allowlist kills the process. For device
/// processes.
pub fn apply(filter: &BpfProgram) -> Result<(), SeccompError> {
    set_no_new_privs()?;
    seccompiler::apply_filter_all_threads(filter).map_err(SeccompError::Install)
}

/// Installs `filter` on the calling thread only (the VMM: one filter per thread type).
pub fn apply_thread(filter: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(filter).map_err(SeccompError::Install)
}

fn set_no_new_privs() -> Result<(), SeccompError> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SeccompError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Flags every thread-creating `clone` carries (glibc's and musl's pthread_create alike).
pub const CLONE_THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM) as u64;
/// Every CLONE_NEW* flag `clone` takes (CLONE_NEWTIME is clone3-only: in `clone` its bit is
/// part of the exit signal).
pub const CLONE_NEW_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;

/// Thread creation only: `clone` with the thread flags and no new namespace; `clone3`
/// answers ENOSYS (its flags are in memory a filter cannot read), so the C library falls back
/// to `clone`.
pub fn allow_threads_only(r: &mut Rules) {
    r.allow_when(
        "clone",
        vec![Cond::masked(
            0,
            CLONE_THREAD_FLAGS | CLONE_NEW_FLAGS,
            CLONE_THREAD_FLAGS,
        )],
    );
    r.enosys("clone3");
}

/// Memory mappings that are never executable: `mmap` and `mprotect` without PROT_EXEC.
pub fn allow_mappings_no_exec(r: &mut Rules) {
    let no_exec = vec![Cond::masked(2, libc::PROT_EXEC as u64, 0)];
    r.allow_when("mmap", no_exec.clone());
    r.allow_when("mprotect", no_exec);
}

/// One call of the reliability matrix: a syscall, its arguments, and what the filter must do.
#[derive(Clone, Debug)]
pub struct Case {
    /// The syscall.
    pub syscall: &'static str,
    /// Its arguments.
    pub args: [u64; 6],
    /// `Some(true)`: runs; `Some(false)`: kills (SIGSYS); `None`: fails with ENOSYS.
    pub expect: Option<bool>,
}

/// Arguments that make every syscall the filters allow fail harmlessly (a bad descriptor, a
/// bad pointer, an invalid flag) where a rule leaves them free.
const HARMLESS: u64 = u64::MAX;

/// The matrix of `rules`: every allowed rule with arguments that satisfy it (the call must
/// run), the same with each checked argument mutated until no rule matches (it must kill),
/// each ENOSYS syscall, and `socket`, which no filter here allows.
pub fn matrix(rules: &Rules) -> Vec<Case> {
    let mut cases = Vec::new();
    for (&name, allow) in &rules.allowed {
        match allow {
            Allow::Always => cases.push(Case {
                syscall: name,
                args: [HARMLESS; 6],
                expect: Some(true),
            }),
            Allow::When(rs) => {
                for conds in rs {
                    let mut args = [HARMLESS; 6];
                    for c in conds {
                        let a = &mut args[usize::from(c.arg)];
                        *a = (*a & !c.mask) | (c.value & c.mask);
                        if !c.qword {
                            *a &= 0xffff_ffff;
                            *a |= c.value & !0xffff_ffff & c.mask;
                        }
                    }
                    debug_assert_eq!(rules.verdict(name, &args), Some(true), "{name}");
                    cases.push(Case {
                        syscall: name,
                        args,
                        expect: Some(true),
                    });
                    for c in conds {
                        let i = usize::from(c.arg);
                        let candidates = [
                            0xdead_beef,
                            args[i] ^ c.mask,
                            args[i] ^ (c.mask & c.mask.wrapping_neg()),
                            0,
                            1,
                            0x7fff_fff0,
                        ];
                        if let Some(bad) = candidates.iter().find_map(|&v| {
                            let mut m = args;
                            m[i] = v;
                            (rules.verdict(name, &m) == Some(false)).then_some(m)
                        }) {
                            cases.push(Case {
                                syscall: name,
                                args: bad,
                                expect: Some(false),
                            });
                        }
                    }
                }
            }
        }
    }
    for &name in &rules.enosys {
        cases.push(Case {
            syscall: name,
            args: [HARMLESS; 6],
            expect: None,
        });
    }
    if !rules.allowed.contains_key("socket") {
        cases.push(Case {
            syscall: "socket",
            args: [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0],
            expect: Some(false),
        });
    }
    cases
}

/// Checks `cases` on the compiled `prog` with [`evaluate`] for `arch`; returns the failures.
pub fn check_matrix_bpf(prog: &BpfProgram, arch: TargetArch, cases: &[Case]) -> Vec<String> {
    let mut failures = Vec::new();
    for c in cases {
        let Some(nr) = syscall_nr(c.syscall, arch) else {
            continue;
        };
        let got = evaluate(prog, audit_arch(arch), nr, &c.args);
        let want = match c.expect {
            Some(true) => RET_ALLOW,
            Some(false) => RET_KILL_PROCESS,
            None => RET_ERRNO | libc::ENOSYS as u32,
        };
        if got != Some(want) {
            failures.push(format!(
                "{:?}: {}({:x?}) gave {got:x?}, want {want:#x}",
                arch, c.syscall, c.args
            ));
        }
    }
    failures
}

/// How a filter behaves when really installed here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcement {
    /// The kernel runs it: real calls can be checked.
    Enforced,
    /// It cannot be installed (qemu-user refuses seccomp for its guest).
    NotInstallable,
    /// Installing it breaks the process itself (an emulator whose own host syscalls the
    /// guest's filter sees).
    Breaks,
}

/// How a forked child that installed a filter ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildEnd {
    /// `_exit(code)`.
    Exited(i32),
    /// Killed by this signal.
    Signalled(i32),
    /// Still running after the deadline; killed.
    Hung,
}

/// Forks; the child installs `prog` on itself (after no_new_privs) and runs `body`, which
/// must not return normally (it `_exit`s, or dies). Exit code 125: installing failed.
/// # Safety
/// `body` runs in a forked child of a possibly multi-threaded process: it may only make
/// async-signal-safe calls (raw syscalls, `_exit`), unless the caller accepts a deadlock,
/// which the deadline then reports as [`ChildEnd::Hung`].
pub unsafe fn run_in_child(prog: &BpfProgram, body: impl FnOnce()) -> ChildEnd {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: the caller's contract; the child never returns into the caller.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // SAFETY: raw prctl/seccomp with a valid program, then the body, then _exit.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &fprog) != 0
            {
                libc::_exit(125);
            }
            body();
            libc::_exit(0);
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child; `status` is valid.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return if libc::WIFSIGNALED(status) {
                ChildEnd::Signalled(libc::WTERMSIG(status))
            } else {
                ChildEnd::Exited(libc::WEXITSTATUS(status))
            };
        }
        if std::time::Instant::now() > deadline {
            // SAFETY: our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return ChildEnd::Hung;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Whether `prog` is really enforced here: a child installs it and exits at once.
pub fn enforcement(prog: &BpfProgram) -> Enforcement {
    // SAFETY: the body only calls _exit.
    match unsafe { run_in_child(prog, || libc::_exit(0)) } {
        ChildEnd::Exited(0) => Enforcement::Enforced,
        ChildEnd::Exited(125) => Enforcement::NotInstallable,
        _ => Enforcement::Breaks,
    }
}

/// Runs `cases` for real, each in its own forked child under `prog` (native architecture
/// only); returns the failures.
pub fn check_matrix_real(prog: &BpfProgram, cases: &[Case]) -> Vec<String> {
    let arch = native_arch();
    let mut failures = Vec::new();
    for c in cases {
        let Some(nr) = syscall_nr(c.syscall, arch) else {
            continue;
        };
        // rt_sigreturn with no signal frame loads garbage registers, and whatever runs next
        // is not the filter's doing: the BPF matrix covers it.
        if c.syscall == "rt_sigreturn" {
            continue;
        }
        let a = c.args;
        // SAFETY: the body is one raw syscall and _exit; arguments are harmless values
        // (bad descriptors, pointers and flags) or what a rule demands.
        let end = unsafe {
            run_in_child(prog, || {
                let r = libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
                let errno = *libc::__errno_location();
                libc::_exit(if r == -1 && errno == libc::ENOSYS {
                    38
                } else {
                    0
                });
            })
        };
        let ok = match (c.expect, end) {
            (Some(true), ChildEnd::Signalled(sig)) => sig != libc::SIGSYS,
            (Some(true), ChildEnd::Exited(code)) => code != 125,
            (Some(false), ChildEnd::Signalled(sig)) => sig == libc::SIGSYS,
            (None, ChildEnd::Exited(code)) => code == 38,
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "{}({:x?}): {end:?}, expected {:?}",
                c.syscall, a, c.expect
            ));
        }
    }
    failures
}

/// Under `prog`, a panic (the hook [`install_panic_hook`] installs, then abort as
/// `panic = "abort"` does) must end in SIGABRT, not SIGSYS.
pub fn panic_under_filter_ends(prog: &BpfProgram) -> ChildEnd {
    // SAFETY: the panic path allocates; a lock held at fork by another thread would hang the
    // child, which run_in_child's deadline reports.
    unsafe {
        run_in_child(prog, || {
            install_panic_hook();
            let _ =
                std::panic::catch_unwind(|| panic!("panic under the seccomp filter (expected)"));
            std::process::abort();
        })
    }
}

/// A panic hook for filtered processes: the message goes to stderr in one write and nothing
/// else happens. std's default hook, with RUST_BACKTRACE set, resolves a backtrace (getcwd,
/// opening the executable, ...), which no filter allows: the process would die of SIGSYS
/// instead of aborting with the panic message. Install before the first filter.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let line = format!(
            "thread '{}' {info} (no backtrace under seccomp)\n",
            thread.name().unwrap_or("<unnamed>")
        );
        // SAFETY: write(2) of a buffer that lives across the call.
        unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stub_body() -> BpfProgram {
        vec![insn(BPF_RET_K, 0, 0, RET_ALLOW)]
    }

    #[test]
    fn test_errno_prefix_listed_syscall_gets_errno() {
        let prog = with_errno_prefix(AUDIT_ARCH_X86_64, &[435, 7], 38, stub_body());
        assert_eq!(
            evaluate(&prog, AUDIT_ARCH_X86_64, 435, &[0; 6]),
            Some(RET_ERRNO | 38)
        );
        assert_eq!(
            evaluate(&prog, AUDIT_ARCH_X86_64, 7, &[0; 6]),
            Some(RET_ERRNO | 38)
        );
    }

    #[test]
    fn test_errno_prefix_other_syscall_reaches_body() {
        let prog = with_errno_prefix(AUDIT_ARCH_X86_64, &[435], 38, stub_body());
        assert_eq!(
            evaluate(&prog, AUDIT_ARCH_X86_64, 1, &[0; 6]),
            Some(RET_ALLOW)
        );
        // Another architecture's numbering is not trusted: the body decides (and kills).
        assert_eq!(
            evaluate(&prog, AUDIT_ARCH_AARCH64, 435, &[0; 6]),
            Some(RET_ALLOW)
        );
    }

    #[test]
    fn test_compile_small_allowlist_succeeds() {
        let mut allow = Allowlist::new();
        allow.insert(libc::SYS_exit_group, vec![]);
        let prog = compile(allow, &[libc::SYS_clone3]).expect("compile");
        assert!(prog.len() > 6);
    }

    #[test]
    fn test_syscall_table_matches_libc_on_this_host() {
        let arch = native_arch();
        let mut checked = 0;
        // Each entry against libc's SYS_* constant for this architecture.
        for (name, nr) in native_numbers() {
            assert_eq!(syscall_nr(name, arch), Some(nr), "{name}");
            checked += 1;
        }
        assert!(checked > 60, "{checked} entries checked");
        for (name, _, _) in SYSCALLS {
            assert!(
                native_numbers().iter().any(|(n, _)| n == name) || syscall_nr(name, arch).is_none(),
                "{name} is not checked against libc"
            );
        }
    }

    fn native_numbers() -> Vec<(&'static str, i64)> {
        let mut v: Vec<(&'static str, i64)> = vec![
            ("accept4", libc::SYS_accept4),
            ("brk", libc::SYS_brk),
            ("clock_gettime", libc::SYS_clock_gettime),
            ("clock_nanosleep", libc::SYS_clock_nanosleep),
            ("clone", libc::SYS_clone),
            ("clone3", libc::SYS_clone3),
            ("close", libc::SYS_close),
            ("connect", libc::SYS_connect),
            ("epoll_create1", libc::SYS_epoll_create1),
            ("epoll_ctl", libc::SYS_epoll_ctl),
            ("epoll_pwait", libc::SYS_epoll_pwait),
            ("eventfd2", libc::SYS_eventfd2),
            ("execve", libc::SYS_execve),
            ("execveat", libc::SYS_execveat),
            ("exit", libc::SYS_exit),
            ("exit_group", libc::SYS_exit_group),
            ("fallocate", libc::SYS_fallocate),
            ("fcntl", libc::SYS_fcntl),
            ("fdatasync", libc::SYS_fdatasync),
            ("fstat", libc::SYS_fstat),
            ("ftruncate", libc::SYS_ftruncate),
            ("futex", libc::SYS_futex),
            ("getpid", libc::SYS_getpid),
            ("getrandom", libc::SYS_getrandom),
            ("getrusage", libc::SYS_getrusage),
            ("gettid", libc::SYS_gettid),
            ("io_uring_enter", libc::SYS_io_uring_enter),
            ("io_uring_register", libc::SYS_io_uring_register),
            ("io_uring_setup", libc::SYS_io_uring_setup),
            ("ioctl", libc::SYS_ioctl),
            ("kill", libc::SYS_kill),
            ("lseek", libc::SYS_lseek),
            ("madvise", libc::SYS_madvise),
            ("memfd_create", libc::SYS_memfd_create),
            ("mmap", libc::SYS_mmap),
            ("mount", libc::SYS_mount),
            ("mprotect", libc::SYS_mprotect),
            ("mremap", libc::SYS_mremap),
            ("munmap", libc::SYS_munmap),
            ("nanosleep", libc::SYS_nanosleep),
            ("newfstatat", libc::SYS_newfstatat),
            ("openat", libc::SYS_openat),
            ("prctl", libc::SYS_prctl),
            ("pread64", libc::SYS_pread64),
            ("preadv", libc::SYS_preadv),
            ("ptrace", libc::SYS_ptrace),
            ("pwritev", libc::SYS_pwritev),
            ("read", libc::SYS_read),
            ("readv", libc::SYS_readv),
            ("recvfrom", libc::SYS_recvfrom),
            ("recvmsg", libc::SYS_recvmsg),
            ("restart_syscall", libc::SYS_restart_syscall),
            ("rseq", libc::SYS_rseq),
            ("rt_sigaction", libc::SYS_rt_sigaction),
            ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
            ("rt_sigreturn", libc::SYS_rt_sigreturn),
            ("rt_sigtimedwait", libc::SYS_rt_sigtimedwait),
            ("sched_getaffinity", libc::SYS_sched_getaffinity),
            ("sched_setaffinity", libc::SYS_sched_setaffinity),
            ("sched_yield", libc::SYS_sched_yield),
            ("seccomp", libc::SYS_seccomp),
            ("sendmsg", libc::SYS_sendmsg),
            ("set_robust_list", libc::SYS_set_robust_list),
            ("setns", libc::SYS_setns),
            ("setsockopt", libc::SYS_setsockopt),
            ("shutdown", libc::SYS_shutdown),
            ("sigaltstack", libc::SYS_sigaltstack),
            ("socket", libc::SYS_socket),
            ("socketpair", libc::SYS_socketpair),
            ("statx", libc::SYS_statx),
            ("tgkill", libc::SYS_tgkill),
            ("tkill", libc::SYS_tkill),
            ("unshare", libc::SYS_unshare),
            ("wait4", libc::SYS_wait4),
            ("waitid", libc::SYS_waitid),
            ("write", libc::SYS_write),
            ("writev", libc::SYS_writev),
            ("capget", libc::SYS_capget),
            ("capset", libc::SYS_capset),
            ("chdir", libc::SYS_chdir),
            ("close_range", libc::SYS_close_range),
            ("dup", libc::SYS_dup),
            ("dup3", libc::SYS_dup3),
            ("faccessat", libc::SYS_faccessat),
            ("faccessat2", libc::SYS_faccessat2),
            ("fchdir", libc::SYS_fchdir),
            ("fstatfs", libc::SYS_fstatfs),
            ("fsync", libc::SYS_fsync),
            ("getcwd", libc::SYS_getcwd),
            ("getdents64", libc::SYS_getdents64),
            ("getegid", libc::SYS_getegid),
            ("geteuid", libc::SYS_geteuid),
            ("getgid", libc::SYS_getgid),
            ("getppid", libc::SYS_getppid),
            ("getrlimit", libc::SYS_getrlimit),
            ("getsockopt", libc::SYS_getsockopt),
            ("getuid", libc::SYS_getuid),
            ("landlock_add_rule", libc::SYS_landlock_add_rule),
            ("landlock_create_ruleset", libc::SYS_landlock_create_ruleset),
            ("landlock_restrict_self", libc::SYS_landlock_restrict_self),
            ("mkdirat", libc::SYS_mkdirat),
            ("pidfd_open", libc::SYS_pidfd_open),
            ("pidfd_send_signal", libc::SYS_pidfd_send_signal),
            ("pipe2", libc::SYS_pipe2),
            ("pivot_root", libc::SYS_pivot_root),
            ("ppoll", libc::SYS_ppoll),
            ("prlimit64", libc::SYS_prlimit64),
            ("pwrite64", libc::SYS_pwrite64),
            ("readlinkat", libc::SYS_readlinkat),
            ("sendto", libc::SYS_sendto),
            ("set_tid_address", libc::SYS_set_tid_address),
            ("setgid", libc::SYS_setgid),
            ("setgroups", libc::SYS_setgroups),
            ("sethostname", libc::SYS_sethostname),
            ("setresgid", libc::SYS_setresgid),
            ("setresuid", libc::SYS_setresuid),
            ("setrlimit", libc::SYS_setrlimit),
            ("setuid", libc::SYS_setuid),
            ("statfs", libc::SYS_statfs),
            ("timerfd_create", libc::SYS_timerfd_create),
            ("timerfd_gettime", libc::SYS_timerfd_gettime),
            ("timerfd_settime", libc::SYS_timerfd_settime),
            ("umount2", libc::SYS_umount2),
            ("uname", libc::SYS_uname),
            ("unlinkat", libc::SYS_unlinkat),
        ];
        #[cfg(target_arch = "x86_64")]
        v.extend([
            ("epoll_wait", libc::SYS_epoll_wait),
            ("access", libc::SYS_access),
            ("arch_prctl", libc::SYS_arch_prctl),
            ("dup2", libc::SYS_dup2),
            ("fork", libc::SYS_fork),
            ("mkdir", libc::SYS_mkdir),
            ("open", libc::SYS_open),
            ("poll", libc::SYS_poll),
            ("readlink", libc::SYS_readlink),
            ("rmdir", libc::SYS_rmdir),
        ]);
        v
    }

    #[test]
    fn test_rules_compile_and_bpf_agrees_with_verdict() {
        let mut r = Rules::default();
        r.allow("read");
        r.allow_arg("prctl", 0, &[15]);
        allow_threads_only(&mut r);
        allow_mappings_no_exec(&mut r);
        for arch in [TargetArch::x86_64, TargetArch::aarch64] {
            let prog = r.compile("test", arch).expect("compile");
            let aa = audit_arch(arch);
            let run = |name: &str, args: [u64; 6]| {
                evaluate(&prog, aa, syscall_nr(name, arch).expect("nr"), &args).expect("runs")
            };
            let glibc = 0x3d0f00u64;
            let musl = 0x7d0f00u64;
            for (name, args, want) in [
                ("read", [0; 6], RET_ALLOW),
                ("prctl", [15, 0, 0, 0, 0, 0], RET_ALLOW),
                ("prctl", [16, 0, 0, 0, 0, 0], RET_KILL_PROCESS),
                ("clone", [glibc, 0, 0, 0, 0, 0], RET_ALLOW),
                ("clone", [musl, 0, 0, 0, 0, 0], RET_ALLOW),
                (
                    "clone",
                    [libc::SIGCHLD as u64, 0, 0, 0, 0, 0],
                    RET_KILL_PROCESS,
                ),
                (
                    "clone",
                    [glibc | libc::CLONE_NEWUSER as u64, 0, 0, 0, 0, 0],
                    RET_KILL_PROCESS,
                ),
                ("clone3", [0; 6], RET_ERRNO | libc::ENOSYS as u32),
                ("mmap", [0, 4096, 3, 0x22, 0, 0], RET_ALLOW),
                ("mmap", [0, 4096, 7, 0x22, 0, 0], RET_KILL_PROCESS),
                ("mprotect", [0, 4096, 4, 0, 0, 0], RET_KILL_PROCESS),
                ("socket", [2, 1, 0, 0, 0, 0], RET_KILL_PROCESS),
            ] {
                assert_eq!(run(name, args), want, "{name} {args:x?} on {arch:?}");
                let verdict = r.verdict(name, &args);
                let expect = match want {
                    RET_ALLOW => Some(true),
                    RET_KILL_PROCESS => Some(false),
                    _ => None,
                };
                assert_eq!(verdict, expect, "verdict of {name} {args:x?}");
            }
        }
    }

    /// The trace mode changes only the answer to allowed calls: ALLOW becomes LOG, while a
    /// call outside the rules is still killed and an ENOSYS entry still gets ENOSYS.
    #[test]
    fn test_trace_mode_logs_allowed_calls_and_changes_nothing_else() {
        let mut r = Rules::default();
        r.allow("read");
        r.allow_arg("prctl", 0, &[15]);
        allow_threads_only(&mut r);
        for arch in [TargetArch::x86_64, TargetArch::aarch64] {
            let plain = r.compile("test", arch).expect("compile");
            let traced = r
                .compile_with("test", arch, SeccompAction::Log)
                .expect("compile traced");
            let aa = audit_arch(arch);
            let nr = |name| syscall_nr(name, arch).expect("nr");
            for (name, args) in [
                ("read", [0; 6]),
                ("prctl", [15, 0, 0, 0, 0, 0]),
                ("prctl", [16, 0, 0, 0, 0, 0]),
                ("clone3", [0; 6]),
                ("socket", [2, 1, 0, 0, 0, 0]),
            ] {
                let p = evaluate(&plain, aa, nr(name), &args).expect("runs");
                let t = evaluate(&traced, aa, nr(name), &args).expect("runs");
                let want = if p == RET_ALLOW { RET_LOG } else { p };
                assert_eq!(t, want, "{name} {args:x?} on {arch:?}");
            }
        }
        assert_eq!(
            TraceFamily::parse_list("vmm-threads, devices,nonsense"),
            vec![TraceFamily::VmmThreads, TraceFamily::Devices]
        );
        assert!(TraceFamily::parse_list("").is_empty());
    }

    #[test]
    fn test_rules_unknown_syscall_is_an_error() {
        let mut r = Rules::default();
        r.allow("no_such_syscall");
        assert!(matches!(
            r.compile("test", TargetArch::x86_64),
            Err(SeccompError::UnknownSyscall { .. })
        ));
    }
}
