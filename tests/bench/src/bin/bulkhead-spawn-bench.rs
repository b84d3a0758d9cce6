//! `bulkhead-spawn-bench`: how long a device process takes from spawn until it answers its
//! first vhost-user message, and how much memory it holds then, jailed (as the VMM starts it)
//! and not jailed (`--sandbox off`). Prints figures; asserts nothing. Needs user namespaces
//! (run it where the VMM runs: the nested suite `bench` does).
//!
//! It starts the device through the VMM's own spawn path (`bulkhead::device::spawn_process`,
//! the device manager's spawner and the block kind's jail policy), not a copy of it.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bulkhead::config::parse_disk_options;
use bulkhead::device::spawner::{Exit, Spawner};
use bulkhead::device::{disk_spec, open_files, spawn_process, SpawnEnv};
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
fn one(
    spawner: &Spawner,
    events: &std::os::unix::net::UnixDatagram,
    image: &Path,
    jailed: bool,
) -> Result<(u128, u64)> {
    let t0 = Instant::now();
    // The spec `--disk path=IMAGE,id=bench0` makes (one queue of 256).
    let disk = parse_disk_options(&format!("path={},id=bench0", image.display()))?;
    let spec = disk_spec(&disk, 0, 0, jailed);
    let files = open_files(&spec)?;
    let env = SpawnEnv {
        spawner,
        cgroup: None,
        cgroup_leaf: None,
        device_ids: None,
        ram_size: 0,
    };
    let started = spawn_process(&spec, files, &env).context("spawn")?;
    let pid = started.pid;
    let mut frontend = Frontend::from_stream(started.stream, 1);
    frontend.set_owner().context("SET_OWNER")?;
    frontend.get_features().context("GET_FEATURES")?;
    let first_reply = t0.elapsed().as_micros();
    frontend
        .get_protocol_features()
        .context("GET_PROTOCOL_FEATURES")?;
    let rss = rss_kib(pid);
    drop(frontend);
    // Wait for the spawner's report that it exited (the image lock goes with it).
    let mut buf = [0u8; 128];
    loop {
        let n = events.recv(&mut buf).context("exit report")?;
        if Exit::parse(&buf[..n]).map(|e| e.pid()) == Some(pid) {
            break;
        }
    }
    drop(started.log);
    Ok((first_reply, rss))
}

fn median(mut v: Vec<u128>) -> u128 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() -> Result<()> {
    // Forked first, like the VMM's: one thread, no filter.
    let spawner =
        Spawner::fork(bulkhead::device::spawner_policy(false)).context("starting the spawner")?;
    let events = spawner.take_events().context("events")?;
    let mut args = std::env::args().skip(1);
    let mut runs = 10;
    let mut modes = vec![true, false];
    while let Some(a) = args.next() {
        match a.as_str() {
            // The device program is found as the VMM finds it: beside this binary, else on
            // PATH; the option is kept for the bench scenario and must name that program.
            "--bulkhead-block" => {
                let _ = args.next().context("value")?;
            }
            "--runs" => runs = args.next().context("value")?.parse()?,
            // Where the device program is dynamically linked (a debug build on the build
            // machine), it cannot run in the jail's empty root.
            "--no-jail" => modes = vec![false],
            _ => {
                bail!("usage: bulkhead-spawn-bench [--bulkhead-block PATH] [--runs N] [--no-jail]")
            }
        }
    }
    let image =
        std::env::temp_dir().join(format!("bulkhead-spawn-bench-{}.img", std::process::id()));
    std::fs::File::create(&image)?.set_len(16 << 20)?;
    println!("device  mode        spawn -> first vhost-user reply (ms, median of {runs})  RSS at first reply (KiB)");
    for jailed in modes {
        let mut times = Vec::new();
        let mut rss = Vec::new();
        for _ in 0..runs {
            let (t, r) = one(&spawner, &events, &image, jailed)?;
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
