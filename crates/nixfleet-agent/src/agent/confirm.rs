//! When an armed activation ends: confirmed by a connection that stayed up
//! (for a dashboard that never answers `register` with `registered`), or
//! expired at its wall-clock deadline. The `registered` reply itself
//! arrives as an `Inbound` message and is handled by the core.

use crate::connection::LinkState;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::time::Instant;

/// A connection that has been up this long counts as confirmed: by then the
/// agent has written its register and heartbeats on it, and the dashboard
/// kept it.
pub(super) const STABLE_LINK: Duration = Duration::from_secs(5);

/// What ended the wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// A connection opened after the switch stayed up for [`STABLE_LINK`].
    Stable,
    /// The deadline passed.
    Expired,
}

/// Watches the link for a confirming connection.
pub(super) struct Confirmation {
    link: watch::Receiver<LinkState>,
    /// When the current connection came up, if it came up after arming.
    connected_since: Option<Instant>,
}

impl Confirmation {
    pub(super) fn new(link: watch::Receiver<LinkState>) -> Self {
        Confirmation {
            link,
            connected_since: None,
        }
    }

    /// A switch just armed: the connection that carried it (opened before
    /// the new system ran) does not count; only one opened from now on.
    pub(super) fn rearm(&mut self) {
        self.link.borrow_and_update();
        self.connected_since = None;
    }

    /// Waits for the verdict on an activation armed until `deadline`
    /// (seconds since the epoch); never completes without one.
    pub(super) async fn next(&mut self, deadline: Option<u64>) -> Verdict {
        let Some(deadline) = deadline else {
            return std::future::pending().await;
        };
        loop {
            let left = Duration::from_secs(deadline).saturating_sub(since_epoch());
            let stable = self.connected_since.map(|since| since + STABLE_LINK);
            tokio::select! {
                () = tokio::time::sleep(left) => return Verdict::Expired,
                () = sleep_until(stable) => return Verdict::Stable,
                changed = self.link.changed() => {
                    if changed.is_err() {
                        // The connection task is gone (shutting down): only
                        // the deadline is left.
                        tokio::time::sleep(left).await;
                        return Verdict::Expired;
                    }
                    let connected = matches!(*self.link.borrow_and_update(), LinkState::Connected);
                    self.connected_since = connected.then(Instant::now);
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Wall-clock time: the deadline is kept on disk, for another process.
pub(super) fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

pub(super) fn now_secs() -> u64 {
    since_epoch().as_secs()
}
