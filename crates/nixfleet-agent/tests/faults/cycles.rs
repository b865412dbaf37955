//! A thousand (in CI, a hundred) connect/disconnect cycles: no memory,
//! descriptors or heartbeats lost along the way.

use super::*;

/// Cycles (`NIXFLEET_FAULT_CYCLES` overrides). The agent's first backoff
/// step is shortened to 5 ms through its debug-only test hook, so that the
/// thousand reconnects take seconds instead of the spec's 1 s each;
/// scripts/soak.sh also runs them at full backoff.
fn cycles() -> usize {
    std::env::var("NIXFLEET_FAULT_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

#[tokio::test]
async fn connect_disconnect_cycles_leak_neither_memory_nor_descriptors() {
    const WARM_UP: usize = 10;
    let total = WARM_UP + cycles();
    let dashboard = Dashboard::start().await;
    let mut options = AgentOptions::new(dashboard.url());
    // Slow timers: only the cycles themselves run.
    options.interval = 30;
    options.ping_interval = 15;
    options.ping_timeout = 45;
    options.backoff_max = 60;
    if std::env::var_os("NIXFLEET_FAULT_FULL_BACKOFF").is_none() {
        options
            .env
            .push(("NIXFLEET_TEST_FIRST_BACKOFF_MS".into(), "5".into()));
    }
    let mut agent = Agent::start(options).await;
    let (mut rss_before, mut fds_before, mut threads_before) = (0, 0, 0);
    let started = Instant::now();
    for n in 1..=total {
        let register = dashboard.wait_frame("register", n, 10 * SECOND).await;
        if n == WARM_UP + 1 {
            // Measured once the session is fully set up (its heartbeat timer
            // exists), as the "after" figure is.
            wait_heartbeat_on(&dashboard, register.conn()).await;
            rss_before = agent.rss_kib();
            fds_before = settled_fd_count(&agent).await;
            threads_before = agent.thread_count();
        }
        // Acknowledge (which resets the backoff to its first step), then
        // close at once, as a dashboard restarting its workers would.
        dashboard.send_json(
            register.conn(),
            json!({"type": "registered", "payload": {"host_id": format!("h-{n}")}}),
        );
        let code = if n % 2 == 0 { 1011 } else { 1000 };
        dashboard.close(register.conn(), code, "cycle");
    }
    // After the last close, once the agent is waiting to reconnect.
    dashboard
        .wait_for(10 * SECOND, "the last connection gone", |log| {
            log.iter()
                .rev()
                .take(20)
                .any(|s| matches!(s, Seen::Gone { .. }))
                .then_some(())
        })
        .await;
    let last = dashboard
        .wait_frame("register", total + 1, 10 * SECOND)
        .await;
    wait_heartbeat_on(&dashboard, last.conn()).await;
    let rss_after = agent.rss_kib();
    let fds_after = settled_fd_count(&agent).await;
    let threads_after = agent.thread_count();
    let elapsed = started.elapsed();
    eprintln!(
        "figures: {} connect/disconnect cycles in {:.0} s: RSS {rss_before} KiB before, \
         {rss_after} KiB after ({:+} KiB); fds {fds_before} → {fds_after}; threads \
         {threads_before} → {threads_after}",
        total - WARM_UP,
        elapsed.as_secs_f64(),
        rss_after as i64 - rss_before as i64
    );
    assert!(agent.is_running());
    assert!(
        rss_after <= rss_before + 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB over {} cycles",
        total - WARM_UP
    );
    assert!(
        fds_after <= fds_before,
        "descriptors leak: {fds_before} → {fds_after}: {:?}",
        agent.fd_targets()
    );
    assert!(
        threads_after <= threads_before.max(1) + 1,
        "threads: {threads_before} → {threads_after}"
    );
    let stderr = agent.stderr();
    assert!(!stderr.contains("panicked"));
    assert!(!stderr.contains(TOKEN));
}

/// The first heartbeat on connection `conn`: the agent creates its heartbeat
/// timer (a timerfd) just after `register`, so a descriptor count taken
/// between the two would see one fewer.
async fn wait_heartbeat_on(dashboard: &Dashboard, conn: u64) {
    dashboard
        .wait_for(10 * SECOND, "a heartbeat on the new connection", |log| {
            log.iter()
                .rev()
                .take_while(|seen| seen.conn() == conn)
                .any(|seen| matches!(seen, Seen::Frame { kind, .. } if kind == "heartbeat"))
                .then_some(())
        })
        .await;
}

/// The agent's descriptors, counted while it writes no state file: each
/// write goes through a temporary file (`*.tmp`) that is open only for it,
/// and a link that changes starts one, so a count taken mid-write would
/// see a descriptor about to close. One that stays open fails here.
async fn settled_fd_count(agent: &Agent) -> usize {
    let deadline = Instant::now() + 10 * SECOND;
    loop {
        let targets = agent.fd_targets();
        if !targets.iter().any(|t| t.ends_with(".tmp")) {
            return targets.len();
        }
        assert!(
            Instant::now() < deadline,
            "a temporary file stays open: {targets:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
