//! The WebSocket link to the dashboard: connect, register, heartbeat,
//! ping, forward inbound messages, drain the outbox — and reconnect with
//! backoff whenever any of that fails, for as long as the agent runs.
//!
//! Within a session three things run side by side: the reader (which also
//! notes when the peer was last heard from), the writer, and the dead-peer
//! timer. Running them concurrently means a write stuck on a frozen network
//! cannot hide the silence that proves the peer gone.
//!
//! The writer puts heartbeats, `register`, rejections and pings ahead of
//! queued command output, and takes output in bounded batches, so a
//! heartbeat waits for at most one batch however much output is queued.
//!
//! Flow control: each output batch is followed by a WebSocket ping whose
//! payload numbers it; the dashboard's pong, which it sends only once it
//! has read everything before the ping, acknowledges the batch (the outbox
//! then counts it delivered). At most [`UNACKNOWLEDGED_WINDOW`] bytes of
//! output are written and not yet acknowledged. Without that, a dashboard
//! that reads slowly would have megabytes of output waiting in the socket
//! buffers, and every heartbeat would wait behind them.
//!
//! A dashboard can also stay loud but stop reading: it pings, so the
//! silence check never fires, while the socket fills and a write waits
//! forever. So every write has a deadline too: a peer that accepts no byte
//! for `ping_timeout` while a write waits is dead. While it waits, the
//! writer still answers the watchdog's probes and a shutdown request.

use crate::config::Config;
use crate::heartbeat::{CommandState, Reporter};
use crate::outbox::{Item, Outbox};
use crate::protocol::{self, FrameBuffer, Inbound, Outbound};
use crate::shutdown;
use crate::ticker::{Alarm, Ticker};
use crate::watchdog::{Probe, answering_probes};
use futures_util::{SinkExt, StreamExt};
use secrecy::ExposeSecret;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tracing::{debug, error, info, warn};

/// Frames from the dashboard larger than this are refused (protocol.md).
pub const MAX_INBOUND_FRAME: usize = 1024 * 1024;
/// tungstenite's read buffer (its default is 128 KiB).
const INBOUND_READ_BUFFER: usize = 4 * 1024;
/// Output taken from the outbox per socket flush. Small enough that a
/// heartbeat never waits long behind it, large enough to batch well.
const OUTPUT_BATCH_BYTES: usize = 32 * 1024;
/// Output bytes written and not yet acknowledged by a pong. A heartbeat
/// waits behind at most this much (about 50 ms at 20,000 frames/s), and it
/// bounds what is sent twice after a broken connection.
pub const UNACKNOWLEDGED_WINDOW: u64 = 128 * 1024;
/// How long a graceful shutdown waits for the dashboard's close frame:
/// short enough that SIGTERM is honoured within 5 s in every state.
const CLOSE_WAIT: Duration = Duration::from_secs(3);
/// A connection that stayed up this long resets the backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(60);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

type Socket = WebSocketStream<MaybeTlsStream<Tracked<TcpStream>>>;

/// What the agent core asks of the connection after a status went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Send a heartbeat now: a v3 dashboard completes a command on the
    /// first heartbeat after its status.
    Heartbeat,
    /// Send a heartbeat, close with 1000 and connect again at once: a v3
    /// dashboard completes a switch only when the agent registers again
    /// (with the new system's versions).
    Reregister,
}

/// The link as a human would describe it (for logs and systemd's STATUS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    Connecting,
    Connected,
    Reconnecting { delay: Duration, error: String },
}

/// Everything the connection needs from the rest of the agent.
pub struct Links {
    /// Commands and kill requests for the agent core.
    pub inbound: mpsc::Sender<Inbound>,
    /// Frames the core wants sent ahead of output (rejections).
    pub replies: mpsc::Receiver<String>,
    pub outbox: Arc<Outbox>,
    pub command_state: watch::Receiver<CommandState>,
    pub link_state: watch::Sender<LinkState>,
    pub probes: mpsc::Receiver<Probe>,
    pub shutdown: shutdown::Listener,
    pub control: mpsc::Receiver<Control>,
}

pub struct Connection {
    config: Arc<Config>,
    reporter: Reporter,
    links: Links,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// When the current socket last accepted bytes.
    written: Arc<WriteProgress>,
}

/// Why a session ended.
#[derive(Debug)]
enum SessionEnd {
    Shutdown,
    /// Asked to register again on a fresh connection.
    Reregister,
    /// Nothing heard for `ping_timeout`.
    Silent,
    /// A write waited `ping_timeout` without the peer accepting a byte.
    Stalled,
    /// Shutdown was requested while a write could not finish: the socket is
    /// full, so no close frame would get through either.
    ShutdownMidWrite,
    ClosedByPeer(String),
    /// The dashboard sent a frame over the size limit.
    TooBig,
    Broken(String),
}

impl Connection {
    pub fn new(config: Arc<Config>, reporter: Reporter, links: Links) -> Self {
        Connection {
            config,
            reporter,
            links,
            tls: None,
            written: Arc::new(WriteProgress::new()),
        }
    }

    /// Runs until shutdown is requested.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(self.config.backoff_max);
        loop {
            if *self.links.shutdown.borrow() {
                return;
            }
            self.links.link_state.send_replace(LinkState::Connecting);
            let error = match self.connect().await {
                Err(ConnectError::Shutdown) => return,
                Err(ConnectError::Failed(error)) => error,
                Ok(socket) => {
                    let started = Instant::now();
                    let registered = AtomicBool::new(false);
                    let end = self.session(socket, &registered).await;
                    self.links.outbox.requeue_in_flight();
                    if registered.load(Ordering::Relaxed) || started.elapsed() >= STABLE_CONNECTION
                    {
                        backoff.reset();
                    }
                    match end {
                        SessionEnd::Shutdown | SessionEnd::ShutdownMidWrite => return,
                        SessionEnd::Reregister => {
                            info!("registering again on a fresh connection");
                            backoff.reset();
                            continue;
                        }
                        SessionEnd::Silent => format!(
                            "no sign of life from the dashboard for {}s",
                            self.config.ping_timeout.as_secs()
                        ),
                        SessionEnd::Stalled => format!(
                            "the dashboard read no data for {}s",
                            self.config.ping_timeout.as_secs()
                        ),
                        SessionEnd::ClosedByPeer(why) => {
                            format!("dashboard closed the connection ({why})")
                        }
                        SessionEnd::TooBig => "dashboard sent a frame over 1 MiB".to_owned(),
                        SessionEnd::Broken(why) => why,
                    }
                }
            };
            let delay = backoff.next_delay();
            warn!(url = %self.config.url, error = %error, "reconnecting in {:.1}s", delay.as_secs_f64());
            self.links.link_state.send_replace(LinkState::Reconnecting {
                delay,
                error: error.clone(),
            });
            let mut shutdown = self.links.shutdown.clone();
            let wait = async {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => false,
                    () = shutdown::requested(&mut shutdown) => true,
                }
            };
            if answering_probes(wait, &mut self.links.probes).await {
                return;
            }
        }
    }

    async fn connect(&mut self) -> Result<Socket, ConnectError> {
        let request = self.request().map_err(ConnectError::Failed)?;
        let connector = if self.config.url.starts_with("wss://") {
            if self.tls.is_none() {
                self.tls = Some(
                    crate::tls::client_config(self.config.ca_file.as_deref())
                        .map_err(ConnectError::Failed)?,
                );
            }
            Connector::Rustls(self.tls.clone().expect("set above"))
        } else {
            Connector::Plain
        };
        let ws_config = WebSocketConfig::default()
            // tungstenite zero-fills the spare room of its read buffer each
            // time the reader is polled, and the session polls it on every
            // wake-up: the default 128 KiB cost 128 KiB of RSS and a 128 KiB
            // memset per heartbeat. Inbound frames are small; a large one
            // still fits (the buffer grows to the frame's size).
            .read_buffer_size(INBOUND_READ_BUFFER)
            .max_message_size(Some(MAX_INBOUND_FRAME))
            .max_frame_size(Some(MAX_INBOUND_FRAME));
        let connect_timeout = self.config.ping_timeout;
        let written = self.written.clone();
        let attempt = tokio::time::timeout(connect_timeout, async move {
            let stream = dial(&request).await.map_err(tungstenite::Error::Io)?;
            tokio_tungstenite::client_async_tls_with_config(
                request,
                Tracked::new(stream, written),
                Some(ws_config),
                Some(connector),
            )
            .await
        });
        let mut shutdown = self.links.shutdown.clone();
        let attempt = async {
            tokio::select! {
                result = attempt => Some(result),
                () = shutdown::requested(&mut shutdown) => None,
            }
        };
        match answering_probes(attempt, &mut self.links.probes).await {
            None => Err(ConnectError::Shutdown),
            Some(Err(_elapsed)) => Err(ConnectError::Failed(format!(
                "connecting timed out after {}s",
                connect_timeout.as_secs()
            ))),
            Some(Ok(Err(error))) => Err(ConnectError::Failed(describe_connect_error(&error))),
            Some(Ok(Ok((socket, _response)))) => {
                info!(url = %self.config.url, "connected");
                Ok(socket)
            }
        }
    }

    fn request(&self) -> Result<tungstenite::handshake::client::Request, String> {
        let mut request = self
            .config
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| format!("bad dashboard url: {e}"))?;
        let mut bearer =
            HeaderValue::try_from(format!("Bearer {}", self.config.token.expose_secret()))
                .map_err(|_| {
                    "the token contains characters not allowed in an HTTP header".to_owned()
                })?;
        // Keeps the value out of any Debug output of the request.
        bearer.set_sensitive(true);
        let headers = request.headers_mut();
        headers.insert(header::AUTHORIZATION, bearer);
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("nixfleet-agent/", env!("CARGO_PKG_VERSION"))),
        );
        Ok(request)
    }

    async fn session(&mut self, socket: Socket, registered: &AtomicBool) -> SessionEnd {
        let (mut sink, mut stream) = socket.split();
        let epoch = Instant::now();
        let last_heard_ms = AtomicU64::new(0);
        let pongs = Pongs::default();
        self.links.link_state.send_replace(LinkState::Connected);

        let end = {
            let Links {
                inbound,
                replies,
                outbox,
                command_state,
                probes,
                shutdown,
                control,
                ..
            } = &mut self.links;
            let reader = read_frames(
                &mut stream,
                epoch,
                &last_heard_ms,
                registered,
                inbound,
                &pongs,
            );
            let outgoing = Outgoing {
                replies,
                outbox,
                command_state,
                probes,
                shutdown,
                pongs: &pongs,
                written: &self.written,
                control,
            };
            // The session's clocks exist before `register` goes out: a
            // session's descriptors are all open once it is up.
            let clocks = Clocks {
                // The first tick is immediate: the first heartbeat follows
                // `register`.
                beat: Ticker::new(self.config.interval),
                // On the same grid as the heartbeat: a ping goes out in the
                // same wake-up as the heartbeat due with it.
                ping: Ticker::on_grid(self.config.ping_interval),
            };
            let mut silence_alarm = Alarm::new();
            let writer = write_frames(
                &mut sink,
                &self.config,
                &mut self.reporter,
                outgoing,
                clocks,
            );
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
        };

        match &end {
            SessionEnd::Shutdown => {
                info!("closing the connection for shutdown");
                let close = Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "shutdown".into(),
                }));
                let closing = async {
                    if sink.send(close).await.is_ok() {
                        // Wait for the dashboard's close frame (or the end).
                        while let Some(Ok(message)) = stream.next().await {
                            if matches!(message, Message::Close(_)) {
                                break;
                            }
                        }
                    }
                };
                if tokio::time::timeout(CLOSE_WAIT, closing).await.is_err() {
                    warn!(
                        "the dashboard did not answer the close frame within {}s",
                        CLOSE_WAIT.as_secs()
                    );
                }
            }
            SessionEnd::Reregister => {
                let close = Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "re-register".into(),
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
                // The dashboard's close answer proves it has read every
                // frame before it, the status included. Registering again
                // before that lets the new `register` overtake a status
                // still queued behind a slow reader (a v3 dashboard then
                // drops the old connection, status and all). So wait as long
                // as a live peer may take: up to `ping_timeout`, the bound
                // that declares it dead anyway. v3 dashboards wait 90 s.
                let _ = tokio::time::timeout(self.config.ping_timeout, closing).await;
            }
            SessionEnd::TooBig => {
                let close = Message::Close(Some(CloseFrame {
                    code: CloseCode::Size,
                    reason: "frame too large".into(),
                }));
                let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(close)).await;
            }
            SessionEnd::ClosedByPeer(_) => {
                // Completes the closing handshake tungstenite has queued.
                let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
            }
            SessionEnd::Silent
            | SessionEnd::Stalled
            | SessionEnd::ShutdownMidWrite
            | SessionEnd::Broken(_) => {}
        }
        end
    }
}

/// The kernel's send buffer for the dashboard socket, kept small on purpose:
/// output the dashboard has not read yet then waits in the outbox, where
/// heartbeats overtake it and overflow is counted, instead of in the kernel,
/// where a heartbeat would queue behind megabytes of build log.
const SOCKET_SEND_BUFFER: u32 = 128 * 1024;

/// Opens the TCP connection for `request`'s URL, trying each address.
async fn dial(request: &tungstenite::handshake::client::Request) -> std::io::Result<TcpStream> {
    use std::io::{Error, ErrorKind};
    let uri = request.uri();
    let host = uri
        .host()
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "the url has no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("wss") {
            443
        } else {
            80
        });
    let mut last_error = Error::new(ErrorKind::NotFound, format!("{host} has no address"));
    for address in tokio::net::lookup_host((host, port)).await? {
        let socket = if address.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // Best effort: a kernel that refuses still gives a working socket.
        let _ = socket.set_send_buffer_size(SOCKET_SEND_BUFFER);
        match socket.connect(address).await {
            Ok(stream) => {
                // Lines must leave within 100 ms, and batching is ours.
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(error) => last_error = error,
        }
    }
    Err(last_error)
}

enum ConnectError {
    Shutdown,
    Failed(String),
}

fn describe_connect_error(error: &tungstenite::Error) -> String {
    match error {
        tungstenite::Error::Http(response) => {
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                error!(
                    status = status.as_u16(),
                    "authentication failed: the dashboard rejected the token"
                );
                format!("authentication failed (HTTP {})", status.as_u16())
            } else {
                format!(
                    "the dashboard refused the upgrade (HTTP {})",
                    status.as_u16()
                )
            }
        }
        other => other.to_string(),
    }
}

async fn read_frames(
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
                let why = match frame {
                    Some(f) => format!("code {}{}", u16::from(f.code), reason_suffix(&f.reason)),
                    None => "no close code".to_owned(),
                };
                return SessionEnd::ClosedByPeer(why);
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
        match protocol::decode(&text) {
            Ok(Inbound::Registered { host_id }) => {
                // `?`: the dashboard's text, escaped, so it cannot start log lines.
                info!(host_id = ?host_id, "registered with the dashboard");
                registered.store(true, Ordering::Relaxed);
            }
            Ok(Inbound::Unknown { kind }) => {
                debug!(kind = ?kind, "ignoring a message of unknown type")
            }
            Ok(message) => {
                if inbound.send(message).await.is_err() {
                    // The core is gone: the agent is shutting down.
                    return SessionEnd::Shutdown;
                }
            }
            Err(error) => warn!(error = %error, bytes = text.len(), "ignoring a bad message"),
        }
    }
    SessionEnd::Broken("connection closed".to_owned())
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        let reason: String = reason.chars().take(100).collect();
        format!(": {reason:?}")
    }
}

/// Checked when the last deadline passes (a frame since moves the next
/// one), on the heartbeat's grid: at most a second late.
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

/// What the writer draws from, borrowed from [`Links`] for one session.
struct Outgoing<'a> {
    replies: &'a mut mpsc::Receiver<String>,
    outbox: &'a Outbox,
    command_state: &'a watch::Receiver<CommandState>,
    probes: &'a mut mpsc::Receiver<Probe>,
    shutdown: &'a mut shutdown::Listener,
    pongs: &'a Pongs,
    written: &'a WriteProgress,
    control: &'a mut mpsc::Receiver<Control>,
}

impl Outgoing<'_> {
    /// Runs one write to the socket to its end, answering probes and
    /// shutdown meanwhile. Gives up when the peer accepted no byte for
    /// `stall_limit` (counted from the start of this write at the earliest:
    /// an idle link accepts nothing because nothing is sent).
    async fn write<F>(&mut self, write: F, stall_limit: Duration) -> Result<(), SessionEnd>
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

/// The highest numbered ping the dashboard answered, shared by the reader
/// (which sees pongs) and the writer (which waits for them).
#[derive(Default)]
struct Pongs {
    highest: AtomicU64,
    arrived: tokio::sync::Notify,
}

impl Pongs {
    fn answered(&self, number: u64) {
        self.highest.fetch_max(number, Ordering::Relaxed);
        self.arrived.notify_one();
    }
}

/// Output batches written and not yet acknowledged.
struct Window {
    next_ping: u64,
    /// Oldest first: the ping's number, the last frame's outbox `seq`, the
    /// output bytes written up to it, and when it was sent.
    pending: std::collections::VecDeque<(u64, u64, u64, Instant)>,
    written: u64,
    acknowledged: u64,
}

impl Window {
    fn new() -> Self {
        Window {
            next_ping: 1,
            pending: Default::default(),
            written: 0,
            acknowledged: 0,
        }
    }

    fn open(&self) -> bool {
        self.written - self.acknowledged < UNACKNOWLEDGED_WINDOW
    }

    /// Acknowledges every batch up to ping `number`.
    fn answered(&mut self, number: u64, outbox: &Outbox) {
        let mut last = None;
        while let Some(&(ping, seq, written, _)) = self.pending.front() {
            if ping > number {
                break;
            }
            self.pending.pop_front();
            last = Some((seq, written));
        }
        if let Some((seq, written)) = last {
            self.acknowledged = written;
            outbox.acknowledge(seq);
        }
    }

    /// When the oldest unanswered ping is overdue: the dashboard read none
    /// of the output written since for `patience`.
    fn overdue_at(&self, patience: Duration) -> Option<Instant> {
        self.pending.front().map(|&(_, _, _, sent)| sent + patience)
    }
}

/// The writer's periodic duties.
struct Clocks {
    beat: Ticker,
    ping: Ticker,
}

async fn write_frames(
    sink: &mut futures_util::stream::SplitSink<Socket, Message>,
    config: &Config,
    reporter: &mut Reporter,
    links: Outgoing<'_>,
    clocks: Clocks,
) -> SessionEnd {
    let mut links = links;
    let Clocks { mut beat, mut ping } = clocks;
    let stall_limit = config.ping_timeout;
    let register = Outbound::Register(&reporter.register()).to_json();
    let sent = links.write(send(sink, Message::text(register)), stall_limit);
    if let Err(end) = sent.await {
        return end;
    }
    let mut batch: Vec<Item> = Vec::new();
    let mut frames = FrameBuffer::default();
    // This session's last heartbeat frame.
    let mut last_heartbeat = None;
    let outbox = links.outbox;
    let mut window = Window::new();
    let patience = config.ping_timeout;
    loop {
        let overdue = window.overdue_at(patience);
        // `then_reregister`: after a successful switch the core asks for a
        // last heartbeat and then a fresh connection (v3 dashboards wait
        // for a new `register`).
        let (message, then_reregister) = tokio::select! {
            biased;
            () = shutdown::requested(links.shutdown) => return SessionEnd::Shutdown,
            beat_result = beat.tick() => {
                if let Err(error) = beat_result {
                    return SessionEnd::Broken(format!("the heartbeat timer failed: {error}"));
                }
                (heartbeat_message(reporter, links.command_state, &mut frames, &mut last_heartbeat), false)
            }
            Some(control) = links.control.recv() => (
                heartbeat_message(reporter, links.command_state, &mut frames, &mut last_heartbeat),
                control == Control::Reregister,
            ),
            Some(reply) = links.replies.recv() => (Message::text(reply), false),
            Some(probe) = links.probes.recv() => {
                probe.answer();
                continue;
            }
            ping_result = ping.tick() => {
                if let Err(error) = ping_result {
                    return SessionEnd::Broken(format!("the ping timer failed: {error}"));
                }
                (Message::Ping(Default::default()), false)
            }
            () = links.pongs.arrived.notified() => {
                window.answered(links.pongs.highest.load(Ordering::Relaxed), outbox);
                continue;
            }
            // Output counts as delivered only once acknowledged, so a
            // dashboard that reads none of it for ping_timeout (it may
            // still ping us, so the silence check never fires) is treated
            // as one whose socket accepts nothing: the session ends and
            // the unacknowledged batches are sent again on the next one.
            () = tokio::time::sleep_until(overdue.unwrap_or_else(Instant::now)), if overdue.is_some() => {
                return SessionEnd::Stalled;
            }
            _ = outbox.wait_ready(), if window.open() => {
                outbox.take_batch(OUTPUT_BATCH_BYTES, &mut batch);
                let sent = links.write(send_batch(sink, &mut batch, outbox, &mut window), stall_limit);
                if let Err(end) = sent.await {
                    return end;
                }
                continue;
            }
        };
        if let Err(end) = links.write(send(sink, message), stall_limit).await {
            return end;
        }
        if then_reregister {
            return SessionEnd::Reregister;
        }
    }
}

async fn send(
    sink: &mut futures_util::stream::SplitSink<Socket, Message>,
    message: Message,
) -> Result<(), String> {
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
    sink: &mut futures_util::stream::SplitSink<Socket, Message>,
    batch: &mut Vec<Item>,
    outbox: &Outbox,
    window: &mut Window,
) -> Result<(), String> {
    let Some(last_seq) = batch.last().map(|i| i.seq) else {
        return Ok(());
    };
    for item in batch.drain(..) {
        window.written += item.frame.len() as u64;
        sink.feed(Message::text(item.frame))
            .await
            .map_err(|e| e.to_string())?;
    }
    let number = window.next_ping;
    window.next_ping += 1;
    sink.feed(Message::Ping(number.to_be_bytes().to_vec().into()))
        .await
        .map_err(|e| e.to_string())?;
    sink.flush().await.map_err(|e| e.to_string())?;
    outbox.confirm_written();
    window
        .pending
        .push_back((number, last_seq, window.written, Instant::now()));
    Ok(())
}

/// When the dashboard's socket last accepted bytes from the agent, shared
/// between the socket (which notes it) and the writer (which judges it).
struct WriteProgress {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl WriteProgress {
    fn new() -> Self {
        WriteProgress {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn note(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The TCP stream under TLS and WebSocket, noting every write the kernel
/// accepts: the only honest measure of whether the peer still takes data.
struct Tracked<S> {
    inner: S,
    written: Arc<WriteProgress>,
}

impl<S> Tracked<S> {
    fn new(inner: S, written: Arc<WriteProgress>) -> Self {
        Tracked { inner, written }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.written.note();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.written.note();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Exponential reconnect delay: 1 s, 2 s, 4 s … up to the cap, ±10 %.
#[derive(Debug)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

/// Test-only, and only in debug builds: the first backoff step in
/// milliseconds, so that a test can cycle through a thousand reconnects in
/// seconds. Release builds (every package) never read it.
pub const TEST_FIRST_BACKOFF_ENV: &str = "NIXFLEET_TEST_FIRST_BACKOFF_MS";

fn first_backoff() -> Duration {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var(TEST_FIRST_BACKOFF_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Duration::from_millis(ms);
    }
    FIRST_BACKOFF
}

impl Backoff {
    pub fn new(max: Duration) -> Self {
        let first = first_backoff();
        Backoff {
            first,
            next: first.min(max),
            max,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (base * 2).min(self.max);
        base.mul_f64(rand::random_range(0.9..=1.1))
    }

    pub fn reset(&mut self) {
        self.next = self.first.min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter_and_resets() {
        let mut backoff = Backoff::new(Duration::from_secs(10));
        let expected = [1.0, 2.0, 4.0, 8.0, 10.0, 10.0];
        for base in expected {
            let d = backoff.next_delay().as_secs_f64();
            assert!(
                d >= base * 0.9 - 1e-9 && d <= base * 1.1 + 1e-9,
                "{d} vs {base}"
            );
        }
        backoff.reset();
        let d = backoff.next_delay().as_secs_f64();
        assert!((0.9..=1.1).contains(&d));
    }
}
