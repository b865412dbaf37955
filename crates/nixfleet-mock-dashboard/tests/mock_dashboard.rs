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

#[path = "mock_dashboard/fleet.rs"]
mod fleet;

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
// Tests

#[tokio::test]
async fn health_and_not_found() {
    let mock = Mock::start(&[]).await;
    assert_eq!(mock.get("/health").await, (200, json!({"status": "ok"})));
    assert_eq!(mock.get("/api/hosts").await, (200, json!([])));
    for path in [
        "/nope",
        "/api/hosts/ghost",
        "/api/hosts/ghost/messages",
        "/api/hosts/ghost/connections",
    ] {
        let (status, v) = mock.get(path).await;
        assert_eq!(status, 404, "{path}");
        assert!(v["error"].is_string(), "{path}: {v}");
    }
    let (status, v) = mock.request("DELETE", "/health", None).await;
    assert_eq!(status, 405);
    assert!(parse(&v)["error"].is_string());
}

#[tokio::test]
async fn upgrade_needs_the_bearer_token() {
    let mock = Mock::start(&[]).await;
    for token in [None, Some("wrong-token"), Some("")] {
        match mock.connect(token).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401, "token {token:?}")
            }
            Err(e) => panic!("token {token:?}: unexpected error {e}"),
            Ok(_) => panic!("token {token:?}: the upgrade was accepted"),
        }
    }
    // Not a Bearer token, and a plain GET without upgrade headers.
    let (status, body) = http_raw(
        &mock.addr,
        "GET",
        "/ws",
        &[("Authorization", &format!("Basic {TOKEN}"))],
        None,
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(parse(&body), json!({"error": "unauthorized"}));
    let rejected = mock.get_ok("/api/rejected").await;
    assert_eq!(rejected.as_array().unwrap().len(), 4, "{rejected}");
    assert_eq!(mock.get("/api/hosts").await, (200, json!([])));

    // The scheme is case-insensitive; the right token gets through.
    let mut request = format!("ws://{}/ws", mock.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("bearer {TOKEN}").parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.status(), 101);
    send(&mut ws, &register("auth-ok", 30)).await;
    assert_eq!(next_json(&mut ws).await["type"], "registered");
}

#[tokio::test]
async fn register_and_heartbeat_make_the_host_online() {
    let mock = Mock::start(&[]).await;
    let mut ws = mock.agent("web-1", 30).await;
    let host = mock.host("web-1").await;
    assert_eq!(host["online"], true, "{host}");
    assert_eq!(host["connected"], true);
    assert_eq!(host["connections"], 1);
    assert_eq!(host["register"], register("web-1", 30)["payload"]);
    assert_eq!(host["last_heartbeat"], Value::Null);
    assert_eq!(host["heartbeat_interval_ms"], 30_000);

    let hb = heartbeat("def5678");
    send(&mut ws, &hb).await;
    let hosts = mock
        .wait_for("/api/hosts", "the heartbeat", |v| {
            v[0]["last_heartbeat"] == hb["payload"]
        })
        .await;
    assert_eq!(hosts.as_array().unwrap().len(), 1);
    assert_eq!(hosts[0]["hostname"], "web-1");
    assert_eq!(hosts[0]["online"], true);
    assert!(hosts[0]["last_seen"].as_u64().unwrap() >= hosts[0]["registered_at"].as_u64().unwrap());
    let messages = mock.messages("web-1", "").await;
    assert_eq!(types(&messages), ["register", "heartbeat"]);
    assert_eq!(messages["messages"][1]["payload"], hb["payload"]);
}

#[tokio::test]
async fn messages_are_kept_in_order_and_can_be_filtered() {
    let mock = Mock::start(&[]).await;
    let mut ws = mock.agent("web-2", 30).await;
    send(&mut ws, &heartbeat("a")).await;
    for i in 0..5 {
        send(&mut ws, &output(&format!("line {i}"))).await;
        if i == 2 {
            send(&mut ws, &heartbeat("b")).await;
        }
    }
    let status = json!({"type": "status", "payload": {"status": "ok", "command": "switch",
        "exit_code": 0, "message": "ok", "generation": "b"}});
    send(&mut ws, &status).await;
    let all = mock.wait_messages("web-2", 9).await;
    assert_eq!(
        types(&all),
        [
            "register",
            "heartbeat",
            "output",
            "output",
            "output",
            "heartbeat",
            "output",
            "output",
            "status"
        ]
    );
    let indices: Vec<u64> = all["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, (0..9).collect::<Vec<_>>());
    assert_eq!(all["messages"][8]["payload"], status["payload"]);
    assert_eq!(all["evicted"], 0);
    let conn = all["messages"][0]["conn"].clone();
    assert!(
        all["messages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["conn"] == conn && m["t"].is_u64())
    );

    let outputs = mock.messages("web-2", "?type=output").await;
    let lines: Vec<&str> = outputs["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["payload"]["line"].as_str().unwrap())
        .collect();
    assert_eq!(lines, ["line 0", "line 1", "line 2", "line 3", "line 4"]);
    assert_eq!(outputs["next"], 9);

    let newer = mock.messages("web-2", "?since=9").await;
    assert_eq!(newer["messages"], json!([]));
    assert_eq!(newer["next"], 9);
    let page = mock.messages("web-2", "?type=output&since=3&limit=2").await;
    assert_eq!(page["messages"][0]["payload"]["line"], "line 1");
    assert_eq!(page["messages"][1]["payload"]["line"], "line 2");
    assert_eq!(page["next"], 5);
    let page = mock.messages("web-2", "?type=output&since=5").await;
    assert_eq!(types(&page), ["output", "output"]);

    send(&mut ws, &output("line 5")).await;
    let later = mock
        .wait_for("/api/hosts/web-2/messages?since=9", "one more", |v| {
            v["next"] == 10
        })
        .await;
    assert_eq!(later["messages"][0]["payload"]["line"], "line 5");
    assert_eq!(later["messages"][0]["index"], 9);

    for bad in ["?since=x", "?since=-1", "?limit=1.5"] {
        let (status, v) = mock.get(&format!("/api/hosts/web-2/messages{bad}")).await;
        assert_eq!(status, 400, "{bad}: {v}");
    }
}

#[tokio::test]
async fn api_posts_reach_the_agent_and_disconnect_closes_with_the_code() {
    let mock = Mock::start(&[]).await;
    let mut ws = mock.agent("web-3", 30).await;

    let ok = mock
        .post_ok("/api/hosts/web-3/command", r#"{"command": "switch"}"#)
        .await;
    assert_eq!(ok["ok"], true);
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "command", "payload": {"command": "switch"}})
    );
    // Names are not validated by the mock.
    mock.post_ok("/api/hosts/web-3/command", r#"{"command": "rm -rf /"}"#)
        .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "command", "payload": {"command": "rm -rf /"}})
    );

    mock.post_ok(
        "/api/hosts/web-3/kill",
        r#"{"signal": "SIGKILL", "pid": 4242}"#,
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "kill_command", "payload": {"signal": "SIGKILL", "pid": 4242}})
    );
    mock.post_ok("/api/hosts/web-3/kill", "").await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "kill_command", "payload": {"signal": "SIGTERM", "pid": 0}})
    );

    let unknown = r#"{"type":"future_thing","payload":{"x":[1,2]}}"#;
    mock.post_ok("/api/hosts/web-3/send", unknown).await;
    assert_eq!(next_text(&mut ws).await, unknown);
    mock.post_ok("/api/hosts/web-3/send", r#"{"raw": "{not json"}"#)
        .await;
    assert_eq!(next_text(&mut ws).await, "{not json");
    mock.post_ok("/api/hosts/web-3/send", r#"{"binary": "bin"}"#)
        .await;
    assert_eq!(next_frame(&mut ws).await, Message::binary(b"bin".to_vec()));

    mock.post_ok(
        "/api/hosts/web-3/disconnect",
        r#"{"code": 1011, "reason": "server exploded"}"#,
    )
    .await;
    let close = next_close(&mut ws).await;
    assert_eq!(close.code, CloseCode::Error);
    assert_eq!(u16::from(close.code), 1011);
    assert_eq!(close.reason.as_str(), "server exploded");
    // Finish the handshake: the client's echo goes out, then the stream ends.
    while let Some(Ok(_)) = ws.next().await {}

    let conns = mock
        .wait_for("/api/hosts/web-3/connections", "the close", |v| {
            v[0]["closed_at"].is_u64()
        })
        .await;
    assert_eq!(conns[0]["closed_by"], "dashboard");
    assert_eq!(conns[0]["sent_close_code"], 1011);
    assert_eq!(conns[0]["sent_close_reason"], "server exploded");
    assert_eq!(conns[0]["close_code"], 1011, "the client echoes the code");
    let host = mock.host("web-3").await;
    assert_eq!(host["connected"], false);
    assert_eq!(host["online"], false);
    let (status, v) = mock
        .post("/api/hosts/web-3/command", r#"{"command": "switch"}"#)
        .await;
    assert_eq!(status, 409, "{v}");
}

#[tokio::test]
async fn disconnect_abort_drops_the_connection() {
    let mock = Mock::start(&[]).await;
    let mut ws = mock.agent("web-abort", 30).await;
    mock.post_ok("/api/hosts/web-abort/disconnect", r#"{"abort": true}"#)
        .await;
    // No close frame: the stream just ends (or errors).
    let end = tokio::time::timeout(DEADLINE, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return None,
                Some(Ok(Message::Close(frame))) => return Some(frame),
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("the connection was not dropped");
    assert_eq!(end, None);
    let conns = mock
        .wait_for("/api/hosts/web-abort/connections", "the drop", |v| {
            v[0]["closed_at"].is_u64()
        })
        .await;
    assert_eq!(conns[0]["closed_by"], "dashboard");
    assert_eq!(conns[0]["sent_close_code"], Value::Null);
}

#[tokio::test]
async fn api_errors() {
    let mock = Mock::start(&[]).await;
    let endpoints = ["command", "kill", "send", "disconnect"];
    for ep in endpoints {
        let (status, v) = mock
            .post(&format!("/api/hosts/nobody/{ep}"), r#"{"command": "x"}"#)
            .await;
        assert_eq!(status, 404, "{ep}: {v}");
        assert!(v["error"].as_str().unwrap().contains("nobody"), "{v}");
    }
    let mut ws = mock.agent("web-4", 30).await;
    let bad_bodies: &[(&str, &str)] = &[
        ("command", "{"),
        ("command", ""),
        ("command", "[]"),
        ("command", r#"{"command": 5}"#),
        ("command", r#"{"cmd": "switch"}"#),
        ("kill", r#"{"pid": "x"}"#),
        ("kill", r#"{"signal": 9}"#),
        ("kill", "nope"),
        ("send", ""),
        ("send", "{\"raw\": "),
        ("disconnect", r#"{"code": 999}"#),
        ("disconnect", r#"{"code": 1005}"#),
        ("disconnect", r#"{"code": "1000"}"#),
        ("disconnect", r#"{"code": 70000}"#),
        (
            "disconnect",
            &format!(r#"{{"reason": "{}"}}"#, "x".repeat(124)),
        ),
    ];
    for (ep, body) in bad_bodies {
        let (status, v) = mock.post(&format!("/api/hosts/web-4/{ep}"), body).await;
        assert_eq!(status, 400, "{ep} {body:?}: {v}");
        assert!(v["error"].is_string(), "{v}");
    }
    // None of that reached the agent, and the connection is still up.
    mock.post_ok("/api/hosts/web-4/command", r#"{"command": "pull"}"#)
        .await;
    assert_eq!(next_json(&mut ws).await["payload"]["command"], "pull");

    ws.close(None).await.unwrap();
    mock.wait_for("/api/hosts/web-4", "disconnected", |v| {
        v["connected"] == false
    })
    .await;
    for ep in endpoints {
        let (status, v) = mock
            .post(&format!("/api/hosts/web-4/{ep}"), r#"{"command": "x"}"#)
            .await;
        assert_eq!(status, 409, "{ep}: {v}");
    }
}

#[tokio::test]
async fn a_duplicate_hostname_closes_the_older_connection() {
    let mock = Mock::start(&[]).await;
    let mut old = mock.agent("dup", 30).await;
    let mut new = mock.agent("dup", 30).await;
    let close = next_close(&mut old).await;
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "duplicate host");

    // Commands now go to the newer connection.
    mock.post_ok("/api/hosts/dup/command", r#"{"command": "boot"}"#)
        .await;
    assert_eq!(next_json(&mut new).await["payload"]["command"], "boot");

    let host = mock.host("dup").await;
    assert_eq!(host["connections"], 2);
    assert_eq!(host["connected"], true);
    assert_eq!(host["online"], true);
    let conns = mock
        .wait_for("/api/hosts/dup/connections", "the old one closed", |v| {
            v[0]["closed_at"].is_u64()
        })
        .await;
    assert_eq!(conns[0]["sent_close_code"], 1008);
    assert_eq!(conns[0]["closed_by"], "dashboard");
    assert_eq!(conns[1]["open"], true);
    assert_eq!(conns[1]["live"], true);
    assert_eq!(host["live_connection"], conns[1]["id"]);
}

#[tokio::test]
async fn the_agents_close_frame_is_recorded() {
    let mock = Mock::start(&[]).await;
    let mut ws = mock.agent("web-5", 30).await;
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "shutdown".into(),
    }))
    .await
    .unwrap();
    // The mock answers the close.
    let reply = next_close(&mut ws).await;
    assert_eq!(reply.code, CloseCode::Normal);
    let conns = mock
        .wait_for("/api/hosts/web-5/connections", "the close", |v| {
            v[0]["closed_at"].is_u64()
        })
        .await;
    assert_eq!(conns[0]["close_code"], 1000);
    assert_eq!(conns[0]["close_reason"], "shutdown");
    assert_eq!(conns[0]["closed_by"], "agent");
    assert_eq!(conns[0]["sent_close_code"], Value::Null);
    assert_eq!(conns[0]["error"], Value::Null);
    assert_eq!(conns[0]["host"], "web-5");
    assert_eq!(conns[0]["frames"], 1);
    let host = mock.host("web-5").await;
    assert_eq!(host["connected"], false);
    assert_eq!(host["online"], false);
}

#[tokio::test]
async fn the_record_file_has_every_frame_and_event() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("record.jsonl");
    let mock = Mock::start(&["--record", path.to_str().unwrap()]).await;
    let mut ws = mock.connect(Some(TOKEN)).await.unwrap();
    ws.send(Message::text("before register")).await.unwrap();
    send(&mut ws, &register("rec-1", 30)).await;
    next_json(&mut ws).await;
    let hb = heartbeat("abc");
    send(&mut ws, &hb).await;
    ws.send(Message::text("{broken")).await.unwrap();
    ws.send(Message::text(
        "{\n  \"type\": \"multi\",\n  \"payload\": 1\n}",
    ))
    .await
    .unwrap();
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "shutdown".into(),
    }))
    .await
    .unwrap();

    let start = Instant::now();
    let lines: Vec<Value> = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.contains("\"event\":\"close\"") {
            break text.lines().map(parse).collect();
        }
        assert!(start.elapsed() < DEADLINE, "no close event in {text:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(lines.len(), 7, "{lines:#?}");
    let conn = lines[0]["conn"].clone();
    assert!(lines.iter().all(|l| l["conn"] == conn && l["t"].is_u64()));
    assert_eq!(lines[0]["event"], "open");
    assert_eq!(lines[0]["host"], "");
    assert_eq!(lines[1]["host"], "");
    assert_eq!(lines[1]["frame"], json!({"_raw": "before register"}));
    assert_eq!(lines[2]["host"], "rec-1");
    assert_eq!(lines[2]["frame"], register("rec-1", 30));
    assert_eq!(lines[3]["frame"], hb);
    assert_eq!(lines[4]["frame"], json!({"_raw": "{broken"}));
    assert_eq!(lines[5]["frame"], json!({"type": "multi", "payload": 1}));
    assert_eq!(lines[6]["event"], "close");
    assert_eq!(lines[6]["host"], "rec-1");
    assert_eq!(lines[6]["code"], 1000);
    assert_eq!(lines[6]["reason"], "shutdown");
    assert_eq!(lines[6]["closed_by"], "agent");
}

#[tokio::test]
async fn a_host_goes_offline_after_three_missed_intervals() {
    let mock = Mock::start(&[]).await;
    let registered = Instant::now();
    let mut ws = mock.agent("slow", 1).await;
    assert_eq!(mock.host("slow").await["online"], true);
    let host = mock
        .wait_for("/api/hosts/slow", "offline", |v| v["online"] == false)
        .await;
    let elapsed = registered.elapsed();
    assert!(
        elapsed >= Duration::from_millis(2900),
        "offline after only {elapsed:?}"
    );
    assert_eq!(host["connected"], true, "still connected, just silent");

    send(&mut ws, &heartbeat("abc")).await;
    mock.wait_for("/api/hosts/slow", "online again", |v| v["online"] == true)
        .await;
}

#[tokio::test]
async fn malformed_frames_are_stored_and_the_connection_stays_up() {
    let mock = Mock::start(&[]).await;
    let mut ws = mock.connect(Some(TOKEN)).await.unwrap();
    ws.send(Message::text("hello?")).await.unwrap();
    let early = mock.wait_messages("(unregistered)", 1).await;
    assert_eq!(early["messages"][0]["type"], "_malformed");
    assert_eq!(early["messages"][0]["raw"], "hello?");
    // A register without a hostname is stored but not answered.
    send(
        &mut ws,
        &json!({"type": "register", "payload": {"hostname": 7}}),
    )
    .await;
    mock.wait_messages("(unregistered)", 2).await;
    assert_eq!(mock.get("/api/hosts").await, (200, json!([])));

    send(&mut ws, &register("messy", 30)).await;
    assert_eq!(next_json(&mut ws).await["type"], "registered");
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let frames = [
        "not json",
        "[1, 2]",
        "\"register\"",
        r#"{"payload": {}}"#,
        r#"{"type": 5}"#,
        r#"{"type": "output", "payload": {"line": "x"}} trailing"#,
        "",
        &deep,
    ];
    for f in frames {
        ws.send(Message::text(f)).await.unwrap();
    }
    ws.send(Message::binary(vec![0xff, 0x00, b'a']))
        .await
        .unwrap();
    let unknown = json!({"type": "who_knows", "payload": [1]});
    send(&mut ws, &unknown).await;
    send(&mut ws, &json!({"type": "no_payload"})).await;
    send(&mut ws, &heartbeat("z")).await;

    let all = mock.wait_messages("messy", 13).await;
    let msgs = all["messages"].as_array().unwrap();
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(msgs[1 + i]["type"], "_malformed", "{i}");
        assert_eq!(msgs[1 + i]["raw"], *f, "{i}");
        assert_eq!(msgs[1 + i]["payload"], Value::Null);
    }
    assert_eq!(msgs[9]["type"], "_binary");
    assert_eq!(msgs[9]["raw"], "\u{fffd}\u{0}a");
    assert_eq!(msgs[10]["type"], "who_knows");
    assert_eq!(msgs[10]["payload"], json!([1]));
    assert_eq!(msgs[11]["type"], "no_payload");
    assert_eq!(msgs[11]["payload"], Value::Null);
    assert!(msgs[11].get("raw").is_none());
    assert_eq!(msgs[12]["type"], "heartbeat");
    let malformed = mock.messages("messy", "?type=_malformed").await;
    assert_eq!(
        malformed["messages"].as_array().unwrap().len(),
        frames.len()
    );

    // Still connected and usable.
    let host = mock.host("messy").await;
    assert_eq!(host["online"], true);
    assert_eq!(host["last_heartbeat"], heartbeat("z")["payload"]);
    mock.post_ok("/api/hosts/messy/command", r#"{"command": "test"}"#)
        .await;
    assert_eq!(next_json(&mut ws).await["payload"]["command"], "test");
}

#[tokio::test]
async fn big_frames_and_floods_are_stored_in_order() {
    let mock = Mock::start(&[]).await;
    let mut ws = mock.agent("flood", 30).await;
    let big_line = "x".repeat(3 * 1024 * 1024);
    send(&mut ws, &output(&big_line)).await;
    const N: usize = 20_000;
    for i in 0..N {
        ws.feed(Message::text(output(&format!("{i}")).to_string()))
            .await
            .unwrap();
    }
    ws.flush().await.unwrap();
    mock.wait_messages("flood", 2 + N as u64).await;

    let big = mock.messages("flood", "?since=1&limit=1").await;
    assert_eq!(
        big["messages"][0]["payload"]["line"]
            .as_str()
            .unwrap()
            .len(),
        big_line.len()
    );
    assert_eq!(big["next"], 2);
    let rest = mock.messages("flood", "?since=2&type=output").await;
    let msgs = rest["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), N);
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m["payload"]["line"], i.to_string());
        assert_eq!(m["index"], 2 + i as u64);
    }
    assert_eq!(mock.host("flood").await["online"], true);
}

#[tokio::test]
async fn the_message_cap_evicts_the_oldest() {
    let mock = Mock::start(&["--max-messages-per-host", "5"]).await;
    let mut ws = mock.agent("capped", 30).await;
    for i in 0..10 {
        send(&mut ws, &output(&i.to_string())).await;
    }
    let all = mock.wait_messages("capped", 11).await;
    assert_eq!(all["evicted"], 6);
    let lines: Vec<&str> = all["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["payload"]["line"].as_str().unwrap())
        .collect();
    assert_eq!(lines, ["5", "6", "7", "8", "9"]);
    assert_eq!(all["messages"][0]["index"], 6);
    let host = mock.host("capped").await;
    assert_eq!(host["messages"], 11);
    assert_eq!(host["evicted"], 6);
    // The register payload survives eviction.
    assert_eq!(host["register"]["hostname"], "capped");
}

#[tokio::test]
async fn sigterm_closes_agents_with_1001_and_exits_0() {
    let mut mock = Mock::start(&[]).await;
    // A refused attempt with a wrong token, to check it is not logged.
    assert!(mock.connect(Some("wrong-secret-xyz")).await.is_err());
    let mut ws = mock.agent("bye", 30).await;
    mock.sigterm();
    let close = next_close(&mut ws).await;
    assert_eq!(u16::from(close.code), 1001);
    while let Some(Ok(_)) = ws.next().await {}
    let (status, stderr) = mock.wait_exit().await;
    assert!(
        status.success(),
        "exit status {status:?}; stderr:\n{stderr}"
    );
    assert!(stderr.contains("registered"), "{stderr}");
    assert!(!stderr.contains(TOKEN), "the token was logged:\n{stderr}");
    assert!(
        !stderr.contains("wrong-secret-xyz"),
        "a token was logged:\n{stderr}"
    );
}

#[tokio::test]
async fn token_file_is_trimmed_and_a_token_is_required() {
    let output = Command::new(env!("CARGO_BIN_EXE_nixfleet-mock-dashboard"))
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--token"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, " \n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_nixfleet-mock-dashboard"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            empty.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    // The message names the file to fix.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(empty.to_str().unwrap()), "{stderr}");

    let file = dir.path().join("token");
    std::fs::write(&file, format!("  {TOKEN}\n")).unwrap();
    let mock = Mock::start(&["--token-file", file.to_str().unwrap()]).await;
    let mut ws = mock.agent("file-token", 30).await;
    send(&mut ws, &heartbeat("x")).await;
    mock.wait_messages("file-token", 2).await;
}

/// Throughput check, not run by default (meaningful only in an optimised
/// build): `cargo test --test mock_dashboard -- --ignored --nocapture
/// flood_throughput`. Set `FLOOD_RECORD=1` to include `--record`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn flood_throughput() {
    let n: u64 = std::env::var("FLOOD_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.jsonl");
    let mut args = Vec::new();
    if std::env::var_os("FLOOD_RECORD").is_some() {
        args.extend(["--record", record.to_str().unwrap()]);
    }
    let mock = Mock::start(&args).await;
    let mut ws = mock.agent("flood", 30).await;
    let frames: Vec<String> = (0..1000)
        .map(|i| output(&format!("build step {i:06} done")).to_string())
        .collect();
    let start = Instant::now();
    for i in 0..n {
        ws.feed(Message::text(frames[(i % 1000) as usize].as_str()))
            .await
            .unwrap();
    }
    ws.flush().await.unwrap();
    let sent = start.elapsed();
    let mut slowest_health = Duration::ZERO;
    loop {
        let t = Instant::now();
        let (status, v) = mock.get("/api/hosts/flood").await;
        slowest_health = slowest_health.max(t.elapsed());
        assert_eq!(status, 200);
        if v["messages"] == n + 1 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "{v}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let total = start.elapsed();
    let pid = mock.child.id().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let peak = status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .unwrap_or("");
    eprintln!(
        "{n} frames: client sent in {sent:?}, mock stored all after {total:?} = {:.0} frames/s; \
         slowest GET during the flood {slowest_health:?}; mock {peak}",
        n as f64 / total.as_secs_f64()
    );
}

#[tokio::test]
async fn a_frame_over_the_limit_ends_only_that_connection() {
    let mock = Mock::start(&[]).await;
    let mut other = mock.agent("bystander", 30).await;
    let mut ws = mock.agent("huge", 30).await;
    let huge = output(&"y".repeat(17 * 1024 * 1024)).to_string();
    // The mock may drop the connection while the frame is still going out.
    let _ = ws.send(Message::text(huge)).await;
    let conns = mock
        .wait_for("/api/hosts/huge/connections", "the drop", |v| {
            v[0]["closed_at"].is_u64()
        })
        .await;
    assert!(conns[0]["error"].is_string(), "{conns}");
    assert_eq!(mock.host("huge").await["connected"], false);
    assert_eq!(mock.get("/health").await.0, 200);
    mock.post_ok("/api/hosts/bystander/command", r#"{"command": "pull"}"#)
        .await;
    assert_eq!(next_json(&mut other).await["payload"]["command"], "pull");
}

// ---------------------------------------------------------------------------
// The web page and its live feed (`GET /events`, Server-Sent Events)

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

fn status_frame(command: &str, status: &str, exit_code: i64) -> Value {
    json!({"type": "status", "payload": {"status": status, "command": command,
        "exit_code": exit_code, "message": "", "generation": "abc1234"}})
}

#[tokio::test]
async fn the_page_and_its_script_and_stylesheet_are_served() {
    let mock = Mock::start(&[]).await;
    for (path, kind, needle) in [
        ("/", "text/html", "<script src=\"/page.js\""),
        ("/page.js", "text/javascript", "new EventSource("),
        ("/page.css", "text/css", ".output"),
    ] {
        let (status, body) = http_raw(&mock.addr, "GET", path, &[], None).await;
        assert_eq!(status, 200, "{path}");
        assert!(body.contains(needle), "{path}: {body:.200}");
        let head = raw_head(&mock.addr, path).await;
        assert!(head.contains(&format!("content-type: {kind}")), "{head}");
        assert!(
            head.contains("content-security-policy: default-src 'none'; script-src 'self'"),
            "{head}"
        );
    }
    let (status, list) = http(&mock.addr, "GET", "/api", None).await;
    assert_eq!(status, 200);
    assert!(list.contains("/api/hosts/{host}/messages"), "{list}");
}

async fn raw_head(addr: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).to_lowercase();
    text.split("\r\n\r\n").next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn the_event_feed_pushes_hosts_timeline_and_messages() {
    let mock = Mock::start(&[]).await;
    let mut list = SseClient::connect(&mock.addr, "/events").await;
    let empty = list.wait("hosts", |_| true).await;
    assert_eq!(empty["hosts"], json!([]));
    assert!(empty["now"].as_u64().unwrap() > 0);

    let mut ws = mock.agent("live", 30).await;
    let hosts = list
        .wait("hosts_changed", |d| d["hosts"][0]["hostname"] == "live")
        .await;
    assert_eq!(hosts["hosts"][0]["online"], true);
    send(&mut ws, &heartbeat("abc1234")).await;
    let beat = list
        .wait("hosts_changed", |d| {
            !d["hosts"][0]["last_heartbeat"].is_null()
        })
        .await;
    assert_eq!(beat["hosts"][0]["view"]["metrics"][0][1], 1.5);

    // The host's own feed: output and status in order, the timeline with
    // the command sent, its status and how long it took.
    let mut view = SseClient::connect(&mock.addr, "/events?host=live").await;
    view.wait("timeline", |d| d["events"][0]["kind"] == "registered")
        .await;
    mock.post_ok("/api/hosts/live/command", r#"{"command": "switch"}"#)
        .await;
    assert_eq!(next_json(&mut ws).await["payload"]["command"], "switch");
    send(&mut ws, &output("first line")).await;
    send(&mut ws, &output("second line")).await;
    send(&mut ws, &status_frame("switch", "ok", 0)).await;
    // Read both kinds of event as they come, until the messages and a
    // timeline with the status are in.
    let mut seen = Vec::new();
    let mut timeline = Value::Null;
    let has_status = |t: &Value| {
        t["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["kind"] == "status"))
    };
    tokio::time::timeout(DEADLINE, async {
        while seen.len() < 3 || !has_status(&timeline) {
            match view.next().await {
                (name, batch) if name == "messages" => {
                    for m in batch.as_array().unwrap() {
                        if m["type"] != "register" {
                            seen.push((
                                m["type"].as_str().unwrap().to_owned(),
                                m["payload"]["line"].clone(),
                            ));
                        }
                    }
                }
                (name, data) if name == "timeline" => timeline = data,
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out: messages {seen:?}, timeline {timeline}"));
    assert_eq!(
        seen,
        [
            ("output".to_owned(), json!("first line")),
            ("output".to_owned(), json!("second line")),
            ("status".to_owned(), Value::Null),
        ]
    );
    let kinds: Vec<&str> = timeline["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["registered", "sent", "status"]);
    let status = &timeline["events"][2];
    assert_eq!(status["exit_code"], 0);
    assert!(status["duration_ms"].as_u64().is_some(), "{status}");

    // A rejection and a closed connection reach the timeline too.
    send(
        &mut ws,
        &json!({"type": "command_rejected", "payload": {"reason": "command already running",
            "current_command": "switch", "current_pid": 42}}),
    )
    .await;
    view.wait("timeline", |d| d["events"][3]["kind"] == "rejected")
        .await;
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "shutdown".into(),
    }))
    .await
    .unwrap();
    assert_eq!(next_close(&mut ws).await.code, CloseCode::Normal);
    let closed = view
        .wait("timeline", |d| d["events"][4]["kind"] == "closed")
        .await;
    assert_eq!(closed["events"][4]["close_code"], 1000);
    assert_eq!(closed["events"][4]["closed_by"], "agent");
    list.wait("hosts_changed", |d| d["hosts"][0]["online"] == false)
        .await;
}

/// A browser that stops reading during a 300,000-line flood: the agent's
/// frames are still read and stored at full speed, the mock's memory stays
/// bounded (the store is capped here, so only the feed could grow it), and
/// when the browser reads again it is told how many lines it missed and
/// catches up with the newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_that_stops_reading_holds_up_neither_the_agent_nor_memory() {
    const LINES: u64 = 300_000;
    // The store keeps 40,000 messages: more than the feed lets a browser
    // fall behind (20,000), so both ways of missing lines are exercised.
    let mock = Mock::start(&["--max-messages-per-host", "40000"]).await;
    let mut ws = mock.agent("flood", 30).await;
    let mut browser = SseClient::connect(&mock.addr, "/events?host=flood").await;
    browser.wait("timeline", |_| true).await;
    let pid = mock.child.id().unwrap();
    let rss_before = proc_status_kib(pid, "VmRSS:");

    let start = Instant::now();
    let padding = "x".repeat(128);
    for i in 0..LINES {
        ws.feed(Message::text(
            output(&format!("line {i} {padding}")).to_string(),
        ))
        .await
        .unwrap();
    }
    send(&mut ws, &status_frame("switch", "ok", 0)).await;
    mock.wait_messages("flood", LINES + 2).await;
    let stored_in = start.elapsed();
    let rss_after = proc_status_kib(pid, "VmRSS:");
    let hwm = proc_status_kib(pid, "VmHWM:");
    eprintln!(
        "flood of {LINES} lines stored in {stored_in:?} with a stalled browser; \
         mock RSS {rss_before} KiB before, {rss_after} KiB after, peak {hwm} KiB"
    );
    // Generous for a debug build on a loaded machine; what matters is that
    // nothing waited for the browser.
    assert!(
        stored_in < Duration::from_secs(20),
        "stored in {stored_in:?}"
    );
    // The capped store holds 40,000 frames (about 12 MB); the whole flood
    // is about 70 MB of frames, which a feed buffering for the browser
    // would hold.
    assert!(
        rss_after < rss_before + 40 * 1024,
        "the mock grew from {rss_before} to {rss_after} KiB"
    );

    // Reading again: a skip notice, then the newest lines and the status.
    let mut skipped_lines = 0;
    let mut skipped_messages = 0;
    let mut delivered = 0;
    let mut last_line = Value::Null;
    loop {
        let (name, data) = browser.next().await;
        match name.as_str() {
            "skipped" => {
                skipped_lines += data["lines"].as_u64().unwrap();
                skipped_messages += data["messages"].as_u64().unwrap();
            }
            "messages" => {
                let batch = data.as_array().unwrap();
                delivered += batch.iter().filter(|m| m["type"] == "output").count() as u64;
                if let Some(line) = batch.iter().rev().find(|m| m["type"] == "output") {
                    last_line = line["payload"]["line"].clone();
                }
                if batch.iter().any(|m| m["type"] == "status") {
                    break;
                }
            }
            _ => {}
        }
    }
    eprintln!(
        "browser: {delivered} lines delivered, {skipped_lines} skipped, {skipped_messages} evicted before it read"
    );
    assert!(skipped_lines > 0 && skipped_messages > 0, "no skip notice");
    assert!(delivered + skipped_lines + skipped_messages >= LINES);
    assert_eq!(last_line, json!(format!("line {} {padding}", LINES - 1)));
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// An open page must not hold up a graceful shutdown: its event stream
/// ends right away (the HTTP server would otherwise wait for it, then give
/// up after 2 s).
#[tokio::test]
async fn sigterm_ends_open_event_streams() {
    let mut mock = Mock::start(&[]).await;
    let mut page = SseClient::connect(&mock.addr, "/events").await;
    page.wait("hosts", |_| true).await;
    let start = Instant::now();
    mock.sigterm();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(DEADLINE, page.stream.read(&mut chunk))
            .await
            .expect("the event stream stayed open")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
    }
    let (status, _) = mock.wait_exit().await;
    assert!(status.success());
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "shutdown with an open page took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn v3_a_switch_waits_for_a_new_register_and_times_out_without_one() {
    let mock = Mock::start(&["--reconnect-timeout", "1"]).await;
    let mut ws = mock.agent("web-7", 30).await;
    for command in [
        "switch",
        "restart",
        "reboot",
        "check-version",
        "refresh-all",
        "force-update",
        "kill",
    ] {
        mock.post_ok(
            "/api/hosts/web-7/command",
            &json!({ "command": command }).to_string(),
        )
        .await;
        assert_eq!(next_json(&mut ws).await["payload"]["command"], command);
    }
    // `kill` marks the running command instead of becoming one.
    let commands = mock.get_ok("/api/hosts/web-7/commands").await;
    assert_eq!(commands.as_array().unwrap().len(), 6);
    assert_eq!(commands[5]["kill_requested"], true);

    // The switch: ok, then no new register within the timeout.
    send(
        &mut ws,
        &json!({"type": "status", "payload": {"status": "ok", "command": "switch",
            "exit_code": 0, "message": "", "generation": "abc1234"}}),
    )
    .await;
    let commands = mock
        .wait_for("/api/hosts/web-7/commands", "the reconnect timeout", |v| {
            v[0]["state"] == "timeout"
        })
        .await;
    assert_eq!(commands[0]["error"], "Agent did not reconnect in time");

    // check-version: warning, completed by the next heartbeat.
    send(
        &mut ws,
        &json!({"type": "status", "payload": {"status": "warning", "command": "check-version",
            "exit_code": 0, "message": "restart to run it", "generation": "abc1234"}}),
    )
    .await;
    mock.wait_for("/api/hosts/web-7/commands", "awaiting the heartbeat", |v| {
        v[3]["state"] == "awaiting_heartbeat"
    })
    .await;
    send(&mut ws, &heartbeat("abc1234")).await;
    mock.wait_for("/api/hosts/web-7/commands", "completed", |v| {
        v[3]["state"] == "ok"
    })
    .await;
    // A refused reboot is recorded as rejected.
    send(
        &mut ws,
        &json!({"type": "command_rejected", "payload": {"reason": "reboot is not allowed",
            "current_command": "", "current_pid": 0}}),
    )
    .await;
    let commands = mock
        .wait_for("/api/hosts/web-7/commands", "rejected", |v| {
            v.as_array()
                .unwrap()
                .iter()
                .any(|c| c["state"] == "rejected")
        })
        .await;
    let rejected: Vec<&Value> = commands
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["state"] == "rejected")
        .collect();
    assert_eq!(
        rejected[0]["error"],
        "Agent rejected command: reboot is not allowed"
    );
}

#[tokio::test]
async fn v3_a_switch_completes_when_the_agent_registers_again() {
    let mock = Mock::start(&["--reconnect-timeout", "30"]).await;
    let mut ws = mock.agent("web-8", 30).await;
    mock.post_ok("/api/hosts/web-8/command", r#"{"command": "pull-switch"}"#)
        .await;
    next_json(&mut ws).await;
    send(
        &mut ws,
        &json!({"type": "status", "payload": {"status": "ok", "command": "pull-switch",
            "exit_code": 0, "message": "", "generation": "abc1234"}}),
    )
    .await;
    mock.wait_for("/api/hosts/web-8", "awaiting the reconnect", |v| {
        v["command"]["state"] == "awaiting_reconnect"
    })
    .await;
    // A heartbeat does not complete a switch.
    send(&mut ws, &heartbeat("abc1234")).await;
    let _again = mock.agent("web-8", 30).await;
    let host = mock
        .wait_for("/api/hosts/web-8", "the switch complete", |v| {
            v["command"]["state"] == "ok"
        })
        .await;
    assert_eq!(host["command"]["command"], "pull-switch");
}

#[tokio::test]
async fn v3_fields_progress_and_compartments_are_shown() {
    let mock = Mock::start(&[]).await;
    let mut ws = mock.connect(Some(TOKEN)).await.unwrap();
    let mut reg = register("web-9", 30);
    reg["payload"]["theme_color"] = json!("#7aa2f7");
    reg["payload"]["location"] = json!("cloud");
    reg["payload"]["device_type"] = json!("server");
    reg["payload"]["source_commit"] = json!("c0ffee");
    send(&mut ws, &reg).await;
    next_json(&mut ws).await;
    let mut beat = heartbeat("abc1234");
    beat["payload"]["lock_hash"] = json!("ab".repeat(32));
    beat["payload"]["update_status"] = json!({
        "git": {"status": "ok", "message": "", "checked_at": ""},
        "lock": {"status": "outdated", "message": "Updated 9 days ago", "checked_at": ""},
        "system": {"status": "working", "message": "switch in progress", "checked_at": ""},
        "tests": {"status": "unknown", "message": "", "checked_at": ""}});
    send(&mut ws, &beat).await;
    for progress in [
        json!({"pull": {"current": 1, "total": 3, "status": "in_progress"}}),
        json!({"pull": {"current": 3, "total": 3, "status": "complete"}}),
        json!({"system": {"current": 2, "total": 9, "status": "in_progress"}}),
    ] {
        send(
            &mut ws,
            &json!({"type": "operation_progress", "payload": {"progress": progress}}),
        )
        .await;
    }
    let host = mock
        .wait_for("/api/hosts/web-9", "the progress", |v| {
            v["progress"]["system"]["current"] == 2
        })
        .await;
    assert_eq!(host["progress"]["pull"]["status"], "complete");
    assert_eq!(host["theme_color"], "#7aa2f7");
    assert_eq!(host["location"], "cloud");
    assert_eq!(host["device_type"], "server");
    assert_eq!(host["source_commit"], "c0ffee");
    assert_eq!(host["lock_hash"], "ab".repeat(32));
    assert_eq!(host["update_status"]["lock"]["status"], "outdated");
    assert_eq!(host["update_status"]["system"]["status"], "working");
    // A new command starts with fresh progress.
    mock.post_ok("/api/hosts/web-9/command", r#"{"command": "test"}"#)
        .await;
    assert_eq!(mock.host("web-9").await["progress"], json!({}));
    let types = types(&mock.messages("web-9", "?type=operation_progress").await);
    assert_eq!(types.len(), 3);
}

#[tokio::test]
async fn the_log_names_the_command_sent() {
    let mut mock = Mock::start(&[]).await;
    let mut ws = mock.agent("web-log", 30).await;
    mock.post_ok(
        "/api/hosts/web-log/command",
        r#"{"command": "pull-switch"}"#,
    )
    .await;
    next_json(&mut ws).await;
    mock.sigterm();
    let (_, stderr) = mock.wait_exit().await;
    assert!(
        stderr.contains("API: sent command \"pull-switch\""),
        "{stderr}"
    );
}
