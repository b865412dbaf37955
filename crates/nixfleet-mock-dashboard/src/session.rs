//! What a frame received on a connection does to the state: a `register`
//! binds the connection to its host (last connection wins), a heartbeat
//! keeps the host online, statuses, rejections and progress move the
//! command tracking and the page's view; every frame is stored.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};

use crate::frame::{ConnId, Incoming, Kind, Msg, now_ms, payload_of, record_frame};
use crate::host::{UNREGISTERED, heartbeat_interval_ms};
use crate::lifecycle::merge_progress;
use crate::state::State;
use crate::tokens::TokenOwner;

/// Why a `register` is refused, in the close frame and `/api/rejected`.
const REFUSED_REASON: &str = "token of another host";
use crate::view::HostView;

impl State {
    /// Stores one text frame. Returns the `registered` reply to send, if
    /// the frame was a valid `register`.
    pub fn on_text(&mut self, id: ConnId, incoming: Incoming, text: &str) -> Option<String> {
        let t = now_ms();
        let Incoming {
            kind,
            is_json,
            payload,
        } = incoming;
        let idx = self.count_frame(id)?;
        let (idx, reply, summary_changed) = match kind {
            Kind::Register => match self.on_register(id, payload, t) {
                Some((idx, reply)) => (idx, Some(reply), true),
                None => (idx, None, false),
            },
            _ => (idx, None, self.on_frame(id, idx, &kind, payload, text, t)),
        };
        let msg = Msg {
            t,
            conn: id,
            kind,
            text: Arc::from(text),
        };
        self.store(idx, msg, || record_frame(text, is_json));
        if summary_changed {
            self.host_changed(idx);
        } else {
            self.message_stored();
        }
        reply
    }

    pub fn on_binary(&mut self, id: ConnId, data: &[u8]) {
        let t = now_ms();
        let Some(idx) = self.count_frame(id) else {
            return;
        };
        let text = String::from_utf8_lossy(data);
        let msg = Msg {
            t,
            conn: id,
            kind: Kind::Binary,
            text: Arc::from(text.as_ref()),
        };
        self.store(idx, msg, || {
            Cow::Owned(json!({ "_binary": text }).to_string())
        });
        self.message_stored();
    }

    /// Counts a frame on connection `id`; returns its host's index.
    fn count_frame(&mut self, id: ConnId) -> Option<usize> {
        let conn = self.conn_mut(id)?;
        conn.frames += 1;
        Some(conn.host)
    }

    /// A `register` with a usable hostname binds the connection to that
    /// host; returns the host's index and the `registered` reply.
    fn on_register(
        &mut self,
        id: ConnId,
        payload: Option<Value>,
        t: u64,
    ) -> Option<(usize, String)> {
        let payload = payload.unwrap_or(Value::Null);
        match payload.get("hostname").and_then(Value::as_str) {
            Some(name) if !name.is_empty() && name != UNREGISTERED => {
                let name = name.to_owned();
                if let Some(token_of) = self.foreign_token(id, &name) {
                    self.refuse(id, &name, &token_of, t);
                    return None;
                }
                let idx = self.attach(id, &name, payload, t);
                self.hosts[idx].commands.on_register(t);
                let reply = json!({"type": "registered", "payload": {"host_id": name}});
                Some((idx, reply.to_string()))
            }
            _ => {
                tracing::warn!(conn = id, "register without a usable hostname; ignored");
                None
            }
        }
    }

    /// The host whose token connection `id` presented, when that is not
    /// `name`'s.
    fn foreign_token(&mut self, id: ConnId, name: &str) -> Option<String> {
        match &self.conn_mut(id)?.owner {
            TokenOwner::Host(owner) if owner != name => Some(owner.clone()),
            _ => None,
        }
    }

    /// A `register` for `name` with `token_of`'s token: the connection is
    /// closed with 1008 and stays unregistered; `name`'s timeline and
    /// `/api/rejected` say why.
    fn refuse(&mut self, id: ConnId, name: &str, token_of: &str, t: u64) {
        tracing::warn!(
            conn = id,
            host = name,
            token_of,
            "refused register: the token is another host's"
        );
        let remote = match self.conn_mut(id) {
            Some(conn) => conn.remote,
            None => return,
        };
        self.reject(remote, REFUSED_REASON);
        let idx = self.host_entry(name);
        let remote_text = remote.to_string();
        self.hosts[idx]
            .view
            .on_refused(t, id, &remote_text, token_of);
        self.close_conn_with(id, 1008, REFUSED_REASON);
    }

    /// An upgrade naming host `name` (our agent's extension header) with
    /// `token_of`'s token: refused with 401 before any connection exists;
    /// `name`'s timeline and `/api/rejected` say why.
    pub fn refuse_upgrade(&mut self, remote: std::net::SocketAddr, name: &str, token_of: &str) {
        self.reject(remote, REFUSED_REASON);
        let idx = self.host_entry(name);
        self.hosts[idx]
            .view
            .on_refused(now_ms(), 0, &remote.to_string(), token_of);
    }

    /// Any frame but a `register`, on a connection bound to host `idx`;
    /// returns whether the host list changed.
    fn on_frame(
        &mut self,
        id: ConnId,
        idx: usize,
        kind: &Kind,
        payload: Option<Value>,
        text: &str,
        t: u64,
    ) -> bool {
        // Frames before a valid register are only stored.
        if idx == 0 {
            return false;
        }
        let timeout = self.reconnect_timeout;
        let host = &mut self.hosts[idx];
        match (kind, &payload) {
            (Kind::Heartbeat, _) => {
                // Only the live connection keeps the host online: not one
                // that a newer connection replaced, nor one that is closing.
                if host.live != Some(id) {
                    return false;
                }
                let payload = payload.unwrap_or(Value::Null);
                host.view.on_heartbeat(t, &payload);
                host.last_heartbeat = Some(payload);
                host.last_heartbeat_at = Some(t);
                host.last_alive = Some(Instant::now());
                host.commands.on_heartbeat(t);
                return true;
            }
            (Kind::Status, Some(payload)) => host.commands.on_status(payload, t, timeout),
            (Kind::CommandRejected, Some(payload)) => host.commands.on_rejected(payload, t),
            (Kind::OperationProgress, Some(payload)) => merge_progress(&mut host.progress, payload),
            _ => {}
        }
        observe(&mut host.view, t, kind, payload, text)
    }

    /// Binds connection `id` to hostname `name` (creating the host), makes
    /// it the live connection and closes an older live one with 1008.
    fn attach(&mut self, id: ConnId, name: &str, payload: Value, t: u64) -> usize {
        let idx = self.host_entry(name);
        let Some(conn) = self.conn_mut(id) else {
            return 0;
        };
        let prev = conn.host;
        if prev != idx {
            conn.host = idx;
            conn.registered_at = Some(t);
            if prev != 0 {
                // Re-registered under another name.
                self.hosts[prev].end_live(id);
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
        let interval_ms = heartbeat_interval_ms(&payload);
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
}

/// Feeds a registered host's view with a frame it shows; returns whether
/// the host list changed. Output is parsed only for a command's first line.
fn observe(view: &mut HostView, t: u64, kind: &Kind, payload: Option<Value>, text: &str) -> bool {
    match kind {
        Kind::Output if view.wants_output_command() => {
            view.on_output(t, &payload_of(text));
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
