//! Rate limiting with Firecracker's token-bucket semantics (`rate_limiter` crate of
//! Firecracker): a bucket of `size` tokens, full at start, refilled continuously at `size`
//! tokens per `refill_time` ms, never above `size`; a `one_time_burst` of extra tokens spent
//! first and never refilled. A request larger than `size` is let through once with the bucket
//! emptied ("over-consumption"), and the bucket then blocks for as long as refilling that
//! excess takes.
//!
//! Unlike Firecracker's, the bucket refills at every request, so time it spends full and idle
//! is never counted again once it is drained (Firecracker can grant up to a refill's worth of
//! it twice).
//!
//! Shared by the device processes: bulkhead-net keeps one [`RateLimiter`] per direction
//! (operations are frames), bulkhead-block one per device (operations are requests). A limiter
//! has a bytes bucket and an operations bucket, each optional. Where Firecracker re-checks
//! every 100 ms, [`RateLimiter::consume`] says how long until the tokens asked for are there,
//! so a throttled queue sleeps (in its worker's wait timeout) for exactly that long (never
//! less than [`MIN_WAIT`]).

use std::time::{Duration, Instant};

/// The shortest throttling wait (timer granularity; avoids a storm of tiny waits).
pub const MIN_WAIT: Duration = Duration::from_millis(1);

/// The outcome of [`TokenBucket::reduce`] (Firecracker's `BucketReduction`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reduction {
    /// Not enough tokens: nothing was taken.
    Failure,
    /// The tokens were taken.
    Success,
    /// More than the bucket's size was asked: the bucket was emptied, the request goes
    /// through, and the excess is this many bucket sizes.
    OverConsumption(f64),
}

/// Firecracker's token bucket.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    size: u64,
    one_time_burst: u64,
    refill_time_ms: u64,
    budget: u64,
    last_update: Instant,
    /// Time before which the bucket refuses everything (after an over-consumption).
    blocked_until: Option<Instant>,
}

impl TokenBucket {
    /// A bucket of `size` tokens refilled in `refill_time_ms`; `None` when either is 0 (no
    /// limit), as in Firecracker.
    pub fn new(size: u64, one_time_burst: u64, refill_time_ms: u64) -> Option<TokenBucket> {
        TokenBucket::new_at(size, one_time_burst, refill_time_ms, Instant::now())
    }

    fn new_at(
        size: u64,
        one_time_burst: u64,
        refill_time_ms: u64,
        now: Instant,
    ) -> Option<TokenBucket> {
        if size == 0 || refill_time_ms == 0 {
            return None;
        }
        Some(TokenBucket {
            size,
            one_time_burst,
            refill_time_ms,
            budget: size,
            last_update: now,
            blocked_until: None,
        })
    }

    fn refill_ns(&self) -> u128 {
        u128::from(self.refill_time_ms) * 1_000_000
    }

    /// Adds the tokens earned since the last update, keeping the unspent fraction of time.
    fn auto_replenish(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_update).as_nanos();
        let size = u128::from(self.size);
        let tokens = elapsed * size / self.refill_ns();
        if tokens == 0 {
            return;
        }
        let new_budget = u128::from(self.budget) + tokens;
        if new_budget >= size {
            self.budget = self.size;
            self.last_update = now;
        } else {
            self.budget = u64::try_from(new_budget).unwrap_or(self.size);
            // Only the time those tokens took is used up.
            let used_ns = tokens * self.refill_ns() / size;
            let used = Duration::from_nanos(u64::try_from(used_ns).unwrap_or(u64::MAX));
            self.last_update += used;
        }
    }

    /// Takes `tokens` (Firecracker's `reduce`).
    pub fn reduce(&mut self, tokens: u64) -> Reduction {
        self.reduce_at(tokens, Instant::now())
    }

    fn reduce_at(&mut self, mut tokens: u64, now: Instant) -> Reduction {
        if let Some(until) = self.blocked_until {
            if now < until {
                return Reduction::Failure;
            }
            self.blocked_until = None;
        }
        // Refill first, every time: time spent with the bucket full earns nothing (Firecracker
        // refills only when a request does not fit, so idle time of a full bucket could be
        // counted again afterwards, up to a refill's worth).
        self.auto_replenish(now);
        if self.one_time_burst > 0 {
            if self.one_time_burst >= tokens {
                self.one_time_burst -= tokens;
                return Reduction::Success;
            }
            tokens -= self.one_time_burst;
            self.one_time_burst = 0;
        }
        if tokens > self.budget {
            self.auto_replenish(now);
            if tokens > self.size {
                let excess = tokens - self.budget;
                self.budget = 0;
                let ratio = excess as f64 / self.size as f64;
                self.blocked_until = Some(now + self.wait_for_tokens(excess));
                self.last_update = now + self.wait_for_tokens(excess);
                return Reduction::OverConsumption(ratio);
            }
            if tokens > self.budget {
                return Reduction::Failure;
            }
        }
        self.budget -= tokens;
        Reduction::Success
    }

    /// Gives back tokens taken for a request that did not happen (Firecracker's
    /// `force_replenish`), up to the bucket's size.
    pub fn replenish(&mut self, tokens: u64) {
        self.budget = self.budget.saturating_add(tokens).min(self.size);
    }

    /// How long refilling `tokens` takes.
    fn wait_for_tokens(&self, tokens: u64) -> Duration {
        let ns = (u128::from(tokens) * self.refill_ns()).div_ceil(u128::from(self.size));
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// How long until `tokens` can be taken (0 if now).
    pub fn time_until(&mut self, tokens: u64, now: Instant) -> Duration {
        if let Some(until) = self.blocked_until {
            if now < until {
                return until - now;
            }
        }
        self.auto_replenish(now);
        let have = self.budget.saturating_add(self.one_time_burst);
        if tokens <= have {
            return Duration::ZERO;
        }
        // A request above the size goes through once the bucket is full.
        let need = tokens.min(self.size).saturating_sub(self.budget);
        self.wait_for_tokens(need)
    }

    /// The tokens there now (without the one-time burst).
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The one-time burst left.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }
}

/// The settings of one bucket, as given on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BucketConfig {
    pub size: u64,
    pub one_time_burst: u64,
    pub refill_time_ms: u64,
}

impl BucketConfig {
    /// A bucket from a device's command line: `None` when only one of `size` and
    /// `refill_time_ms` is zero (they go together: both non-zero is a limit, both zero none).
    pub fn new(size: u64, one_time_burst: u64, refill_time_ms: u64) -> Option<BucketConfig> {
        ((size == 0) == (refill_time_ms == 0)).then_some(BucketConfig {
            size,
            one_time_burst,
            refill_time_ms,
        })
    }

    /// Whether the settings describe a limit (size and refill time both non-zero).
    pub fn is_limit(&self) -> bool {
        self.size != 0 && self.refill_time_ms != 0
    }

    fn bucket(&self) -> Option<TokenBucket> {
        TokenBucket::new(self.size, self.one_time_burst, self.refill_time_ms)
    }
}

/// The limits of one direction: bytes and operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimiterConfig {
    pub bandwidth: BucketConfig,
    pub ops: BucketConfig,
}

impl LimiterConfig {
    /// Whether any limit is set.
    pub fn is_limit(&self) -> bool {
        self.bandwidth.is_limit() || self.ops.is_limit()
    }
}

/// A bytes bucket and an operations bucket (Firecracker's `RateLimiter`).
#[derive(Clone, Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl RateLimiter {
    pub fn new(config: &LimiterConfig) -> RateLimiter {
        RateLimiter {
            bandwidth: config.bandwidth.bucket(),
            ops: config.ops.bucket(),
        }
    }

    /// Takes one operation and `bytes`; `Ok(())` if the frame or request may go now, otherwise nothing is
    /// taken and `Err(wait)` says when to try again.
    pub fn consume(&mut self, bytes: u64) -> Result<(), Duration> {
        self.consume_at(bytes, Instant::now())
    }

    fn consume_at(&mut self, bytes: u64, now: Instant) -> Result<(), Duration> {
        if let Some(ops) = &mut self.ops {
            if ops.reduce_at(1, now) == Reduction::Failure {
                return Err(ops.time_until(1, now).max(MIN_WAIT));
            }
        }
        if let Some(bw) = &mut self.bandwidth {
            if bw.reduce_at(bytes, now) == Reduction::Failure {
                let wait = bw.time_until(bytes, now).max(MIN_WAIT);
                if let Some(ops) = &mut self.ops {
                    ops.replenish(1);
                }
                return Err(wait);
            }
        }
        Ok(())
    }

    /// Gives back what [`RateLimiter::consume`] took for a frame or request that could not go.
    pub fn refund(&mut self, bytes: u64) {
        if let Some(ops) = &mut self.ops {
            ops.replenish(1);
        }
        if let Some(bw) = &mut self.bandwidth {
            bw.replenish(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn test_bucket_config_size_and_refill_go_together() {
        assert_eq!(BucketConfig::new(0, 0, 0), Some(BucketConfig::default()));
        assert!(BucketConfig::new(0, 5, 0).is_some_and(|b| !b.is_limit()));
        assert!(BucketConfig::new(4096, 0, 100).is_some_and(|b| b.is_limit()));
        assert_eq!(BucketConfig::new(4096, 0, 0), None);
        assert_eq!(BucketConfig::new(0, 0, 100), None);
    }

    #[test]
    fn test_token_bucket_zero_is_unlimited() {
        assert!(TokenBucket::new(0, 10, 100).is_none());
        assert!(TokenBucket::new(10, 10, 0).is_none());
        let mut l = RateLimiter::new(&LimiterConfig::default());
        for _ in 0..1000 {
            assert_eq!(l.consume(1 << 30), Ok(()));
        }
    }

    #[test]
    fn test_token_bucket_full_at_start_then_refills_linearly() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(1000, 0, 100, t0).expect("bucket");
        assert_eq!(b.reduce_at(1000, t0), Reduction::Success);
        assert_eq!(b.reduce_at(1, t0), Reduction::Failure);
        // 10 ms = a tenth of the refill time = 100 tokens.
        assert_eq!(b.reduce_at(100, t0 + 10 * MS), Reduction::Success);
        assert_eq!(b.reduce_at(1, t0 + 10 * MS), Reduction::Failure);
        // Never above the size, however long it waits.
        assert_eq!(b.time_until(0, t0 + 10_000 * MS), Duration::ZERO);
        assert_eq!(b.budget(), 1000);
    }

    #[test]
    fn test_token_bucket_fractional_refill_not_lost() {
        let t0 = Instant::now();
        // 3 tokens per 10 ms: one token every 3.33 ms.
        let mut b = TokenBucket::new_at(3, 0, 10, t0).expect("bucket");
        assert_eq!(b.reduce_at(3, t0), Reduction::Success);
        let mut got = 0;
        for i in 1..=100u32 {
            let now = t0 + Duration::from_micros(100) * i;
            if b.reduce_at(1, now) == Reduction::Success {
                got += 1;
            }
        }
        // 10 ms at 0.3 tokens per ms: 3 tokens, whatever the polling step.
        assert_eq!(got, 3);
    }

    #[test]
    fn test_token_bucket_idle_full_time_not_counted_again() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(1000, 0, 100, t0).expect("bucket");
        // Full and idle for 90 ms, then drained: only what refills from then on comes back.
        assert_eq!(b.reduce_at(1000, t0 + 90 * MS), Reduction::Success);
        assert_eq!(b.reduce_at(200, t0 + 100 * MS), Reduction::Failure);
        assert_eq!(b.reduce_at(100, t0 + 100 * MS), Reduction::Success);
    }

    #[test]
    fn test_token_bucket_one_time_burst_spent_first_never_refilled() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(100, 50, 1000, t0).expect("bucket");
        assert_eq!(b.reduce_at(50, t0), Reduction::Success);
        assert_eq!(b.one_time_burst(), 0);
        assert_eq!(b.budget(), 100);
        // Part burst, part budget.
        let mut b = TokenBucket::new_at(100, 30, 1000, t0).expect("bucket");
        assert_eq!(b.reduce_at(80, t0), Reduction::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 50));
        assert_eq!(b.reduce_at(51, t0), Reduction::Failure);
        // A long wait refills the budget, not the burst.
        b.time_until(0, t0 + 5000 * MS);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 100));
    }

    #[test]
    fn test_token_bucket_over_consumption_blocks_for_the_excess() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(100, 0, 100, t0).expect("bucket");
        // 250 from a full bucket of 100: 150 over, 1.5 sizes, blocked for 150 ms.
        assert_eq!(b.reduce_at(250, t0), Reduction::OverConsumption(1.5));
        assert_eq!(b.reduce_at(1, t0 + 149 * MS), Reduction::Failure);
        assert_eq!(b.time_until(1, t0 + 100 * MS), 50 * MS);
        assert_eq!(b.reduce_at(1, t0 + 160 * MS), Reduction::Success);
    }

    #[test]
    fn test_time_until_exact() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(1000, 0, 1000, t0).expect("bucket");
        assert_eq!(b.reduce_at(1000, t0), Reduction::Success);
        assert_eq!(b.time_until(250, t0), 250 * MS);
        assert_eq!(b.time_until(250, t0 + 100 * MS), 150 * MS);
        // More than the size: the wait for a full bucket.
        assert_eq!(b.time_until(5000, t0 + 100 * MS), 900 * MS);
    }

    #[test]
    fn test_rate_limiter_both_buckets_refund_ops_on_bytes_failure() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(&LimiterConfig {
            bandwidth: BucketConfig {
                size: 1000,
                one_time_burst: 0,
                refill_time_ms: 1000,
            },
            ops: BucketConfig {
                size: 2,
                one_time_burst: 0,
                refill_time_ms: 1000,
            },
        });
        assert_eq!(l.consume_at(900, t0), Ok(()));
        // Bytes fail: the op is given back.
        assert_eq!(l.consume_at(200, t0), Err(100 * MS));
        assert_eq!(l.consume_at(100, t0), Ok(()));
        // Ops exhausted now.
        assert_eq!(l.consume_at(0, t0), Err(500 * MS));
    }

    #[test]
    fn test_rate_limiter_steady_rate_matches_config() {
        // 10 MiB/s as 1 MiB per 100 ms: 32 MiB in 64 KiB frames takes 3.1 s after the first
        // full bucket, whatever the frame size.
        let t0 = Instant::now();
        let mut l = RateLimiter::new(&LimiterConfig {
            bandwidth: BucketConfig {
                size: 1 << 20,
                one_time_burst: 0,
                refill_time_ms: 100,
            },
            ops: BucketConfig::default(),
        });
        let mut now = t0;
        let mut sent = 0u64;
        while sent < 32 << 20 {
            match l.consume_at(65536, now) {
                Ok(()) => sent += 65536,
                Err(wait) => now += wait,
            }
        }
        let took = now - t0;
        assert!(took >= 3090 * MS && took <= 3110 * MS, "{took:?}");
    }
}
