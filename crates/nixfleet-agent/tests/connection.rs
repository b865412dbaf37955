//! The agent's connection lifecycle and heartbeats, tested with the real
//! binary against an in-test dashboard over loopback.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn connection_success_registers_then_heartbeats_at_once() {
    let dashboard = Dashboard::start().await;
    let agent = Agent::start(AgentOptions::new(dashboard.url())).await;

    let register = dashboard.wait_frame("register", 1, 10 * SECOND).await;
    let first_heartbeat = dashboard.wait_frame("heartbeat", 1, 5 * SECOND).await;
    let log = dashboard.log();
    let first_frame = log.iter().find(|s| s.kind().is_some()).unwrap();
    assert_eq!(
        first_frame.kind(),
        Some("register"),
        "register must be the first message"
    );
    assert!(
        first_heartbeat.at() - register.at() < Duration::from_millis(500),
        "first heartbeat right after register, not after an interval"
    );

    let p = register.payload();
    assert_eq!(p["hostname"], "test-host");
    assert!(["nixos", "macos"].contains(&p["host_type"].as_str().unwrap()));
    assert_eq!(p["agent_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(p["heartbeat_interval"], 1);
    assert_eq!(p["generation"], "", "no repository yet");
    assert!(p["os_version"].is_string() && p["nixpkgs_version"].is_string());
    assert_eq!(p["repo_dir"], agent.repo_dir.display().to_string());
    assert!(p.get("repo_url").is_none(), "plain mode: no repo_url");

    let hb = first_heartbeat.payload();
    assert_eq!(hb["pending_command"], Value::Null);
    assert_eq!(hb["command_pid"], Value::Null);
    assert_eq!(hb["metrics"], Value::Null, "metrics = none");
    assert!(!agent.stderr().contains(TOKEN));
}

#[tokio::test]
async fn heartbeats_are_regular() {
    let dashboard = Dashboard::start().await;
    let _agent = Agent::start(AgentOptions::new(dashboard.url())).await;
    // A change of the compartments (the lock's answer just after start)
    // is sent at once, between beats: only the beats of the timer count,
    // i.e. those that say what the previous heartbeat said.
    dashboard.wait_frame("heartbeat", 8, 12 * SECOND).await;
    let beats = dashboard.frames("heartbeat");
    let timed: Vec<&Seen> = beats
        .iter()
        .enumerate()
        .filter(|(i, s)| {
            *i == 0 || s.payload()["update_status"] == beats[i - 1].payload()["update_status"]
        })
        .map(|(_, s)| s)
        .collect();
    assert!(timed.len() >= 6, "too few timed beats: {}", timed.len());
    let (first, sixth) = (timed[0], timed[5]);
    let span = sixth.at() - first.at();
    // Five intervals of 1 s: at least five beats within about five seconds.
    assert!(
        span >= Duration::from_millis(4800),
        "beats too fast: {span:?}"
    );
    assert!(
        span <= Duration::from_millis(5500),
        "beats too slow: {span:?}"
    );
    let gaps = heartbeat_gaps(&dashboard.log(), first.conn());
    assert!(
        gaps.iter().all(|g| *g <= Duration::from_millis(1300)),
        "{gaps:?}"
    );
}

#[tokio::test]
async fn invalid_token_is_an_auth_failure_retried_with_backoff() {
    let dashboard = Dashboard::start().await;
    dashboard.reject_upgrades(Some(401));
    let mut options = AgentOptions::new(dashboard.url());
    options.backoff_max = 60;
    let agent = Agent::start(options).await;
    let attempts = dashboard
        .wait_for(15 * SECOND, "three upgrade attempts", |log| {
            let times: Vec<_> = log
                .iter()
                .filter(|s| matches!(s, Seen::Upgrade { .. }))
                .map(Seen::at)
                .collect();
            (times.len() >= 3).then_some(times)
        })
        .await;
    // Full jitter: each gap drawn from [0, 2 s], then [0, 6 s] (plus a
    // little for the attempt itself).
    for (gap, window) in attempts.windows(2).map(|w| w[1] - w[0]).zip([2.0, 6.0]) {
        let gap = gap.as_secs_f64();
        assert!(gap <= window + 0.25, "gap {gap} over the window {window}");
    }
    let stderr = agent.stderr();
    assert!(
        stderr.contains("401"),
        "auth failure logged with its status:\n{stderr}"
    );
    assert!(stderr.contains("authentication failed"), "{stderr}");
    assert!(!stderr.contains(TOKEN), "the token must never be logged");
    assert!(dashboard.frames("register").is_empty());
}

#[tokio::test]
async fn reconnects_after_the_dashboard_restarts_and_registers_again() {
    let mut dashboard = Dashboard::start().await;
    let _agent = Agent::start(AgentOptions::new(dashboard.url())).await;
    let first = dashboard.wait_frame("register", 1, 10 * SECOND).await;
    dashboard.wait_frame("heartbeat", 1, 5 * SECOND).await;

    dashboard.kill();
    dashboard.restart().await;

    let second = dashboard.wait_frame("register", 2, 10 * SECOND).await;
    assert_ne!(first.conn(), second.conn());
    let beat = dashboard
        .wait_for(5 * SECOND, "heartbeat on the new connection", |log| {
            log.iter()
                .find(|s| s.conn() == second.conn() && s.kind() == Some("heartbeat"))
                .cloned()
        })
        .await;
    assert!(
        beat.at() - second.at() < Duration::from_millis(500),
        "immediate heartbeat after re-register"
    );
    let on_new_conn: Vec<_> = dashboard
        .log()
        .into_iter()
        .filter(|s| s.conn() == second.conn() && s.kind().is_some())
        .collect();
    assert_eq!(
        on_new_conn[0].kind(),
        Some("register"),
        "register first on the new connection"
    );
}

#[tokio::test]
async fn malformed_unknown_and_binary_frames_do_not_drop_the_connection() {
    let dashboard = Dashboard::start().await;
    let agent = Agent::start(AgentOptions::new(dashboard.url())).await;
    let register = dashboard.wait_frame("register", 1, 10 * SECOND).await;
    let conn = register.conn();

    dashboard.send_raw(conn, Message::text("this is not json"));
    dashboard.send_raw(conn, Message::text("{\"payload\": {}}"));
    dashboard.send_raw(conn, Message::text("[1,2,3]"));
    dashboard.send_json(conn, json!({"type": "command", "payload": {"command": 42}}));
    dashboard.send_json(
        conn,
        json!({"type": "kill_command", "payload": {"signal": "SIGHUP"}}),
    );
    dashboard.send_json(
        conn,
        json!({"type": "from_the_future", "payload": {"x": 1}}),
    );
    dashboard.send_raw(conn, Message::binary(vec![0u8, 159, 146, 150]));
    // Still processing: a later, valid message gets its answer.
    dashboard.command(conn, "no-such-command");
    let rejected = dashboard
        .wait_frame("command_rejected", 1, 5 * SECOND)
        .await;
    assert_eq!(rejected.conn(), conn, "same connection");
    assert_eq!(
        rejected.payload()["reason"],
        "unknown command: no-such-command"
    );
    assert_eq!(rejected.payload()["current_command"], "");
    assert_eq!(rejected.payload()["current_pid"], 0);
    // And heartbeats keep coming on it.
    let n = dashboard.frames("heartbeat").len();
    dashboard.wait_frame("heartbeat", n + 1, 5 * SECOND).await;
    assert_eq!(dashboard.frames("register").len(), 1, "never reconnected");
    let stderr = agent.stderr();
    assert!(stderr.contains("ignoring a bad message"), "{stderr}");
}

#[tokio::test]
async fn oversized_frames_are_refused_with_1009_then_reconnect() {
    let dashboard = Dashboard::start().await;
    let _agent = Agent::start(AgentOptions::new(dashboard.url())).await;
    let register = dashboard.wait_frame("register", 1, 10 * SECOND).await;
    let huge = format!(
        "{{\"type\":\"x\",\"payload\":\"{}\"}}",
        "a".repeat(1024 * 1024 + 10)
    );
    dashboard.send_raw(register.conn(), Message::text(huge));
    let (code, reason, _) = dashboard.wait_close(5 * SECOND).await;
    assert_eq!(code, Some(1009), "{reason}");
    dashboard.wait_frame("register", 2, 10 * SECOND).await;
}

#[tokio::test]
async fn sigterm_closes_with_1000_shutdown_and_exits_zero() {
    let dashboard = Dashboard::start().await;
    let mut agent = Agent::start(AgentOptions::new(dashboard.url())).await;
    dashboard.wait_frame("heartbeat", 1, 10 * SECOND).await;
    agent.signal(15);
    let (code, reason, _) = dashboard.wait_close(5 * SECOND).await;
    assert_eq!(code, Some(1000));
    assert_eq!(reason, "shutdown");
    assert_eq!(agent.wait_exit(6 * SECOND).await, Some(0));
}

#[tokio::test]
async fn sigint_also_shuts_down_cleanly_when_disconnected() {
    // No dashboard at all: the agent must still stop at once.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    drop(listener);
    let mut agent = Agent::start(AgentOptions::new(url)).await;
    // Wait until it has tried (and failed) at least once.
    let deadline = tokio::time::Instant::now() + 10 * SECOND;
    while !agent.stderr().contains("reconnecting") {
        assert!(tokio::time::Instant::now() < deadline, "{}", agent.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.signal(2);
    assert_eq!(agent.wait_exit(3 * SECOND).await, Some(0));
}

#[tokio::test]
async fn a_silent_peer_is_detected_within_ping_timeout_and_the_agent_reconnects() {
    let dashboard = Dashboard::start().await;
    let proxy = FreezableProxy::start(dashboard.addr).await;
    let mut options = AgentOptions::new(proxy.url());
    options.ping_interval = 1;
    options.ping_timeout = 3;
    let _agent = Agent::start(options).await;
    dashboard.wait_frame("heartbeat", 1, 10 * SECOND).await;

    proxy.freeze(true);
    let frozen_at = tokio::time::Instant::now();
    // The agent gives up on the frozen connection after ping_timeout and
    // dials again after its first backoff step (at most 2 s).
    let redial = proxy.wait_accepts(2, 10 * SECOND).await;
    let noticed_within = (redial - frozen_at).as_secs_f64() - 2.0;
    assert!(
        noticed_within <= 3.0 + 1.0,
        "dead peer noticed after {noticed_within:.2}s"
    );
    assert!(
        redial - frozen_at >= Duration::from_millis(2000),
        "not before ping_timeout"
    );
    proxy.freeze(false);
    dashboard.wait_frame("register", 2, 10 * SECOND).await;
}

#[tokio::test]
async fn closes_with_1008_and_1011_are_treated_as_drops() {
    let dashboard = Dashboard::start().await;
    let _agent = Agent::start(AgentOptions::new(dashboard.url())).await;
    let first = dashboard.wait_frame("register", 1, 10 * SECOND).await;
    dashboard.close(first.conn(), 1008, "duplicate host");
    let second = dashboard.wait_frame("register", 2, 10 * SECOND).await;
    dashboard.close(second.conn(), 1011, "server error");
    dashboard.wait_frame("register", 3, 10 * SECOND).await;
}

#[tokio::test]
async fn stasysmo_metrics_are_read_back_exactly() {
    let dashboard = Dashboard::start().await;
    let stasysmo = tempfile::tempdir().unwrap();
    for (name, value) in [
        ("cpu", "12.5"),
        ("ram", "63.25"),
        ("swap", "1.5"),
        ("load", "0.75"),
    ] {
        std::fs::write(stasysmo.path().join(name), format!("{value}\n")).unwrap();
    }
    let mut options = AgentOptions::new(dashboard.url());
    options.metrics = "stasysmo";
    options.extra_toml.push(format!(
        "stasysmo_dir = {:?}",
        stasysmo.path().display().to_string()
    ));
    let _agent = Agent::start(options).await;
    let beat = dashboard.wait_frame("heartbeat", 1, 10 * SECOND).await;
    assert_eq!(
        beat.payload()["metrics"],
        json!({"cpu": 12.5, "ram": 63.25, "swap": 1.5, "load": 0.75})
    );
}

#[tokio::test]
async fn proc_metrics_are_sane() {
    let dashboard = Dashboard::start().await;
    let mut options = AgentOptions::new(dashboard.url());
    options.metrics = "proc";
    let _agent = Agent::start(options).await;
    let beat = dashboard.wait_frame("heartbeat", 2, 10 * SECOND).await;
    let m = &beat.payload()["metrics"];
    for key in ["cpu", "ram", "swap"] {
        let v = m[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing in {m}"));
        assert!((0.0..=100.0).contains(&v), "{key} = {v}");
    }
    assert!(m["load"].as_f64().unwrap() >= 0.0);
}

#[tokio::test]
async fn generation_follows_the_repository_head() {
    let dashboard = Dashboard::start().await;
    let (dir, _) = Agent::prepare(&AgentOptions::new(dashboard.url()));
    let repo = dir.path().join("repo");
    let git = |args: &[&str]| git(&repo, args);
    git(&["init", "-q", "-b", "main"]);
    git(&["commit", "-q", "--allow-empty", "-m", "one"]);
    let first = git(&["rev-parse", "--short=7", "HEAD"]);
    let _agent = Agent::spawn(dir, AgentOptions::new(dashboard.url())).await;
    let register = dashboard.wait_frame("register", 1, 10 * SECOND).await;
    assert_eq!(register.payload()["generation"], first.as_str());
    git(&["commit", "-q", "--allow-empty", "-m", "two"]);
    let second = git(&["rev-parse", "--short=7", "HEAD"]);
    dashboard
        .wait_frame_where("heartbeat", 5 * SECOND, |p| {
            p["generation"] == second.as_str()
        })
        .await;
}
