//! Black-box tests of `nixfleet-mock-dashboard`: each test starts the real
//! binary on `127.0.0.1:0`, reads the port from its stdout, and talks to it
//! with a tokio-tungstenite agent and a tiny HTTP/1.1 client. Nothing waits
//! on a fixed sleep: conditions are polled over HTTP against a deadline.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const TOKEN: &str = "test-token-7f3a9c";
const DEADLINE: Duration = Duration::from_secs(20);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

// The tests, by concern; the helpers below serve them all. One test
// binary: these are its modules, not binaries of their own.
// The agent's tests read /proc the same way.
#[allow(dead_code)] // git: these tests do not use it
#[path = "../../nixfleet-agent/tests/common/host_tools.rs"]
mod host_tools;
use host_tools::proc_status_kib;
#[path = "mock_dashboard/api.rs"]
mod api;
#[path = "mock_dashboard/fleet.rs"]
mod fleet;
#[path = "mock_dashboard/limits.rs"]
mod limits;
#[path = "mock_dashboard/page.rs"]
mod page;
#[path = "mock_dashboard/v3.rs"]
mod v3;

// ---------------------------------------------------------------------------
// The mock process

struct Mock {
    child: Child,
    addr: String,
    stderr: Arc<Mutex<String>>,
    stderr_task: Option<tokio::task::JoinHandle<()>>,
}

impl Mock {
    async fn start(extra: &[&str]) -> Mock {
        let mut args = vec!["--listen", "127.0.0.1:0"];
        if !extra.iter().any(|a| a.starts_with("--token")) {
            args.extend(["--token", TOKEN]);
        }
        args.extend(extra);
        Mock::spawn(&args).await
    }

    async fn spawn(args: &[&str]) -> Mock {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nixfleet-mock-dashboard"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the mock");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = BufReader::new(child.stderr.take().unwrap());
        let sink = stderr.clone();
        let stderr_task = tokio::spawn(async move {
            let mut line = String::new();
            while let Ok(n) = err_pipe.read_line(&mut line).await {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        tokio::time::timeout(DEADLINE, out.read_line(&mut first))
            .await
            .expect("the mock printed nothing on stdout")
            .expect("read the mock's stdout");
        let addr = first
            .strip_suffix('\n')
            .and_then(|l| l.strip_prefix("listening on "))
            .unwrap_or_else(|| panic!("unexpected first stdout line {first:?}"))
            .to_owned();
        // Nothing else may appear on stdout.
        tokio::spawn(async move {
            let mut rest = String::new();
            let _ = out.read_to_string(&mut rest).await;
            assert!(rest.is_empty(), "extra stdout output: {rest:?}");
        });
        Mock {
            child,
            addr,
            stderr,
            stderr_task: Some(stderr_task),
        }
    }

    async fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        http(&self.addr, method, path, body).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let (status, body) = self.request("GET", path, None).await;
        (status, parse(&body))
    }

    async fn get_ok(&self, path: &str) -> Value {
        let (status, v) = self.get(path).await;
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let (status, body) = self.request("POST", path, Some(body)).await;
        (status, parse(&body))
    }

    async fn post_ok(&self, path: &str, body: &str) -> Value {
        let (status, v) = self.post(path, body).await;
        assert_eq!(status, 200, "POST {path} {body}: {v}");
        v
    }

    /// Polls `GET path` until `cond` holds; returns that response.
    async fn wait_for(&self, path: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let (status, v) = self.get(path).await;
            if status == 200 && cond(&v) {
                return v;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {what}; last GET {path}: {status} {v}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn host(&self, host: &str) -> Value {
        self.get_ok(&format!("/api/hosts/{host}")).await
    }

    async fn messages(&self, host: &str, query: &str) -> Value {
        self.get_ok(&format!("/api/hosts/{host}/messages{query}"))
            .await
    }

    /// Waits until `host` has stored `n` messages in total.
    async fn wait_messages(&self, host: &str, n: u64) -> Value {
        self.wait_for(
            &format!("/api/hosts/{host}/messages"),
            &format!("{n} messages from {host}"),
            |v| v["next"] == n,
        )
        .await
    }

    async fn connect(&self, token: Option<&str>) -> Result<Ws, tungstenite::Error> {
        let mut request = format!("ws://{}/ws", self.addr)
            .into_client_request()
            .unwrap();
        if let Some(token) = token {
            request
                .headers_mut()
                .insert("Authorization", format!("Bearer {token}").parse().unwrap());
        }
        let (ws, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(ws)
    }

    /// Connects, registers `hostname` and checks the `registered` reply.
    async fn agent(&self, hostname: &str, heartbeat_interval: u64) -> Ws {
        let mut ws = self.connect(Some(TOKEN)).await.expect("connect");
        send(&mut ws, &register(hostname, heartbeat_interval)).await;
        let reply = next_json(&mut ws).await;
        assert_eq!(
            reply,
            json!({"type": "registered", "payload": {"host_id": hostname}})
        );
        ws
    }

    fn sigterm(&self) {
        let pid = self.child.id().expect("the mock is running");
        let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    }

    /// Waits for the process to exit; returns its status and full stderr.
    async fn wait_exit(&mut self) -> (std::process::ExitStatus, String) {
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("the mock did not exit")
            .unwrap();
        if let Some(task) = self.stderr_task.take() {
            let _ = tokio::time::timeout(DEADLINE, task).await;
        }
        (status, self.stderr.lock().unwrap().clone())
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- mock stderr -----\n{}-----------------------",
                self.stderr.lock().unwrap()
            );
        }
    }
}

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("response is not JSON ({e}): {body:?}"))
}

fn register(hostname: &str, heartbeat_interval: u64) -> Value {
    json!({"type": "register", "payload": {
        "hostname": hostname, "host_type": "nixos", "agent_version": "0.1.0",
        "os_version": "25.11", "nixpkgs_version": "25.11.20251120.abc1234",
        "generation": "abc1234", "heartbeat_interval": heartbeat_interval}})
}

fn heartbeat(generation: &str) -> Value {
    json!({"type": "heartbeat", "payload": {
        "generation": generation, "nixpkgs_version": "25.11", "pending_command": null,
        "command_pid": null, "metrics": {"cpu": 1.5, "ram": 20.0, "swap": 0.0, "load": 0.1}}})
}

fn output(line: &str) -> Value {
    json!({"type": "output", "payload": {
        "line": line, "command": "switch", "stream": "stdout", "is_error": false}})
}

async fn send(ws: &mut Ws, v: &Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// The next data or close frame (pings and pongs skipped).
async fn next_frame(ws: &mut Ws) -> Message {
    loop {
        let msg = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("the connection ended")
            .expect("WebSocket error");
        if !matches!(msg, Message::Ping(_) | Message::Pong(_)) {
            return msg;
        }
    }
}

async fn next_text(ws: &mut Ws) -> String {
    match next_frame(ws).await {
        Message::Text(t) => t.as_str().to_owned(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

async fn next_json(ws: &mut Ws) -> Value {
    parse(&next_text(ws).await)
}

async fn next_close(ws: &mut Ws) -> CloseFrame {
    match next_frame(ws).await {
        Message::Close(Some(frame)) => frame,
        other => panic!("expected a close frame, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// A tiny HTTP/1.1 client: one request per connection (`Connection: close`).

async fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    http_raw(addr, method, path, &[], body).await
}

async fn http_raw(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, String) {
    let fut = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect to the mock");
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(body) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        if let Some(body) = body {
            req.push_str(body);
        }
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        raw
    };
    let raw = tokio::time::timeout(DEADLINE, fut)
        .await
        .expect("HTTP request timed out");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        body = dechunk(&body);
    } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.truncate(len);
    }
    (status, String::from_utf8(body).expect("UTF-8 body"))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).expect("chunk size");
        if size == 0 {
            return out;
        }
        let start = eol + 2;
        out.extend_from_slice(&data[start..start + size]);
        data = &data[start + size + 2..];
    }
}

fn types(messages: &Value) -> Vec<String> {
    messages["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["type"].as_str().unwrap().to_owned())
        .collect()
}

// ---------------------------------------------------------------------------
// A reader of the page's live feed (`GET /events`, Server-Sent Events)

/// A Server-Sent Events client on a raw socket (HTTP/1.0, so the body is
/// the plain event stream), with a small receive buffer so that not
/// reading pushes back on the mock quickly, like a browser that fell behind.
struct SseClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl SseClient {
    async fn connect(addr: &str, path: &str) -> SseClient {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(addr.parse().unwrap()).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut client = SseClient {
            stream,
            buf: Vec::new(),
        };
        let head = client.read_until(b"\r\n\r\n").await;
        let head = String::from_utf8_lossy(&head).to_lowercase();
        assert!(
            head.starts_with("http/1.0 200") || head.starts_with("http/1.1 200"),
            "{head}"
        );
        assert!(head.contains("content-type: text/event-stream"), "{head}");
        client
    }

    async fn read_until(&mut self, end: &[u8]) -> Vec<u8> {
        loop {
            if let Some(at) = self.buf.windows(end.len()).position(|w| w == end) {
                let rest = self.buf.split_off(at + end.len());
                return std::mem::replace(&mut self.buf, rest);
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = tokio::time::timeout(DEADLINE, self.stream.read(&mut chunk))
                .await
                .expect("timed out reading the event stream")
                .expect("read the event stream");
            assert!(n > 0, "the event stream ended");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next event with data: its name and its data as JSON.
    async fn next(&mut self) -> (String, Value) {
        loop {
            let block = self.read_until(b"\n\n").await;
            let block = String::from_utf8(block).expect("UTF-8 events");
            let mut name = "message".to_owned();
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            if !data.is_empty() {
                return (name, parse(&data.join("\n")));
            }
        }
    }

    /// Reads events until `name` arrives with data satisfying `cond`.
    async fn wait(&mut self, name: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let mut last = None;
        let found = tokio::time::timeout(DEADLINE, async {
            loop {
                let (n, data) = self.next().await;
                if n == name && cond(&data) {
                    return data;
                }
                if n == name {
                    last = Some(data);
                }
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!("timed out waiting for a {name} event; the last one: {last:?}")
        })
    }
}
