//! One small rate limiter for every log line a guest can trigger (bad BAR accesses, status
//! writes, configuration accesses, refused features): at most `burst` lines per `window`, then
//! silence, then one line saying how many were dropped. A guest that hammers a register costs
//! the host a few lines a second, not a full disk.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token window: `burst` admissions per `window`.
#[derive(Debug)]
pub struct RateLimiter {
    burst: u32,
    window: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    start: Option<Instant>,
    admitted: u32,
    dropped: u64,
}

impl RateLimiter {
    /// `burst` lines per `window`.
    pub const fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            state: Mutex::new(State {
                start: None,
                admitted: 0,
                dropped: 0,
            }),
        }
    }

    /// The limit each device's guest-triggered lines share: 10 a second.
    pub const fn per_device() -> Self {
        Self::new(10, Duration::from_secs(1))
    }

    /// Whether a line may be logged now (at `now`); `Some(n)` admits it and says how many
    /// lines were dropped since the last one admitted.
    pub fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = match s.start {
            Some(start) => now.saturating_duration_since(start) >= self.window,
            None => true,
        };
        if fresh {
            s.start = Some(now);
            s.admitted = 0;
        }
        if s.admitted < self.burst {
            s.admitted += 1;
            Some(std::mem::take(&mut s.dropped))
        } else {
            s.dropped += 1;
            None
        }
    }

    /// [`RateLimiter::admit_at`] now.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }
}

/// Logs through `log` at `$level` if `$limiter` admits the line, first saying how many
/// were dropped.
#[macro_export]
macro_rules! log_limited {
    ($limiter:expr, $level:expr, $($arg:tt)+) => {
        if let Some(dropped) = $limiter.admit() {
            if dropped > 0 {
                log::log!($level, "({dropped} similar lines dropped by the rate limit)");
            }
            log::log!($level, $($arg)+);
        }
    };
}

/// The limiter of guest-triggered lines that belong to no one device (the PCI host bridge,
/// root ports).
pub static GUEST_LOG: RateLimiter = RateLimiter::new(20, Duration::from_secs(1));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ratelimit_burst_then_silence_then_count() {
        let r = RateLimiter::new(3, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(r.admit_at(t0), Some(0));
        assert_eq!(r.admit_at(t0), Some(0));
        assert_eq!(r.admit_at(t0), Some(0));
        for _ in 0..1000 {
            assert_eq!(r.admit_at(t0 + Duration::from_millis(500)), None);
        }
        assert_eq!(r.admit_at(t0 + Duration::from_secs(1)), Some(1000));
        assert_eq!(r.admit_at(t0 + Duration::from_secs(1)), Some(0));
    }
}
