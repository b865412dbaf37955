//! The reconnect delay: exponential backoff with full jitter (the scheme of
//! the AWS analysis "Exponential Backoff and Jitter"), so that a fleet that
//! lost the dashboard together does not come back together.
//!
//! Each delay is drawn uniformly from `[0, window]`; the window starts at
//! 2 s (a single agent's first retry after a blip is 1 s on average),
//! triples after every attempt and stops at `backoff_max`. With the old
//! ±10 % around 1, 2, 4, 8 s a fleet stayed in lock-step: 62 % of 1,000
//! agents landed in one second after a 10 s outage. Tripling rather than
//! doubling matters at fleet scale: with doubling, the agents whose 8 s and
//! 16 s windows both straddle the restart pile up in its first seconds
//! (about 15 % in the busiest second after a 10 s outage, simulated); with
//! tripling it stays under 10 %. The unit tests below replay that storm.
//!
//! A dashboard that closes with 1001 ("going away") or 1012 ("service
//! restart") is likely back within a second or two, so a fleet using the
//! first 2 s window would all return at once: such a close widens the
//! next window to [`RESTART_SPREAD`] × the first retry.

use rand::Rng;
use std::time::Duration;

/// The average first retry.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// How much the window grows after each attempt.
const GROWTH: u32 = 3;
/// After a restart announced by the dashboard, the next window is this many
/// first retries long (12 s by default: at most ~1/12 of the fleet a second).
const RESTART_SPREAD: u32 = 12;

/// Exponential reconnect delay with full jitter, capped at `backoff_max`.
#[derive(Debug)]
pub struct Backoff {
    /// The average first retry; the first window is twice as long.
    first: Duration,
    /// The next delay is drawn from `[0, window]`.
    window: Duration,
    max: Duration,
}

/// Test-only, and only in debug builds: the average first retry in
/// milliseconds, so that a test can cycle through a thousand reconnects in
/// seconds. Release builds (every package) never read it.
pub const TEST_FIRST_BACKOFF_ENV: &str = "NIXFLEET_TEST_FIRST_BACKOFF_MS";

fn first_backoff() -> Duration {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var(TEST_FIRST_BACKOFF_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Duration::from_millis(ms);
    }
    FIRST_BACKOFF
}

impl Backoff {
    pub fn new(max: Duration) -> Self {
        Self::with_first(first_backoff(), max)
    }

    fn with_first(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            window: (first * 2).min(max),
            max,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_from(&mut rand::rng())
    }

    /// The next delay, drawn with `rng` (a seeded one in tests).
    fn next_delay_from(&mut self, rng: &mut impl Rng) -> Duration {
        let window = self.window;
        self.window = window.saturating_mul(GROWTH).min(self.max);
        window.mul_f64(rng.random_range(0.0..=1.0))
    }

    pub fn reset(&mut self) {
        self.window = (self.first * 2).min(self.max);
    }

    /// The dashboard announced a restart (close 1001 or 1012): spread the
    /// next attempt wide, since the whole fleet got the same close.
    pub fn spread_after_restart(&mut self) {
        let spread = self.first.saturating_mul(RESTART_SPREAD).min(self.max);
        self.window = self.window.max(spread);
    }
}

#[cfg(test)]
mod tests;
