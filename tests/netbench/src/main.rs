//! `bulkhead-net-bench`: frame-rate and throughput figures for vhost-user-net backends, with
//! no VM.
//!
//! This program is the vhost-user frontend and the guest's virtio-net driver at once
//! (`driver.rs`: a memfd as guest memory, rx0/tx0 split rings, kick/call eventfds). It moves
//! into a network namespace of its own, starts each backend there on a tap of its own, and
//! measures four rows, the backends taking turns, several runs each:
//! - TX 64 KiB TSO: `HOST_TSO4` segments of 65400 bytes of TCP payload from the driver's tx
//!   ring into the tap (Gbit/s of TCP payload);
//! - TX 64 B: 64-byte frames the same way (Mpps);
//! - RX 64 KiB TSO: the same segments sent into the tap by a raw `AF_PACKET` socket with
//!   `PACKET_VNET_HDR` (the peer, in the namespace), reaching the driver's rx ring whole if
//!   the backend set the tap's offloads (`TUNSETOFFLOAD`), segmented by the kernel otherwise
//!   (Gbit/s of TCP payload received);
//! - RX 64 B: 64-byte frames the same way (Mpps received).
//!
//! Frames from the driver are addressed to a MAC nobody has: the tap counts them and the
//! stack drops them at once (the same cost for every backend). Both backends get the same
//! features (printed; see `driver::wanted_features`). It asserts nothing about speed.
//!
//! Each run also measures the tx rows' ceiling (`alone.rs`, `--no-alone` skips it): this
//! process's own thread writing the same frames into a tap with nothing between, the least
//! work any backend that writes frames into a tap does; the table prints it as `tap writes
//! alone` and each backend's share of it.
//!
//! Usage (as root, from the repository root): `target/release/bulkhead-net-bench
//! [--ch PATH] [--runs N] [--seconds S]`; see `--help`.

mod alone;
mod driver;
mod peer;

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

use driver::{Count, NetDriver, HDR_LEN};
use peer::Source;

/// Network figures for vhost-user-net backends, driven from host-side virtqueues.
#[derive(Parser, Debug)]
#[command(name = "bulkhead-net-bench")]
struct Args {
    /// The bulkhead-net binary.
    #[arg(long, default_value = "target/release/bulkhead-net")]
    bulkhead_net: PathBuf,
    /// Cloud Hypervisor's vhost_user_net binary (e.g.
    /// /work/shared/anchors/x86_64/vhost_user_net); without it only bulkhead-net runs.
    #[arg(long)]
    ch: Option<PathBuf>,
    /// Seconds measured per row and run (after a warm-up of 0.3 s).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Runs per backend; the table shows the median and the spread (max - min, % of median).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Virtqueue size.
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Skip the extra bulkhead-net run with the features Cloud Hypervisor's backend lacks
    /// (MRG_RXBUF, EVENT_IDX).
    #[arg(long)]
    no_full: bool,
    /// Skip the tx rows' ceiling: one thread writing the frames into a tap with no backend.
    #[arg(long)]
    no_alone: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Bulkhead,
    Ch,
    /// bulkhead-net with MRG_RXBUF and EVENT_IDX on top.
    BulkheadFull,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::Bulkhead => "bulkhead-net",
            Target::Ch => "ch vhost_user_net",
            Target::BulkheadFull => "bulkhead-net full",
        }
    }

    /// Features asked for on top of `driver::wanted_features()`.
    fn extra_features(self) -> u64 {
        match self {
            Target::BulkheadFull => {
                1 << 29 | 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF
            }
            _ => 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Row {
    TxTso,
    TxSmall,
    RxTso,
    RxSmall,
}

const ROWS: [Row; 4] = [Row::TxTso, Row::TxSmall, Row::RxTso, Row::RxSmall];

impl Row {
    fn label(self) -> &'static str {
        match self {
            Row::TxTso => "TX 64 KiB TSO",
            Row::TxSmall => "TX 64 B",
            Row::RxTso => "RX 64 KiB TSO",
            Row::RxSmall => "RX 64 B",
        }
    }
    fn tso(self) -> bool {
        matches!(self, Row::TxTso | Row::RxTso)
    }
    fn rx(self) -> bool {
        matches!(self, Row::RxTso | Row::RxSmall)
    }
    fn unit(self) -> &'static str {
        if self.tso() {
            "Gbit/s"
        } else {
            "Mpps"
        }
    }
}

/// One measurement of one row.
#[derive(Clone, Debug)]
struct Sample {
    value: f64,
    backend_cpu: f64,
    note: String,
}

/// The label of the tx rows' ceiling (`alone.rs`).
const ALONE: &str = "tap writes alone";

/// The sample with the median value (the upper one of an even count).
fn median(v: &[Sample]) -> &Sample {
    let mut sorted: Vec<&Sample> = v.iter().collect();
    sorted.sort_by(|a, b| a.value.total_cmp(&b.value));
    sorted[sorted.len() / 2]
}

fn max(v: &[Sample]) -> f64 {
    v.iter().map(|s| s.value).fold(f64::MIN, f64::max)
}

fn min(v: &[Sample]) -> f64 {
    v.iter().map(|s| s.value).fold(f64::MAX, f64::min)
}

fn value(row: Row, c: Count, secs: f64) -> f64 {
    if row.tso() {
        let payload = c.bytes.saturating_sub(c.frames * peer::TCP_HEADERS as u64);
        payload as f64 * 8.0 / secs / 1e9
    } else {
        c.frames as f64 / secs / 1e6
    }
}

struct Backend {
    child: Child,
    log: PathBuf,
}

impl Backend {
    fn start(target: Target, args: &Args, socket: &Path, tap: &str, log: &Path) -> Result<Self> {
        let mut cmd = match target {
            Target::Bulkhead | Target::BulkheadFull => {
                let mut c = Command::new(&args.bulkhead_net);
                c.arg("--socket-path")
                    .arg(socket)
                    .args([
                        "--tap",
                        tap,
                        "--mac",
                        "52:54:00:12:34:56",
                        "--queue-pairs",
                        "1",
                    ])
                    .arg("--queue-size")
                    .arg(args.queue_size.to_string());
                c
            }
            Target::Ch => {
                let mut c = Command::new(args.ch.as_ref().context("no --ch")?);
                c.arg("--net-backend").arg(format!(
                    "ip=10.98.0.1,mask=255.255.255.0,mac=52:54:00:12:34:56,socket={},\
                     num_queues=2,queue_size={},tap={tap}",
                    socket.display(),
                    args.queue_size
                ));
                c
            }
        };
        let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // SAFETY: only prctl between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {:?}", cmd.get_program()))?;
        let mut b = Backend {
            child,
            log: log.to_owned(),
        };
        let start = Instant::now();
        while !socket.exists() {
            if let Some(s) = b.child.try_wait()? {
                bail!(
                    "{} exited ({s}) before listening:\n{}",
                    target.label(),
                    b.log_tail()
                );
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("no socket after 10 s:\n{}", b.log_tail());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if target != Target::Ch {
            // Cloud Hypervisor's backend sets the address and brings its tap up itself.
            ip(&["addr", "add", "10.98.0.1/24", "dev", tap])?;
        }
        ip(&["link", "set", tap, "up"])?;
        Ok(b)
    }

    /// "exited", or "running" with what each of its threads is waiting in.
    fn state(&self) -> String {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        match stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
        {
            Some("Z") | None => "exited".to_string(),
            Some(state) => {
                // Each thread: name, state, and the system call it is in.
                let mut threads = String::new();
                let dir = format!("/proc/{}/task", self.child.id());
                for task in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let path = task.path();
                    let read = |f: &str| {
                        std::fs::read_to_string(path.join(f))
                            .unwrap_or_default()
                            .trim()
                            .to_string()
                    };
                    threads.push_str(&format!(
                        "\n  {} {}: wchan {}, syscall {}",
                        task.file_name().to_string_lossy(),
                        read("comm"),
                        read("wchan"),
                        read("syscall")
                    ));
                }
                format!("running (state {state}){threads}")
            }
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// CPU time (user + system) of all its threads, in seconds.
    fn cpu(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        f.get(11..13).map(|t| t.iter().sum::<u64>()).unwrap_or(0) as f64 / hz
    }

    fn stop(mut self) {
        // SAFETY: kill() on our own child, not reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub(crate) fn ip(args: &[&str]) -> Result<()> {
    let s = Command::new("ip")
        .args(args)
        .status()
        .context("run ip (iproute2)")?;
    if !s.success() {
        bail!("ip {} failed: {s}", args.join(" "));
    }
    Ok(())
}

/// The backend's calls in a measured window: each one the driver waited for, i.e. a wake-up
/// of a sleeping thread (on these VMs often a halted vCPU's, paid by the backend's thread).
fn calls_note(calls: u64, frames: u64) -> String {
    format!(
        "{calls} calls ({:.1} per 1000 frames)",
        calls as f64 * 1000.0 / frames.max(1) as f64
    )
}

/// Reap and resubmit on one ring until `until`, counting from `from` on.
fn pump(d: &mut NetDriver, rx: bool, len: u32, from: Instant, until: Instant) -> Result<Count> {
    let mut ids = Vec::with_capacity(usize::from(d.size()));
    let mut counted = Count::default();
    let mut idle = 0u32;
    loop {
        let now = Instant::now();
        if now >= until {
            return Ok(counted);
        }
        ids.clear();
        let mut c = Count::default();
        let n = d.reap(rx, &mut ids, &mut c)?;
        if now >= from {
            counted.frames += c.frames;
            counted.bytes += c.bytes;
        }
        for &id in &ids {
            d.push(rx, id, len)?;
        }
        d.publish(rx)?;
        if n == 0 {
            idle += 1;
            if idle > 4 {
                d.wait(rx, 50)?;
            }
        } else {
            idle = 0;
        }
    }
}

/// Wait until the device has used every tx descriptor made available.
fn drain_tx(d: &mut NetDriver) -> Result<()> {
    let start = Instant::now();
    let mut ids = Vec::new();
    while d.in_flight(false) > 0 {
        if start.elapsed() > Duration::from_secs(5) {
            bail!("{} tx frames still not used after 5 s", d.in_flight(false));
        }
        d.reap(false, &mut ids, &mut Count::default())?;
        if d.in_flight(false) > 0 {
            d.wait(false, 50)?;
        }
    }
    Ok(())
}

fn measure(d: &mut NetDriver, b: &Backend, row: Row, tap: &str, secs: f64) -> Result<Sample> {
    let warm = Duration::from_millis(300);
    let size = d.size();
    if row.rx() {
        let frame = if row.tso() {
            peer::tso_frame(true)
        } else {
            peer::small_frame(true)
        };
        if d.in_flight(true) == 0 {
            for id in 0..size {
                d.push(true, id, 0)?;
            }
            d.publish(true)?;
        }
        let src = Source::start(peer::ifindex(tap)?, peer::vnet_header(row.tso()), frame)?;
        let t0 = Instant::now();
        let from = t0 + warm;
        let until = from + Duration::from_secs_f64(secs);
        // Sent count and CPU at the start of the window: read by a short pump first.
        let _ = pump(d, true, 0, until, from)?;
        let (sent0, cpu0, (_, q0)) = (src.sent(), b.cpu(), peer::tap_counters(tap)?);
        let calls0 = d.calls(true);
        let c = pump(d, true, 0, from, until)?;
        let (sent1, cpu1, (_, q1)) = (src.sent(), b.cpu(), peer::tap_counters(tap)?);
        let calls = d.calls(true) - calls0;
        src.stop()?;
        Ok(Sample {
            value: value(row, c, secs),
            backend_cpu: (cpu1 - cpu0) / secs * 100.0,
            note: format!(
                "sent {} frames, tap took {}, driver got {} ({} B avg), {}",
                sent1 - sent0,
                q1 - q0,
                c.frames,
                c.bytes / c.frames.max(1),
                calls_note(calls, c.frames)
            ),
        })
    } else {
        let frame = if row.tso() {
            peer::tso_frame(false)
        } else {
            peer::small_frame(false)
        };
        let mut hdr = [0u8; HDR_LEN];
        hdr[..10].copy_from_slice(&peer::vnet_header(row.tso()));
        for id in 0..size {
            d.write_tx(id, &hdr, &frame)?;
        }
        let len = (HDR_LEN + frame.len()) as u32;
        drain_tx(d)?;
        for id in 0..size {
            d.push(false, id, len)?;
        }
        d.publish(false)?;
        let t0 = Instant::now();
        let from = t0 + warm;
        let until = from + Duration::from_secs_f64(secs);
        let _ = pump(d, false, len, until, from)?;
        let (cpu0, (r0, _)) = (b.cpu(), peer::tap_counters(tap)?);
        let calls0 = d.calls(false);
        let c = pump(d, false, len, from, until)?;
        let (cpu1, (r1, _)) = (b.cpu(), peer::tap_counters(tap)?);
        let calls = d.calls(false) - calls0;
        drain_tx(d)?;
        Ok(Sample {
            value: value(row, c, secs),
            backend_cpu: (cpu1 - cpu0) / secs * 100.0,
            note: format!(
                "driver sent {} frames, tap received {}, {}",
                c.frames,
                r1 - r0,
                calls_note(calls, c.frames)
            ),
        })
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    peer::own_namespace()?;
    let dir = std::env::temp_dir().join(format!("bulkhead-net-bench.{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut targets = vec![Target::Bulkhead];
    match &args.ch {
        Some(p) => {
            anyhow::ensure!(p.exists(), "--ch {}: no such file", p.display());
            targets.push(Target::Ch);
        }
        None => {
            println!("# Cloud Hypervisor's vhost_user_net: not given (--ch PATH), not measured")
        }
    }
    if !args.no_full {
        targets.push(Target::BulkheadFull);
    }
    println!(
        "# features asked for (each backend gets what it offers of them): {}",
        driver::feature_names(driver::wanted_features())
    );
    println!(
        "# queue size {}, one queue pair, {} s per row after 0.3 s warm-up, {} run(s), \
         backends taking turns; {} CPUs",
        args.queue_size,
        args.seconds,
        args.runs,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); ROWS.len()]; targets.len()];
    // The tx rows' ceiling, per row (empty for rx rows and with --no-alone).
    let mut alone_samples: Vec<Vec<Sample>> = vec![Vec::new(); ROWS.len()];
    for run in 0..args.runs {
        for (ti, &t) in targets.iter().enumerate() {
            let tap = format!(
                "nb{}{run}",
                match t {
                    Target::Bulkhead => "bh",
                    Target::Ch => "ch",
                    Target::BulkheadFull => "bf",
                }
            );
            let socket = dir.join(format!("{tap}.sock"));
            let log = dir.join(format!("{tap}.log"));
            let backend = Backend::start(t, &args, &socket, &tap, &log)?;
            let mut d = NetDriver::connect(&socket, args.queue_size, t.extra_features())
                .map_err(|e| e.context(format!("backend log:\n{}", backend.log_tail())))?;
            if run == 0 {
                println!(
                    "# {}: offered {:#x} ({}), acked {:#x} ({})",
                    t.label(),
                    d.offered,
                    driver::feature_names(d.offered),
                    d.features,
                    driver::feature_names(d.features)
                );
            }
            for (ri, &row) in ROWS.iter().enumerate() {
                let s = measure(&mut d, &backend, row, &tap, args.seconds)
                    .map_err(|e| e.context(format!("{} {}", t.label(), row.label())))?;
                eprintln!(
                    "run {} {:<18} {:<14} {:>7.3} {} cpu {:>3.0}%  {}",
                    run + 1,
                    t.label(),
                    row.label(),
                    s.value,
                    row.unit(),
                    s.backend_cpu,
                    s.note
                );
                if s.value == 0.0 {
                    // Nothing moved: say what the backend said, and whether it is still there.
                    eprintln!(
                        "run {} {} {}: nothing moved; driver's {} ring: {}; backend {}; its log:\n{}",
                        run + 1,
                        t.label(),
                        row.label(),
                        if row.rx() { "rx" } else { "tx" },
                        d.describe(row.rx()),
                        backend.state(),
                        backend.log_tail()
                    );
                }
                samples[ti][ri].push(s);
            }
            drop(d);
            backend.stop();
        }
        if !args.no_alone {
            for (ri, &row) in ROWS.iter().enumerate().filter(|(_, r)| !r.rx()) {
                let tap = format!("nbal{run}");
                let m = alone::tx(&tap, row.tso(), args.queue_size, args.seconds)
                    .with_context(|| format!("{ALONE} {}", row.label()))?;
                let c = Count {
                    frames: m.frames,
                    bytes: m.bytes,
                };
                let s = Sample {
                    value: value(row, c, args.seconds),
                    backend_cpu: m.cpu / args.seconds * 100.0,
                    note: format!("wrote {} frames, tap received {}", m.frames, m.tap_received),
                };
                eprintln!(
                    "run {} {:<18} {:<14} {:>7.3} {} cpu {:>3.0}%  {}",
                    run + 1,
                    ALONE,
                    row.label(),
                    s.value,
                    row.unit(),
                    s.backend_cpu,
                    s.note
                );
                alone_samples[ri].push(s);
            }
        }
    }
    println!(
        "{:<14} {:<18} {:>8} {:<6} {:>7} {:>8}  last run",
        "row", "backend", "median", "unit", "spread", "be. CPU"
    );
    let ch = targets.iter().position(|&t| t == Target::Ch);
    let mut ceilings = Vec::new();
    for (ri, &row) in ROWS.iter().enumerate() {
        let mut medians = Vec::new();
        let rows = targets
            .iter()
            .enumerate()
            .map(|(ti, t)| (t.label(), &samples[ti][ri]))
            .chain(std::iter::once((ALONE, &alone_samples[ri])).filter(|(_, v)| !v.is_empty()));
        for (label, v) in rows {
            let m = median(v);
            let spread = (max(v) - min(v)) / m.value.max(1e-9) * 100.0;
            let last = v.last().map_or("", |s| s.note.as_str());
            println!(
                "{:<14} {:<18} {:>8.3} {:<6} {:>6.0}% {:>7.0}%  {}",
                row.label(),
                label,
                m.value,
                row.unit(),
                spread,
                m.backend_cpu,
                last
            );
            medians.push(m.value);
        }
        let ratio = |what: &str, a: f64, b: f64| {
            println!("{:<14} {:<18} {:>8.2}x", row.label(), what, a / b.max(1e-9));
        };
        if let Some(ch) = ch {
            ratio("bulkhead / ch", medians[0], medians[ch]);
            if let Some(full) = targets.iter().position(|&t| t == Target::BulkheadFull) {
                ratio("full / ch", medians[full], medians[ch]);
            }
        }
        if !alone_samples[ri].is_empty() {
            let alone = medians[targets.len()];
            ratio("bulkhead / alone", medians[0], alone);
            if let Some(ch) = ch {
                ratio("ch / alone", medians[ch], alone);
                ceilings.push((row, medians[ch], alone));
            }
        }
    }
    for (row, ch, alone) in ceilings {
        println!(
            "# {}: 1.2x Cloud Hypervisor's median is {:.3} {}; one thread writing the same \
             frames into a tap with no backend moved {:.3} ({:.2}x Cloud Hypervisor's)",
            row.label(),
            1.2 * ch,
            row.unit(),
            alone,
            alone / ch.max(1e-9)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
