//! One host as the mock knows it: its stored messages, its last register
//! and heartbeat, whether it is online, and what the page and the command
//! tracking keep about it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::frame::{ConnId, Msg};
use crate::lifecycle::Commands;
use crate::view::HostView;

/// Name under which frames from connections that have not (validly)
/// registered yet are kept. Not a valid hostname for `register`.
pub const UNREGISTERED: &str = "(unregistered)";

/// Used when a `register` has no usable `heartbeat_interval`.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 30_000;

pub struct Host {
    pub name: String,
    /// `name` as a JSON string, for record lines (`""` for the
    /// unregistered pseudo-host).
    pub name_json: String,
    pub messages: VecDeque<Msg>,
    /// Index the next stored message gets; messages are numbered from 0.
    pub next_index: u64,
    /// How many of the oldest messages were dropped to honour the cap.
    pub evicted: u64,
    pub register: Value,
    pub registered_at: Option<u64>,
    pub heartbeat_interval_ms: u64,
    pub last_heartbeat: Option<Value>,
    pub last_heartbeat_at: Option<u64>,
    /// Last register or heartbeat on the live connection (monotonic).
    pub last_alive: Option<Instant>,
    pub last_seen: Option<u64>,
    /// Connections that registered this hostname, in total.
    pub connections: u64,
    /// The connection commands go to.
    pub live: Option<ConnId>,
    /// Whether the last check (or register) found it online, so that only
    /// changes are logged.
    pub was_online: bool,
    /// What the web page shows beyond the raw messages.
    pub view: HostView,
    /// The state's `summary_version` when something the host list shows
    /// about this host last changed.
    pub changed: u64,
    /// v3: the latest `operation_progress` phases, merged (reset when a
    /// command is sent).
    pub progress: serde_json::Map<String, Value>,
    /// v3: the commands sent through the API and where they stand.
    pub commands: Commands,
}

impl Host {
    pub fn new(name: &str) -> Host {
        let name_json = if name == UNREGISTERED {
            "\"\"".to_owned()
        } else {
            Value::from(name).to_string()
        };
        Host {
            name: name.to_owned(),
            name_json,
            messages: VecDeque::new(),
            next_index: 0,
            evicted: 0,
            register: Value::Null,
            registered_at: None,
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            last_heartbeat: None,
            last_heartbeat_at: None,
            last_alive: None,
            last_seen: None,
            connections: 0,
            live: None,
            was_online: false,
            view: HostView::default(),
            changed: 0,
            progress: serde_json::Map::new(),
            commands: Commands::default(),
        }
    }

    /// Live, and its last register or heartbeat younger than
    /// `offline_after` heartbeat intervals.
    pub fn online(&self, now: Instant, offline_after: u32) -> bool {
        let window =
            Duration::from_millis(self.heartbeat_interval_ms).saturating_mul(offline_after);
        match (self.live, self.last_alive) {
            (Some(_), Some(alive)) => now.saturating_duration_since(alive) < window,
            _ => false,
        }
    }

    /// Stores `msg`, evicting the oldest beyond `max`.
    pub fn push_capped(&mut self, msg: Msg, max: usize) {
        self.messages.push_back(msg);
        self.next_index += 1;
        while self.messages.len() > max {
            self.messages.pop_front();
            self.evicted += 1;
        }
    }

    /// Connection `id` is no longer the one commands go to (if it was).
    pub fn end_live(&mut self, id: ConnId) {
        if self.live == Some(id) {
            self.live = None;
        }
    }

    /// The API's host object (`online` computed by the caller, who knows
    /// the offline rule).
    pub fn json(&self, online: bool) -> Value {
        json!({
            "hostname": self.name,
            "online": online,
            "connected": self.live.is_some(),
            "live_connection": self.live,
            "last_seen": self.last_seen,
            "connections": self.connections,
            "registered_at": self.registered_at,
            "register": self.register,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "last_heartbeat": self.last_heartbeat,
            "last_heartbeat_at": self.last_heartbeat_at,
            "messages": self.next_index,
            "evicted": self.evicted,
            // v3: identity from the register, freshness from the newest of
            // register and heartbeat, the compartments and the progress.
            "theme_color": self.register.get("theme_color"),
            "location": self.register.get("location"),
            "device_type": self.register.get("device_type"),
            "source_commit": self.freshest("source_commit"),
            "store_path": self.freshest("store_path"),
            "binary_hash": self.freshest("binary_hash"),
            "lock_hash": self.last_heartbeat.as_ref().and_then(|h| h.get("lock_hash")),
            "update_status": self.last_heartbeat.as_ref().and_then(|h| h.get("update_status")),
            "progress": self.progress,
            "command": self.commands.latest_json(),
        })
    }

    /// A field from the last heartbeat, else from the last register.
    fn freshest(&self, field: &str) -> Option<&Value> {
        self.last_heartbeat
            .as_ref()
            .and_then(|h| h.get(field))
            .or_else(|| self.register.get(field))
    }
}

/// The `heartbeat_interval` (seconds) of a register, in milliseconds, when
/// it is a positive number; else the default.
pub fn heartbeat_interval_ms(register: &Value) -> u64 {
    register
        .get("heartbeat_interval")
        .and_then(Value::as_f64)
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| (s * 1000.0).min(1e15) as u64)
        .filter(|&ms| ms > 0)
        .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL_MS)
}
