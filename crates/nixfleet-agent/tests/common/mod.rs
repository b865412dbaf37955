//! Test fixtures shared by the integration tests: an in-test dashboard that
//! records every frame with its arrival time, a TCP proxy that can freeze,
//! and the real agent binary started as a process.
//!
//! Waiting is always on events (a `Notify` fired per recorded frame), with a
//! deadline; never a sleep standing in for synchronisation.

#![allow(dead_code)]
// tungstenite's handshake callback fixes the (large) error type.
#![allow(clippy::result_large_err)]

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

pub const TOKEN: &str = "test-T0KEN-do-not-leak-7f3a";

/// What the in-test dashboard saw.
#[derive(Debug, Clone)]
pub enum Seen {
    /// An upgrade attempt and whether it was accepted.
    Upgrade {
        conn: u64,
        accepted: bool,
        at: Instant,
    },
    /// A text frame: `kind` is the message type ("" if none); the payload
    /// is parsed from `raw` when a test first asks for it, so that recording
    /// a flood stays cheap.
    Frame {
        conn: u64,
        at: Instant,
        kind: String,
        raw: Arc<str>,
        payload: Arc<std::sync::OnceLock<Value>>,
    },
    Close {
        conn: u64,
        at: Instant,
        code: Option<u16>,
        reason: String,
    },
    /// The TCP connection ended (after a close frame or not).
    Gone { conn: u64, at: Instant },
}

impl Seen {
    pub fn conn(&self) -> u64 {
        match self {
            Seen::Upgrade { conn, .. }
            | Seen::Frame { conn, .. }
            | Seen::Close { conn, .. }
            | Seen::Gone { conn, .. } => *conn,
        }
    }
    pub fn at(&self) -> Instant {
        match self {
            Seen::Upgrade { at, .. }
            | Seen::Frame { at, .. }
            | Seen::Close { at, .. }
            | Seen::Gone { at, .. } => *at,
        }
    }
    pub fn kind(&self) -> Option<&str> {
        match self {
            Seen::Frame { kind, .. } => Some(kind),
            _ => None,
        }
    }
    pub fn payload(&self) -> &Value {
        match self {
            Seen::Frame { raw, payload, .. } => payload.get_or_init(|| {
                let parsed: Value = serde_json::from_str(raw).unwrap_or(Value::Null);
                parsed.get("payload").cloned().unwrap_or(Value::Null)
            }),
            _ => &Value::Null,
        }
    }
}

enum Control {
    Send(Message),
    Close(u16, String),
}

#[derive(Default)]
struct Shared {
    log: Vec<Seen>,
    /// Positions in `log` of the frames of each type, so that waiting for
    /// the n-th frame of a type does not rescan a flood of output.
    by_kind: HashMap<String, Vec<usize>>,
    connections: HashMap<u64, mpsc::UnboundedSender<Control>>,
    next_conn: u64,
}

/// A dashboard inside the test process.
pub struct Dashboard {
    pub addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    changed: Arc<Notify>,
    acceptor: Option<JoinHandle<()>>,
    /// Answer every upgrade with this status instead of accepting.
    reject_with: Arc<Mutex<Option<u16>>>,
    /// When set, the dashboard does not read frames (simulates a stalled
    /// reader) until cleared.
    read_gate: Arc<tokio::sync::watch::Sender<bool>>,
    /// Frames read per second and connection; 0: as fast as they come.
    read_rate: Arc<std::sync::atomic::AtomicU32>,
}

impl Dashboard {
    pub async fn start() -> Dashboard {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::with_listener(listener)
    }

    /// A dashboard whose sockets have a small receive buffer (the kernel
    /// doubles the value): one that stops reading fills up quickly.
    pub async fn start_with_recv_buffer(bytes: u32) -> Dashboard {
        // Accepted sockets inherit the listener's buffer size.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(bytes).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        Self::with_listener(socket.listen(64).unwrap())
    }

    fn with_listener(listener: TcpListener) -> Dashboard {
        let addr = listener.local_addr().unwrap();
        let (gate, _) = tokio::sync::watch::channel(true);
        let mut dashboard = Dashboard {
            addr,
            shared: Arc::new(Mutex::new(Shared::default())),
            changed: Arc::new(Notify::new()),
            acceptor: None,
            reject_with: Arc::new(Mutex::new(None)),
            read_gate: Arc::new(gate),
            read_rate: Arc::default(),
        };
        dashboard.acceptor = Some(dashboard.spawn_acceptor(listener));
        dashboard
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Answer upgrades with an HTTP error status from now on (None: accept).
    pub fn reject_upgrades(&self, status: Option<u16>) {
        *self.reject_with.lock().unwrap() = status;
    }

    /// Stop (false) or resume (true) reading from agents.
    pub fn set_reading(&self, reading: bool) {
        self.read_gate.send_replace(reading);
    }

    /// Read at most this many frames per second (None: as fast as they
    /// come), like a dashboard on a slow link or a busy server.
    pub fn set_read_rate(&self, frames_per_second: Option<u32>) {
        self.read_rate.store(
            frames_per_second.unwrap_or(0),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn spawn_acceptor(&self, listener: TcpListener) -> JoinHandle<()> {
        let shared = self.shared.clone();
        let changed = self.changed.clone();
        let reject_with = self.reject_with.clone();
        let gate = self.read_gate.clone();
        let rate = self.read_rate.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let conn = {
                    let mut s = shared.lock().unwrap();
                    s.next_conn += 1;
                    s.next_conn
                };
                tokio::spawn(serve(
                    stream,
                    conn,
                    shared.clone(),
                    changed.clone(),
                    *reject_with.lock().unwrap(),
                    gate.subscribe(),
                    rate.clone(),
                ));
            }
        })
    }

    /// Kills the dashboard: the listener and every connection vanish at
    /// once (like SIGKILL: the kernel closes the sockets).
    pub fn kill(&mut self) {
        if let Some(acceptor) = self.acceptor.take() {
            acceptor.abort();
        }
        let mut s = self.shared.lock().unwrap();
        s.connections.clear();
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
            }
        };
        self.acceptor = Some(self.spawn_acceptor(listener));
    }

    pub fn log(&self) -> Vec<Seen> {
        self.shared.lock().unwrap().log.clone()
    }

    /// Frames of one type, in arrival order.
    pub fn frames(&self, kind: &str) -> Vec<Seen> {
        self.log()
            .into_iter()
            .filter(|s| s.kind() == Some(kind))
            .collect()
    }

    /// Waits until `check` finds what it looks for in the log.
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut check: impl FnMut(&[Seen]) -> Option<T>,
    ) -> T {
        self.wait_indexed(timeout, what, |s| check(&s.log)).await
    }

    /// Waits for the `n`-th (1-based) frame of a type and returns it.
    pub async fn wait_frame(&self, kind: &str, n: usize, timeout: Duration) -> Seen {
        self.wait_indexed(timeout, &format!("{kind} frame #{n}"), |s| {
            let position = *s.by_kind.get(kind)?.get(n - 1)?;
            Some(s.log[position].clone())
        })
        .await
    }

    /// Waits for a frame of a type matching `pred`. Each frame is looked at
    /// once, however long the wait.
    pub async fn wait_frame_where(
        &self,
        kind: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Seen {
        let mut checked = 0;
        self.wait_indexed(timeout, &format!("{kind} frame matching"), |s| {
            let positions = s.by_kind.get(kind)?;
            let found = positions[checked..]
                .iter()
                .map(|&p| &s.log[p])
                .find(|seen| pred(seen.payload()))
                .cloned();
            checked = positions.len();
            found
        })
        .await
    }

    async fn wait_indexed<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut check: impl FnMut(&Shared) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if let Some(found) = check(&self.shared.lock().unwrap()) {
                return found;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let log = self.shared.lock().unwrap().log.clone();
                let tail: Vec<String> = log
                    .iter()
                    .rev()
                    .take(15)
                    .rev()
                    .map(|s| format!("{s:?}"))
                    .collect();
                panic!(
                    "timed out after {timeout:?} waiting for {what}; last events:\n{}",
                    tail.join("\n")
                );
            }
        }
    }

    /// Waits for the first close frame an agent sent: (code, reason, when).
    pub async fn wait_close(&self, timeout: Duration) -> (Option<u16>, String, Instant) {
        self.wait_for(timeout, "close frame", |log| {
            log.iter().find_map(|s| match s {
                Seen::Close {
                    code, reason, at, ..
                } => Some((*code, reason.clone(), *at)),
                _ => None,
            })
        })
        .await
    }

    /// The newest live connection.
    pub fn current_conn(&self) -> Option<u64> {
        self.shared
            .lock()
            .unwrap()
            .connections
            .keys()
            .max()
            .copied()
    }

    pub fn send_raw(&self, conn: u64, message: Message) {
        let s = self.shared.lock().unwrap();
        if let Some(tx) = s.connections.get(&conn) {
            let _ = tx.send(Control::Send(message));
        }
    }

    pub fn send_json(&self, conn: u64, value: Value) {
        self.send_raw(conn, Message::text(value.to_string()));
    }

    pub fn command(&self, conn: u64, name: &str) {
        self.send_json(
            conn,
            serde_json::json!({"type": "command", "payload": {"command": name}}),
        );
    }

    /// Waits for the first agent's `register` and sends it the command
    /// `name`; returns its connection.
    pub async fn command_first(&self, name: &str) -> u64 {
        let conn = self.wait_frame("register", 1, 10 * SECOND).await.conn();
        self.command(conn, name);
        conn
    }

    /// Waits for an output line that starts with `prefix`.
    pub async fn wait_output_starting(&self, prefix: &str, timeout: Duration) -> Seen {
        self.wait_frame_where("output", timeout, |p| {
            p["line"].as_str().is_some_and(|l| l.starts_with(prefix))
        })
        .await
    }

    pub fn close(&self, conn: u64, code: u16, reason: &str) {
        let s = self.shared.lock().unwrap();
        if let Some(tx) = s.connections.get(&conn) {
            let _ = tx.send(Control::Close(code, reason.to_owned()));
        }
    }
}

/// A command's supervisor outlives the agent by design (as under systemd's
/// `KillMode=process`); a test's must not outlive the test, flooding into a
/// deleted log. So a dropped agent (not one handed on by [`Agent::crash`])
/// asks every supervisor writing into its state directory to kill its
/// command, as `kill_command` would, and waits for them briefly.
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if self.end_command_on_drop {
            end_supervisors(&self.state_dir);
        }
    }
}

pub fn end_supervisors(state_dir: &Path) {
    let logs = state_dir.join("logs");
    if supervisors_writing_into(&logs).is_empty() {
        return;
    }
    let _ = std::fs::write(state_dir.join("running-command.stop"), "KILL");
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !supervisors_writing_into(&logs).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Live `nixfleet-agent --supervise` processes with a file open under `dir`.
fn supervisors_writing_into(dir: &Path) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| cmdline.starts_with(b"nixfleet-agent\0--supervise"))
        })
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|to| to.starts_with(dir)))
            })
        })
        .collect()
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn record(shared: &Mutex<Shared>, changed: &Notify, seen: Seen) {
    let mut s = shared.lock().unwrap();
    if let Some(kind) = seen.kind() {
        let position = s.log.len();
        match s.by_kind.get_mut(kind) {
            Some(positions) => positions.push(position),
            None => {
                s.by_kind.insert(kind.to_owned(), vec![position]);
            }
        }
    }
    s.log.push(seen);
    drop(s);
    changed.notify_waiters();
}

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

async fn serve(
    stream: TcpStream,
    conn: u64,
    shared: Arc<Mutex<Shared>>,
    changed: Arc<Notify>,
    reject_with: Option<u16>,
    mut gate: tokio::sync::watch::Receiver<bool>,
    rate: Arc<std::sync::atomic::AtomicU32>,
) {
    // Pacing: frames read since `paced_from` at the rate in force then.
    let (mut paced_from, mut paced_frames, mut paced_rate) = (Instant::now(), 0u64, 0u32);
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
        &shared,
        &changed,
        Seen::Upgrade {
            conn,
            accepted: ok && accepted.is_ok(),
            at: Instant::now(),
        },
    );
    let Ok(ws) = accepted else { return };
    let (tx, mut rx) = mpsc::unbounded_channel();
    shared.lock().unwrap().connections.insert(conn, tx);
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
                    record(&shared, &changed, Seen::Frame { conn, at: Instant::now(), kind, raw, payload: Default::default() });
                    let per_second = rate.load(std::sync::atomic::Ordering::Relaxed);
                    if per_second != paced_rate {
                        (paced_from, paced_frames, paced_rate) = (Instant::now(), 0, per_second);
                    }
                    if per_second > 0 {
                        paced_frames += 1;
                        let due = paced_from + Duration::from_secs_f64(paced_frames as f64 / f64::from(per_second));
                        tokio::time::sleep_until(due).await;
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame.map(|f| (Some(u16::from(f.code)), f.reason.to_string())).unwrap_or((None, String::new()));
                    record(&shared, &changed, Seen::Close { conn, at: Instant::now(), code, reason });
                    // Answer the close handshake, then the stream ends.
                    let _ = sink.flush().await;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
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

/// A TCP proxy in front of a dashboard that can be frozen: it then keeps
/// both connections open but passes no byte in either direction, like a
/// network that silently went away.
pub struct FreezableProxy {
    pub addr: SocketAddr,
    frozen: Arc<tokio::sync::watch::Sender<bool>>,
    task: JoinHandle<()>,
    /// When each client connection arrived.
    accepts: Arc<Mutex<Vec<Instant>>>,
    accepted: Arc<Notify>,
}

impl FreezableProxy {
    pub async fn start(upstream: SocketAddr) -> FreezableProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen, _) = tokio::sync::watch::channel(false);
        let frozen = Arc::new(frozen);
        let f = frozen.clone();
        let accepts = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(Notify::new());
        let (a, n) = (accepts.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                a.lock().unwrap().push(Instant::now());
                n.notify_waiters();
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, f.subscribe()));
                tokio::spawn(pipe(sr, cw, f.subscribe()));
            }
        });
        FreezableProxy {
            addr,
            frozen,
            task,
            accepts,
            accepted,
        }
    }

    /// Waits until `n` client connections have arrived; returns when the
    /// n-th did.
    pub async fn wait_accepts(&self, n: usize, timeout: Duration) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.accepted.notified();
            if let Some(at) = self.accepts.lock().unwrap().get(n - 1) {
                return *at;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("proxy saw fewer than {n} connections within {timeout:?}");
            }
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn freeze(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }
}

impl Drop for FreezableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Frozen: hold both ends open and pass nothing.
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        tokio::select! {
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if frozen.wait_for(|f| !*f).await.is_err() {
                        return;
                    }
                    if to.write_all(&buf[..n]).await.is_err() { return }
                }
            },
            _ = frozen.changed() => {}
        }
    }
}

/// Options for starting the agent.
#[derive(Clone)]
pub struct AgentOptions {
    pub url: String,
    pub interval: u64,
    pub ping_interval: u64,
    pub ping_timeout: u64,
    pub backoff_max: u64,
    pub stop_grace: u64,
    pub metrics: &'static str,
    pub hostname: String,
    /// Extra `key = value` TOML lines.
    pub extra_toml: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Put the token in the environment instead of a token file.
    pub token_in_env: bool,
    /// The agent's umask (None: the test's).
    pub umask: Option<u32>,
}

impl AgentOptions {
    pub fn new(url: String) -> Self {
        AgentOptions {
            url,
            interval: 1,
            ping_interval: 1,
            ping_timeout: 3,
            backoff_max: 2,
            stop_grace: 1,
            metrics: "none",
            hostname: "test-host".into(),
            extra_toml: Vec::new(),
            env: Vec::new(),
            token_in_env: false,
            umask: None,
        }
    }

    /// Isolated mode: the agent follows branch `main` of `upstream`, a
    /// local repository (start it with [`Agent::prepare_to_clone`]).
    pub fn follow(&mut self, upstream: &Path) {
        let url = upstream.display().to_string();
        self.extra_toml.push(format!("repo_url = {url:?}"));
        self.extra_toml.push("branch = \"main\"".into());
    }
}

/// The real agent binary, running. Killed when dropped.
pub struct Agent {
    pub child: tokio::process::Child,
    pub dir: tempfile::TempDir,
    pub repo_dir: PathBuf,
    pub state_dir: PathBuf,
    pub bin_dir: PathBuf,
    stderr_path: PathBuf,
    /// Whether dropping the agent also ends its running command (see Drop).
    end_command_on_drop: bool,
}

impl Agent {
    /// A working directory with a config and an (empty) stand-in directory
    /// put first on PATH; the agent is started by [`Agent::spawn`].
    pub fn prepare(options: &AgentOptions) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let bin_dir = dir.path().join("bin");
        std::fs::create_dir_all(&bin_dir).unwrap();
        std::fs::create_dir_all(dir.path().join("repo")).unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
        set_mode(&dir.path().join("token"), 0o600);
        let _ = options;
        (dir, bin_dir)
    }

    /// [`Agent::prepare`] for an agent in isolated mode: no `repo_dir` yet,
    /// so that its first pull clones.
    pub fn prepare_to_clone(options: &AgentOptions) -> (tempfile::TempDir, PathBuf) {
        let (dir, bin_dir) = Agent::prepare(options);
        std::fs::remove_dir(dir.path().join("repo")).unwrap();
        (dir, bin_dir)
    }

    pub async fn start(options: AgentOptions) -> Agent {
        let (dir, _) = Agent::prepare(&options);
        Agent::spawn(dir, options).await
    }

    pub async fn spawn(dir: tempfile::TempDir, options: AgentOptions) -> Agent {
        let repo_dir = dir.path().join("repo");
        let state_dir = dir.path().join("state");
        let bin_dir = dir.path().join("bin");
        let mut toml = format!(
            "url = {url:?}\nrepo_dir = {repo:?}\nstate_dir = {state:?}\nhostname = {host:?}\n\
             interval = {i}\nping_interval = {pi}\nping_timeout = {pt}\nbackoff_max = {bm}\n\
             stop_grace = {sg}\nmetrics = {m:?}\nlog_level = \"debug\"\n",
            url = options.url,
            repo = repo_dir.display().to_string(),
            state = state_dir.display().to_string(),
            host = options.hostname,
            i = options.interval,
            pi = options.ping_interval,
            pt = options.ping_timeout,
            bm = options.backoff_max,
            sg = options.stop_grace,
            m = options.metrics,
        );
        if !options.token_in_env {
            toml.push_str(&format!(
                "token_file = {:?}\n",
                dir.path().join("token").display().to_string()
            ));
        }
        for line in &options.extra_toml {
            toml.push_str(line);
            toml.push('\n');
        }
        let config = dir.path().join("agent.toml");
        std::fs::write(&config, toml).unwrap();
        let stderr_path = dir.path().join("agent.stderr");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_nixfleet-agent"));
        command
            .arg("--config")
            .arg(&config)
            .env_clear()
            .env("PATH", path)
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        if options.token_in_env {
            command.env("NIXFLEET_TOKEN", TOKEN);
        }
        for (k, v) in &options.env {
            command.env(k, v);
        }
        if let Some(mask) = options.umask {
            let mask = rustix::fs::Mode::from_raw_mode(mask);
            // SAFETY: umask is async-signal-safe and touches no memory.
            unsafe {
                command.pre_exec(move || {
                    rustix::process::umask(mask);
                    Ok(())
                });
            }
        }
        let child = command.spawn().expect("agent binary starts");
        Agent {
            child,
            dir,
            repo_dir,
            state_dir,
            bin_dir,
            stderr_path,
            end_command_on_drop: true,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("agent is running")
    }

    pub fn signal(&self, signal: i32) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).unwrap();
        let signal = rustix::process::Signal::from_named_raw(signal).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }

    /// Waits for exit (with a deadline) and returns the exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.unwrap().code(),
            Err(_) => panic!(
                "agent did not exit within {timeout:?}; stderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// SIGKILLs the agent (a crash) and hands back its directory, so that a
    /// new agent can start on the same state.
    pub async fn crash(mut self) -> tempfile::TempDir {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
        // The command goes on, for the next agent to adopt.
        self.end_command_on_drop = false;
        let placeholder = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, placeholder)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Resident set size in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    pub fn hwm_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }
}

pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Writes an executable stand-in script.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    set_mode(&path, 0o755);
    path
}

/// Starts the agent with a stand-in `nixos-rebuild` (running `body`)
/// first on its PATH.
pub async fn start_with_rebuild(
    url: String,
    body: &str,
    tweak: impl FnOnce(&mut AgentOptions),
) -> Agent {
    let mut options = AgentOptions::new(url);
    tweak(&mut options);
    let (dir, bin) = Agent::prepare(&options);
    script(&bin, "nixos-rebuild", body);
    Agent::spawn(dir, options).await
}

/// Runs git in `dir` with a fixed identity and returns its stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@t")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@t")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A pid a stand-in wrote to a file.
/// Reads a pid that a stand-in script writes with `echo $$ > FILE`. The
/// agent may report the command (e.g. in a heartbeat) before the script got
/// that far, so this waits for a complete line, up to 10 s. The waiting
/// blocks the test's thread only; the child writes independently of it.
pub fn read_pid(path: &Path) -> u32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(pid) = text
            .strip_suffix('\n')
            .and_then(|line| line.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no pid in {} within 10 s (read {text:?})",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether a process runs; a zombie counts as dead (it runs nothing).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Gaps between consecutive heartbeats of one connection.
pub fn heartbeat_gaps(log: &[Seen], conn: u64) -> Vec<Duration> {
    let beats: Vec<Instant> = log
        .iter()
        .filter(|s| s.conn() == conn && s.kind() == Some("heartbeat"))
        .map(Seen::at)
        .collect();
    beats.windows(2).map(|w| w[1] - w[0]).collect()
}

pub const SECOND: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------
// Added for tests/faults.rs, tests/secrets.rs and tests/tls.rs (issue 6).

/// A TCP proxy in front of a dashboard that passes the agent's bytes on at
/// a limited rate (a dashboard that reads very slowly), and the dashboard's
/// bytes back at full speed.
///
/// Its receive buffer is pinned small ([`THROTTLED_RECV_BUFFER`]): otherwise
/// the kernel grows it to hundreds of KiB, and at a slow rate that queue
/// alone delays every frame by seconds, whatever the agent does. With it
/// small, what delays a heartbeat is what the agent queued ahead of it.
pub struct ThrottledProxy {
    pub addr: SocketAddr,
    /// Bytes per second from the agent; 0 = unlimited.
    rate: Arc<std::sync::atomic::AtomicU64>,
    task: JoinHandle<()>,
}

impl ThrottledProxy {
    pub async fn start(upstream: SocketAddr, bytes_per_second: u64) -> ThrottledProxy {
        // Accepted sockets inherit the listener's buffer size.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(THROTTLED_RECV_BUFFER).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(64).unwrap();
        let addr = listener.local_addr().unwrap();
        let rate = Arc::new(std::sync::atomic::AtomicU64::new(bytes_per_second));
        let r = rate.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(throttled_pipe(cr, sw, r.clone()));
                tokio::spawn(throttled_pipe(
                    sr,
                    cw,
                    Arc::new(std::sync::atomic::AtomicU64::new(0)),
                ));
            }
        });
        ThrottledProxy { addr, rate, task }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn set_rate(&self, bytes_per_second: u64) {
        self.rate
            .store(bytes_per_second, std::sync::atomic::Ordering::Relaxed);
    }
}

/// SO_RCVBUF of the throttled proxy (the kernel doubles it).
pub const THROTTLED_RECV_BUFFER: u32 = 32 * 1024;

impl Drop for ThrottledProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn throttled_pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    rate: Arc<std::sync::atomic::AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Small reads, so that a slow rate is smooth rather than bursty.
    let mut buf = vec![0u8; 4 * 1024];
    let mut window_start = Instant::now();
    let mut window_bytes: u64 = 0;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        let rate = rate.load(std::sync::atomic::Ordering::Relaxed);
        if rate == 0 {
            window_start = Instant::now();
            window_bytes = 0;
            continue;
        }
        window_bytes += n as u64;
        let due = window_start + Duration::from_secs_f64(window_bytes as f64 / rate as f64);
        tokio::time::sleep_until(due).await;
        // Restart the window now and then so a rate change applies soon.
        if window_bytes > rate {
            window_start = Instant::now();
            window_bytes = 0;
        }
    }
}

/// Waits (polling, with a deadline) until `path` exists and returns its
/// content. For files a stand-in script writes when it is done.
pub async fn wait_for_file(path: &Path, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && !text.is_empty()
        {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not appear within {timeout:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Agent {
    /// Open file descriptors of the agent process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// What each open descriptor of the agent points at (`socket:[…]`,
    /// `anon_inode:[timerfd]`, a path), for failure messages.
    pub fn fd_targets(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fd", self.pid())) else {
            return Vec::new();
        };
        let mut targets: Vec<String> = dir
            .flatten()
            .map(|entry| {
                let target = std::fs::read_link(entry.path())
                    .map(|t| t.display().to_string())
                    .unwrap_or_else(|_| "?".into());
                format!("{}→{target}", entry.file_name().to_string_lossy())
            })
            .collect();
        targets.sort();
        targets
    }

    /// Threads of the agent process.
    pub fn thread_count(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Whether the process is still running (not exited, not a zombie).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (polling the log, with a deadline) until stderr contains
    /// `needle`; returns the whole log.
    pub async fn wait_stderr(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let stderr = self.stderr();
            if stderr.contains(needle) {
                return stderr;
            }
            assert!(
                Instant::now() < deadline,
                "agent stderr lacks {needle:?} after {timeout:?}:\n{stderr}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Heartbeat arrivals (any connection) between `from` and `to`, and the
/// longest time the dashboard went without one in that window (edges
/// included).
pub fn longest_heartbeat_silence(log: &[Seen], from: Instant, to: Instant) -> Duration {
    let mut last = from;
    let mut worst = Duration::ZERO;
    for at in log
        .iter()
        .filter(|s| s.kind() == Some("heartbeat"))
        .map(Seen::at)
        .filter(|at| *at >= from && *at <= to)
    {
        worst = worst.max(at - last);
        last = at;
    }
    worst.max(to.saturating_duration_since(last))
}
