//! The child's side of [`Jail::spawn`](crate::Jail::spawn): what runs between `clone` and
//! `execveat`.
//!
//! The parent (the VMM) has other threads, so the child, a copy of one thread, must not take
//! locks another thread may have held at the clone: no allocation, no `std` I/O, only system
//! calls. Everything is prepared by the parent in a [`Plan`]. A failure is reported as
//! `(step, errno)` over the error pipe; a successful `execveat` closes that pipe (it is
//! close-on-exec), which the parent reads as success.

use std::ffi::CStr;
use std::os::fd::RawFd;

use crate::jail::Step;

/// A bind mount, resolved by the parent.
pub(crate) struct PlannedBind {
    pub source: std::ffi::CString,
    /// Directories to create under the staging mount point, outermost first.
    pub mkdirs: Vec<std::ffi::CString>,
    /// The mount point under the staging directory (before pivot_root).
    pub staged: std::ffi::CString,
    /// Whether the source is a directory (else an empty file is created as mount point).
    pub is_dir: bool,
    /// Flags for the read-only/nosuid remount, with the source's locked flags kept.
    pub remount_flags: libc::c_ulong,
}

/// Everything the child needs, prepared (and allocated) by the parent before the clone.
pub(crate) struct Plan<'a> {
    pub sync_read: RawFd,
    pub sync_write: RawFd,
    pub err_read: RawFd,
    pub err_write: RawFd,
    pub program: RawFd,
    pub dev_null: RawFd,
    /// (descriptor in the parent, number in the child).
    pub fds: &'a [(RawFd, RawFd)],
    /// Where the new root's tmpfs is mounted before pivot_root.
    pub stage: &'a CStr,
    pub tmpfs_options: &'a CStr,
    pub binds: &'a [PlannedBind],
    /// (RLIMIT_*, soft = hard limit).
    pub rlimits: &'a [(u32, u64)],
    /// NULL-terminated.
    pub argv: &'a [*const libc::c_char],
    /// NULL-terminated (empty but for the test-only seccomp trace variable).
    pub envp: &'a [*const libc::c_char],
}

type StepResult = Result<(), (Step, i32)>;

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EINVAL)
}

fn check(ret: libc::c_long, step: Step) -> StepResult {
    if ret < 0 {
        Err((step, errno()))
    } else {
        Ok(())
    }
}

/// Runs the child: sets up the jail and executes the program, or reports the failed step and
/// exits.
///
/// # Safety
/// Must be called only in the child of a fork-like clone, with `plan` prepared by the parent.
pub(crate) unsafe fn run(plan: &Plan) -> ! {
    let mut err_fd = plan.err_write;
    // SAFETY: forwarded from the caller.
    let (step, errno) = match unsafe { setup_and_exec(plan, &mut err_fd) } {
        Err(e) => e,
        Ok(()) => (Step::Exec, libc::EINVAL),
    };
    let mut msg = [0u8; 8];
    msg[..4].copy_from_slice(&(step as u32).to_ne_bytes());
    msg[4..].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: writes 8 bytes from a local buffer; _exit never returns and runs no destructors
    // or atexit handlers of the parent's copy.
    unsafe {
        libc::write(err_fd, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

/// # Safety
/// As [`run`].
unsafe fn setup_and_exec(plan: &Plan, err_fd: &mut RawFd) -> StepResult {
    // SAFETY: (whole block) every call is a system call on descriptors and NUL-terminated
    // strings the parent prepared in `plan`, which the child's copy of memory keeps valid.
    unsafe {
        // Die with the VMM. In the new pid namespace getppid() is 0, so "did the parent die
        // before this?" is answered by the sync pipe below: EOF means it did.
        check(
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL).into(),
            Step::SetParentDeathSignal,
        )?;
        libc::close(plan.sync_write);
        libc::close(plan.err_read);

        // Wait until the parent has written uid_map/gid_map: before that we are nobody here.
        let mut byte = 0u8;
        loop {
            let n = libc::read(plan.sync_read, (&mut byte as *mut u8).cast(), 1);
            if n == 1 {
                break;
            }
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            return Err((
                Step::WaitForParent,
                if n == 0 { libc::EPIPE } else { errno() },
            ));
        }
        libc::close(plan.sync_read);

        // Take the mapped ids. Writing uid_map/gid_map changes nobody's credentials: until
        // now this process kept the spawner's (host root under a root VMM, which
        // --device-uid is meant to avoid). Ids 0 here are the host ids the parent mapped;
        // the capabilities this process holds in its namespace stay (nonroot -> root of the
        // namespace clears nothing) until drop_capabilities below. setgroups is denied, so
        // the supplementary groups are the spawner's, which hold no file access here.
        check(libc::setresgid(0, 0, 0).into(), Step::SetIds)?;
        check(libc::setresuid(0, 0, 0).into(), Step::SetIds)?;

        mount_root(plan)?;
        move_descriptors(plan, err_fd)?;
        let program = *err_fd + 1;

        for &(resource, limit) in plan.rlimits {
            let rl = libc::rlimit {
                rlim_cur: limit as libc::rlim_t,
                rlim_max: limit as libc::rlim_t,
            };
            check(libc::setrlimit(resource as _, &rl).into(), Step::SetRlimit)?;
        }

        // The program starts with no signal blocked and default SIGPIPE, as after a fresh exec
        // from a shell (the VMM may block signals in the spawning thread).
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        // pthread_sigmask returns the error number itself (0 on success), not -1 and errno.
        let ret = libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        if ret != 0 {
            return Err((Step::ResetSignals, ret));
        }
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);

        drop_capabilities()?;
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into(),
            Step::SetNoNewPrivs,
        )?;

        // Landlock is not applied here: the program applies it itself as its first step, with
        // the `landlock` crate (docs/jail-landlock.md).

        libc::syscall(
            libc::SYS_execveat,
            program,
            c"".as_ptr(),
            plan.argv.as_ptr(),
            plan.envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        );
        Err((Step::Exec, errno()))
    }
}

/// Mounts a fresh tmpfs, the listed bind mounts in it, and makes it the root; the old root is
/// detached, so nothing of the host's file system is reachable by path any more.
///
/// # Safety
/// As [`run`].
unsafe fn mount_root(plan: &Plan) -> StepResult {
    // SAFETY: (whole block) system calls on NUL-terminated strings from `plan`.
    unsafe {
        // Nothing done here propagates back to the host's mounts.
        check(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
            .into(),
            Step::MakeMountsPrivate,
        )?;
        check(
            libc::mount(
                c"tmpfs".as_ptr(),
                plan.stage.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                plan.tmpfs_options.as_ptr().cast(),
            )
            .into(),
            Step::MountRoot,
        )?;
        for bind in plan.binds {
            for dir in &bind.mkdirs {
                if libc::mkdir(dir.as_ptr(), 0o755) < 0 && errno() != libc::EEXIST {
                    return Err((Step::BindMount, errno()));
                }
            }
            if !bind.is_dir {
                let fd = libc::open(
                    bind.staged.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o600,
                );
                check(fd.into(), Step::BindMount)?;
                libc::close(fd);
            }
            check(
                libc::mount(
                    bind.source.as_ptr(),
                    bind.staged.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                )
                .into(),
                Step::BindMount,
            )?;
            check(
                libc::mount(
                    std::ptr::null(),
                    bind.staged.as_ptr(),
                    std::ptr::null(),
                    bind.remount_flags,
                    std::ptr::null(),
                )
                .into(),
                Step::BindMount,
            )?;
        }
        check(libc::chdir(plan.stage.as_ptr()).into(), Step::PivotRoot)?;
        // pivot_root(".", "."): the old root ends up under the new one, at the same place, and
        // is detached right away.
        check(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()),
            Step::PivotRoot,
        )?;
        check(
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH).into(),
            Step::DetachOldRoot,
        )?;
        check(libc::chdir(c"/".as_ptr()).into(), Step::PivotRoot)?;
        check(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                std::ptr::null(),
            )
            .into(),
            Step::RemountRootReadOnly,
        )?;
    }
    Ok(())
}

/// Puts every listed descriptor at its number, /dev/null on unlisted 0-2, the error pipe at
/// `top` and the program at `top + 1` (both close-on-exec), and closes everything else.
///
/// # Safety
/// As [`run`].
unsafe fn move_descriptors(plan: &Plan, err_fd: &mut RawFd) -> StepResult {
    const MAX: usize = 64;
    let top = plan.fds.iter().map(|&(_, t)| t).max().unwrap_or(0).max(2) + 1;
    let high = top + 2;
    // SAFETY: (whole block) fcntl/dup2/dup3/close on descriptor numbers only.
    unsafe {
        let dup_high = |fd: RawFd| -> Result<RawFd, (Step, i32)> {
            let new = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, high);
            check(new.into(), Step::MoveDescriptors)?;
            Ok(new)
        };
        // First move every descriptor we keep above all target numbers, so that no dup2 below
        // overwrites a source that is still needed.
        let mut sources = [0 as RawFd; MAX];
        for (slot, &(src, _)) in sources.iter_mut().zip(plan.fds) {
            *slot = dup_high(src)?;
        }
        let err = dup_high(*err_fd)?;
        *err_fd = err;
        let program = dup_high(plan.program)?;
        let null = dup_high(plan.dev_null)?;
        for (&src, &(_, target)) in sources.iter().zip(plan.fds) {
            // dup2 leaves the copy without close-on-exec: it is inherited.
            check(libc::dup2(src, target).into(), Step::MoveDescriptors)?;
        }
        for stdio in 0..3 {
            if !plan.fds.iter().any(|&(_, t)| t == stdio) {
                check(libc::dup2(null, stdio).into(), Step::MoveDescriptors)?;
            }
        }
        check(
            libc::dup3(err, top, libc::O_CLOEXEC).into(),
            Step::MoveDescriptors,
        )?;
        *err_fd = top;
        check(
            libc::dup3(program, top + 1, libc::O_CLOEXEC).into(),
            Step::MoveDescriptors,
        )?;
        for fd in 3..top {
            if !plan.fds.iter().any(|&(_, t)| t == fd) {
                libc::close(fd);
            }
        }
        close_from(high)?;
    }
    Ok(())
}

/// Closes every descriptor from `first` up.
///
/// # Safety
/// As [`run`].
unsafe fn close_from(first: RawFd) -> StepResult {
    // SAFETY: close_range/getrlimit/close take numbers and a local struct only.
    unsafe {
        if libc::syscall(libc::SYS_close_range, first as u32, u32::MAX, 0u32) == 0 {
            return Ok(());
        }
        if errno() != libc::ENOSYS {
            return Err((Step::CloseDescriptors, errno()));
        }
        // Kernels before 5.9: close one by one up to the descriptor limit.
        let mut rl: libc::rlimit = std::mem::zeroed();
        check(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl).into(),
            Step::CloseDescriptors,
        )?;
        let last = RawFd::try_from(rl.rlim_cur.min(1 << 20)).unwrap_or(1 << 20);
        for fd in first..last {
            libc::close(fd);
        }
    }
    Ok(())
}

/// `_LINUX_CAPABILITY_VERSION_3`.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// SECBIT_NOROOT | SECBIT_NO_SETUID_FIXUP | SECBIT_NO_CAP_AMBIENT_RAISE, each with its lock,
/// and SECBIT_KEEP_CAPS_LOCKED: uid 0 inside the namespace gains nothing at execve.
const SECUREBITS: libc::c_ulong = 0xef;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops every capability: locks the securebits, empties the bounding and ambient sets, then
/// the effective, permitted and inheritable sets.
///
/// # Safety
/// As [`run`].
unsafe fn drop_capabilities() -> StepResult {
    // SAFETY: (whole block) prctl with integer arguments; capset with local structs.
    unsafe {
        check(
            libc::prctl(libc::PR_SET_SECUREBITS, SECUREBITS, 0, 0, 0).into(),
            Step::DropCapabilities,
        )?;
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 {
                if errno() == libc::EINVAL {
                    // Past the last capability this kernel knows.
                    break;
                }
                return Err((Step::DropCapabilities, errno()));
            }
        }
        check(
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
            .into(),
            Step::DropCapabilities,
        )?;
        let header = CapHeader {
            version: CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        check(
            libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()),
            Step::DropCapabilities,
        )?;
    }
    Ok(())
}
