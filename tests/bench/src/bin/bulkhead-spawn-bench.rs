//! `bulkhead-spawn-bench`: how long a device process takes from spawn until it answers its
//! first vhost-user message, and how much memory it holds then, jailed (as the VMM starts it)
//! and not jailed (`--sandbox off`). Prints figures; asserts nothing. Needs user namespaces
//! (run it where the VMM runs: the nested suite `bench` does).

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// Spawns one device process, handshakes, returns (microseconds to the first reply, RSS KiB).
fn one(program: &PathBuf, image: &PathBuf, jailed: bool) -> Result<(u128, u64)> {
    let t0 = Instant::now();
    let (ours, theirs) = UnixStream::pair()?;
    let base = [
        "--path".to_string(),
        image.display().to_string(),
        "--num-queues".into(),
        "1".into(),
    ];
    let (pid, mut waiter): (u32, Box<dyn FnMut() -> Result<()>>) = if jailed {
        let img = std::fs::File::options()
            .read(true)
            .write(true)
            .open(image)?;
        let log = std::io::stderr().as_fd().try_clone_to_owned().ok();
        let jail = bulkhead_block::jail::jail(
            bulkhead_block::jail::JailFds {
                socket: theirs.into(),
                image: img.into(),
                log,
            },
            1,
        );
        let mut args: Vec<String> = bulkhead_block::jail::jail_args().into();
        args.extend(base);
        let mut child = jail.spawn(program, &args).context("jailed spawn")?;
        (
            child.id(),
            Box::new(move || child.wait().map(|_| ()).map_err(Into::into)),
        )
    } else {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
        let mut cmd = Command::new(program);
        cmd.args(["--socket-fd", "3"])
            .args(&base)
            .args(["--seccomp", "off"]);
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        // SAFETY: only dup2 between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("spawn")?;
        drop(theirs);
        (
            child.id(),
            Box::new(move || child.wait().map(|_| ()).map_err(Into::into)),
        )
    };
    let mut frontend = Frontend::from_stream(ours, 1);
    frontend.set_owner().context("SET_OWNER")?;
    frontend.get_features().context("GET_FEATURES")?;
    let first_reply = t0.elapsed().as_micros();
    frontend
        .get_protocol_features()
        .context("GET_PROTOCOL_FEATURES")?;
    let rss = rss_kib(pid);
    drop(frontend);
    waiter()?;
    Ok((first_reply, rss))
}

fn median(mut v: Vec<u128>) -> u128 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut program = std::env::current_exe()?
        .parent()
        .map(|d| d.join("bulkhead-block"))
        .context("no directory")?;
    let mut runs = 10;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bulkhead-block" => program = args.next().context("value")?.into(),
            "--runs" => runs = args.next().context("value")?.parse()?,
            _ => bail!("usage: bulkhead-spawn-bench [--bulkhead-block PATH] [--runs N]"),
        }
    }
    let image =
        std::env::temp_dir().join(format!("bulkhead-spawn-bench-{}.img", std::process::id()));
    std::fs::File::create(&image)?.set_len(16 << 20)?;
    println!("device  mode        spawn -> first vhost-user reply (ms, median of {runs})  RSS at first reply (KiB)");
    for jailed in [true, false] {
        let mut times = Vec::new();
        let mut rss = Vec::new();
        for _ in 0..runs {
            let (t, r) = one(&program, &image, jailed)?;
            times.push(t);
            rss.push(u128::from(r));
        }
        println!(
            "block   {:<10}  {:>8.2}  {:>46}",
            if jailed { "jailed" } else { "not jailed" },
            median(times) as f64 / 1000.0,
            median(rss)
        );
    }
    std::fs::remove_file(&image)?;
    Ok(())
}
