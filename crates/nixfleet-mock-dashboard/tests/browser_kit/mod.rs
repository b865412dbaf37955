//! What the browser tests share (`browser.rs`, `browser_fleet.rs`): Debian's
//! headless Chromium driven over the Chrome DevTools Protocol, the mock
//! dashboard and the agent binary beside it, and `git` for seed
//! repositories.
//!
//! Why the DevTools protocol and not WebDriver: it needs no new crate (the
//! protocol is JSON over the WebSocket client these tests already use), no
//! chromedriver process whose version must match the browser's, and it
//! clicks with real input events. Every wait is a DOM condition polled
//! against a deadline.

// Each test binary uses its own part of the kit.
#![allow(dead_code)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[path = "../agent_kit/mod.rs"]
mod agent_kit;
pub use agent_kit::{agent_binary, write_agent_config};

// The agent's tests set up repositories with the same git.
#[allow(dead_code)] // proc_status_kib: the browser tests do not use it
#[path = "../../../nixfleet-agent/tests/common/host_tools.rs"]
mod host_tools;
pub use host_tools::git;

pub const DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Chromium over the DevTools protocol

/// The browser to test with, or `None` after printing why the test is
/// skipped. Without one the test fails instead under `CI=true`.
pub fn chromium_or_skip(test: &str) -> Option<PathBuf> {
    let found = find_chromium();
    if found.is_none() {
        let message = "no chromium on PATH (apt-get install chromium, or set NIXFLEET_CHROMIUM)";
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{message}: CI=true needs the browser tests"
        );
        eprintln!("SKIPPED {test}: {message}");
    }
    found
}

pub fn find_chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("NIXFLEET_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|p| p.is_file())
}

/// The browser process (in its own process group, ended as a whole).
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    session: String,
    meter: Option<StreamMeter>,
}

/// What the page's event streams (`EventSource`) received, from the
/// DevTools Network events: counted only after
/// [`Browser::meter_event_streams`], and only while a call waits for its
/// reply (Chromium's events queue up in the socket meanwhile).
#[derive(Default)]
pub struct StreamMeter {
    /// The Network domain's ids of the page's `EventSource` requests.
    sources: HashSet<String>,
    /// Bytes of those responses as they came off the connection
    /// (`encodedDataLength`: the SSE framing and HTTP chunking included).
    pub wire_bytes: u64,
    /// Each event's name and data, in order of arrival.
    pub events: Vec<(String, String)>,
}

impl StreamMeter {
    fn observe(&mut self, event: &Value) {
        let params = &event["params"];
        let id = params["requestId"].as_str().unwrap_or_default();
        match event["method"].as_str() {
            Some("Network.requestWillBeSent") if params["type"] == "EventSource" => {
                self.sources.insert(id.to_owned());
            }
            Some("Network.dataReceived") if self.sources.contains(id) => {
                self.wire_bytes += params["encodedDataLength"].as_u64().unwrap_or(0);
            }
            Some("Network.eventSourceMessageReceived") => {
                let name = params["eventName"].as_str().unwrap_or("message");
                let data = params["data"].as_str().unwrap_or_default();
                self.events.push((name.to_owned(), data.to_owned()));
            }
            _ => {}
        }
    }
}

impl Browser {
    pub async fn start(binary: &Path) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--window-size=1280,1280",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        // Chromium writes its DevTools port and path into the profile.
        let port_file = profile.path().join("DevToolsActivePort");
        let endpoint = wait_until("Chromium's DevToolsActivePort", || {
            let text = std::fs::read_to_string(&port_file).ok()?;
            let mut lines = text.lines();
            let port = lines.next()?.trim().parse::<u16>().ok()?;
            let path = lines.next()?.trim().to_owned();
            Some(format!("ws://127.0.0.1:{port}{path}"))
        })
        .await;
        let (ws, _) = tokio_tungstenite::connect_async(endpoint.as_str())
            .await
            .expect("connect to Chromium's DevTools endpoint");
        let mut browser = Browser {
            child,
            _profile: profile,
            ws,
            next_id: 0,
            session: String::new(),
            meter: None,
        };
        let target = browser
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = browser
            .call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        browser.session = attached["sessionId"].as_str().unwrap().to_owned();
        browser.call("Page.enable", json!({})).await;
        browser
    }

    /// Sends one command (to the page once attached) and returns its result.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut request = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            request["sessionId"] = json!(self.session);
        }
        self.ws
            .send(Message::Text(request.to_string().into()))
            .await
            .expect("send to Chromium");
        loop {
            let frame = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("Chromium did not answer {method}"))
                .expect("Chromium closed the DevTools connection")
                .expect("read from Chromium");
            let Message::Text(text) = frame else { continue };
            let reply: Value = serde_json::from_str(&text).unwrap();
            if reply["id"] != id {
                if let Some(meter) = &mut self.meter {
                    meter.observe(&reply);
                }
                continue; // an event
            }
            if let Some(error) = reply.get("error") {
                panic!("{method} failed: {error}");
            }
            return reply["result"].clone();
        }
    }

    /// Starts counting what the page's event streams receive (call before
    /// [`Browser::open`], so the stream's request is seen).
    pub async fn meter_event_streams(&mut self) {
        self.meter = Some(StreamMeter::default());
        self.call("Network.enable", json!({})).await;
    }

    /// What was counted since the last take (after a call that drains the
    /// events Chromium sent before its reply).
    pub async fn take_stream_meter(&mut self) -> StreamMeter {
        self.eval("0").await;
        let meter = self.meter.as_mut().expect("meter_event_streams first");
        StreamMeter {
            sources: meter.sources.clone(),
            wire_bytes: std::mem::take(&mut meter.wire_bytes),
            events: std::mem::take(&mut meter.events),
        }
    }

    pub async fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        self.wait("document.readyState === 'complete'", "the page loaded")
            .await;
    }

    /// Evaluates `expression` in the page and returns its value.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression}: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Polls `condition` (JavaScript) until it is truthy; returns its value.
    pub async fn wait(&mut self, condition: &str, what: &str) -> Value {
        let start = Instant::now();
        loop {
            let value = self.eval(condition).await;
            if !(value.is_null() || value == false || value == "" || value == 0) {
                return value;
            }
            if start.elapsed() > DEADLINE {
                let page = self.eval("document.querySelector('main').innerText").await;
                panic!("timed out waiting for {what} ({condition}); the page shows:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn text(&mut self, selector: &str) -> String {
        let js = format!(
            "(document.querySelector({}) || {{}}).textContent || ''",
            json!(selector)
        );
        self.eval(&js).await.as_str().unwrap_or_default().to_owned()
    }

    /// Clicks the centre of the element as a person would (mouse events).
    pub async fn click(&mut self, selector: &str) {
        let js = format!(
            "(() => {{ const e = document.querySelector({}); if (!e) return null; \
             e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
             return [r.x + r.width / 2, r.y + r.height / 2]; }})()",
            json!(selector)
        );
        let point = self.eval(&js).await;
        let (x, y) = (
            point[0]
                .as_f64()
                .unwrap_or_else(|| panic!("no {selector} to click")),
            point[1].as_f64().unwrap(),
        );
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            )
            .await;
        }
    }

    pub async fn screenshot(&mut self, path: &Path) {
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64_decode(shot["data"].as_str().expect("screenshot data"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            // The renderer and helper processes share the browser's group.
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

pub fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text
        .bytes()
        .filter(|&c| c != b'=' && !c.is_ascii_whitespace())
        .map(value)
        .collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let mut n = 0u32;
        for (i, d) in chunk.iter().enumerate() {
            n |= u32::from(*d) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

pub async fn wait_until<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// The mock dashboard and the agent

/// The mock dashboard on a free loopback port; returns it and its address.
pub async fn start_mock(token: &str) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nixfleet-mock-dashboard"))
        .args(["--listen", "127.0.0.1:0", "--token", token])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the mock dashboard");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    tokio::time::timeout(DEADLINE, out.read_line(&mut first))
        .await
        .expect("the mock printed its address")
        .unwrap();
    let addr = first
        .trim()
        .strip_prefix("listening on ")
        .expect("listening on …")
        .to_owned();
    (child, addr)
}
