//! Everything the mock knows, in one `State` behind one mutex.
//!
//! Critical sections are short and never await: a connection task locks once
//! per received frame (classification and JSON parsing happen before the
//! lock), and the HTTP handlers lock to read or to queue an outgoing frame on
//! a connection's channel. The connection task owns its socket; the state
//! only holds the sending half of its channel.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;

use crate::lifecycle::{Commands, merge_progress};
use crate::record::Recorder;
use crate::view::HostView;

/// Name under which frames from connections that have not (validly)
/// registered yet are kept. Not a valid hostname for `register`.
pub const UNREGISTERED: &str = "(unregistered)";

/// Used when a `register` has no usable `heartbeat_interval`.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 30_000;

/// How many rejected upgrade attempts `/api/rejected` keeps.
const MAX_REJECTED: usize = 10_000;

pub type ConnId = u64;

/// What the HTTP API asks a connection task to do.
#[derive(Debug)]
pub enum Outgoing {
    Text(String),
    Binary(Vec<u8>),
    Close {
        code: u16,
        reason: String,
    },
    /// Drop the TCP connection without a close handshake.
    Abort,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A received frame's `type`, without an allocation for the usual ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Register,
    Heartbeat,
    Output,
    Status,
    CommandRejected,
    TestProgress,
    OperationProgress,
    Other(Arc<str>),
    /// A text frame that is not a JSON object with a string `type`.
    Malformed,
    /// A binary frame (agents should never send one).
    Binary,
}

impl Kind {
    fn from_type(t: &str) -> Kind {
        match t {
            "register" => Kind::Register,
            "heartbeat" => Kind::Heartbeat,
            "output" => Kind::Output,
            "status" => Kind::Status,
            "command_rejected" => Kind::CommandRejected,
            "test_progress" => Kind::TestProgress,
            "operation_progress" => Kind::OperationProgress,
            other => Kind::Other(Arc::from(other)),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Kind::Register => "register",
            Kind::Heartbeat => "heartbeat",
            Kind::Output => "output",
            Kind::Status => "status",
            Kind::CommandRejected => "command_rejected",
            Kind::TestProgress => "test_progress",
            Kind::OperationProgress => "operation_progress",
            Kind::Other(t) => t,
            Kind::Malformed => "_malformed",
            Kind::Binary => "_binary",
        }
    }

    /// Whether the stored text is the frame itself, a JSON envelope
    /// (otherwise it is the raw text to show as `raw`).
    pub fn is_envelope(&self) -> bool {
        !matches!(self, Kind::Malformed | Kind::Binary)
    }
}

/// One stored frame. `text` is the frame exactly as received (for binary
/// frames: its bytes, lossily decoded as UTF-8); the payload is extracted
/// again when the API serves it, which keeps the per-frame cost at one copy.
#[derive(Debug, Clone)]
pub struct Msg {
    pub t: u64,
    pub conn: ConnId,
    pub kind: Kind,
    pub text: Arc<str>,
}

/// A text frame, classified outside the lock.
pub struct Incoming {
    kind: Kind,
    /// The text is valid JSON (even when it is not a valid envelope).
    is_json: bool,
    /// The parsed payload, only for the types the mock acts on or the web
    /// page shows (not for the many `output` lines).
    payload: Option<Value>,
}

#[derive(Deserialize)]
struct TypeProbe<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct PayloadOnly {
    #[serde(default)]
    payload: Value,
}

impl Incoming {
    pub fn is_malformed(&self) -> bool {
        self.kind == Kind::Malformed
    }
}

pub fn classify(text: &str) -> Incoming {
    // serde would also accept a JSON array for a struct; only objects count.
    let is_object = text.trim_start().starts_with('{');
    let probe = if is_object {
        serde_json::from_str::<TypeProbe<'_>>(text).ok()
    } else {
        None
    };
    match probe.and_then(|p| p.kind) {
        Some(t) => {
            let kind = Kind::from_type(&t);
            let parse = matches!(
                kind,
                Kind::Register
                    | Kind::Heartbeat
                    | Kind::Status
                    | Kind::CommandRejected
                    | Kind::TestProgress
                    | Kind::OperationProgress
            );
            let payload = parse.then(|| {
                serde_json::from_str::<PayloadOnly>(text)
                    .map(|p| p.payload)
                    .unwrap_or(Value::Null)
            });
            Incoming {
                kind,
                is_json: true,
                payload,
            }
        }
        None => Incoming {
            kind: Kind::Malformed,
            is_json: serde_json::from_str::<IgnoredAny>(text).is_ok(),
            payload: None,
        },
    }
}

pub struct Host {
    pub name: String,
    /// `name` as a JSON string, for record lines (`""` for the
    /// unregistered pseudo-host).
    name_json: String,
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
    last_alive: Option<Instant>,
    pub last_seen: Option<u64>,
    /// Connections that registered this hostname, in total.
    pub connections: u64,
    /// The connection commands go to.
    pub live: Option<ConnId>,
    was_online: bool,
    /// What the web page shows beyond the raw messages.
    pub view: HostView,
    /// v3: the latest `operation_progress` phases, merged (reset when a
    /// command is sent).
    pub progress: serde_json::Map<String, Value>,
    /// v3: the commands sent through the API and where they stand.
    pub commands: Commands,
}

impl Host {
    fn new(name: &str) -> Host {
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
            progress: serde_json::Map::new(),
            commands: Commands::default(),
        }
    }

    fn online(&self, now: Instant, offline_after: u32) -> bool {
        let window =
            Duration::from_millis(self.heartbeat_interval_ms).saturating_mul(offline_after);
        match (self.live, self.last_alive) {
            (Some(_), Some(alive)) => now.saturating_duration_since(alive) < window,
            _ => false,
        }
    }
}

pub struct Conn {
    pub id: ConnId,
    pub remote: SocketAddr,
    /// Index into `State::hosts`; 0 until the connection registers.
    pub host: usize,
    pub opened_at: u64,
    pub registered_at: Option<u64>,
    pub frames: u64,
    pub closed_at: Option<u64>,
    /// From the agent's close frame.
    pub close_code: Option<u16>,
    pub close_reason: Option<String>,
    /// `"agent"`, `"dashboard"` or `"transport"`.
    pub closed_by: Option<&'static str>,
    /// From the mock's close frame.
    pub sent_close_code: Option<u16>,
    pub sent_close_reason: Option<String>,
    pub error: Option<String>,
    tx: Option<UnboundedSender<Outgoing>>,
}

impl Conn {
    fn set_closed_by(&mut self, who: &'static str) {
        if self.closed_by.is_none() {
            self.closed_by = Some(who);
        }
    }
}

pub struct Rejected {
    pub t: u64,
    pub remote: SocketAddr,
    pub reason: &'static str,
}

pub struct State {
    /// Index 0 is the `(unregistered)` pseudo-host.
    pub hosts: Vec<Host>,
    by_name: HashMap<String, usize>,
    /// Connection `id` is at index `id - 1`.
    pub conns: Vec<Conn>,
    pub rejected: VecDeque<Rejected>,
    recorder: Option<Recorder>,
    max_messages: usize,
    offline_after: u32,
    /// Bumped whenever something the host list shows changed (not for
    /// every stored message: subscribers compare `next_index` for those).
    pub summary_version: u64,
    /// Wakes the web page's event streams after any change.
    changes: watch::Sender<()>,
    /// How long a successful switch waits for the agent's new `register`.
    pub reconnect_timeout: Duration,
}

/// Why the API could not queue a frame for a host.
pub enum SendError {
    UnknownHost,
    NotConnected,
}

impl State {
    pub fn new(max_messages: usize, offline_after: u32, recorder: Option<Recorder>) -> State {
        let mut by_name = HashMap::new();
        by_name.insert(UNREGISTERED.to_owned(), 0);
        State {
            hosts: vec![Host::new(UNREGISTERED)],
            by_name,
            conns: Vec::new(),
            rejected: VecDeque::new(),
            recorder,
            max_messages: max_messages.max(1),
            offline_after,
            summary_version: 0,
            changes: watch::Sender::new(()),
            reconnect_timeout: Duration::from_secs(90),
        }
    }

    /// A receiver that wakes after every change of the state.
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.changes.subscribe()
    }

    /// Something the host list shows changed: bump and wake subscribers.
    fn summary_changed(&mut self) {
        self.summary_version += 1;
        self.changes.send_replace(());
    }

    pub fn host_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    fn conn_index(&self, id: ConnId) -> Option<usize> {
        usize::try_from(id)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .filter(|&i| i < self.conns.len())
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        let i = self.conn_index(id)?;
        self.conns.get_mut(i)
    }

    fn record(&self, line: String) {
        if let Some(r) = &self.recorder {
            r.write(line);
        }
    }

    /// Stops recording (at shutdown), so the writer can drain and exit.
    pub fn take_recorder(&mut self) -> Option<Recorder> {
        self.recorder.take()
    }

    pub fn reject(&mut self, remote: SocketAddr, reason: &'static str) {
        let t = now_ms();
        if self.rejected.len() >= MAX_REJECTED {
            self.rejected.pop_front();
        }
        self.rejected.push_back(Rejected { t, remote, reason });
        self.record(format!(
            "{{\"t\":{t},\"host\":\"\",\"conn\":0,\"event\":\"rejected\",\"remote\":\"{remote}\",\"reason\":\"{reason}\"}}\n"
        ));
    }

    pub fn open_conn(&mut self, remote: SocketAddr, tx: UnboundedSender<Outgoing>) -> ConnId {
        let t = now_ms();
        let id = self.conns.len() as ConnId + 1;
        self.conns.push(Conn {
            id,
            remote,
            host: 0,
            opened_at: t,
            registered_at: None,
            frames: 0,
            closed_at: None,
            close_code: None,
            close_reason: None,
            closed_by: None,
            sent_close_code: None,
            sent_close_reason: None,
            error: None,
            tx: Some(tx),
        });
        self.record(format!(
            "{{\"t\":{t},\"host\":\"\",\"conn\":{id},\"event\":\"open\",\"remote\":\"{remote}\"}}\n"
        ));
        id
    }

    pub fn open_connections(&self) -> usize {
        self.conns.iter().filter(|c| c.closed_at.is_none()).count()
    }

    /// Stores one text frame. Returns the `registered` reply to send, if
    /// the frame was a valid `register`.
    pub fn on_text(&mut self, id: ConnId, incoming: Incoming, text: &str) -> Option<String> {
        let t = now_ms();
        let Incoming {
            kind,
            is_json,
            payload,
        } = incoming;
        let mut reply = None;
        let mut summary_changed = false;
        let mut idx = match self.conn_mut(id) {
            Some(conn) => {
                conn.frames += 1;
                conn.host
            }
            None => return None,
        };
        match kind {
            Kind::Register => {
                let payload = payload.unwrap_or(Value::Null);
                match payload.get("hostname").and_then(Value::as_str) {
                    Some(name) if !name.is_empty() && name != UNREGISTERED => {
                        let name = name.to_owned();
                        idx = self.attach(id, &name, payload, t);
                        self.hosts[idx].commands.on_register(t);
                        summary_changed = true;
                        reply = Some(
                            json!({"type": "registered", "payload": {"host_id": name}}).to_string(),
                        );
                    }
                    _ => {
                        tracing::warn!(conn = id, "register without a usable hostname; ignored");
                    }
                }
            }
            Kind::Heartbeat => {
                let host = &mut self.hosts[idx];
                if idx != 0 && host.live == Some(id) {
                    let payload = payload.unwrap_or(Value::Null);
                    host.view.on_heartbeat(t, &payload);
                    host.last_heartbeat = Some(payload);
                    host.last_heartbeat_at = Some(t);
                    host.last_alive = Some(Instant::now());
                    host.commands.on_heartbeat(t);
                    summary_changed = true;
                }
            }
            Kind::Status if idx != 0 => {
                let timeout = self.reconnect_timeout;
                if let Some(payload) = &payload {
                    self.hosts[idx].commands.on_status(payload, t, timeout);
                }
                summary_changed = observe(&mut self.hosts[idx].view, t, &kind, payload, text);
            }
            Kind::CommandRejected if idx != 0 => {
                if let Some(payload) = &payload {
                    self.hosts[idx].commands.on_rejected(payload, t);
                }
                summary_changed = observe(&mut self.hosts[idx].view, t, &kind, payload, text);
            }
            Kind::OperationProgress if idx != 0 => {
                if let Some(payload) = &payload {
                    merge_progress(&mut self.hosts[idx].progress, payload);
                }
                summary_changed = observe(&mut self.hosts[idx].view, t, &kind, payload, text);
            }
            _ if idx != 0 => {
                summary_changed = observe(&mut self.hosts[idx].view, t, &kind, payload, text);
            }
            _ => {}
        }
        let host = &mut self.hosts[idx];
        host.last_seen = Some(t);
        if self.recorder.is_some() {
            let frame = record_frame(text, is_json);
            let line = format!(
                "{{\"t\":{t},\"host\":{},\"conn\":{id},\"frame\":{frame}}}\n",
                host.name_json
            );
            if let Some(r) = &self.recorder {
                r.write(line);
            }
        }
        push_capped(
            host,
            Msg {
                t,
                conn: id,
                kind,
                text: Arc::from(text),
            },
            self.max_messages,
        );
        if summary_changed {
            self.summary_changed();
        } else {
            self.changes.send_replace(());
        }
        reply
    }

    pub fn on_binary(&mut self, id: ConnId, data: &[u8]) {
        let t = now_ms();
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        conn.frames += 1;
        let idx = conn.host;
        let text = String::from_utf8_lossy(data);
        let host = &mut self.hosts[idx];
        host.last_seen = Some(t);
        if let Some(r) = &self.recorder {
            r.write(format!(
                "{{\"t\":{t},\"host\":{},\"conn\":{id},\"frame\":{}}}\n",
                host.name_json,
                json!({ "_binary": text })
            ));
        }
        push_capped(
            host,
            Msg {
                t,
                conn: id,
                kind: Kind::Binary,
                text: Arc::from(text.as_ref()),
            },
            self.max_messages,
        );
        self.changes.send_replace(());
    }

    /// Binds connection `id` to hostname `name` (creating the host), makes
    /// it the live connection and closes an older live one with 1008.
    fn attach(&mut self, id: ConnId, name: &str, payload: Value, t: u64) -> usize {
        let idx = match self.by_name.get(name) {
            Some(&idx) => idx,
            None => {
                self.hosts.push(Host::new(name));
                let idx = self.hosts.len() - 1;
                self.by_name.insert(name.to_owned(), idx);
                idx
            }
        };
        let Some(conn) = self.conn_mut(id) else {
            return 0;
        };
        let prev = conn.host;
        if prev != idx {
            conn.host = idx;
            conn.registered_at = Some(t);
            if prev != 0 && self.hosts[prev].live == Some(id) {
                // Re-registered under another name.
                self.hosts[prev].live = None;
            }
            self.hosts[idx].connections += 1;
        }
        if let Some(old) = self.hosts[idx].live.filter(|&old| old != id) {
            tracing::info!(
                host = name,
                old,
                new = id,
                "duplicate host: closing the older connection"
            );
            self.close_conn_with(old, 1008, "duplicate host");
        }
        let interval_ms = payload
            .get("heartbeat_interval")
            .and_then(Value::as_f64)
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(|s| (s * 1000.0).min(1e15) as u64)
            .filter(|&ms| ms > 0)
            .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL_MS);
        let remote = self
            .conn_index(id)
            .map(|i| self.conns[i].remote.to_string())
            .unwrap_or_default();
        let host = &mut self.hosts[idx];
        host.view.on_register(t, id, &remote, &payload);
        host.live = Some(id);
        host.register = payload;
        host.registered_at = Some(t);
        host.heartbeat_interval_ms = interval_ms;
        host.last_alive = Some(Instant::now());
        if !host.was_online {
            host.was_online = true;
            tracing::info!(host = name, conn = id, "host online");
        }
        tracing::info!(
            host = name,
            conn = id,
            heartbeat_interval_ms = interval_ms,
            "registered"
        );
        idx
    }

    /// Asks connection `id` to close with `code`; it stops being live.
    fn close_conn_with(&mut self, id: ConnId, code: u16, reason: &str) {
        if let Some(conn) = self.conn_mut(id) {
            if let Some(tx) = &conn.tx {
                let _ = tx.send(Outgoing::Close {
                    code,
                    reason: reason.to_owned(),
                });
            }
            let idx = conn.host;
            if self.hosts[idx].live == Some(id) {
                self.hosts[idx].live = None;
            }
            self.summary_changed();
        }
    }

    /// Queues `out` on `host`'s live connection; returns its id.
    pub fn send_to_host(&mut self, host: &str, out: Outgoing) -> Result<ConnId, SendError> {
        let idx = self.host_index(host).ok_or(SendError::UnknownHost)?;
        let id = self.hosts[idx].live.ok_or(SendError::NotConnected)?;
        let closing = matches!(out, Outgoing::Close { .. } | Outgoing::Abort);
        let conn = self.conn_mut(id).ok_or(SendError::NotConnected)?;
        let sent = conn.tx.as_ref().is_some_and(|tx| tx.send(out).is_ok());
        if !sent {
            return Err(SendError::NotConnected);
        }
        if closing {
            self.hosts[idx].live = None;
            self.summary_changed();
        }
        Ok(id)
    }

    /// Sends a close to every open connection (shutdown).
    pub fn close_all(&mut self, code: u16, reason: &str) {
        for conn in &self.conns {
            if let Some(tx) = &conn.tx {
                let _ = tx.send(Outgoing::Close {
                    code,
                    reason: reason.to_owned(),
                });
            }
        }
        for host in &mut self.hosts {
            host.live = None;
        }
        self.summary_changed();
    }

    pub fn note_sent_close(&mut self, id: ConnId, code: u16, reason: &str) {
        if let Some(conn) = self.conn_mut(id) {
            conn.sent_close_code = Some(code);
            conn.sent_close_reason = Some(reason.to_owned());
            conn.set_closed_by("dashboard");
        }
    }

    pub fn note_abort(&mut self, id: ConnId) {
        if let Some(conn) = self.conn_mut(id) {
            conn.set_closed_by("dashboard");
        }
    }

    pub fn note_agent_close(&mut self, id: ConnId, code: Option<u16>, reason: Option<&str>) {
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        conn.close_code = code;
        conn.close_reason = reason.map(str::to_owned);
        conn.set_closed_by("agent");
        let idx = conn.host;
        if self.hosts[idx].live == Some(id) {
            self.hosts[idx].live = None;
        }
        self.summary_changed();
    }

    /// The connection task has ended.
    pub fn conn_closed(&mut self, id: ConnId, error: Option<String>) {
        let t = now_ms();
        let Some(i) = self.conn_index(id) else {
            return;
        };
        let conn = &mut self.conns[i];
        conn.closed_at = Some(t);
        conn.tx = None;
        conn.set_closed_by("transport");
        if conn.error.is_none() {
            conn.error = error;
        }
        let idx = conn.host;
        let line = format!(
            "{{\"t\":{t},\"host\":{},\"conn\":{id},\"event\":\"close\",\"code\":{},\"reason\":{},\
             \"closed_by\":{},\"sent_code\":{},\"sent_reason\":{}}}\n",
            self.hosts[idx].name_json,
            json!(conn.close_code),
            json!(conn.close_reason),
            json!(conn.closed_by),
            json!(conn.sent_close_code),
            json!(conn.sent_close_reason),
        );
        tracing::info!(
            conn = id,
            host = self.hosts[idx].name.as_str(),
            code = conn.close_code,
            reason = conn.close_reason.as_deref(),
            closed_by = conn.closed_by,
            "connection closed"
        );
        if self.hosts[idx].live == Some(id) {
            self.hosts[idx].live = None;
        }
        if idx != 0 {
            let conn = self.conn_json(&self.conns[i]);
            self.hosts[idx].view.on_closed(t, &conn);
        }
        self.record(line);
        self.summary_changed();
    }

    /// The API sent `command` to `host`.
    pub fn note_command(&mut self, host: &str, command: &str) {
        if let Some(idx) = self.host_index(host) {
            let host = &mut self.hosts[idx];
            if !matches!(command, "stop" | "kill") {
                host.progress.clear();
            }
            host.commands.sent(command, now_ms());
        }
    }

    /// Logs online/offline transitions and ends switches whose agent did
    /// not register again in time; called periodically.
    pub fn check_online(&mut self) {
        let now = Instant::now();
        let offline_after = self.offline_after;
        let mut changed = false;
        let t = now_ms();
        for host in self.hosts.iter_mut().skip(1) {
            for command in host.commands.check_deadlines(t) {
                tracing::warn!(
                    host = host.name.as_str(),
                    command,
                    "{}",
                    crate::lifecycle::RECONNECT_TIMEOUT_ERROR
                );
                changed = true;
            }
            let online = host.online(now, offline_after);
            if online != host.was_online {
                changed = true;
                host.was_online = online;
                if online {
                    tracing::info!(host = host.name.as_str(), "host online");
                } else {
                    tracing::info!(host = host.name.as_str(), "host offline");
                }
            }
        }
        if changed {
            self.summary_changed();
        }
    }

    /// Notes a command or kill the API sent to `host` (for the page's
    /// timeline and the command's duration).
    pub fn note_sent(&mut self, host: &str, what: &str, detail: Value) {
        if let Some(idx) = self.host_index(host) {
            self.hosts[idx].view.on_sent(now_ms(), what, detail);
            self.summary_changed();
        }
    }

    /// The host list as the web page shows it: every registered host's API
    /// object plus its `view` (metrics history, running command, progress).
    pub fn page_hosts(&self) -> Value {
        let hosts = (1..self.hosts.len())
            .map(|i| {
                let mut host = self.host_json(i);
                if let Value::Object(map) = &mut host {
                    map.insert("view".into(), self.hosts[i].view.summary());
                }
                host
            })
            .collect();
        Value::Array(hosts)
    }

    pub fn host_json(&self, idx: usize) -> Value {
        let host = &self.hosts[idx];
        json!({
            "hostname": host.name,
            "online": host.online(Instant::now(), self.offline_after),
            "connected": host.live.is_some(),
            "live_connection": host.live,
            "last_seen": host.last_seen,
            "connections": host.connections,
            "registered_at": host.registered_at,
            "register": host.register,
            "heartbeat_interval_ms": host.heartbeat_interval_ms,
            "last_heartbeat": host.last_heartbeat,
            "last_heartbeat_at": host.last_heartbeat_at,
            "messages": host.next_index,
            "evicted": host.evicted,
            // v3: identity from the register, freshness from the newest of
            // register and heartbeat, the compartments and the progress.
            "theme_color": host.register.get("theme_color"),
            "location": host.register.get("location"),
            "device_type": host.register.get("device_type"),
            "source_commit": freshest(host, "source_commit"),
            "store_path": freshest(host, "store_path"),
            "binary_hash": freshest(host, "binary_hash"),
            "lock_hash": host.last_heartbeat.as_ref().and_then(|h| h.get("lock_hash")),
            "update_status": host.last_heartbeat.as_ref().and_then(|h| h.get("update_status")),
            "progress": host.progress,
            "command": host.commands.latest_json(),
        })
    }

    pub fn conn_json(&self, conn: &Conn) -> Value {
        json!({
            "id": conn.id,
            "host": if conn.host == 0 { None } else { Some(self.hosts[conn.host].name.as_str()) },
            "remote": conn.remote.to_string(),
            "opened_at": conn.opened_at,
            "registered_at": conn.registered_at,
            "closed_at": conn.closed_at,
            "open": conn.closed_at.is_none(),
            "live": self.hosts[conn.host].live == Some(conn.id),
            "frames": conn.frames,
            "close_code": conn.close_code,
            "close_reason": conn.close_reason,
            "closed_by": conn.closed_by,
            "sent_close_code": conn.sent_close_code,
            "sent_close_reason": conn.sent_close_reason,
            "error": conn.error,
        })
    }
}

/// Feeds a registered host's view with a frame it shows; returns whether
/// the host list changed. Output is parsed only for a command's first line.
fn observe(view: &mut HostView, t: u64, kind: &Kind, payload: Option<Value>, text: &str) -> bool {
    match kind {
        Kind::Output if view.wants_output_command() => {
            let payload = serde_json::from_str::<PayloadOnly>(text)
                .map(|p| p.payload)
                .unwrap_or(Value::Null);
            view.on_output(t, &payload);
            true
        }
        Kind::Status => {
            view.on_status(t, &payload.unwrap_or(Value::Null));
            true
        }
        Kind::CommandRejected => {
            view.on_rejected(t, &payload.unwrap_or(Value::Null));
            true
        }
        Kind::TestProgress => {
            view.on_test_progress(payload.unwrap_or(Value::Null));
            true
        }
        Kind::OperationProgress => {
            view.on_progress(payload.unwrap_or(Value::Null));
            true
        }
        _ => false,
    }
}

/// A field from the last heartbeat, else from the last register.
fn freshest<'a>(host: &'a Host, field: &str) -> Option<&'a Value> {
    host.last_heartbeat
        .as_ref()
        .and_then(|h| h.get(field))
        .or_else(|| host.register.get(field))
}

fn push_capped(host: &mut Host, msg: Msg, max: usize) {
    host.messages.push_back(msg);
    host.next_index += 1;
    while host.messages.len() > max {
        host.messages.pop_front();
        host.evicted += 1;
    }
}

/// The `frame` value of a record line: the frame itself when it is JSON on
/// one line, re-serialised when it spans lines, else `{"_raw": text}`.
fn record_frame(text: &str, is_json: bool) -> std::borrow::Cow<'_, str> {
    if is_json {
        if !text.contains(['\n', '\r']) {
            return std::borrow::Cow::Borrowed(text);
        }
        if let Ok(v) = serde_json::from_str::<Value>(text) {
            return std::borrow::Cow::Owned(v.to_string());
        }
    }
    std::borrow::Cow::Owned(json!({ "_raw": text }).to_string())
}

/// Shared by the connection tasks and the HTTP handlers.
pub struct Shared {
    state: Mutex<State>,
    token: Box<[u8]>,
    pub shutting_down: AtomicBool,
}

impl Shared {
    pub fn new(state: State, token: String) -> Shared {
        Shared {
            state: Mutex::new(state),
            token: token.into_bytes().into_boxed_slice(),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Locks the state. Nothing panics while holding it, but should that
    /// ever happen the data is still usable: ignore the poison.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Compares without an early exit on the first differing byte.
    pub fn token_matches(&self, given: &[u8]) -> bool {
        let expected = &self.token;
        let mut diff = u8::from(expected.len() != given.len());
        for (i, b) in expected.iter().enumerate() {
            diff |= b ^ given.get(i).copied().unwrap_or(0);
        }
        diff == 0
    }
}
