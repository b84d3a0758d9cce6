//! Which syscall a seccomp filter killed a process for, from the kernel's own audit record.
//!
//! When a filter returns SECCOMP_RET_KILL_PROCESS the kernel writes an audit record of type
//! 1326 (AUDIT_SECCOMP) naming the process's pid (in the initial pid namespace), the signal,
//! the audit architecture and the syscall number. Without an audit daemon the record goes to
//! the kernel log (`audit: type=1326 audit(...): ... pid=1234 comm="bulkhead-block" ...
//! sig=31 arch=c00000b7 syscall=426 ...`), which [`KmsgAudit`] reads from `/dev/kmsg`. The
//! killed process is assumed compromised, so nothing it says about itself is used.
//!
//! The record can be missing: the kernel booted with `audit=0`, an audit daemon took the
//! record (it is then in its log, not the kernel's), printk's rate limit (10 messages per 5 s,
//! shared with every other rate-limited kernel message) suppressed it, `kernel.seccomp.
//! actions_logged` omits `kill_process`, or `/dev/kmsg` could not be opened (reading it needs
//! CAP_SYSLOG when `kernel.dmesg_restrict` is 1). The caller then says why the syscall is
//! unknown. See `docs/jail-seccomp.md`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::seccomp::{audit_arch, syscall_name, TargetArch};

/// AUDIT_SECCOMP.
pub const AUDIT_SECCOMP: u32 = 1326;

/// What a seccomp audit record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeccompRecord {
    /// The process's pid in the initial pid namespace.
    pub pid: u32,
    /// The syscall number.
    pub syscall: i64,
    /// The AUDIT_ARCH value of the syscall's architecture.
    pub arch: u32,
    /// The signal sent (0 for RET_LOG and RET_ERRNO records).
    pub sig: i32,
}

impl SeccompRecord {
    /// `io_uring_enter (426)`, or `syscall 999 (no name in Bulkhead's table)`.
    pub fn describe(&self) -> String {
        let arch = [TargetArch::x86_64, TargetArch::aarch64]
            .into_iter()
            .find(|a| audit_arch(*a) == self.arch);
        match arch.and_then(|a| syscall_name(self.syscall, a)) {
            Some(name) => format!("{name} ({})", self.syscall),
            None if arch.is_none() => format!(
                "syscall {} of audit arch {:#x} (not a Bulkhead architecture)",
                self.syscall, self.arch
            ),
            None => format!("syscall {} (no name in Bulkhead's table)", self.syscall),
        }
    }
}

/// The value of `key=` in an audit record's text (space-separated `key=value` fields).
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split(' ')
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

/// Parses one kernel log line (a `/dev/kmsg` record `PRI,SEQ,TS,FLAGS;MESSAGE` or the bare
/// message) as a seccomp audit record.
pub fn parse_record(line: &str) -> Option<SeccompRecord> {
    let msg = line.split_once(';').map_or(line, |(_, m)| m);
    let msg = msg.lines().next()?;
    if field(msg, "type")?.parse::<u32>().ok()? != AUDIT_SECCOMP {
        return None;
    }
    Some(SeccompRecord {
        pid: field(msg, "pid")?.parse().ok()?,
        syscall: field(msg, "syscall")?.parse().ok()?,
        arch: u32::from_str_radix(field(msg, "arch")?, 16).ok()?,
        sig: field(msg, "sig").and_then(|s| s.parse().ok()).unwrap_or(0),
    })
}

/// A reader of the kernel log from the moment it was opened, for seccomp audit records.
///
/// Open it before any seccomp filter is applied (the filter need then allow only `read`,
/// `ppoll`/`poll`) and keep it: the spawner opens it when it is forked.
#[derive(Debug)]
pub struct KmsgAudit {
    kmsg: Result<OwnedFd, String>,
}

/// How long [`KmsgAudit::find`] waits for a record: the kernel's audit thread writes it
/// after the process died, usually within milliseconds.
pub const RECORD_WAIT: Duration = Duration::from_millis(1500);

impl KmsgAudit {
    /// Opens `/dev/kmsg` (non-blocking) at its end; a failure is kept as the reason later
    /// lookups give.
    pub fn open() -> KmsgAudit {
        Self::open_path(c"/dev/kmsg")
    }

    fn open_path(path: &std::ffi::CStr) -> KmsgAudit {
        // SAFETY: open with a NUL-terminated path and flags; the result is checked.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return KmsgAudit {
                kmsg: Err(format!(
                    "{}: {}",
                    path.to_string_lossy(),
                    io::Error::last_os_error()
                )),
            };
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: lseek on our descriptor: /dev/kmsg's SEEK_END skips what is logged already.
        unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_END) };
        KmsgAudit { kmsg: Ok(fd) }
    }

    /// The seccomp record of process `pid`, waiting up to `wait` for it; `Err(reason)` if
    /// none came.
    pub fn find(&self, pid: u32, wait: Duration) -> Result<SeccompRecord, String> {
        let fd = match &self.kmsg {
            Ok(fd) => fd.as_raw_fd(),
            Err(reason) => return Err(reason.clone()),
        };
        let deadline = Instant::now() + wait;
        // One record per read; 8 KiB is more than a record's largest size (1 KiB of text).
        let mut buf = vec![0u8; 8192];
        loop {
            // SAFETY: read into `buf`, valid for its length.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                let text = String::from_utf8_lossy(&buf[..n as usize]);
                if let Some(r) = parse_record(&text) {
                    if r.pid == pid && r.sig != 0 {
                        return Ok(r);
                    }
                }
                continue;
            }
            if n == 0 {
                return Err("reading /dev/kmsg: end of file".into());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // Records were overwritten before we read them: go on from the oldest left.
                Some(libc::EPIPE) | Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {}
                _ => return Err(format!("reading /dev/kmsg: {e}")),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "none in the kernel log within {} ms (audit=0, an audit daemon, \
                     printk's rate limit or kernel.seccomp.actions_logged)",
                    wait.as_millis()
                ));
            }
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one local pollfd.
            unsafe { libc::poll(&mut p, 1, left.as_millis().min(100) as libc::c_int + 1) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARM: &str = "6,2013,48231311,-;audit: type=1326 audit(1764570000.123:42): auid=4294967295 uid=0 gid=0 ses=4294967295 pid=1234 comm=\"bulkhead-block\" exe=\"/memfd:bulkhead-block (deleted)\" sig=31 arch=c00000b7 syscall=426 compat=0 ip=0xffff8a2c code=0x80000000";

    #[test]
    fn test_parse_record_kmsg_line_fields() {
        let r = parse_record(ARM).expect("a seccomp record");
        assert_eq!(
            r,
            SeccompRecord {
                pid: 1234,
                syscall: 426,
                arch: 0xc000_00b7,
                sig: 31
            }
        );
        assert_eq!(r.describe(), "io_uring_enter (426)");
        let x86 = "audit: type=1326 audit(1.2:3): pid=7 comm=\"x\" sig=31 arch=c000003e syscall=41 compat=0";
        assert_eq!(
            parse_record(x86).expect("bare message").describe(),
            "socket (41)"
        );
    }

    #[test]
    fn test_parse_record_other_lines_none() {
        assert_eq!(
            parse_record("6,1,2,-;virtio_blk virtio0: [vda] 32768"),
            None
        );
        assert_eq!(
            parse_record("5,1,2,-;audit: type=1400 audit(1.2:3): pid=7 syscall=1 arch=c00000b7"),
            None
        );
        // pid=70 is not pid=7 (whole fields, not prefixes).
        let r = parse_record(
            "audit: type=1326 audit(1.2:3): ppid=1 pid=70 sig=31 arch=c00000b7 syscall=1",
        )
        .expect("record");
        assert_eq!(r.pid, 70);
    }

    #[test]
    fn test_describe_unknown_number_and_arch() {
        let mut r = parse_record(ARM).expect("record");
        r.syscall = 999;
        assert_eq!(r.describe(), "syscall 999 (no name in Bulkhead's table)");
        r.arch = 0x4000_0028;
        assert!(r.describe().contains("not a Bulkhead architecture"));
    }

    #[test]
    fn test_kmsg_audit_unopenable_gives_reason() {
        let k = KmsgAudit::open_path(c"/nonexistent/kmsg");
        let e = k.find(1, Duration::from_millis(1)).expect_err("no kmsg");
        assert!(e.starts_with("/nonexistent/kmsg: "), "{e}");
    }

    #[test]
    fn test_kmsg_audit_finds_the_pid_among_records() {
        let mut p = [0; 2];
        // SAFETY: pipe2 into a local array.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_NONBLOCK) }, 0);
        // SAFETY: fresh descriptors owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        let other = ARM.replace("pid=1234", "pid=99");
        // A pipe keeps no record boundaries: one record per write, read before the next.
        let k = KmsgAudit { kmsg: Ok(r) };
        // SAFETY: write from a local string.
        unsafe { libc::write(w.as_raw_fd(), other.as_ptr().cast(), other.len()) };
        assert!(k.find(1234, Duration::from_millis(50)).is_err());
        // SAFETY: write from a local string.
        unsafe { libc::write(w.as_raw_fd(), ARM.as_ptr().cast(), ARM.len()) };
        assert_eq!(
            k.find(1234, Duration::from_millis(500)).map(|r| r.syscall),
            Ok(426)
        );
    }

    #[test]
    fn test_kmsg_audit_times_out_without_record() {
        // An empty pipe with a writer gives EAGAIN, as /dev/kmsg with no new record does.
        let mut p = [0; 2];
        // SAFETY: pipe2 into a local array.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_NONBLOCK) }, 0);
        // SAFETY: fresh descriptors owned by nobody else.
        let (r, _w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        let k = KmsgAudit { kmsg: Ok(r) };
        let t = Instant::now();
        let e = k
            .find(1, Duration::from_millis(200))
            .expect_err("no record");
        assert!(e.contains("none in the kernel log within 200 ms"), "{e}");
        assert!(t.elapsed() >= Duration::from_millis(200));
    }
}
