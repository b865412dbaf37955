//! Everything the mock knows, in one `State` behind one mutex: the hosts
//! and their message stores, the connections, the refused upgrades, and
//! the change signal the web page's feeds wait on.
//!
//! Critical sections are short and never await: a connection task locks once
//! per received frame (classification and JSON parsing happen before the
//! lock), and the HTTP handlers lock to read or to queue an outgoing frame on
//! a connection's channel. The connection task owns its socket; the state
//! only holds the sending half of its channel. What a received frame does
//! to the state is in `session.rs`.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;

use crate::conn::{Conn, Outgoing, Rejected};
use crate::frame::{ConnId, Msg, now_ms};
use crate::host::{Host, UNREGISTERED};
use crate::record::Recorder;
use crate::tokens::TokenOwner;

/// How many rejected upgrade attempts `/api/rejected` keeps.
const MAX_REJECTED: usize = 10_000;

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
    /// every stored message: subscribers compare `next_index` for those);
    /// the changed host's `changed` takes the new value, so a page's feed
    /// sends only the hosts that changed since the version it last saw.
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

    /// Something the host list shows about host `idx` changed: bump,
    /// mark the host and wake subscribers.
    pub fn host_changed(&mut self, idx: usize) {
        self.summary_version += 1;
        if let Some(host) = self.hosts.get_mut(idx) {
            host.changed = self.summary_version;
        }
        self.changes.send_replace(());
    }

    /// Every host changed at once (the mock closes all connections).
    fn all_changed(&mut self) {
        self.summary_version += 1;
        for host in &mut self.hosts {
            host.changed = self.summary_version;
        }
        self.changes.send_replace(());
    }

    /// Only a message was stored: wake subscribers, who compare the
    /// store's `next_index` themselves.
    pub fn message_stored(&self) {
        self.changes.send_replace(());
    }

    pub fn host_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The index of host `name`, created if it is new.
    pub fn host_entry(&mut self, name: &str) -> usize {
        if let Some(&idx) = self.by_name.get(name) {
            return idx;
        }
        self.hosts.push(Host::new(name));
        let idx = self.hosts.len() - 1;
        self.by_name.insert(name.to_owned(), idx);
        idx
    }

    pub fn conn_index(&self, id: ConnId) -> Option<usize> {
        usize::try_from(id)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .filter(|&i| i < self.conns.len())
    }

    pub fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
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

    /// Stores `msg` for host `idx`, evicting beyond the cap, and records
    /// it; `frame` (the record line's `frame` value) is only made when
    /// recording.
    pub fn store<'a>(&mut self, idx: usize, msg: Msg, frame: impl FnOnce() -> Cow<'a, str>) {
        let host = &mut self.hosts[idx];
        host.last_seen = Some(msg.t);
        if let Some(r) = &self.recorder {
            r.write(format!(
                "{{\"t\":{},\"host\":{},\"conn\":{},\"frame\":{}}}\n",
                msg.t,
                host.name_json,
                msg.conn,
                frame()
            ));
        }
        host.push_capped(msg, self.max_messages);
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

    pub fn open_conn(
        &mut self,
        remote: SocketAddr,
        tx: UnboundedSender<Outgoing>,
        owner: TokenOwner,
    ) -> ConnId {
        let t = now_ms();
        let id = self.conns.len() as ConnId + 1;
        self.conns.push(Conn::new(id, remote, owner, t, tx));
        self.record(format!(
            "{{\"t\":{t},\"host\":\"\",\"conn\":{id},\"event\":\"open\",\"remote\":\"{remote}\"}}\n"
        ));
        id
    }

    pub fn open_connections(&self) -> usize {
        self.conns.iter().filter(|c| c.closed_at.is_none()).count()
    }

    /// Asks connection `id` to close with `code`; it stops being live.
    pub fn close_conn_with(&mut self, id: ConnId, code: u16, reason: &str) {
        if let Some(conn) = self.conn_mut(id) {
            conn.send(Outgoing::Close {
                code,
                reason: reason.to_owned(),
            });
            let idx = conn.host;
            self.hosts[idx].end_live(id);
            self.host_changed(idx);
        }
    }

    /// Queues `out` on `host`'s live connection; returns its id.
    pub fn send_to_host(&mut self, host: &str, out: Outgoing) -> Result<ConnId, SendError> {
        let idx = self.host_index(host).ok_or(SendError::UnknownHost)?;
        let id = self.hosts[idx].live.ok_or(SendError::NotConnected)?;
        let closing = matches!(out, Outgoing::Close { .. } | Outgoing::Abort);
        let conn = self.conn_mut(id).ok_or(SendError::NotConnected)?;
        if !conn.send(out) {
            return Err(SendError::NotConnected);
        }
        if closing {
            self.hosts[idx].live = None;
            self.host_changed(idx);
        }
        Ok(id)
    }

    /// Sends a close to every open connection (shutdown).
    pub fn close_all(&mut self, code: u16, reason: &str) {
        for conn in &self.conns {
            conn.send(Outgoing::Close {
                code,
                reason: reason.to_owned(),
            });
        }
        for host in &mut self.hosts {
            host.live = None;
        }
        self.all_changed();
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
        self.hosts[idx].end_live(id);
        self.host_changed(idx);
    }

    /// The connection task has ended.
    pub fn conn_closed(&mut self, id: ConnId, error: Option<String>) {
        let t = now_ms();
        let Some(i) = self.conn_index(id) else {
            return;
        };
        let conn = &mut self.conns[i];
        conn.ended(t, error);
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
        self.hosts[idx].end_live(id);
        if idx != 0 {
            let conn = self.conn_json(&self.conns[i]);
            self.hosts[idx].view.on_closed(t, &conn);
        }
        self.record(line);
        self.host_changed(idx);
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
    /// not register again in time; called periodically. Only the hosts
    /// that changed are marked, all with one new version.
    pub fn check_online(&mut self) {
        let now = Instant::now();
        let offline_after = self.offline_after;
        let mut changed = false;
        let t = now_ms();
        let version = self.summary_version + 1;
        for host in self.hosts.iter_mut().skip(1) {
            let mut this_changed = false;
            for command in host.commands.check_deadlines(t) {
                tracing::warn!(
                    host = host.name.as_str(),
                    command,
                    "{}",
                    crate::lifecycle::RECONNECT_TIMEOUT_ERROR
                );
                this_changed = true;
            }
            let online = host.online(now, offline_after);
            if online != host.was_online {
                this_changed = true;
                host.was_online = online;
                if online {
                    tracing::info!(host = host.name.as_str(), "host online");
                } else {
                    tracing::info!(host = host.name.as_str(), "host offline");
                }
            }
            if this_changed {
                host.changed = version;
                changed = true;
            }
        }
        if changed {
            self.summary_version = version;
            self.changes.send_replace(());
        }
    }

    /// Notes a command or kill the API sent to `host` (for the page's
    /// timeline and the command's duration).
    pub fn note_sent(&mut self, host: &str, what: &str, detail: Value) {
        if let Some(idx) = self.host_index(host) {
            self.hosts[idx].view.on_sent(now_ms(), what, detail);
            self.host_changed(idx);
        }
    }

    /// The host list as the web page shows it: each registered host's API
    /// object plus its `view` (metrics history, running command, progress).
    /// `changed_since`: `None` for every host with its whole metrics
    /// history; `Some((version, t))` for only the hosts changed after
    /// `version`, with only the metrics samples taken at `t` (unix ms) or
    /// later (the page already has the older ones), so that one host's
    /// heartbeat costs the page one host's bytes, not the fleet's.
    pub fn page_hosts(&self, changed_since: Option<(u64, u64)>) -> Value {
        let (version, samples_from) = changed_since.unwrap_or((0, 0));
        let hosts = (1..self.hosts.len())
            .filter(|&i| changed_since.is_none() || self.hosts[i].changed > version)
            .map(|i| {
                let mut host = self.host_json(i);
                if let Value::Object(map) = &mut host {
                    map.insert("view".into(), self.hosts[i].view.summary(samples_from));
                }
                host
            })
            .collect();
        Value::Array(hosts)
    }

    pub fn host_json(&self, idx: usize) -> Value {
        let host = &self.hosts[idx];
        host.json(host.online(Instant::now(), self.offline_after))
    }

    pub fn conn_json(&self, conn: &Conn) -> Value {
        let host = (conn.host != 0).then(|| self.hosts[conn.host].name.as_str());
        conn.json(host, self.hosts[conn.host].live == Some(conn.id))
    }
}
