//! `bulkhead-bench`: boot figures for a 1-vCPU, 512 MiB guest with no devices, for Bulkhead
//! and, when their binaries are given, Firecracker and Cloud Hypervisor as peers, run
//! interleaved (round 1: each VMM once, round 2: ...) on the same kernel and initramfs.
//!
//! For each run it prints
//! - launch to exit, wall: from just before the VMM's exec until it exited, the guest having
//!   been powered off through its console (`poweroff -f`) as soon as its init was ready, less
//!   the time this program spent reading the processes' counters (smaps, debugfs) in between,
//!   while the guest waited at its prompt: that pause is the benchmark's own work, and longer
//!   for a VMM of more processes (printed beside it);
//! - the guest's uptime when its init ran (the `GUEST-UPTIME` line of tests/guest/init);
//! - ready to exit: from typing `poweroff -f` until the VMM exited;
//! - non-guest RSS: the Rss of every mapping of the VMM and every process it started, except
//!   guest RAM (a mapping at least as large as guest RAM, or the `bulkhead-guest-ram` file),
//!   taken once the guest is at init; and the same as Pss (pages shared between those
//!   processes, such as the VMM's binary in the VMM and its forked spawner, counted once);
//! - KVM's exit counters for the VM until the guest's init ran, where L1 has debugfs mounted
//!   (`/sys/kernel/debug/kvm/PID-FD/`): all exits, MMIO exits that went on to the VMM, MMIO
//!   KVM served itself. On a nested host each exit to the VMM is a costly round trip, and
//!   unlike times these counts do not swing with the host's load;
//! - for Bulkhead also its start-up milestones (configuration checked, VM created, guest
//!   loaded, first KVM_RUN): wall and CPU milliseconds since just before its exec.
//!
//! With `--devices IMAGE` each VMM (Bulkhead with its default slots, and each peer) also runs
//! with one disk (IMAGE, read-write) and one NIC (a tap the VMM opens, `bhbench0`), as separate
//! rows: their non-guest RSS is the issue's "one disk and one NIC" comparison.
//!
//! It asserts nothing: it prints figures.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Guest RAM of every run.
const RAM_MIB: u64 = 512;

struct Opts {
    bulkhead: PathBuf,
    firecracker: Option<PathBuf>,
    cloud_hypervisor: Option<PathBuf>,
    kernel: PathBuf,
    initramfs: PathBuf,
    runs: usize,
    ready: String,
    memory: String,
    /// Extra Bulkhead arguments, each for one more Bulkhead target (`--bulkhead-variant`,
    /// repeatable).
    variants: Vec<String>,
    /// `--devices IMAGE`: also run every VMM with this disk and a NIC.
    devices: Option<PathBuf>,
}

/// The tap each VMM opens (creating it) for the NIC rows; gone with the VMM.
const BENCH_TAP: &str = "bhbench0";

const USAGE: &str = "usage: bulkhead-bench --kernel IMAGE --initramfs CPIO [--bulkhead PATH] \
     [--firecracker PATH] [--cloud-hypervisor PATH] [--runs N] [--ready-marker STR] \
     [--memory-option OPTS] [--bulkhead-variant \"ARGS\"]... [--devices DISK_IMAGE]";

fn parse_args() -> Result<Opts> {
    let mut opts = Opts {
        bulkhead: PathBuf::from("bulkhead"),
        firecracker: None,
        cloud_hypervisor: None,
        kernel: PathBuf::new(),
        initramfs: PathBuf::new(),
        runs: 3,
        ready: "GUEST-READY".into(),
        memory: format!("size={RAM_MIB}M"),
        variants: Vec::new(),
        devices: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow!("{a} needs a value"));
        match a.as_str() {
            "--bulkhead" => opts.bulkhead = value()?.into(),
            "--firecracker" => opts.firecracker = Some(value()?.into()),
            "--cloud-hypervisor" => opts.cloud_hypervisor = Some(value()?.into()),
            "--kernel" => opts.kernel = value()?.into(),
            "--initramfs" => opts.initramfs = value()?.into(),
            "--runs" => opts.runs = value()?.parse().context("--runs")?,
            "--ready-marker" => opts.ready = value()?,
            "--memory-option" => opts.memory = value()?,
            "--bulkhead-variant" => opts.variants.push(value()?),
            "--devices" => opts.devices = Some(value()?.into()),
            _ => bail!("{USAGE}"),
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

/// `key=value` from the VMM's milestone log lines.
fn field(line: &str, key: &str) -> Option<i64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// kB value of a `Key: N kB` line.
fn kb_value(line: &str, key: &str) -> Option<u64> {
    line.strip_prefix(key)?
        .strip_prefix(':')?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The milestones Bulkhead logs, in order.
const MILESTONES: [&str; 5] = [
    "configuration checked",
    "guest RAM created",
    "VM created",
    "guest loaded",
    "first KVM_RUN",
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Bulkhead,
    Firecracker,
    CloudHypervisor,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Bulkhead => "Bulkhead",
            Vmm::Firecracker => "Firecracker",
            Vmm::CloudHypervisor => "Cloud Hypervisor",
        }
    }
}

struct Target {
    vmm: Vmm,
    path: PathBuf,
    /// Extra arguments (a Bulkhead variant).
    extra: Vec<String>,
    /// First line of `--version`.
    version: String,
    /// With one disk and one NIC (`--devices`).
    devices: bool,
}

impl Target {
    fn label(&self) -> String {
        let mut name = self.vmm.name().to_string();
        if !self.extra.is_empty() {
            name = format!("{name} {}", self.extra.join(" "));
        }
        if self.devices {
            name.push_str(" +disk+NIC");
        }
        name
    }
}

struct Sample {
    /// Launch to exit, less the benchmark's reading of counters (`timeline[2]`).
    wall_s: f64,
    /// `GUEST-UPTIME`.
    uptime_s: f64,
    /// `poweroff -f` typed to exit.
    stop_s: f64,
    /// Launch to the console's `GUEST-UPTIME` line, that line to `GUEST-READY`, and
    /// `GUEST-READY` to `poweroff -f` typed (the benchmark reading the processes' counters),
    /// wall seconds: where launch to exit goes besides the guest's boot.
    timeline: [f64; 3],
    /// KiB outside guest RAM, and the number of processes summed.
    rss_kib: u64,
    /// The same as Pss: pages shared between the processes (the VMM's binary in the VMM and
    /// its forked spawner, say) counted once in all.
    pss_kib: u64,
    procs: usize,
    /// (wall ms since exec, CPU ms) for each Bulkhead milestone.
    milestones: Vec<(f64, f64)>,
    /// The VM's KVM exit counters at the guest's init (see [`KvmExits`]), where L1 shows them.
    exits: Option<KvmExits>,
    /// Guest RAM the VMM process has resident at the guest's init, and how much of it in huge
    /// pages (KiB): a guest on small pages boots slower, and its loading faults 4 KiB at a time.
    guest_ram_kib: (u64, u64),
    /// [`rss_breakdown`] of each process, at the guest's init.
    rss_detail: Vec<String>,
}

/// What KVM counted for a VM until the guest's init ran, from debugfs
/// (`/sys/kernel/debug/kvm/PID-FD/`): each exit to the VMM costs a round trip through the
/// emulated host, so these say where a boot's time goes without the host's timing noise.
#[derive(Clone, Copy, Debug, Default)]
struct KvmExits {
    /// Every exit from the guest (to KVM or beyond).
    all: u64,
    /// MMIO exits that went on to the VMM.
    mmio_user: u64,
    /// MMIO KVM handled itself (in-kernel devices, queued writes).
    mmio_kernel: u64,
}

/// The exit counters of the VM(s) process `pid` created, if debugfs shows any. KVM names a
/// VM's directory after the thread that created it (Cloud Hypervisor's is not its main
/// thread), so every thread of the process counts.
fn kvm_exits(pid: u32) -> Option<KvmExits> {
    let dir = std::fs::read_dir("/sys/kernel/debug/kvm").ok()?;
    let mut prefixes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .map(|t| format!("{}-", t.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    prefixes.push(format!("{pid}-"));
    let mut found = None;
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !prefixes.iter().any(|p| name.starts_with(p.as_str())) {
            continue;
        }
        let read = |name: &str| {
            std::fs::read_to_string(e.path().join(name))
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let x: &mut KvmExits = found.get_or_insert_with(KvmExits::default);
        x.all += read("exits");
        x.mmio_user += read("mmio_exit_user");
        x.mmio_kernel += read("mmio_exit_kernel");
    }
    found
}

/// The process `root` and all its descendants.
fn process_tree(root: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // pid (comm) state ppid ...: comm may hold spaces and parentheses.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

/// One mapping of `/proc/PID/smaps`: its name (the file's base name, `[heap]`, `[stack]`, or
/// `anon` for an unnamed one), whether it is guest RAM (at least as large as it, or the
/// `bulkhead-guest-ram` file), and its `Key: N kB` fields.
struct Mapping {
    name: String,
    guest: bool,
    kb: Vec<(String, u64)>,
}

impl Mapping {
    /// Field `key` in KiB (0 when absent).
    fn get(&self, key: &str) -> u64 {
        self.kb
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v)
            .sum()
    }
}

/// The mappings of `pid`; `None` when it is gone.
fn smaps(pid: u32) -> Option<Vec<Mapping>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut maps: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let size =
                u64::from_str_radix(b, 16).unwrap_or(0) - u64::from_str_radix(a, 16).unwrap_or(0);
            let name = words.nth(4).unwrap_or("anon");
            let name = name.rsplit('/').next().unwrap_or(name).to_string();
            let guest = size >= RAM_MIB << 20 || name.contains("bulkhead-guest-ram");
            maps.push(Mapping {
                name,
                guest,
                kb: Vec::new(),
            });
        } else if let (Some(m), Some((key, _))) = (maps.last_mut(), first.split_once(':')) {
            if let Some(kb) = kb_value(line, key) {
                m.kb.push((key.to_string(), kb));
            }
        }
    }
    Some(maps)
}

/// Sums of `/proc/PID/smaps` fields, in KiB, for each of `keys`: (over the guest RAM
/// mappings, over the rest).
fn smaps_sums<const N: usize>(pid: u32, keys: [&str; N]) -> [(u64, u64); N] {
    let mut sums = [(0, 0); N];
    for m in smaps(pid).unwrap_or_default() {
        for (key, sum) in keys.iter().zip(sums.iter_mut()) {
            if m.guest {
                sum.0 += m.get(key);
            } else {
                sum.1 += m.get(key);
            }
        }
    }
    sums
}

/// Resident KiB of `pid` outside guest RAM, from /proc/PID/smaps: (Rss, Pss).
fn non_guest_rss(pid: u32) -> (u64, u64) {
    let [rss, pss] = smaps_sums(pid, ["Rss", "Pss"]);
    (rss.1, pss.1)
}

/// Huge-page fields of smaps: anonymous, shmem and file THP.
const HUGE_KEYS: [&str; 3] = ["AnonHugePages", "ShmemPmdMapped", "FilePmdMapped"];

/// Where `pid`'s non-guest RSS is, as `comm RSS KiB: mapping RSS[+huge], ...`: every mapping
/// name that holds at least 64 KiB, the largest first, and how much of it huge pages map (a
/// THP can make 4 KiB of use 2 MiB).
fn rss_breakdown(pid: u32) -> String {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let Some(maps) = smaps(pid) else {
        return format!("{} (gone)", comm.trim());
    };
    // (name, Rss, huge) per mapping name, outside guest RAM.
    let mut groups: Vec<(String, u64, u64)> = Vec::new();
    for m in maps.iter().filter(|m| !m.guest) {
        let huge: u64 = HUGE_KEYS.iter().map(|k| m.get(k)).sum();
        match groups.iter_mut().find(|g| g.0 == m.name) {
            Some(g) => {
                g.1 += m.get("Rss");
                g.2 += huge;
            }
            None => groups.push((m.name.clone(), m.get("Rss"), huge)),
        }
    }
    let total: u64 = groups.iter().map(|g| g.1).sum();
    groups.retain(|g| g.1 >= 64);
    groups.sort_by_key(|g| std::cmp::Reverse(g.1));
    let parts: Vec<String> = groups
        .iter()
        .map(|(name, rss, huge)| match huge {
            0 => format!("{name} {rss}"),
            h => format!("{name} {rss} (huge {h})"),
        })
        .collect();
    format!("{} {total} KiB: {}", comm.trim(), parts.join(", "))
}

/// Resident KiB of `pid`'s guest RAM mappings (those [`non_guest_rss`] leaves out), and of
/// that how much is mapped by huge pages (anonymous, shmem or file THP).
fn guest_ram_resident(pid: u32) -> (u64, u64) {
    let [rss, anon, shmem, file] =
        smaps_sums(pid, ["Rss", HUGE_KEYS[0], HUGE_KEYS[1], HUGE_KEYS[2]]);
    (rss.0, anon.0 + shmem.0 + file.0)
}

fn command(t: &Target, o: &Opts, dir: &std::path::Path) -> Result<Command> {
    let mut c = Command::new(&t.path);
    match t.vmm {
        Vmm::Bulkhead => {
            // A variant may give its own --cpus (boot=1 and more options).
            if !t.extra.iter().any(|a| a == "--cpus") {
                c.args(["--cpus", "boot=1"]);
            }
            c.args(["-vv", "--memory", &o.memory])
                .args(["--cmdline", "console=ttyAMA0 quiet"])
                .arg("--kernel")
                .arg(&o.kernel)
                .arg("--initramfs")
                .arg(&o.initramfs)
                .args(&t.extra);
            if let Some(img) = o.devices.as_ref().filter(|_| t.devices) {
                c.arg("--disk")
                    .arg(format!("path={}", img.display()))
                    .args(["--net", &format!("tap={BENCH_TAP}")]);
            }
        }
        Vmm::Firecracker => {
            let config = dir.join("fc.json");
            let (drives, nics) = match o.devices.as_ref().filter(|_| t.devices) {
                Some(img) => (
                    format!(
                        r#"[{{"drive_id":"d0","path_on_host":"{}","is_root_device":false,"is_read_only":false}}]"#,
                        img.display()
                    ),
                    format!(
                        r#","network-interfaces":[{{"iface_id":"n0","host_dev_name":"{BENCH_TAP}"}}]"#
                    ),
                ),
                None => ("[]".to_string(), String::new()),
            };
            let json = format!(
                r#"{{"boot-source":{{"kernel_image_path":"{}","initrd_path":"{}","boot_args":"console=ttyS0 quiet"}},"machine-config":{{"vcpu_count":1,"mem_size_mib":{RAM_MIB}}},"drives":{drives}{nics}}}"#,
                o.kernel.display(),
                o.initramfs.display()
            );
            std::fs::write(&config, json).context("writing fc.json")?;
            c.arg("--no-api").arg("--config-file").arg(config);
        }
        Vmm::CloudHypervisor => {
            c.arg("--kernel")
                .arg(&o.kernel)
                .arg("--initramfs")
                .arg(&o.initramfs)
                .args(["--cmdline", "console=ttyAMA0 quiet", "--cpus", "boot=1"])
                .args(["--memory", &format!("size={RAM_MIB}M")])
                .args(["--serial", "tty", "--console", "off"]);
            if let Some(img) = o.devices.as_ref().filter(|_| t.devices) {
                c.arg("--disk")
                    .arg(format!("path={}", img.display()))
                    .args(["--net", &format!("tap={BENCH_TAP}")]);
            }
        }
    }
    Ok(c)
}

enum Seen {
    Stderr(String),
    /// The guest's uptime, and when its line reached the console.
    Uptime(f64, Instant),
    Ready(Instant),
}

/// A pseudo-terminal: (master, slave).
fn openpty() -> Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors; name, termios and winsize may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!("openpty: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just opened and are owned by nothing else.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    })
}

fn one_run(t: &Target, o: &Opts, dir: &std::path::Path) -> Result<Sample> {
    let mut cmd = command(t, o, dir)?;
    // Cloud Hypervisor's `--serial tty` reads guest input only from a terminal: it gets a pty.
    let pty = if t.vmm == Vmm::CloudHypervisor {
        Some(openpty()?)
    } else {
        None
    };
    match &pty {
        Some((_, slave)) => cmd
            .stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?)),
        None => cmd.stdin(Stdio::piped()).stdout(Stdio::piped()),
    };
    let start = Instant::now();
    let start_ns = monotonic_ns();
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", t.path.display()))?;
    // Our copies of the pty's slave end go, so reading the master ends when the VMM exits.
    drop(cmd);
    let (stdout, mut stdin): (Box<dyn Read + Send>, Box<dyn Write>) = match pty {
        Some((master, slave)) => {
            drop(slave);
            (Box::new(master.try_clone()?), Box::new(master))
        }
        None => (
            Box::new(child.stdout.take().context("stdout")?),
            Box::new(child.stdin.take().context("stdin")?),
        ),
    };
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().context("stderr")?;
    let tx_err = tx.clone();
    let err_reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx_err.send(Seen::Stderr(line));
        }
    });
    let mut stdout = stdout;
    let ready = o.ready.clone();
    let out_reader = std::thread::spawn(move || {
        let (mut seen, mut buf, mut uptime_sent) = (Vec::new(), [0u8; 4096], false);
        let (mut tail, mut uptime_at) = (Vec::new(), None);
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if uptime_at.is_none() && seen.windows(13).any(|w| w == b"GUEST-UPTIME ") {
                uptime_at = Some(Instant::now());
            }
            tail.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen).into_owned();
            if text.contains(&ready) {
                if !uptime_sent {
                    uptime_sent = true;
                    let v = text
                        .lines()
                        .find_map(|l| l.trim().strip_prefix("GUEST-UPTIME "))
                        .and_then(|v| v.trim().parse::<f64>().ok());
                    let at = uptime_at.unwrap_or_else(Instant::now);
                    let _ = tx.send(Seen::Uptime(v.unwrap_or(f64::NAN), at));
                }
                let _ = tx.send(Seen::Ready(Instant::now()));
                seen.clear();
            }
            if tail.len() > 8192 {
                tail.drain(..tail.len() - 4096);
            }
        }
        String::from_utf8_lossy(&tail).into_owned()
    });
    let deadline = start + Duration::from_secs(240);
    let (mut lines, mut uptime, mut ready_at) = (Vec::new(), None, None);
    while uptime.is_none() || ready_at.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Seen::Stderr(line)) => lines.push(line),
            Ok(Seen::Uptime(v, at)) => uptime = Some((v, at)),
            Ok(Seen::Ready(at)) => ready_at = ready_at.or(Some(at)),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let tail = out_reader.join().unwrap_or_default();
                bail!(
                    "{}: the guest did not reach init within 240 s; stderr: {:?}; console tail: {:?}",
                    t.vmm.name(),
                    lines.iter().rev().take(5).collect::<Vec<_>>(),
                    tail
                );
            }
        }
    }
    let exits = kvm_exits(pid);
    let guest_ram_kib = guest_ram_resident(pid);
    let tree = process_tree(pid);
    let (rss_kib, pss_kib) = tree
        .iter()
        .map(|p| non_guest_rss(*p))
        .fold((0, 0), |(r, p), (a, b)| (r + a, p + b));
    let rss_detail = tree.iter().map(|p| rss_breakdown(*p)).collect();
    let stop_at = Instant::now();
    let (uptime, uptime_at) = uptime.expect("the loop ends with it");
    let ready_at = ready_at.expect("the loop ends with it");
    let timeline = [
        uptime_at.duration_since(start).as_secs_f64(),
        ready_at.saturating_duration_since(uptime_at).as_secs_f64(),
        stop_at.saturating_duration_since(ready_at).as_secs_f64(),
    ];
    stdin.write_all(b"poweroff -f\n")?;
    let stop_deadline = Instant::now() + Duration::from_secs(60);
    let exit = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= stop_deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} still running 60 s after poweroff -f", t.vmm.name());
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let exit_ns = monotonic_ns();
    let wall_s = start.elapsed().as_secs_f64() - timeline[2];
    let stop_s = stop_at.elapsed().as_secs_f64();
    drop(stdin);
    let _ = out_reader.join();
    let _ = err_reader.join();
    while let Ok(Seen::Stderr(line)) = rx.try_recv() {
        lines.push(line);
    }
    if !exit.success() {
        bail!(
            "{} exited with {exit}; last stderr lines: {:?}",
            t.vmm.name(),
            lines.iter().rev().take(5).collect::<Vec<_>>()
        );
    }
    let mut milestones = Vec::new();
    if t.vmm == Vmm::Bulkhead {
        for m in MILESTONES {
            let line = lines
                .iter()
                .find(|l| l.contains(&format!("{m}: ")))
                .with_context(|| format!("no {m:?} line"))?;
            let ns = field(line, "monotonic_ns").context("monotonic_ns")?;
            let cpu_us = field(line, "cpu_us").context("cpu_us")?;
            milestones.push(((ns - start_ns) as f64 / 1e6, cpu_us as f64 / 1e3));
        }
        // Where the stop goes: vCPUs stopped -> main's last line -> the process reaped.
        let at = |m: &str| {
            lines
                .iter()
                .find(|l| l.contains(&format!("{m}: ")))
                .and_then(|l| field(l, "monotonic_ns"))
        };
        if let (Some(stopped), Some(exiting)) = (at("vCPUs stopped after power-off"), at("exiting"))
        {
            println!(
                "  Bulkhead stop: vCPUs stopped -> exiting {:.1} ms, exiting -> reaped {:.1} ms",
                (exiting - stopped) as f64 / 1e6,
                (exit_ns - exiting) as f64 / 1e6
            );
        }
        if let Some(l) = lines.iter().find(|l| l.contains("guest RAM:")) {
            println!(
                "  Bulkhead: {}",
                l.split_once("guest RAM:")
                    .map(|(_, r)| format!("guest RAM:{r}"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(Sample {
        wall_s,
        uptime_s: uptime,
        stop_s,
        timeline,
        rss_kib,
        pss_kib,
        procs: tree.len(),
        milestones,
        exits,
        guest_ram_kib,
        rss_detail,
    })
}

/// The smallest of `v` (infinity for none).
fn least(v: Vec<f64>) -> f64 {
    v.into_iter().fold(f64::INFINITY, f64::min)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A peer's binary, if given and executable; says why not otherwise.
fn peer(vmm: Vmm, path: &Option<PathBuf>) -> Option<Target> {
    let Some(path) = path else {
        println!(
            "{}: no binary given; the benchmark runs without it",
            vmm.name()
        );
        return None;
    };
    let version = match Command::new(path).arg("--version").output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        Err(e) => {
            println!(
                "{}: cannot run {} ({e}); the benchmark runs without it",
                vmm.name(),
                path.display()
            );
            return None;
        }
    };
    Some(Target {
        vmm,
        path: path.clone(),
        extra: Vec::new(),
        version,
        devices: false,
    })
}

fn main() -> Result<()> {
    let o = parse_args()?;
    let dir = std::env::temp_dir().join(format!("bulkhead-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut targets = vec![Target {
        vmm: Vmm::Bulkhead,
        path: o.bulkhead.clone(),
        extra: Vec::new(),
        version: format!("--memory {}", o.memory),
        devices: false,
    }];
    for v in &o.variants {
        targets.push(Target {
            vmm: Vmm::Bulkhead,
            path: o.bulkhead.clone(),
            extra: v.split_whitespace().map(str::to_string).collect(),
            version: format!("--memory {} {v}", o.memory),
            devices: false,
        });
    }
    targets.extend(peer(Vmm::Firecracker, &o.firecracker));
    targets.extend(peer(Vmm::CloudHypervisor, &o.cloud_hypervisor));
    if o.devices.is_some() {
        // The same VMMs (not the Bulkhead variant) with one disk and one NIC.
        let with: Vec<Target> = targets
            .iter()
            .filter(|t| t.extra.is_empty())
            .map(|t| Target {
                vmm: t.vmm,
                path: t.path.clone(),
                extra: Vec::new(),
                version: t.version.clone(),
                devices: true,
            })
            .collect();
        targets.extend(with);
    }
    let mut samples: Vec<Vec<Sample>> = targets.iter().map(|_| Vec::new()).collect();
    let mut failed = vec![false; targets.len()];
    for round in 1..=o.runs.max(1) {
        for ((t, s), failed) in targets
            .iter()
            .zip(samples.iter_mut())
            .zip(failed.iter_mut())
        {
            if *failed {
                continue;
            }
            let r = match one_run(t, &o, &dir) {
                Ok(r) => r,
                // Bulkhead failing fails the benchmark; a peer failing leaves it out.
                Err(e) if t.vmm == Vmm::Bulkhead => return Err(e),
                Err(e) => {
                    println!(
                        "round {round}: {} failed, left out from here: {e:#}",
                        t.vmm.name()
                    );
                    *failed = true;
                    continue;
                }
            };
            let ms: Vec<String> = MILESTONES
                .iter()
                .zip(&r.milestones)
                .map(|(m, (w, c))| format!("{m} {w:.1}/{c:.1}"))
                .collect();
            let name = t.label();
            let exits = r.exits.map_or(String::new(), |x| {
                format!(
                    ", KVM exits to init {} (MMIO to the VMM {}, MMIO in KVM {})",
                    x.all, x.mmio_user, x.mmio_kernel
                )
            });
            println!(
                "round {round}: {:<28} launch->exit {:6.2} s (less the benchmark's pause), guest uptime at init {:5.2} s, \
                 poweroff->exit {:5.2} s, non-guest RSS {:6} KiB, PSS {:6} KiB ({} processes){exits}, \
                 guest RAM resident {} MiB ({} MiB in huge pages){}",
                name,
                r.wall_s,
                r.uptime_s,
                r.stop_s,
                r.rss_kib,
                r.pss_kib,
                r.procs,
                r.guest_ram_kib.0 >> 10,
                r.guest_ram_kib.1 >> 10,
                if ms.is_empty() {
                    String::new()
                } else {
                    format!("; ms wall/CPU since exec: {}", ms.join(", "))
                }
            );
            println!(
                "  wall s: launch -> GUEST-UPTIME line {:.2}, -> GUEST-READY {:.2}, -> poweroff typed \
                 (the benchmark reading counters) {:.2}",
                r.timeline[0], r.timeline[1], r.timeline[2]
            );
            println!("  non-guest RSS by process: {}", r.rss_detail.join("; "));
            s.push(r);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!();
    println!(
        "median of {} interleaved rounds; 1 vCPU, {RAM_MIB} MiB, quiet console; no devices, \
         except the +disk+NIC rows (a {}-backed disk and a NIC on tap {BENCH_TAP}):",
        o.runs.max(1),
        o.devices
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(none)".into())
    );
    println!();
    println!("| VMM | launch to exit, wall (less the benchmark's pause) | guest uptime when its init runs | poweroff to exit | non-guest RSS | non-guest PSS | MMIO exits to the VMM until init |");
    println!("|---|---|---|---|---|---|---|");
    for (t, s) in targets.iter().zip(&samples) {
        if s.is_empty() {
            println!("| {} ({}) | failed | | | | | |", t.label(), t.version);
            continue;
        }
        let med = |f: fn(&Sample) -> f64| median(s.iter().map(f).collect());
        let exits = if s.iter().all(|x| x.exits.is_some()) {
            format!(
                "{:.0}",
                med(|x| x.exits.map_or(f64::NAN, |e| e.mmio_user as f64))
            )
        } else {
            "not shown by L1".into()
        };
        println!(
            "| {} ({}) | {:.2} s | {:.2} s | {:.2} s | {:.2} MiB | {:.2} MiB | {exits} |",
            t.label(),
            t.version,
            med(|x| x.wall_s),
            med(|x| x.uptime_s),
            med(|x| x.stop_s),
            med(|x| x.rss_kib as f64) / 1024.0,
            med(|x| x.pss_kib as f64) / 1024.0
        );
    }
    // The issue's goal, as ratios to Firecracker in this run (medians of the rows above), and
    // the same of each VMM's fastest or smallest round: the emulated host's outliers move
    // medians, and a peer's memory swings with whether it got a transparent huge page.
    let stat_of = |vmm: Vmm, devices: bool, f: fn(&Sample) -> f64, reduce: fn(Vec<f64>) -> f64| {
        targets
            .iter()
            .zip(&samples)
            .find(|(t, s)| {
                t.vmm == vmm && t.devices == devices && t.extra.is_empty() && !s.is_empty()
            })
            .map(|(_, s)| reduce(s.iter().map(f).collect()))
    };
    let med_of = |vmm: Vmm, devices: bool, f: fn(&Sample) -> f64| stat_of(vmm, devices, f, median);
    let ratio = |devices: bool, f: fn(&Sample) -> f64| {
        Some(med_of(Vmm::Bulkhead, devices, f)? / med_of(Vmm::Firecracker, devices, f)?)
    };
    let ratio_least = |devices: bool, f: fn(&Sample) -> f64| {
        Some(
            stat_of(Vmm::Bulkhead, devices, f, least)?
                / stat_of(Vmm::Firecracker, devices, f, least)?,
        )
    };
    if let (Some(w), Some(u)) = (ratio(false, |x| x.wall_s), ratio(false, |x| x.uptime_s)) {
        println!();
        println!(
            "Bulkhead (default) / Firecracker: launch to exit {w:.2}x (goal <= 0.8x), guest uptime at init {u:.2}x (goal <= 1x)"
        );
    }
    if let (Some(w), Some(u)) = (
        ratio_least(false, |x| x.wall_s),
        ratio_least(false, |x| x.uptime_s),
    ) {
        println!("  the same, fastest round of each: launch to exit {w:.2}x, guest uptime at init {u:.2}x");
    }
    // Each variant against Firecracker too (e.g. `--cpus boot=1,pauth=off`: like for like with
    // a VMM that gives no pointer authentication).
    let fc = |f: fn(&Sample) -> f64| med_of(Vmm::Firecracker, false, f);
    for (t, s) in targets.iter().zip(&samples) {
        if t.vmm != Vmm::Bulkhead || t.extra.is_empty() || s.is_empty() {
            continue;
        }
        let m = |f: fn(&Sample) -> f64| median(s.iter().map(f).collect());
        if let (Some(fw), Some(fu)) = (fc(|x| x.wall_s), fc(|x| x.uptime_s)) {
            println!(
                "{} / Firecracker: launch to exit {:.2}x, guest uptime at init {:.2}x",
                t.label(),
                m(|x| x.wall_s) / fw,
                m(|x| x.uptime_s) / fu
            );
        }
    }
    if let (Some(r), Some(p)) = (
        ratio(true, |x| x.rss_kib as f64),
        ratio(true, |x| x.pss_kib as f64),
    ) {
        println!("Bulkhead / Firecracker non-guest RSS with one disk and one NIC: {r:.2}x (goal <= 0.7x); PSS {p:.2}x");
        if let Some(l) = ratio_least(true, |x| x.rss_kib as f64) {
            println!("  the same, smallest round of each: RSS {l:.2}x");
        }
    }
    if let Some(b) = samples.first() {
        println!();
        println!("Bulkhead start-up milestones (median):");
        for (k, m) in MILESTONES.iter().enumerate() {
            let wall = median(b.iter().map(|s| s.milestones[k].0).collect());
            let cpu = median(b.iter().map(|s| s.milestones[k].1).collect());
            println!("  exec -> {m:<22} {wall:>9.1} ms wall {cpu:>9.1} ms CPU");
        }
    }
    println!(
        "Under nested virtualisation on an emulated host every time is inflated by the emulation."
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_least_and_median_of_rounds() {
        assert_eq!(least(vec![3.0, 1.5, 2.0]), 1.5);
        assert!(least(Vec::new()).is_infinite());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn test_smaps_of_this_process_names_and_sums_its_mappings() {
        let maps = smaps(std::process::id()).expect("this process");
        let exe = std::env::current_exe().expect("exe");
        let exe = exe.file_name().and_then(|n| n.to_str()).expect("name");
        let text: u64 = maps
            .iter()
            .filter(|m| m.name == exe)
            .map(|m| m.get("Rss"))
            .sum();
        assert!(text > 0, "no resident page of {exe}");
        assert!(maps.iter().any(|m| m.name == "[stack]"));
        assert!(maps.iter().all(|m| !m.guest), "no mapping here is 512 MiB");
        let [rss, _] = smaps_sums(std::process::id(), ["Rss", "Pss"]);
        let total: u64 = maps.iter().map(|m| m.get("Rss")).sum();
        assert_eq!(rss.0, 0);
        assert!(
            rss.1 >= text && rss.1.abs_diff(total) < total / 2,
            "{rss:?} vs {total}"
        );
        assert!(rss_breakdown(std::process::id()).contains(" KiB: "));
    }
}
