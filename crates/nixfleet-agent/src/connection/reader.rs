//! One session's reader: every frame from the dashboard notes that the
//! peer is alive; pongs acknowledge output, messages go to the agent core,
//! and a close or an oversized frame ends the session.

use super::connect::Socket;
use super::end::SessionEnd;
use super::window::Pongs;
use crate::protocol::{self, Inbound};
use futures_util::StreamExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::{debug, info, warn};

/// Reads frames until the session ends. Every frame, whatever it holds,
/// moves `last_heard_ms` (milliseconds since `epoch`) for the silence check.
pub(super) async fn read_frames(
    stream: &mut futures_util::stream::SplitStream<Socket>,
    epoch: Instant,
    last_heard_ms: &AtomicU64,
    registered: &AtomicBool,
    inbound: &mpsc::Sender<Inbound>,
    pongs: &Pongs,
) -> SessionEnd {
    while let Some(message) = stream.next().await {
        last_heard_ms.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        let text = match message {
            Ok(Message::Text(text)) => text,
            Ok(Message::Binary(data)) => {
                debug!(bytes = data.len(), "ignoring a binary frame");
                continue;
            }
            Ok(Message::Close(frame)) => {
                let code = frame.as_ref().map(|f| u16::from(f.code));
                let why = match frame {
                    Some(f) => format!("code {}{}", u16::from(f.code), reason_suffix(&f.reason)),
                    None => "no close code".to_owned(),
                };
                return SessionEnd::ClosedByPeer { code, why };
            }
            Ok(Message::Pong(payload)) => {
                if let Ok(number) = <[u8; 8]>::try_from(&payload[..]) {
                    pongs.answered(u64::from_be_bytes(number));
                }
                continue;
            }
            Ok(Message::Ping(_) | Message::Frame(_)) => continue,
            Err(tungstenite::Error::Capacity(error)) => {
                warn!(error = %error, "refusing an oversized frame from the dashboard");
                return SessionEnd::TooBig;
            }
            Err(error) => return SessionEnd::Broken(error.to_string()),
        };
        if let Err(end) = hand_over(&text, registered, inbound).await {
            return end;
        }
    }
    SessionEnd::Broken("connection closed".to_owned())
}

/// A text frame decoded and handed to the core; `Err` ends the session
/// (the core is gone: the agent is shutting down).
async fn hand_over(
    text: &str,
    registered: &AtomicBool,
    inbound: &mpsc::Sender<Inbound>,
) -> Result<(), SessionEnd> {
    match protocol::decode(text) {
        Ok(Inbound::Registered { host_id }) => {
            // `?`: the dashboard's text, escaped, so it cannot start log lines.
            info!(host_id = ?host_id, "registered with the dashboard");
            registered.store(true, Ordering::Relaxed);
            // The core confirms a pending switch with it.
            if inbound.send(Inbound::Registered { host_id }).await.is_err() {
                return Err(SessionEnd::Shutdown);
            }
        }
        Ok(Inbound::Unknown { kind }) => {
            debug!(kind = ?kind, "ignoring a message of unknown type")
        }
        Ok(message) => {
            if inbound.send(message).await.is_err() {
                // The core is gone: the agent is shutting down.
                return Err(SessionEnd::Shutdown);
            }
        }
        Err(error) => warn!(error = %error, bytes = text.len(), "ignoring a bad message"),
    }
    Ok(())
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        let reason: String = reason.chars().take(100).collect();
        format!(": {reason:?}")
    }
}
