//! Jails for Bulkhead's device processes: namespaces, an empty root, only the listed
//! descriptors, rlimits, an optional cgroup v2 leaf, no capabilities, no_new_privs, and the
//! seccomp filter the device installs itself. Landlock is the device process's own first step
//! (`bulkhead-device-runtime`, with the `landlock` crate), not the jail's.
//!
//! The crate knows no device. A device crate describes its needs as a [`Jail`] (which
//! descriptors at which numbers, which paths, which limits) and its seccomp allowlist
//! ([`seccomp`]); [`Jail::spawn`] starts the program inside, and the program installs its filter
//! with [`seccomp::apply`] at the start of `main`. The layers are documented in
//! `docs/jail-namespaces.md`, `docs/jail-landlock.md`, `docs/jail-resources.md` and
//! `docs/jail-seccomp.md`.
// Tests start threads as they like; the programs' threads come from
// bulkhead_sandbox::thread_builder() (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod audit;
mod child;
pub mod jail;
pub mod seccomp;
pub mod spawner_filter;

pub use jail::{BindMount, CgroupLimits, Jail, JailedChild, Rlimits, SpawnError, Step};

/// Names the process after its `argv[0]` (its `comm`, as `ps` and `/proc/PID/comm` show it).
///
/// A program started by [`Jail::spawn`] is executed from a descriptor (`execveat` with
/// `AT_EMPTY_PATH`), and kernels before 6.14 then name it after the descriptor number
/// (`/dev/fd/N` gives "N"). The spawner passes the program's file name as `argv[0]`; a jailed
/// program calls this first thing in `main` to get its name back. Best effort: a failure only
/// leaves the name as it was.
pub fn set_name_from_argv0() {
    let Some(arg0) = std::env::args_os().next() else {
        return;
    };
    let path = std::path::Path::new(&arg0);
    let Some(base) = path.file_name() else {
        return;
    };
    use std::os::unix::ffi::OsStrExt;
    // TASK_COMM_LEN is 16 with the NUL.
    let mut name = [0u8; 16];
    let bytes = base.as_bytes();
    let n = bytes.len().min(15);
    name[..n].copy_from_slice(&bytes[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from `name`.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}

/// Closes every descriptor above 2 except those in `keep` (a device process at its start, the
/// spawner after its fork: descriptors it was handed but not told about).
pub fn close_other_fds(keep: &[std::os::fd::RawFd]) -> std::io::Result<()> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|fd| u32::try_from(*fd).ok())
        .collect();
    keep.sort_unstable();
    let mut first = 3u32;
    for fd in keep.into_iter().filter(|fd| *fd >= 3) {
        if fd > first {
            close_range(first, fd - 1)?;
        }
        first = fd.saturating_add(1);
    }
    close_range(first, u32::MAX)
}

fn close_range(first: u32, last: u32) -> std::io::Result<()> {
    // SAFETY: close_range takes integers only; the descriptors it closes are ones this process
    // was handed but not told about (nothing in the process owns them yet).
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if ret == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::ENOSYS) {
        return Err(e);
    }
    // Before Linux 5.9: close one by one up to the descriptor limit.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `limit`, a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let end = u32::try_from(limit.rlim_cur.min(1 << 20)).unwrap_or(1 << 20);
    for fd in first..=last.min(end) {
        // SAFETY: as above; EBADF for descriptors that are not open is ignored.
        unsafe { libc::close(fd as std::os::fd::RawFd) };
    }
    Ok(())
}

/// Stack size of every thread Bulkhead's programs start (see [`thread_builder`]).
pub const THREAD_STACK_SIZE: usize = 1 << 20;

/// A thread builder with Bulkhead's stack size: use it for every thread a program starts.
///
/// Rust's default is 2 MiB, and with the guard page below and the thread's TLS on top, a stack
/// mapping is then just over 2 MiB: when it lands under a 2 MiB-aligned mapping (guest RAM,
/// which is aligned for its huge pages, is one), it contains a whole aligned 2 MiB range, and a
/// host with transparent huge pages `always` backs the thread's first few KiB of stack with a
/// 2 MiB page. The nested benchmark saw exactly that in the VMM and in bulkhead-net (one
/// 2048 KiB `AnonHugePages` stack each, half their non-guest RSS). A stack under 2 MiB cannot
/// hold an aligned 2 MiB range; 1 MiB is still far more than any of the threads uses.
// The one place a thread builder is made (clippy.toml forbids it everywhere else).
#[allow(clippy::disallowed_methods)]
pub fn thread_builder() -> std::thread::Builder {
    std::thread::Builder::new().stack_size(THREAD_STACK_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mapping (start, end) of /proc/self/maps that holds `addr`.
    fn mapping_of(addr: usize) -> (usize, usize) {
        let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
        maps.lines()
            .filter_map(|l| {
                let (a, b) = l.split_whitespace().next()?.split_once('-')?;
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            })
            .find(|(a, b)| (*a..*b).contains(&addr))
            .expect("a mapping holds the stack")
    }

    #[test]
    fn test_thread_stack_cannot_hold_a_huge_page() {
        let (start, end) = thread_builder()
            .spawn(|| {
                let local = 0u8;
                mapping_of(std::hint::black_box(&local) as *const u8 as usize)
            })
            .expect("spawn")
            .join()
            .expect("join");
        // Under 2 MiB, the mapping cannot hold an aligned 2 MiB range wherever it lands (the
        // default builder's is over 2 MiB with musl: 2 MiB of stack plus the TLS).
        assert!(
            end - start < 2 << 20,
            "the stack mapping {start:#x}-{end:#x} is {} KiB",
            (end - start) >> 10
        );
    }
}
