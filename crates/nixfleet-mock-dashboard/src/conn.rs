//! One agent connection as the state keeps it: who it is, how it ended,
//! and the sending half of the channel to the task that owns its socket.

use std::net::SocketAddr;

use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedSender;

use crate::frame::ConnId;
use crate::tokens::TokenOwner;

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

pub struct Conn {
    pub id: ConnId,
    pub remote: SocketAddr,
    /// Whose token its upgrade presented: which hostname may register.
    pub owner: TokenOwner,
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
    /// `None` once the connection task has ended.
    tx: Option<UnboundedSender<Outgoing>>,
}

impl Conn {
    pub fn new(
        id: ConnId,
        remote: SocketAddr,
        owner: TokenOwner,
        t: u64,
        tx: UnboundedSender<Outgoing>,
    ) -> Conn {
        Conn {
            id,
            remote,
            owner,
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
        }
    }

    /// Queues `out` for the connection task; false when it has ended.
    pub fn send(&self, out: Outgoing) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(out).is_ok())
    }

    /// The connection task has ended: nothing can be sent any more.
    pub fn ended(&mut self, t: u64, error: Option<String>) {
        self.closed_at = Some(t);
        self.tx = None;
        self.set_closed_by("transport");
        if self.error.is_none() {
            self.error = error;
        }
    }

    /// Only the first to start closing counts.
    pub fn set_closed_by(&mut self, who: &'static str) {
        if self.closed_by.is_none() {
            self.closed_by = Some(who);
        }
    }

    /// The API's connection object; `host` is `None` until it registered.
    pub fn json(&self, host: Option<&str>, live: bool) -> Value {
        json!({
            "id": self.id,
            "host": host,
            "remote": self.remote.to_string(),
            "opened_at": self.opened_at,
            "registered_at": self.registered_at,
            "closed_at": self.closed_at,
            "open": self.closed_at.is_none(),
            "live": live,
            "frames": self.frames,
            "close_code": self.close_code,
            "close_reason": self.close_reason,
            "closed_by": self.closed_by,
            "sent_close_code": self.sent_close_code,
            "sent_close_reason": self.sent_close_reason,
            "error": self.error,
        })
    }
}

/// A refused WebSocket upgrade, as `/api/rejected` lists it.
pub struct Rejected {
    pub t: u64,
    pub remote: SocketAddr,
    pub reason: &'static str,
}
