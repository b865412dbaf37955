//! One session on an open connection: the reader, the writer and the
//! dead-peer timer run side by side until one of them ends it, then the
//! connection is closed as that end requires. Running them concurrently
//! means a write stuck on a frozen network cannot hide the silence that
//! proves the peer gone.

use super::connect::Socket;
use super::end::SessionEnd;
use super::links::{LinkState, Links};
use super::reader::read_frames;
use super::window::Pongs;
use super::write_progress::WriteProgress;
use super::writer::{Clocks, Outgoing, write_frames};
use crate::config::Config;
use crate::heartbeat::Reporter;
use crate::ticker::{Alarm, Ticker};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::{info, warn};

/// How long a graceful shutdown waits for the dashboard's close frame:
/// short enough that SIGTERM is honoured within 5 s in every state.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

type Sink = SplitSink<Socket, Message>;
type Stream = SplitStream<Socket>;

/// What one session borrows from the connection.
pub(super) struct Session<'c> {
    pub(super) config: &'c Config,
    pub(super) reporter: &'c mut Reporter,
    pub(super) links: &'c mut Links,
    /// When the socket last accepted bytes (noted by the socket itself).
    pub(super) written: &'c WriteProgress,
}

impl Session<'_> {
    /// Runs the session to its end, then closes the connection. `registered`
    /// is set once the dashboard confirms `register`.
    pub(super) async fn run(mut self, socket: Socket, registered: &AtomicBool) -> SessionEnd {
        let (mut sink, mut stream) = socket.split();
        self.links
            .link_counts
            .send_modify(|counts| counts.connects += 1);
        self.links.link_state.send_replace(LinkState::Connected);
        let end = self.exchange(&mut sink, &mut stream, registered).await;
        close(&end, &mut sink, &mut stream, self.config.ping_timeout).await;
        end
    }

    /// The reader, the writer and the silence check, until one ends.
    async fn exchange(
        &mut self,
        sink: &mut Sink,
        stream: &mut Stream,
        registered: &AtomicBool,
    ) -> SessionEnd {
        let epoch = Instant::now();
        let last_heard_ms = AtomicU64::new(0);
        let pongs = Pongs::default();
        let Links {
            inbound,
            replies,
            outbox,
            command_state,
            probes,
            shutdown,
            control,
            ..
        } = &mut *self.links;
        let reader = read_frames(stream, epoch, &last_heard_ms, registered, inbound, &pongs);
        let outgoing = Outgoing {
            replies,
            outbox,
            command_state,
            probes,
            shutdown,
            pongs: &pongs,
            written: self.written,
            control,
        };
        // The session's clocks exist before `register` goes out: a
        // session's descriptors are all open once it is up.
        let clocks = Clocks {
            // The first tick is immediate: the first heartbeat follows
            // `register`; the next is at least half an interval later.
            beat: Ticker::spaced(self.config.interval),
            // On the same grid as the heartbeat: a ping goes out in the
            // same wake-up as the heartbeat due with it.
            ping: Ticker::on_grid(self.config.ping_interval),
        };
        let mut silence_alarm = Alarm::new();
        let writer = write_frames(sink, self.config, self.reporter, outgoing, clocks);
        let silence = detect_silence(
            epoch,
            &last_heard_ms,
            self.config.ping_timeout,
            &mut silence_alarm,
        );
        tokio::select! {
            end = reader => end,
            end = writer => end,
            end = silence => end,
        }
    }
}

/// Closes the connection as `end` requires.
async fn close(end: &SessionEnd, sink: &mut Sink, stream: &mut Stream, ping_timeout: Duration) {
    match end {
        SessionEnd::Shutdown => {
            info!("closing the connection for shutdown");
            if !close_and_await_answer(sink, stream, "shutdown", CLOSE_WAIT).await {
                warn!(
                    "the dashboard did not answer the close frame within {}s",
                    CLOSE_WAIT.as_secs()
                );
            }
        }
        SessionEnd::Reregister => {
            // The dashboard's close answer proves it has read every
            // frame before it, the status included. Registering again
            // before that lets the new `register` overtake a status
            // still queued behind a slow reader (a v3 dashboard then
            // drops the old connection, status and all). So wait as long
            // as a live peer may take: up to `ping_timeout`, the bound
            // that declares it dead anyway. v3 dashboards wait 90 s.
            close_and_await_answer(sink, stream, "re-register", ping_timeout).await;
        }
        SessionEnd::TooBig => {
            let close = Message::Close(Some(CloseFrame {
                code: CloseCode::Size,
                reason: "frame too large".into(),
            }));
            let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(close)).await;
        }
        SessionEnd::ClosedByPeer { .. } => {
            // Completes the closing handshake tungstenite has queued.
            let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
        }
        SessionEnd::Silent
        | SessionEnd::Stalled
        | SessionEnd::ShutdownMidWrite
        | SessionEnd::Broken(_) => {}
    }
}

/// Sends a normal close frame and waits up to `wait` for the dashboard's
/// (or the end of the stream). False when the wait ran out.
async fn close_and_await_answer(
    sink: &mut Sink,
    stream: &mut Stream,
    reason: &'static str,
    wait: Duration,
) -> bool {
    let close = Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: reason.into(),
    }));
    let closing = async {
        if sink.send(close).await.is_ok() {
            while let Some(Ok(message)) = stream.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(wait, closing).await.is_ok()
}

/// The dead-peer timer: ends the session when nothing was heard for
/// `timeout`. Checked when the last deadline passes (a frame since moves
/// the next one), on the heartbeat's grid: at most a second late.
async fn detect_silence(
    epoch: Instant,
    last_heard_ms: &AtomicU64,
    timeout: Duration,
    alarm: &mut Alarm,
) -> SessionEnd {
    loop {
        let last_heard = epoch + Duration::from_millis(last_heard_ms.load(Ordering::Relaxed));
        let deadline = last_heard + timeout;
        if Instant::now() >= deadline {
            return SessionEnd::Silent;
        }
        alarm.wait_until(deadline).await;
    }
}
