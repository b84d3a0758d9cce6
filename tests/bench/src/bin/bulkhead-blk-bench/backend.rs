//! The vhost-user-blk backend processes under test, started and stopped by the benchmark.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct BackendProcess {
    child: Child,
    log: PathBuf,
    /// bulkhead-block serves one frontend and exits when it disconnects; qemu-storage-daemon
    /// keeps serving until told to stop.
    exits_on_disconnect: bool,
}

impl BackendProcess {
    fn spawn(
        mut cmd: Command,
        log: &Path,
        exits_on_disconnect: bool,
        cpu: Option<usize>,
    ) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone().context("dup the log file")?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let cpus = cpu.map(crate::pin::cpu_set);
        // SAFETY: the closure runs in the child between fork and exec and only makes
        // async-signal-safe syscalls on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                // qemu-storage-daemon outlives its frontend: have it stopped with us.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(set) = &cpus {
                    if libc::sched_setaffinity(0, std::mem::size_of_val(set), set) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {:?}", cmd.get_program()))?;
        Ok(BackendProcess {
            child,
            log: log.to_owned(),
            exits_on_disconnect,
        })
    }

    /// `extra`: more options (`--poll-us N`, `--direct`).
    pub fn bulkhead_block(
        bin: &Path,
        image: &Path,
        socket: &Path,
        log: &Path,
        queue_size: u16,
        extra: &[String],
        cpu: Option<usize>,
    ) -> Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.arg("--socket-path")
            .arg(socket)
            .arg("--path")
            .arg(image)
            .args(["--num-queues", "1", "--queue-size"])
            .arg(queue_size.to_string())
            .args(extra);
        Self::spawn(cmd, log, true, cpu)
    }

    /// Cloud Hypervisor's `vhost_user_block`, as its documentation runs it, with its queue
    /// polling on (its default) or off.
    #[allow(clippy::too_many_arguments)]
    pub fn cloud_hypervisor(
        bin: &Path,
        image: &Path,
        socket: &Path,
        log: &Path,
        queue_size: u16,
        poll_queue: bool,
        direct: bool,
        cpu: Option<usize>,
    ) -> Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.arg("--block-backend").arg(format!(
            "path={},socket={},num_queues=1,queue_size={queue_size},direct={direct},\
             poll_queue={poll_queue}",
            image.display(),
            socket.display(),
        ));
        // It goes back to listening when its frontend leaves; it is stopped like qsd.
        Self::spawn(cmd, log, false, cpu)
    }

    pub fn qemu_storage_daemon(
        bin: &Path,
        image: &Path,
        socket: &Path,
        log: &Path,
        direct: bool,
        cpu: Option<usize>,
    ) -> Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,filename={},cache.direct={},aio=io_uring",
                image.display(),
                if direct { "on" } else { "off" }
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on",
                socket.display()
            ));
        Self::spawn(cmd, log, false, cpu)
    }

    /// Wait until the backend's socket exists (or the backend died).
    pub fn wait_for_socket(&mut self, socket: &Path, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while !socket.exists() {
            if let Some(status) = self.child.try_wait().context("wait for the backend")? {
                bail!(
                    "backend exited ({status}) before listening:\n{}",
                    self.log_tail()
                );
            }
            if start.elapsed() > timeout {
                bail!(
                    "no socket at {} after {timeout:?}:\n{}",
                    socket.display(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// User + system CPU time of all the backend's threads so far.
    pub fn cpu_time(&self) -> Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .context("read the backend's /proc/PID/stat")?;
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields
            .get(11..13)
            .context("short /proc/PID/stat")?
            .iter()
            .map(|f| f.parse::<u64>().unwrap_or(0))
            .sum();
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
    }

    /// Move every thread of the backend to `cpu` (or let them run anywhere). Threads that
    /// cannot be moved (io_uring's io-wq workers) are left where they are.
    pub fn pin(&self, cpu: Option<usize>) {
        let set = match cpu {
            Some(c) => crate::pin::cpu_set(c),
            None => crate::pin::all_cpus(),
        };
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.child.id())) else {
            return;
        };
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<i32>().ok())
            else {
                continue;
            };
            // SAFETY: `set` is a valid cpu_set_t of the size passed; a failure is ignored.
            unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(20);
        lines[from..].join("\n")
    }

    /// After the frontend disconnected: wait for bulkhead-block to exit on its own, stop
    /// qemu-storage-daemon. Returns a remark if something was off.
    pub fn finish(mut self) -> Option<String> {
        if !self.exits_on_disconnect {
            // SAFETY: kill() on our own child's pid, which we have not reaped yet.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        }
        match self.wait_timeout(Duration::from_secs(5)) {
            Some(status) if status.success() || !self.exits_on_disconnect => None,
            Some(status) => Some(format!(
                "exited with {status} after the frontend disconnected:\n{}",
                self.log_tail()
            )),
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Some("did not exit within 5 s of the frontend disconnecting; killed".into())
            }
        }
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if start.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => return None,
            }
        }
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// User + system CPU time of this process so far.
pub fn own_cpu_time() -> Duration {
    // SAFETY: all-zero is a valid rusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid rusage to write into.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
