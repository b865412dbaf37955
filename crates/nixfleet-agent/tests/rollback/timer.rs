//! The hidden mode the transient systemd timer runs
//! (`--rollback-if-unconfirmed`), with the test's stand-ins: it rolls back
//! only when no agent runs, through the command path (a supervisor and a
//! command log), and the next agent delivers the rollback's lines, then its
//! one status.

use crate::common::*;
use crate::host::*;
use std::time::Duration;

/// The hidden mode, run as systemd would run it (the stand-ins first on
/// its PATH); its stdout.
pub fn run_timer_mode(paths: &Paths, options: &AgentOptions) -> String {
    let path = format!(
        "{}:{}",
        paths.home.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nixfleet-agent"))
        .arg("--rollback-if-unconfirmed")
        .arg(&paths.state)
        .env_clear()
        .env("PATH", path)
        .env("HOME", &paths.home)
        .envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn armed_record(paths: &Paths, deadline: u64) -> String {
    serde_json::json!({
        "phase": "armed", "command": "switch", "system": paths.old.display().to_string(),
        "generation": 7, "boot_id": "boot-a", "commit": "abc1234", "deadline": deadline,
        "timeout_secs": 300,
    })
    .to_string()
}

const REPORT: &str =
    "rolled back to system-old: the dashboard was unreachable for 300 s after switch abc1234";

/// The new system's agent cannot start: the timer's hidden mode rolls
/// back on its own, and the next agent (the old system's) sends the
/// rollback's output lines, then its status and compartment, each once.
/// While an agent runs, the hidden mode leaves the countdown to it.
#[tokio::test]
async fn the_timers_mode_rolls_back_only_without_an_agent_and_the_next_agent_reports_it() {
    let mut dashboard = Dashboard::start().await;
    let (dir, paths, options) = prepare(dashboard.url(), 300);
    let new = paths.home.join("system-new");
    std::fs::remove_file(&paths.link).unwrap();
    std::os::unix::fs::symlink(&new, &paths.link).unwrap();
    std::fs::create_dir_all(&paths.state).unwrap();
    let far = 4_000_000_000;
    std::fs::write(paths.record(), armed_record(&paths, far)).unwrap();
    let agent = Agent::spawn(dir, options.clone()).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    dashboard.kill();
    assert_eq!(
        run_timer_mode(&paths, &options).trim(),
        "the agent runs and counts down itself: nothing to do"
    );
    assert!(rollback_runs(&paths).is_empty());

    let dir = agent.crash().await;
    std::fs::write(paths.record(), armed_record(&paths, 1)).unwrap();
    let said = run_timer_mode(&paths, &options);
    // The journal gets the lines too, then the report.
    assert!(said.contains("activating the old system"), "{said}");
    assert!(said.trim_end().ends_with(REPORT), "{said}");
    assert_eq!(rollback_runs(&paths).len(), 1);
    assert_eq!(std::fs::read_link(&paths.link).unwrap(), paths.old);
    assert_eq!(
        run_timer_mode(&paths, &options).trim(),
        "the activation record is RolledBack: nothing to do"
    );

    dashboard.restart().await;
    let _next = Agent::spawn(dir, options).await;
    let status = dashboard
        .wait_frame_where("status", 30 * SECOND, |p| p["command"] == "rollback")
        .await;
    assert_eq!(status.payload()["status"], "error");
    assert_eq!(status.payload()["message"], REPORT);
    assert_eq!(status.payload()["exit_code"], 0);
    // The rollback's lines came before its status: the agent's note, then
    // what the stand-ins printed.
    let log = dashboard.log();
    let status_at = log
        .iter()
        .position(|s| s.kind() == Some("status") && s.payload()["command"] == "rollback")
        .unwrap();
    let lines: Vec<String> = log[..status_at]
        .iter()
        .filter(|s| s.kind() == Some("output") && s.payload()["command"] == "rollback")
        .map(|s| s.payload()["line"].as_str().unwrap_or("").to_owned())
        .collect();
    let expected = [
        "was not confirmed within 300 s: rolling back to",
        "nix-env stand-in: profile set",
        "activating the old system",
    ];
    let mut at = 0;
    for needle in expected {
        let found = lines[at..].iter().position(|l| l.contains(needle));
        assert!(found.is_some(), "{needle:?} in order among {lines:?}");
        at += found.unwrap_or(0) + 1;
    }
    // Each once: the status is delivered (its record goes), the report
    // stands in the compartment, and no second status followed.
    let record = wait_for_record(&paths, "rolled_back").await;
    assert_eq!(record["reported"], true);
    assert_eq!(record["attempts"], 1);
    wait_for_gone(&paths.state.join("running-command.json")).await;
    dashboard
        .wait_frame_where("heartbeat", 10 * SECOND, |p| {
            p["update_status"]["system"]["status"] == "error"
                && p["update_status"]["system"]["message"] == REPORT
        })
        .await;
    let heartbeats = dashboard.frames("heartbeat").len();
    dashboard
        .wait_frame("heartbeat", heartbeats + 1, 10 * SECOND)
        .await;
    let statuses = dashboard.frames("status");
    let rollbacks = statuses
        .iter()
        .filter(|s| s.payload()["command"] == "rollback")
        .count();
    assert_eq!(rollbacks, 1, "{statuses:?}");
    assert_eq!(rollback_runs(&paths).len(), 1);
}

/// Waits until a file is gone.
async fn wait_for_gone(path: &std::path::Path) {
    let deadline = tokio::time::Instant::now() + 30 * SECOND;
    while path.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} stayed: {}",
            path.display(),
            std::fs::read_to_string(path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// While the timer's rollback runs, the old system's activation may be
/// what starts the agent, and `switch-to-configuration` waits for the
/// agent's start job: an agent that waited for the lock before telling
/// systemd READY would stall the rollback it waits for. So READY comes at
/// once, and the agent connects only once the lock is free.
#[tokio::test]
async fn an_agent_started_during_the_timers_rollback_is_ready_at_once_and_waits_for_it() {
    let dashboard = Dashboard::start().await;
    let (dir, paths, mut options) = prepare(dashboard.url(), 300);
    std::fs::create_dir_all(&paths.state).unwrap();
    // The test holds the lock as the timer's rollback would.
    let lock_path = paths.state.join("activation.lock");
    let held = std::fs::File::create(&lock_path).unwrap();
    rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    let notify_dir = tempfile::tempdir().unwrap();
    let notify_path = notify_dir.path().join("notify");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    options
        .env
        .push(("NOTIFY_SOCKET".into(), notify_path.display().to_string()));
    let agent = Agent::spawn(dir, options).await;

    let mut buf = vec![0u8; 4096];
    let ready = tokio::time::timeout(10 * SECOND, async {
        loop {
            let n = notify.recv(&mut buf).await.unwrap();
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "READY=1")
            {
                break;
            }
        }
    })
    .await;
    assert!(
        ready.is_ok(),
        "no READY=1 while the lock was held: {}",
        agent.stderr()
    );
    assert!(
        dashboard.frames("register").is_empty(),
        "the agent connected before the rollback ended"
    );
    drop(held);
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    assert!(
        agent.stderr().contains("waiting for it to end"),
        "{}",
        agent.stderr()
    );
}

/// A stop asked for while the core defers its take-over (the timer's
/// rollback holds the lock) ends the agent then, not when the rollback
/// ends: the wait's thread, blocked in `flock`, is left behind.
#[tokio::test]
async fn an_agent_stopped_while_it_waits_for_the_timers_rollback_exits_at_once() {
    let dashboard = Dashboard::start().await;
    let (dir, paths, mut options) = prepare(dashboard.url(), 300);
    std::fs::create_dir_all(&paths.state).unwrap();
    let held = std::fs::File::create(paths.state.join("activation.lock")).unwrap();
    rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    options
        .env
        .push(("NIXFLEET_TEST_NO_START_UP_LOCK".into(), "1".into()));
    let mut agent = Agent::spawn(dir, options).await;
    agent
        .wait_stderr(
            "taking over what a previous agent left once it ends",
            10 * SECOND,
        )
        .await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    agent.signal(libc::SIGTERM);
    // Panics (and so releases the lock) if the agent is still there.
    assert_eq!(agent.wait_exit(10 * SECOND).await, Some(0));
    drop(held);
}

/// The core never waits for the lock on its thread. Should the start-up
/// wait not have taken it (here: skipped, as when it failed) while the
/// timer's rollback holds it, the agent still connects and answers, refuses
/// commands, and takes over what a previous agent left (here: an ended
/// switch whose status it sends) only once the lock is free.
#[tokio::test]
async fn without_the_start_up_wait_the_core_defers_the_take_over_and_still_answers() {
    let dashboard = Dashboard::start().await;
    let (dir, paths, mut options) = prepare(dashboard.url(), 300);
    let log = paths.state.join("logs/20260101T000000.000Z-switch.log");
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    std::fs::write(&log, "[nixfleet] exit code 0: ok (switch succeeded)\n").unwrap();
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    let record = serde_json::json!({"command": "switch", "pid": pid, "pid_start": 1, "log": log});
    std::fs::write(paths.state.join("running-command.json"), record.to_string()).unwrap();
    // The test holds the lock as the timer's rollback would.
    let held = std::fs::File::create(paths.state.join("activation.lock")).unwrap();
    rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    options
        .env
        .push(("NIXFLEET_TEST_NO_START_UP_LOCK".into(), "1".into()));
    let agent = Agent::spawn(dir, options).await;

    dashboard.command_first("switch").await;
    let rejected = dashboard
        .wait_frame("command_rejected", 1, 10 * SECOND)
        .await;
    let reason = rejected.payload()["reason"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(reason.contains("rollback timer"), "{reason}");
    assert!(
        dashboard.frames("status").is_empty(),
        "taken over while the lock was held"
    );
    drop(held);
    let status = dashboard.wait_frame("status", 1, 10 * SECOND).await;
    assert_eq!(status.payload()["command"], "switch");
    assert_eq!(status.payload()["status"], "ok", "{}", agent.stderr());
}
