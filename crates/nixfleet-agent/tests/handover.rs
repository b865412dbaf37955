//! Surviving a switch: the agent restarts itself only when the switch
//! changed its own unit or binary, and a new agent follows a command that a
//! previous one started.

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

const AGENT: &str = env!("CARGO_BIN_EXE_nixfleet-agent");

fn unit_text(program: &str, marker: &str) -> String {
    format!("[Service]\nType=notify\nExecStart={program} --config /etc/nixfleet.toml\n# {marker}\n")
}

/// An agent whose "own unit file" is a symlink (as on NixOS) under `dir`.
async fn agent_with_unit(dashboard: &Dashboard, rebuild: &str) -> (Agent, u64) {
    let mut options = AgentOptions::new(dashboard.url());
    let (dir, bin) = Agent::prepare(&options);
    let units = dir.path().join("units");
    std::fs::create_dir(&units).unwrap();
    std::fs::write(units.join("old.service"), unit_text(AGENT, "old")).unwrap();
    let link = dir.path().join("nixfleet.service");
    std::os::unix::fs::symlink(units.join("old.service"), &link).unwrap();
    options
        .env
        .push(("NIXFLEET_TEST_UNIT_FILE".into(), link.display().to_string()));
    script(&bin, "nixos-rebuild", rebuild);
    let agent = Agent::spawn(dir, options).await;
    let conn = dashboard
        .wait_frame("register", 1, 10 * SECOND)
        .await
        .conn();
    (agent, conn)
}

#[tokio::test]
async fn a_switch_that_replaces_the_agent_delivers_the_status_then_restarts() {
    let dashboard = Dashboard::start().await;
    // The "new system" points the unit at a new file, as a NixOS switch
    // points /etc/systemd/system/nixfleet.service at a new store path.
    let rebuild = format!(
        "echo activating\nprintf '%s' '{}' > \"$HOME/units/new.service\"\nln -sfn \"$HOME/units/new.service\" \"$HOME/nixfleet.service\"",
        unit_text("/nix/store/new-nixfleet-agent/bin/nixfleet-agent", "new")
    );
    let (mut agent, conn) = agent_with_unit(&dashboard, &rebuild).await;
    dashboard.command(conn, "switch");
    let status = dashboard.wait_frame("status", 1, 10 * SECOND).await;
    assert_eq!(status.payload()["status"], "ok");
    let code = agent.wait_exit(10 * SECOND).await;
    assert_eq!(
        code,
        Some(75),
        "exits with EX_TEMPFAIL so that systemd restarts it"
    );
    let (code, _, closed_at) = dashboard.wait_close(5 * SECOND).await;
    assert!(
        closed_at >= status.at(),
        "the status is delivered before the agent leaves"
    );
    assert_eq!(code, Some(1000));
    let stderr = agent.stderr();
    assert!(stderr.contains("the switch updated this agent"), "{stderr}");
    assert!(
        !agent.state_dir.join("running-command.json").exists(),
        "nothing left to adopt"
    );
}

#[tokio::test]
async fn a_switch_that_leaves_the_agent_alone_keeps_it_running() {
    let dashboard = Dashboard::start().await;
    let (mut agent, conn) = agent_with_unit(&dashboard, "echo nothing of ours changed").await;
    dashboard.command(conn, "switch");
    let status = dashboard.wait_frame("status", 1, 10 * SECOND).await;
    assert_eq!(status.payload()["status"], "ok");
    let n = dashboard.frames("heartbeat").len();
    dashboard.wait_frame("heartbeat", n + 2, 5 * SECOND).await;
    assert!(agent.child.try_wait().unwrap().is_none(), "still running");
    // The same process registers again on a fresh connection (v3
    // dashboards wait for that), once.
    assert_eq!(dashboard.frames("register").len(), 2);
    let (code, reason, _) = dashboard.wait_close(SECOND).await;
    assert_eq!((code, reason.as_str()), (Some(1000), "re-register"));
}

/// A switch the agent did not run (a manual `nixos-rebuild switch`,
/// `system.autoUpgrade`) replaces its unit while it is idle: it notices at
/// its next checks and restarts the way it does after its own switch.
#[tokio::test]
async fn an_idle_agent_replaced_by_another_switch_restarts() {
    let dashboard = Dashboard::start().await;
    let (mut agent, _conn) = agent_with_unit(&dashboard, "echo unused").await;
    dashboard.wait_frame("heartbeat", 2, 10 * SECOND).await;
    assert!(agent.child.try_wait().unwrap().is_none(), "still running");

    let units = agent.dir.path().join("units");
    std::fs::write(
        units.join("new.service"),
        unit_text("/nix/store/new-nixfleet-agent/bin/nixfleet-agent", "new"),
    )
    .unwrap();
    let link = agent.dir.path().join("nixfleet.service");
    let swapped = agent.dir.path().join("nixfleet.service.new");
    std::os::unix::fs::symlink(units.join("new.service"), &swapped).unwrap();
    std::fs::rename(&swapped, &link).unwrap();

    // Interval 1 s, two checks in a row: about 2 s.
    let code = agent.wait_exit(10 * SECOND).await;
    assert_eq!(
        code,
        Some(75),
        "exits with EX_TEMPFAIL so that systemd restarts it"
    );
    let (code, _, _) = dashboard.wait_close(5 * SECOND).await;
    assert_eq!(code, Some(1000));
    let stderr = agent.stderr();
    assert!(
        stderr.contains("replaced by a switch it did not run"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_failed_switch_never_restarts_the_agent() {
    let dashboard = Dashboard::start().await;
    let rebuild = format!(
        "printf '%s' '{}' > \"$HOME/units/new.service\"\nln -sfn \"$HOME/units/new.service\" \"$HOME/nixfleet.service\"\nexit 1",
        unit_text(AGENT, "new")
    );
    let (mut agent, conn) = agent_with_unit(&dashboard, &rebuild).await;
    dashboard.command(conn, "switch");
    let status = dashboard.wait_frame("status", 1, 10 * SECOND).await;
    assert_eq!(status.payload()["status"], "error");
    // Long enough for the idle checks (two in a row, one per interval) to
    // have restarted it, had the failed switch's unit counted as a
    // replacement.
    let n = dashboard.frames("heartbeat").len();
    dashboard.wait_frame("heartbeat", n + 4, 10 * SECOND).await;
    assert!(agent.child.try_wait().unwrap().is_none(), "still running");
}

/// A switch that announces itself, waits for the test's word, prints once
/// more (its output outlives the first agent: its supervisor reads it) and
/// exits 0.
const WAITING_REBUILD: &str = "echo $$ > \"$HOME/pid\"\necho waiting\nwhile [ ! -e \"$HOME/go\" ]; do sleep 0.05; done\necho went";

/// Starts a switch, SIGKILLs the agent mid-way, and starts a second agent
/// on the same state. Returns it and the switch's pid.
async fn crash_mid_switch(dashboard: &Dashboard) -> (Agent, u32) {
    let options = AgentOptions::new(dashboard.url());
    let first = start_with_rebuild(dashboard.url(), WAITING_REBUILD, |_| {}).await;
    dashboard.command_first("switch").await;
    dashboard
        .wait_frame_where("output", 10 * SECOND, |p| p["line"] == "waiting")
        .await;
    let pid = read_pid(&first.dir.path().join("pid"));
    let dir = first.crash().await;
    (Agent::spawn(dir, options).await, pid)
}

#[tokio::test]
async fn a_new_agent_follows_a_switch_started_by_its_predecessor() {
    let dashboard = Dashboard::start().await;
    let (second, pid) = crash_mid_switch(&dashboard).await;
    let register = dashboard.wait_frame("register", 2, 10 * SECOND).await;
    let beat = dashboard
        .wait_for(5 * SECOND, "heartbeat of the new agent", |log| {
            log.iter()
                .find(|s| s.conn() == register.conn() && s.kind() == Some("heartbeat"))
                .cloned()
        })
        .await;
    assert_eq!(beat.payload()["pending_command"], "switch");
    assert_eq!(beat.payload()["command_pid"], pid);

    std::fs::write(second.dir.path().join("go"), "").unwrap();
    let status = dashboard.wait_frame("status", 1, 10 * SECOND).await;
    assert_eq!(status.conn(), register.conn());
    let p = status.payload();
    assert_eq!(p["command"], "switch");
    // The real exit code, from the supervisor, not "unknown".
    assert_eq!(p["status"], "ok", "{p}");
    assert_eq!(p["exit_code"], 0);
    assert_eq!(p["message"], "switch succeeded");
    let went = dashboard
        .wait_frame_where("output", 5 * SECOND, |p| p["line"] == "went")
        .await;
    assert!(
        went.at() < status.at(),
        "the line printed after the crash arrives before the status"
    );
    let after = dashboard
        .wait_for(5 * SECOND, "idle heartbeat", |log| {
            log.iter()
                .find(|s| s.at() > status.at() && s.kind() == Some("heartbeat"))
                .cloned()
        })
        .await;
    assert_eq!(after.payload()["pending_command"], Value::Null);
    assert_eq!(dashboard.frames("status").len(), 1);
}

/// Waits until `pid` is stopped (state `T`): the agent stopped itself.
async fn wait_stopped(pid: u32) {
    let deadline = tokio::time::Instant::now() + 20 * SECOND;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('T')
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent {pid} never stopped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The agent dies the moment its switch's supervisor has the plan, before
/// the core heard of the launch (it stops itself exactly there, then gets
/// SIGKILL): the running-command record is on disk all the same, so the
/// next agent follows the switch and reports it rather than never
/// learning of it.
#[tokio::test]
async fn a_switch_launched_just_before_the_agent_died_is_adopted() {
    let dashboard = Dashboard::start().await;
    let first = start_with_rebuild(dashboard.url(), WAITING_REBUILD, |options| {
        options
            .env
            .push(("NIXFLEET_TEST_STOP_AFTER_LAUNCH".into(), "1".into()));
    })
    .await;
    dashboard.command_first("switch").await;
    wait_stopped(first.pid()).await;
    let dir = first.crash().await;
    assert!(
        dir.path().join("state/running-command.json").exists(),
        "no running-command record: the next agent cannot know of the switch"
    );
    let second = Agent::spawn(dir, AgentOptions::new(dashboard.url())).await;
    let pid = read_pid(&second.dir.path().join("pid"));
    let register = dashboard.wait_frame("register", 2, 10 * SECOND).await;
    dashboard
        .wait_for(10 * SECOND, "the new agent's heartbeat", |log| {
            log.iter()
                .find(|s| {
                    s.conn() == register.conn()
                        && s.kind() == Some("heartbeat")
                        && s.payload()["pending_command"] == "switch"
                        && s.payload()["command_pid"] == pid
                })
                .map(|_| ())
        })
        .await;
    std::fs::write(second.dir.path().join("go"), "").unwrap();
    let status = dashboard.wait_frame("status", 1, 10 * SECOND).await;
    assert_eq!(status.conn(), register.conn());
    let p = status.payload();
    assert_eq!(
        (p["command"].as_str(), p["status"].as_str()),
        (Some("switch"), Some("ok")),
        "{p}"
    );
    for line in ["waiting", "went"] {
        let seen = dashboard
            .wait_frame_where("output", 5 * SECOND, |p| p["line"] == line)
            .await;
        assert_eq!(seen.conn(), register.conn(), "{line} sent by the new agent");
    }
    assert_eq!(dashboard.frames("status").len(), 1);
}

#[tokio::test]
async fn an_adopted_command_can_be_stopped() {
    let dashboard = Dashboard::start().await;
    let (_second, pid) = crash_mid_switch(&dashboard).await;
    let register = dashboard.wait_frame("register", 2, 10 * SECOND).await;
    dashboard.command(register.conn(), "stop");
    let status = dashboard.wait_frame("status", 1, 10 * SECOND).await;
    assert_eq!(status.payload()["message"], "Stopped by user");
    assert!(!alive(pid), "the adopted command {pid} survived the stop");
}

#[tokio::test]
async fn a_status_the_predecessor_could_not_deliver_is_sent_from_the_log() {
    let dashboard = Dashboard::start().await;
    let options = AgentOptions::new(dashboard.url());
    let (dir, _) = Agent::prepare(&options);
    // What a predecessor leaves when it dies right after its command ended:
    // the record, and the log with the exit code as its last line.
    let log = dir
        .path()
        .join("state/logs/20260101T000000.000Z-switch.log");
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    std::fs::write(
        &log,
        "building\n[nixfleet] exit code 0: ok (switch succeeded)\n",
    )
    .unwrap();
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    let record = serde_json::json!({"command": "switch", "pid": pid, "pid_start": 1, "log": log});
    std::fs::write(
        dir.path().join("state/running-command.json"),
        record.to_string(),
    )
    .unwrap();
    let agent = Agent::spawn(dir, options).await;
    let status = dashboard.wait_frame("status", 1, 10 * SECOND).await;
    let register = dashboard.wait_frame("register", 1, 1 * SECOND).await;
    assert!(register.at() <= status.at(), "sent after register");
    assert_eq!(status.payload()["status"], "ok");
    assert_eq!(status.payload()["exit_code"], 0);
    // Delivered: the record is gone, so a third agent sends nothing.
    let record_path = agent.state_dir.join("running-command.json");
    let deadline = tokio::time::Instant::now() + 5 * SECOND;
    while record_path.exists() {
        assert!(tokio::time::Instant::now() < deadline, "record not cleared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
