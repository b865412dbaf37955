//! What the in-test dashboard records: every upgrade, frame, close and
//! end of a connection with its arrival time, indexed by message type.

use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// What the in-test dashboard saw.
#[derive(Debug, Clone)]
pub enum Seen {
    /// An upgrade attempt and whether it was accepted.
    Upgrade {
        conn: u64,
        accepted: bool,
        at: Instant,
    },
    /// A text frame: `kind` is the message type ("" if none); the payload
    /// is parsed from `raw` when a test first asks for it, so that recording
    /// a flood stays cheap.
    Frame {
        conn: u64,
        at: Instant,
        kind: String,
        raw: Arc<str>,
        payload: Arc<std::sync::OnceLock<Value>>,
    },
    Close {
        conn: u64,
        at: Instant,
        code: Option<u16>,
        reason: String,
    },
    /// The TCP connection ended (after a close frame or not).
    Gone { conn: u64, at: Instant },
}

impl Seen {
    pub fn conn(&self) -> u64 {
        match self {
            Seen::Upgrade { conn, .. }
            | Seen::Frame { conn, .. }
            | Seen::Close { conn, .. }
            | Seen::Gone { conn, .. } => *conn,
        }
    }
    pub fn at(&self) -> Instant {
        match self {
            Seen::Upgrade { at, .. }
            | Seen::Frame { at, .. }
            | Seen::Close { at, .. }
            | Seen::Gone { at, .. } => *at,
        }
    }
    pub fn kind(&self) -> Option<&str> {
        match self {
            Seen::Frame { kind, .. } => Some(kind),
            _ => None,
        }
    }
    pub fn payload(&self) -> &Value {
        match self {
            Seen::Frame { raw, payload, .. } => payload.get_or_init(|| {
                let parsed: Value = serde_json::from_str(raw).unwrap_or(Value::Null);
                parsed.get("payload").cloned().unwrap_or(Value::Null)
            }),
            _ => &Value::Null,
        }
    }
}

/// What a connection's task is asked to do.
pub(super) enum Control {
    Send(Message),
    Close(u16, String),
}

#[derive(Default)]
pub(super) struct Shared {
    pub(super) log: Vec<Seen>,
    /// Positions in `log` of the frames of each type, so that waiting for
    /// the n-th frame of a type does not rescan a flood of output.
    pub(super) by_kind: HashMap<String, Vec<usize>>,
    pub(super) connections: HashMap<u64, mpsc::UnboundedSender<Control>>,
    pub(super) next_conn: u64,
}

pub(super) fn record(shared: &Mutex<Shared>, changed: &Notify, seen: Seen) {
    let mut s = shared.lock().unwrap();
    if let Some(kind) = seen.kind() {
        let position = s.log.len();
        match s.by_kind.get_mut(kind) {
            Some(positions) => positions.push(position),
            None => {
                s.by_kind.insert(kind.to_owned(), vec![position]);
            }
        }
    }
    s.log.push(seen);
    drop(s);
    changed.notify_waiters();
}

/// Gaps between consecutive heartbeats of one connection.
pub fn heartbeat_gaps(log: &[Seen], conn: u64) -> Vec<Duration> {
    let beats: Vec<Instant> = log
        .iter()
        .filter(|s| s.conn() == conn && s.kind() == Some("heartbeat"))
        .map(Seen::at)
        .collect();
    beats.windows(2).map(|w| w[1] - w[0]).collect()
}

/// Heartbeat arrivals (any connection) between `from` and `to`, and the
/// longest time the dashboard went without one in that window (edges
/// included).
pub fn longest_heartbeat_silence(log: &[Seen], from: Instant, to: Instant) -> Duration {
    let mut last = from;
    let mut worst = Duration::ZERO;
    for at in log
        .iter()
        .filter(|s| s.kind() == Some("heartbeat"))
        .map(Seen::at)
        .filter(|at| *at >= from && *at <= to)
    {
        worst = worst.max(at - last);
        last = at;
    }
    worst.max(to.saturating_duration_since(last))
}
