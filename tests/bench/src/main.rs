//! `bulkhead-bench`: boot figures for a 1-vCPU, 512 MiB guest.
//!
//! For each run it starts `bulkhead -vv` and prints
//! - for each start-up milestone the VMM logs (configuration checked, VM created, guest
//!   loaded, first KVM_RUN), the wall time since just before the VMM's exec and the CPU time
//!   the VMM had used by then;
//! - the VMM's own resident memory once the guest is at init: the Rss of every mapping in
//!   /proc/PID/smaps except guest RAM (the `bulkhead-guest-ram` memfd), reported apart;
//!
//! then powers the guest off through its console. It asserts nothing: it prints figures, next
//! to Firecracker's published ones.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

struct Opts {
    bulkhead: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
    runs: usize,
    ready: String,
}

fn parse_args() -> Result<Opts> {
    let mut opts = Opts {
        bulkhead: PathBuf::from("bulkhead"),
        kernel: PathBuf::new(),
        initramfs: PathBuf::new(),
        runs: 5,
        ready: "GUEST-READY".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow!("{a} needs a value"));
        match a.as_str() {
            "--bulkhead" => opts.bulkhead = value()?.into(),
            "--kernel" => opts.kernel = value()?.into(),
            "--initramfs" => opts.initramfs = value()?.into(),
            "--runs" => opts.runs = value()?.parse().context("--runs")?,
            "--ready-marker" => opts.ready = value()?,
            _ => bail!(
                "usage: bulkhead-bench --kernel IMAGE --initramfs CPIO [--bulkhead PATH] \
                 [--runs N] [--ready-marker STR]"
            ),
        }
    }
    if opts.kernel.as_os_str().is_empty() || opts.initramfs.as_os_str().is_empty() {
        bail!("--kernel and --initramfs are required");
    }
    Ok(opts)
}

fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// `key=value` from the VMM's `first KVM_RUN:` log line.
fn field(line: &str, key: &str) -> Option<i64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// kB value of a /proc/PID/status line.
fn status_kb(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The milestones the VMM logs, in order.
const MILESTONES: [&str; 4] = [
    "configuration checked",
    "VM created",
    "guest loaded",
    "first KVM_RUN",
];

struct Sample {
    /// (wall ms since exec, CPU ms) for each milestone.
    milestones: Vec<(f64, f64)>,
    own_rss_kib: u64,
    guest_rss_kib: u64,
}

/// Resident KiB of the process outside and inside guest RAM, from /proc/PID/smaps.
fn rss_split(pid: u32) -> Result<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut own, mut guest, mut in_guest) = (0, 0, false);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            in_guest = line.contains("bulkhead-guest-ram");
        } else if let Some(kb) = status_kb(line, "Rss") {
            if in_guest {
                guest += kb;
            } else {
                own += kb;
            }
        }
    }
    Ok((own, guest))
}

fn one_run(o: &Opts) -> Result<Sample> {
    let start_ns = monotonic_ns();
    let mut child = Command::new(&o.bulkhead)
        .args(["-vv", "--cpus", "boot=1", "--memory", "size=512M"])
        .args(["--cmdline", "console=ttyAMA0 quiet"])
        .arg("--kernel")
        .arg(&o.kernel)
        .arg("--initramfs")
        .arg(&o.initramfs)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", o.bulkhead.display()))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().context("stderr")?;
    let tx_err = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if MILESTONES.iter().any(|m| line.contains(&format!("{m}: "))) {
                let _ = tx_err.send(Ok(line));
            }
        }
    });
    let mut stdout = child.stdout.take().context("stdout")?;
    let ready = o.ready.clone();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains(&ready) {
                let _ = tx.send(Err(()));
                seen.clear();
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    let (mut lines, mut at_init) = (Vec::new(), false);
    while lines.len() < MILESTONES.len() || !at_init {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ok(line)) => lines.push(line),
            Ok(Err(())) => at_init = true,
            Err(_) => {
                let _ = child.kill();
                bail!("guest did not reach init within 180 s");
            }
        }
    }
    let (own, guest) = rss_split(pid)?;
    let mut milestones = Vec::new();
    for m in MILESTONES {
        let line = lines
            .iter()
            .find(|l| l.contains(&format!("{m}: ")))
            .with_context(|| format!("no {m:?} line"))?;
        let ns = field(line, "monotonic_ns").context("monotonic_ns")?;
        let cpu_us = field(line, "cpu_us").context("cpu_us")?;
        milestones.push(((ns - start_ns) as f64 / 1e6, cpu_us as f64 / 1e3));
    }
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(b"poweroff -f\n")?;
    let exit = child.wait()?;
    if !exit.success() {
        bail!("bulkhead exited with {exit}");
    }
    Ok(Sample {
        milestones,
        own_rss_kib: own,
        guest_rss_kib: guest,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let o = parse_args()?;
    let mut samples = Vec::new();
    for i in 0..o.runs.max(1) {
        let s = one_run(&o)?;
        let cells: Vec<String> = s
            .milestones
            .iter()
            .map(|(w, c)| format!("{w:.1}/{c:.1}"))
            .collect();
        println!(
            "run {}: ms wall/CPU since exec: {}; VMM RSS {} KiB, guest RAM resident {} KiB",
            i + 1,
            MILESTONES
                .iter()
                .zip(&cells)
                .map(|(m, c)| format!("{m} {c}"))
                .collect::<Vec<_>>()
                .join(", "),
            s.own_rss_kib,
            s.guest_rss_kib
        );
        samples.push(s);
    }
    println!();
    println!("median of {} runs, 1 vCPU, 512 MiB guest:", samples.len());
    for (k, m) in MILESTONES.iter().enumerate() {
        let wall = median(samples.iter().map(|s| s.milestones[k].0).collect());
        let cpu = median(samples.iter().map(|s| s.milestones[k].1).collect());
        println!("  bulkhead exec -> {m:<22} {wall:>9.1} ms wall {cpu:>9.1} ms CPU");
    }
    let rss = median(samples.iter().map(|s| s.own_rss_kib as f64).collect());
    println!(
        "  bulkhead VMM RSS at guest init (guest RAM excluded): {:.2} MiB",
        rss / 1024.0
    );
    println!("  firecracker (published): about 8 CPU-ms to API-ready; under 5 MiB VMM overhead");
    println!(
        "  compare 'configuration checked' with Firecracker's API-ready: after it Bulkhead creates"
    );
    println!("  the VM and loads the kernel and initramfs, which Firecracker's figure leaves out.");
    println!("  Under nested virtualisation on an emulated host every figure is inflated by the emulation.");
    Ok(())
}
