//! What the connection shares with the rest of the agent: the channels it
//! reads and feeds, and how it reports the state of the link.

use crate::heartbeat::CommandState;
use crate::outbox::Outbox;
use crate::protocol::Inbound;
use crate::shutdown;
use crate::watchdog::Probe;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// What the agent core asks of the connection after a status went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Send a heartbeat now: a v3 dashboard completes a command on the
    /// first heartbeat after its status.
    Heartbeat,
    /// Send a heartbeat, close with 1000 and connect again at once: a v3
    /// dashboard completes a switch only when the agent registers again
    /// (with the new system's versions).
    Reregister,
}

/// The link as a human would describe it (for logs and systemd's STATUS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    Connecting,
    Connected,
    Reconnecting {
        delay: Duration,
        error: String,
        /// The kind of failure, one of a few fixed words (a metric label).
        reason: &'static str,
    },
}

/// Connections made and lost since the agent started, counted by the
/// connection itself and published through a `watch` (for the metrics):
/// cumulative, so that an observer that lags behind a burst of
/// reconnects (it writes files) still reads every one, where following
/// [`LinkState`] would see only the latest state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkCounts {
    /// Sessions that started (the socket and the WebSocket upgrade done).
    pub connects: u64,
    /// Sessions that ended other than by shutdown, by
    /// `SessionEnd::label`.
    pub disconnects: BTreeMap<&'static str, u64>,
}

/// Everything the connection needs from the rest of the agent.
pub struct Links {
    /// Commands and kill requests for the agent core.
    pub inbound: mpsc::Sender<Inbound>,
    /// Frames the core wants sent ahead of output (rejections).
    pub replies: mpsc::Receiver<String>,
    pub outbox: Arc<Outbox>,
    pub command_state: watch::Receiver<CommandState>,
    pub link_state: watch::Sender<LinkState>,
    pub link_counts: watch::Sender<LinkCounts>,
    pub probes: mpsc::Receiver<Probe>,
    pub shutdown: shutdown::Listener,
    pub control: mpsc::Receiver<Control>,
}
