//! The spawner: a small process forked first thing in `main`, before any thread and any seccomp
//! filter, that alone creates namespaces and executes device programs for the VMM. It lives as
//! long as the VMM and dies with it.
//!
//! Seccomp filters are inherited across clone and exec and never loosen, and any unfiltered
//! thread in the VMM's address space would undo every other thread's filter; so device
//! processes are started by this separate, single-threaded process, which the VMM drives over a
//! `SOCK_SEQPACKET` socket:
//!
//! - request: one message, `key\0value\0` pairs (see [`SpawnRequest::encode`]), with the
//!   descriptors to hand over as SCM_RIGHTS, in the order of the request's `fd` keys;
//! - reply: `ok PID` with a pidfd of the process as SCM_RIGHTS, or `err REASON`;
//! - events, on a second socket: `exit PID code N` or `exit PID signal N` when the spawner
//!   reaps a device process (it is their parent); a SIGSYS exit (a seccomp kill) adds what the
//!   kernel's audit record says, `audit syscall=NR arch=HEX`, or `noaudit REASON` (see
//!   [`bulkhead_sandbox::audit`]; the device itself is not asked, it is assumed compromised).
//!
//! Lifetime: the spawner sets PR_SET_PDEATHSIG (SIGKILL) right after the fork; its parent is
//! the VMM's main thread, which lives as long as the VMM, so no short-lived thread can fire
//! it. It also exits when the VMM's end of the request socket hangs up, killing its device
//! processes first. Device processes have PR_SET_PDEATHSIG (SIGKILL) towards the spawner's
//! single thread, so they die with it.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use bulkhead_sandbox::audit::{KmsgAudit, SeccompRecord, RECORD_WAIT};
use bulkhead_sandbox::{CgroupLimits, Jail, Rlimits};
use log::{debug, error, warn};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::control::seqpacket_pair;

/// Largest request message.
const MAX_REQUEST: usize = 64 * 1024;
/// Most descriptors one request hands over.
const MAX_FDS: usize = 16;
/// How long the VMM waits for the spawner's reply.
const REPLY_DEADLINE: Duration = Duration::from_secs(10);

/// Errors talking to the spawner.
#[derive(Debug, thiserror::Error)]
pub enum SpawnerError {
    /// The spawner could not be forked.
    #[error("forking the device spawner")]
    Fork(#[source] io::Error),
    /// Its sockets could not be made.
    #[error("creating the device spawner's sockets")]
    Socket(#[source] io::Error),
    /// Sending a request failed.
    #[error("sending a request to the device spawner")]
    Send(#[source] vmm_sys_util::errno::Error),
    /// No reply came.
    #[error("waiting for the device spawner's reply")]
    Receive(#[source] vmm_sys_util::errno::Error),
    /// The spawner is gone.
    #[error("the device spawner has exited")]
    Gone,
    /// The reply did not parse.
    #[error("malformed reply from the device spawner: {0:?}")]
    Malformed(String),
    /// The spawner could not start the program.
    #[error("{0}")]
    Refused(String),
}

/// A cgroup v2 leaf for the process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupRequest {
    /// Directory the leaf is made in.
    pub parent: PathBuf,
    /// The leaf's name.
    pub name: String,
    /// memory.max, bytes.
    pub memory_max: u64,
    /// pids.max.
    pub pids_max: u64,
}

/// What to start and how.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpawnRequest {
    /// The program's path.
    pub program: PathBuf,
    /// argv, argv[0] included.
    pub argv: Vec<String>,
    /// The numbers the handed-over descriptors get, in order.
    pub fds: Vec<RawFd>,
    /// In a jail (namespaces, empty root, no capabilities); else a plain fork and exec.
    pub jail: bool,
    /// RLIMIT_NOFILE.
    pub nofile: u64,
    /// RLIMIT_NPROC.
    pub nproc: u64,
    /// RLIMIT_DATA (private writable memory), if any.
    pub data: Option<u64>,
    /// The cgroup leaf, if any.
    pub cgroup: Option<CgroupRequest>,
    /// Host uid and gid to run as, if not the spawner's.
    pub ids: Option<(u32, u32)>,
    /// oom_score_adj.
    pub oom_score_adj: Option<i32>,
}

impl SpawnRequest {
    /// `key\0value\0` pairs.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut put = |k: &str, v: &[u8]| {
            out.extend_from_slice(k.as_bytes());
            out.push(0);
            out.extend_from_slice(v);
            out.push(0);
        };
        put("program", self.program.as_os_str().as_bytes());
        for a in &self.argv {
            put("arg", a.as_bytes());
        }
        for f in &self.fds {
            put("fd", f.to_string().as_bytes());
        }
        put("jail", if self.jail { b"1" } else { b"0" });
        put("nofile", self.nofile.to_string().as_bytes());
        put("nproc", self.nproc.to_string().as_bytes());
        if let Some(d) = self.data {
            put("data", d.to_string().as_bytes());
        }
        if let Some(c) = &self.cgroup {
            put("cgroup_parent", c.parent.as_os_str().as_bytes());
            put("cgroup_name", c.name.as_bytes());
            put("memory_max", c.memory_max.to_string().as_bytes());
            put("pids_max", c.pids_max.to_string().as_bytes());
        }
        if let Some((u, g)) = self.ids {
            put("uid", u.to_string().as_bytes());
            put("gid", g.to_string().as_bytes());
        }
        if let Some(a) = self.oom_score_adj {
            put("oom_score_adj", a.to_string().as_bytes());
        }
        out
    }

    /// The inverse of [`encode`](Self::encode); unknown keys and bad numbers are errors.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = SpawnRequest::default();
        let mut cgroup = CgroupRequest::default();
        let mut has_cgroup = false;
        let (mut uid, mut gid) = (None, None);
        let mut parts = bytes.split(|b| *b == 0);
        fn num<T: std::str::FromStr>(k: &str, v: &[u8]) -> Result<T, String> {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad number for {k}"))
        }
        fn text(v: &[u8]) -> Result<String, String> {
            String::from_utf8(v.to_vec()).map_err(|_| "an argument is not UTF-8".to_string())
        }
        while let Some(key) = parts.next() {
            if key.is_empty() {
                // The trailing NUL leaves one empty piece at the end.
                if parts.next().is_none() {
                    break;
                }
                return Err("empty key".into());
            }
            let key = std::str::from_utf8(key).map_err(|_| "bad key")?;
            let v = parts.next().ok_or_else(|| format!("{key} has no value"))?;
            match key {
                "program" => r.program = PathBuf::from(std::ffi::OsStr::from_bytes(v)),
                "arg" => r.argv.push(text(v)?),
                "fd" => r.fds.push(num(key, v)?),
                "jail" => r.jail = v == b"1",
                "nofile" => r.nofile = num(key, v)?,
                "nproc" => r.nproc = num(key, v)?,
                "data" => r.data = Some(num(key, v)?),
                "cgroup_parent" => {
                    has_cgroup = true;
                    cgroup.parent = PathBuf::from(std::ffi::OsStr::from_bytes(v));
                }
                "cgroup_name" => cgroup.name = text(v)?,
                "memory_max" => cgroup.memory_max = num(key, v)?,
                "pids_max" => cgroup.pids_max = num(key, v)?,
                "uid" => uid = Some(num(key, v)?),
                "gid" => gid = Some(num(key, v)?),
                "oom_score_adj" => r.oom_score_adj = Some(num(key, v)?),
                other => return Err(format!("unknown key {other:?}")),
            }
        }
        if has_cgroup {
            r.cgroup = Some(cgroup);
        }
        r.ids = uid.zip(gid);
        if r.argv.is_empty() || r.program.as_os_str().is_empty() {
            return Err("no program or argv".into());
        }
        Ok(r)
    }
}

/// What the spawner will do at all, fixed when it is forked (before any guest input), so that
/// a compromised VMM cannot make it run another program or drop the jail.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpawnerPolicy {
    /// The only programs it executes (exact paths).
    pub programs: Vec<PathBuf>,
    /// Refuse requests without a jail (the VMM runs with `--sandbox on`).
    pub require_jail: bool,
}

impl SpawnerPolicy {
    fn check(&self, req: &SpawnRequest) -> Result<(), String> {
        if !self.programs.contains(&req.program) {
            return Err(format!(
                "{} is not a device program this spawner runs",
                req.program.display()
            ));
        }
        if self.require_jail && !req.jail {
            return Err("this spawner starts device processes only in their jail".into());
        }
        Ok(())
    }
}

/// A process the spawner started.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid (in the VMM's pid namespace).
    pub pid: u32,
    /// A pidfd of it: readable once it exits.
    pub pidfd: OwnedFd,
}

/// The VMM's handle on its spawner.
#[derive(Debug)]
pub struct Spawner {
    /// `None` once hung up.
    requests: Mutex<Option<UnixDatagram>>,
    events: Mutex<Option<UnixDatagram>>,
    pid: libc::pid_t,
}

impl Spawner {
    /// Forks the spawner. Call first thing in `main`: before any thread is started (the child
    /// is a copy of the calling thread only) and before any seccomp filter is applied (it
    /// would be inherited).
    pub fn fork(policy: SpawnerPolicy) -> Result<Spawner, SpawnerError> {
        let (req_vmm, req_spawner) = seqpacket_pair().map_err(SpawnerError::Socket)?;
        let (ev_vmm, ev_spawner) = seqpacket_pair().map_err(SpawnerError::Socket)?;
        // SAFETY: getpid cannot fail.
        let parent = unsafe { libc::getpid() };
        // SAFETY: fork; the caller is single-threaded (see above), so the child may do
        // anything the parent could.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(SpawnerError::Fork(io::Error::last_os_error()));
        }
        if pid == 0 {
            // SAFETY: PR_SET_PDEATHSIG with a signal number; the parent is the thread that
            // forked us, the VMM's main thread.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            // SAFETY: getppid cannot fail.
            if unsafe { libc::getppid() } != parent {
                // The VMM died before PR_SET_PDEATHSIG took effect.
                // SAFETY: leaves at once.
                unsafe { libc::_exit(0) };
            }
            drop(req_vmm);
            drop(ev_vmm);
            // Only what the spawner needs: not the descriptors the VMM was given (tap queues
            // of `--net fd=`), nor any another thread of a multi-threaded caller (tests) had
            // open at the fork, which would keep a tap attached or a socket alive.
            // Best effort: one left open is not the spawner's to use.
            let _ = bulkhead_sandbox::close_other_fds(&[
                req_spawner.as_raw_fd(),
                ev_spawner.as_raw_fd(),
            ]);
            // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
            unsafe { libc::prctl(libc::PR_SET_NAME, c"bulkhead-spawn".as_ptr()) };
            // A terminal's Ctrl-C or a SIGTERM to the process group is the VMM's to handle
            // (it shuts down and hangs up on us); blocked, not ignored, so that device
            // processes (whose mask is reset before exec) keep the default dispositions.
            if let Ok(set) =
                vmm_sys_util::signal::create_sigset(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP])
            {
                // SAFETY: a valid sigset; the old mask is not needed.
                unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
            }
            // The kernel log, opened now (before any filter, while the spawner may still open
            // files): the kernel's own record of a seccomp kill names the syscall.
            let audit = KmsgAudit::open();
            // Under --sandbox on, the spawner confines itself before it reads any request: its
            // filter (bulkhead_sandbox::spawner_filter, every rule with its code path) is
            // inherited by every device process it starts, stacked under the device's own.
            if policy.require_jail {
                if let Err(e) = confine() {
                    error!("device spawner: {}", chain(&e));
                    // SAFETY: leaves without running the VMM's atexit handlers.
                    unsafe { libc::_exit(1) };
                }
            }
            let code = serve(
                UnixDatagram::from(req_spawner),
                UnixDatagram::from(ev_spawner),
                &policy,
                &audit,
            );
            // SAFETY: leaves without running the VMM's atexit handlers or destructors.
            unsafe { libc::_exit(code) };
        }
        drop(req_spawner);
        drop(ev_spawner);
        let requests = UnixDatagram::from(req_vmm);
        requests
            .set_read_timeout(Some(REPLY_DEADLINE))
            .and_then(|()| requests.set_write_timeout(Some(REPLY_DEADLINE)))
            .map_err(SpawnerError::Socket)?;
        Ok(Spawner {
            requests: Mutex::new(Some(requests)),
            events: Mutex::new(Some(UnixDatagram::from(ev_vmm))),
            pid,
        })
    }

    /// The spawner's pid.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Hangs up: the spawner kills the device processes still running, reaps them, reports
    /// their exits and ends. Needs only close(2), so the main thread may do it under its filter.
    pub fn hang_up(&self) {
        drop(self.requests.lock().expect("not poisoned").take());
    }

    /// Takes the socket the spawner reports exits on (once).
    pub fn take_events(&self) -> Option<UnixDatagram> {
        self.events.lock().expect("not poisoned").take()
    }

    /// Starts `request.program`, handing it `fds` at the numbers `request.fds` lists.
    pub fn spawn(
        &self,
        request: &SpawnRequest,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Spawned, SpawnerError> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let guard = self.requests.lock().expect("not poisoned");
        let sock = guard.as_ref().ok_or(SpawnerError::Gone)?;
        sock.send_with_fds(&[request.encode().as_slice()], &raw)
            .map_err(SpawnerError::Send)?;
        let mut buf = vec![0u8; 4096];
        let mut fd = [-1; 1];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec points at `buf`, which lives across the call.
        let (n, nfds) =
            unsafe { sock.recv_with_fds(&mut iov, &mut fd) }.map_err(SpawnerError::Receive)?;
        // SAFETY: a descriptor received just now, owned by nobody else.
        let pidfd = (nfds > 0 && fd[0] >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd[0]) });
        if n == 0 {
            return Err(SpawnerError::Gone);
        }
        let reply = String::from_utf8_lossy(&buf[..n]).to_string();
        if let Some(reason) = reply.strip_prefix("err ") {
            return Err(SpawnerError::Refused(reason.to_string()));
        }
        let pid = reply
            .strip_prefix("ok ")
            .and_then(|p| p.parse::<u32>().ok());
        match (pid, pidfd) {
            (Some(pid), Some(pidfd)) => Ok(Spawned { pid, pidfd }),
            _ => Err(SpawnerError::Malformed(reply)),
        }
    }
}

/// An exit the spawner reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this status.
    Code(u32, i32),
    /// Killed by this signal.
    Signal(u32, i32),
}

impl Exit {
    /// Parses `exit PID code N` / `exit PID signal N`.
    pub fn parse(msg: &[u8]) -> Option<Exit> {
        let text = std::str::from_utf8(msg).ok()?;
        let mut w = text.split(' ');
        if w.next()? != "exit" {
            return None;
        }
        let pid = w.next()?.parse().ok()?;
        let how = w.next()?;
        let n = w.next()?.parse().ok()?;
        match how {
            "code" => Some(Exit::Code(pid, n)),
            "signal" => Some(Exit::Signal(pid, n)),
            _ => None,
        }
    }

    /// For a seccomp kill, the syscall as the VMM logs it: `syscall NAME (NR)`, or `syscall
    /// unknown (no audit record: REASON)`; `None` for other exits and older reports.
    pub fn seccomp_detail(msg: &[u8]) -> Option<String> {
        let text = std::str::from_utf8(msg).ok()?;
        let mut w = text.splitn(5, ' ');
        let (_, _, _, _) = (w.next()?, w.next()?, w.next()?, w.next()?);
        let rest = w.next()?;
        if let Some(reason) = rest.strip_prefix("noaudit ") {
            return Some(format!("syscall unknown (no audit record: {reason})"));
        }
        let fields = rest.strip_prefix("audit ")?;
        let get = |k: &str| {
            fields
                .split(' ')
                .find_map(|f| f.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
        };
        let record = SeccompRecord {
            pid: 0,
            syscall: get("syscall")?.parse().ok()?,
            arch: u32::from_str_radix(get("arch")?, 16).ok()?,
            sig: libc::SIGSYS,
        };
        Some(format!("syscall {}", record.describe()))
    }

    /// The process's pid.
    pub fn pid(&self) -> u32 {
        match *self {
            Exit::Code(p, _) | Exit::Signal(p, _) => p,
        }
    }
}

// ---- The spawner process's side. Single-threaded; it never returns into `main`.

/// A device process the spawner started and must reap.
enum Child {
    Jailed(bulkhead_sandbox::JailedChild),
    Plain {
        pid: libc::pid_t,
        pidfd: OwnedFd,
        cgroup: Option<PathBuf>,
    },
}

impl Child {
    fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Child::Jailed(c) => c.pidfd(),
            Child::Plain { pidfd, .. } => Some(pidfd.as_fd()),
        }
    }

    fn kill(&self) {
        match self {
            Child::Jailed(c) => {
                let _ = c.kill();
            }
            Child::Plain { pidfd, .. } => {
                // SAFETY: pidfd_send_signal with our pidfd, no siginfo, no flags.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        pidfd.as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0u32,
                    )
                };
            }
        }
    }

    /// Reaps it if it exited: `Some((code, signal))`.
    fn try_wait(&mut self, block: bool) -> Option<std::process::ExitStatus> {
        match self {
            Child::Jailed(c) => {
                if block {
                    c.wait().ok()
                } else {
                    c.try_wait().ok().flatten()
                }
            }
            Child::Plain { pid, cgroup, .. } => {
                let mut raw = 0;
                let flags = if block { 0 } else { libc::WNOHANG };
                // SAFETY: waitpid on our own child with a local status word.
                let r = unsafe { libc::waitpid(*pid, &mut raw, flags) };
                if r <= 0 {
                    return None;
                }
                if let Some(dir) = cgroup.take() {
                    let _ = std::fs::remove_dir(dir);
                }
                Some(std::process::ExitStatus::from_raw(raw))
            }
        }
    }
}

/// The spawner's loop: requests, reaping, and the end when the VMM hangs up.
fn serve(
    requests: UnixDatagram,
    events: UnixDatagram,
    policy: &SpawnerPolicy,
    audit: &KmsgAudit,
) -> i32 {
    let mut children: BTreeMap<u32, Child> = BTreeMap::new();
    loop {
        let mut polls = vec![libc::pollfd {
            fd: requests.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let pids: Vec<u32> = children.keys().copied().collect();
        for pid in &pids {
            let fd = children[pid].pidfd().map_or(-1, |f| f.as_raw_fd());
            polls.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: poll over a local array of the length passed.
        let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            error!("device spawner: poll: {}", io::Error::last_os_error());
            break;
        }
        for (i, pid) in pids.iter().enumerate() {
            if polls[i + 1].revents == 0 {
                continue;
            }
            let Some(child) = children.get_mut(pid) else {
                continue;
            };
            if let Some(status) = child.try_wait(false) {
                children.remove(pid);
                report_exit(&events, *pid, status, audit);
            }
        }
        if polls[0].revents != 0 {
            match handle_request(&requests, policy) {
                Ok(Some((pid, child))) => {
                    children.insert(pid, child);
                }
                Ok(None) => {}
                Err(()) => break,
            }
        }
    }
    // The VMM is gone (or hung up): its devices go with it.
    for child in children.values() {
        child.kill();
    }
    for (pid, mut child) in children {
        if let Some(status) = child.try_wait(true) {
            report_exit(&events, pid, status, audit);
        }
    }
    0
}

fn report_exit(
    events: &UnixDatagram,
    pid: u32,
    status: std::process::ExitStatus,
    audit: &KmsgAudit,
) {
    let msg = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {pid} code {code}"),
        (None, Some(sig)) if sig == libc::SIGSYS => match audit.find(pid, RECORD_WAIT) {
            Ok(r) => format!(
                "exit {pid} signal {sig} audit syscall={} arch={:x}",
                r.syscall, r.arch
            ),
            Err(reason) => format!("exit {pid} signal {sig} noaudit {reason}"),
        },
        (None, Some(sig)) => format!("exit {pid} signal {sig}"),
        (None, None) => format!("exit {pid} code -1"),
    };
    // The VMM may be gone already; nothing to do then.
    let _ = events.send(msg.as_bytes());
}

/// Reads one request, starts the program, replies. `Err` when the VMM hung up.
fn handle_request(
    requests: &UnixDatagram,
    policy: &SpawnerPolicy,
) -> Result<Option<(u32, Child)>, ()> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut raw_fds = [-1; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec points at `buf`, which lives across the call.
    let received = unsafe { requests.recv_with_fds(&mut iov, &mut raw_fds) };
    let (n, nfds) = match received {
        Ok((0, _)) => return Err(()),
        Ok(r) => r,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return Ok(None),
        Err(e) => {
            error!("device spawner: receiving a request: {e}");
            return Err(());
        }
    };
    let fds: Vec<OwnedFd> = raw_fds[..nfds]
        .iter()
        .filter(|fd| **fd >= 0)
        // SAFETY: descriptors received just now, owned by nobody else.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
        .collect();
    let result = SpawnRequest::decode(&buf[..n]).and_then(|req| {
        if req.fds.len() != fds.len() {
            return Err(format!(
                "{} descriptor numbers but {} descriptors",
                req.fds.len(),
                fds.len()
            ));
        }
        policy.check(&req)?;
        start(&req, fds)
    });
    let reply = match &result {
        Ok((pid, child)) => {
            let pidfd = child.pidfd().map_or(-1, |f| f.as_raw_fd());
            requests.send_with_fd(format!("ok {pid}").as_bytes(), pidfd)
        }
        Err(reason) => requests.send_with_fds::<&[u8]>(&[format!("err {reason}").as_bytes()], &[]),
    };
    if let Err(e) = reply {
        warn!("device spawner: replying: {e}");
    }
    Ok(result.ok())
}

/// Installs the spawner's seccomp filter on itself (it is single-threaded).
fn confine() -> Result<(), bulkhead_sandbox::seccomp::SeccompError> {
    let prog = bulkhead_sandbox::spawner_filter::spawner_rules().compile_installed(
        "bulkhead-spawn",
        bulkhead_sandbox::seccomp::TraceFamily::Spawner,
    )?;
    bulkhead_sandbox::seccomp::apply(&prog)?;
    debug!("device spawner: seccomp filter installed");
    Ok(())
}

/// Error chain on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}

fn start(req: &SpawnRequest, fds: Vec<OwnedFd>) -> Result<(u32, Child), String> {
    let cgroup = req.cgroup.as_ref().map(|c| CgroupLimits {
        parent: c.parent.clone(),
        name: c.name.clone(),
        memory_max: Some(c.memory_max),
        pids_max: Some(c.pids_max),
        cpu_max: None,
    });
    if req.jail {
        let mut jail = Jail::new().rlimits(Rlimits {
            nofile: req.nofile,
            nproc: req.nproc,
            address_space: None,
            file_size: None,
        });
        // Landlock is the device's own first step (`--landlock on`, the runtime's default).
        for (fd, n) in fds.into_iter().zip(&req.fds) {
            jail = jail.pass_fd(fd, *n);
        }
        if let Some(c) = cgroup {
            jail = jail.cgroup(c);
        }
        if let Some(d) = req.data {
            jail = jail.data_limit(d);
        }
        if let Some((u, g)) = req.ids {
            jail = jail.host_ids(u, g);
        }
        if let Some(a) = req.oom_score_adj {
            jail = jail.oom_score_adj(a);
        }
        // argv[0] is the program's file name (Jail::spawn sets it).
        let child = jail.spawn(&req.program, &req.argv[1..]).map_err(|e| {
            format!(
                "starting {} in its jail: {}",
                req.program.display(),
                chain(&e)
            )
        })?;
        debug!(
            "device spawner: started {} (pid {})",
            req.program.display(),
            child.id()
        );
        Ok((child.id(), Child::Jailed(child)))
    } else {
        let dir = cgroup
            .as_ref()
            .map(bulkhead_sandbox::jail::create_cgroup)
            .transpose()
            .map_err(|e| chain(&e))?;
        let started = start_plain(req, &fds, dir.as_ref());
        if started.is_err() {
            if let Some(d) = &dir {
                let _ = std::fs::remove_dir(d);
            }
        }
        let (pid, pidfd) = started?;
        Ok((
            pid as u32,
            Child::Plain {
                pid,
                pidfd,
                cgroup: dir,
            },
        ))
    }
}

/// Fork and exec without a jail (`--sandbox off`): the listed descriptors, /dev/null on 0 and
/// 1, nothing else; the rlimits, the cgroup leaf, the ids and oom_score_adj all the same.
fn start_plain(
    req: &SpawnRequest,
    fds: &[OwnedFd],
    cgroup: Option<&PathBuf>,
) -> Result<(libc::pid_t, OwnedFd), String> {
    let c = |s: &[u8]| CString::new(s).map_err(|_| "a NUL byte in an argument".to_string());
    let program = c(req.program.as_os_str().as_bytes())?;
    let argv_c = req
        .argv
        .iter()
        .map(|a| c(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let procs = cgroup.map(|d| d.join("cgroup.procs"));
    let (err_r, err_w) = {
        let mut p = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the local array.
        if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(format!("pipe: {}", io::Error::last_os_error()));
        }
        // SAFETY: fresh descriptors owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
    };
    // SAFETY: getpid cannot fail.
    let me = unsafe { libc::getpid() };
    // SAFETY: the spawner is single-threaded, so the child may do anything.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: the child of a single-threaded process: every call below takes numbers,
        // local buffers or NUL-terminated strings prepared above; it ends in exec or _exit.
        unsafe {
            plain_child(
                req,
                fds,
                procs.as_deref(),
                err_w.as_raw_fd(),
                me,
                &program,
                &argv,
                &envp,
            )
        }
    }
    drop(err_w);
    let mut msg = String::new();
    let _ = io::Read::read_to_string(&mut std::fs::File::from(err_r), &mut msg);
    // SAFETY: pidfd_open on our own child, not reaped yet.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if !msg.is_empty() || pidfd < 0 {
        let mut raw = 0;
        // SAFETY: reaping our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, &mut raw, 0);
        }
        if msg.is_empty() {
            msg = format!("pidfd_open: {}", io::Error::last_os_error());
        }
        return Err(format!("starting {}: {msg}", req.program.display()));
    }
    // SAFETY: a fresh pidfd owned by nobody else.
    Ok((pid, unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) }))
}

/// The descriptors the plain child's own bookkeeping moves to, above every target number.
const PLAIN_HIGH_FD: RawFd = 64;

/// Reports `what` and errno on the error pipe and leaves.
unsafe fn plain_fail(err: RawFd, what: &str) -> ! {
    let msg = format!("{what}: {}", io::Error::last_os_error());
    // SAFETY: write from a local buffer, then leave.
    unsafe {
        libc::write(err, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

/// The child of [`start_plain`], between fork and exec.
///
/// # Safety
/// Only in the child of a fork of the (single-threaded) spawner.
#[allow(clippy::too_many_arguments)]
unsafe fn plain_child(
    req: &SpawnRequest,
    fds: &[OwnedFd],
    procs: Option<&std::path::Path>,
    err_w: RawFd,
    spawner: libc::pid_t,
    program: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    // SAFETY: see the function's contract; each call is checked or best effort.
    unsafe {
        let err = libc::fcntl(err_w, libc::F_DUPFD_CLOEXEC, PLAIN_HIGH_FD);
        if err < 0 {
            libc::_exit(127);
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            plain_fail(err, "PR_SET_PDEATHSIG");
        }
        if libc::getppid() != spawner {
            libc::_exit(1);
        }
        if let Some(p) = procs {
            if std::fs::write(p, "0").is_err() {
                plain_fail(err, "joining the cgroup leaf");
            }
        }
        if let Some(adj) = req.oom_score_adj {
            let _ = std::fs::write("/proc/self/oom_score_adj", adj.to_string());
        }
        // Move the handed-over descriptors above the targets, then to their numbers.
        let mut high = Vec::new();
        for fd in fds {
            let h = libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, PLAIN_HIGH_FD);
            if h < 0 {
                plain_fail(err, "dup");
            }
            high.push(h);
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null < 0 || libc::dup2(null, 0) < 0 || libc::dup2(null, 1) < 0 {
            plain_fail(err, "/dev/null");
        }
        for (h, n) in high.iter().zip(&req.fds) {
            if libc::dup2(*h, *n) < 0 {
                plain_fail(err, "dup2");
            }
        }
        // Nothing else survives the exec: the numbers below the high mark that are not
        // targets are closed, everything from the mark up is close-on-exec (the error pipe
        // among them, so that it reports until the exec).
        for fd in 3..PLAIN_HIGH_FD {
            if !req.fds.contains(&fd) {
                libc::close(fd);
            }
        }
        libc::syscall(
            libc::SYS_close_range,
            PLAIN_HIGH_FD as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
        );
        for (res, v) in [
            (libc::RLIMIT_NOFILE, Some(req.nofile)),
            (libc::RLIMIT_NPROC, Some(req.nproc)),
            (libc::RLIMIT_DATA, req.data),
        ] {
            if let Some(v) = v {
                let rl = libc::rlimit {
                    rlim_cur: v,
                    rlim_max: v,
                };
                if libc::setrlimit(res, &rl) != 0 {
                    plain_fail(err, "setrlimit");
                }
            }
        }
        if let Some((u, g)) = req.ids {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(g) != 0
                || libc::setuid(u) != 0
            {
                plain_fail(err, "setting the device uid");
            }
        }
        let empty: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
        plain_fail(err, "exec")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_spawn_request_roundtrip() {
        let r = SpawnRequest {
            program: "/bin/bulkhead-block".into(),
            argv: vec!["bulkhead-block".into(), "--path".into(), "a b\nc".into()],
            fds: vec![2, 3, 4, 5],
            jail: true,
            nofile: 72,
            nproc: 68,
            data: Some(256 << 20),
            cgroup: Some(CgroupRequest {
                parent: "/sys/fs/cgroup/x".into(),
                name: "disk0".into(),
                memory_max: 1 << 30,
                pids_max: 68,
            }),
            ids: Some((1000, 1001)),
            oom_score_adj: Some(800),
        };
        assert_eq!(SpawnRequest::decode(&r.encode()).expect("decode"), r);
        let plain = SpawnRequest {
            program: "/p".into(),
            argv: vec!["p".into()],
            ..Default::default()
        };
        assert_eq!(
            SpawnRequest::decode(&plain.encode()).expect("decode"),
            plain
        );
    }

    #[test]
    fn test_spawn_request_decode_rejects_garbage() {
        assert!(SpawnRequest::decode(b"").is_err());
        assert!(SpawnRequest::decode(b"program\0/p\0arg\0p\0bogus\x001\0").is_err());
        assert!(SpawnRequest::decode(b"program\0/p\0arg\0p\0nofile\0x\0").is_err());
        assert!(SpawnRequest::decode(b"program\0/p\0arg").is_err());
    }

    #[test]
    fn test_spawner_policy_refuses_other_programs_and_no_jail() {
        let policy = SpawnerPolicy {
            programs: vec!["/bin/bulkhead-block".into()],
            require_jail: true,
        };
        let mut req = SpawnRequest {
            program: "/bin/bulkhead-block".into(),
            argv: vec!["bulkhead-block".into()],
            jail: true,
            ..Default::default()
        };
        assert!(policy.check(&req).is_ok());
        req.jail = false;
        assert!(policy.check(&req).is_err());
        req.jail = true;
        req.program = "/bin/sh".into();
        assert!(policy.check(&req).is_err());
    }

    #[test]
    fn test_exit_parse_forms() {
        assert_eq!(Exit::parse(b"exit 12 code 0"), Some(Exit::Code(12, 0)));
        assert_eq!(Exit::parse(b"exit 12 signal 9"), Some(Exit::Signal(12, 9)));
        assert_eq!(Exit::parse(b"exit x code 0"), None);
        assert_eq!(Exit::parse(b"exit 1 other 0"), None);
        let killed = b"exit 12 signal 31 audit syscall=426 arch=c00000b7";
        assert_eq!(Exit::parse(killed), Some(Exit::Signal(12, 31)));
        assert_eq!(
            Exit::seccomp_detail(killed).as_deref(),
            Some("syscall io_uring_enter (426)")
        );
        let unknown = b"exit 12 signal 31 noaudit /dev/kmsg: Permission denied (os error 13)";
        assert_eq!(Exit::parse(unknown), Some(Exit::Signal(12, 31)));
        assert_eq!(
            Exit::seccomp_detail(unknown).as_deref(),
            Some("syscall unknown (no audit record: /dev/kmsg: Permission denied (os error 13))")
        );
        assert_eq!(Exit::seccomp_detail(b"exit 12 signal 9"), None);
    }

    /// The spawner keeps none of the caller's descriptors: a tap queue open in the VMM (or
    /// in another test's thread) at the fork must not stay attached through the spawner.
    #[test]
    fn test_spawner_keeps_no_inherited_descriptor() {
        let (mine, _other) = std::os::unix::net::UnixStream::pair().expect("pair");
        let spawner = Spawner::fork(SpawnerPolicy {
            programs: vec![],
            require_jail: false,
        })
        .expect("fork");
        let dir = format!("/proc/{}/fd", spawner.pid);
        let target = |path: std::path::PathBuf| std::fs::read_link(path).ok();
        let socket = target(format!("/proc/self/fd/{}", mine.as_raw_fd()).into()).expect("link");
        let mut held: Vec<_> = Vec::new();
        for _ in 0..100 {
            held = std::fs::read_dir(&dir)
                .expect("spawner's fd directory")
                .filter_map(|e| target(e.ok()?.path()))
                .collect();
            // stdio, its two sockets, the kernel log it opens for audit records. The listing
            // may be taken while close_range(2) is still closing the rest (once: the lock file
            // of the shell that ran the tests, and another socket, beside stdio and the
            // spawner's own): polled until it is done.
            if !held.contains(&socket) && held.len() <= 6 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!held.contains(&socket), "{socket:?} in {held:?}");
        assert!(held.len() <= 6, "{held:?}");
    }

    /// The spawner starts a plain program with the listed descriptors, hands back a pidfd,
    /// reports its exit, and exits itself when the VMM's end hangs up.
    #[test]
    fn test_spawner_plain_spawn_reports_exit() {
        let Ok(sh) = std::fs::canonicalize("/bin/sh") else {
            return;
        };
        // The test harness has threads; the forked spawner only runs its own loop, which
        // allocates, so this relies on no other thread holding the allocator lock at the
        // fork, which the test harness's idle threads do not.
        let spawner = Spawner::fork(SpawnerPolicy {
            programs: vec![sh.clone()],
            require_jail: false,
        })
        .expect("fork");
        let events = spawner.take_events().expect("events");
        let (r, w) = std::os::unix::net::UnixStream::pair().expect("pair");
        let req = SpawnRequest {
            program: sh,
            argv: vec!["sh".into(), "-c".into(), "echo hi >&3; exit 7".into()],
            fds: vec![3],
            jail: false,
            nofile: 64,
            nproc: 4096,
            ..Default::default()
        };
        let spawned = spawner.spawn(&req, &[w.as_fd()]).expect("spawn");
        drop(w);
        let mut out = String::new();
        io::Read::read_to_string(&mut &r, &mut out).expect("read");
        assert_eq!(out, "hi\n");
        let mut buf = [0u8; 64];
        events
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let n = events.recv(&mut buf).expect("exit event");
        assert_eq!(
            Exit::parse(&buf[..n]),
            Some(Exit::Code(spawned.pid, 7)),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
        let bad = SpawnRequest {
            program: "/nonexistent".into(),
            argv: vec!["x".into()],
            nofile: 64,
            nproc: 64,
            ..Default::default()
        };
        assert!(matches!(
            spawner.spawn(&bad, &[]),
            Err(SpawnerError::Refused(_))
        ));
        // A SIGSYS death is reported with what the kernel's audit log says about it; a
        // `kill -SYS` is no seccomp kill, so there is no record to find.
        let sys = SpawnRequest {
            argv: vec!["sh".into(), "-c".into(), "kill -SYS $$".into()],
            fds: vec![],
            ..req.clone()
        };
        let spawned = spawner.spawn(&sys, &[]).expect("spawn");
        let n = events.recv(&mut buf).expect("exit event");
        let report = &buf[..n];
        assert_eq!(Exit::parse(report), Some(Exit::Signal(spawned.pid, 31)));
        let detail = Exit::seccomp_detail(report).expect("a seccomp detail");
        assert!(
            detail.starts_with("syscall unknown (no audit record: "),
            "{detail}"
        );
        let pid = spawner.pid;
        drop(spawner);
        let mut raw = 0;
        // SAFETY: reaping the spawner, our child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut raw, 0) }, pid);
    }
}
