//! The steps a device process takes before it serves: its name, its descriptors, landlock.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetStatus,
    Scope, ABI,
};
use log::info;

use crate::Error;

/// The newest landlock ABI this build knows; with best-effort compatibility the kernel's own
/// ABI decides what is handled: every right it knows.
const LANDLOCK_ABI: ABI = ABI::V9;

/// Names the process `bulkhead-<kind>` (its comm, as ps and /proc/PID/comm show it), whatever
/// name it was executed by (a jail executes it from a descriptor). Truncated to 15 bytes.
pub fn set_comm(kind: &str) {
    let mut name = [0u8; 16];
    let full = format!("bulkhead-{kind}");
    let bytes = full.as_bytes();
    let n = bytes.len().min(15);
    name[..n].copy_from_slice(&bytes[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from `name`.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}

/// The socket type (`SO_TYPE`) of `fd` if it is an AF_UNIX socket.
fn unix_socket_type(fd: RawFd) -> io::Result<libc::c_int> {
    let mut domain: libc::c_int = 0;
    let mut kind: libc::c_int = 0;
    for (option, value) in [(libc::SO_DOMAIN, &mut domain), (libc::SO_TYPE, &mut kind)] {
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `value`, a valid c_int; an fd that
        // is not open or not a socket only makes it fail.
        let ret = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if domain != libc::AF_UNIX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an AF_UNIX socket",
        ));
    }
    Ok(kind)
}

fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETFD on a descriptor changes only its flags; a closed one makes it fail.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes ownership of inherited descriptor `fd` after checking it is a unix socket of type
/// `kind` (SOCK_STREAM or SOCK_SEQPACKET).
pub fn adopt_unix_socket(fd: RawFd, kind: libc::c_int) -> io::Result<OwnedFd> {
    let actual = unix_socket_type(fd)?;
    if actual != kind {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            if kind == libc::SOCK_STREAM {
                "not a SOCK_STREAM socket"
            } else {
                "not a SOCK_SEQPACKET socket"
            },
        ));
    }
    // Do not leak it into anything the process might execute.
    set_cloexec(fd)?;
    // SAFETY: `fd` is an open unix socket (checked above) the parent handed to this process for
    // exactly this purpose; nothing else in the process uses or closes it, so the OwnedFd
    // becomes its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Checks that inherited descriptor `fd` is open (its type is the device's to check).
pub fn check_open(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFD only reads the descriptor's flags.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    set_cloexec(fd)
}

/// Listens on `path`, accepts one frontend and removes the socket file again.
pub fn accept_one(path: &Path) -> Result<UnixStream, Error> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A stale socket from an earlier run.
            std::fs::remove_file(path).map_err(|source| Error::BindSocket {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(_) => {
            return Err(Error::SocketPathInUse {
                path: path.to_path_buf(),
            })
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| Error::BindSocket {
        path: path.to_path_buf(),
        source,
    })?;
    info!("waiting for a frontend on {}", path.display());
    let accepted = loop {
        match listener.accept() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other,
        }
    };
    // Only one frontend is served: no one else may connect.
    let _ = std::fs::remove_file(path);
    let (stream, _) = accepted.map_err(|source| Error::AcceptFrontend {
        path: path.to_path_buf(),
        source,
    })?;
    info!("frontend connected");
    Ok(stream)
}

/// Restricts the process with landlock: every file system right, TCP bind and connect, and
/// abstract unix sockets and signals outside the process are handled, as far as the kernel's
/// ABI knows them, and no rule allows any of them: no path is reachable any more. Must run
/// while the process has one thread (landlock restricts the calling thread and what it
/// creates afterwards). Sets no_new_privs.
pub fn apply_landlock() -> Result<RulesetStatus, Error> {
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(LANDLOCK_ABI))
        .and_then(|r| r.handle_access(AccessNet::from_all(LANDLOCK_ABI)))
        .and_then(|r| r.scope(Scope::from_all(LANDLOCK_ABI)))
        .and_then(|r| r.create())
        .and_then(|r| r.restrict_self())
        .map_err(Error::Landlock)?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(Error::LandlockUnavailable);
    }
    Ok(status.ruleset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn test_adopt_unix_socket_wrong_type_rejected() {
        let (a, _b) = UnixStream::pair().expect("pair");
        let fd = OwnedFd::from(a);
        let raw = fd.as_raw_fd();
        assert!(adopt_unix_socket(raw, libc::SOCK_SEQPACKET).is_err());
        let file = std::fs::File::open("/dev/null").expect("null");
        assert!(adopt_unix_socket(file.as_raw_fd(), libc::SOCK_STREAM).is_err());
        assert!(adopt_unix_socket(-1, libc::SOCK_STREAM).is_err());
        let adopted = adopt_unix_socket(raw, libc::SOCK_STREAM).expect("stream");
        std::mem::forget(fd);
        drop(adopted);
    }

    #[test]
    fn test_check_open_closed_fd_rejected() {
        assert!(check_open(-1).is_err());
        assert!(check_open(1_000_000).is_err());
        let file = std::fs::File::open("/dev/null").expect("null");
        assert!(check_open(file.as_raw_fd()).is_ok());
    }

    /// A kernel without landlock, faked by a seccomp filter that answers the landlock
    /// syscalls with ENOSYS (as a kernel built without it does): `--landlock on` refuses to
    /// go on, with a message that names the way out.
    #[test]
    fn test_apply_landlock_without_landlock_kernel_refused_clearly() {
        use bulkhead_sandbox::seccomp::{native_arch, run_in_child, syscall_nr, ChildEnd};
        use seccompiler::{SeccompAction, SeccompFilter};
        let arch = native_arch();
        let rules = [
            "landlock_create_ruleset",
            "landlock_add_rule",
            "landlock_restrict_self",
        ]
        .iter()
        .map(|n| (syscall_nr(n, arch).expect("number"), vec![]))
        .collect();
        let prog: seccompiler::BpfProgram = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .and_then(TryInto::try_into)
        .expect("filter");
        // SAFETY: the child allocates (the landlock crate); a lock held at fork by another
        // test thread would hang it, which run_in_child's deadline reports.
        let end = unsafe {
            run_in_child(&prog, || {
                let code = match apply_landlock() {
                    Err(e @ Error::LandlockUnavailable)
                        if e.to_string().contains("--landlock off") =>
                    {
                        0
                    }
                    Err(_) => 2,
                    Ok(_) => 3,
                };
                libc::_exit(code);
            })
        };
        match end {
            ChildEnd::Exited(125) => println!("seccomp not installable here: skipped"),
            end => assert_eq!(end, ChildEnd::Exited(0), "apply_landlock without landlock"),
        }
    }

    #[test]
    fn test_set_comm_prefixes_kind() {
        // In a thread of its own: PR_SET_NAME names the calling thread.
        std::thread::spawn(|| {
            set_comm("balloon-long-name");
            let comm = std::fs::read_to_string("/proc/thread-self/comm").expect("comm");
            assert_eq!(comm.trim_end(), "bulkhead-balloo");
        })
        .join()
        .expect("thread");
    }
}
