//! `wss://` with the real agent: a TLS front (tokio-rustls, ring) with a
//! throw-away CA made in the test, forwarding to the in-test dashboard.
//!
//! - with `ca_file` naming that CA the agent connects and registers;
//! - without it the agent refuses the certificate (UnknownIssuer), says so
//!   in its log, keeps retrying with TLS, and nothing ever reaches the
//!   dashboard: no fallback to anything insecure;
//! - a certificate for another name, or an expired one, is refused too.
//!
//! The agent runs with a cleared environment (see `Agent::spawn`), so
//! `SSL_CERT_FILE`/`SSL_CERT_DIR` cannot point at the test CA.

mod common;
#[path = "tls/memory.rs"]
mod memory;

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

#[allow(dead_code)] // shared with the mock's tests, which use other parts
#[path = "common/test_ca.rs"]
mod test_ca;

use test_ca::TestCa;

/// A server configuration that wants a client certificate from `clients`.
fn requiring_clients(
    clients: &TestCa,
    (chain, key): (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
) -> rustls::ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(clients.der()).unwrap();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .build()
            .unwrap();
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap()
}

/// Terminates TLS and forwards the plaintext to the in-test dashboard.
/// Records the outcome of every handshake.
struct TlsFront {
    addr: SocketAddr,
    handshakes: Arc<Mutex<Vec<Result<(), String>>>>,
    changed: Arc<Notify>,
    task: JoinHandle<()>,
}

impl TlsFront {
    async fn start(
        upstream: SocketAddr,
        (chain, key): (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    ) -> TlsFront {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        TlsFront::with_config(upstream, config).await
    }

    async fn with_config(upstream: SocketAddr, config: rustls::ServerConfig) -> TlsFront {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let changed = Arc::new(Notify::new());
        let (h, c) = (handshakes.clone(), changed.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, h, c) = (acceptor.clone(), h.clone(), c.clone());
                tokio::spawn(async move {
                    let accepted = acceptor.accept(tcp).await;
                    h.lock()
                        .unwrap()
                        .push(accepted.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                    c.notify_waiters();
                    let Ok(mut tls) = accepted else { return };
                    let Ok(mut plain) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        TlsFront {
            addr,
            handshakes,
            changed,
            task,
        }
    }

    /// The agent's URL: by name, so the name check applies.
    fn url(&self) -> String {
        format!("wss://localhost:{}/ws", self.addr.port())
    }

    /// Waits until `n` handshakes were attempted; returns their outcomes.
    async fn wait_handshakes(&self, n: usize, timeout: Duration) -> Vec<Result<(), String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            {
                let seen = self.handshakes.lock().unwrap();
                if seen.len() >= n {
                    return seen.clone();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "fewer than {n} TLS handshakes within {timeout:?}: {:?}",
                    self.handshakes.lock().unwrap()
                );
            }
        }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the agent against `front`, with `ca_file` holding `ca_pem` if any.
async fn agent_for(front: &TlsFront, ca_pem: Option<String>) -> Agent {
    let options = AgentOptions::new(front.url());
    assert!(
        !options
            .env
            .iter()
            .any(|(k, _)| k == "SSL_CERT_FILE" || k == "SSL_CERT_DIR"),
        "the agent must only trust what the test says"
    );
    let (dir, _) = Agent::prepare(&options);
    let mut options = options;
    if let Some(pem) = ca_pem {
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, pem).unwrap();
        options
            .extra_toml
            .push(format!("ca_file = {:?}", path.display().to_string()));
    }
    Agent::spawn(dir, options).await
}

/// What the agent says when it has no CA to trust at all.
const NO_TRUSTED_CA: &str = "no trusted CA certificates";

/// Whether the agent will find a system trust store, decided the way the
/// agent decides it (`rustls-native-certs`, which honours `SSL_CERT_FILE`
/// and `SSL_CERT_DIR`). The Nix build sandbox has none: there the agent
/// refuses before it dials, so no handshake ever reaches the front.
fn system_store_present() -> bool {
    !rustls_native_certs::load_native_certs().certs.is_empty()
}

/// The refusal: the agent keeps trying with TLS, logs the certificate error
/// each time, and the dashboard never hears from it.
async fn assert_refused(
    front: &TlsFront,
    dashboard: &Dashboard,
    agent: &mut Agent,
    expected: &[&str],
) {
    // Without any trusted CA the agent cannot build a TLS client at all and
    // never dials; otherwise every attempt is a handshake it aborts.
    let dials = system_store_present() || expected[0] != NO_TRUSTED_CA;
    let handshakes = if dials {
        front.wait_handshakes(3, 15 * SECOND).await
    } else {
        Vec::new()
    };
    assert!(
        handshakes.iter().all(Result::is_err),
        "a handshake succeeded: {handshakes:?}"
    );
    // Each attempt is refused and logged (as the reason for reconnecting).
    let deadline = Instant::now() + 5 * SECOND;
    let stderr = loop {
        let stderr = agent.stderr();
        let refusals = stderr
            .lines()
            .filter(|l| l.contains("reconnecting") && l.contains(expected[0]))
            .count();
        if refusals >= 3 {
            break stderr;
        }
        assert!(
            Instant::now() < deadline,
            "fewer than 3 refusals logged:\n{stderr}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    for needle in expected {
        assert!(stderr.contains(needle), "no {needle:?} in:\n{stderr}");
    }
    // Every attempt was a TLS handshake that the agent aborted: the front
    // saw alerts from a TLS client, never plaintext or a WebSocket request.
    for outcome in &handshakes {
        let error = outcome.as_ref().unwrap_err();
        assert!(
            !error.contains("corrupt message") && !error.contains("InvalidContentType"),
            "not a TLS client: {error}"
        );
    }
    if !dials {
        let seen = front.handshakes.lock().unwrap().len();
        assert_eq!(seen, 0, "the agent dialled without a trusted CA");
    }
    assert!(
        dashboard.log().is_empty(),
        "something reached the dashboard: {:?}",
        dashboard.log()
    );
    assert!(agent.is_running());
    assert!(!stderr.contains(TOKEN));
}

#[tokio::test]
async fn wss_with_the_ca_file_connects_and_registers() {
    let dashboard = Dashboard::start().await;
    let ca = TestCa::new("NixFleet test CA");
    let front = TlsFront::start(dashboard.addr, ca.server(&["localhost"], false)).await;
    let agent = agent_for(&front, Some(ca.pem())).await;
    let register = dashboard.wait_frame("register", 1, 10 * SECOND).await;
    assert_eq!(register.payload()["hostname"], "test-host");
    dashboard.wait_frame("heartbeat", 2, 5 * SECOND).await;
    let handshakes = front.wait_handshakes(1, SECOND).await;
    assert_eq!(handshakes[0], Ok(()));
    let stderr = agent.stderr();
    assert!(stderr.contains("connected"), "{stderr}");
    assert!(!stderr.contains(TOKEN));
}

#[tokio::test]
async fn wss_without_the_ca_file_is_refused_and_never_falls_back() {
    let dashboard = Dashboard::start().await;
    let ca = TestCa::new("NixFleet test CA");
    let front = TlsFront::start(dashboard.addr, ca.server(&["localhost"], false)).await;
    let mut agent = agent_for(&front, None).await;
    let expected: &[&str] = if system_store_present() {
        &["invalid peer certificate: UnknownIssuer"]
    } else {
        &[NO_TRUSTED_CA]
    };
    assert_refused(&front, &dashboard, &mut agent, expected).await;
}

#[tokio::test]
async fn wss_with_a_certificate_for_another_name_is_refused() {
    let dashboard = Dashboard::start().await;
    let ca = TestCa::new("NixFleet test CA");
    let front = TlsFront::start(dashboard.addr, ca.server(&["dashboard.example"], false)).await;
    let mut agent = agent_for(&front, Some(ca.pem())).await;
    assert_refused(
        &front,
        &dashboard,
        &mut agent,
        &[
            "invalid peer certificate",
            "not valid for name",
            "localhost",
        ],
    )
    .await;
}

#[tokio::test]
async fn wss_with_an_expired_certificate_is_refused() {
    let dashboard = Dashboard::start().await;
    let ca = TestCa::new("NixFleet test CA");
    let front = TlsFront::start(dashboard.addr, ca.server(&["localhost"], true)).await;
    let mut agent = agent_for(&front, Some(ca.pem())).await;
    assert_refused(
        &front,
        &dashboard,
        &mut agent,
        &["invalid peer certificate", "xpired"],
    )
    .await;
}

#[tokio::test]
async fn wss_signed_by_another_ca_than_the_ca_file_is_refused() {
    let dashboard = Dashboard::start().await;
    let ca = TestCa::new("NixFleet test CA");
    let other = TestCa::new("Some other CA");
    let front = TlsFront::start(dashboard.addr, ca.server(&["localhost"], false)).await;
    let mut agent = agent_for(&front, Some(other.pem())).await;
    assert_refused(
        &front,
        &dashboard,
        &mut agent,
        &["invalid peer certificate: UnknownIssuer"],
    )
    .await;
}

/// A client certificate for `front` made by `issuer`: the test CA's
/// certificate as `ca_file`, the pair as `tls_client_cert` and, through
/// the systemd credential `tls_client_key`, the key (or `key_pem` instead).
async fn mtls_agent(
    front: &TlsFront,
    server_ca: &TestCa,
    (cert_pem, key_pem): (String, String),
) -> Agent {
    let options = AgentOptions::new(front.url());
    let (dir, _) = Agent::prepare(&options);
    let mut options = options;
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, server_ca.pem()).unwrap();
    let cert = dir.path().join("client.pem");
    std::fs::write(&cert, cert_pem).unwrap();
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::write(credentials.join("tls_client_key"), key_pem).unwrap();
    set_mode(&credentials.join("tls_client_key"), 0o600);
    options.extra_toml.extend([
        format!("ca_file = {:?}", ca.display().to_string()),
        format!("tls_client_cert = {:?}", cert.display().to_string()),
    ]);
    let credentials = credentials.display().to_string();
    options
        .env
        .push(("CREDENTIALS_DIRECTORY".into(), credentials));
    Agent::spawn(dir, options).await
}

#[tokio::test]
async fn mtls_with_the_right_client_certificate_registers() {
    let dashboard = Dashboard::start().await;
    let ca = TestCa::new("NixFleet test CA");
    let clients = TestCa::new("Fleet hosts CA");
    let config = requiring_clients(&clients, ca.server(&["localhost"], false));
    let front = TlsFront::with_config(dashboard.addr, config).await;
    let agent = mtls_agent(&front, &ca, clients.client("test-host")).await;
    let register = dashboard.wait_frame("register", 1, 10 * SECOND).await;
    assert_eq!(register.payload()["hostname"], "test-host");
    assert_eq!(front.wait_handshakes(1, SECOND).await[0], Ok(()));
    let stderr = agent.stderr();
    assert!(!stderr.contains("PRIVATE KEY"), "{stderr}");
}

/// Like the token, the client key is not kept in the agent's memory once
/// it is parsed: neither a line of its PEM file nor its DER bytes are in
/// any writable mapping of the running, connected agent (ring's parsed key
/// is in its own form, see config/validate/client_cert.rs).
#[tokio::test]
async fn the_client_keys_bytes_are_not_left_in_the_agents_memory() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: reading the (non-dumpable) agent's memory needs root");
        return;
    }
    let dashboard = Dashboard::start().await;
    let ca = TestCa::new("NixFleet test CA");
    let clients = TestCa::new("Fleet hosts CA");
    let config = requiring_clients(&clients, ca.server(&["localhost"], false));
    let front = TlsFront::with_config(dashboard.addr, config).await;
    let (cert, key) = clients.client("test-host");
    let agent = mtls_agent(&front, &ca, (cert, key.clone())).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    assert_eq!(front.wait_handshakes(1, SECOND).await[0], Ok(()));

    let der = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let body: Vec<&str> = key.lines().filter(|l| !l.starts_with("-----")).collect();
    let mut needles: Vec<&[u8]> = body.iter().map(|l| l.as_bytes()).collect();
    needles.push(der.secret_der());
    let found = memory::find_in_memory(agent.pid(), &needles).unwrap();
    let found: Vec<String> = found
        .iter()
        .map(|(i, mapping)| match *i == body.len() {
            true => format!("the DER in {mapping}"),
            false => format!("PEM line {i} in {mapping}"),
        })
        .collect();
    assert!(found.is_empty(), "the key's bytes are in memory: {found:?}");
    let stderr = agent.stderr();
    for line in &body {
        assert!(!stderr.contains(line), "{stderr}");
    }
}

#[tokio::test]
async fn mtls_with_a_certificate_from_another_ca_is_refused_and_retried() {
    let dashboard = Dashboard::start().await;
    let ca = TestCa::new("NixFleet test CA");
    let clients = TestCa::new("Fleet hosts CA");
    let stranger = TestCa::new("Another CA");
    let config = requiring_clients(&clients, ca.server(&["localhost"], false));
    let front = TlsFront::with_config(dashboard.addr, config).await;
    let mut agent = mtls_agent(&front, &ca, stranger.client("test-host")).await;
    let refused = "the dashboard refused this host's client certificate (tls_client_cert)";
    assert_refused(&front, &dashboard, &mut agent, &[refused]).await;
}

#[tokio::test]
async fn mtls_without_a_client_certificate_says_one_is_wanted() {
    let dashboard = Dashboard::start().await;
    let ca = TestCa::new("NixFleet test CA");
    let clients = TestCa::new("Fleet hosts CA");
    let config = requiring_clients(&clients, ca.server(&["localhost"], false));
    let front = TlsFront::with_config(dashboard.addr, config).await;
    let mut agent = agent_for(&front, Some(ca.pem())).await;
    let wanted = "the dashboard wants a client certificate and none is set";
    assert_refused(&front, &dashboard, &mut agent, &[wanted]).await;
}

#[tokio::test]
async fn a_client_key_that_does_not_match_the_certificate_is_a_config_error() {
    let dashboard = Dashboard::start().await;
    let ca = TestCa::new("NixFleet test CA");
    let clients = TestCa::new("Fleet hosts CA");
    let config = requiring_clients(&clients, ca.server(&["localhost"], false));
    let front = TlsFront::with_config(dashboard.addr, config).await;
    let (cert, _) = clients.client("test-host");
    let (_, other_key) = clients.client("other-host");
    let mut agent = mtls_agent(&front, &ca, (cert, other_key.clone())).await;
    assert_eq!(agent.wait_exit(10 * SECOND).await, Some(78));
    let stderr = agent.stderr();
    assert!(stderr.contains("tls_client_key"), "{stderr}");
    assert!(
        stderr.contains("does not match the certificate"),
        "{stderr}"
    );
    // The key's bytes are never shown, not even in the error.
    let body = other_key.lines().nth(1).unwrap();
    assert!(!stderr.contains(body), "{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "{stderr}"
    );
    assert!(front.handshakes.lock().unwrap().is_empty());
}

/// Starts an agent with these extra config lines and waits for its exit;
/// returns the exit code and its log.
async fn config_exit(extra: Vec<String>) -> (Option<i32>, String) {
    let mut options = AgentOptions::new("wss://localhost:9/ws".into());
    options.extra_toml = extra;
    let mut agent = Agent::start(options).await;
    let code = agent.wait_exit(10 * SECOND).await;
    (code, agent.stderr())
}

#[tokio::test]
async fn a_missing_client_key_or_certificate_is_a_config_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_pem, _) = TestCa::new("Fleet hosts CA").client("test-host");
    let cert = dir.path().join("client.pem");
    std::fs::write(&cert, cert_pem).unwrap();
    let cert_line = format!("tls_client_cert = {:?}", cert.display().to_string());
    let missing = dir.path().join("missing.key").display().to_string();

    let (code, stderr) = config_exit(vec![cert_line.clone()]).await;
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("tls_client_key is not set"), "{stderr}");

    let key_line = format!("tls_client_key = {missing:?}");
    let (code, stderr) = config_exit(vec![cert_line, key_line]).await;
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains(&format!("tls_client_key = \"{missing}\""))
            && stderr.contains("cannot read it"),
        "{stderr}"
    );

    // A "certificate" file that holds none.
    let key_line = format!("tls_client_key = {missing:?}");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let cert_line = format!("tls_client_cert = {:?}", empty.display().to_string());
    let (code, stderr) = config_exit(vec![cert_line, key_line]).await;
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("tls_client_cert") && stderr.contains("holds no PEM certificate"),
        "{stderr}"
    );
}
