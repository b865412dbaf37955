//! A dashboard built to keep up: it accepts the agent on 127.0.0.1, answers
//! `register` with `registered`, sends commands, and records what the
//! benchmark needs with each frame's arrival time.
//!
//! `output` frames (nearly all the traffic) are not parsed as JSON: the
//! agent writes them as `{"type":"output","payload":{"line":"…` and the
//! benchmark's lines start with their sequence number and stamp, so a
//! prefix check and two digit runs are all it takes. Everything else is
//! rare and parsed with serde_json.

use crate::generator::{parse_stamp, realtime_ns};
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const OUTPUT_PREFIX: &str = r#"{"type":"output","payload":{"line":""#;

/// Output lines of the current phase.
#[derive(Debug, Default)]
pub struct Lines {
    /// Benchmark lines received, in order.
    pub received: u64,
    /// Lines whose sequence number skipped ahead of the next one expected
    /// (a gap: lines lost or reordered).
    pub out_of_order: u64,
    /// Lines that arrived again (sent again after a broken connection or a
    /// restarted agent); not counted in `received`.
    pub repeats: u64,
    pub next_seq: u64,
    /// "[nixfleet] N lines dropped" notices, and the N they add up to.
    pub drop_notices: u64,
    pub dropped: u64,
    /// Other output lines (none expected).
    pub foreign: u64,
    /// Child write → dashboard arrival, per line, in microseconds.
    pub latency_us: Vec<u32>,
    /// The stamps of the first and the last benchmark line received: the
    /// child's own wall time, as it wrote them.
    pub first_stamp_ns: u64,
    pub last_stamp_ns: u64,
}

impl Lines {
    /// The child's own wall time, from the stamps of its first and last line.
    pub fn child_time(&self) -> Duration {
        Duration::from_nanos(self.last_stamp_ns.saturating_sub(self.first_stamp_ns))
    }
}

/// A `status` frame.
#[derive(Debug, Clone)]
pub struct StatusSeen {
    pub at: Instant,
    pub realtime_ns: u64,
    pub status: String,
    pub message: String,
}

#[derive(Default)]
pub struct Record {
    pub registers: Vec<Instant>,
    pub heartbeats: Vec<Instant>,
    pub statuses: Vec<StatusSeen>,
    pub lines: Lines,
    /// Frames that were not JSON objects with a type.
    pub malformed: u64,
    current: Option<mpsc::UnboundedSender<Message>>,
}

struct Shared {
    record: Mutex<Record>,
    /// Frames read per second (0: as fast as they come).
    read_rate: std::sync::atomic::AtomicU32,
    /// Fired for every frame except output lines.
    changed: Notify,
}

pub struct Dashboard {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Dashboard {
    pub async fn start() -> std::io::Result<Dashboard> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let mut dashboard = Dashboard {
            addr: listener.local_addr()?,
            shared: Arc::new(Shared {
                record: Mutex::new(Record::default()),
                read_rate: Default::default(),
                changed: Notify::new(),
            }),
            tasks: Arc::new(Mutex::new(Vec::new())),
            acceptor: None,
        };
        dashboard.acceptor = Some(dashboard.accept(listener));
        Ok(dashboard)
    }

    /// Reads at most this many frames per second from now on (None: as
    /// fast as they come), like a dashboard on a slow link.
    pub fn set_read_rate(&self, frames_per_second: Option<u32>) {
        self.shared.read_rate.store(
            frames_per_second.unwrap_or(0),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    fn accept(&self, listener: TcpListener) -> JoinHandle<()> {
        let (shared, tasks) = (self.shared.clone(), self.tasks.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let task = tokio::spawn(serve(stream, shared.clone()));
                lock(&tasks).push(task);
            }
        })
    }

    /// Goes away like a killed process: listener and connections closed.
    pub fn kill(&mut self) {
        if let Some(acceptor) = self.acceptor.take() {
            acceptor.abort();
        }
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
        self.record().current = None;
    }

    /// Listens on the same port again; returns when it does.
    pub async fn restart(&mut self) -> std::io::Result<Instant> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => {
                    let at = Instant::now();
                    self.acceptor = Some(self.accept(listener));
                    return Ok(at);
                }
                Err(error) if Instant::now() > deadline => return Err(error),
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }

    pub fn record(&self) -> MutexGuard<'_, Record> {
        lock(&self.shared.record)
    }

    /// Sends a command on the current connection.
    pub fn command(&self, name: &str) -> bool {
        let frame = format!(r#"{{"type":"command","payload":{{"command":"{name}"}}}}"#);
        match &self.record().current {
            Some(tx) => tx.send(Message::text(frame)).is_ok(),
            None => false,
        }
    }

    /// Waits until `check` finds something in the record, at most `timeout`.
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&Record) -> Option<T>,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            if let Some(found) = check(&self.record()) {
                return Some(found);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return check(&self.record());
            }
        }
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let config = WebSocketConfig::default()
        .read_buffer_size(256 * 1024)
        .max_message_size(Some(4 << 20));
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let (mut sink, mut stream) = ws.split();
    let (tx, mut control) = mpsc::unbounded_channel();
    lock(&shared.record).current = Some(tx);
    let (mut paced_from, mut paced_frames, mut paced_rate) = (Instant::now(), 0u64, 0u32);
    loop {
        tokio::select! {
            Some(message) = control.recv() => {
                if sink.send(message).await.is_err() {
                    break;
                }
            }
            message = stream.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    if let Some(reply) = on_text(&shared, text.as_str())
                        && sink.send(reply).await.is_err()
                    {
                        break;
                    }
                    let rate = shared.read_rate.load(std::sync::atomic::Ordering::Relaxed);
                    if rate != paced_rate {
                        (paced_from, paced_frames, paced_rate) = (Instant::now(), 0, rate);
                    }
                    if rate > 0 {
                        paced_frames += 1;
                        let due = paced_from + Duration::from_secs_f64(paced_frames as f64 / f64::from(rate));
                        tokio::time::sleep_until(due.into()).await;
                    }
                }
                Some(Ok(Message::Close(_))) => {
                    let _ = sink.close().await;
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
}

/// Records one text frame; returns the answer to send, if any.
fn on_text(shared: &Shared, text: &str) -> Option<Message> {
    let now = Instant::now();
    if let Some(rest) = text.strip_prefix(OUTPUT_PREFIX) {
        on_line(&mut lock(&shared.record), rest.as_bytes());
        return None;
    }
    let parsed: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    let payload = &parsed["payload"];
    let mut reply = None;
    {
        let mut record = lock(&shared.record);
        match parsed["type"].as_str() {
            Some("register") => {
                record.registers.push(now);
                reply = Some(Message::text(
                    r#"{"type":"registered","payload":{"host_id":"bench"}}"#,
                ));
            }
            Some("heartbeat") => record.heartbeats.push(now),
            Some("status") => record.statuses.push(StatusSeen {
                at: now,
                realtime_ns: realtime_ns(),
                status: payload["status"].as_str().unwrap_or("").to_owned(),
                message: payload["message"].as_str().unwrap_or("").to_owned(),
            }),
            Some("output") => {
                // Not in the expected field order: take the slow path.
                let line = payload["line"].as_str().unwrap_or("");
                on_line(&mut record, format!("{line}\"").as_bytes());
            }
            Some(_) => {}
            None => record.malformed += 1,
        }
    }
    shared.changed.notify_waiters();
    reply
}

/// `rest` is the frame after the opening quote of the line's text.
fn on_line(record: &mut Record, rest: &[u8]) {
    let lines = &mut record.lines;
    match parse_stamp(rest) {
        Some(stamp) => {
            let now = realtime_ns();
            lines.latency_us.push(
                (now.saturating_sub(stamp.realtime_ns) / 1000).min(u64::from(u32::MAX)) as u32,
            );
            if stamp.seq < lines.next_seq {
                lines.repeats += 1;
                return;
            }
            if stamp.seq != lines.next_seq {
                lines.out_of_order += 1;
            }
            if lines.received == 0 {
                lines.first_stamp_ns = stamp.realtime_ns;
            }
            lines.next_seq = stamp.seq + 1;
            lines.received += 1;
            lines.last_stamp_ns = stamp.realtime_ns;
        }
        None => {
            const NOTICE: &[u8] = b"[nixfleet] ";
            if let Some(after) = rest.strip_prefix(NOTICE) {
                let digits = after.iter().take_while(|b| b.is_ascii_digit()).count();
                if after[digits..].starts_with(b" lines dropped") {
                    lines.drop_notices += 1;
                    lines.dropped += std::str::from_utf8(&after[..digits])
                        .ok()
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(0);
                    return;
                }
            }
            lines.foreign += 1;
        }
    }
}
