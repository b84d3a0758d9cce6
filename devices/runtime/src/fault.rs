//! Fault injection inside a device process (docs/fault-injection.md), for testing what a
//! guest does when its device fails. On the control channel, `fault FAULT` (the VMM's
//! `vm.inject-fault`, `bulkhead-ctl inject-fault ID FAULT`):
//! - `crash`: the process aborts after its reply;
//! - `seccomp`: it makes a call every device filter forbids (and is killed for it);
//! - `hang`: it stops answering: its control thread and its workers stop for good (no call,
//!   so no filter is involved), and the VMM's liveness probe must catch it;
//! - `oom`: it allocates and touches memory until its memory limit kills it;
//! - `crash_after=N`: it aborts when it takes its Nth request from now (requests in flight);
//! - `eio=N`: every Nth read or write from now fails with an I/O error (block);
//! - `eio=A-B`: every read or write touching sectors A to B (inclusive) fails (block);
//! - `delay_ms=N`: every request waits N ms before it is served (block: the queue's requests
//!   one after another, so a request's latency grows by N ms at queue depth 1);
//! - `drop=N`: every Nth frame the guest sends is dropped (net);
//! - `corrupt=N`: every Nth frame the guest sends (not counting large, segmentation-offloaded
//!   ones) goes out with its last byte flipped and a checksum that no longer matches (net);
//! - `clear`: disarms crash_after, eio, delay_ms, drop and corrupt.
//!
//! At start, `--fault FAULT` arms `crash_after=N`, `eio=...`, `delay_ms=N`, `drop=N` or
//! `corrupt=N` (the
//! VMM's `--disk ...,fault=FAULT`, `--net ...,fault=FAULT`); every process started in its
//! place gets it again. Counting, failing and delaying requests needs the device's hooks
//! ([`request_taken`], [`request_fault`]): bulkhead-block has them; dropping and corrupting
//! frames needs [`frame_dropped`] and [`frame_corrupted`]: bulkhead-net has them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use log::{error, warn};

/// Device kinds that call [`request_taken`] and [`request_fault`] for each request they take.
const COUNTING_KINDS: [&str; 1] = ["block"];
/// Device kinds that call [`frame_dropped`] and [`frame_corrupted`] for the frames the guest
/// sends.
const FRAME_KINDS: [&str; 1] = ["net"];

/// Longest `delay_ms`: a minute per request is a hung device, for which there is `hang`.
pub const MAX_DELAY_MS: u64 = 60_000;

/// Bytes `oom` maps at a time.
const OOM_CHUNK: usize = 16 << 20;
/// Bytes after which `oom` gives up on being killed.
const OOM_GIVE_UP: u64 = 16 << 30;

static KIND: OnceLock<&'static str> = OnceLock::new();
/// Requests left before the armed crash (0: none armed).
static CRASH_AFTER: AtomicU64 = AtomicU64::new(0);
/// What to do once the control reply is out.
static AFTER_REPLY: AtomicU64 = AtomicU64::new(AFTER_NOTHING);
const AFTER_NOTHING: u64 = 0;
const AFTER_CRASH: u64 = 1;
const AFTER_HANG: u64 = 2;
const AFTER_OOM: u64 = 3;
/// `hang` was injected: workers stop at their next request.
static HANGING: AtomicBool = AtomicBool::new(false);
/// `eio=N`: every Nth request fails (0: off); the count since it was armed.
static EIO_EVERY: AtomicU64 = AtomicU64::new(0);
static EIO_COUNT: AtomicU64 = AtomicU64::new(0);
/// `eio=A-B`: first and last sector (first > last: off).
static EIO_FIRST: AtomicU64 = AtomicU64::new(1);
static EIO_LAST: AtomicU64 = AtomicU64::new(0);
/// `delay_ms=N` (0: off).
static DELAY_MS: AtomicU64 = AtomicU64::new(0);
/// `drop=N`: every Nth frame is dropped (0: off); the count since it was armed.
static DROP_EVERY: AtomicU64 = AtomicU64::new(0);
static DROP_COUNT: AtomicU64 = AtomicU64::new(0);
/// `corrupt=N`: every Nth frame is corrupted (0: off); the count since it was armed.
static CORRUPT_EVERY: AtomicU64 = AtomicU64::new(0);
static CORRUPT_COUNT: AtomicU64 = AtomicU64::new(0);

/// The device's kind, set once at start.
pub fn set_kind(kind: &'static str) {
    let _ = KIND.set(kind);
}

fn kind_in(kinds: &[&str]) -> bool {
    KIND.get().is_some_and(|k| kinds.contains(k))
}

/// A fault that changes how requests are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RequestFault {
    CrashAfter(u64),
    EioEvery(u64),
    EioSectors(u64, u64),
    DelayMs(u64),
    DropEvery(u64),
    CorruptEvery(u64),
}

fn number(what: &str, n: &str, min: u64, max: u64) -> Result<u64, String> {
    n.parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| format!("{what}={n:?}: expected a number from {min} to {max}"))
}

/// Parses the faults that change how requests are served; `None`: not one of them.
fn parse_request_fault(fault: &str) -> Option<Result<RequestFault, String>> {
    let (name, value) = fault.split_once('=')?;
    Some(match name {
        "crash_after" => number(name, value, 1, u64::MAX).map(RequestFault::CrashAfter),
        "delay_ms" => number(name, value, 1, MAX_DELAY_MS).map(RequestFault::DelayMs),
        "drop" => number(name, value, 1, u64::MAX).map(RequestFault::DropEvery),
        "corrupt" => number(name, value, 1, u64::MAX).map(RequestFault::CorruptEvery),
        "eio" => match value.split_once('-') {
            None => number(name, value, 1, u64::MAX).map(RequestFault::EioEvery),
            Some((a, b)) => {
                let first = number("eio first sector", a, 0, u64::MAX);
                let last = number("eio last sector", b, 0, u64::MAX);
                match (first, last) {
                    (Ok(a), Ok(b)) if a <= b => Ok(RequestFault::EioSectors(a, b)),
                    (Ok(a), Ok(b)) => {
                        Err(format!("eio={a}-{b}: the first sector is after the last"))
                    }
                    (Err(e), _) | (_, Err(e)) => Err(e),
                }
            }
        },
        _ => return None,
    })
}

fn arm(fault: RequestFault) -> Result<String, String> {
    let (kinds, what) = match fault {
        RequestFault::DropEvery(_) | RequestFault::CorruptEvery(_) => (&FRAME_KINDS[..], "frames"),
        _ => (&COUNTING_KINDS[..], "requests"),
    };
    if !kind_in(kinds) {
        return Err(format!(
            "{fault:?} acts on {what}, which this device ({}) does not count",
            KIND.get().copied().unwrap_or("unknown")
        ));
    }
    let armed = match fault {
        RequestFault::CrashAfter(n) => {
            CRASH_AFTER.store(n, Ordering::Release);
            format!("crash after {n} request(s)")
        }
        RequestFault::EioEvery(n) => {
            EIO_COUNT.store(0, Ordering::Release);
            EIO_EVERY.store(n, Ordering::Release);
            format!("every {n}th read or write fails (EIO)")
        }
        RequestFault::EioSectors(a, b) => {
            // Off while the two are written (first > last), then on.
            EIO_FIRST.store(u64::MAX, Ordering::Release);
            EIO_LAST.store(b, Ordering::Release);
            EIO_FIRST.store(a, Ordering::Release);
            format!("reads and writes touching sectors {a}-{b} fail (EIO)")
        }
        RequestFault::DelayMs(ms) => {
            DELAY_MS.store(ms, Ordering::Release);
            format!("every request waits {ms} ms")
        }
        RequestFault::DropEvery(n) => {
            DROP_COUNT.store(0, Ordering::Release);
            DROP_EVERY.store(n, Ordering::Release);
            format!("every {n}th frame the guest sends is dropped")
        }
        RequestFault::CorruptEvery(n) => {
            CORRUPT_COUNT.store(0, Ordering::Release);
            CORRUPT_EVERY.store(n, Ordering::Release);
            format!("every {n}th frame the guest sends (not segmentation-offloaded) is corrupted")
        }
    };
    warn!("fault armed: {armed}");
    Ok(format!("armed: {armed}"))
}

fn clear() -> String {
    CRASH_AFTER.store(0, Ordering::Release);
    EIO_EVERY.store(0, Ordering::Release);
    EIO_FIRST.store(1, Ordering::Release);
    EIO_LAST.store(0, Ordering::Release);
    DELAY_MS.store(0, Ordering::Release);
    DROP_EVERY.store(0, Ordering::Release);
    CORRUPT_EVERY.store(0, Ordering::Release);
    warn!("faults cleared");
    "cleared".into()
}

/// `--fault FAULT` at start: `crash_after=N`, `eio=N`, `eio=A-B`, `delay_ms=N`, `drop=N`,
/// `corrupt=N`.
pub fn arm_at_start(fault: &str) -> Result<(), String> {
    match parse_request_fault(fault) {
        Some(f) => arm(f?).map(|_| ()),
        None => Err(format!(
            "--fault {fault:?}: only crash_after=N, eio=N, eio=A-B, delay_ms=N, drop=N and corrupt=N can be armed at start"
        )),
    }
}

/// `fault FAULT` on the control channel.
pub fn inject(fault: &str) -> Result<String, String> {
    let fault = fault.trim();
    if let Some(f) = parse_request_fault(fault) {
        return arm(f?);
    }
    match fault {
        "crash" => {
            warn!("fault injected: crash (the process aborts now)");
            AFTER_REPLY.store(AFTER_CRASH, Ordering::Release);
            Ok("crashing".into())
        }
        "hang" => {
            warn!("fault injected: hang (the process stops answering)");
            HANGING.store(true, Ordering::Release);
            AFTER_REPLY.store(AFTER_HANG, Ordering::Release);
            Ok("hanging".into())
        }
        "oom" => {
            warn!("fault injected: oom (the process allocates until its memory limit kills it)");
            AFTER_REPLY.store(AFTER_OOM, Ordering::Release);
            Ok("allocating".into())
        }
        "clear" => Ok(clear()),
        "seccomp" => {
            warn!("fault injected: seccomp (a call the device's filter forbids: socket(AF_INET))");
            // SAFETY: socket(2) with integer arguments; a returned descriptor is closed.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            if fd >= 0 {
                // SAFETY: closing the descriptor just created.
                unsafe { libc::close(fd) };
            }
            // Only reached without a filter.
            Err("the seccomp filter is off (--seccomp off): the forbidden call was allowed".into())
        }
        other => Err(format!(
            "unknown fault {other:?} (crash, seccomp, hang, oom, crash_after=N, eio=N, eio=A-B, delay_ms=N, drop=N, corrupt=N, clear)"
        )),
    }
}

/// Stops the calling thread for good (`hang`): a futex wait, which every filter allows.
fn stop_forever() -> ! {
    loop {
        std::thread::park();
    }
}

/// Maps and touches shared anonymous memory until the kernel's OOM killer ends the process
/// (`oom`). Shared memory, because private memory would hit the process's RLIMIT_DATA first
/// and end in an allocation failure (an abort), not in the OOM kill of its cgroup's
/// memory.max this fault is for. Without a memory limit the process gives up, aborting,
/// after [`OOM_GIVE_UP`] bytes.
fn exhaust_memory() -> ! {
    let mut total = 0u64;
    while total < OOM_GIVE_UP {
        // SAFETY: a new anonymous shared mapping, not executable; only written below, within
        // its length, and never unmapped (the process is meant to die holding it).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                OOM_CHUNK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            error!("fault oom: mmap failed after {} MiB; aborting", total >> 20);
            std::process::abort();
        }
        for offset in (0..OOM_CHUNK).step_by(4096) {
            // SAFETY: within the mapping just made.
            unsafe { p.cast::<u8>().add(offset).write_volatile(0x5a) };
        }
        total += OOM_CHUNK as u64;
    }
    error!(
        "fault oom: {} MiB and not killed: no memory limit; aborting",
        total >> 20
    );
    std::process::abort();
}

/// Called by the control thread once a reply is out: `fault crash` aborts here (SIGABRT, as a
/// crash of the device would), `hang` stops the control thread, `oom` starts allocating on a
/// thread of its own: the control thread goes on answering, so that what ends the process is
/// its memory limit, not the VMM's liveness probe (a control thread busy allocating for more
/// than two pings would be taken for hung).
pub fn after_reply() {
    match AFTER_REPLY.swap(AFTER_NOTHING, Ordering::AcqRel) {
        AFTER_CRASH => std::process::abort(),
        AFTER_HANG => stop_forever(),
        AFTER_OOM => {
            if let Err(e) = bulkhead_sandbox::thread_builder()
                .name("fault-oom".into())
                .spawn(|| exhaust_memory())
            {
                warn!("fault oom: no thread for it ({e}); allocating on the control thread");
                exhaust_memory();
            }
        }
        _ => {}
    }
}

/// A device took a request from a ring (before doing it): a hung device stops here, and an
/// armed `crash_after` counts it, aborting at the last one with that request (and its batch)
/// in flight.
pub fn request_taken() {
    if HANGING.load(Ordering::Acquire) {
        stop_forever();
    }
    if CRASH_AFTER.load(Ordering::Acquire) == 0 {
        return;
    }
    if CRASH_AFTER.fetch_sub(1, Ordering::AcqRel) == 1 {
        error!("fault injected: crash_after reached; aborting with requests in flight");
        std::process::abort();
    }
}

/// A read or write of `sectors` sectors at `sector` is about to be served: waits out an armed
/// `delay_ms`, and answers whether an armed `eio` fails it.
pub fn request_fault(sector: u64, sectors: u64) -> bool {
    let ms = DELAY_MS.load(Ordering::Acquire);
    if ms > 0 {
        // park_timeout is a futex wait, which every filter allows (nanosleep is not in them);
        // it may return early, hence the loop.
        let until = Instant::now() + Duration::from_millis(ms);
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            if left.is_zero() {
                break;
            }
            std::thread::park_timeout(left);
        }
    }
    let first = EIO_FIRST.load(Ordering::Acquire);
    let last = EIO_LAST.load(Ordering::Acquire);
    let end = sector.saturating_add(sectors.max(1) - 1);
    if first <= last && sector <= last && end >= first {
        return true;
    }
    let every = EIO_EVERY.load(Ordering::Acquire);
    every > 0 && (EIO_COUNT.fetch_add(1, Ordering::AcqRel) + 1).is_multiple_of(every)
}

/// The guest sent a frame (net): whether an armed `drop=N` drops it.
pub fn frame_dropped() -> bool {
    let every = DROP_EVERY.load(Ordering::Acquire);
    every > 0 && (DROP_COUNT.fetch_add(1, Ordering::AcqRel) + 1).is_multiple_of(every)
}

/// Whether a `corrupt=N` is armed (a cheap check before the device looks at a frame).
pub fn corrupt_armed() -> bool {
    CORRUPT_EVERY.load(Ordering::Acquire) > 0
}

/// The guest sent a frame that can be corrupted (net): whether an armed `corrupt=N` picks it.
pub fn frame_corrupted() -> bool {
    let every = CORRUPT_EVERY.load(Ordering::Acquire);
    every > 0 && (CORRUPT_COUNT.fetch_add(1, Ordering::AcqRel) + 1).is_multiple_of(every)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The faults are process-wide statics: one test does them in order.
    #[test]
    fn test_fault_parse_kinds_and_request_faults() {
        assert!(inject("melt")
            .expect_err("refused")
            .contains("unknown fault"));
        assert!(inject("crash_after=0")
            .expect_err("refused")
            .contains("1 to"));
        assert!(arm_at_start("crash").is_err());
        assert!(arm_at_start("hang").is_err());
        // Before the kind is known (or for a kind that does not count), refused.
        assert!(inject("crash_after=3")
            .expect_err("refused")
            .contains("does not count"));
        assert!(inject("eio=2").is_err());
        set_kind("block");
        for bad in [
            "eio=0",
            "eio=9-3",
            "eio=a-3",
            "eio=-3",
            "delay_ms=0",
            "delay_ms=60001",
        ] {
            assert!(inject(bad).is_err(), "{bad} accepted");
        }
        // eio=A-B: only requests touching the range fail.
        assert!(inject("eio=100-199").is_ok());
        assert!(!request_fault(0, 100), "ends before the range");
        assert!(request_fault(93, 8), "ends at its first sector");
        assert!(request_fault(150, 1));
        assert!(request_fault(199, 8), "starts at its last sector");
        assert!(!request_fault(200, 8), "starts after it");
        assert!(request_fault(0, 4096), "spans it");
        assert_eq!(inject("clear").as_deref(), Ok("cleared"));
        assert!(!request_fault(150, 1));
        // eio=N: every Nth request from now.
        arm_at_start("eio=3").expect("armed at start");
        let failed: Vec<bool> = (0..7).map(|i| request_fault(i * 1000, 8)).collect();
        assert_eq!(failed, [false, false, true, false, false, true, false]);
        inject("clear").expect("cleared");
        // delay_ms=N: each request waits at least N ms.
        inject("delay_ms=30").expect("armed");
        let t = Instant::now();
        assert!(!request_fault(0, 8));
        assert!(
            t.elapsed() >= Duration::from_millis(30),
            "{:?}",
            t.elapsed()
        );
        inject("clear").expect("cleared");
        let t = Instant::now();
        request_fault(0, 8);
        assert!(t.elapsed() < Duration::from_millis(30));
        // drop=N is for net: refused by a block device.
        assert!(inject("drop=2").expect_err("block").contains("frames"));
        assert!(!frame_dropped());
        // What drop=3 arms in a net device (whose kind this test process cannot take too).
        DROP_COUNT.store(0, Ordering::Release);
        DROP_EVERY.store(3, Ordering::Release);
        let dropped: Vec<bool> = (0..6).map(|_| frame_dropped()).collect();
        assert_eq!(dropped, [false, false, true, false, false, true]);
        assert_eq!(inject("clear").as_deref(), Ok("cleared"));
        assert!(!frame_dropped());
        // corrupt=N likewise.
        assert!(inject("corrupt=2").expect_err("block").contains("frames"));
        assert!(inject("corrupt=0").is_err());
        assert!(!corrupt_armed());
        CORRUPT_COUNT.store(0, Ordering::Release);
        CORRUPT_EVERY.store(2, Ordering::Release);
        assert!(corrupt_armed());
        let corrupted: Vec<bool> = (0..4).map(|_| frame_corrupted()).collect();
        assert_eq!(corrupted, [false, true, false, true]);
        inject("clear").expect("cleared");
        assert!(!corrupt_armed() && !frame_corrupted());
    }
}
