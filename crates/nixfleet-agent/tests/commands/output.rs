//! One command from request to status: its output streamed in order, cut
//! and cleaned, delivered once across a reconnect; a second command
//! refused meanwhile; `nixos-rebuild`'s argv and a clean environment.

use super::*;

#[tokio::test]
async fn a_second_command_is_rejected_and_the_first_is_untouched() {
    let dashboard = Dashboard::start().await;
    let (agent, conn) = agent_with_rebuild(
        &dashboard,
        "echo $$ > \"$HOME/pid\"\nsleep 2\necho finished",
        |_| {},
    )
    .await;
    dashboard.command(conn, "switch");
    let pid_file = agent.dir.path().join("pid");
    dashboard
        .wait_frame_where("heartbeat", 10 * SECOND, |p| p["command_pid"].is_u64())
        .await;
    let pid = read_pid(&pid_file);
    for name in ["pull", "switch", "test", "bogus"] {
        dashboard.command(conn, name);
    }
    let rejected = dashboard
        .wait_for(5 * SECOND, "four rejections", |log| {
            let r: Vec<Value> = log
                .iter()
                .filter(|s| s.kind() == Some("command_rejected"))
                .map(|s| s.payload().clone())
                .collect();
            (r.len() == 4).then_some(r)
        })
        .await;
    for r in &rejected[..3] {
        assert_eq!(r["reason"], "command already running");
        assert_eq!(r["current_command"], "switch");
        assert_eq!(r["current_pid"], pid);
    }
    assert_eq!(rejected[3]["reason"], "unknown command: bogus");
    let status = dashboard.wait_frame("status", 1, 10 * SECOND).await;
    assert_eq!(
        status.payload()["status"],
        "ok",
        "the running command was not disturbed"
    );
    assert!(
        output_lines(&dashboard)
            .iter()
            .any(|(l, ..)| l == "finished")
    );
    assert_eq!(statuses(&dashboard).len(), 1);
}

#[tokio::test]
async fn output_is_streamed_in_order_per_stream_while_the_command_runs() {
    let dashboard = Dashboard::start().await;
    // Each line carries the time it was written (ns since the epoch).
    let body = r#"
i=0
while [ $i -lt 20 ]; do
  echo "out $i $(date +%s%N)"
  echo "err $i $(date +%s%N)" >&2
  i=$((i+1))
  sleep 0.05
done
# Held open until the test has seen every line: streamed, not sent at the end.
while [ ! -e "$HOME/go" ]; do sleep 0.05; done"#;
    let (agent, conn) = agent_with_rebuild(&dashboard, body, |_| {}).await;
    dashboard.command(conn, "switch");
    dashboard.wait_frame("output", 40, 20 * SECOND).await;
    assert!(
        dashboard.frames("status").is_empty(),
        "all 40 lines arrived while the command still ran"
    );
    std::fs::write(agent.dir.path().join("go"), "").unwrap();
    let status = dashboard.wait_frame("status", 1, 20 * SECOND).await;
    let log = dashboard.log();
    let outputs: Vec<&Seen> = log.iter().filter(|s| s.kind() == Some("output")).collect();
    assert_eq!(outputs.len(), 40);
    assert!(
        outputs.iter().all(|s| s.at() <= status.at()),
        "every line before the status"
    );
    for stream in ["stdout", "stderr"] {
        let prefix = if stream == "stdout" { "out" } else { "err" };
        let lines: Vec<&Seen> = outputs
            .iter()
            .copied()
            .filter(|s| s.payload()["stream"] == stream)
            .collect();
        assert_eq!(lines.len(), 20);
        for (i, s) in lines.iter().enumerate() {
            let p = s.payload();
            assert_eq!(p["command"], "switch");
            assert_eq!(p["is_error"], stream == "stderr");
            let line = p["line"].as_str().unwrap();
            assert!(
                line.starts_with(&format!("{prefix} {i} ")),
                "order within {stream}: {line}"
            );
        }
    }
    // How promptly is a figure of the machine as much as of the agent:
    // printed, not asserted (the check above is the causal one).
    println!(
        "the slowest line took {} ms from write to arrival",
        worst_latency(&outputs, &status) / 1_000_000
    );

    // The full output is in the command's log under state_dir/logs.
    let logs: Vec<_> = std::fs::read_dir(agent.state_dir.join("logs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(logs.len(), 1, "{logs:?}");
    let name = logs[0].file_name().unwrap().to_str().unwrap().to_owned();
    assert!(
        name.ends_with("-switch.log") && name.starts_with("20"),
        "{name}"
    );
    let text = std::fs::read_to_string(&logs[0]).unwrap();
    for i in 0..20 {
        assert!(
            text.contains(&format!("out {i} ")) && text.contains(&format!("err {i} ")),
            "{text}"
        );
    }
}

#[tokio::test]
async fn failure_carries_the_exit_code() {
    let dashboard = Dashboard::start().await;
    let (_agent, conn) =
        agent_with_rebuild(&dashboard, "echo 'error: broken' >&2\nexit 3", |_| {}).await;
    dashboard.command(conn, "boot");
    let status = dashboard.wait_frame("status", 1, 10 * SECOND).await;
    let p = status.payload();
    assert_eq!(p["status"], "error");
    assert_eq!(p["command"], "boot");
    assert_eq!(p["exit_code"], 3);
    assert_eq!(p["message"], "exit code 3");
}

#[tokio::test]
async fn long_lines_are_cut_and_invalid_utf8_is_replaced() {
    let dashboard = Dashboard::start().await;
    let body = r#"
head -c 70000 /dev/zero | tr '\0' 'a'; echo
printf 'bad \377 byte\r\n'
printf 'no newline at the end'"#;
    let (_agent, conn) = agent_with_rebuild(&dashboard, body, |_| {}).await;
    dashboard.command(conn, "switch");
    dashboard.wait_frame("status", 1, 10 * SECOND).await;
    let lines = output_lines(&dashboard);
    assert_eq!(
        lines.len(),
        3,
        "{:?}",
        lines.iter().map(|l| l.0.len()).collect::<Vec<_>>()
    );
    assert_eq!(
        lines[0].0,
        format!("{} …[truncated]", "a".repeat(64 * 1024))
    );
    assert_eq!(lines[1].0, "bad \u{fffd} byte");
    assert_eq!(lines[2].0, "no newline at the end");
}

#[tokio::test]
async fn the_status_is_delivered_once_after_a_reconnect_mid_command() {
    let dashboard = Dashboard::start().await;
    let body = "echo before\nwhile [ ! -e \"$HOME/go\" ]; do sleep 0.05; done\necho after";
    let (agent, conn) = agent_with_rebuild(&dashboard, body, |_| {}).await;
    dashboard.command(conn, "switch");
    dashboard
        .wait_frame_where("output", 10 * SECOND, |p| p["line"] == "before")
        .await;
    // The dashboard drops the agent twice while the command runs.
    dashboard.close(conn, 1011, "restarting");
    let second = dashboard.wait_frame("register", 2, 10 * SECOND).await;
    dashboard.close(second.conn(), 1011, "restarting");
    let third = dashboard.wait_frame("register", 3, 10 * SECOND).await;
    std::fs::write(agent.dir.path().join("go"), "").unwrap();
    let status = dashboard.wait_frame("status", 1, 10 * SECOND).await;
    assert_eq!(status.conn(), third.conn());
    assert_eq!(status.payload()["status"], "ok");
    let after = dashboard
        .wait_frame_where("output", 5 * SECOND, |p| p["line"] == "after")
        .await;
    assert!(after.at() <= status.at());
    // Quiet for a few beats: still exactly one status.
    let n = dashboard.frames("heartbeat").len();
    dashboard.wait_frame("heartbeat", n + 2, 5 * SECOND).await;
    assert_eq!(statuses(&dashboard).len(), 1);
}

#[tokio::test]
async fn switch_boot_and_rollback_run_nixos_rebuild_with_the_right_argv_and_cwd() {
    let dashboard = Dashboard::start().await;
    let body =
        "printf '%s\\n' \"$@\" >> \"$HOME/argv\"\necho --- >> \"$HOME/argv\"\npwd >> \"$HOME/cwd\"";
    let (agent, _) = agent_with_rebuild(&dashboard, body, |_| {}).await;
    for (i, name) in ["switch", "boot", "rollback"].iter().enumerate() {
        let registers = dashboard.frames("register").len();
        dashboard.command(dashboard.current_conn().unwrap(), name);
        let status = dashboard.wait_frame("status", i + 1, 10 * SECOND).await;
        assert_eq!(status.payload()["status"], "ok", "{name}");
        if *name != "boot" {
            // A successful activation registers again on a new connection.
            dashboard
                .wait_frame("register", registers + 1, 10 * SECOND)
                .await;
        }
    }
    let repo = agent.repo_dir.display().to_string();
    let argv = std::fs::read_to_string(agent.dir.path().join("argv")).unwrap();
    let runs: Vec<Vec<&str>> = argv
        .split("---\n")
        .filter(|r| !r.is_empty())
        .map(|r| r.lines().collect())
        .collect();
    let flake = format!("{repo}#test-host");
    // Builds ask Nix for its structured log (rendered back by the agent);
    // a rollback builds nothing.
    let structured = ["--log-format", "internal-json", "-v"];
    assert_eq!(
        runs[0],
        [&["switch", "--flake", flake.as_str()][..], &structured].concat()
    );
    assert_eq!(
        runs[1],
        [&["boot", "--flake", flake.as_str()][..], &structured].concat()
    );
    assert_eq!(runs[2], ["switch", "--rollback"]);
    let cwd = std::fs::read_to_string(agent.dir.path().join("cwd")).unwrap();
    assert!(cwd.lines().all(|l| l == repo), "{cwd}");
}

#[tokio::test]
async fn commands_get_a_clean_environment_without_agent_secrets() {
    let dashboard = Dashboard::start().await;
    let mut options = AgentOptions::new(dashboard.url());
    options.token_in_env = true;
    options.env.push(("NIXFLEET_URL".into(), dashboard.url()));
    options.env.push(("SOME_RANDOM_VAR".into(), "x".into()));
    options
        .extra_toml
        .push("ssh_key = \"/keys/deploy key\"".into());
    let (dir, bin) = Agent::prepare(&options);
    script(
        &bin,
        "nixos-rebuild",
        "env > \"$HOME/env\"\nls -l /proc/self/fd/0 > \"$HOME/stdin\"",
    );
    let agent = Agent::spawn(dir, options).await;
    dashboard.command_first("switch").await;
    dashboard.wait_frame("status", 1, 10 * SECOND).await;
    let env = std::fs::read_to_string(agent.dir.path().join("env")).unwrap();
    assert!(!env.contains(TOKEN), "the token reached a child:\n{env}");
    assert!(!env.contains("NIXFLEET_"), "{env}");
    assert!(!env.contains("SOME_RANDOM_VAR"), "{env}");
    assert!(env.lines().any(|l| l.starts_with("PATH=")), "{env}");
    assert!(env.lines().any(|l| l.starts_with("LANG=")), "{env}");
    assert!(
        env.lines().any(|l| l
            == "GIT_SSH_COMMAND=ssh -i '/keys/deploy key' -o IdentitiesOnly=yes -o StrictHostKeyChecking=accept-new"),
        "{env}"
    );
    let stdin = std::fs::read_to_string(agent.dir.path().join("stdin")).unwrap();
    assert!(stdin.contains("/dev/null"), "stdin is /dev/null: {stdin}");
}

/// The longest time, in ns, from a line's write (the wall clock the
/// stand-in put at its end) to its arrival at the in-test dashboard
/// (arrival instants mapped to wall time through the status's arrival).
fn worst_latency(outputs: &[&Seen], status: &Seen) -> i128 {
    let status_wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128
        - (tokio::time::Instant::now() - status.at()).as_nanos() as i128;
    let mut worst = 0i128;
    for s in outputs {
        let written: i128 = s.payload()["line"]
            .as_str()
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let arrived = status_wall - (status.at() - s.at()).as_nanos() as i128;
        worst = worst.max(arrived - written);
    }
    worst
}
