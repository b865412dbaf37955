//! The mock's trust features with the real agent. Per-host tokens
//! (`--tokens FILE`): a host with its own token registers; our agent
//! presenting another host's token is refused at the upgrade (401: it
//! names its host in a header), a client that names it only in `register`
//! (v3's Go agent) at its `register` (close 1008); both are listed by
//! `/api/rejected`, said in the host's timeline, and never connected.
//! `wss://` (`--tls-cert`, `--tls-key`) and client certificates
//! (`--client-ca`).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

mod agent_kit;
mod pki;
use agent_kit::{agent_binary, write_agent_config};
use pki::{Api, TestCa};

const DEADLINE: Duration = Duration::from_secs(30);
const TOKENS: &str = "# host token\nhost-a token-of-a-5d1e\nhost-b token-of-b-93c0\n";

async fn start_mock(dir: &Path) -> (Child, String) {
    start_mock_with(dir, &[]).await
}

async fn start_mock_with(dir: &Path, extra: &[&std::ffi::OsStr]) -> (Child, String) {
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, TOKENS).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nixfleet-mock-dashboard"))
        .args(["--listen", "127.0.0.1:0", "--tokens"])
        .arg(&tokens)
        .args(extra)
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
        .unwrap()
        .to_owned();
    (child, addr)
}

fn start_agent(dir: &Path, addr: &str, hostname: &str, token: &str) -> Child {
    start_agent_with(dir, &format!("ws://{addr}/ws"), hostname, token, "")
}

fn start_agent_with(dir: &Path, url: &str, hostname: &str, token: &str, extra: &str) -> Child {
    use std::os::unix::fs::PermissionsExt;
    let (repo, state) = (dir.join("repo"), dir.join("state"));
    for d in [&repo, &state] {
        std::fs::create_dir_all(d).unwrap();
    }
    let token_file = dir.join("token");
    std::fs::write(&token_file, token).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = write_agent_config(
        dir,
        url,
        hostname,
        &token_file,
        &format!("interval = 1\nmetrics = \"proc\"\n{extra}"),
    );
    Command::new(agent_binary())
        .arg("--config")
        .arg(&config)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.stderr")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start the agent")
}

async fn get(addr: &str, path: &str) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    parse_response(&response)
}

fn parse_response(response: &str) -> (u16, Value) {
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Polls the API until `cond` holds for what `path` answers.
async fn wait_for(addr: &str, path: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let (status, body) = get(addr, path).await;
        if status == 200 && cond(&body) {
            return body;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out waiting for {what}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_host_with_its_own_token_registers() {
    let dir = tempfile::tempdir().unwrap();
    let (_mock, addr) = start_mock(dir.path()).await;
    let _agent = start_agent(dir.path(), &addr, "host-b", "token-of-b-93c0");
    let host = wait_for(&addr, "/api/hosts/host-b", "host-b connected", |h| {
        h["connected"] == true
    })
    .await;
    assert_eq!(host["hostname"], "host-b");
    let (_, rejected) = get(&addr, "/api/rejected").await;
    assert_eq!(rejected, Value::Array(Vec::new()));
}

#[tokio::test]
async fn our_agent_presenting_another_hosts_token_is_refused_at_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let (_mock, addr) = start_mock(dir.path()).await;
    // host-a with host-b's token.
    let _agent = start_agent(dir.path(), &addr, "host-a", "token-of-b-93c0");
    let rejected = wait_for(&addr, "/api/rejected", "a refusal", |r| {
        r.as_array().is_some_and(|list| !list.is_empty())
    })
    .await;
    assert_eq!(rejected[0]["reason"], "token of another host", "{rejected}");
    let stderr = dir.path().join("agent.stderr");
    let deadline = Instant::now() + DEADLINE;
    while !std::fs::read_to_string(&stderr)
        .unwrap_or_default()
        .contains("authentication failed (HTTP 401)")
    {
        assert!(Instant::now() < deadline, "the agent never heard 401");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // No WebSocket was ever opened: nothing unregistered, nothing of host-a.
    let (code, conns) = get(&addr, "/api/hosts/(unregistered)/connections").await;
    assert!(
        code == 404 || conns == Value::Array(Vec::new()),
        "{code} {conns}"
    );
    let (_, host) = get(&addr, "/api/hosts/host-a").await;
    assert_eq!(host["connected"], false, "{host}");
    assert_eq!(host["registered_at"], Value::Null, "{host}");
    let timeline = read_events_until(&addr, "/events?host=host-a", "\"kind\":\"refused\"").await;
    assert!(
        timeline.contains("presented the token of host-b"),
        "{timeline}"
    );
}

/// A client that names its host only in `register`, as v3's Go agent does.
#[tokio::test]
async fn a_register_with_another_hosts_token_is_refused_with_1008() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
    let dir = tempfile::tempdir().unwrap();
    let (_mock, addr) = start_mock(dir.path()).await;
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Authorization", "Bearer token-of-b-93c0".parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.status(), 101);
    let register = r#"{"type":"register","payload":{"hostname":"host-a","agent_version":"3.0.0","heartbeat_interval":30}}"#;
    ws.send(Message::text(register)).await.unwrap();
    let close = loop {
        match ws.next().await {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    let close = close.expect("a close frame with a code");
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "token of another host");
    let (_, rejected) = get(&addr, "/api/rejected").await;
    assert_eq!(rejected[0]["reason"], "token of another host", "{rejected}");
    let (_, host) = get(&addr, "/api/hosts/host-a").await;
    assert_eq!(host["registered_at"], Value::Null, "{host}");
}

/// Reads the page's event stream until `needle` shows up; returns it all.
async fn read_events_until(addr: &str, path: &str, needle: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let mut chunk = [0u8; 64 * 1024];
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("no {needle} in: {}", String::from_utf8_lossy(&seen)))
            .unwrap();
        assert!(
            n > 0,
            "the event stream ended: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn a_bad_tokens_file_is_a_usage_error_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "host-a secret-1\nhost-b\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_nixfleet-mock-dashboard"))
        .args(["--listen", "127.0.0.1:0", "--tokens"])
        .arg(&tokens)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("line 2: expected `hostname token`") && !stderr.contains("secret-1"),
        "{stderr}"
    );
}

/// The mock serving TLS with a certificate for `localhost` from `ca`
/// (`client_ca`: requiring client certificates from it too).
async fn start_tls_mock(dir: &Path, ca: &TestCa, client_ca: bool) -> (Child, String) {
    let (cert, key) = ca.server_pem("localhost");
    let (cert_file, key_file, ca_file) = (
        dir.join("mock.crt"),
        dir.join("mock.key"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let mut args = vec![
        "--tls-cert".as_ref(),
        cert_file.as_os_str(),
        "--tls-key".as_ref(),
        key_file.as_os_str(),
    ];
    if client_ca {
        args.extend(["--client-ca".as_ref(), ca_file.as_os_str()]);
    }
    start_mock_with(dir, &args).await
}

fn wss_url(addr: &str) -> String {
    let port = addr.rsplit_once(':').unwrap().1;
    format!("wss://localhost:{port}/ws")
}

#[tokio::test]
async fn an_agent_trusting_the_ca_registers_over_wss() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("mock CA");
    let (_mock, addr) = start_tls_mock(dir.path(), &ca, false).await;
    let agent_dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "ca_file = {:?}",
        dir.path().join("ca.pem").display().to_string()
    );
    let _agent = start_agent_with(
        agent_dir.path(),
        &wss_url(&addr),
        "host-a",
        "token-of-a-5d1e",
        &extra,
    );
    let api = Api::new(&ca, None);
    let host = api
        .wait_for(&addr, "/api/hosts/host-a", |h| h["connected"] == true)
        .await;
    assert_eq!(host["hostname"], "host-a");
}

#[tokio::test]
async fn with_client_ca_only_agents_with_a_certificate_from_it_register() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("mock CA");
    let (_mock, addr) = start_tls_mock(dir.path(), &ca, true).await;
    let ca_line = format!(
        "ca_file = {:?}\n",
        dir.path().join("ca.pem").display().to_string()
    );
    // host-a has a client certificate from the CA.
    let a_dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.client("host-a");
    let (cert_file, key_file) = (a_dir.path().join("a.crt"), a_dir.path().join("a.key"));
    std::fs::write(&cert_file, &cert).unwrap();
    std::fs::write(&key_file, &key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let a_extra = format!(
        "{ca_line}tls_client_cert = {:?}\ntls_client_key = {:?}",
        cert_file.display().to_string(),
        key_file.display().to_string()
    );
    let url = wss_url(&addr);
    let _a = start_agent_with(a_dir.path(), &url, "host-a", "token-of-a-5d1e", &a_extra);
    // host-b has the right token but no certificate.
    let b_dir = tempfile::tempdir().unwrap();
    let _b = start_agent_with(b_dir.path(), &url, "host-b", "token-of-b-93c0", &ca_line);
    let api = Api::new(&ca, Some(&ca.client("test-client")));
    api.wait_for(&addr, "/api/hosts/host-a", |h| h["connected"] == true)
        .await;
    let rejected = api
        .wait_for(&addr, "/api/rejected", |r| {
            r.as_array()
                .is_some_and(|l| l.iter().any(|e| e["reason"] == "TLS handshake failed"))
        })
        .await;
    let (status, _) = api.get(&addr, "/api/hosts/host-b").await;
    assert_eq!(status, 404, "host-b never registered: {rejected}");
}
