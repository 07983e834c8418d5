//! Per-host rate limits (`[[sidecar.connector.hosts]] rps`/`burst`).
//!
//! Decision: a token bucket per upstream host (governor GCRA), refilled at `rps` with room for
//! `burst` requests at once (`burst` defaults to `rps`). A request that finds the bucket empty
//! waits for its turn only if that turn comes within the host's request timeout; otherwise it
//! is answered at once with 429 `{"aborted":true,"reason":"RateLimited"}` rather than holding
//! the client for a timeout it can never beat. The limit protects the upstream (and the
//! credential's quota), so it is applied after the allow decision and only to calls that would
//! actually go out.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::time::Duration;

pub struct HostLimiter {
    limiter: DefaultDirectRateLimiter,
    clock: DefaultClock,
}

impl HostLimiter {
    /// `None` when `rps` is absent (no limit).
    pub fn new(rps: Option<u32>, burst: Option<u32>) -> Option<Self> {
        let rps = NonZeroU32::new(rps?)?;
        let burst = burst.and_then(NonZeroU32::new).unwrap_or(rps);
        Some(Self {
            limiter: RateLimiter::direct(Quota::per_second(rps).allow_burst(burst)),
            clock: DefaultClock::default(),
        })
    }

    /// Takes a permit, waiting at most `budget`. `Err` carries how long the wait would have been.
    pub async fn acquire(&self, budget: Duration) -> Result<(), Duration> {
        let deadline = tokio::time::Instant::now() + budget;
        loop {
            match self.limiter.check() {
                Ok(()) => return Ok(()),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    let now = tokio::time::Instant::now();
                    if now + wait > deadline {
                        return Err(wait);
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn burst_then_refuse_when_wait_exceeds_budget() {
        let l = HostLimiter::new(Some(1), Some(2)).unwrap();
        assert!(l.acquire(Duration::ZERO).await.is_ok());
        assert!(l.acquire(Duration::ZERO).await.is_ok());
        assert!(l.acquire(Duration::from_millis(10)).await.is_err());
        assert!(l.acquire(Duration::from_millis(1500)).await.is_ok());
        assert!(HostLimiter::new(None, Some(3)).is_none());
    }
}
