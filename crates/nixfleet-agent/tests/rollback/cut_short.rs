//! A record left rolling back: the agent or the host stopped during the
//! rollback. A starting agent adopts a rollback whose supervisor still
//! runs; with none, it reports the host rolled back when the recorded
//! system runs, and otherwise runs the rollback again, once.

use crate::common::*;
use crate::host::*;
use serde_json::Value;

/// The record of a rollback started `attempts` times.
fn rolling_back(paths: &Paths, attempts: u32) -> String {
    serde_json::json!({
        "phase": "rolling_back", "command": "switch", "system": paths.old.display().to_string(),
        "generation": 7, "boot_id": "boot-a", "commit": "abc1234", "deadline": 1,
        "timeout_secs": 300, "attempts": attempts,
    })
    .to_string()
}

/// The running system is the new one (the rollback did not get there).
fn point_at_new(paths: &Paths) {
    std::fs::remove_file(&paths.link).unwrap();
    std::os::unix::fs::symlink(paths.home.join("system-new"), &paths.link).unwrap();
}

const REPORT: &str =
    "rolled back to system-old: the dashboard was unreachable for 300 s after switch abc1234";

/// The `rollback` statuses the dashboard got so far.
fn rollback_statuses(dashboard: &Dashboard) -> Vec<Value> {
    dashboard
        .frames("status")
        .iter()
        .filter(|s| s.payload()["command"] == "rollback")
        .map(|s| s.payload().clone())
        .collect()
}

/// Its supervisor and the stand-in died mid-way (the host lost power):
/// what the log holds is delivered, the rollback runs again, and the
/// dashboard gets one status, the second run's.
#[tokio::test]
async fn a_rollback_cut_short_runs_again_once_after_its_lines() {
    let dashboard = Dashboard::start().await;
    let (dir, paths, options) = prepare(dashboard.url(), 300);
    point_at_new(&paths);
    let logs = paths.state.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(paths.record(), rolling_back(&paths, 1)).unwrap();
    let log = logs.join("20260101T000000000Z-rollback.log");
    std::fs::write(
        &log,
        "o [nixfleet] the first run's note\n# steps 2\n# step 0 nix-env\n# step 1 activate\n\
         # start 0 4000000 nix-env\no the first run's last line\n",
    )
    .unwrap();
    let handover = serde_json::json!({
        "command": "rollback", "pid": 4_000_000u32, "pid_start": 1, "supervised": true,
        "log": log.display().to_string(), "boot_id": "boot-a",
    });
    std::fs::write(
        paths.state.join("running-command.json"),
        handover.to_string(),
    )
    .unwrap();
    let _agent = Agent::spawn(dir, options).await;

    let status = rollback_status(&dashboard).await;
    assert_eq!(status["message"], REPORT, "{status}");
    assert_eq!(status["exit_code"], 0);
    assert_eq!(rollback_runs(&paths).len(), 1);
    assert_eq!(std::fs::read_link(&paths.link).unwrap(), paths.old);
    let lines: Vec<String> = dashboard
        .frames("output")
        .iter()
        .map(|s| s.payload()["line"].as_str().unwrap_or("").to_owned())
        .collect();
    let first = lines.iter().position(|l| l == "the first run's last line");
    let again = lines
        .iter()
        .position(|l| l.ends_with("attempt 2 of 2: the one before was cut short"));
    assert!(first.is_some() && first < again, "{lines:?}");
    let record = wait_for_record(&paths, "rolled_back").await;
    assert_eq!(
        (record["attempts"].as_u64(), record["reported"].as_bool()),
        (Some(2), Some(true))
    );
    let beats = dashboard.frames("heartbeat").len();
    dashboard
        .wait_frame("heartbeat", beats + 2, 10 * SECOND)
        .await;
    assert_eq!(rollback_statuses(&dashboard).len(), 1);
}

/// Cut short after the recorded system was activated: reported as rolled
/// back, nothing runs.
#[tokio::test]
async fn a_rollback_cut_short_on_the_recorded_system_is_reported_done() {
    let dashboard = Dashboard::start().await;
    let (dir, paths, options) = prepare(dashboard.url(), 300);
    std::fs::write(paths.record(), rolling_back(&paths, 1)).unwrap();
    let _agent = Agent::spawn(dir, options).await;
    let status = rollback_status(&dashboard).await;
    assert_eq!(
        (status["status"].as_str(), status["message"].as_str()),
        (Some("error"), Some(REPORT))
    );
    assert_eq!(status["exit_code"], 0);
    dashboard
        .wait_frame_where("heartbeat", 10 * SECOND, |p| {
            p["update_status"]["system"]["message"] == REPORT
        })
        .await;
    assert!(rollback_runs(&paths).is_empty());
    assert!(!paths.home.join("nix-env-args").exists());
    assert_eq!(
        wait_for_record(&paths, "rolled_back").await["reported"],
        true
    );
}

/// Cut short a second time: reported, never a third run.
#[tokio::test]
async fn a_rollback_cut_short_twice_is_reported_and_not_run_again() {
    let dashboard = Dashboard::start().await;
    let (dir, paths, options) = prepare(dashboard.url(), 300);
    point_at_new(&paths);
    std::fs::write(paths.record(), rolling_back(&paths, 2)).unwrap();
    let agent = Agent::spawn(dir, options.clone()).await;
    let status = rollback_status(&dashboard).await;
    assert_eq!(
        status["message"],
        "the rollback to system-old was cut short 2 times (the agent or the host stopped while \
         it ran) after switch abc1234; not retried"
    );
    assert_eq!(status["exit_code"], -1);
    wait_for_record(&paths, "rolled_back").await;
    // The next agent keeps the report and runs nothing.
    let registers = dashboard.frames("register").len();
    let dir = agent.crash().await;
    let _next = Agent::spawn(dir, options).await;
    dashboard
        .wait_frame("register", registers + 1, 10 * SECOND)
        .await;
    let beats = dashboard.frames("heartbeat").len();
    dashboard
        .wait_frame("heartbeat", beats + 2, 10 * SECOND)
        .await;
    assert_eq!(rollback_statuses(&dashboard).len(), 1);
    assert!(rollback_runs(&paths).is_empty());
    assert!(!paths.home.join("nix-env-args").exists());
}

/// The agent died during its own rollback, whose supervisor goes on: the
/// next agent follows it to its end, and the rollback runs once.
#[tokio::test]
async fn a_rollback_whose_supervisor_runs_is_adopted_not_repeated() {
    let mut dashboard = Dashboard::start().await;
    let (dir, paths, options) = prepare(dashboard.url(), 2);
    std::fs::write(paths.home.join("hold-rollback"), "").unwrap();
    let agent = Agent::spawn(dir, options.clone()).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    switch_then_cut_off(&mut dashboard, &paths).await;
    wait_for_file_created(&paths.home.join("rolling")).await;
    let dir = agent.crash().await;
    let _next = Agent::spawn(dir, options).await;
    dashboard.restart().await;
    std::fs::write(paths.home.join("go"), "").unwrap();
    let status = rollback_status(&dashboard).await;
    assert_eq!(
        status["message"],
        format!(
            "rolled back to system-old: the dashboard was unreachable for 2 s after switch {}",
            paths.short_commit()
        )
        .as_str()
    );
    let record = wait_for_record(&paths, "rolled_back").await;
    assert_eq!(record["attempts"], 1);
    let beats = dashboard.frames("heartbeat").len();
    dashboard
        .wait_frame("heartbeat", beats + 2, 10 * SECOND)
        .await;
    assert_eq!(rollback_statuses(&dashboard).len(), 1);
    assert_eq!(rollback_runs(&paths).len(), 1);
}
