//! The commands that change the host or the agent: a switch and the
//! register after it, the heartbeat after every status, pull's and the
//! tests' progress, reboot, kill and restart.

use super::*;

#[tokio::test]
async fn a_successful_switch_registers_again_with_the_new_versions() {
    let dashboard = Dashboard::start().await;
    let h = host(&dashboard, SWITCH_TO_NEW, &[], |_| {}).await;
    let first = dashboard.frames("register")[0].clone();
    assert_eq!(first.payload()["nixpkgs_version"], "25.05.20250601.aaaaaaa");
    send(&dashboard, "switch");
    let status = dashboard.wait_frame("status", 1, 20 * SECOND).await;
    assert_eq!(status.payload()["status"], "ok");
    let (code, reason, closed_at) = dashboard.wait_close(5 * SECOND).await;
    assert_eq!((code, reason.as_str()), (Some(1000), "re-register"));
    assert!(closed_at >= status.at());
    let again = dashboard.wait_frame("register", 2, 2 * SECOND).await;
    assert!(
        again.at().duration_since(status.at()) < 2 * SECOND,
        "registered again {:?} after the status",
        again.at().duration_since(status.at())
    );
    assert_ne!(again.conn(), status.conn(), "on a fresh connection");
    assert_eq!(again.payload()["nixpkgs_version"], "25.11.20251120.bbbbbbb");
    assert_eq!(again.payload()["os_version"], "25.11");
    // The switch is recorded: the system compartment is ok.
    let status = heartbeat_where(&dashboard, "system ok", |p| {
        p["update_status"]["system"]["status"] == "ok"
    })
    .await;
    assert_eq!(status["tests"]["status"], "outdated", "{status}");
    assert!(h.agent.state_dir.join("system-record.json").exists());
    assert_eq!(
        std::fs::canonicalize(&h.link).unwrap(),
        std::fs::canonicalize(&h.new_system).unwrap()
    );
}

#[tokio::test]
async fn a_failed_switch_does_not_register_again() {
    let dashboard = Dashboard::start().await;
    let _h = host(&dashboard, "echo broken >&2\nexit 3", &[], |_| {}).await;
    send(&dashboard, "switch");
    let status = dashboard.wait_frame("status", 1, 20 * SECOND).await;
    assert_eq!(status.payload()["status"], "error");
    let system = heartbeat_where(&dashboard, "system error", |p| {
        p["update_status"]["system"]["status"] == "error"
    })
    .await;
    assert!(
        system["system"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Switch failed: "),
        "{system}"
    );
    // Nothing closes and nothing registers for a while (3 heartbeats).
    let quiet_until = status.at() + 3 * SECOND;
    dashboard
        .wait_for(10 * SECOND, "a heartbeat 3 s after the status", |log| {
            log.iter()
                .find(|s| s.kind() == Some("heartbeat") && s.at() > quiet_until)
                .map(|_| ())
        })
        .await;
    assert_eq!(dashboard.frames("register").len(), 1);
    assert_eq!(dashboard.current_conn(), Some(status.conn()));
}

#[tokio::test]
async fn a_heartbeat_follows_every_status_at_once() {
    let dashboard = Dashboard::start().await;
    // An interval far longer than the test: after the one at register, no
    // heartbeat of the grid falls inside the test, so a heartbeat after a
    // status can only be the one the status triggered. How soon it came is
    // printed, not asserted (a loaded machine decides that, not the agent).
    let _h = host(&dashboard, "echo ok", &[], |o| o.interval = 3600).await;
    let commands = ["boot", "check-version", "refresh-lock", "switch", "test"];
    for (i, command) in commands.iter().enumerate() {
        send(&dashboard, command);
        let status = dashboard.wait_frame("status", i + 1, 20 * SECOND).await;
        let next = dashboard
            .wait_for(10 * SECOND, "the heartbeat after the status", |log| {
                log.iter()
                    .find(|s| {
                        s.kind() == Some("heartbeat")
                            && s.conn() == status.conn()
                            && s.at() >= status.at()
                    })
                    .cloned()
            })
            .await;
        let gap = next.at().duration_since(status.at());
        println!("{command}: the heartbeat came {gap:?} after the status");
        assert_eq!(next.payload()["pending_command"], Value::Null);
        if *command == "switch" {
            dashboard.wait_frame("register", 2, 5 * SECOND).await;
        }
    }
}

#[tokio::test]
async fn a_pull_switch_whose_pull_failed_leaves_the_system_compartment_alone() {
    let dashboard = Dashboard::start().await;
    // No upstream: `git pull --ff-only` fails before any rebuild.
    let h = host(&dashboard, SWITCH_TO_NEW, &[], |_| {}).await;
    send(&dashboard, "pull-switch");
    let status = status_of(&dashboard, 1).await;
    assert_eq!(status["status"], "error", "{status}");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .starts_with("git pull failed"),
        "{status}"
    );
    let after = dashboard.frames("status")[0].at();
    let compartments = dashboard
        .wait_for(5 * SECOND, "a heartbeat after the status", |log| {
            log.iter()
                .find(|s| s.kind() == Some("heartbeat") && s.at() >= after)
                .map(|s| s.payload()["update_status"].clone())
        })
        .await;
    assert_eq!(
        compartments["system"]["status"], "unknown",
        "{compartments}"
    );
    assert_ne!(
        std::fs::canonicalize(&h.link).unwrap(),
        std::fs::canonicalize(&h.new_system).unwrap(),
        "nothing was rebuilt"
    );
}

#[tokio::test]
async fn pull_reports_each_git_step_as_progress() {
    let upstream = tempfile::tempdir().unwrap();
    let work = upstream.path().join("work");
    std::fs::create_dir(&work).unwrap();
    commit_repo(&work);
    let dashboard = Dashboard::start().await;
    let mut options = AgentOptions::new(dashboard.url());
    options.follow(&work);
    let (dir, _) = Agent::prepare_to_clone(&options);
    let _agent = Agent::spawn(dir, options).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    send(&dashboard, "pull");
    assert_eq!(status_of(&dashboard, 1).await["status"], "ok");
    // A clone is one step; a pull into the clone three.
    send(&dashboard, "pull");
    assert_eq!(status_of(&dashboard, 2).await["status"], "ok");
    let steps: Vec<(u64, u64, String)> = progress_frames(&dashboard, "pull")
        .iter()
        .map(|p| {
            (
                p["current"].as_u64().unwrap(),
                p["total"].as_u64().unwrap(),
                p["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        (0, 1, "in_progress"),
        (1, 1, "complete"),
        (0, 3, "in_progress"),
        (1, 3, "in_progress"),
        (2, 3, "in_progress"),
        (3, 3, "complete"),
    ]
    .map(|(c, t, s)| (c, t, s.to_owned()));
    assert_eq!(steps, expected);
    // Progress goes out before the status of its command.
    let log = dashboard.log();
    let last_progress = log
        .iter()
        .rposition(|s| s.kind() == Some("operation_progress"))
        .unwrap();
    let last_status = log
        .iter()
        .rposition(|s| s.kind() == Some("status"))
        .unwrap();
    assert!(last_progress < last_status);
    // After a pull the git compartment knows origin/main.
    heartbeat_where(&dashboard, "git ok", |p| {
        p["update_status"]["git"]["status"] == "ok"
    })
    .await;
}

#[tokio::test]
async fn tests_report_per_test_results_and_the_tests_compartment() {
    let dashboard = Dashboard::start().await;
    let h = host(&dashboard, "true", &[], |_| {}).await;
    let tests = h.agent.repo_dir.join("hosts/test-host/tests");
    std::fs::create_dir_all(&tests).unwrap();
    script(&tests, "T01-ok.sh", "echo fine");
    script(&tests, "T02-bad.sh", "exit 1");
    send(&dashboard, "test");
    let status = status_of(&dashboard, 1).await;
    assert_eq!(status["status"], "error");
    let frames = progress_frames(&dashboard, "tests");
    let shown: Vec<(u64, Vec<String>, String)> = frames
        .iter()
        .map(|p| {
            (
                p["current"].as_u64().unwrap(),
                p["results"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_owned())
                    .collect(),
                p["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        shown,
        [
            (0, s(&["pending", "pending"]), "in_progress".to_owned()),
            (1, s(&["pass", "pending"]), "in_progress".to_owned()),
            (2, s(&["pass", "fail"]), "error".to_owned()),
        ]
    );
    assert!(frames.iter().all(|p| p["total"] == 2));
    let compartments = heartbeat_where(&dashboard, "tests error", |p| {
        p["update_status"]["tests"]["status"] == "error"
    })
    .await;
    assert_eq!(compartments["tests"]["message"], "1/2 passed");
}

#[tokio::test]
async fn reboot_is_refused_unless_allowed() {
    let dashboard = Dashboard::start().await;
    let systemctl = "echo \"$@\" >> \"$HOME/systemctl-argv\"";
    let h = host(&dashboard, "true", &[("systemctl", systemctl)], |_| {}).await;
    send(&dashboard, "reboot");
    let rejected = dashboard
        .wait_frame("command_rejected", 1, 10 * SECOND)
        .await;
    let reason = rejected.payload()["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("allow_reboot"), "{reason}");
    assert!(dashboard.frames("status").is_empty());
    assert!(!h.agent.dir.path().join("systemctl-argv").exists());
}

#[tokio::test]
async fn reboot_runs_systemctl_reboot_when_allowed() {
    let dashboard = Dashboard::start().await;
    let systemctl = "echo \"$@\" >> \"$HOME/systemctl-argv\"";
    let h = host(&dashboard, "true", &[("systemctl", systemctl)], |o| {
        o.extra_toml.push("allow_reboot = true".into())
    })
    .await;
    send(&dashboard, "reboot");
    let status = status_of(&dashboard, 1).await;
    assert_eq!(status["command"], "reboot");
    assert_eq!(status["status"], "ok");
    let argv = wait_for_file(&h.agent.dir.path().join("systemctl-argv"), 10 * SECOND).await;
    assert_eq!(argv.trim(), "reboot");
}

#[tokio::test]
async fn kill_stops_the_running_command() {
    let dashboard = Dashboard::start().await;
    let _h = host(&dashboard, "echo started\nsleep 30", &[], |_| {}).await;
    send(&dashboard, "switch");
    dashboard
        .wait_frame_where("heartbeat", 10 * SECOND, |p| {
            p["pending_command"] == "switch"
        })
        .await;
    send(&dashboard, "kill");
    let status = status_of(&dashboard, 1).await;
    assert_eq!(status["status"], "error");
    assert_eq!(status["message"], "Stopped by user");
    // A stopped switch changed nothing: no new register.
    assert_eq!(dashboard.frames("register").len(), 1);
}

#[tokio::test]
async fn restart_when_idle_exits_for_the_service_manager() {
    let dashboard = Dashboard::start().await;
    let mut h = host(&dashboard, "true", &[], |_| {}).await;
    send(&dashboard, "restart");
    let status = status_of(&dashboard, 1).await;
    assert_eq!(
        (status["command"].as_str(), status["status"].as_str()),
        (Some("restart"), Some("ok"))
    );
    let (code, reason, _) = dashboard.wait_close(5 * SECOND).await;
    assert_eq!((code, reason.as_str()), (Some(1000), "shutdown"));
    assert_eq!(h.agent.wait_exit(10 * SECOND).await, Some(75));
}

#[tokio::test]
async fn restart_while_busy_waits_for_the_command() {
    let dashboard = Dashboard::start().await;
    let rebuild =
        "echo x > \"$HOME/started\"\nwhile [ ! -e \"$HOME/go\" ]; do sleep 0.05; done\necho done";
    let mut h = host(&dashboard, rebuild, &[], |_| {}).await;
    send(&dashboard, "boot");
    wait_for_file(&h.agent.dir.path().join("started"), 10 * SECOND).await;
    send(&dashboard, "restart");
    let status = status_of(&dashboard, 1).await;
    assert_eq!(status["command"], "restart");
    assert_eq!(status["message"], "restarting once boot has ended");
    // Meanwhile the command runs on, and so does the agent.
    send(&dashboard, "pull");
    let rejected = dashboard
        .wait_frame("command_rejected", 1, 10 * SECOND)
        .await;
    assert_eq!(rejected.payload()["reason"], "command already running");
    assert!(h.agent.is_running());
    std::fs::write(h.agent.dir.path().join("go"), "").unwrap();
    let status = status_of(&dashboard, 2).await;
    assert_eq!(
        (status["command"].as_str(), status["status"].as_str()),
        (Some("boot"), Some("ok"))
    );
    assert_eq!(h.agent.wait_exit(10 * SECOND).await, Some(75));
}
