//! Seccomp for device processes: compiling an allowlist with seccompiler (default action
//! KillProcess) and installing it. A device installs its own filter at the start of `main`,
//! after taking its descriptors and before it reads anything from the frontend. See
//! `docs/jail-seccomp.md`.

use std::collections::BTreeMap;

pub use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule,
};
use seccompiler::{SeccompFilter, TargetArch};

/// Errors building or installing a seccomp filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("this architecture ({0}) has no seccomp filter")]
    Arch(&'static str, #[source] seccompiler::BackendError),
    #[error("cannot build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    #[error("cannot compile the seccomp filter to BPF")]
    Compile(#[source] seccompiler::BackendError),
    #[error("the seccomp filter is too long ({0} instructions)")]
    TooLong(usize),
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] std::io::Error),
    #[error("cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// An allowlist: syscall number to the rules one of which its arguments must match (an empty
/// list allows any arguments).
pub type Allowlist = BTreeMap<i64, Vec<SeccompRule>>;

/// Most instructions a classic BPF program may have (BPF_MAXINSNS).
const MAX_INSNS: usize = 4096;

const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
/// Offsets in `struct seccomp_data`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_AARCH64: u32 = 0xc000_00b7;
const RET_ERRNO: u32 = 0x0005_0000;

/// A rule matching when argument `index` (a 64-bit value) equals `value`.
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

/// Compiles `allow` for the running architecture: a syscall not in it kills the process. The
/// syscalls in `enosys` fail with ENOSYS instead (for `clone3`, whose flags live in memory that
/// a filter cannot read: the C library then falls back to `clone`, whose flags it can).
pub fn compile(allow: Allowlist, enosys: &[i64]) -> Result<BpfProgram, SeccompError> {
    let arch = std::env::consts::ARCH;
    let target = TargetArch::try_from(arch).map_err(|e| SeccompError::Arch(arch, e))?;
    let filter = SeccompFilter::new(
        allow,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        target,
    )
    .map_err(SeccompError::Build)?;
    let body: BpfProgram = filter.try_into().map_err(SeccompError::Compile)?;
    let program = with_errno_prefix(audit_arch(target), enosys, libc::ENOSYS as u32, body);
    if program.len() > MAX_INSNS {
        return Err(SeccompError::TooLong(program.len()));
    }
    Ok(program)
}

fn audit_arch(arch: TargetArch) -> u32 {
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

/// Installs `filter` on every thread of the calling process, after setting no_new_privs
/// (which the kernel requires of a process without CAP_SYS_ADMIN, and which the jail has set
/// already). From here on a syscall outside the allowlist kills the process.
pub fn apply(filter: &BpfProgram) -> Result<(), SeccompError> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SeccompError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    seccompiler::apply_filter_all_threads(filter).map_err(SeccompError::Install)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `prog` on a seccomp_data for syscall `nr` on `arch`, as the kernel would.
    fn run(prog: &[seccompiler::sock_filter], arch: u32, nr: u32) -> u32 {
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let i = &prog[pc];
            match i.code {
                BPF_LD_W_ABS => {
                    acc = match i.k {
                        DATA_NR => nr,
                        DATA_ARCH => arch,
                        _ => 0,
                    };
                    pc += 1;
                }
                BPF_JEQ_K => pc += 1 + usize::from(if acc == i.k { i.jt } else { i.jf }),
                BPF_JA => pc += 1 + i.k as usize,
                BPF_RET_K => return i.k,
                other => panic!("instruction {other:#x} not expected in the prefix"),
            }
        }
    }

    fn stub_body() -> BpfProgram {
        vec![insn(BPF_RET_K, 0, 0, 0x7fff_0000)]
    }

    #[test]
    fn test_errno_prefix_listed_syscall_gets_errno() {
        let prog = with_errno_prefix(AUDIT_ARCH_X86_64, &[435, 7], 38, stub_body());
        assert_eq!(run(&prog, AUDIT_ARCH_X86_64, 435), RET_ERRNO | 38);
        assert_eq!(run(&prog, AUDIT_ARCH_X86_64, 7), RET_ERRNO | 38);
    }

    #[test]
    fn test_errno_prefix_other_syscall_reaches_body() {
        let prog = with_errno_prefix(AUDIT_ARCH_X86_64, &[435], 38, stub_body());
        assert_eq!(run(&prog, AUDIT_ARCH_X86_64, 1), 0x7fff_0000);
        // Another architecture's numbering is not trusted: the body decides (and kills).
        assert_eq!(run(&prog, AUDIT_ARCH_AARCH64, 435), 0x7fff_0000);
    }

    #[test]
    fn test_compile_small_allowlist_succeeds() {
        let mut allow = Allowlist::new();
        allow.insert(libc::SYS_exit_group, vec![]);
        let prog = compile(allow, &[libc::SYS_clone3]).expect("compile");
        assert!(prog.len() > 6);
    }
}
