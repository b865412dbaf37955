//! The reconnect delay: doubling up to `backoff_max`, with ±10 % jitter so
//! that agents which lost the dashboard together do not all return at once.

use std::time::Duration;

const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// Exponential reconnect delay: 1 s, 2 s, 4 s … up to the cap, ±10 %.
#[derive(Debug)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

/// Test-only, and only in debug builds: the first backoff step in
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
        let first = first_backoff();
        Backoff {
            first,
            next: first.min(max),
            max,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (base * 2).min(self.max);
        base.mul_f64(rand::random_range(0.9..=1.1))
    }

    pub fn reset(&mut self) {
        self.next = self.first.min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter_and_resets() {
        let mut backoff = Backoff::new(Duration::from_secs(10));
        let expected = [1.0, 2.0, 4.0, 8.0, 10.0, 10.0];
        for base in expected {
            let d = backoff.next_delay().as_secs_f64();
            assert!(
                d >= base * 0.9 - 1e-9 && d <= base * 1.1 + 1e-9,
                "{d} vs {base}"
            );
        }
        backoff.reset();
        let d = backoff.next_delay().as_secs_f64();
        assert!((0.9..=1.1).contains(&d));
    }
}
