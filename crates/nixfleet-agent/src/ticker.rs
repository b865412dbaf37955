//! The heartbeat's clock: a kernel timer (`timerfd`) that the runtime
//! watches like a socket.
//!
//! A `tokio::time::Interval` costs an idle agent three wake-ups per beat
//! where one would do: tokio's timer wheel wakes at the start of the wheel
//! slot holding the deadline and again at the deadline itself (a third time
//! for intervals over 4 s), and re-arming the timer earlier than the
//! runtime's next planned wake-up makes tokio wake its own driver through an
//! eventfd. A periodic `timerfd` is armed once per session: the kernel wakes
//! the agent exactly when a beat is due, and one `read` acknowledges it.

use rustix::time::{
    Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec, timerfd_create,
    timerfd_settime,
};
use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Ticks every `period`, the first tick at once.
pub struct Ticker {
    timer: AsyncFd<OwnedFd>,
}

impl Ticker {
    /// Must be called within the tokio runtime (it registers the timer with
    /// the runtime's I/O driver).
    pub fn new(period: Duration) -> io::Result<Ticker> {
        let timer = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        let period = timespec(period.max(Duration::from_millis(1)));
        // An all-zero first expiry would disarm the timer: 1 ns is "now".
        let first = Timespec {
            tv_sec: 0,
            tv_nsec: 1,
        };
        timerfd_settime(
            &timer,
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: period,
                it_value: first,
            },
        )?;
        // SAFETY: the descriptor is an `OwnedFd` that the `AsyncFd` owns and
        // never replaces: it stays open and the same until the `AsyncFd` is
        // dropped.
        let timer = unsafe { AsyncFd::register_with_interest(timer, Interest::READABLE) }
            .map_err(|error| error.into_parts().1)?;
        Ok(Ticker { timer })
    }

    /// Waits for the next tick. Ticks missed while the agent was busy (or
    /// the machine suspended) count as one, as with
    /// `MissedTickBehavior::Skip`. Cancel-safe: a tick that was due when the
    /// future was dropped is returned by the next call.
    pub async fn tick(&mut self) -> io::Result<()> {
        loop {
            let mut ready = self.timer.readable().await?;
            let mut expirations = [0u8; 8];
            match rustix::io::read(ready.get_inner(), &mut expirations) {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::AGAIN) => ready.clear_ready(),
                Err(rustix::io::Errno::INTR) => {}
                Err(error) => return Err(error.into()),
            }
        }
    }
}

fn timespec(d: Duration) -> Timespec {
    Timespec {
        tv_sec: d.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: d.subsec_nanos().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test(flavor = "current_thread")]
    async fn ticks_at_once_then_every_period() {
        let period = Duration::from_millis(50);
        let started = Instant::now();
        let mut ticker = Ticker::new(period).unwrap();
        ticker.tick().await.unwrap();
        assert!(started.elapsed() < period, "the first tick is immediate");
        for n in 1..=3u32 {
            ticker.tick().await.unwrap();
            assert!(started.elapsed() >= period * n, "tick {n} came early");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn missed_ticks_count_once_and_a_dropped_wait_loses_nothing() {
        let period = Duration::from_millis(200);
        let mut ticker = Ticker::new(period).unwrap();
        ticker.tick().await.unwrap();
        // Busy for over two periods: one tick is waiting, not two.
        std::thread::sleep(period * 9 / 4);
        let waited = Instant::now();
        ticker.tick().await.unwrap();
        assert!(
            waited.elapsed() < period / 4,
            "the due tick is there at once"
        );
        let next = Instant::now();
        ticker.tick().await.unwrap();
        assert!(next.elapsed() >= period / 4, "only one tick was kept");
        // A wait abandoned (as in a `select!`) does not consume a tick.
        let abandoned = tokio::time::timeout(period / 10, ticker.tick()).await;
        assert!(abandoned.is_err());
        std::thread::sleep(period);
        let waited = Instant::now();
        ticker.tick().await.unwrap();
        assert!(waited.elapsed() < period / 4);
    }
}
