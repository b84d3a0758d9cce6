//! The net device process's seccomp allowlist, installed by `start_backend` after the tap
//! queues and the socket are taken and before the first vhost-user message is read. Anything
//! not listed kills the process (SECCOMP_RET_KILL_PROCESS). `clone3` fails with ENOSYS so that
//! the C library creates threads with `clone`, whose flags the filter checks.
//!
//! Written with the sandbox crate's one seccomp layer (`bulkhead_sandbox::seccomp`): syscalls
//! by name, compiled for either architecture. Every entry names the code path that needs it.
//! What is deliberately absent: `socket`, `socketpair`, `connect`, `bind`, `accept` (no new
//! sockets or peers), every `ioctl` but `TUNSETOFFLOAD` (so no `TUNSETIFF`, `TUNSETQUEUE`,
//! `TUNSETPERSIST`, `TUNSETOWNER`, `SIOCSIFNAME` or any other call that could attach,
//! re-attach, rename or reconfigure a tap), opening any path (`open`, `openat`, `openat2`),
//! `execve`, `ptrace`, `mount`, `unshare`, `setns`, `memfd_create`, a `clone` that is not a thread or makes a namespace,
//! and any `mmap`/`mprotect` that asks for executable memory. See `docs/jail-seccomp.md`.

use bulkhead_sandbox::seccomp::{self, BpfProgram, Rules, SeccompError, TargetArch};

use crate::tap::TUNSETOFFLOAD;

/// The filter for the running architecture (x86_64 or aarch64), as installed (traced in the
/// test-only seccomp rule usage trace, `bulkhead_sandbox::seccomp::TRACE_ENV`).
pub fn seccomp_filter() -> Result<BpfProgram, SeccompError> {
    rules().compile_installed("bulkhead-net", seccomp::TraceFamily::Devices)
}

/// The filter for `arch`.
pub fn compile_for(arch: TargetArch) -> Result<BpfProgram, SeccompError> {
    rules().compile("bulkhead-net", arch)
}

/// The net device's rules.
pub fn rules() -> Rules {
    // The runtime's own needs (vhost-user, workers, threads, memory, logging, panic).
    let mut r = bulkhead_device_runtime::seccomp::runtime_rules();
    // A tx frame goes from guest memory to the tap in one writev (datapath::process_tx);
    // frames otherwise move with read/write on the tap queues (Tap::read, Tap::write).
    r.allow("writev");
    // Guest offloads: Tap::set_offload, from acked_features (set_features) and the control
    // queue's GUEST_OFFLOADS_SET. The only ioctl, by request number.
    r.allow_ioctls(&[TUNSETOFFLOAD]);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap::{TUNGETIFF, TUNSETIFF, TUNSETVNETHDRSZ};
    use bulkhead_sandbox::seccomp::{
        check_matrix_bpf, check_matrix_real, enforcement, matrix, panic_under_filter_ends,
        ChildEnd, Enforcement,
    };

    /// The spawner's filter stays on the device process under the device's own.
    #[test]
    fn test_allowlist_within_the_spawners() {
        let outside = bulkhead_device_runtime::seccomp::outside_spawner(&rules());
        assert!(
            outside.is_empty(),
            "not in the spawner's filter: {outside:?}"
        );
    }

    #[test]
    fn test_seccomp_filter_compiles() {
        for arch in [TargetArch::x86_64, TargetArch::aarch64] {
            let filter = compile_for(arch).expect("filter");
            assert!(filter.len() > 50 && filter.len() < 4096);
        }
        seccomp_filter().expect("native filter");
    }

    #[test]
    fn test_allowlist_no_socket_no_path_no_other_ioctl() {
        let r = rules();
        for forbidden in [
            "openat",
            "socket",
            "socketpair",
            "connect",
            "bind",
            "accept4",
            "execve",
            "execveat",
            "ptrace",
            "mount",
            "unshare",
            "setns",
            "clone3",
            "memfd_create",
            "timerfd_create",
            "io_uring_setup",
        ] {
            assert_ne!(
                r.verdict(forbidden, &[0; 6]),
                Some(true),
                "syscall {forbidden} is allowed"
            );
        }
        let ioctl = |request: u64| r.verdict("ioctl", &[5, request, 0, 0, 0, 0]);
        assert_eq!(ioctl(TUNSETOFFLOAD), Some(true));
        // TUNSETQUEUE, TUNSETPERSIST, TUNSETOWNER, TUNSETLINK, SIOCSIFNAME, FIONBIO.
        for request in [
            TUNSETIFF,
            TUNGETIFF,
            TUNSETVNETHDRSZ,
            0x4004_54d9,
            0x4004_54cb,
            0x4004_54cc,
            0x4004_54cd,
            0x8923,
            0x5421,
        ] {
            assert_eq!(ioctl(request), Some(false), "ioctl {request:#x} is allowed");
        }
    }

    #[test]
    fn test_seccomp_net_matrix_bpf_both_arches() {
        let cases = matrix(&rules());
        for arch in [TargetArch::x86_64, TargetArch::aarch64] {
            let prog = compile_for(arch).expect("compile");
            let failures = check_matrix_bpf(&prog, arch, &cases);
            assert!(failures.is_empty(), "{failures:#?}");
        }
        println!(
            "net filter: {} calls checked on x86_64 and aarch64 BPF",
            cases.len()
        );
    }

    #[test]
    fn test_seccomp_net_matrix_real_kernel() {
        let prog = seccomp_filter().expect("compile");
        if enforcement(&prog) != Enforcement::Enforced {
            println!(
                "seccomp filters are not enforced here (qemu-user?): real-kernel matrix skipped"
            );
            return;
        }
        let cases = matrix(&rules());
        let failures = check_matrix_real(&prog, &cases);
        assert!(failures.is_empty(), "{failures:#?}");
        assert_eq!(
            panic_under_filter_ends(&prog),
            ChildEnd::Signalled(libc::SIGABRT)
        );
        println!(
            "net filter: {} real calls checked, panic aborts",
            cases.len()
        );
    }
}
