//! `GET /ws`: the bearer-token check, the upgrade, and one task per agent
//! connection that reads frames into the state and writes what the HTTP API
//! queued for it.

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::api::error;
use crate::conn::Outgoing;
use crate::frame::{ConnId, classify};
use crate::shared::Shared;
use crate::tokens::TokenOwner;

/// Largest message (and frame) accepted from an agent.
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// How long to wait for the agent's close frame after sending ours.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whose token the upgrade presented, or why it was refused (for the log
/// and `/api/rejected`; never contains the token).
fn authorize(shared: &Shared, headers: &HeaderMap) -> Result<TokenOwner, &'static str> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err("missing Authorization header");
    };
    let Some((scheme, token)) = value.to_str().ok().and_then(|v| v.trim().split_once(' ')) else {
        return Err("malformed Authorization header");
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err("Authorization is not a Bearer token");
    }
    shared
        .token_owner(token.trim().as_bytes())
        .ok_or("wrong token")
}

/// Our agent names its host at the upgrade (an extension header; v3's Go
/// agent does not, and is checked at its `register` instead): the host it
/// names and whose token it presented, when they differ.
fn foreign_host(owner: &TokenOwner, headers: &HeaderMap) -> Option<(String, String)> {
    let named = headers.get(HOSTNAME_HEADER)?.to_str().ok()?.trim();
    match owner {
        TokenOwner::Host(host) if host != named => Some((named.to_owned(), host.clone())),
        _ => None,
    }
}

/// The header in which our agent names its host at the upgrade.
pub const HOSTNAME_HEADER: &str = "x-nixfleet-hostname";

pub async fn upgrade(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let owner = match authorize(&shared, &headers) {
        Ok(owner) => owner,
        Err(reason) => return unauthorized(&shared, remote, reason),
    };
    if let Some((named, token_of)) = foreign_host(&owner, &headers) {
        tracing::warn!(%remote, host = named, token_of, "refused WebSocket upgrade: the token is another host's");
        shared.lock().refuse_upgrade(remote, &named, &token_of);
        return unauthorized_response();
    }
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rejection) => {
            let status = rejection.status();
            let text = rejection.body_text();
            tracing::warn!(%remote, %status, "not a WebSocket upgrade: {text}");
            return error(status, &text);
        }
    };
    if shared.shutting_down.load(Ordering::Relaxed) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    upgrade
        .max_message_size(MAX_MESSAGE_SIZE)
        .max_frame_size(MAX_MESSAGE_SIZE)
        .on_failed_upgrade(move |e| tracing::warn!(%remote, "WebSocket upgrade failed: {e}"))
        .on_upgrade(move |socket| run(socket, shared, remote, owner))
        .into_response()
}

/// A refused upgrade: 401, listed by `/api/rejected`.
fn unauthorized(shared: &Shared, remote: SocketAddr, reason: &'static str) -> Response {
    tracing::warn!(%remote, reason, "refused WebSocket upgrade: HTTP 401");
    shared.lock().reject(remote, reason);
    unauthorized_response()
}

/// 401 with `WWW-Authenticate: Bearer`.
fn unauthorized_response() -> Response {
    let mut response = error(StatusCode::UNAUTHORIZED, "unauthorized");
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

async fn run(mut socket: WebSocket, shared: Arc<Shared>, remote: SocketAddr, owner: TokenOwner) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = shared.lock().open_conn(remote, tx, owner);
    tracing::info!(conn = id, %remote, "connection opened");
    let error = serve(&mut socket, &shared, id, &mut rx).await;
    if let Some(e) = &error {
        tracing::info!(conn = id, "connection error: {e}");
    }
    shared.lock().conn_closed(id, error);
}

/// Where a connection stands between two events.
#[derive(Default)]
struct Closing {
    /// Set once the mock has sent its close frame: the agent's must arrive
    /// by then.
    deadline: Option<Instant>,
    /// Set once the agent's close frame arrived: nothing may be sent after it.
    peer_closed: bool,
}

impl Closing {
    /// Whether frames may still be sent.
    fn open(&self) -> bool {
        self.deadline.is_none() && !self.peer_closed
    }
}

/// Runs the connection until it is over; returns a transport error, if any.
async fn serve(
    socket: &mut WebSocket,
    shared: &Shared,
    id: ConnId,
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
) -> Option<String> {
    let mut closing = Closing::default();
    loop {
        let step = tokio::select! {
            biased;
            out = rx.recv(), if closing.open() => {
                send_queued(socket, shared, id, out, &mut closing).await
            }
            _ = tokio::time::sleep_until(closing.deadline.unwrap_or_else(Instant::now)),
                if closing.deadline.is_some() =>
            {
                ControlFlow::Break(Some("timed out waiting for the agent's close frame".into()))
            }
            received = socket.recv() => {
                on_received(socket, shared, id, received, &mut closing).await
            }
        };
        if let ControlFlow::Break(error) = step {
            return error;
        }
    }
}

/// Sends what the API queued; breaks when the connection is over.
async fn send_queued(
    socket: &mut WebSocket,
    shared: &Shared,
    id: ConnId,
    out: Option<Outgoing>,
    closing: &mut Closing,
) -> ControlFlow<Option<String>> {
    let message = match out {
        Some(Outgoing::Text(text)) => Message::Text(text.into()),
        Some(Outgoing::Binary(data)) => Message::Binary(data.into()),
        Some(Outgoing::Close { code, reason }) => {
            shared.lock().note_sent_close(id, code, &reason);
            closing.deadline = Some(Instant::now() + CLOSE_TIMEOUT);
            Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            }))
        }
        Some(Outgoing::Abort) => {
            shared.lock().note_abort(id);
            return ControlFlow::Break(None);
        }
        // The state dropped the sender: nothing left to do.
        None => return ControlFlow::Break(None),
    };
    match socket.send(message).await {
        Ok(()) => ControlFlow::Continue(()),
        Err(e) => ControlFlow::Break(Some(e.to_string())),
    }
}

/// Stores what the agent sent and answers a `register`; breaks when the
/// connection is over.
async fn on_received(
    socket: &mut WebSocket,
    shared: &Shared,
    id: ConnId,
    received: Option<Result<Message, axum::Error>>,
    closing: &mut Closing,
) -> ControlFlow<Option<String>> {
    match received {
        Some(Ok(Message::Text(text))) => {
            let text = text.as_str();
            let incoming = classify(text);
            if incoming.is_malformed() {
                tracing::debug!(conn = id, len = text.len(), "malformed frame stored");
            }
            let reply = shared.lock().on_text(id, incoming, text);
            if let Some(reply) = reply
                && closing.open()
                && let Err(e) = socket.send(Message::Text(reply.into())).await
            {
                return ControlFlow::Break(Some(e.to_string()));
            }
        }
        Some(Ok(Message::Binary(data))) => shared.lock().on_binary(id, &data),
        // Pings are answered by tungstenite itself.
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
        Some(Ok(Message::Close(frame))) => {
            let (code, reason) = match &frame {
                Some(f) => (Some(f.code), Some(f.reason.as_str())),
                None => (None, None),
            };
            tracing::info!(conn = id, code, reason, "close frame from the agent");
            shared.lock().note_agent_close(id, code, reason);
            closing.peer_closed = true;
            // Keep reading: that sends tungstenite's close reply and
            // then ends the stream.
        }
        Some(Err(e)) => return ControlFlow::Break(Some(e.to_string())),
        None => return ControlFlow::Break(None),
    }
    ControlFlow::Continue(())
}
