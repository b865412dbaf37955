//! `nixfleet-mock-dashboard`: a small mock NixFleet v2 dashboard for the
//! README demo, integration tests, the systemd-nspawn test and the NixOS VM
//! tests. Agents connect to `/ws` exactly as they would to a real dashboard
//! (the protocol is described in `docs/protocol.md` at the top of the
//! repository; this program implements it on its own, sharing no code with
//! the agent); people watch and drive it in a browser at `/` (a live page,
//! below); tests drive and inspect it through a small HTTP JSON API. Logs
//! go to stderr; stdout carries exactly one line.
//!
//! # Command line
//!
//! ```text
//! nixfleet-mock-dashboard (--token TOKEN | --token-file FILE | --tokens FILE)
//!                         [--listen ADDR] [--record FILE]
//!                         [--tls-cert FILE --tls-key FILE [--client-ca FILE]]
//!                         [--offline-after-intervals N]
//!                         [--max-messages-per-host N] [--reconnect-timeout SECS]
//!                         [--log-level FILTER]
//! ```
//!
//! | flag | default | meaning |
//! |---|---|---|
//! | `--listen ADDR` | `127.0.0.1:8000` | `ip:port` to listen on; port `0` picks a free port |
//! | `--token TOKEN` | | the bearer token agents must present |
//! | `--token-file FILE` | | read the token from FILE (surrounding whitespace trimmed); exactly one of `--token`/`--token-file`/`--tokens` is required |
//! | `--tokens FILE` | | one token per host: lines `hostname token` (blank lines and `#` comments skipped; a hostname or token listed twice is an error); see "Per-host tokens" below |
//! | `--tls-cert FILE`, `--tls-key FILE` | off | serve `wss://` (and the page and API over `https://`) with this PEM chain and key; a failed handshake is listed by `/api/rejected` (`TLS handshake failed`) |
//! | `--client-ca FILE` | off | with TLS, require a client certificate signed by this PEM CA (of agents, browsers and API clients alike) |
//! | `--record FILE` | off | append a JSON-lines journal of everything agents send (below) |
//! | `--offline-after-intervals N` | `3` | a host is offline after N × its `heartbeat_interval` without a heartbeat |
//! | `--max-messages-per-host N` | `1000000` | per-host message cap; the oldest are evicted and counted |
//! | `--reconnect-timeout SECS` | `90` | after a `switch`/`pull-switch` status `ok`, how long to wait for the agent's new `register` before recording "Agent did not reconnect in time" (v3 behaviour) |
//! | `--log-level FILTER` | `info` | `error`, `warn`, `info`, `debug`, `trace`, or a `tracing` target filter |
//!
//! Once listening it prints exactly one line to **stdout**,
//! `listening on <ip>:<port>` (the actual address, so `--listen
//! 127.0.0.1:0` works), and flushes it; under systemd it also sends
//! `READY=1` (so `Type=notify` units work; `Type=simple` is fine too).
//! The token is never logged (`--token-file` keeps it out of `ps`, e.g.
//! with `LoadCredential=`).
//!
//! Exit status: `0` after SIGTERM/SIGINT (graceful: open agent connections
//! get close code 1001 `dashboard shutting down`, the record file is
//! flushed); `2` for bad usage (unknown flag, no token, unreadable or empty
//! token file); `1` when it cannot listen or open the record file.
//!
//! # WebSocket: `GET /ws`
//!
//! Requires `Authorization: Bearer <token>`; otherwise `401` with
//! `{"error": "unauthorized"}` and no upgrade (the attempt is listed by
//! `GET /api/rejected`). Frames and messages up to 16 MiB are accepted; a
//! larger one ends that connection (`closed_by: "transport"`, with the
//! `error`) and nothing else. Pings are answered.
//!
//! * Per-host tokens (`--tokens`): an upgrade whose `X-NixFleet-Hostname`
//!   (our agent's extension header) names another host than the token's is
//!   refused with 401 (listed by `/api/rejected`, a `refused` entry in that
//!   host's timeline). Without the header (the v3 agent sends only its
//!   token), the upgrade is accepted when the token is any listed host's,
//!   and the connection remembers whose. A
//!   `register` whose hostname is not that host's is refused: the
//!   connection is closed with code 1008, reason `token of another host`,
//!   and stays unregistered; `/api/rejected` lists it with that reason,
//!   and the claimed host's timeline gets a `refused` entry naming whose
//!   token it was.
//! * The connection belongs to the hostname of its `register`
//!   (`payload.hostname`, a non-empty string). The mock replies
//!   `{"type":"registered","payload":{"host_id":"<hostname>"}}`. A
//!   `register` without a usable hostname is stored but not answered.
//!   Frames before a valid `register` are kept under the pseudo-host
//!   `(unregistered)` (host `""` in the record file).
//! * Last connection wins: when a second connection registers a hostname
//!   that already has a live connection, the older one is closed with
//!   code 1008, reason `duplicate host`.
//! * A host stops being `connected` as soon as either side sends a close
//!   frame (or the connection drops); API frames then get `409`.
//! * Every frame is stored, including malformed ones (not a JSON object
//!   with a string `type`: type `_malformed`) and binary frames (type
//!   `_binary`, bytes decoded lossily as UTF-8); the connection stays up.
//!   The mock never validates what agents send.
//! * Online rule: a host is `online` iff it has a live connection and its
//!   last `register` or `heartbeat` on that connection is younger than
//!   N × `heartbeat_interval` (seconds, from its `register`; 30 s if absent
//!   or not a positive number).
//! * Memory: at most `--max-messages-per-host` messages (default 1,000,000)
//!   are kept per host; older ones are evicted (count in `evicted`). Each
//!   costs about 100 bytes plus the frame's text: a host flooding small
//!   `output` lines peaks around 200 MB at the default cap.
//! * Throughput: per frame, one copy and one short lock; an optimised
//!   build stores well over 300,000 small frames per second from one agent
//!   (about half that rate with `--record`; see the ignored
//!   `flood_throughput` test in `tests/mock_dashboard.rs`), and the API
//!   stays responsive meanwhile.
//!
//! # Web page: `GET /`
//!
//! One page, its stylesheet and script compiled into the binary
//! (`src/page/`; no build step, nothing fetched at run time): the host
//! list and a host view with live output, progress, command buttons and a
//! timeline. It needs no token, like the API: anyone who can reach the
//! port can send commands, which is why the default is loopback. Updates
//! are pushed by `GET /events[?host=NAME]` (Server-Sent Events; `live.rs`
//! documents the events). A browser that falls behind never slows an
//! agent's connection or grows the mock's memory: it skips ahead and the
//! page says how many lines it missed, with a link to the messages API.
//!
//! # HTTP API
//!
//! All responses are JSON. Errors are `{"error": "<text>"}` with status
//! `400` (bad body or query), `404` (unknown host or path), `405`, `409`
//! (host known but not connected). Timestamps are unix milliseconds.
//! `{host}` is a hostname (URL-encoded) or `(unregistered)`.
//!
//! * `GET /api` — a plain-text endpoint list, for humans.
//! * `GET /health` → `{"status": "ok"}`.
//! * `GET /api/hosts` → array of host objects (registered hosts only, in
//!   order of first registration):
//!   ```text
//!   {"hostname": str, "online": bool, "connected": bool,
//!    "live_connection": id|null, "last_seen": ms|null,
//!    "connections": n (connections that registered this hostname, total),
//!    "registered_at": ms|null, "register": <last register payload>|null,
//!    "heartbeat_interval_ms": n, "last_heartbeat": <payload>|null,
//!    "last_heartbeat_at": ms|null, "messages": n (stored in total),
//!    "evicted": n,
//!    "theme_color", "location", "device_type": <from register>|null,
//!    "source_commit", "store_path", "binary_hash": <last heartbeat, else register>|null,
//!    "lock_hash": <last heartbeat>|null,
//!    "update_status": <last heartbeat's {"git", "lock", "system", "tests"}>|null,
//!    "progress": {<phase>: <latest operation_progress for it>, …} (reset when a command is sent),
//!    "command": <the newest command sent through the API, as in /commands>|null}
//!   ```
//! * `GET /api/hosts/{host}` → one host object.
//! * `GET /api/hosts/{host}/messages[?type=T][&since=I][&limit=N]` →
//!   ```text
//!   {"host": str, "next": I, "evicted": n, "messages": [
//!     {"index": i, "t": ms, "conn": id, "type": str, "payload": <json>|null},
//!     {"index": i, "t": ms, "conn": id, "type": "_malformed", "payload": null, "raw": "<text>"}, ...]}
//!   ```
//!   Messages are numbered from 0 per host, in arrival order. `type`
//!   filters on the message type; `since` returns only messages with
//!   `index >= since`; `limit` caps how many are returned. `next` is the
//!   value to pass as `since` to get only newer messages (with `type`
//!   too). Evicted messages are skipped silently (see `evicted`).
//! * `GET /api/hosts/{host}/connections` → array, oldest first:
//!   ```text
//!   {"id": n, "host": str|null, "remote": "ip:port", "opened_at": ms,
//!    "registered_at": ms|null, "closed_at": ms|null, "open": bool,
//!    "live": bool, "frames": n,
//!    "close_code": n|null, "close_reason": str|null,   (the agent's close frame)
//!    "closed_by": "agent"|"dashboard"|"transport"|null,
//!    "sent_close_code": n|null, "sent_close_reason": str|null,   (the mock's)
//!    "error": str|null}
//!   ```
//!   `closed_by` says who started closing: the agent (close frame), the
//!   dashboard (disconnect, duplicate host, shutdown), or `transport` (the
//!   TCP connection ended or failed without a close frame).
//! * `GET /api/hosts/{host}/commands` → the newest 100 commands sent
//!   through the API, oldest first, tracked like a v3 dashboard does:
//!   ```text
//!   {"id": n, "command": str, "state": "executing"|"awaiting_heartbeat"|
//!    "awaiting_reconnect"|"ok"|"error"|"rejected"|"timeout",
//!    "sent_at": ms, "finished_at": ms|null, "status": <status payload>|null,
//!    "error": str|null, "kill_requested": bool}
//!   ```
//!   A `status` `error` or a `command_rejected` ends a command; `ok` (or
//!   `warning`) completes it on the next heartbeat, except after `switch`
//!   and `pull-switch`, which wait for a new `register` (then `ok`) for
//!   `--reconnect-timeout` seconds (else `timeout`, error "Agent did not
//!   reconnect in time"). `stop`/`kill` mark the running command.
//! * `POST /api/hosts/{host}/command` `{"command": "<name>"}` → sends
//!   `{"type":"command","payload":{"command":"<name>"}}` (names are not
//!   validated: every v3 name — `restart`, `reboot`, `check-version`,
//!   `refresh-*`, `update`, `force-update`, `kill`, … — goes through).
//! * `POST /api/command` `{"command": "<name>", "hosts": ["a", "b"]}` or
//!   `"hosts": "all"` (every registered host) → the same frame to each,
//!   under one lock; answers `200 {"sent": [{"host": str, "conn": id}],
//!   "failed": [{"host": str, "error": str}]}` (unknown or not connected
//!   hosts are listed there, the others still get it), `400` for a bad body.
//! * `POST /api/hosts/{host}/kill` `{"signal": "SIGTERM", "pid": 0}` (both
//!   optional, those are the defaults; the signal string is not validated)
//!   → sends `{"type":"kill_command","payload":{"signal":…,"pid":…}}`.
//! * `POST /api/hosts/{host}/send` with any JSON body → sends the body
//!   verbatim as one text frame; `{"raw": "<text>"}` sends `<text>` (may be
//!   malformed JSON); `{"binary": "<text>"}` sends a binary frame.
//! * `POST /api/hosts/{host}/disconnect` `{"code": 1011, "reason": "…"}`
//!   (defaults 1000 and `""`; code 1000–4999 except 1004/1005/1006/1015,
//!   reason ≤ 123 bytes) → closes the live connection with that close
//!   frame; `{"abort": true}` drops the TCP connection without one.
//!
//!   The four POSTs answer `200 {"ok": true, "conn": <id>}`, or `404`
//!   (unknown host), `400` (bad body), `409` (not connected), checked in
//!   that order. Request bodies up to 64 MiB; no Content-Type needed.
//! * `GET /api/rejected` → the refused upgrades (newest 10,000):
//!   `[{"t": ms, "remote": "ip:port", "reason": str}]`.
//!
//! # Record file (`--record FILE`)
//!
//! Appended, one JSON object per line, flushed as soon as the writer
//! catches up:
//!
//! ```text
//! {"t": ms, "host": "h", "conn": id, "frame": <the frame as JSON, or {"_raw": "<text>"} if not JSON, or {"_binary": "<text>"}>}
//! {"t": ms, "host": "", "conn": id, "event": "open", "remote": "ip:port"}
//! {"t": ms, "host": "h", "conn": id, "event": "close", "code": n|null, "reason": str|null,
//!  "closed_by": str, "sent_code": n|null, "sent_reason": str|null}
//! {"t": ms, "host": "", "conn": 0, "event": "rejected", "remote": "ip:port", "reason": str}
//! ```
//!
//! `host` is `""` until the connection has registered. `code`/`reason` are
//! from the agent's close frame; `sent_*` from the mock's.
//!
//! # Design
//!
//! One `State` behind one mutex (`state.rs`, shared with the token in
//! `shared.rs`), locked briefly once per frame and per API call: it holds
//! the hosts (`host.rs`) and the connections (`conn.rs`); what a received
//! frame does to it is in `session.rs`, and frames are classified before
//! the lock (`frame.rs`). One task per agent connection owns its socket and
//! receives API requests over a channel (`ws.rs`); frames are stored as
//! their received text (one copy, reference-counted) and the payload is
//! extracted when the API serves it; the record file has its own writer
//! thread (`record.rs`). The page's feed (`live.rs`) keeps a cursor per
//! browser and reads the store only when the browser can take more; what
//! the page shows beyond raw messages (metrics history, running command,
//! timeline) is small and bounded per host (`view.rs`), and the commands
//! sent through the API are tracked as a v3 dashboard does
//! (`lifecycle.rs`).

mod api;
mod conn;
mod fleet;
mod frame;
mod host;
mod lifecycle;
mod live;
mod page;
mod record;
mod session;
mod shared;
mod state;
mod tls;
mod tokens;
mod view;
mod ws;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use clap::{ArgGroup, Parser};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

use crate::record::{Recorder, RecorderThread};
use crate::shared::Shared;
use crate::state::State;
use crate::tokens::Tokens;
use rustls::ServerConfig;

/// Request bodies (e.g. `/send` with a large raw frame) up to this size.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// How long shutdown waits for agents to answer the close frame.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// A mock NixFleet dashboard: agents connect to /ws, tests use the HTTP API.
/// The full API is documented at the top of
/// crates/nixfleet-mock-dashboard/src/main.rs and in docs/demo.md.
#[derive(Parser)]
#[command(name = "nixfleet-mock-dashboard", version)]
#[command(group(ArgGroup::new("auth").required(true).args(["token", "token_file", "tokens"])))]
struct Cli {
    /// Address to listen on (ip:port; port 0 picks a free one).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Bearer token agents must send (prefer --token-file).
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// File holding the bearer token (whitespace trimmed).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// File of `hostname token` lines: each host must present its own.
    #[arg(long, value_name = "FILE")]
    tokens: Option<PathBuf>,
    /// Serve wss:// (and https://) with this PEM certificate chain.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require a client certificate signed by this PEM CA (needs --tls-cert).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Append every frame and connection event as JSON lines to FILE.
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
    /// A host is offline after N heartbeat intervals without a heartbeat.
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..))]
    offline_after_intervals: u32,
    /// Messages kept per host; older ones are evicted.
    #[arg(long, value_name = "N", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_messages_per_host: u64,
    /// Seconds a successful switch/pull-switch waits for the agent to
    /// register again before it is recorded as "Agent did not reconnect in
    /// time" (the v3 dashboard waits 90).
    #[arg(long, value_name = "SECS", default_value_t = 90)]
    reconnect_timeout: u64,
    /// Log filter: error, warn, info, debug, trace (or a tracing target filter).
    #[arg(long, value_name = "FILTER", default_value = "info")]
    log_level: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Ok(filter) = cli.log_level.parse::<Targets>() else {
        eprintln!("error: invalid --log-level {:?}", cli.log_level);
        return ExitCode::from(2);
    };
    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => match tls::server_config(cert, key, cli.client_ca.as_deref()) {
            Ok(config) => Some(config),
            Err(msg) => {
                eprintln!("error: {msg}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    let tokens = match load_tokens(&cli) {
        Ok(tokens) => tokens,
        Err(msg) => {
            eprintln!("error: {msg}");
            return ExitCode::from(2);
        }
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    tracing_subscriber::registry().with(fmt).with(filter).init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(run(cli, tokens, tls));
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

fn load_tokens(cli: &Cli) -> Result<Tokens, String> {
    let Some(path) = &cli.tokens else {
        return load_token(cli).map(|token| Tokens::Shared(token.into_bytes().into()));
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read --tokens {}: {e}", path.display()))?;
    Tokens::parse_per_host(&text, &format!("the tokens file {}", path.display()))
}

fn load_token(cli: &Cli) -> Result<String, String> {
    // An empty token names where it came from: "the token is empty" left
    // the user guessing which file (or flag) to fix.
    let (token, source) = match (&cli.token, &cli.token_file) {
        (Some(token), _) => (token.trim().to_owned(), "--token".to_owned()),
        (None, Some(path)) => (
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --token-file {}: {e}", path.display()))?
                .trim()
                .to_owned(),
            format!("the token file {}", path.display()),
        ),
        (None, None) => {
            return Err("one of --token, --token-file or --tokens is required".into());
        }
    };
    if token.is_empty() {
        return Err(format!("{source} is empty"));
    }
    Ok(token)
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(page::index))
        .route("/page.css", get(page::stylesheet))
        .route("/page.js", get(page::script))
        .route("/events", get(live::events))
        .route("/api", get(api::index))
        .route("/health", get(api::health))
        .route("/ws", get(ws::upgrade))
        .route("/api/hosts", get(api::list_hosts))
        .route("/api/hosts/{host}", get(api::get_host))
        .route("/api/hosts/{host}/messages", get(api::messages))
        .route("/api/hosts/{host}/connections", get(api::connections))
        .route("/api/hosts/{host}/commands", get(api::commands))
        .route("/api/hosts/{host}/command", post(api::command))
        .route("/api/hosts/{host}/kill", post(api::kill))
        .route("/api/hosts/{host}/send", post(api::send))
        .route("/api/hosts/{host}/disconnect", post(api::disconnect))
        .route("/api/command", post(fleet::command))
        .route("/api/rejected", get(api::rejected))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(shared)
}

/// Listens until SIGTERM or SIGINT, then shuts down gracefully. Every
/// failure before listening has been announced is reported on stderr and
/// ends the program with status 1.
async fn run(cli: Cli, tokens: Tokens, tls: Option<Arc<ServerConfig>>) -> ExitCode {
    match serve(cli, tokens, tls).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

async fn serve(
    cli: Cli,
    tokens: Tokens,
    tls: Option<Arc<ServerConfig>>,
) -> Result<ExitCode, String> {
    let (shared, writer) = shared_state(&cli, tokens)?;

    let listener = TcpListener::bind(cli.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cli.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    // Install the handlers before announcing the port, so a SIGTERM sent
    // right after reading it is handled gracefully.
    let (mut sigterm, mut sigint) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => return Err(format!("cannot install signal handlers: {e}")),
    };

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = spawn_server(listener, tls, shared.clone(), stop_rx);
    let ticker = spawn_ticker(shared.clone());
    announce(addr);

    let why = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
        result = &mut server => {
            tracing::error!("the HTTP server stopped: {result:?}");
            return Ok(ExitCode::from(1));
        }
    };
    tracing::info!("{why}: shutting down");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    shared.shutting_down.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(());
    shut_down(&shared, &mut server).await;
    ticker.abort();
    drop(shared.lock().take_recorder());
    if let Some(writer) = writer {
        let join = tokio::task::spawn_blocking(move || writer.join());
        let _ = tokio::time::timeout(Duration::from_secs(5), join).await;
    }
    tracing::info!("bye");
    Ok(ExitCode::SUCCESS)
}

/// The fleet's state, shared by every connection, and the thread that
/// writes the record file (`--record`), if there is one.
fn shared_state(
    cli: &Cli,
    tokens: Tokens,
) -> Result<(Arc<Shared>, Option<RecorderThread>), String> {
    let (recorder, writer) = match &cli.record {
        Some(path) => {
            let (recorder, writer) = Recorder::open(path)
                .map_err(|e| format!("cannot open record file {}: {e}", path.display()))?;
            (Some(recorder), Some(writer))
        }
        None => (None, None),
    };
    let max_messages = usize::try_from(cli.max_messages_per_host).unwrap_or(usize::MAX);
    let mut state = State::new(max_messages, cli.offline_after_intervals, recorder);
    state.reconnect_timeout = Duration::from_secs(cli.reconnect_timeout);
    Ok((Arc::new(Shared::new(state, tokens)), writer))
}

/// The HTTP server (API, page and `/ws`), until `stop` fires.
fn spawn_server(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    shared: Arc<Shared>,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let app = router(shared.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let stopped = async move {
        let _ = stop.await;
    };
    match tls {
        Some(config) => {
            // tap_io only for its ConnectInfo: axum gives the remote
            // address of a tapped listener of any kind.
            let listener = tls::TlsListener::new(listener, config, shared).tap_io(|_| {});
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped)
                    .await
            })
        }
        None => {
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped)
                    .await
            })
        }
    }
}

/// Checks every host's online state four times a second.
fn spawn_ticker(shared: Arc<Shared>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(250));
        loop {
            interval.tick().await;
            shared.lock().check_online();
        }
    })
}

/// The one line on stdout, and readiness for systemd.
fn announce(addr: SocketAddr) {
    {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "listening on {addr}");
        let _ = stdout.flush();
    }
    tracing::info!("listening on {addr}");
    // For `Type=notify` units; a no-op without NOTIFY_SOCKET.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
}

/// Closes every agent connection with 1001 and waits a little for them to
/// end, and for the server to finish.
async fn shut_down(shared: &Shared, server: &mut tokio::task::JoinHandle<std::io::Result<()>>) {
    shared.lock().close_all(1001, "dashboard shutting down");
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    while shared.lock().open_connections() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
}
