//! `bulkhead-tap-fds NAME QUEUES FIRST_FD PROGRAM [ARGS...]`: opens `QUEUES` queues of tap
//! `NAME` (created if missing; gone again with its last queue) the way an orchestrator hands a
//! tap to a VMM, as descriptors `FIRST_FD`, `FIRST_FD + 1`, ... (inherited, not
//! close-on-exec), then execs `PROGRAM` with them. For the nested scenario `net-modes`, which
//! runs `bulkhead --net fd=FIRST_FD[:...]` this way. A test tool, never shipped.
//!
//! Each queue is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (plus `IFF_MULTI_QUEUE` when
//! there are several) and nothing else: the vnet header size and non-blocking mode are left
//! for the VMM to set, as it must for a descriptor it did not open.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;

fn fail(msg: &str) -> ExitCode {
    eprintln!("bulkhead-tap-fds: {msg}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.len() < 4 {
        return fail("usage: bulkhead-tap-fds NAME QUEUES FIRST_FD PROGRAM [ARGS...]");
    }
    let name = args[0].as_bytes();
    let parse = |a: &std::ffi::OsString| a.to_str().and_then(|s| s.parse::<i32>().ok());
    let (Some(queues), Some(first)) = (parse(&args[1]), parse(&args[2])) else {
        return fail("QUEUES and FIRST_FD are numbers");
    };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || !(1..=16).contains(&queues) || first < 3 {
        return fail("NAME is 1-15 bytes, QUEUES 1-16, FIRST_FD 3 or more");
    }
    let flags = libc::IFF_TAP
        | libc::IFF_NO_PI
        | libc::IFF_VNET_HDR
        | if queues > 1 { libc::IFF_MULTI_QUEUE } else { 0 };
    for i in 0..queues {
        // SAFETY: open with a NUL-terminated path; the result is checked.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR) };
        if fd < 0 {
            return fail(&format!(
                "open /dev/net/tun: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: an all-zero ifreq is valid; the name fits (checked above) with its NUL.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(name) {
            *d = *s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads the ifreq we own.
        if unsafe { libc::ioctl(fd, libc::TUNSETIFF as _, &mut req) } < 0 {
            return fail(&format!(
                "TUNSETIFF {}: {}",
                String::from_utf8_lossy(name),
                std::io::Error::last_os_error()
            ));
        }
        let want = first + i;
        // SAFETY: dup2 onto a descriptor number we chose; the result is checked. dup2 leaves
        // FD_CLOEXEC clear on the copy.
        if fd != want && unsafe { libc::dup2(fd, want) } < 0 {
            return fail(&format!("dup2: {}", std::io::Error::last_os_error()));
        }
        if fd != want {
            // SAFETY: fd is ours and no longer needed.
            unsafe { libc::close(fd) };
        }
    }
    let argv: Vec<CString> = args[3..]
        .iter()
        .map(|a| CString::new(a.as_bytes()).unwrap_or_default())
        .collect();
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: argv is a NULL-terminated array of NUL-terminated strings that outlive the call.
    unsafe { libc::execv(ptrs[0], ptrs.as_ptr()) };
    fail(&format!(
        "exec {}: {}",
        args[3].to_string_lossy(),
        std::io::Error::last_os_error()
    ))
}
