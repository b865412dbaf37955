//! The in-test dashboard's side of one connection: the upgrade (with the
//! token check), then frames both ways until either side goes.

use super::TOKEN;
use super::seen::{Control, Seen, Shared, record};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// The message type of a frame: a cheap look at the prefix the agent
/// writes (`{"type":"…"`), else a full parse.
fn frame_kind(text: &str) -> String {
    if let Some(rest) = text.strip_prefix("{\"type\":\"")
        && let Some(end) = rest.find('"')
        && !rest[..end].contains('\\')
    {
        return rest[..end].to_owned();
    }
    let parsed: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    parsed["type"].as_str().unwrap_or("").to_owned()
}

/// Serves connection `conn` until either side goes; records all it sees.
pub(super) async fn serve(
    stream: TcpStream,
    conn: u64,
    shared: Arc<Mutex<Shared>>,
    changed: Arc<Notify>,
    reject_with: Option<u16>,
    gate: tokio::sync::watch::Receiver<bool>,
    rate: Arc<std::sync::atomic::AtomicU32>,
) {
    let Some(ws) = upgrade(stream, conn, &shared, &changed, reject_with).await else {
        return;
    };
    let (tx, rx) = mpsc::unbounded_channel();
    shared.lock().unwrap().connections.insert(conn, tx);
    converse(ws, conn, &shared, &changed, rx, gate, rate).await;
    shared.lock().unwrap().connections.remove(&conn);
    record(
        &shared,
        &changed,
        Seen::Gone {
            conn,
            at: Instant::now(),
        },
    );
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// The WebSocket upgrade: refused with `reject_with`, or 401 without the
/// token; recorded either way.
async fn upgrade(
    stream: TcpStream,
    conn: u64,
    shared: &Mutex<Shared>,
    changed: &Notify,
    reject_with: Option<u16>,
) -> Option<Ws> {
    let authorised = Arc::new(Mutex::new(false));
    let auth = authorised.clone();
    let callback =
        move |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
            let ok = request
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v == format!("Bearer {TOKEN}"));
            let status = match reject_with {
                Some(code) => Some(StatusCode::from_u16(code).unwrap()),
                None if !ok => Some(StatusCode::UNAUTHORIZED),
                None => None,
            };
            if let Some(status) = status {
                let mut error = ErrorResponse::new(Some("no".into()));
                *error.status_mut() = status;
                return Err(error);
            }
            *auth.lock().unwrap() = true;
            Ok(response)
        };
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(4 << 20))
        .max_frame_size(Some(4 << 20));
    let accepted =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await;
    let ok = *authorised.lock().unwrap();
    record(
        shared,
        changed,
        Seen::Upgrade {
            conn,
            accepted: ok && accepted.is_ok(),
            at: Instant::now(),
        },
    );
    accepted.ok()
}

/// Frames both ways: what the test asks to send or close, and what the
/// agent sends, read unless the gate is shut, at the rate in force.
async fn converse(
    ws: Ws,
    conn: u64,
    shared: &Mutex<Shared>,
    changed: &Notify,
    mut rx: mpsc::UnboundedReceiver<Control>,
    mut gate: tokio::sync::watch::Receiver<bool>,
    rate: Arc<std::sync::atomic::AtomicU32>,
) {
    let mut pacer = Pacer::default();
    let (mut sink, mut stream) = ws.split();
    loop {
        // A stalled dashboard stops reading but still sends what it is
        // asked to.
        let reading = *gate.borrow();
        tokio::select! {
            control = rx.recv() => match control {
                Some(Control::Send(message)) => { let _ = sink.send(message).await; }
                Some(Control::Close(code, reason)) => {
                    let _ = sink.send(Message::Close(Some(CloseFrame { code: CloseCode::from(code), reason: reason.into() }))).await;
                }
                // Killed: drop the socket without a close frame.
                None => break,
            },
            _ = gate.changed() => {}
            message = stream.next(), if reading => match message {
                Some(Ok(Message::Text(text))) => {
                    let kind = frame_kind(&text);
                    let raw: Arc<str> = Arc::from(text.as_str());
                    record(shared, changed, Seen::Frame { conn, at: Instant::now(), kind, raw, payload: Default::default() });
                    pacer.after_frame(rate.load(std::sync::atomic::Ordering::Relaxed)).await;
                }
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame.map(|f| (Some(u16::from(f.code)), f.reason.to_string())).unwrap_or((None, String::new()));
                    record(shared, changed, Seen::Close { conn, at: Instant::now(), code, reason });
                    // Answer the close handshake, then the stream ends.
                    let _ = sink.flush().await;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
}

/// Pacing of reads: frames read since `from` at the rate in force then.
struct Pacer {
    from: Instant,
    frames: u64,
    rate: u32,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer {
            from: Instant::now(),
            frames: 0,
            rate: 0,
        }
    }
}

impl Pacer {
    /// After a frame: waits until the frame is due at `per_second` frames a
    /// second (0: not at all); a new rate starts a new count.
    async fn after_frame(&mut self, per_second: u32) {
        if per_second != self.rate {
            (self.from, self.frames, self.rate) = (Instant::now(), 0, per_second);
        }
        if per_second > 0 {
            self.frames += 1;
            let due =
                self.from + Duration::from_secs_f64(self.frames as f64 / f64::from(per_second));
            tokio::time::sleep_until(due).await;
        }
    }
}
