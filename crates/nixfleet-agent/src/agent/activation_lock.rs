//! The activation lock (`activation::timer`) at the agent's start: held
//! for the agent's life, so that a rollback timer that fires meanwhile
//! leaves the countdown to this agent, and taken before anything a
//! previous agent left is taken over, so that a rollback the timer runs is
//! adopted once it ended, whole. Never waited for on the runtime's thread:
//! the core answers the watchdog's probes and the connection sends
//! heartbeats there.

use super::core::Core;
use super::systemd_report::tick_if_any;
use crate::activation;
use crate::systemd::Systemd;
use crate::ticker::Ticker;
use std::fs::File;
use std::path::Path;
use tracing::warn;

impl Core {
    /// At start, once the lock is held (or cannot be had at all): what a
    /// previous agent left, a command it started, then a deployment still
    /// to be confirmed or rolled back, then the tests after a switch (in
    /// this order: each step sees what the one before adopted). While the
    /// timer holds the lock (its rollback runs), deferred until it ends.
    pub(super) fn take_over(&mut self) {
        if self.activation_lock.is_none() {
            // Normally taken already ([`wait_for_the_timers_rollback`]);
            // tried again here only if that failed, never waiting.
            match activation::timer::lock(&self.state_dir, false) {
                Ok(Some(lock)) => self.activation_lock = Some(lock),
                Ok(None) => return self.wait_for_the_lock(),
                Err(error) => warn!(%error, "cannot take the activation lock"),
            }
        }
        self.take_over_now();
    }

    fn take_over_now(&mut self) {
        self.adopt_previous();
        self.resume_activation();
        self.resume_tests();
    }

    /// The timer took the lock since the start-up wait: its rollback runs.
    /// Adopting now would find that rollback half done (and run it again),
    /// so the take-over waits, off the runtime's thread, and commands are
    /// refused meanwhile.
    fn wait_for_the_lock(&mut self) {
        warn!(
            "the rollback timer is rolling back an unconfirmed switch; taking over what a previous agent left once it ends"
        );
        let dir = self.state_dir.clone();
        self.lock_wait = Some(tokio::task::spawn_blocking(move || {
            activation::timer::lock(&dir, true)
        }));
    }

    /// The wait for the lock ended: the take-over goes ahead, with the
    /// lock or (it could not be had) without.
    pub(super) fn lock_waited(&mut self, lock: std::io::Result<Option<File>>) {
        self.lock_wait = None;
        match lock {
            Ok(lock) => self.activation_lock = lock,
            Err(error) => warn!(%error, "cannot take the activation lock"),
        }
        self.take_over_now();
    }

    /// Why no command may start now: the take-over waits for the timer's
    /// rollback.
    pub(super) fn waiting_refusal(&self) -> Option<String> {
        self.lock_wait
            .as_ref()
            .map(|_| "the rollback timer is rolling back an unconfirmed switch".to_owned())
    }
}

/// Test-only, and only in debug builds (release builds never read it):
/// set, the start-up wait takes no lock, as when it failed, so that a test
/// shows what the core then does (tests/rollback/timer.rs). No file state
/// makes the start-up wait fail and the core's try find the lock held.
#[cfg(debug_assertions)]
pub const TEST_NO_START_UP_LOCK_ENV: &str = "NIXFLEET_TEST_NO_START_UP_LOCK";

/// Before the agent starts its work: the activation lock, waited for if the
/// rollback timer holds it (it rolls back an unconfirmed switch). That
/// rollback's `switch-to-configuration` may be what started this agent, and
/// it waits for the agent's start job: so systemd hears READY (and the
/// watchdog its pings) while the lock is awaited off the runtime's thread,
/// and the agent then adopts the rollback whole. `None` when the lock
/// cannot be had at all (`Core::take_over` tries again and says why).
pub(super) async fn wait_for_the_timers_rollback(state_dir: &Path) -> Option<File> {
    #[cfg(debug_assertions)]
    if std::env::var_os(TEST_NO_START_UP_LOCK_ENV).is_some_and(|v| !v.is_empty()) {
        return None;
    }
    match activation::timer::lock(state_dir, false) {
        Ok(None) => {}
        taken => return taken.ok().flatten(),
    }
    warn!("the rollback timer is rolling back an unconfirmed switch; waiting for it to end");
    let systemd = Systemd::from_env();
    systemd.status("waiting for the rollback timer to end its rollback");
    systemd.ready();
    let dir = state_dir.to_owned();
    let mut locked = tokio::task::spawn_blocking(move || activation::timer::lock(&dir, true));
    let mut pings = systemd.watchdog_interval().map(Ticker::new);
    loop {
        tokio::select! {
            lock = &mut locked => return lock.ok().and_then(Result::ok).flatten(),
            Ok(()) = tick_if_any(&mut pings) => systemd.watchdog_ping(),
        }
    }
}
