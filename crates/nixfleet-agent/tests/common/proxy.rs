//! TCP proxies in front of a dashboard: one that can freeze (a network that
//! silently went away), one that passes the agent's bytes on slowly (a
//! dashboard that reads very slowly).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

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
