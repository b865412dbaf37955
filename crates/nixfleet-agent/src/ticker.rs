//! The agent's clocks: kernel timers (`timerfd`) that the runtime watches
//! like sockets, all expiring on one grid of whole seconds.
//!
//! An idle agent's cost is mostly its wake-ups, so it should wake once per
//! heartbeat and for nothing else that can wait for one. Two things stood
//! in the way:
//!
//! - tokio's timer wheel wakes a process more than once per deadline: at
//!   the start of the wheel slot that holds it (for long timers, of each
//!   coarser slot on the way down), and again at the deadline itself. A
//!   `timerfd` wakes it exactly when due.
//! - Timers started at different moments fire at different moments: a ping
//!   every 15 s, a self-check every interval, the compartments every minute
//!   each woke the agent separately from its heartbeat.
//!
//! So every periodic timer here expires at `epoch + k × period`, with one
//! epoch per process. Periods are whole seconds (the configuration has no
//! finer unit; only systemd's watchdog may ask for less), so a 15 s ping falls on every 15th heartbeat of a 1 s
//! interval, and the kernel hands both to the agent in one wake-up. One-shot
//! deadlines ([`Alarm`]) are rounded up to the next whole second of the same
//! grid, for the same reason.
//!
//! Without `timerfd` (a seccomp filter, a descriptor limit) the clocks fall
//! back to tokio's timers: more wake-ups, same behaviour.

use rustix::time::{
    Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec, timerfd_create,
    timerfd_settime,
};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Ticks every `period` on the process's grid.
pub struct Ticker {
    clock: Clock,
    /// The first tick is due at once ([`Ticker::new`]).
    immediate: bool,
}

/// An expiring `timerfd` wakes the process whether or not anyone waits for
/// it: a ticker that is not waited for should not exist.
enum Clock {
    Kernel(AsyncFd<OwnedFd>),
    Tokio(tokio::time::Interval),
}

impl Ticker {
    /// Ticks at once, then at every grid point of `period`. Must be called
    /// within the tokio runtime (it registers the timer with the runtime).
    pub fn new(period: Duration) -> Ticker {
        Ticker::start(period, true)
    }

    /// Ticks at once, then on the grid of `period`, skipping a grid point
    /// less than half a period away: the first two ticks are never
    /// bunched. For the heartbeat, whose first beat follows `register` at
    /// once (protocol): otherwise a connection opened just before a grid
    /// point sends two heartbeats within milliseconds (after every
    /// reconnect, a resume among them).
    pub fn spaced(period: Duration) -> Ticker {
        let period = period.max(Duration::from_millis(1));
        Ticker {
            clock: Ticker::arm(period, period / 2),
            immediate: true,
        }
    }

    /// Ticks at every grid point of `period`, the first one within a period
    /// from now.
    pub fn on_grid(period: Duration) -> Ticker {
        Ticker::start(period, false)
    }

    fn start(period: Duration, immediate: bool) -> Ticker {
        // A zero period would disarm the timer.
        let period = period.max(Duration::from_millis(1));
        Ticker {
            clock: Ticker::arm(period, Duration::ZERO),
            immediate,
        }
    }

    /// The timer, first expiring at the first grid point at least `after`
    /// from now.
    fn arm(period: Duration, after: Duration) -> Clock {
        let first = next_grid_point(period, monotonic_now().saturating_add(nanos(after)));
        match periodic_timer(first, period) {
            Ok(timer) => Clock::Kernel(timer),
            Err(error) => {
                tracing::debug!(%error, "no timerfd; using the runtime's timer");
                let first_in = Duration::from_nanos(first.saturating_sub(monotonic_now()));
                let mut interval = tokio::time::interval_at(Instant::now() + first_in, period);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                Clock::Tokio(interval)
            }
        }
    }

    /// Waits for the next tick. Ticks missed while the agent was busy (or
    /// the machine suspended) count as one, as with
    /// `MissedTickBehavior::Skip`. Cancel-safe: a tick that was due when the
    /// future was dropped is returned by the next call.
    pub async fn tick(&mut self) -> io::Result<()> {
        if std::mem::take(&mut self.immediate) {
            return Ok(());
        }
        match &mut self.clock {
            Clock::Kernel(timer) => expired(timer).await,
            Clock::Tokio(interval) => {
                interval.tick().await;
                Ok(())
            }
        }
    }
}

/// A one-shot deadline, rounded up to the grid's next whole second.
pub struct Alarm {
    timer: Option<AsyncFd<OwnedFd>>,
}

impl Alarm {
    pub fn new() -> Alarm {
        let timer = new_timerfd().ok();
        Alarm { timer }
    }

    /// Returns at the grid's first whole second at or after `deadline`: at
    /// most a second late, and then together with any heartbeat due.
    pub async fn wait_until(&mut self, deadline: Instant) {
        let now = Instant::now();
        let Some(timer) = &self.timer else {
            return tokio::time::sleep_until(deadline).await;
        };
        let at = monotonic_now().saturating_add(
            u64::try_from(deadline.saturating_duration_since(now).as_nanos()).unwrap_or(u64::MAX),
        );
        let armed = arm_at(timer, next_grid_point(Duration::from_secs(1), at), 0);
        if armed.is_err() || expired(timer).await.is_err() {
            tokio::time::sleep_until(deadline).await;
        }
    }
}

impl Default for Alarm {
    fn default() -> Self {
        Alarm::new()
    }
}

/// Waits until the timer expired (once or more) and acknowledges it.
async fn expired(timer: &AsyncFd<OwnedFd>) -> io::Result<()> {
    loop {
        let mut ready = timer.readable().await?;
        let mut expirations = [0u8; 8];
        match rustix::io::read(ready.get_inner(), &mut expirations) {
            Ok(_) => {
                // Read, the timer is not readable until it expires again:
                // saying so now saves the next wait a `read` that would fail
                // with EAGAIN. (If it expired in between, the runtime has
                // seen a newer event and keeps the readiness.)
                ready.clear_ready();
                return Ok(());
            }
            Err(rustix::io::Errno::AGAIN) => ready.clear_ready(),
            Err(rustix::io::Errno::INTR) => {}
            Err(error) => return Err(error.into()),
        }
    }
}

fn new_timerfd() -> io::Result<AsyncFd<OwnedFd>> {
    let timer = timerfd_create(
        TimerfdClockId::Monotonic,
        TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
    )?;
    // SAFETY: the descriptor is an `OwnedFd` that the `AsyncFd` owns and
    // never replaces: it stays open and the same until the `AsyncFd` is
    // dropped.
    unsafe { AsyncFd::register_with_interest(timer, Interest::READABLE) }
        .map_err(|error| error.into_parts().1)
}

/// A timer expiring at `first` (monotonic nanoseconds) and every `period`
/// after: the kernel keeps it on the grid, however late the agent reads.
fn periodic_timer(first: u64, period: Duration) -> io::Result<AsyncFd<OwnedFd>> {
    let timer = new_timerfd()?;
    arm_at(&timer, first, nanos(period))?;
    Ok(timer)
}

/// Sets `timer` to expire at `first` (monotonic nanoseconds, absolute) and
/// then every `period_ns` (never again if 0).
fn arm_at(timer: &AsyncFd<OwnedFd>, first: u64, period_ns: u64) -> io::Result<()> {
    timerfd_settime(
        timer.get_ref(),
        TimerfdTimerFlags::ABSTIME,
        &Itimerspec {
            it_interval: timespec(period_ns),
            it_value: timespec(first),
        },
    )?;
    Ok(())
}

/// The grid's origin: the first time any clock asked, in this process.
fn epoch() -> u64 {
    static EPOCH: OnceLock<u64> = OnceLock::new();
    *EPOCH.get_or_init(monotonic_now)
}

/// The first point of `period`'s grid at or after `at` (nanoseconds of
/// `CLOCK_MONOTONIC`), never the epoch itself: a zero expiry would disarm
/// the timer.
fn next_grid_point(period: Duration, at: u64) -> u64 {
    let epoch = epoch();
    let period = nanos(period).max(1);
    let periods = at.saturating_sub(epoch).div_ceil(period).max(1);
    epoch.saturating_add(periods.saturating_mul(period))
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock `timerfd` expiries are given
/// in. Through libc rather than rustix: rustix finds the vDSO itself, which
/// fails under valgrind (the benchmark's profiling wrapper).
fn monotonic_now() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists on Linux, and on failure `now` stays zero.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * NANOS_PER_SEC + u64::try_from(now.tv_nsec).unwrap_or(0)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn timespec(nanos: u64) -> Timespec {
    Timespec {
        tv_sec: i64::try_from(nanos / NANOS_PER_SEC).unwrap_or(i64::MAX),
        tv_nsec: i64::try_from(nanos % NANOS_PER_SEC).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// How far `at` is from the grid of `period`.
    fn off_grid(at: u64, period: Duration) -> u64 {
        (at - epoch()) % nanos(period)
    }

    #[test]
    fn grid_points_are_whole_periods_from_the_epoch() {
        let second = Duration::from_secs(1);
        let start = epoch();
        assert_eq!(next_grid_point(second, start), start + NANOS_PER_SEC);
        assert_eq!(next_grid_point(second, start + 1), start + NANOS_PER_SEC);
        assert_eq!(
            next_grid_point(second, start + 3 * NANOS_PER_SEC),
            start + 3 * NANOS_PER_SEC
        );
        let fifteen = Duration::from_secs(15);
        let at = next_grid_point(fifteen, start + 16 * NANOS_PER_SEC);
        assert_eq!(at, start + 30 * NANOS_PER_SEC);
        assert_eq!(off_grid(at, second), 0, "every 15 s point is a 1 s point");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn ticks_at_once_then_on_the_grid() {
        let period = Duration::from_secs(1);
        let started = Instant::now();
        let mut ticker = Ticker::new(period);
        assert!(matches!(ticker.clock, Clock::Kernel(_)));
        ticker.tick().await.unwrap();
        assert!(
            started.elapsed() < period / 2,
            "the first tick is immediate"
        );
        for _ in 0..2 {
            ticker.tick().await.unwrap();
            // Within a few ms of a grid point (the wake-up's latency).
            let late = off_grid(monotonic_now(), period);
            assert!(late < 200_000_000, "{late} ns after the grid point");
        }
        assert!(started.elapsed() <= period * 2 + period / 2);
    }

    /// When the ticker's timer expires next, in monotonic nanoseconds.
    fn next_expiry(ticker: &Ticker) -> u64 {
        let Clock::Kernel(timer) = &ticker.clock else {
            panic!("not armed with a timerfd");
        };
        let left = rustix::time::timerfd_gettime(timer.get_ref())
            .unwrap()
            .it_value;
        monotonic_now() + left.tv_sec as u64 * NANOS_PER_SEC + left.tv_nsec as u64
    }

    #[tokio::test(flavor = "current_thread")]
    async fn tickers_of_different_periods_expire_together() {
        let mut beat = Ticker::new(Duration::from_secs(1));
        let mut ping = Ticker::new(Duration::from_secs(15));
        beat.tick().await.unwrap();
        ping.tick().await.unwrap();
        // Every ping expiry is a beat expiry: one wake-up serves both.
        let (beat_at, ping_at) = (next_expiry(&beat), next_expiry(&ping));
        let apart = ping_at - beat_at;
        let jitter = 1_000_000; // the two readings are a few µs apart
        let off = apart % NANOS_PER_SEC;
        assert!(
            off < jitter || off > NANOS_PER_SEC - jitter,
            "ping {apart} ns after the next beat"
        );
        assert_eq!(
            off_grid(ping_at + jitter / 2, Duration::from_secs(15)) / jitter,
            0
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_spaced_ticker_never_ticks_twice_within_half_a_period() {
        let period = Duration::from_secs(1);
        // Started just before a grid point, where a plain ticker would
        // tick again within milliseconds.
        epoch();
        while off_grid(monotonic_now(), period) < 900_000_000 {
            std::thread::sleep(Duration::from_millis(10));
        }
        let start = monotonic_now();
        let mut spaced = Ticker::spaced(period);
        let next = next_expiry(&spaced);
        assert!(next - start >= NANOS_PER_SEC / 2, "{} ns", next - start);
        // The grid point after that, not one further.
        assert!(next - start < NANOS_PER_SEC * 3 / 2 + 50_000_000);
        let waited = Instant::now();
        spaced.tick().await.unwrap();
        assert!(waited.elapsed() < period / 4, "the first tick is immediate");
        spaced.tick().await.unwrap();
        assert!(monotonic_now() >= next);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn missed_ticks_count_once_and_a_dropped_wait_loses_nothing() {
        let period = Duration::from_secs(1);
        let mut ticker = Ticker::on_grid(period);
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

    #[tokio::test(flavor = "current_thread")]
    async fn an_alarm_rings_at_its_deadline_rounded_up_to_the_grid() {
        let mut alarm = Alarm::new();
        assert!(alarm.timer.is_some());
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        alarm.wait_until(deadline).await;
        assert!(tokio::time::Instant::now() >= deadline);
        assert!(off_grid(monotonic_now(), Duration::from_secs(1)) < 200_000_000);
        // A deadline that has passed rings at the next grid second at most.
        let waited = Instant::now();
        alarm
            .wait_until(tokio::time::Instant::now() - Duration::from_secs(1))
            .await;
        assert!(waited.elapsed() <= Duration::from_millis(1100));
    }
}
