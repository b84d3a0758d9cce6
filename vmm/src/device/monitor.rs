//! One VMM thread that watches every device process: it reads their logs (each device's stderr
//! is a pipe), notices at once when one ends (its pidfd becomes readable), and learns how it
//! ended from the spawner's exit reports.
//!
//! It also watches each device's queue error eventfds (VHOST_USER_SET_VRING_ERR): a backend
//! signals one when it stopped a queue the driver broke, and the guest then sees
//! DEVICE_NEEDS_RESET and a configuration interrupt ([`crate::virtio::FailureHandle::
//! queue_broken`]).
//!
//! Log lines go to the VMM's stderr prefixed with the device id, with control characters
//! removed, cut at [`MAX_LINE`] bytes, and rate-limited per device: a bucket of
//! [`BURST`] lines refilled at [`LINES_PER_SEC`] lines a second; lines beyond it are dropped
//! and counted, and the count is printed once lines flow again.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};

use super::restart::{cause, Decision, Respawn, Standby};
use super::spawner::Exit;

/// Longest log line passed on, in bytes; longer lines are cut (and the rest passed on as
/// further lines).
pub const MAX_LINE: usize = 512;
/// Lines a device may log at once.
pub const BURST: u32 = 200;
/// Lines a second a device may log, sustained.
pub const LINES_PER_SEC: u32 = 20;

/// Token bucket of one device's log.
#[derive(Debug)]
struct RateLimit {
    tokens: f64,
    last: Instant,
    dropped: u64,
}

impl RateLimit {
    fn new(now: Instant) -> Self {
        Self {
            tokens: f64::from(BURST),
            last: now,
            dropped: 0,
        }
    }

    /// Whether a line may go out now.
    fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * f64::from(LINES_PER_SEC)).min(f64::from(BURST));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.dropped += 1;
            false
        }
    }
}

/// A log line made safe for a terminal: control characters (C0, DEL, C1, and the rest of
/// Unicode's Cc class) removed, invalid UTF-8 replaced.
pub fn sanitize(line: &[u8]) -> String {
    String::from_utf8_lossy(line)
        .chars()
        .filter(|c| !c.is_control())
        .collect()
}

/// How a device process ended, as the VMM logs it; a restartable device's line does not say
/// the VM goes on without it (the restart decision follows).
fn describe(id: &str, exit: Exit, seccomp: Option<String>, restartable: bool) {
    let mut line = description(id, exit, seccomp);
    if restartable {
        if let Some(cut) = line.find("; the VM goes on without it") {
            line.truncate(cut);
        }
    }
    match exit {
        Exit::Signal(..) => error!("{line}"),
        Exit::Code(_, 0) => info!("{line}"),
        Exit::Code(..) => warn!("{line}"),
    }
}

/// The line [`describe`] logs; for a seccomp kill, `seccomp` is what the spawner learned from
/// the kernel's audit record ([`Exit::seccomp_detail`]).
fn description(id: &str, exit: Exit, seccomp: Option<String>) -> String {
    match exit {
        Exit::Signal(pid, sig) if sig == libc::SIGSYS => format!(
            "{id}: device process {pid} was killed by signal {sig} (seccomp): {}; the VM goes on \
             without it",
            seccomp.unwrap_or_else(|| "syscall unknown (no audit record: no report)".into())
        ),
        Exit::Signal(pid, sig) => format!(
            "{id}: device process {pid} was killed by signal {sig}; the VM goes on without it"
        ),
        Exit::Code(pid, 0) => format!("{id}: device process {pid} exited"),
        Exit::Code(pid, code) => format!("{id}: device process {pid} exited with status {code}"),
    }
}

struct Entry {
    id: String,
    pid: u32,
    log: Option<OwnedFd>,
    pidfd: Option<OwnedFd>,
    line: Vec<u8>,
    limit: RateLimit,
    /// The process ended (pidfd readable).
    ended: bool,
    /// The spawner reported its exit status.
    reaped: bool,
    /// Called once when the process ends (the transport marks the device failed).
    on_end: Option<OnEnd>,
    /// The restartable device (index in `State::respawns`) this process serves.
    device: Option<usize>,
    /// The restartable device this process stands by for (`restart_standby=on`); it becomes
    /// `device` when the process takes over, `None` when it is retired.
    standby_of: Option<usize>,
    /// Started as a standby process and has not taken over.
    standby: bool,
}

/// What to do when a device process ends; gets a reason for logs.
pub type OnEnd = Box<dyn Fn(&str) + Send + Sync>;

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("id", &self.id)
            .field("pid", &self.pid)
            .field("ended", &self.ended)
            .field("reaped", &self.reaped)
            .finish_non_exhaustive()
    }
}

/// One queue's error eventfd and the device it belongs to.
#[derive(Debug)]
struct QueueError {
    /// The device's id.
    id: String,
    fd: OwnedFd,
    queue: usize,
    handle: crate::virtio::FailureHandle,
}

#[derive(Debug, Default)]
struct State {
    entries: Vec<Entry>,
    /// Indexed by token; `None` once its device was removed.
    queue_errors: Vec<Option<QueueError>>,
    /// Devices whose process is started again when it dies.
    /// Indexed as `Entry::device`; `None` once its device was removed (indices stay).
    respawns: Vec<Option<Box<Respawn>>>,
    /// Restarts waiting for their backoff: (when, index in `respawns`).
    due: Vec<(Instant, usize)>,
    /// Standby processes to start: (when, index in `respawns`).
    standby_due: Vec<(Instant, usize)>,
    /// The spawner's events socket hung up: no more exit reports will come.
    spawner_gone: bool,
}

/// The watcher of all device processes.
#[derive(Debug)]
pub struct Monitor {
    epoll: OwnedFd,
    /// The spawner's exit-report socket.
    events: Option<OwnedFd>,
    state: Mutex<State>,
    changed: Condvar,
}

const TOKEN_EVENTS: u64 = u64::MAX;
/// Tokens of queue error eventfds: this bit and the index in `State::queue_errors`.
const TOKEN_QUEUE_ERROR: u64 = 1 << 62;

fn token(index: usize, pidfd: bool) -> u64 {
    ((index as u64) << 1) | u64::from(pidfd)
}

impl Monitor {
    /// A monitor with nothing to watch yet; `events` is the spawner's exit-report socket.
    pub fn new(events: Option<UnixDatagram>) -> std::io::Result<Arc<Monitor>> {
        // SAFETY: epoll_create1 with a flag; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let m = Arc::new(Monitor {
            epoll,
            events: events.map(OwnedFd::from),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        if let Some(ev) = &m.events {
            m.add(ev.as_raw_fd(), TOKEN_EVENTS)?;
        }
        Ok(m)
    }

    fn add(&self, fd: RawFd, token: u64) -> std::io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: epoll_ctl with our epoll descriptor and a local event.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn remove(&self, fd: RawFd) {
        // SAFETY: epoll_ctl with our epoll descriptor; a missing fd only fails.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    /// Watches device `id`: its log pipe's read end and its pidfd.
    pub fn watch(&self, id: &str, pid: u32, log: OwnedFd, pidfd: OwnedFd) -> std::io::Result<()> {
        let mut st = self.state.lock().expect("not poisoned");
        self.watch_locked(&mut st, id, pid, log, pidfd, None)
    }

    fn watch_locked(
        &self,
        st: &mut State,
        id: &str,
        pid: u32,
        log: OwnedFd,
        pidfd: OwnedFd,
        device: Option<usize>,
    ) -> std::io::Result<()> {
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let fl = libc::fcntl(log.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(log.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        let index = st.entries.len();
        self.add(log.as_raw_fd(), token(index, false))?;
        self.add(pidfd.as_raw_fd(), token(index, true))?;
        st.entries.push(Entry {
            id: id.to_string(),
            pid,
            log: Some(log),
            pidfd: Some(pidfd),
            line: Vec::new(),
            limit: RateLimit::new(Instant::now()),
            ended: false,
            reaped: false,
            on_end: None,
            device,
            standby_of: None,
            standby: false,
        });
        Ok(())
    }

    /// Restarts process `pid`'s device under its policy whenever it dies (device::restart).
    pub fn restartable(&self, pid: u32, respawn: Respawn) {
        let mut st = self.state.lock().expect("not poisoned");
        let index = st.respawns.len();
        let lost = st
            .entries
            .iter_mut()
            .find(|e| e.pid == pid)
            .is_some_and(|e| {
                e.device = Some(index);
                e.ended
            });
        if lost {
            respawn.handle.lost();
        }
        if respawn.spec.policy.restart.standby {
            st.standby_due
                .push((Instant::now() + STANDBY_FIRST_DELAY, index));
        }
        st.respawns.push(Some(Box::new(respawn)));
    }

    /// The control channel of device `id`'s current process, if it was restarted.
    pub fn current_control(&self, id: &str) -> Option<Arc<super::control::ControlChannel>> {
        let st = self.state.lock().expect("not poisoned");
        st.respawns
            .iter()
            .flatten()
            .find(|r| r.spec.id == id)
            .and_then(|r| r.control.clone())
    }

    /// Sets option `option` of device `id`'s next process (if it is restartable) to `value`:
    /// the balloon's `--size` follows `vm.resize`, so a restarted balloon keeps the target.
    pub fn set_respawn_option(&self, id: &str, option: &str, value: &str) {
        let mut st = self.state.lock().expect("not poisoned");
        let Some(d) = st
            .respawns
            .iter()
            .position(|r| r.as_ref().is_some_and(|r| r.spec.id == id))
        else {
            return;
        };
        let Some(r) = st.respawns[d].as_mut() else {
            return;
        };
        if let super::Backend::Spawn { args, .. } = &mut r.spec.backend {
            match args.iter().position(|a| a == option) {
                Some(i) if i + 1 < args.len() => args[i + 1] = value.to_string(),
                _ => args.extend([option.to_string(), value.to_string()]),
            }
        }
        // A standby started with the old options would take over with them: a new one.
        if let Some(sb) = r.standby.take() {
            retire_standby(&mut st, sb);
            st.standby_due
                .push((Instant::now() + STANDBY_AFTER_TAKEOVER, d));
        }
    }

    /// The options device `id`'s next process would get (restartable devices only).
    pub fn respawn_args(&self, id: &str) -> Option<Vec<String>> {
        let st = self.state.lock().expect("not poisoned");
        st.respawns
            .iter()
            .flatten()
            .find(|r| r.spec.id == id)
            .and_then(|r| match &r.spec.backend {
                super::Backend::Spawn { args, .. } => Some(args.clone()),
                _ => None,
            })
    }

    /// No more restarts (the VM is shutting down): the files kept for them are closed.
    pub fn forget_respawns(&self) {
        let mut st = self.state.lock().expect("not poisoned");
        st.due.clear();
        st.standby_due.clear();
        let mut standbys = Vec::new();
        for r in st.respawns.iter_mut().flatten() {
            r.files.clear();
            r.retired = true;
            standbys.extend(r.standby.take());
        }
        for sb in standbys {
            retire_standby(&mut st, sb);
        }
    }

    /// Restarts made and the last cause, per restartable device.
    pub fn restarts(&self) -> Vec<super::restart::RestartInfo> {
        let st = self.state.lock().expect("not poisoned");
        st.respawns
            .iter()
            .flatten()
            .map(|r| super::restart::RestartInfo {
                id: r.spec.id.clone(),
                pid: r.pid,
                restarts: r.restarts,
                last_cause: r.last_cause.clone(),
                standby_pid: r.standby.as_ref().map(|s| s.pid),
            })
            .collect()
    }

    /// Process `exit` of restartable device `d` was reported: restart it after its backoff,
    /// or give up.
    fn decide(&self, st: &mut State, d: usize, exit: Exit) {
        let Some(r) = st.respawns.get_mut(d).and_then(Option::as_mut) else {
            return;
        };
        if r.retired || !r.handle.wanted() {
            // Shut down, unplugged, or failed for good: its end was expected, and the files
            // kept for a restart are closed, its standby ended.
            r.files.clear();
            if let Some(sb) = r.standby.take() {
                retire_standby(st, sb);
            }
            return;
        }
        let id = r.spec.id.clone();
        let why = cause(exit);
        r.last_cause = Some(why.clone());
        let policy = r.spec.policy.restart;
        if r.early == Some(exit.pid()) {
            // Its standby took over already (Monitor::ended): it stays, unless the policy
            // would not have restarted this death.
            r.early = None;
            if let Decision::GiveUp(reason) = policy.decide(r.restarts.saturating_sub(1), exit) {
                r.current.kill();
                if let Some(sb) = r.standby.take() {
                    retire_standby(st, sb);
                }
                let Some(r) = st.respawns.get_mut(d).and_then(Option::as_mut) else {
                    return;
                };
                error!(
                    "{id}: DEVICE PROCESS NOT RESTARTED: {reason}; the standby that took over is \
                     ended, the device fails (DEVICE_NEEDS_RESET), the VM goes on without it"
                );
                r.handle
                    .give_up(&format!("its process ended by {why} and is not restarted"));
            }
            return;
        }
        match policy.decide(r.restarts, exit) {
            Decision::Restart(wait) => {
                warn!(
                    "{id}: restarting its device process (restart {} of {}) in {} ms; it ended by {why}",
                    r.restarts + 1,
                    policy.max,
                    wait.as_millis()
                );
                st.due.push((Instant::now() + wait, d));
            }
            Decision::GiveUp(reason) => {
                if let Some(sb) = r.standby.take() {
                    retire_standby(st, sb);
                }
                let Some(r) = st.respawns.get_mut(d).and_then(Option::as_mut) else {
                    return;
                };
                error!(
                    "{id}: DEVICE PROCESS NOT RESTARTED: {reason}; the device fails (DEVICE_NEEDS_RESET), the VM goes on without it"
                );
                r.handle
                    .give_up(&format!("its process ended by {why} and is not restarted"));
            }
        }
    }

    /// Starts the process of restartable device `d` again and hands its connection to the
    /// device's worker, which replays the session.
    fn restart_now(&self, st: &mut State, d: usize) {
        let Some(r) = st.respawns.get_mut(d).and_then(Option::as_mut) else {
            return;
        };
        if r.retired || !r.handle.wanted() {
            return;
        }
        r.restarts += 1;
        let id = r.spec.id.clone();
        if let Some(sb) = r.standby.take() {
            self.take_over(st, d, sb);
            return;
        }
        let started = match r.spawn(r.alt_leaf) {
            Ok(s) => s,
            Err(e) => {
                error!("{id}: restarting its device process: {}", chain(&e));
                let policy = r.spec.policy.restart;
                if r.restarts < policy.max {
                    let wait = policy.backoff_for(r.restarts);
                    st.due.push((Instant::now() + wait, d));
                } else {
                    r.handle
                        .give_up("its process could not be started again (restart_max reached)");
                }
                return;
            }
        };
        let died_at = r.died_at;
        let pidfd_copy = match started.pidfd.try_clone() {
            Ok(p) => p,
            Err(e) => {
                error!("{id}: restarted process {}: {e}", started.pid);
                super::kill_pidfd(&started.pidfd);
                return;
            }
        };
        r.current.set(pidfd_copy);
        r.pid = started.pid;
        let handle = r.handle.clone();
        let pid = started.pid;
        info!("{id}: device process {pid} started in place of the one that died");
        if let Err(e) = self.watch_locked(st, &id, pid, started.log, started.pidfd, Some(d)) {
            error!("{id}: watching restarted process {pid}: {e}");
        }
        if let Some(r) = st.respawns.get_mut(d).and_then(Option::as_mut) {
            r.control = Some(Arc::new(started.control));
            if r.spec.policy.restart.standby {
                st.standby_due
                    .push((Instant::now() + STANDBY_AFTER_TAKEOVER, d));
            }
        }
        if let Err(e) = handle.reconnect(started.stream, died_at) {
            error!("{id}: handing over restarted process {pid}: {e}");
            if let Some(r) = st.respawns.get(d).and_then(Option::as_ref) {
                r.current.kill();
            }
        }
    }

    /// Device `d`'s standby process takes over from the one that died: its socket goes to
    /// the device's worker, which replays the session; a new standby is started later.
    fn take_over(&self, st: &mut State, d: usize, sb: Standby) {
        let alive = st
            .entries
            .iter()
            .any(|e| e.pid == sb.pid && e.standby_of == Some(d) && !e.ended);
        let Some(r) = st.respawns.get_mut(d).and_then(Option::as_mut) else {
            return;
        };
        let id = r.spec.id.clone();
        if !alive {
            // It died unseen a moment ago: start one the usual way (its end is logged).
            warn!(
                "{id}: its standby process {} is gone; starting a new process",
                sb.pid
            );
            r.restarts -= 1;
            drop(sb);
            self.restart_now(st, d);
            return;
        }
        r.current.set(sb.pidfd);
        r.pid = sb.pid;
        r.alt_leaf = !r.alt_leaf;
        r.control = Some(sb.control);
        r.standby_losses = 0;
        let handle = r.handle.clone();
        let died_at = r.died_at;
        let pid = sb.pid;
        for e in st.entries.iter_mut().filter(|e| e.pid == pid) {
            e.standby_of = None;
            e.standby = false;
            e.device = Some(d);
        }
        st.standby_due
            .push((Instant::now() + STANDBY_AFTER_TAKEOVER, d));
        // A warning, as the death it follows: the operator sees both at the default level.
        warn!("{id}: standby process {pid} takes over from the one that died");
        if let Err(e) = handle.reconnect(sb.stream, died_at) {
            error!("{id}: handing over standby process {pid}: {e}");
            if let Some(r) = st.respawns.get(d).and_then(Option::as_ref) {
                r.current.kill();
            }
        }
    }

    /// Starts the standby process of device `d` (`restart_standby=on`) unless it has one, is
    /// gone, or is down (its restart starts one when it is done).
    fn start_standby(&self, st: &mut State, d: usize) {
        let Some(r) = st.respawns.get_mut(d).and_then(Option::as_mut) else {
            return;
        };
        if r.retired || !r.handle.wanted() || r.standby.is_some() {
            return;
        }
        if r.handle.is_down() {
            // A restart or takeover is under way: after it.
            st.standby_due
                .push((Instant::now() + STANDBY_AFTER_TAKEOVER, d));
            return;
        }
        let id = r.spec.id.clone();
        let started = match r.spawn(!r.alt_leaf) {
            Ok(s) => s,
            Err(e) => {
                r.standby_losses += 1;
                error!("{id}: starting its standby process: {}", chain(&e));
                self.standby_lost(st, d);
                return;
            }
        };
        let pidfd = match started.pidfd.try_clone() {
            Ok(p) => p,
            Err(e) => {
                error!("{id}: standby process {}: {e}", started.pid);
                super::kill_pidfd(&started.pidfd);
                return;
            }
        };
        let pid = started.pid;
        if let Err(e) = self.watch_locked(st, &id, pid, started.log, started.pidfd, None) {
            error!("{id}: watching standby process {pid}: {e}");
            super::kill_pidfd(&pidfd);
            return;
        }
        if let Some(e) = st.entries.last_mut() {
            e.standby_of = Some(d);
            e.standby = true;
        }
        if let Some(r) = st.respawns.get_mut(d).and_then(Option::as_mut) {
            info!("{id}: standby process {pid} started (restart_standby=on)");
            r.standby = Some(Standby {
                pid,
                pidfd,
                stream: started.stream,
                control: Arc::new(started.control),
            });
        }
    }

    /// Device `d`'s standby process ended or could not start: another one later, unless
    /// [`STANDBY_MAX_LOSSES`] were lost in a row (then the device restarts the usual way).
    fn standby_lost(&self, st: &mut State, d: usize) {
        let Some(r) = st.respawns.get_mut(d).and_then(Option::as_mut) else {
            return;
        };
        if r.retired || !r.handle.wanted() {
            return;
        }
        if r.standby_losses >= STANDBY_MAX_LOSSES {
            error!(
                "{}: {} standby processes in a row ended before they were needed; no more \
                 standby (a restart starts its process the usual way)",
                r.spec.id, r.standby_losses
            );
            return;
        }
        let wait = STANDBY_RETRY.saturating_mul(1 << r.standby_losses.min(8));
        st.standby_due.push((Instant::now() + wait, d));
    }

    /// The epoll timeout until the next restart or liveness probe is due (-1: none).
    fn next_due_ms(&self) -> i32 {
        let st = self.state.lock().expect("not poisoned");
        let now = Instant::now();
        let next = st
            .due
            .iter()
            .chain(&st.standby_due)
            .map(|(at, _)| *at)
            .min();
        next.map_or(-1, |at| {
            let ms = at
                .saturating_duration_since(now)
                .as_nanos()
                .div_ceil(1_000_000);
            i32::try_from(ms).unwrap_or(i32::MAX)
        })
    }

    /// Runs the restarts that are due.
    fn run_due(&self) {
        let mut st = self.state.lock().expect("not poisoned");
        let now = Instant::now();
        let (ready, later): (Vec<_>, Vec<_>) = st.due.drain(..).partition(|(at, _)| *at <= now);
        st.due = later;
        for (_, d) in ready {
            self.restart_now(&mut st, d);
        }
        let (ready, later): (Vec<_>, Vec<_>) =
            st.standby_due.drain(..).partition(|(at, _)| *at <= now);
        st.standby_due = later;
        for (_, d) in ready {
            self.start_standby(&mut st, d);
        }
    }

    /// One round of the liveness probe (its own thread, every [`LIVENESS_PERIOD`], so that a
    /// device slow to answer never delays the monitor's handling of a death): pings every
    /// restartable device's current process and standby on their control channels.
    fn probe_round(&self) {
        let mut st = self.state.lock().expect("not poisoned");
        {
            // The standby of a device that failed for good or was let go of is not needed.
            let unneeded: Vec<Standby> = st
                .respawns
                .iter_mut()
                .flatten()
                .filter(|r| r.retired || !r.handle.wanted())
                .filter_map(|r| r.standby.take())
                .collect();
            for sb in unneeded {
                retire_standby(&mut st, sb);
            }
            let probes: Vec<_> = st
                .respawns
                .iter()
                .enumerate()
                .filter_map(|(d, r)| Some((d, r.as_ref()?)))
                .filter(|(_, r)| !r.retired && r.handle.wanted() && !r.handle.is_down())
                .filter_map(|(d, r)| Some((d, r.spec.id.clone(), r.control.clone()?)))
                .collect();
            let standbys: Vec<_> = st
                .respawns
                .iter()
                .flatten()
                .filter_map(|r| {
                    let sb = r.standby.as_ref()?;
                    Some((r.spec.id.clone(), sb.pid, sb.control.clone()))
                })
                .collect();
            drop(st);
            let answers: Vec<(usize, bool)> = probes
                .into_iter()
                .map(|(d, id, control)| (d, probe(&id, &control)))
                .collect();
            let silent: Vec<u32> = standbys
                .into_iter()
                .filter(|(id, _, control)| !probe(id, control))
                .map(|(_, pid, _)| pid)
                .collect();
            for pid in silent {
                // A standby that does not answer could not take over: killed, and its end
                // starts another.
                warn!("standby process {pid} did not answer a liveness ping; killing it");
                self.kill(pid);
            }
            let mut st = self.state.lock().expect("not poisoned");
            for (d, answered) in answers {
                let Some(r) = st.respawns.get_mut(d).and_then(Option::as_mut) else {
                    continue;
                };
                r.missed_pings = if answered { 0 } else { r.missed_pings + 1 };
                if r.missed_pings >= LIVENESS_MISSES && !r.handle.is_down() {
                    r.missed_pings = 0;
                    r.handle.unresponsive(&format!(
                        "it did not answer its control channel {LIVENESS_MISSES} times in a row \
                         ({} s each: stopped or hung)",
                        super::control::DEFAULT_DEADLINE.as_secs()
                    ));
                }
            }
        }
    }

    /// Watches a device's queue error eventfds: a signalled one sets DEVICE_NEEDS_RESET.
    pub fn watch_queue_errors(
        &self,
        id: &str,
        watch: crate::virtio::QueueErrorWatch,
    ) -> std::io::Result<()> {
        let mut st = self.state.lock().expect("not poisoned");
        for (queue, fd) in watch.fds.into_iter().enumerate() {
            let index = st.queue_errors.len() as u64;
            self.add(fd.as_raw_fd(), TOKEN_QUEUE_ERROR | index)?;
            st.queue_errors.push(Some(QueueError {
                id: id.to_string(),
                fd,
                queue,
                handle: watch.handle.clone(),
            }));
        }
        Ok(())
    }

    /// Device `id` was removed (hot-unplug): it is not restarted, and what was kept for it
    /// (the files and control channel kept for a restart, its process's pidfd, its queue error
    /// eventfds) is closed, so plugging and unplugging devices does not pile up descriptors.
    pub fn forget_device(&self, id: &str) {
        let mut st = self.state.lock().expect("not poisoned");
        let mut gone = Vec::new();
        let mut standbys = Vec::new();
        for (d, slot) in st.respawns.iter_mut().enumerate() {
            if slot.as_ref().is_some_and(|r| r.spec.id == id) {
                if let Some(mut r) = slot.take() {
                    r.current.clear();
                    standbys.extend(r.standby.take());
                }
                gone.push(d);
            }
        }
        for sb in standbys {
            retire_standby(&mut st, sb);
        }
        st.due.retain(|(_, d)| !gone.contains(d));
        st.standby_due.retain(|(_, d)| !gone.contains(d));
        for e in &mut st.entries {
            if e.device.is_some_and(|d| gone.contains(&d)) {
                e.device = None;
            }
        }
        for slot in &mut st.queue_errors {
            if slot.as_ref().is_some_and(|q| q.id == id) {
                if let Some(q) = slot.take() {
                    self.remove(q.fd.as_raw_fd());
                }
            }
        }
    }

    /// How many queue error eventfds are watched (tests).
    #[cfg(test)]
    pub fn queue_errors_watched(&self) -> usize {
        let st = self.state.lock().expect("not poisoned");
        st.queue_errors.iter().flatten().count()
    }

    fn queue_error(&self, index: usize) {
        let st = self.state.lock().expect("not poisoned");
        let Some(q) = st.queue_errors.get(index).and_then(Option::as_ref) else {
            return;
        };
        let mut count = [0u8; 8];
        // SAFETY: read of an eventfd's 8-byte counter into a local buffer (non-blocking).
        let n = unsafe { libc::read(q.fd.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        if n == 8 && !q.handle.is_failed() {
            q.handle.queue_broken(q.queue);
        }
    }

    /// Calls `on_end` once when process `pid` ends (at once if it already has).
    pub fn on_end(&self, pid: u32, on_end: OnEnd) {
        let mut st = self.state.lock().expect("not poisoned");
        if let Some(e) = st.entries.iter_mut().find(|e| e.pid == pid) {
            if e.ended {
                on_end(&format!("device process {pid} ended"));
            } else {
                e.on_end = Some(on_end);
            }
        }
    }

    /// Starts the thread.
    pub fn start(self: &Arc<Self>) -> std::io::Result<()> {
        let me = self.clone();
        bulkhead_sandbox::thread_builder()
            .name("devices".into())
            .spawn(move || {
                if !crate::seccomp::apply_or_end_thread(crate::seccomp::ThreadKind::DeviceWatcher) {
                    return;
                }
                me.run();
            })?;
        // The liveness probe, under the same filter. It waits on a condition variable (futex,
        // in the common rules) rather than sleeping (no nanosleep in the filter).
        let me = Arc::downgrade(self);
        bulkhead_sandbox::thread_builder()
            .name("devices-probe".into())
            .spawn(move || {
                if !crate::seccomp::apply_or_end_thread(crate::seccomp::ThreadKind::DeviceWatcher) {
                    return;
                }
                let pause = (Mutex::new(()), Condvar::new());
                loop {
                    let guard = pause.0.lock().unwrap_or_else(|e| e.into_inner());
                    drop(pause.1.wait_timeout(guard, LIVENESS_PERIOD));
                    let Some(monitor) = me.upgrade() else {
                        return;
                    };
                    monitor.probe_round();
                }
            })
            .map(|_| ())
    }

    /// Waits until every watched process was reaped and its log pipe drained to its end (so
    /// that what a device says on its way out, its exit report, reaches the VMM's stderr), or
    /// `timeout`; true if all were.
    pub fn wait_all_reaped(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().expect("not poisoned");
        loop {
            let gone = st.spawner_gone;
            let done = st
                .entries
                .iter()
                .all(|e| (gone || e.reaped || e.ended) && e.log.is_none());
            if done {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .expect("not poisoned")
                .0;
        }
    }

    /// Waits until process `pid` ended and was reaped (or the spawner is gone), or
    /// `timeout`; true if it was (an unknown pid counts as ended). For a hot-unplugged device.
    pub fn wait_ended(&self, pid: u32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().expect("not poisoned");
        loop {
            let gone = st.spawner_gone;
            match st.entries.iter().find(|e| e.pid == pid) {
                Some(e) if !(gone || e.reaped || e.ended) => {}
                _ => return true,
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .expect("not poisoned")
                .0;
        }
    }

    /// SIGKILLs process `pid` through its pidfd unless it already ended (a hot-unplugged
    /// device that did not exit on its disconnect).
    pub fn kill(&self, pid: u32) {
        let st = self.state.lock().expect("not poisoned");
        if let Some(fd) = st
            .entries
            .iter()
            .find(|e| e.pid == pid && !e.ended)
            .and_then(|e| e.pidfd.as_ref())
        {
            super::kill_pidfd(fd);
        }
    }

    /// Waits until the spawner closed its report socket (it ended), or `timeout`.
    pub fn wait_spawner_gone(&self, timeout: Duration) -> bool {
        if self.events.is_none() {
            return true;
        }
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().expect("not poisoned");
        while !st.spawner_gone {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .expect("not poisoned")
                .0;
        }
        true
    }

    /// Whether the watched process `pid` has ended (`None`: not watched). For `vm.info`.
    pub fn process_ended(&self, pid: u32) -> Option<bool> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.entries
            .iter()
            .rev()
            .find(|e| e.pid == pid)
            .map(|e| e.ended || e.reaped)
    }

    fn run(&self) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 16];
        let mut stderr_buf = Vec::new();
        loop {
            // SAFETY: epoll_pwait into a local array of the length passed, no signal mask.
            let n = unsafe {
                libc::epoll_pwait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    self.next_due_ms(),
                    std::ptr::null(),
                )
            };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                error!(
                    "device monitor: epoll_wait: {}",
                    std::io::Error::last_os_error()
                );
                return;
            }
            self.run_due();
            for ev in &events[..n as usize] {
                let tok = ev.u64;
                if tok == TOKEN_EVENTS {
                    self.spawner_event();
                } else if tok & TOKEN_QUEUE_ERROR != 0 {
                    self.queue_error((tok & !TOKEN_QUEUE_ERROR) as usize);
                } else if tok & 1 == 1 {
                    self.ended((tok >> 1) as usize);
                } else {
                    self.read_log((tok >> 1) as usize, &mut stderr_buf);
                }
            }
            self.changed.notify_all();
        }
    }

    fn spawner_event(&self) {
        let mut st = self.state.lock().expect("not poisoned");
        let mut buf = [0u8; 128];
        let fd = self.events_fd();
        // SAFETY: recv into a local buffer from a descriptor this monitor owns.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n == 0 {
            if !st.spawner_gone {
                // Seen on the way out too, when the VMM's exit has already begun.
                debug!("the device spawner has exited");
            }
            st.spawner_gone = true;
            self.remove(fd);
            // No exit report will come: devices waiting for one are not restarted.
            let waiting: Vec<usize> = st
                .entries
                .iter()
                .filter(|e| e.ended && !e.reaped)
                .filter_map(|e| e.device)
                .collect();
            for d in waiting {
                if let Some(r) = st.respawns.get(d).and_then(Option::as_ref) {
                    if r.handle.wanted() {
                        r.handle
                            .give_up("its process ended and the device spawner is gone");
                    }
                }
            }
            return;
        }
        if n < 0 {
            return;
        }
        let Some(exit) = Exit::parse(&buf[..n as usize]) else {
            warn!("device monitor: unreadable spawner report");
            return;
        };
        let mut restart = None;
        let mut first_news = false;
        if let Some(e) = st.entries.iter_mut().find(|e| e.pid == exit.pid()) {
            // The report came before the pidfd said the process ended: the death is timed
            // from here (Monitor::ended does not time it again).
            first_news = !e.ended && !e.reaped;
            e.reaped = true;
            if e.standby {
                // A standby process: it never served the guest. One that was retired (killed
                // on purpose: its device went, or the VM stops) ends quietly.
                let line = format!(
                    "{}: standby process {} ended by {}",
                    e.id,
                    e.pid,
                    cause(exit)
                );
                if e.standby_of.is_none() || matches!(exit, Exit::Code(_, 0)) {
                    debug!("{line}");
                } else {
                    warn!("{line}");
                }
                return;
            }
            describe(
                &e.id,
                exit,
                Exit::seccomp_detail(&buf[..n as usize]),
                e.device.is_some(),
            );
            restart = e.device;
        }
        if let Some(d) = restart {
            if first_news {
                if let Some(r) = st.respawns.get_mut(d).and_then(Option::as_mut) {
                    if r.pid == exit.pid() {
                        r.died_at = Some(Instant::now());
                    }
                }
            }
            self.decide(&mut st, d, exit);
        }
    }

    fn events_fd(&self) -> RawFd {
        self.events.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    fn ended(&self, index: usize) {
        let mut st = self.state.lock().expect("not poisoned");
        let Some(e) = st.entries.get_mut(index) else {
            return;
        };
        if let Some(fd) = e.pidfd.take() {
            self.remove(fd.as_raw_fd());
        }
        if !e.ended {
            e.ended = true;
            debug!("{}: device process {} ended", e.id, e.pid);
            if let Some(f) = e.on_end.take() {
                f(&format!("device process {} ended", e.pid));
            }
            let (pid, reaped) = (e.pid, e.reaped);
            if let Some(d) = e.device {
                if let Some(r) = st.respawns.get_mut(d).and_then(Option::as_mut) {
                    // Down at once: no request goes to the dead socket; the restart decision
                    // waits for the spawner's report of how it ended. The death is timed by
                    // whichever of the two told first.
                    if !reaped {
                        r.died_at = Some(Instant::now());
                    }
                    r.handle.lost();
                    // With a standby and no backoff, the standby takes over now, and the
                    // report, when it comes, decides whether it stays (a seccomp kill without
                    // restart_on_violation=on ends it and fails the device): the spawner's
                    // wake-up is off the path to I/O resuming.
                    let policy = r.spec.policy.restart;
                    if !reaped
                        && r.pid == pid
                        && r.standby.is_some()
                        && !r.retired
                        && r.handle.wanted()
                        && policy.mode == super::restart::RestartMode::OnFailure
                        && r.restarts < policy.max
                        && policy.backoff_for(r.restarts).is_zero()
                    {
                        r.early = Some(pid);
                        warn!(
                            "{}: device process {pid} ended; its standby takes over at once \
                             (restart {} of {}), its exit report decides whether it stays",
                            r.spec.id,
                            r.restarts + 1,
                            policy.max
                        );
                        self.restart_now(&mut st, d);
                    }
                }
            } else if let Some(d) = e.standby_of {
                let pid = e.pid;
                if let Some(r) = st.respawns.get_mut(d).and_then(Option::as_mut) {
                    if r.standby.as_ref().is_some_and(|s| s.pid == pid) {
                        r.standby = None;
                        r.standby_losses += 1;
                        self.standby_lost(&mut st, d);
                    }
                }
            }
        }
    }

    fn read_log(&self, index: usize, out: &mut Vec<u8>) {
        let mut st = self.state.lock().expect("not poisoned");
        let Some(e) = st.entries.get_mut(index) else {
            return;
        };
        let Some(fd) = e.log.as_ref().map(|f| f.as_raw_fd()) else {
            return;
        };
        let mut buf = [0u8; 4096];
        // SAFETY: read into a local buffer from the non-blocking pipe this entry owns.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        out.clear();
        let now = Instant::now();
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock {
                return;
            }
            // The device closed its stderr (it exited): flush the partial line.
            if !e.line.is_empty() {
                let line = std::mem::take(&mut e.line);
                emit(e, &line, now, out);
            }
            self.remove(fd);
            e.log = None;
        } else {
            feed(e, &buf[..n as usize], now, out);
        }
        if !out.is_empty() {
            let _ = std::io::stderr().lock().write_all(out);
        }
    }
}

/// The wait before a device's first standby process starts (`restart_standby=on`), after its
/// first process: the VM's start comes first.
pub const STANDBY_FIRST_DELAY: Duration = Duration::from_millis(500);
/// The wait before a new standby process starts after one took over: the session's replay to
/// it comes first.
pub const STANDBY_AFTER_TAKEOVER: Duration = Duration::from_millis(250);
/// The wait before a standby process that ended is replaced, doubled with each one lost in a
/// row.
pub const STANDBY_RETRY: Duration = Duration::from_secs(1);
/// Standby processes lost in a row after which a device gets none.
pub const STANDBY_MAX_LOSSES: u32 = 5;

/// Ends a standby process that is not needed any more (its device was removed, its options
/// changed, or the VM is shutting down): its sockets are closed and it is killed; its entry
/// stays watched until it is reaped, and its end is not a loss.
fn retire_standby(st: &mut State, sb: Standby) {
    for e in st.entries.iter_mut().filter(|e| e.pid == sb.pid) {
        e.standby_of = None;
    }
    super::kill_pidfd(&sb.pidfd);
}

/// How often the monitor pings each restartable device's control channel.
pub const LIVENESS_PERIOD: Duration = Duration::from_secs(1);

/// Missed pings in a row after which a device process is declared hung.
pub const LIVENESS_MISSES: u32 = 2;

/// The liveness probe of one device: whether its process answered `ping` on its control
/// channel within the channel's deadline. A process that misses [`LIVENESS_MISSES`] in a row
/// (stopped, or hung) is killed, then restarted under its policy. A closed channel counts as
/// an answer: the process ended, which its pidfd says.
fn probe(id: &str, control: &super::control::ControlChannel) -> bool {
    use super::control::ControlError;
    match control.request("ping") {
        Err(ControlError::Send(e) | ControlError::Receive(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            warn!("{id}: its device process did not answer a liveness ping");
            false
        }
        Err(e) => {
            debug!("{id}: liveness probe: {e}");
            true
        }
        Ok(_) => true,
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

/// Splits what device `e` wrote into lines (cut at [`MAX_LINE`] bytes) and formats them.
fn feed(e: &mut Entry, bytes: &[u8], now: Instant, out: &mut Vec<u8>) {
    for &b in bytes {
        if b == b'\n' {
            let line = std::mem::take(&mut e.line);
            emit(e, &line, now, out);
        } else {
            e.line.push(b);
            if e.line.len() >= MAX_LINE {
                let line = std::mem::take(&mut e.line);
                emit(e, &line, now, out);
            }
        }
    }
}

/// Formats one line of device `e` into `out`, if its rate limit lets it through.
fn emit(e: &mut Entry, line: &[u8], now: Instant, out: &mut Vec<u8>) {
    if !e.limit.take(now) {
        return;
    }
    if e.limit.dropped > 0 {
        let _ = writeln!(
            out,
            "{}: {} log lines dropped (more than {LINES_PER_SEC}/s)",
            e.id, e.limit.dropped
        );
        e.limit.dropped = 0;
    }
    let _ = writeln!(out, "{}: {}", e.id, sanitize(line));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_description_seccomp_kill_names_the_syscall() {
        let report = b"exit 7 signal 31 audit syscall=426 arch=c00000b7";
        let exit = Exit::parse(report).expect("report");
        assert_eq!(
            description("disk0", exit, Exit::seccomp_detail(report)),
            "disk0: device process 7 was killed by signal 31 (seccomp): syscall io_uring_enter \
             (426); the VM goes on without it"
        );
        let report = b"exit 7 signal 31 noaudit none in the kernel log within 1500 ms";
        let exit = Exit::parse(report).expect("report");
        assert!(description("disk0", exit, Exit::seccomp_detail(report)).contains(
            "(seccomp): syscall unknown (no audit record: none in the kernel log within 1500 ms)"
        ));
        assert_eq!(
            description("disk0", Exit::Signal(7, 9), None),
            "disk0: device process 7 was killed by signal 9; the VM goes on without it"
        );
    }

    #[test]
    fn test_sanitize_removes_control_characters() {
        assert_eq!(sanitize(b"a\x1b[31mred\x07\r\x7f\tz"), "a[31mredz");
        assert_eq!(sanitize("x\u{9b}y".as_bytes()), "xy");
        assert_eq!(sanitize(b"\xffok"), "\u{fffd}ok");
    }

    fn entry() -> Entry {
        Entry {
            id: "disk0".into(),
            pid: 1,
            log: None,
            pidfd: None,
            line: Vec::new(),
            limit: RateLimit::new(Instant::now()),
            ended: false,
            reaped: false,
            on_end: None,
            device: None,
            standby_of: None,
            standby: false,
        }
    }

    #[test]
    fn test_feed_prefixes_splits_and_cuts_lines() {
        let mut e = entry();
        let mut out = Vec::new();
        let now = Instant::now();
        feed(&mut e, b"one\ntw", now, &mut out);
        assert_eq!(out, b"disk0: one\n");
        feed(&mut e, b"o\x1b[2J\n", now, &mut out);
        assert_eq!(out, b"disk0: one\ndisk0: two[2J\n");
        out.clear();
        feed(&mut e, &vec![b'x'; MAX_LINE + 3], now, &mut out);
        let text = String::from_utf8(out.clone()).expect("utf8");
        assert_eq!(
            text.lines().count(),
            1,
            "the cut part is out, the rest waits"
        );
        assert_eq!(text.len(), "disk0: \n".len() + MAX_LINE);
        assert_eq!(e.line.len(), 3);
    }

    #[test]
    fn test_feed_rate_limit_drops_and_counts() {
        let mut e = entry();
        let mut out = Vec::new();
        let now = Instant::now();
        let flood = "l\n".repeat(BURST as usize + 50);
        feed(&mut e, flood.as_bytes(), now, &mut out);
        assert_eq!(
            String::from_utf8_lossy(&out).lines().count(),
            BURST as usize
        );
        out.clear();
        feed(&mut e, b"late\n", now + Duration::from_secs(1), &mut out);
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.starts_with("disk0: 50 log lines dropped"), "{text}");
        assert!(text.ends_with("disk0: late\n"), "{text}");
    }

    #[test]
    fn test_rate_limit_burst_then_refill() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(t0);
        for _ in 0..BURST {
            assert!(r.take(t0));
        }
        assert!(!r.take(t0));
        assert_eq!(r.dropped, 1);
        assert!(r.take(t0 + Duration::from_millis(1000 / u64::from(LINES_PER_SEC) + 1)));
    }
}
