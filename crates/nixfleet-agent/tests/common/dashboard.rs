//! A dashboard inside the test process: it accepts agents (or refuses
//! their upgrade), records what they send, sends what a test asks, and can
//! stop reading, read slowly, be killed and come back.

use super::SECOND;
use super::seen::{Control, Seen, Shared};
use super::serve::serve;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

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

impl Drop for Dashboard {
    fn drop(&mut self) {
        self.kill();
    }
}
