//! Start-up milestones, logged at debug level with the monotonic clock and the CPU time the
//! process has used, so that start-up cost can be measured from outside (`bulkhead-bench`)
//! and by an operator with `-vv`.

use log::debug;

/// Logs `name` with `monotonic_ns=` and `cpu_us=` fields.
pub fn log(name: &str) {
    if !log::log_enabled!(log::Level::Debug) {
        return;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    // SAFETY: rusage is plain data; all-zero is valid and getrusage overwrites it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid rusage to write into.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let us = |t: libc::timeval| t.tv_sec * 1_000_000 + t.tv_usec;
    debug!(
        "{name}: monotonic_ns={} cpu_us={}",
        ts.tv_sec * 1_000_000_000 + ts.tv_nsec,
        us(ru.ru_utime) + us(ru.ru_stime),
    );
}
