//! Restarting a device process that died: the policy (`restart=`, `restart_max=`,
//! `restart_backoff_ms=`, `restart_on_violation=` on `--disk` and `--net`), and what the device
//! monitor keeps to start the same device again ([`Respawn`]). See `docs/restart.md`.
//!
//! The monitor sees a device process end at once (its pidfd); the device is then *down*: its
//! socket is shut down, no vhost-user request is sent, the guest's jobs are only recorded. When
//! the spawner's exit report says how it ended, [`RestartPolicy::decide`] says whether it comes
//! back; if so, after the backoff the monitor starts the same program in the same jail with the
//! same files (the VMM kept duplicates of them) and hands the new socket to the device's worker
//! thread, which replays the vhost-user session from the VMM's own state
//! (`virtio::vhost_user`, `Job::Reconnect`). If not, the device fails for good: the guest sees
//! DEVICE_NEEDS_RESET and a configuration interrupt.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::spawner::{Exit, Spawner};
use super::{DeviceError, DeviceSpec, SpawnEnv, StartedProcess};
use crate::virtio::RestartHandle;

/// Restarts allowed by default over the VM's life, per device.
pub const DEFAULT_RESTART_MAX: u32 = 10;
/// The default wait before the first restart; it doubles with each restart.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(10);
/// The longest wait before a restart, however many came before.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Most restarts a device may be allowed.
pub const RESTART_MAX_LIMIT: u32 = 1_000_000;
/// Largest `restart_backoff_ms`.
pub const BACKOFF_MS_LIMIT: u64 = 60_000;

/// Whether a device process that died is started again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartMode {
    /// `restart=on-failure` (the default): whenever it ends without the VMM asking, within
    /// the limit.
    OnFailure,
    /// `restart=never`: the device fails for good when its process ends.
    Never,
}

/// A device's restart policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// `restart=`.
    pub mode: RestartMode,
    /// `restart_max=`: restarts allowed over the VM's life.
    pub max: u32,
    /// `restart_backoff_ms=`: the wait before the first restart, doubled for each further one
    /// (at most [`MAX_BACKOFF`]).
    pub backoff: Duration,
    /// `restart_on_violation=on`: a process its seccomp filter killed is restarted too.
    pub on_violation: bool,
    /// `restart_standby=on`: a second process of the device is started ahead of need and
    /// waits, jailed, for the current one to die ([`Standby`]).
    pub standby: bool,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            mode: RestartMode::OnFailure,
            max: DEFAULT_RESTART_MAX,
            backoff: DEFAULT_BACKOFF,
            on_violation: false,
            standby: false,
        }
    }
}

/// What to do about a device process that ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Start it again after this wait.
    Restart(Duration),
    /// Leave the device failed, for this reason.
    GiveUp(String),
}

/// The options of `--disk` and `--net` this module reads.
pub const OPTIONS: [&str; 5] = [
    "restart",
    "restart_max",
    "restart_backoff_ms",
    "restart_on_violation",
    "restart_standby",
];

impl RestartPolicy {
    /// Reads `restart=`, `restart_max=`, `restart_backoff_ms=`, `restart_on_violation=` and
    /// `restart_standby=` through `get`; the error is the reason, for the flag's message.
    pub fn parse<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<Self, String> {
        let mut p = RestartPolicy::default();
        match get("restart") {
            None | Some("on-failure") => {}
            Some("never") => p.mode = RestartMode::Never,
            Some(v) => return Err(format!("restart={v:?}: expected on-failure or never")),
        }
        if let Some(v) = get("restart_max") {
            p.max = v
                .parse::<u32>()
                .ok()
                .filter(|n| *n <= RESTART_MAX_LIMIT)
                .ok_or_else(|| {
                    format!("restart_max={v:?}: expected a number from 0 to {RESTART_MAX_LIMIT}")
                })?;
        }
        if let Some(v) = get("restart_backoff_ms") {
            let ms = v
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= BACKOFF_MS_LIMIT)
                .ok_or_else(|| {
                    format!(
                        "restart_backoff_ms={v:?}: expected milliseconds from 0 to {BACKOFF_MS_LIMIT}"
                    )
                })?;
            p.backoff = Duration::from_millis(ms);
        }
        match get("restart_on_violation") {
            None | Some("off") => {}
            Some("on") => p.on_violation = true,
            Some(v) => return Err(format!("restart_on_violation={v:?}: expected on or off")),
        }
        match get("restart_standby") {
            None | Some("off") => {}
            Some("on") => p.standby = true,
            Some(v) => return Err(format!("restart_standby={v:?}: expected on or off")),
        }
        if p.mode == RestartMode::Never
            && (get("restart_max").is_some()
                || get("restart_backoff_ms").is_some()
                || p.on_violation
                || p.standby)
        {
            return Err(
                "restart=never takes no restart_max, restart_backoff_ms, restart_on_violation or \
                 restart_standby"
                    .into(),
            );
        }
        Ok(p)
    }

    /// Whether a process that ended as `exit` comes back, `done` restarts having been made
    /// already.
    pub fn decide(&self, done: u32, exit: Exit) -> Decision {
        if self.mode == RestartMode::Never {
            return Decision::GiveUp("restart=never".into());
        }
        if matches!(exit, Exit::Signal(_, sig) if sig == libc::SIGSYS) && !self.on_violation {
            return Decision::GiveUp(
                "its seccomp filter killed it: it tried what its jail forbids, which is what a \
                 compromised device does; not restarted (restart_on_violation=on opts in)"
                    .into(),
            );
        }
        if done >= self.max {
            return Decision::GiveUp(format!(
                "it was restarted {done} time(s) already (restart_max={})",
                self.max
            ));
        }
        Decision::Restart(self.backoff_for(done))
    }

    /// The wait before restart number `done + 1`: `backoff * 2^done`, at most [`MAX_BACKOFF`].
    pub fn backoff_for(&self, done: u32) -> Duration {
        let factor = 1u32.checked_shl(done.min(31)).unwrap_or(u32::MAX);
        self.backoff.saturating_mul(factor).min(MAX_BACKOFF)
    }
}

/// What `vm.info` and `vm.counters` show of a restartable device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestartInfo {
    /// The device.
    pub id: String,
    /// Its current (or last) process.
    pub pid: u32,
    /// Restarts made.
    pub restarts: u32,
    /// How its last process that died ended.
    pub last_cause: Option<String>,
    /// Its standby process (`restart_standby=on`), if one is waiting.
    pub standby_pid: Option<u32>,
}

/// Bytes of the inflight region of `num_queues` queues of `queue_size` entries: the
/// split-ring layout of the vhost-user specification, each queue's part (a 16-byte header and
/// 16 bytes per descriptor) aligned to 64 bytes (as `bulkhead_device_runtime::inflight`, which
/// the VMM does not link).
pub fn inflight_region_size(num_queues: u16, queue_size: u16) -> u64 {
    u64::from(num_queues) * (16 + 16 * u64::from(queue_size)).div_ceil(64) * 64
}

/// For a restartable block device: a memfd for its inflight region (VHOST_USER_GET_INFLIGHT_FD
/// lays it out; a device's jail cannot create one, so the VMM does), handed to the process as
/// its next descriptor with `--inflight-fd N`, and kept with its other files for the next
/// process. Called before the VMM's filter (memfd_create); devices added later have none and
/// do not offer inflight tracking.
pub fn add_inflight_region(spec: &mut DeviceSpec, files: &mut Vec<File>) -> std::io::Result<()> {
    use super::{Backend, DeviceKind, FIRST_KIND_FD};
    if spec.kind != DeviceKind::Block || spec.policy.restart.mode != RestartMode::OnFailure {
        return Ok(());
    }
    let Backend::Spawn { args, .. } = &mut spec.backend else {
        return Ok(());
    };
    // SAFETY: memfd_create with a static name; the result is checked and owned below.
    let fd = unsafe { libc::memfd_create(c"bulkhead-inflight".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    let file = File::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    file.set_len(inflight_region_size(spec.queues, spec.queue_size))?;
    let number = FIRST_KIND_FD + files.len() as i32;
    args.extend(["--inflight-fd".to_string(), number.to_string()]);
    files.push(file);
    Ok(())
}

/// How a process ended, in words, for the restart log line.
pub fn cause(exit: Exit) -> String {
    match exit {
        Exit::Signal(_, sig) if sig == libc::SIGSYS => "seccomp kill (signal 31)".into(),
        Exit::Signal(_, sig) if sig == libc::SIGKILL => {
            "signal 9 (SIGKILL, or the OOM killer)".into()
        }
        Exit::Signal(_, sig) => format!("signal {sig}"),
        Exit::Code(_, code) => format!("exit status {code}"),
    }
}

/// The pidfd of a device's current process, shared by the monitor (which replaces it at each
/// restart) and the device's kill hook (a device that misses a deadline or breaks the protocol
/// is killed, then restarted).
#[derive(Clone, Debug, Default)]
pub struct CurrentProcess(Arc<Mutex<Option<OwnedFd>>>);

impl CurrentProcess {
    /// Records the new process's pidfd.
    pub fn set(&self, pidfd: OwnedFd) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(pidfd);
    }

    /// Closes the pidfd (the device was removed).
    pub fn clear(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// SIGKILLs the current process (a process already gone is no error).
    pub fn kill(&self) {
        if let Some(fd) = &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            super::kill_pidfd(fd);
        }
    }
}

/// Everything the monitor needs to start a device's process again: its spec and program,
/// duplicates of its files (the image with its lock, the tap queues), where to spawn it, and
/// the handle that hands the new connection to the device's transport.
pub struct Respawn {
    /// The device.
    pub spec: DeviceSpec,
    /// Its program, resolved once at start (the monitor's filter reads no directory).
    pub program: PathBuf,
    /// Duplicates of the files handed to the first process, handed again to each new one.
    pub files: Vec<File>,
    /// The spawner.
    pub spawner: Arc<Spawner>,
    /// The VM's cgroup group.
    pub cgroup: Option<PathBuf>,
    /// Host ids of device processes.
    pub device_ids: Option<(u32, u32)>,
    /// Bytes of guest RAM.
    pub ram_size: u64,
    /// The transport's side.
    pub handle: RestartHandle,
    /// The current process, for the kill hook.
    pub current: CurrentProcess,
    /// The current process.
    pub pid: u32,
    /// Restarts made so far.
    pub restarts: u32,
    /// When the process that is being replaced was seen to end.
    pub died_at: Option<Instant>,
    /// How the last one ended.
    pub last_cause: Option<String>,
    /// No more restarts (the VM is shutting down).
    pub retired: bool,
    /// Liveness pings missed in a row.
    pub missed_pings: u32,
    /// The control channel of the current process (the first one's is also in
    /// `Devices::processes`); the monitor's liveness probe pings it.
    pub control: Option<Arc<super::control::ControlChannel>>,
    /// With `restart_standby=on`: the process waiting to take over.
    pub standby: Option<Standby>,
    /// The current process runs in the device's second cgroup leaf ([`Respawn::leaf`]).
    pub alt_leaf: bool,
    /// Standby processes that ended before they were needed, in a row.
    pub standby_losses: u32,
    /// The process whose death its standby took over before the spawner's exit report said
    /// how it ended (no backoff to wait for): the report still decides whether the device
    /// stays up.
    pub early: Option<u32>,
}

/// A device's next process, started ahead of need (`restart_standby=on`): spawned like a
/// restart (the same program, options, jail, limits and files, so it holds nothing a restarted
/// process would not), it has answered nothing yet and waits on its vhost-user socket. When
/// the current process dies, the monitor hands this one's socket to the device's worker,
/// which replays the session: the spawn (fork, namespaces, exec, the device's own start-up)
/// is off the path from the death to I/O resuming. Its cgroup leaf is the device's other one
/// (`<id>` and `<id>.standby` take turns), since the current process still holds its own.
#[derive(Debug)]
pub struct Standby {
    /// Its pid.
    pub pid: u32,
    /// A pidfd of it (the monitor watches another).
    pub pidfd: OwnedFd,
    /// The VMM's end of its vhost-user socket.
    pub stream: std::os::unix::net::UnixStream,
    /// The VMM's end of its control channel.
    pub control: Arc<super::control::ControlChannel>,
}

impl std::fmt::Debug for Respawn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Respawn")
            .field("id", &self.spec.id)
            .field("restarts", &self.restarts)
            .field("last_cause", &self.last_cause)
            .finish_non_exhaustive()
    }
}

impl Respawn {
    /// The cgroup leaf name of the current process (`alt == false`) or of the other one.
    pub fn leaf(&self, alt: bool) -> String {
        if alt {
            format!("{}.standby", self.spec.id)
        } else {
            self.spec.id.clone()
        }
    }

    /// Starts the device's process again with duplicates of its files, in cgroup leaf
    /// [`Respawn::leaf`]`(alt)`.
    pub fn spawn(&self, alt: bool) -> Result<StartedProcess, DeviceError> {
        let files = self
            .files
            .iter()
            .map(|f| f.as_fd().try_clone_to_owned().map(File::from))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| DeviceError::Descriptors(self.spec.id.clone(), e))?;
        let leaf = self.leaf(alt);
        let env = SpawnEnv {
            spawner: &self.spawner,
            cgroup: self.cgroup.as_deref(),
            cgroup_leaf: Some(&leaf),
            device_ids: self.device_ids,
            ram_size: self.ram_size,
        };
        super::spawn_program(&self.spec, &self.program, files, &env)
    }

    /// The raw descriptors the VMM keeps for the device (for tests and logs).
    pub fn kept_fds(&self) -> Vec<i32> {
        self.files.iter().map(|f| f.as_raw_fd()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::tests::{disk0_spec, TestEnv};
    use crate::device::{DeviceEnv, Devices};
    use vm_memory::GuestMemoryMmap;

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out: {what}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn comm(pid: u32) -> String {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// 1 MiB of memfd-backed guest memory at 2 GiB, as the device tests give their devices.
    fn guest_memory() -> GuestMemoryMmap {
        let file = std::fs::File::from(crate::virtio::fake_backend::memfd(1 << 20));
        GuestMemoryMmap::from_ranges_with_files([(
            vm_memory::GuestAddress(0x8000_0000),
            1 << 20,
            Some(vm_memory::FileOffset::new(file, 0)),
        )])
        .expect("memory")
    }

    /// What the block restart tests share: a 1 MiB image, an unjailed spawner, 1 MiB of
    /// guest memory, and a `disk0` spec with `restart` as its policy; `None` (the test is
    /// skipped) without a built `bulkhead-block`.
    struct BlockFixture {
        image: std::path::PathBuf,
        test_env: TestEnv,
        spec: DeviceSpec,
    }

    impl BlockFixture {
        fn new(tag: &str, restart: RestartPolicy) -> Option<Self> {
            let dir = crate::device::tests::built_programs("bulkhead-block")?;
            std::env::set_var("PATH", &dir);
            let image =
                std::env::temp_dir().join(format!("bulkhead-{tag}-{}.img", std::process::id()));
            std::fs::File::create(&image)
                .and_then(|f| f.set_len(1 << 20))
                .expect("image");
            let mut spec = disk0_spec(&image, "");
            spec.policy.restart = restart;
            Some(Self {
                image,
                test_env: TestEnv::new(guest_memory()),
                spec,
            })
        }

        fn env(&self) -> DeviceEnv<'_> {
            self.test_env.env()
        }
    }

    /// The real block device process, unjailed (a debug build cannot run in the jail's empty
    /// root): SIGKILLed, it is restarted at once with the same image (the VMM's duplicate,
    /// which keeps the lock), the transport never fails, the new process answers on its
    /// control channel; stopped (SIGSTOP), the liveness probe has it killed and restarted;
    /// with restart_max=2 the third death (`fault crash` through the control
    /// channel) fails the device for good. Skipped without a built `bulkhead-block`.
    #[test]
    fn test_restart_block_process_sigkill_restarted_then_limit() {
        let Some(f) = BlockFixture::new(
            "restart",
            RestartPolicy {
                max: 2,
                backoff: Duration::ZERO,
                ..RestartPolicy::default()
            },
        ) else {
            return;
        };
        let (env, spec, image) = (f.env(), f.spec.clone(), f.image.clone());
        let (devices, transports) =
            Devices::start(std::slice::from_ref(&spec), &env).expect("start");
        let failure = transports[0].1.failure_handle();
        let first = devices.processes[0].pid;
        assert_eq!(comm(first), "bulkhead-block");
        let killed = Instant::now();
        // SAFETY: kill(2) of our own child's child, by pid.
        unsafe { libc::kill(first as i32, libc::SIGKILL) };
        wait_until("a restart", || devices.restarts()[0].restarts == 1);
        let info = devices.restarts()[0].clone();
        wait_until("the new process", || comm(info.pid) == "bulkhead-block");
        println!(
            "restarted as pid {} {:?} after the kill ({:?})",
            info.pid,
            killed.elapsed(),
            info.last_cause
        );
        assert_ne!(info.pid, first);
        assert!(info.last_cause.unwrap_or_default().contains("signal 9"));
        std::thread::sleep(Duration::from_millis(200));
        assert!(!failure.is_failed(), "the device failed on a restart");
        // The new process's control channel is the VMM's now.
        let pong = devices.control_request("disk0", "ping").expect("device");
        assert_eq!(pong.expect("ping"), "pong");
        // A stopped process answers nothing: the liveness probe kills it, it is restarted.
        let stopped = Instant::now();
        // SAFETY: kill(2) by pid.
        unsafe { libc::kill(info.pid as i32, libc::SIGSTOP) };
        wait_until("the stopped process replaced", || {
            devices.restarts()[0].restarts == 2
        });
        let info = devices.restarts()[0].clone();
        wait_until("the third process", || comm(info.pid) == "bulkhead-block");
        println!(
            "a stopped process was replaced {:?} after SIGSTOP",
            stopped.elapsed()
        );
        assert!(!failure.is_failed());
        // The limit: the second death (a crash injected through the control channel) is not
        // restarted; the device fails for good.
        let crash = devices
            .control_request("disk0", "fault crash")
            .expect("device");
        assert_eq!(crash.expect("fault crash"), "crashing");
        wait_until("the device failed", || failure.is_failed());
        assert_eq!(devices.restarts()[0].restarts, 2);
        assert!(devices.restarts()[0]
            .last_cause
            .clone()
            .unwrap_or_default()
            .contains("signal 6"));
        drop(transports);
        devices.shutdown(Duration::from_secs(3));
        let _ = std::fs::remove_file(&image);
    }

    /// `restart_standby=on` with the real block device process, unjailed: a standby process
    /// starts after the first one and waits; SIGKILL of the current process hands the device
    /// to the standby (the same pid becomes the current one, no new spawn), which answers on
    /// its control channel, and a new standby follows; a standby that dies is replaced without
    /// a restart of the device; a SIGSYS death is taken over at once (no backoff) and then,
    /// the exit report naming a seccomp kill, the device fails and no process of it is left.
    /// Skipped without a built `bulkhead-block`.
    #[test]
    fn test_restart_standby_takes_over_and_is_replaced() {
        let policy =
            parse("restart_max=5,restart_backoff_ms=0,restart_standby=on").expect("policy");
        let Some(f) = BlockFixture::new("standby", policy) else {
            return;
        };
        let (env, spec, image) = (f.env(), f.spec.clone(), f.image.clone());
        let (devices, transports) =
            Devices::start(std::slice::from_ref(&spec), &env).expect("start");
        let failure = transports[0].1.failure_handle();
        let first = devices.processes[0].pid;
        let standby = |devices: &Devices| devices.restarts()[0].standby_pid;
        wait_until("a standby process", || standby(&devices).is_some());
        let sb = standby(&devices).expect("standby");
        assert_ne!(sb, first);
        wait_until("the standby's program", || comm(sb) == "bulkhead-block");

        // SAFETY: kill(2) of our own child's child, by pid.
        unsafe { libc::kill(first as i32, libc::SIGKILL) };
        wait_until("a restart", || devices.restarts()[0].restarts == 1);
        let info = devices.restarts()[0].clone();
        assert_eq!(info.pid, sb, "the standby process took over");
        assert!(!failure.is_failed(), "the device failed on a takeover");
        let pong = devices.control_request("disk0", "ping").expect("device");
        assert_eq!(pong.expect("ping"), "pong");
        wait_until("a new standby", || {
            standby(&devices).is_some_and(|p| p != sb && comm(p) == "bulkhead-block")
        });

        // A standby that dies is replaced; the device is not restarted for it.
        let sb2 = standby(&devices).expect("standby");
        // SAFETY: kill(2) by pid.
        unsafe { libc::kill(sb2 as i32, libc::SIGKILL) };
        wait_until("the lost standby replaced", || {
            standby(&devices).is_some_and(|p| p != sb2)
        });
        assert_eq!(devices.restarts()[0].restarts, 1);
        assert_eq!(devices.restarts()[0].pid, sb);
        assert!(!failure.is_failed());
        let sb3 = standby(&devices).expect("standby");
        wait_until("the standby's program", || comm(sb3) == "bulkhead-block");

        // SIGSYS, as a seccomp kill ends a process: with no backoff the standby takes over at
        // once, before the exit report; the report says the policy does not restart a seccomp
        // kill, so the process that took over is ended too and the device fails for good.
        // SAFETY: kill(2) by pid.
        unsafe { libc::kill(sb as i32, libc::SIGSYS) };
        wait_until("the device failed", || failure.is_failed());
        assert_eq!(
            devices.restarts()[0].restarts,
            2,
            "the early takeover counted"
        );
        wait_until("the process that took over ended", || comm(sb3).is_empty());
        let cause = devices.restarts()[0].last_cause.clone().unwrap_or_default();
        assert!(cause.contains("seccomp"), "{cause}");
        assert_eq!(devices.restarts()[0].standby_pid, None);

        drop(transports);
        devices.shutdown(Duration::from_secs(3));
        let _ = std::fs::remove_file(&image);
    }

    fn parse(s: &str) -> Result<RestartPolicy, String> {
        let pairs: Vec<(&str, &str)> = s
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|kv| kv.split_once('=').expect("k=v"))
            .collect();
        RestartPolicy::parse(|k| pairs.iter().find(|(key, _)| *key == k).map(|(_, v)| *v))
    }

    /// The real net device process on a real tap, unjailed, with `restart_standby=on`:
    /// SIGKILLed, its standby process (started with the VMM's duplicates of the tap queues)
    /// takes over; the tap survives, with its MTU, and the process answers on its control
    /// channel. Skipped without a built `bulkhead-net` or CAP_NET_ADMIN.
    #[test]
    fn test_restart_net_process_sigkill_restarted_on_same_tap() {
        use crate::config::{NetBackend, NetConfig};
        let Some(dir) = crate::device::tests::built_programs("bulkhead-net") else {
            return;
        };
        let name = format!("bhrs{}", std::process::id() % 100_000);
        if let Err(e) = crate::tap::open_queues(&name, 1) {
            eprintln!("skipped: {e}");
            return;
        }
        std::env::set_var("PATH", &dir);
        let fixture = TestEnv::new(guest_memory());
        let env = fixture.env();
        let net = NetConfig {
            backend: NetBackend::Tap {
                name: name.clone(),
                addr: None,
            },
            mac: [0x52, 0x54, 0, 1, 2, 4],
            mtu: Some(1400),
            num_queues: 2,
            queue_size: 256,
            id: None,
            rx_limit: vec![],
            tx_limit: vec![],
            restart: RestartPolicy {
                backoff: Duration::ZERO,
                standby: true,
                ..RestartPolicy::default()
            },
            fault: None,
        };
        let spec = super::super::net_spec(&net, 0, 0, false);
        let (devices, transports) =
            Devices::start(std::slice::from_ref(&spec), &env).expect("start");
        let failure = transports[0].1.failure_handle();
        let first = devices.processes[0].pid;
        // restart_standby=on: a second process waits with duplicates of the tap queues.
        wait_until("a standby process", || {
            devices.restarts()[0]
                .standby_pid
                .is_some_and(|p| comm(p) == "bulkhead-net")
        });
        let standby = devices.restarts()[0].standby_pid.expect("standby");
        // SAFETY: kill(2) by pid.
        unsafe { libc::kill(first as i32, libc::SIGKILL) };
        wait_until("a restart", || devices.restarts()[0].restarts == 1);
        let info = devices.restarts()[0].clone();
        assert_eq!(info.pid, standby, "the standby process took over");
        let stats = devices.control_request("net0", "stats").expect("device");
        assert!(stats.expect("stats").contains("rx_packets="));
        let tap = std::fs::read_to_string(format!("/proc/{}/fdinfo/5", info.pid)).expect("fd 5");
        assert!(tap.contains(&format!("iff:\t{name}")), "{tap}");
        let mtu = std::fs::read_to_string(format!("/sys/class/net/{name}/mtu")).expect("mtu");
        assert_eq!(mtu.trim(), "1400", "the tap and its host side survived");
        std::thread::sleep(Duration::from_millis(200));
        assert!(!failure.is_failed());
        drop(transports);
        devices.shutdown(Duration::from_secs(3));
    }

    #[test]
    fn test_restart_policy_parse_defaults_and_options() {
        assert_eq!(parse("").expect("default"), RestartPolicy::default());
        let p =
            parse("restart=on-failure,restart_max=3,restart_backoff_ms=0,restart_on_violation=on")
                .expect("valid");
        assert_eq!(
            p,
            RestartPolicy {
                mode: RestartMode::OnFailure,
                max: 3,
                backoff: Duration::ZERO,
                on_violation: true,
                standby: false,
            }
        );
        assert!(parse("restart_standby=on").expect("standby").standby);
        assert!(!parse("restart_standby=off").expect("no standby").standby);
        assert_eq!(
            parse("restart=never").expect("never").mode,
            RestartMode::Never
        );
        for bad in [
            "restart=always",
            "restart_max=-1",
            "restart_max=x",
            "restart_backoff_ms=600000",
            "restart_on_violation=yes",
            "restart=never,restart_max=3",
            "restart_standby=yes",
            "restart=never,restart_standby=on",
        ] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn test_restart_policy_decide_limit_violation_never() {
        let p = RestartPolicy {
            max: 2,
            ..RestartPolicy::default()
        };
        let kill = Exit::Signal(7, libc::SIGKILL);
        assert_eq!(p.decide(0, kill), Decision::Restart(DEFAULT_BACKOFF));
        assert_eq!(p.decide(1, kill), Decision::Restart(2 * DEFAULT_BACKOFF));
        assert!(matches!(p.decide(2, kill), Decision::GiveUp(r) if r.contains("restart_max=2")));
        assert!(matches!(
            p.decide(0, Exit::Code(7, 1)),
            Decision::Restart(_)
        ));
        let sys = Exit::Signal(7, libc::SIGSYS);
        assert!(matches!(p.decide(0, sys), Decision::GiveUp(r) if r.contains("seccomp")));
        let opted = RestartPolicy {
            on_violation: true,
            ..p
        };
        assert!(matches!(opted.decide(0, sys), Decision::Restart(_)));
        let never = RestartPolicy {
            mode: RestartMode::Never,
            ..p
        };
        assert!(matches!(never.decide(0, kill), Decision::GiveUp(_)));
    }

    #[test]
    fn test_restart_policy_backoff_doubles_and_is_capped() {
        let p = RestartPolicy::default();
        assert_eq!(p.backoff_for(0), Duration::from_millis(10));
        assert_eq!(p.backoff_for(3), Duration::from_millis(80));
        assert_eq!(p.backoff_for(40), MAX_BACKOFF);
        let zero = RestartPolicy {
            backoff: Duration::ZERO,
            ..p
        };
        assert_eq!(zero.backoff_for(30), Duration::ZERO);
    }
}
