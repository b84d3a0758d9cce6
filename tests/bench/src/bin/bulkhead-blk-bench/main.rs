//! `bulkhead-blk-bench`: block I/O figures for vhost-user-blk backends, with no VM.
//!
//! This program is the vhost-user frontend and the guest driver at once: it shares a memfd
//! as guest memory with the backend, sets up one split virtqueue in it and drives virtio-blk
//! requests through it (see `vhost_blk.rs`), waiting for completions on the call eventfd (the
//! `irq` rows, as a guest waits for its interrupt) or by spinning on the used ring with calls
//! suppressed (the `poll` rows). For each of
//! - `bulkhead-block`, started here on the image, and again with `--poll-us`,
//! - `qemu-storage-daemon` exporting the same image as vhost-user-blk (io_uring),
//! - Cloud Hypervisor's `vhost_user_block` (`--ch PATH`) with `poll_queue=false` and with its
//!   default `poll_queue=true`,
//! - plain io_uring on the image file (no virtio, no second process: the ceiling), and the
//!   same with the file opened O_NONBLOCK, which lets io_uring complete page-cache reads
//!   inline instead of in a worker thread,
//!
//! it first checks that data goes to and comes from the right places (fails loudly if not).
//! With the polling driver it also measures, before and after the rows, what a depth-1
//! request costs besides its work when it finds the backend asleep (`wake.rs`).
//! Then it runs each workload for a fixed time, several times, the targets taking turns, and
//! prints per target the run with the median IOPS: IOPS, MiB/s, latency, CPU time (also the
//! backend's CPU microseconds per request, from its /proc/PID/stat, all threads), and the
//! spread between the fastest and the slowest run (the build machines are shared and
//! noisy). The image lives in tmpfs, so the figures are those of the I/O path, not of a
//! disk. It asserts nothing about speed.
//!
//! Usage (from the repository root): `target/release/bulkhead-blk-bench [--targets LIST]
//! [--bulkhead-block PATH] [--runs N] [--seconds S] [--size-mib N] ...`; see `--help`.

mod backend;
mod pin;
mod uring;
mod vhost_blk;
mod wake;
mod workload;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};

use backend::{own_cpu_time, BackendProcess};
use pin::{Pin, Placement};
use uring::UringFile;
use vhost_blk::VhostUserBlk;
use workload::{Engine, Figures, Op, Pattern, Workload};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    /// Bulkhead's vhost-user-blk backend.
    BulkheadBlock,
    /// The same with `--poll-us` (see `--poll-us`).
    BulkheadBlockPoll,
    /// QEMU's storage daemon as a vhost-user-blk backend.
    Qsd,
    /// Cloud Hypervisor's vhost_user_block with `poll_queue=false` (needs `--ch`).
    Ch,
    /// Cloud Hypervisor's vhost_user_block with its default `poll_queue=true` (needs `--ch`).
    ChPoll,
    /// io_uring straight on the image file.
    IoUring,
    /// The same on the file opened O_NONBLOCK: reads are tried inline before a worker.
    IoUringNonblock,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::BulkheadBlock => "bulkhead-block",
            Target::BulkheadBlockPoll => "bulkhead-block poll",
            Target::Qsd => "qemu-storage-daemon",
            Target::Ch => "ch poll_queue=false",
            Target::ChPoll => "ch poll_queue=true",
            Target::IoUring => "io_uring",
            Target::IoUringNonblock => "io_uring O_NONBLOCK",
        }
    }
}

/// Block I/O figures for vhost-user-blk backends, driven from a host-side virtqueue.
#[derive(Parser, Debug)]
#[command(name = "bulkhead-blk-bench")]
struct Args {
    /// The bulkhead-block binary.
    #[arg(long, default_value = "target/release/bulkhead-block")]
    bulkhead_block: PathBuf,
    /// The qemu-storage-daemon binary.
    #[arg(long, default_value = "qemu-storage-daemon")]
    qsd: PathBuf,
    /// Cloud Hypervisor's vhost_user_block binary; without it its targets are skipped (and
    /// the output says so).
    #[arg(long)]
    ch: Option<PathBuf>,
    /// What to measure, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "bulkhead-block,bulkhead-block-poll,qsd,ch,ch-poll,io-uring,io-uring-nonblock"
    )]
    targets: Vec<Target>,
    /// `--poll-us` of the `bulkhead-block-poll` target.
    #[arg(long, default_value_t = 50)]
    poll_us: u32,
    /// How the driver waits for completions, each mode a row of every workload: `irq` sleeps
    /// on the call eventfd (as a guest waits for its interrupt), `poll` spins on the used
    /// ring with calls suppressed (yielding the CPU between looks when it shares it with the
    /// backend, `--pin same`).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "irq,poll")]
    driver: Vec<Driver>,
    /// Open the image with O_DIRECT in every backend (bulkhead-block `--direct`, qsd
    /// `cache.direct=on`, Cloud Hypervisor `direct=true`); put `--image` on a regular file
    /// system then, tmpfs has no O_DIRECT.
    #[arg(long)]
    direct: bool,
    /// Image file, created and prefilled for each target, removed at the end; put it in
    /// tmpfs. Default: /dev/shm/bulkhead-blk-bench.<pid>.img.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Image size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Seconds per run of a workload (after a warm-up of a tenth of that, at most 0.5 s).
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Runs of each workload per target; the table shows the run with the median IOPS and
    /// the spread (fastest minus slowest, in % of the median).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Queue depth of the sequential workloads.
    #[arg(long, default_value_t = 8)]
    seq_depth: usize,
    /// Where the benchmark and the backend run for the interrupt-driven rows (see --help).
    #[arg(long, value_enum, default_value = "same")]
    pin: Pin,
    /// Where they run for the polling rows: two spinning sides on one CPU mostly wait for
    /// each other's time slice, so by default each gets a CPU of its own.
    #[arg(long, value_enum, default_value = "split")]
    pin_poll: Pin,
    /// Virtqueue size.
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Do not negotiate VIRTIO_RING_F_EVENT_IDX (notification suppression by index).
    #[arg(long)]
    no_event_idx: bool,
    /// Keep the image file at the end.
    #[arg(long)]
    keep_image: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Driver {
    Irq,
    Poll,
}

impl Driver {
    fn label(self) -> &'static str {
        match self {
            Driver::Irq => "irq",
            Driver::Poll => "poll",
        }
    }
}

impl Args {
    fn image(&self) -> &Path {
        self.image.as_deref().expect("main() sets the image path")
    }
}

const LARGE: u32 = 128 * 1024;

fn workloads(seq_depth: usize) -> Vec<Workload> {
    vec![
        Workload {
            name: "randread 4k",
            op: Op::Read,
            pattern: Pattern::Random,
            block: 4096,
            depth: 1,
        },
        Workload {
            name: "randread 4k",
            op: Op::Read,
            pattern: Pattern::Random,
            block: 4096,
            depth: 32,
        },
        Workload {
            name: "randwrite 4k",
            op: Op::Write,
            pattern: Pattern::Random,
            block: 4096,
            depth: 1,
        },
        Workload {
            name: "randwrite 4k",
            op: Op::Write,
            pattern: Pattern::Random,
            block: 4096,
            depth: 32,
        },
        Workload {
            name: "seqread 128k",
            op: Op::Read,
            pattern: Pattern::Sequential,
            block: LARGE,
            depth: seq_depth,
        },
        Workload {
            name: "seqwrite 128k",
            op: Op::Write,
            pattern: Pattern::Sequential,
            block: LARGE,
            depth: seq_depth,
        },
    ]
}

/// A path under test, set up and ready for requests.
struct Session {
    engine: Box<dyn Engine>,
    /// The backend process, for CPU time and shutdown; none for io_uring.
    backend: Option<BackendProcess>,
}

fn open_target(
    args: &Args,
    target: Target,
    dir: &Path,
    slots: usize,
    place: Placement,
) -> Result<Session> {
    let socket = dir.join(format!("{target:?}.sock"));
    let log = dir.join(format!("{target:?}.log"));
    let _ = std::fs::remove_file(&socket);
    let mut backend = match target {
        Target::IoUring | Target::IoUringNonblock => {
            let nonblock = target == Target::IoUringNonblock;
            let engine = UringFile::open(args.image(), slots, LARGE, nonblock, place.backend)?;
            return Ok(Session {
                engine: Box::new(engine),
                backend: None,
            });
        }
        Target::BulkheadBlock | Target::BulkheadBlockPoll => {
            let mut extra = Vec::new();
            if target == Target::BulkheadBlockPoll {
                extra.extend(["--poll-us".to_string(), args.poll_us.to_string()]);
            }
            if args.direct {
                extra.push("--direct".into());
            }
            BackendProcess::bulkhead_block(
                &args.bulkhead_block,
                args.image(),
                &socket,
                &log,
                args.queue_size,
                &extra,
                place.backend,
            )?
        }
        Target::Qsd => BackendProcess::qemu_storage_daemon(
            &args.qsd,
            args.image(),
            &socket,
            &log,
            args.direct,
            place.backend,
        )?,
        Target::Ch | Target::ChPoll => BackendProcess::cloud_hypervisor(
            args.ch.as_deref().context("no --ch")?,
            args.image(),
            &socket,
            &log,
            args.queue_size,
            target == Target::ChPoll,
            args.direct,
            place.backend,
        )?,
    };
    backend.wait_for_socket(&socket, Duration::from_secs(10))?;
    let engine = VhostUserBlk::connect(&socket, args.queue_size, slots, LARGE, !args.no_event_idx)
        .map_err(|e| e.context(format!("backend log:\n{}", backend.log_tail())))?;
    let i = &engine.info;
    println!(
        "# {}: capacity {} MiB, features offered {:#x} acked {:#x}, protocol features {:#x}, \
         {} queue(s), size_max {:?}, seg_max {:?}, blk_size {:?}, EVENT_IDX {}, RO {}",
        target.label(),
        i.capacity >> 20,
        i.offered_features,
        i.features,
        i.protocol_features.bits(),
        i.queues,
        i.size_max,
        i.seg_max,
        i.blk_size,
        if i.event_idx { "on" } else { "off" },
        i.read_only,
    );
    anyhow::ensure!(
        i.capacity == args.size_mib << 20,
        "backend reports capacity {} bytes, image has {}",
        i.capacity,
        args.size_mib << 20
    );
    anyhow::ensure!(!i.read_only, "backend offers a read-only device");
    Ok(Session {
        engine: Box::new(engine),
        backend: Some(backend),
    })
}

struct Row {
    figures: Figures,
    backend_cpu: Option<Duration>,
    bench_cpu: Duration,
}

impl Row {
    /// CPU time as a percentage of one CPU over the run.
    fn cpu_pct(&self, d: Duration) -> String {
        format!(
            "{:.0}",
            100.0 * d.as_secs_f64() / self.figures.elapsed.as_secs_f64()
        )
    }
}

fn print_header() {
    println!(
        "{:<14} {:>3} {:<4}  {:<20} {:>9} {:>6} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6}",
        "workload",
        "QD",
        "drv",
        "target",
        "IOPS",
        "spread",
        "MiB/s",
        "lat avg",
        "lat p50",
        "lat p99",
        "backend",
        "backend",
        "bench"
    );
    println!(
        "{:<14} {:>3} {:<4}  {:<20} {:>9} {:>6} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6}",
        "", "", "", "", "median", "%", "", "us", "us", "us", "CPU %", "us/IO", "CPU %"
    );
}

/// One line: the run with the median IOPS, and how far apart the fastest and slowest were.
fn print_row(w: &Workload, driver: Driver, target: Target, rows: &mut [Row]) {
    rows.sort_by(|a, b| a.figures.iops().total_cmp(&b.figures.iops()));
    let (Some(min), Some(max)) = (rows.first(), rows.last()) else {
        return;
    };
    let r = &rows[(rows.len() - 1) / 2];
    let f = &r.figures;
    let spread = 100.0 * (max.figures.iops() - min.figures.iops()) / f.iops().max(1.0);
    println!(
        "{:<14} {:>3} {:<4}  {:<20} {:>9.0} {:>6.0} {:>9.1} {:>8.1} {:>8.1} {:>8.1} {:>8} {:>8} {:>6}",
        w.name,
        w.depth,
        driver.label(),
        target.label(),
        f.iops(),
        spread,
        f.mib_per_s(),
        f.mean_latency_us(),
        f.latency_us(0.5),
        f.latency_us(0.99),
        r.backend_cpu
            .map(|d| r.cpu_pct(d))
            .unwrap_or_else(|| "-".into()),
        r.backend_cpu
            .map(|d| format!("{:.2}", d.as_secs_f64() * 1e6 / f.ops.max(1) as f64))
            .unwrap_or_else(|| "-".into()),
        r.cpu_pct(r.bench_cpu),
    );
    let _ = std::io::stdout().flush();
}

fn measure(
    args: &Args,
    s: &mut Session,
    w: &Workload,
    driver: Driver,
    place: Placement,
) -> Result<Row> {
    let size = args.size_mib << 20;
    // The placement of this row's driver mode, for this thread and the backend's threads.
    pin::repin_current_thread(place.bench).context("bind the benchmark thread")?;
    if let Some(b) = &s.backend {
        b.pin(place.backend);
    }
    let same_cpu = place.bench.is_some() && place.bench == place.backend;
    s.engine.set_poll(driver == Driver::Poll, same_cpu)?;
    let duration = Duration::from_secs_f64(args.seconds);
    let warmup = (duration / 10).min(Duration::from_millis(500));
    workload::run(s.engine.as_mut(), w, size, warmup).context("warm-up")?;
    let backend_cpu0 = s
        .backend
        .as_ref()
        .map(BackendProcess::cpu_time)
        .transpose()?;
    let bench_cpu0 = own_cpu_time();
    let figures = workload::run(s.engine.as_mut(), w, size, duration);
    let bench_cpu = own_cpu_time() - bench_cpu0;
    s.engine.set_poll(false, same_cpu)?;
    let figures = figures?;
    let backend_cpu = match (&s.backend, backend_cpu0) {
        (Some(b), Some(t0)) => Some(b.cpu_time()? - t0),
        _ => None,
    };
    Ok(Row {
        figures,
        backend_cpu,
        bench_cpu,
    })
}

/// Prefill the image, start and connect `target`, and check its data path.
fn prepare(
    args: &Args,
    target: Target,
    dir: &Path,
    slots: usize,
    place: Placement,
) -> Result<Session> {
    let size = args.size_mib << 20;
    workload::prefill(args.image(), size)?;
    let mut session = open_target(args, target, dir, slots, place)?;
    let t = Instant::now();
    workload::verify(session.engine.as_mut(), args.image(), size, LARGE).context("data check")?;
    println!(
        "# {}: data check passed ({} ms)",
        target.label(),
        t.elapsed().as_millis()
    );
    Ok(session)
}

/// Stop the queue, disconnect, and see the backend go; remarks go to `notes`.
fn close(target: Target, session: Session, notes: &mut Vec<String>) -> Result<()> {
    let Session {
        mut engine,
        backend,
    } = session;
    let result = engine.close().context("stop the queue");
    if let Ok(remarks) = &result {
        notes.extend(remarks.iter().map(|r| format!("{}: {r}", target.label())));
    }
    drop(engine);
    if let Some(remark) = backend.and_then(BackendProcess::finish) {
        notes.push(format!("{}: {remark}", target.label()));
    }
    result.map(|_| ())
}

/// The first three fields of /proc/loadavg: the machine is shared, the figures say how much.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Prints what one sleep and wake-up of a backend costs on the polling rows' CPUs
/// (`wake.rs`); a failure to measure it is printed, not fatal: it is a reference, not a row.
fn print_wake_cost(place: Placement, when: &str) {
    match wake::measure(place, 1.0) {
        Ok(t) => println!(
            "# {when}: a thread asleep in epoll_wait, doing nothing else, answered the polling \
             driver's kick in {:.1} us (median of {}): what a depth-1 request costs on these \
             CPUs, besides its work, when it finds the backend asleep",
            t.median.as_secs_f64() * 1e6,
            t.count,
        ),
        Err(e) => {
            println!("# {when}: the cost of a sleeping backend's wake-up not measured: {e:#}")
        }
    }
}

fn main() -> std::process::ExitCode {
    let mut args = Args::parse();
    if !(args.seconds > 0.0 && args.seconds < 3600.0) {
        eprintln!("error: --seconds must be between 0 and 3600");
        return std::process::ExitCode::FAILURE;
    }
    let default_image = format!("/dev/shm/bulkhead-blk-bench.{}.img", std::process::id());
    args.image.get_or_insert_with(|| default_image.into());
    let dir = std::env::temp_dir().join(format!("bulkhead-blk-bench.{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("error: create {}: {e}", dir.display());
        return std::process::ExitCode::FAILURE;
    }
    let all = workloads(args.seq_depth);
    let slots = all.iter().map(|w| w.depth).max().unwrap_or(1);
    let (place, place_poll) = match (args.pin.placement(), args.pin_poll.placement()) {
        (Ok(p), Ok(q)) => (p, q),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Some(cpu) = place.bench {
        if let Err(e) = pin::pin_current_thread(cpu) {
            eprintln!("error: bind to CPU {cpu}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    println!(
        "# bulkhead-blk-bench: {} MiB image at {}; each workload {} times {} s per target, \
         targets taking turns; CPUs: benchmark {}, backend {} (polling rows: {}, {}); \
         virtqueue size {}, EVENT_IDX {}; \
         O_DIRECT {}; load average at start {}",
        args.size_mib,
        args.image().display(),
        args.runs,
        args.seconds,
        place.bench.map_or("any".into(), |c| c.to_string()),
        place.backend.map_or("any".into(), |c| c.to_string()),
        place_poll.bench.map_or("any".into(), |c| c.to_string()),
        place_poll.backend.map_or("any".into(), |c| c.to_string()),
        args.queue_size,
        if args.no_event_idx {
            "off"
        } else {
            "if offered"
        },
        if args.direct { "on" } else { "off" },
        loadavg(),
    );
    let mut failed = false;
    let mut notes = Vec::new();

    // Every target is set up and checked first and stays connected, so that the runs of a
    // workload can take turns: a slow spell of the machine then hits all targets alike.
    let mut live: Vec<(Target, Option<Session>)> = Vec::new();
    for &target in &args.targets {
        if matches!(target, Target::Ch | Target::ChPoll) && args.ch.is_none() {
            notes.push(format!(
                "{}: skipped, no --ch PATH (Cloud Hypervisor's vhost_user_block binary)",
                target.label()
            ));
            continue;
        }
        if matches!(target, Target::BulkheadBlock | Target::BulkheadBlockPoll)
            && !args.bulkhead_block.exists()
        {
            notes.push(format!(
                "bulkhead-block: skipped, {} not found (cargo build --release -p bulkhead-block)",
                args.bulkhead_block.display()
            ));
            continue;
        }
        match prepare(&args, target, &dir, slots, place) {
            Ok(session) => live.push((target, Some(session))),
            Err(e) => {
                failed = true;
                println!("# {} FAILED: {e:#}", target.label());
            }
        }
    }

    let polling = args.driver.contains(&Driver::Poll);
    if polling {
        print_wake_cost(place_poll, "before the rows");
    }
    if !live.is_empty() {
        print_header();
    }
    let rows: Vec<(Workload, Driver)> = all
        .iter()
        .flat_map(|w| args.driver.iter().map(move |d| (*w, *d)))
        .collect();
    for (w, driver) in &rows {
        let (w, driver) = (w, *driver);
        let mut samples: Vec<Vec<Row>> = live.iter().map(|_| Vec::new()).collect();
        let mut errors: Vec<Option<anyhow::Error>> = live.iter().map(|_| None).collect();
        for _ in 0..args.runs {
            for (i, (_, session)) in live.iter_mut().enumerate() {
                let Some(s) = session.as_mut() else { continue };
                let p = match driver {
                    Driver::Irq => place,
                    Driver::Poll => place_poll,
                };
                match measure(&args, s, w, driver, p) {
                    Ok(row) => samples[i].push(row),
                    Err(e) => {
                        errors[i] = Some(e);
                        *session = None;
                    }
                }
            }
        }
        for (i, (target, _)) in live.iter().enumerate() {
            if let Some(e) = &errors[i] {
                failed = true;
                println!(
                    "{:<14} {:>3} {:<4}  {:<20} FAILED: {e:#}",
                    w.name,
                    w.depth,
                    driver.label(),
                    target.label()
                );
            } else {
                print_row(w, driver, *target, &mut samples[i]);
            }
        }
    }
    for (target, session) in live {
        if let Some(session) = session {
            if let Err(e) = close(target, session, &mut notes) {
                failed = true;
                notes.push(format!("{}: {e:#}", target.label()));
            }
        }
    }

    if polling {
        print_wake_cost(place_poll, "after the rows");
    }
    println!("# load average at end {}", loadavg());
    for n in &notes {
        println!("# note: {n}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    if !args.keep_image {
        let _ = std::fs::remove_file(args.image());
    }
    if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
