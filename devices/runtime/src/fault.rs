//! Fault injection inside a device process (docs/restart.md), for testing what a guest does
//! when its device fails. On the control channel: `fault crash` (the process aborts after its
//! reply), `fault seccomp` (it makes a call every device filter forbids), `fault
//! crash_after=N` (it aborts when it takes its Nth request from now: with requests in flight);
//! at start, `--fault crash_after=N` (the VMM's `--disk ...,fault=crash_after=N`; every process
//! started in its place gets it again, so the disk keeps failing until the restart policy gives
//! up). Counting requests needs the device's hook ([`request_taken`]): bulkhead-block has it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use log::{error, warn};

/// Device kinds that call [`request_taken`] for each request they take.
const COUNTING_KINDS: [&str; 1] = ["block"];

static KIND: OnceLock<&'static str> = OnceLock::new();
/// Requests left before the armed crash (0: none armed).
static CRASH_AFTER: AtomicU64 = AtomicU64::new(0);
/// `fault crash`: abort once the reply is out.
static CRASH_AFTER_REPLY: AtomicBool = AtomicBool::new(false);

/// The device's kind, set once at start.
pub fn set_kind(kind: &'static str) {
    let _ = KIND.set(kind);
}

fn counts_requests() -> bool {
    KIND.get().is_some_and(|k| COUNTING_KINDS.contains(k))
}

fn parse_crash_after(fault: &str) -> Option<Result<u64, String>> {
    let n = fault.strip_prefix("crash_after=")?;
    Some(
        n.parse::<u64>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| format!("crash_after={n:?}: expected a number of requests, 1 or more")),
    )
}

fn arm_crash_after(n: u64) -> Result<String, String> {
    if !counts_requests() {
        return Err(format!(
            "crash_after counts requests, which this device ({}) does not",
            KIND.get().copied().unwrap_or("unknown")
        ));
    }
    CRASH_AFTER.store(n, Ordering::Release);
    warn!("fault armed: crash when taking request {n} from now");
    Ok(format!("armed: crash after {n} request(s)"))
}

/// `--fault FAULT` at start: only `crash_after=N`.
pub fn arm_at_start(fault: &str) -> Result<(), String> {
    match parse_crash_after(fault) {
        Some(n) => arm_crash_after(n?).map(|_| ()),
        None => Err(format!(
            "--fault {fault:?}: only crash_after=N can be armed at start"
        )),
    }
}

/// `fault FAULT` on the control channel.
pub fn inject(fault: &str) -> Result<String, String> {
    let fault = fault.trim();
    if let Some(n) = parse_crash_after(fault) {
        return arm_crash_after(n?);
    }
    match fault {
        "crash" => {
            warn!("fault injected: crash (the process aborts now)");
            CRASH_AFTER_REPLY.store(true, Ordering::Release);
            Ok("crashing".into())
        }
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
            "unknown fault {other:?} (crash, seccomp, crash_after=N)"
        )),
    }
}

/// Called by the control thread once a reply is out: `fault crash` aborts here (SIGABRT, as a
/// crash of the device would).
pub fn after_reply() {
    if CRASH_AFTER_REPLY.load(Ordering::Acquire) {
        std::process::abort();
    }
}

/// A device took a request from a ring (before doing it): an armed `crash_after` counts it,
/// and aborts at the last one, with that request (and its batch) in flight.
pub fn request_taken() {
    if CRASH_AFTER.load(Ordering::Acquire) == 0 {
        return;
    }
    if CRASH_AFTER.fetch_sub(1, Ordering::AcqRel) == 1 {
        error!("fault injected: crash_after reached; aborting with requests in flight");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_fault_parse_and_kinds() {
        assert!(inject("melt")
            .expect_err("refused")
            .contains("unknown fault"));
        assert!(inject("crash_after=0")
            .expect_err("refused")
            .contains("1 or more"));
        assert!(arm_at_start("crash").is_err());
        // Before the kind is known (or for a kind that does not count), refused.
        assert!(inject("crash_after=3")
            .expect_err("refused")
            .contains("does not"));
    }
}
