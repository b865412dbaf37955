//! One session's writer: `register` first, then heartbeats, the core's
//! replies and pings ahead of queued command output, which goes out in
//! bounded batches under the flow-control window (`window`). Every write
//! has a deadline and still answers probes and shutdown while it waits
//! (why: see the module `connection`).

use super::connect::Socket;
use super::end::SessionEnd;
use super::links::Control;
use super::window::{Pongs, Window};
use super::write_progress::WriteProgress;
use crate::config::Config;
use crate::heartbeat::{CommandState, Reporter};
use crate::outbox::{Item, Outbox};
use crate::protocol::{FrameBuffer, Outbound};
use crate::shutdown;
use crate::ticker::Ticker;
use crate::watchdog::Probe;
use futures_util::SinkExt;
use futures_util::stream::SplitSink;
use std::future::Future;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message};

/// Output taken from the outbox per socket flush. Small enough that a
/// heartbeat never waits long behind it, large enough to batch well.
const OUTPUT_BATCH_BYTES: usize = 32 * 1024;

type Sink = SplitSink<Socket, Message>;

/// What the writer draws from, borrowed from the connection's `Links` for
/// one session.
pub(super) struct Outgoing<'a> {
    pub(super) replies: &'a mut mpsc::Receiver<String>,
    pub(super) outbox: &'a Outbox,
    pub(super) command_state: &'a watch::Receiver<CommandState>,
    pub(super) probes: &'a mut mpsc::Receiver<Probe>,
    pub(super) shutdown: &'a mut shutdown::Listener,
    pub(super) pongs: &'a Pongs,
    pub(super) written: &'a WriteProgress,
    pub(super) control: &'a mut mpsc::Receiver<Control>,
}

impl Outgoing<'_> {
    /// Runs one write to the socket to its end, answering probes and
    /// shutdown meanwhile. Gives up when the peer accepted no byte for
    /// `stall_limit` (counted from the start of this write at the earliest:
    /// an idle link accepts nothing because nothing is sent).
    pub(super) async fn write<F>(
        &mut self,
        write: F,
        stall_limit: Duration,
    ) -> Result<(), SessionEnd>
    where
        F: Future<Output = Result<(), String>>,
    {
        tokio::pin!(write);
        let started = Instant::now();
        loop {
            let deadline = self.written.last().max(started) + stall_limit;
            tokio::select! {
                biased;
                result = &mut write => return result.map_err(SessionEnd::Broken),
                () = shutdown::requested(self.shutdown) => return Err(SessionEnd::ShutdownMidWrite),
                Some(probe) = self.probes.recv() => probe.answer(),
                () = tokio::time::sleep_until(deadline) => {
                    if self.written.last().max(started) + stall_limit <= Instant::now() {
                        return Err(SessionEnd::Stalled);
                    }
                }
            }
        }
    }
}

/// The writer's periodic duties.
pub(super) struct Clocks {
    pub(super) beat: Ticker,
    pub(super) ping: Ticker,
}

/// What woke the writer.
enum Wake {
    /// A frame to send; `true` when the session ends after it, so that the
    /// agent registers again on a fresh connection.
    Frame(Message, bool),
    /// Output is queued and the window is open.
    Output,
    /// Dealt with already: a probe answered, pongs counted.
    Handled,
    End(SessionEnd),
}

/// One session's writer and what it keeps between wake-ups.
struct Writer<'s, 'a> {
    sink: &'s mut Sink,
    reporter: &'s mut Reporter,
    links: Outgoing<'a>,
    clocks: Clocks,
    /// `ping_timeout`: how long a write may wait for the peer to take a
    /// byte, and output may wait for its acknowledgement.
    patience: Duration,
    batch: Vec<Item>,
    frames: FrameBuffer,
    /// This session's last heartbeat frame.
    last_heartbeat: Option<bytes::Bytes>,
    window: Window,
}

/// Writes until the session ends.
pub(super) async fn write_frames(
    sink: &mut Sink,
    config: &Config,
    reporter: &mut Reporter,
    links: Outgoing<'_>,
    clocks: Clocks,
) -> SessionEnd {
    let mut writer = Writer {
        sink,
        reporter,
        links,
        clocks,
        patience: config.ping_timeout,
        batch: Vec::new(),
        frames: FrameBuffer::default(),
        last_heartbeat: None,
        window: Window::new(),
    };
    writer.run().await
}

impl Writer<'_, '_> {
    async fn run(&mut self) -> SessionEnd {
        let register = Outbound::Register(&self.reporter.register()).to_json();
        let sent = send(self.sink, Message::text(register));
        if let Err(end) = self.links.write(sent, self.patience).await {
            return end;
        }
        loop {
            match self.wake().await {
                Wake::Frame(message, then_reregister) => {
                    let sent = send(self.sink, message);
                    if let Err(end) = self.links.write(sent, self.patience).await {
                        return end;
                    }
                    if then_reregister {
                        return SessionEnd::Reregister;
                    }
                }
                Wake::Output => {
                    let outbox = self.links.outbox;
                    outbox.take_batch(OUTPUT_BATCH_BYTES, &mut self.batch);
                    let sent = send_batch(self.sink, &mut self.batch, outbox, &mut self.window);
                    if let Err(end) = self.links.write(sent, self.patience).await {
                        return end;
                    }
                }
                Wake::Handled => {}
                Wake::End(end) => return end,
            }
        }
    }

    /// Waits for the next thing to do, most urgent first.
    async fn wake(&mut self) -> Wake {
        let overdue = self.window.overdue_at(self.patience);
        let links = &mut self.links;
        tokio::select! {
            biased;
            () = shutdown::requested(links.shutdown) => Wake::End(SessionEnd::Shutdown),
            beat_result = self.clocks.beat.tick() => {
                if let Err(error) = beat_result {
                    return Wake::End(SessionEnd::Broken(format!("the heartbeat timer failed: {error}")));
                }
                Wake::Frame(heartbeat_message(self.reporter, links.command_state, &mut self.frames, &mut self.last_heartbeat), false)
            }
            // After a successful switch the core asks for a last heartbeat
            // and then a fresh connection (v3 dashboards wait for a new
            // `register`).
            Some(control) = links.control.recv() => Wake::Frame(
                heartbeat_message(self.reporter, links.command_state, &mut self.frames, &mut self.last_heartbeat),
                control == Control::Reregister,
            ),
            () = self.reporter.update_status_changed() => Wake::Frame(
                heartbeat_message(self.reporter, links.command_state, &mut self.frames, &mut self.last_heartbeat),
                false,
            ),
            Some(reply) = links.replies.recv() => Wake::Frame(Message::text(reply), false),
            Some(probe) = links.probes.recv() => {
                probe.answer();
                Wake::Handled
            }
            ping_result = self.clocks.ping.tick() => {
                if let Err(error) = ping_result {
                    return Wake::End(SessionEnd::Broken(format!("the ping timer failed: {error}")));
                }
                Wake::Frame(Message::Ping(Default::default()), false)
            }
            () = links.pongs.arrived() => {
                self.window.answered(links.pongs.highest(), links.outbox);
                Wake::Handled
            }
            // Output counts as delivered only once acknowledged, so a
            // dashboard that reads none of it for ping_timeout (it may
            // still ping us, so the silence check never fires) is treated
            // as one whose socket accepts nothing: the session ends and
            // the unacknowledged batches are sent again on the next one.
            () = tokio::time::sleep_until(overdue.unwrap_or_else(Instant::now)), if overdue.is_some() => {
                Wake::End(SessionEnd::Stalled)
            }
            _ = links.outbox.wait_ready(), if self.window.open() => Wake::Output,
        }
    }
}

async fn send(sink: &mut Sink, message: Message) -> Result<(), String> {
    sink.send(message).await.map_err(|e| e.to_string())
}

/// A text message of JSON bytes; serde_json writes only UTF-8, so the check
/// never fails (an empty frame if it somehow did).
fn text_frame(json: bytes::Bytes) -> Message {
    Message::Text(tungstenite::Utf8Bytes::try_from(json).unwrap_or_default())
}

/// The next heartbeat, serialised into the reused frame buffer, or the
/// session's last heartbeat frame when nothing it says has changed.
fn heartbeat_message(
    reporter: &mut Reporter,
    command_state: &watch::Receiver<CommandState>,
    frames: &mut FrameBuffer,
    last: &mut Option<bytes::Bytes>,
) -> Message {
    let command = command_state.borrow();
    let (heartbeat, unchanged) = reporter.heartbeat(&command);
    match last {
        // An idle heartbeat says what the last one said: its frame again.
        Some(json) if unchanged => text_frame(json.clone()),
        _ => {
            let json = frames.encode(&Outbound::Heartbeat(&heartbeat));
            *last = Some(json.clone());
            text_frame(json)
        }
    }
}

/// Writes a batch and its numbered ping with one flush. What is not
/// acknowledged is put back by [`Outbox::requeue_in_flight`] when the
/// session ends, whichever part of the session ended it.
async fn send_batch(
    sink: &mut Sink,
    batch: &mut Vec<Item>,
    outbox: &Outbox,
    window: &mut Window,
) -> Result<(), String> {
    let Some(last_seq) = batch.last().map(|i| i.seq) else {
        return Ok(());
    };
    for item in batch.drain(..) {
        window.count(item.frame.len() as u64);
        sink.feed(Message::text(item.frame))
            .await
            .map_err(|e| e.to_string())?;
    }
    let number = window.next_ping();
    sink.feed(Message::Ping(number.to_be_bytes().to_vec().into()))
        .await
        .map_err(|e| e.to_string())?;
    sink.flush().await.map_err(|e| e.to_string())?;
    outbox.confirm_written();
    window.sent(number, last_seq);
    Ok(())
}
