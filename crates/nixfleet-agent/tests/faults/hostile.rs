//! A barrage of hostile frames: the agent neither crashes nor stalls nor
//! drops the connection.

use super::*;

/// A frame from a hostile or broken dashboard.
fn hostile_frame(rng: &mut StdRng) -> Message {
    let long = |rng: &mut StdRng| "A".repeat(rng.random_range(1_000..200_000));
    let nasty = |rng: &mut StdRng| -> String {
        let pieces = [
            "\n",
            "\r",
            "\u{1b}[31m",
            "\u{0}",
            "\u{202e}",
            "é",
            "😀",
            "\\",
            "\"",
            "'",
            "$(touch /tmp/pwned)",
            "; rm -rf /",
            "../../",
            "%n%s",
            "switch",
            "stop",
            " ",
            "\t",
        ];
        (0..rng.random_range(0..12))
            .map(|_| pieces[rng.random_range(0..pieces.len())])
            .collect()
    };
    let pick = rng.random_range(0..24);
    let frame = match pick {
        0 => nasty(rng),
        1 => {
            let bytes: Vec<u8> = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
            return Message::binary(bytes);
        }
        2 => String::from_utf8_lossy(&(0..rng.random_range(0..64)).map(|_| rng.random()).collect::<Vec<u8>>()).into_owned(),
        3 => format!("{}1{}", "[".repeat(rng.random_range(1..100_000)), "]".repeat(rng.random_range(0..3))),
        4 => format!("{{\"type\":\"command\",\"payload\":{}", "{\"a\":".repeat(rng.random_range(1..50_000))),
        5 => json!({"type": nasty(rng), "payload": {"command": "switch"}}).to_string(),
        6 => json!({"type": long(rng)}).to_string(),
        7 => json!({"type": "command", "payload": {"command": nasty(rng)}}).to_string(),
        8 => json!({"type": "command", "payload": {"command": long(rng)}}).to_string(),
        9 => json!({"type": "command", "payload": {"command": [1, {"x": null}]}}).to_string(),
        10 => json!({"type": "command", "payload": ["switch", "extra"]}).to_string(),
        11 => json!({"type": "command"}).to_string(),
        12 => json!({"type": "kill_command", "payload": {"signal": nasty(rng), "pid": rng.random::<i64>()}}).to_string(),
        13 => json!({"type": "kill_command", "payload": {"signal": "SIGKILL", "pid": rng.random::<u32>()}}).to_string(),
        14 => json!({"type": "kill_command", "payload": {"pid": 1}}).to_string(),
        15 => json!({"type": "kill_command", "payload": {"pid": 1.5e300}}).to_string(),
        16 => json!({"type": "registered", "payload": {"host_id": nasty(rng)}}).to_string(),
        17 => json!({"type": "registered", "payload": {"host_id": {"deep": [1, 2, {"x": long(rng)}]}}}).to_string(),
        18 => json!({"type": "registered", "payload": 42}).to_string(),
        19 => r#"{"type":"command","type":"kill_command","payload":{"command":"switch"}}"#.to_owned(),
        20 => format!("{{\"type\":\"command\",\"payload\":{{\"command\":\"{}\"}}}}", "\\ud800"),
        21 => json!({"type": null, "payload": {"command": "switch"}}).to_string(),
        // Commands that are real: they run the harmless stand-ins.
        22 => {
            let names = ["switch", "boot", "rollback", "pull", "pull-switch", "test", "stop"];
            json!({"type": "command", "payload": {"command": names[rng.random_range(0..names.len())]}}).to_string()
        }
        _ => json!({"type": "kill_command", "payload": {"signal": "SIGTERM", "pid": 0}}).to_string(),
    };
    Message::text(frame)
}

#[tokio::test]
async fn hostile_frames_never_crash_stall_or_disconnect_the_agent() {
    let seed: u64 = std::env::var("NIXFLEET_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("hostile frames: seed {seed} (NIXFLEET_FAULT_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let dashboard = Dashboard::start().await;
    let mut options = AgentOptions::new(dashboard.url());
    options.ping_timeout = 5;
    let (dir, bin) = Agent::prepare(&options);
    // The rebuild fails: a switch that succeeds registers again on a
    // fresh connection by design, and this test proves that nothing the
    // dashboard sends makes the agent leave its connection.
    script(
        &bin,
        "nixos-rebuild",
        "echo \"rebuild $*\"\nsleep 0.05\nexit 1",
    );
    script(&bin, "git", "echo \"git $*\"");
    let mut agent = Agent::spawn(dir, options).await;
    let register = dashboard.wait_frame("register", 1, 10 * SECOND).await;
    let conn = register.conn();

    let started = Instant::now();
    let mut sent = 0;
    while sent < 3000 {
        dashboard.send_raw(conn, hostile_frame(&mut rng));
        sent += 1;
        if sent % 500 == 0 {
            // Let heartbeats through now and then, as a real link would.
            dashboard
                .wait_frame(
                    "heartbeat",
                    dashboard.frames("heartbeat").len() + 1,
                    5 * SECOND,
                )
                .await;
        }
    }
    // Afterwards the agent still answers, on the same connection. (A
    // rejection may be dropped while the connection is backed up, so ask
    // again until one arrives.)
    let sentinel = "sentinel-after-the-barrage";
    let mut rejected = None;
    for _ in 0..10 {
        dashboard.command(conn, sentinel);
        let wait = dashboard.wait_frame_where("command_rejected", 3 * SECOND, |p| {
            p["reason"].as_str().is_some_and(|r| r.contains(sentinel))
        });
        if let Ok(found) = tokio::time::timeout(2 * SECOND, wait).await {
            rejected = Some(found);
            break;
        }
    }
    let rejected = rejected.expect("the agent answers after the barrage");
    assert_eq!(rejected.conn(), conn);
    // Wait for the agent to be idle after the barrage (a heartbeat after the
    // sentinel's rejection that names no command: every accepted command
    // has ended), then check every accepted command got exactly one status.
    // An idle heartbeat from before the sentinel proves nothing.
    let sentinel_at = rejected.at();
    dashboard
        .wait_for(20 * SECOND, "an idle heartbeat after the barrage", |log| {
            log.iter()
                .any(|s| {
                    s.kind() == Some("heartbeat")
                        && s.at() > sentinel_at
                        && s.payload()["pending_command"].is_null()
                })
                .then_some(())
        })
        .await;
    let idle = dashboard.frames("heartbeat").len();
    let last = dashboard
        .wait_frame("heartbeat", idle + 2, 5 * SECOND)
        .await;
    let log = dashboard.log();
    assert!(agent.is_running(), "the agent died:\n{}", agent.stderr());
    assert_eq!(
        dashboard.frames("register").len(),
        1,
        "the agent reconnected; its log:\n{}",
        agent.stderr()
    );
    let silence = longest_heartbeat_silence(&log, started, last.at());
    assert!(silence < 3 * SECOND, "{silence:?} without a heartbeat");
    let stderr = agent.stderr();
    assert!(!stderr.contains("panicked"), "{stderr}");
    let started_commands = stderr.lines().filter(|l| l.contains(" starting ")).count();
    let statuses = log.iter().filter(|s| s.kind() == Some("status")).count();
    eprintln!(
        "figures: {sent} hostile frames: {started_commands} commands started, {statuses} statuses, \
         {} rejections delivered, longest heartbeat silence {:.2} s",
        log.iter()
            .filter(|s| s.kind() == Some("command_rejected"))
            .count(),
        silence.as_secs_f64()
    );
    assert_eq!(
        statuses,
        started_commands,
        "one status per accepted command; started: {:?}; statuses: {:?}",
        stderr
            .lines()
            .filter(|l| l.contains(" starting "))
            .collect::<Vec<_>>(),
        log.iter()
            .filter(|s| s.kind() == Some("status"))
            .map(|s| s.payload()["command"].to_string())
            .collect::<Vec<_>>()
    );
    // Nothing the dashboard sends starts a log line of its own (every line
    // is the agent's, with its timestamp), or makes one huge.
    let forged: Vec<String> = stderr
        .lines()
        .filter(|l| !l.starts_with(|c: char| c.is_ascii_digit()))
        .map(|l| l.chars().take(120).collect())
        .take(5)
        .collect();
    assert!(
        forged.is_empty(),
        "log lines forged by the dashboard: {forged:?}"
    );
    // Nothing the dashboard sends makes a log line huge.
    let longest = stderr.lines().map(str::len).max().unwrap_or(0);
    let worst = stderr.lines().max_by_key(|l| l.len()).unwrap_or("");
    assert!(
        longest < 16 * 1024,
        "a {longest}-byte log line: {}…",
        worst.chars().take(300).collect::<String>()
    );
}
