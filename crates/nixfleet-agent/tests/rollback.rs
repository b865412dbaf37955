//! Safe deployments (issue 28): a switch that changed the running system
//! waits for the dashboard to confirm it, and rolls back to the recorded
//! system when that does not happen within `confirm_timeout`.
//!
//! Stand-ins: `nixos-rebuild` (the switch flips a fake `current-system`
//! link), `nix-env` (records its arguments) and the recorded system's
//! `bin/switch-to-configuration` (flips the link back).

mod common;
#[path = "rollback/cut_short.rs"]
mod cut_short;
#[path = "rollback/host.rs"]
mod host;
#[path = "rollback/timer.rs"]
mod timer;

use common::*;
use host::*;
use std::time::Duration;

/// `--check-config` with the safe-deployment keys set in `toml`.
fn check_config(toml: &str, env: &[(&str, &str)]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("repo")).unwrap();
    let config = dir.path().join("agent.toml");
    let base = format!(
        "url = \"ws://127.0.0.1:9/ws\"\ntoken = \"t\"\nhostname = \"h\"\nrepo_dir = {:?}\nstate_dir = {:?}\n",
        dir.path().join("repo").display().to_string(),
        dir.path().join("state").display().to_string(),
    );
    std::fs::write(&config, format!("{base}{toml}")).unwrap();
    set_mode(&config, 0o600);
    std::process::Command::new(env!("CARGO_BIN_EXE_nixfleet-agent"))
        .arg("--check-config")
        .arg("--config")
        .arg(&config)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn the_safe_deployment_keys_have_defaults_and_are_validated() {
    let out = check_config("", &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("confirm_timeout = 300"), "{stdout}");
    assert!(
        stdout.contains("rollback_on_failed_tests = false"),
        "{stdout}"
    );

    let out = check_config(
        "confirm_timeout = \"2m\"\nrollback_on_failed_tests = true\n",
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("confirm_timeout = 120"), "{stdout}");
    assert!(
        stdout.contains("rollback_on_failed_tests = true"),
        "{stdout}"
    );

    let out = check_config("", &[("NIXFLEET_CONFIRM_TIMEOUT", "0")]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("confirm_timeout = 0"));

    for (toml, needle) in [
        ("confirm_timeout = -5\n", "confirm_timeout"),
        ("confirm_timeout = 86401\n", "confirm_timeout"),
        (
            "rollback_on_failed_tests = \"maybe\"\n",
            "rollback_on_failed_tests",
        ),
        ("rollback_on_failed_tests = 3\n", "rollback_on_failed_tests"),
    ] {
        let out = check_config(toml, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{toml}: {stderr}");
        assert!(stderr.contains(needle), "{toml}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
}

#[tokio::test]
async fn an_unconfirmed_switch_rolls_back_to_the_recorded_system_and_reports_it() {
    let mut dashboard = Dashboard::start().await;
    let (dir, paths, options) = prepare(dashboard.url(), 2);
    let agent = Agent::spawn(dir, options).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    switch_then_cut_off(&mut dashboard, &paths).await;

    wait_for_file(&paths.home.join("rolled-back"), 60 * SECOND).await;
    let nix_env = std::fs::read_to_string(paths.home.join("nix-env-args")).unwrap();
    assert_eq!(
        nix_env.trim(),
        format!(
            "--profile {} --set {}",
            paths.profile.display(),
            paths.old.display()
        )
    );
    assert_eq!(std::fs::read_link(&paths.link).unwrap(), paths.old);

    dashboard.restart().await;
    let status = rollback_status(&dashboard).await;
    let message = format!(
        "rolled back to system-old: the dashboard was unreachable for 2 s after switch {}",
        paths.short_commit()
    );
    assert_eq!(status["status"], "error", "{status}");
    assert_eq!(status["message"], message.as_str());
    assert_eq!(status["exit_code"], 0);
    let output: Vec<String> = dashboard
        .frames("output")
        .iter()
        .filter(|f| f.payload()["command"] == "rollback")
        .map(|f| f.payload()["line"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(
        output.iter().any(|l| l == "activating the old system"),
        "{output:?}"
    );
    assert!(
        output
            .iter()
            .any(|l| l.contains("was not confirmed within 2 s")),
        "{output:?}"
    );
    dashboard
        .wait_frame_where("heartbeat", 10 * SECOND, |p| {
            p["update_status"]["system"]["status"] == "error"
                && p["update_status"]["system"]["message"] == message.as_str()
        })
        .await;
    assert_eq!(
        wait_for_record(&paths, "rolled_back").await["report"],
        message.as_str()
    );
    assert_eq!(rollback_runs(&paths).len(), 1);
    drop(agent);
}

#[tokio::test]
async fn the_dashboards_registered_reply_confirms_the_switch() {
    let dashboard = Dashboard::start().await;
    let (dir, paths, options) = prepare(dashboard.url(), 60);
    let _agent = Agent::spawn(dir, options).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    dashboard.command(dashboard.current_conn().unwrap(), "switch");
    let status = dashboard.wait_frame("status", 1, 20 * SECOND).await;
    assert_eq!(status.payload()["status"], "ok");
    let record = wait_for_record(&paths, "armed").await;
    assert_eq!(record["system"], paths.old.display().to_string());
    assert_eq!(record["generation"], 7);
    assert_eq!(record["boot_id"], "boot-a");
    assert_eq!(record["commit"], paths.short_commit());
    let register = dashboard.wait_frame("register", 2, 10 * SECOND).await;
    // While it is unconfirmed, a second switch is refused with the reason.
    dashboard.command(register.conn(), "switch");
    let rejected = dashboard
        .wait_frame("command_rejected", 1, 10 * SECOND)
        .await;
    let reason = rejected.payload()["reason"].as_str().unwrap().to_owned();
    assert!(
        reason.starts_with(&format!(
            "switch {} is not confirmed yet",
            paths.short_commit()
        )),
        "{reason}"
    );
    dashboard.send_json(
        register.conn(),
        serde_json::json!({"type": "registered", "payload": {"host_id": "h1"}}),
    );
    wait_for_no_record(&paths).await;
    // Confirmed: a switch is accepted again.
    dashboard.command(register.conn(), "switch");
    dashboard.wait_frame("status", 2, 20 * SECOND).await;
    assert!(rollback_runs(&paths).is_empty());
    assert!(!paths.home.join("nix-env-args").exists());
}

#[tokio::test]
async fn a_connection_that_stays_up_confirms_for_a_dashboard_that_never_answers() {
    let dashboard = Dashboard::start().await;
    let (dir, paths, options) = prepare(dashboard.url(), 60);
    let agent = Agent::spawn(dir, options).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    dashboard.command(dashboard.current_conn().unwrap(), "switch");
    wait_for_record(&paths, "armed").await;
    wait_for_no_record(&paths).await;
    agent
        .wait_stderr(
            "the switch is confirmed: a connection opened after it stayed up",
            5 * SECOND,
        )
        .await;
    assert!(rollback_runs(&paths).is_empty());
    assert!(
        dashboard
            .frames("status")
            .iter()
            .all(|s| s.payload()["command"] == "switch")
    );
}

#[tokio::test]
async fn confirm_timeout_zero_never_arms() {
    let mut dashboard = Dashboard::start().await;
    let (dir, paths, options) = prepare(dashboard.url(), 0);
    let agent = Agent::spawn(dir, options).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    switch_then_cut_off(&mut dashboard, &paths).await;
    dashboard.restart().await;
    let status = dashboard.wait_frame("status", 1, 30 * SECOND).await;
    assert_eq!(status.payload()["command"], "switch");
    assert_eq!(status.payload()["status"], "ok");
    assert!(!paths.record().exists());
    assert!(!agent.stderr().contains("unless the dashboard confirms it"));
    assert!(rollback_runs(&paths).is_empty());
}

#[tokio::test]
async fn the_countdown_survives_the_agents_death() {
    let mut dashboard = Dashboard::start().await;
    let (dir, paths, options) = prepare(dashboard.url(), 4);
    let agent = Agent::spawn(dir, options.clone()).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    switch_then_cut_off(&mut dashboard, &paths).await;
    let record = wait_for_record(&paths, "armed").await;
    let deadline = record["deadline"].as_u64().unwrap();
    let dir = agent.crash().await;
    let _second = Agent::spawn(dir, options).await;

    wait_for_file(&paths.home.join("rolled-back"), 60 * SECOND).await;
    let runs = rollback_runs(&paths);
    assert_eq!(runs.len(), 1, "{runs:?}");
    let at: u64 = runs[0].split(' ').nth(1).unwrap().parse().unwrap();
    assert!(
        at >= deadline,
        "rolled back at {at}, before the deadline {deadline}"
    );
    dashboard.restart().await;
    let status = rollback_status(&dashboard).await;
    assert_eq!(status["status"], "error");
    assert_eq!(
        status["message"],
        format!(
            "rolled back to system-old: the dashboard was unreachable for 4 s after switch {}",
            paths.short_commit()
        )
        .as_str()
    );
}

#[tokio::test]
async fn a_record_from_another_boot_is_discarded_and_reported() {
    let dashboard = Dashboard::start().await;
    let (dir, paths, options) = prepare(dashboard.url(), 60);
    let record = serde_json::json!({
        "phase": "armed", "command": "switch", "system": paths.old.display().to_string(),
        "generation": 7, "boot_id": "boot-before", "commit": "abc1234", "deadline": 1,
        "timeout_secs": 60,
    });
    std::fs::create_dir_all(&paths.state).unwrap();
    std::fs::write(paths.record(), record.to_string()).unwrap();
    let _agent = Agent::spawn(dir, options).await;
    let status = rollback_status(&dashboard).await;
    assert_eq!(status["status"], "warning", "{status}");
    assert_eq!(
        status["message"],
        "not rolling back: the host rebooted before switch abc1234 was confirmed; it runs system-old"
    );
    assert!(!paths.record().exists());
    assert!(rollback_runs(&paths).is_empty());
    assert!(!paths.home.join("nix-env-args").exists());
}

#[tokio::test]
async fn a_failed_rollback_is_reported_once_and_never_retried() {
    let mut dashboard = Dashboard::start().await;
    let (dir, paths, options) = prepare(dashboard.url(), 2);
    std::fs::write(paths.home.join("old-exit"), "3").unwrap();
    let agent = Agent::spawn(dir, options.clone()).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    switch_then_cut_off(&mut dashboard, &paths).await;
    wait_for_record(&paths, "rolled_back").await;
    dashboard.restart().await;
    let status = rollback_status(&dashboard).await;
    assert_eq!(status["status"], "error");
    assert_eq!(status["exit_code"], 3);
    let message = status["message"].as_str().unwrap().to_owned();
    assert!(
        message.starts_with("rollback to system-old failed (exit 3"),
        "{message}"
    );
    assert!(message.ends_with("; not retried"), "{message}");

    // A restarted agent keeps the report in the system compartment and
    // does not run the rollback again. (Crashed once the status is known
    // delivered, i.e. the running-command record is gone: before that, a
    // next agent sends the status again, by design.)
    let handover = paths.state.join("running-command.json");
    let deadline = tokio::time::Instant::now() + 30 * SECOND;
    while handover.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rollback's record stayed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let registers = dashboard.frames("register").len();
    let dir = agent.crash().await;
    let _second = Agent::spawn(dir, options).await;
    let register = dashboard
        .wait_frame("register", registers + 1, 10 * SECOND)
        .await;
    dashboard
        .wait_for(10 * SECOND, "the new agent's system compartment", |log| {
            log.iter()
                .find(|s| {
                    s.conn() == register.conn()
                        && s.kind() == Some("heartbeat")
                        && s.payload()["update_status"]["system"]["message"] == message.as_str()
                })
                .map(|_| ())
        })
        .await;
    assert_eq!(rollback_runs(&paths).len(), 1);
    let statuses = dashboard.frames("status");
    let rollbacks = statuses
        .iter()
        .filter(|s| s.payload()["command"] == "rollback")
        .count();
    assert_eq!(rollbacks, 1);
}

#[tokio::test]
async fn a_failing_test_after_the_switch_rolls_it_back_with_the_tests_name() {
    let dashboard = Dashboard::start().await;
    let (dir, paths, options, tests) = prepare_with_tests(dashboard.url(), 60);
    script(&tests, "T1-ok.sh", "echo fine");
    script(
        &tests,
        "T2-net.sh",
        "echo 'no route to the dashboard' >&2\nexit 1",
    );
    let _agent = Agent::spawn(dir, options).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    dashboard.command(dashboard.current_conn().unwrap(), "switch");

    let status = rollback_status(&dashboard).await;
    assert_eq!(status["status"], "error");
    assert_eq!(
        status["message"],
        format!(
            "rolled back to system-old: the host's tests failed after switch {}: T2-net.sh",
            paths.short_commit()
        )
        .as_str()
    );
    let commands: Vec<String> = dashboard
        .frames("status")
        .iter()
        .map(|s| format!("{} {}", s.payload()["command"], s.payload()["status"]))
        .collect();
    assert_eq!(
        commands,
        [
            "\"switch\" \"ok\"",
            "\"test\" \"error\"",
            "\"rollback\" \"error\""
        ]
    );
    assert_eq!(rollback_runs(&paths).len(), 1);
    assert_eq!(std::fs::read_link(&paths.link).unwrap(), paths.old);
}

/// The tests after the switch outlive the agent that started them: the
/// agent started next adopts their run, and its failure still rolls back.
#[tokio::test]
async fn a_failing_test_still_rolls_back_after_the_agent_died_during_the_tests() {
    let dashboard = Dashboard::start().await;
    let (dir, paths, options, tests) = prepare_with_tests(dashboard.url(), 60);
    let started = paths.home.join("test-started");
    let gate = paths.home.join("test-gate");
    script(
        &tests,
        "T1-slow-net.sh",
        &format!(
            "echo started > '{}'\nwhile [ ! -e '{}' ]; do sleep 0.1; done\necho 'no route' >&2\nexit 1",
            started.display(),
            gate.display()
        ),
    );
    let agent = Agent::spawn(dir, options.clone()).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    dashboard.command(dashboard.current_conn().unwrap(), "switch");
    wait_for_file(&started, 30 * SECOND).await;
    let dir = agent.crash().await;
    let _second = Agent::spawn(dir, options).await;
    dashboard.wait_frame("register", 2, 10 * SECOND).await;
    std::fs::write(&gate, "").unwrap();

    let status = rollback_status(&dashboard).await;
    assert_eq!(
        status["message"],
        format!(
            "rolled back to system-old: the host's tests failed after switch {}: T1-slow-net.sh",
            paths.short_commit()
        )
        .as_str()
    );
    assert_eq!(rollback_runs(&paths).len(), 1);
    assert_eq!(std::fs::read_link(&paths.link).unwrap(), paths.old);
}

#[tokio::test]
async fn passing_tests_after_the_switch_leave_it_in_place() {
    let dashboard = Dashboard::start().await;
    let (dir, paths, options, tests) = prepare_with_tests(dashboard.url(), 0);
    script(&tests, "T1-ok.sh", "echo fine");
    let _agent = Agent::spawn(dir, options).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    dashboard.command(dashboard.current_conn().unwrap(), "switch");
    let tested = dashboard
        .wait_frame_where("status", 30 * SECOND, |p| p["command"] == "test")
        .await;
    assert_eq!(tested.payload()["status"], "ok");
    wait_for_no_record(&paths).await;
    assert!(rollback_runs(&paths).is_empty());
}

#[tokio::test]
async fn the_dashboard_cannot_stop_the_rollback_nor_switch_during_it() {
    let mut dashboard = Dashboard::start().await;
    let (dir, paths, options) = prepare(dashboard.url(), 2);
    std::fs::write(paths.home.join("hold-rollback"), "").unwrap();
    let _agent = Agent::spawn(dir, options).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    switch_then_cut_off(&mut dashboard, &paths).await;
    wait_for_file_created(&paths.home.join("rolling")).await;
    dashboard.restart().await;
    let register = dashboard.wait_frame("register", 2, 30 * SECOND).await;
    dashboard.command(register.conn(), "stop");
    dashboard.command(register.conn(), "switch");
    let rejected = dashboard
        .wait_for(10 * SECOND, "two rejections", |log| {
            let reasons: Vec<String> = log
                .iter()
                .filter(|s| s.kind() == Some("command_rejected"))
                .map(|s| s.payload()["reason"].as_str().unwrap_or("").to_owned())
                .collect();
            (reasons.len() == 2).then_some(reasons)
        })
        .await;
    assert_eq!(
        rejected,
        [
            "the automatic rollback of an unconfirmed switch cannot be stopped",
            "a rollback to system-old is under way"
        ]
    );
    std::fs::write(paths.home.join("go"), "").unwrap();
    let status = rollback_status(&dashboard).await;
    assert_eq!(status["status"], "error");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .starts_with("rolled back to system-old: "),
        "{status}"
    );
}
