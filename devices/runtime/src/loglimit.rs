//! A token bucket for log lines a guest (or a frontend) can cause, shared by every device:
//! [`LOG_BURST`] lines, then one per [`LOG_INTERVAL`]; each line that gets through says how
//! many were suppressed before it. (The VMM has its own, `vmm/src/ratelimit.rs`: it links no
//! device crate.)

use std::time::{Duration, Instant};

use log::warn;

/// Log lines a guest can cause: up to this many at once...
pub const LOG_BURST: u32 = 10;
/// ...then one more per this interval, with the count of those suppressed meanwhile.
pub const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// The limiter; one per worker (or per shared path, behind a lock).
#[derive(Debug)]
pub struct LogLimiter {
    tokens: u32,
    last_refill: Instant,
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> LogLimiter {
        LogLimiter {
            tokens: LOG_BURST,
            last_refill: Instant::now(),
            suppressed: 0,
        }
    }
}

impl LogLimiter {
    /// Whether a line may be logged now; `Some(n)` with the number suppressed since the last.
    pub fn admit(&mut self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    /// [`LogLimiter::admit`] at `now`.
    pub fn admit_at(&mut self, now: Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.last_refill);
        let refill = elapsed.as_nanos() / LOG_INTERVAL.as_nanos();
        if refill > 0 {
            let refill = u32::try_from(refill).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(refill).min(LOG_BURST);
            self.last_refill = now;
        }
        if self.tokens == 0 {
            self.suppressed = self.suppressed.saturating_add(1);
            return None;
        }
        self.tokens -= 1;
        Some(std::mem::take(&mut self.suppressed))
    }

    /// Lines suppressed since the last one let through.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }

    /// Logs a warning through the limiter.
    pub fn warn(&mut self, args: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.admit() {
            if suppressed > 0 {
                warn!("{args} ({suppressed} similar messages suppressed)");
            } else {
                warn!("{args}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_log_limiter_burst_then_one_per_interval_counts_suppressed() {
        let mut log = LogLimiter::default();
        let start = log.last_refill;
        for _ in 0..LOG_BURST {
            assert_eq!(log.admit_at(start), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(log.admit_at(start), None);
        }
        let later = start + LOG_INTERVAL;
        assert_eq!(log.admit_at(later), Some(1000));
        assert_eq!(log.admit_at(later), None);
        // A long quiet spell refills the burst, no more.
        let much_later = later + LOG_INTERVAL * 1000;
        for _ in 0..LOG_BURST {
            assert!(log.admit_at(much_later).is_some());
        }
        assert_eq!(log.admit_at(much_later), None);
    }
}
