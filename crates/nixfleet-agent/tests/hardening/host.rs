//! What the host holds against the agent: a process others cannot dump, a
//! record from another boot, test scripts it must not run.

use super::*;

#[tokio::test]
async fn the_running_agent_is_not_dumpable() {
    use std::os::unix::fs::MetadataExt;
    // The kernel hands the /proc files of a non-dumpable process to root:
    // visible only when the agent runs as another user, so a test running
    // as root starts it as `nobody`.
    let as_root = rustix::process::getuid().is_root();
    let dashboard = Dashboard::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (repo, state) = (dir.path().join("repo"), dir.path().join("state"));
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "url = {:?}\nrepo_dir = {:?}\nstate_dir = {:?}\nhostname = \"dump-test\"\nmetrics = \"none\"\n",
            dashboard.url(),
            repo.display().to_string(),
            state.display().to_string(),
        ),
    )
    .unwrap();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_nixfleet-agent"));
    command
        .arg("--config")
        .arg(&config)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NIXFLEET_TOKEN", TOKEN)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    if as_root {
        const NOBODY: u32 = 65534;
        for path in [dir.path(), &config] {
            set_mode(path, 0o755);
        }
        for path in [&repo, &state] {
            std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).unwrap();
        }
        command.uid(NOBODY).gid(NOBODY);
    }
    let agent = command.spawn().unwrap();
    let pid = agent.id().unwrap();
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    let status_file = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&status_file).unwrap();
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert_ne!(uid, 0, "the agent must run as an ordinary user here");
    let owner = std::fs::metadata(&status_file).unwrap().uid();
    assert_eq!(
        owner, 0,
        "/proc/{pid} belongs to uid {owner}, the agent's own: it is dumpable"
    );
}

#[tokio::test]
async fn a_record_from_another_boot_is_not_adopted_and_kill_command_signals_nothing() {
    use std::os::unix::process::CommandExt;
    let dashboard = Dashboard::start().await;
    let options = AgentOptions::new(dashboard.url());
    let (dir, _) = Agent::prepare(&options);
    // An unrelated process that leads its own group, named by a record that
    // matches its pid and start time but comes from another boot (a stale
    // record after a reboot, or a forged one).
    let mut victim = std::process::Command::new("sleep")
        .arg("60")
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = victim.id();
    let ticks = nixfleet_agent::commands::handover::process_start_ticks(pid).unwrap();
    let record = serde_json::json!({
        "command": "switch", "pid": pid, "pid_start": ticks, "log": null,
        "boot_id": "00000000-0000-4000-8000-000000000000",
    });
    std::fs::write(
        dir.path().join("state/running-command.json"),
        record.to_string(),
    )
    .unwrap();
    let agent = Agent::spawn(dir, options).await;
    let conn = dashboard
        .wait_frame("register", 1, 10 * SECOND)
        .await
        .conn();
    // The record is settled at once: the command it names is not running.
    let status = dashboard.wait_frame("status", 1, 10 * SECOND).await;
    assert_eq!(status.payload()["status"], "error");
    assert!(
        status.payload()["message"]
            .as_str()
            .unwrap()
            .contains("exit code unknown"),
        "{}",
        status.payload()
    );
    dashboard.send_json(
        conn,
        serde_json::json!({"type": "kill_command", "payload": {"signal": "SIGKILL", "pid": 0}}),
    );
    let rejected = dashboard
        .wait_frame("command_rejected", 1, 5 * SECOND)
        .await;
    assert_eq!(rejected.payload()["reason"], "no command running");
    let beats = dashboard.frames("heartbeat").len();
    dashboard
        .wait_frame("heartbeat", beats + 1, 5 * SECOND)
        .await;
    assert!(
        victim.try_wait().unwrap().is_none(),
        "the agent killed a process it does not own"
    );
    let named = dashboard
        .frames("heartbeat")
        .iter()
        .any(|beat| beat.payload()["command_pid"] == pid);
    assert!(!named, "a heartbeat reported the foreign pid {pid}");
    assert!(agent.stderr().contains("no longer running (or not ours)"));
    victim.kill().unwrap();
    victim.wait().unwrap();
}

#[tokio::test]
async fn test_scripts_outside_the_repository_or_writable_by_others_are_refused() {
    let dashboard = Dashboard::start().await;
    let agent = start_with_rebuild(dashboard.url(), "true", |_| {}).await;
    let conn = dashboard
        .wait_frame("register", 1, 10 * SECOND)
        .await
        .conn();
    let home = agent.dir.path();
    let tests = agent.repo_dir.join("hosts/test-host/tests");
    std::fs::create_dir_all(&tests).unwrap();
    script(&tests, "T01-ok.sh", "echo fine");
    // Dropped by someone who may write outside the repository...
    let outside = home.join("world-writable");
    std::fs::create_dir(&outside).unwrap();
    let evil = script(
        &outside,
        "evil.sh",
        &format!("touch {:?}", home.join("ran-symlinked")),
    );
    std::os::unix::fs::symlink(&evil, tests.join("T02-linked.sh")).unwrap();
    // ...or by a group that may write this one script.
    let loose = script(
        &tests,
        "T03-group.sh",
        &format!("touch {:?}", home.join("ran-group-writable")),
    );
    set_mode(&loose, 0o775);

    dashboard.command(conn, "test");
    let status = dashboard.wait_frame("status", 1, 20 * SECOND).await;
    assert_eq!(status.payload()["status"], "error", "{}", status.payload());
    assert_eq!(status.payload()["message"], "1/3 passed");
    assert!(
        !home.join("ran-symlinked").exists(),
        "a script outside the repository ran"
    );
    assert!(
        !home.join("ran-group-writable").exists(),
        "a group-writable script ran"
    );
    let lines: Vec<String> = dashboard
        .frames("output")
        .iter()
        .map(|f| f.payload()["line"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        lines.iter().any(|l| l
            .starts_with("[nixfleet] refusing to run T02-linked.sh: it resolves to ")
            && l.contains("outside")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(
            |l| l.starts_with("[nixfleet] refusing to run T03-group.sh: ")
                && l.contains("writable by group or others (mode 0775)")
        ),
        "{lines:#?}"
    );

    // The whole tests directory a symlink out of the repository.
    std::fs::remove_dir_all(&tests).unwrap();
    script(
        &outside,
        "T01-outside.sh",
        &format!("touch {:?}", home.join("ran-from-linked-dir")),
    );
    std::os::unix::fs::symlink(&outside, &tests).unwrap();
    dashboard.command(conn, "test");
    let status = dashboard.wait_frame("status", 2, 20 * SECOND).await;
    assert_eq!(status.payload()["status"], "error", "{}", status.payload());
    assert!(
        !home.join("ran-from-linked-dir").exists(),
        "a script of a linked directory ran"
    );
}
