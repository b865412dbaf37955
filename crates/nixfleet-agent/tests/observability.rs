//! What the host sees of the agent (issue 24): `nixfleet-agent status`
//! against a running agent in each of its states, and the metrics file
//! read by the real node_exporter's textfile collector.

mod common;
#[path = "observability/exporter.rs"]
mod exporter;

use common::*;
use exporter::NodeExporter;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::time::Instant;

/// A stand-in `nixos-rebuild` that says it started, then waits for the
/// test's `release` file and exits with the code written in it.
const HELD_REBUILD: &str = r#"echo $$ > "$HOME/rebuild.pid"
while [ ! -s "$HOME/release" ]; do sleep 0.02; done
exit "$(cat "$HOME/release")""#;

/// `nixfleet-agent [args] status [--json]`: (exit code, stdout).
fn status(args: &[&str], json: bool) -> (i32, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_nixfleet-agent"));
    command.args(args).arg("status");
    if json {
        command.arg("--json");
    }
    let out = command
        .env_clear()
        .stdin(Stdio::null())
        .output()
        .expect("the agent binary runs");
    let stdout = String::from_utf8(out.stdout).unwrap();
    (out.status.code().expect("exit code"), stdout)
}

/// `status` with the agent's own configuration file.
fn agent_status(agent: &Agent, json: bool) -> (i32, String) {
    let config = agent.dir.path().join("agent.toml");
    status(&["--config", config.to_str().unwrap()], json)
}

/// Runs `status --json` until `wanted` holds for it (the record is
/// written when the agent sees the change), up to 15 s.
async fn wait_status(agent: &Agent, what: &str, wanted: impl Fn(i32, &Value) -> bool) -> Value {
    let deadline = Instant::now() + 15 * SECOND;
    loop {
        let (code, out) = agent_status(agent, true);
        let value: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        if wanted(code, &value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed {what}; last (exit {code}): {out}\nagent:\n{}",
            agent.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn without_state_status_exits_4_and_names_the_directory_it_read() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("nowhere");
    let (code, out) = status(&["--state-dir", state.to_str().unwrap()], false);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("no agent state found"), "{out}");
    assert!(
        out.contains(&state.join("agent-status.json").display().to_string()),
        "{out}"
    );
    assert!(
        out.contains("flag --state-dir"),
        "says where state_dir came from: {out}"
    );
    assert!(
        out.contains("--config"),
        "says how to point elsewhere: {out}"
    );
    let (code, out) = status(&["--state-dir", state.to_str().unwrap()], true);
    assert_eq!(code, 4);
    let value: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(value["error"], "no agent state found", "{out}");
}

#[tokio::test]
async fn status_follows_the_agent_through_connect_command_failure_and_disconnect() {
    let mut dashboard = Dashboard::start().await;
    let mut agent = start_with_rebuild(dashboard.url(), HELD_REBUILD, |_| {}).await;
    let conn = dashboard
        .wait_frame("register", 1, 10 * SECOND)
        .await
        .conn();

    // Connected and idle.
    let value = wait_status(&agent, "connected", |code, v| {
        code == 0 && v["connected"] == true
    })
    .await;
    assert_eq!(value["running"], Value::Null, "{value}");
    assert_eq!(value["agent"]["pid"], agent.pid(), "{value}");
    assert_eq!(value["url"], dashboard.url());
    assert!(value["last_heartbeat"].as_u64().is_some(), "{value}");
    let (code, text) = agent_status(&agent, false);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!("connected to {}", dashboard.url())),
        "{text}"
    );
    assert!(text.contains("command:     idle"), "{text}");
    assert!(text.contains("heartbeat:   every 1s, last at"), "{text}");
    // The v3 compartments, as heartbeats carry them.
    let tests = &value["compartments"]["tests"];
    assert_eq!(tests["status"], "unknown", "{value}");
    assert_eq!(
        tests["message"], "no test run since the agent started",
        "{value}"
    );
    for name in ["git", "lock", "system"] {
        assert!(value["compartments"][name]["status"].is_string(), "{value}");
    }
    assert!(
        text.contains("tests:       unknown  no test run since the agent started (checked "),
        "{text}"
    );
    for label in ["git:", "lock:", "system:"] {
        assert!(text.lines().any(|l| l.starts_with(label)), "{text}");
    }

    // Running a command.
    dashboard.command(conn, "switch");
    let pid_file = agent.dir.path().join("rebuild.pid");
    wait_for_file(&pid_file, 10 * SECOND).await;
    let rebuild = read_pid(&pid_file);
    let value = wait_status(&agent, "the switch running", |code, v| {
        code == 0 && v["running"]["command"] == "switch" && v["running"]["pid"].is_u64()
    })
    .await;
    assert!(value["running"]["log"].is_string(), "{value}");
    let (_, text) = agent_status(&agent, false);
    assert!(text.contains("command:     switch, running for"), "{text}");

    // After a failed switch.
    std::fs::write(agent.dir.path().join("release"), "1\n").unwrap();
    let value = wait_status(&agent, "the failed switch", |code, v| {
        code == 0 && v["running"].is_null() && v["last_results"]["switch"].is_object()
    })
    .await;
    let switch = &value["last_results"]["switch"];
    assert_eq!(switch["ok"], false, "{value}");
    assert_eq!(switch["exit_code"], 1, "{value}");
    assert_eq!(value["last_switch"]["ok"], false, "{value}");
    assert_eq!(
        value["counters"]["commands"]["switch"]["error"], 1,
        "{value}"
    );
    let system = wait_status(&agent, "the system compartment's error", |_, v| {
        v["compartments"]["system"]["status"] == "error"
    })
    .await;
    let message = system["compartments"]["system"]["message"]
        .as_str()
        .unwrap();
    assert!(message.starts_with("Switch failed"), "{system}");
    assert!(!alive(rebuild));
    let (_, text) = agent_status(&agent, false);
    assert!(
        text.contains("last:        switch        error at"),
        "{text}"
    );

    // Disconnected, waiting out the backoff.
    dashboard.kill();
    let value = wait_status(&agent, "disconnected", |code, v| {
        code == 3 && v["link"]["state"] == "disconnected"
    })
    .await;
    assert!(value["link"]["next_retry"].as_u64().is_some(), "{value}");
    assert!(
        !value["link"]["error"].as_str().unwrap().is_empty(),
        "{value}"
    );
    assert_eq!(value["last_heartbeat"], Value::Null, "{value}");
    let (code, text) = agent_status(&agent, false);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("disconnected from"), "{text}");
    assert!(text.contains("next attempt"), "{text}");

    // Stopped: the record stays, but names an agent that is gone.
    agent.signal(15);
    assert_eq!(agent.wait_exit(10 * SECOND).await, Some(0));
    let (code, text) = agent_status(&agent, false);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains("NOT RUNNING"), "{text}");
}

/// An agent with a stand-in `nixos-rebuild`, registered, that writes its
/// metrics file where a real node_exporter reads it.
struct Exported {
    exporter: NodeExporter,
    agent: Agent,
    conn: u64,
    /// The metrics file.
    file: PathBuf,
    _textfiles: tempfile::TempDir,
}

impl Exported {
    /// `None`, said in a "skipped: …" line, where node_exporter is not
    /// installed.
    async fn start(
        dashboard: &Dashboard,
        rebuild: &str,
        tweak: impl FnOnce(&mut AgentOptions),
    ) -> Option<Exported> {
        if exporter::missing() {
            return None;
        }
        let textfiles = tempfile::tempdir().unwrap();
        let file = textfiles.path().join("nixfleet-agent.prom");
        let setting = format!("metrics_textfile = {:?}", file.display().to_string());
        let agent = start_with_rebuild(dashboard.url(), rebuild, |o| {
            o.extra_toml.push(setting);
            tweak(o);
        })
        .await;
        let conn = dashboard
            .wait_frame("register", 1, 10 * SECOND)
            .await
            .conn();
        let exporter = NodeExporter::start(textfiles.path());
        Some(Exported {
            exporter,
            agent,
            conn,
            file,
            _textfiles: textfiles,
        })
    }
}

#[tokio::test]
async fn node_exporter_serves_the_agents_metrics() {
    let mut dashboard = Dashboard::start().await;
    let exported = Exported::start(&dashboard, HELD_REBUILD, |_| {}).await;
    // Every field bound: what a pattern leaves out would be dropped (the
    // agent stopped) at once.
    let Some(Exported {
        exporter,
        agent,
        conn,
        file,
        _textfiles,
    }) = exported
    else {
        return;
    };

    let body = exporter
        .wait_for(&[
            "nixfleet_agent_connected 1",
            "nixfleet_agent_connects_total 1",
        ])
        .await;
    // Counters arrive as counters (not "untyped"): the family name the
    // collector's parser expects includes `_total`.
    assert!(
        body.contains("# TYPE nixfleet_agent_connects_total counter"),
        "{body}"
    );
    let info = format!("version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    let has_info = |l: &str| l.starts_with("nixfleet_agent_info{") && l.ends_with(&info);
    assert!(body.lines().any(has_info), "{body}");
    assert!(
        body.contains("nixfleet_agent_last_heartbeat_timestamp_seconds "),
        "{body}"
    );

    dashboard.command(conn, "switch");
    wait_for_file(&agent.dir.path().join("rebuild.pid"), 10 * SECOND).await;
    std::fs::write(agent.dir.path().join("release"), "0\n").unwrap();
    let body = exporter
        .wait_for(&[
            "nixfleet_agent_commands_total{command=\"switch\",result=\"ok\"} 1",
            "nixfleet_agent_last_switch_success 1",
        ])
        .await;
    assert!(
        body.contains("nixfleet_agent_command_duration_seconds{command=\"switch\"} "),
        "{body}"
    );
    assert!(
        body.contains("nixfleet_agent_last_switch_timestamp_seconds "),
        "{body}"
    );

    dashboard.kill();
    let body = exporter.wait_for(&["nixfleet_agent_connected 0"]).await;
    assert!(
        body.contains("nixfleet_agent_disconnects_total{reason="),
        "{body}"
    );
    let mode = std::fs::metadata(&file).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o644);
}

/// A stand-in `nixos-rebuild` that prints `lines` numbered lines of about
/// 90 bytes.
fn printing_rebuild(lines: u64) -> String {
    format!(
        r#"awk 'BEGIN {{ for (i = 0; i < {lines}; i++) printf "line %07d, padded to about ninety bytes ....................................\n", i }}'"#
    )
}

#[tokio::test]
async fn node_exporter_counts_output_lines_delivered_and_dropped() {
    let dashboard = Dashboard::start().await;
    let rebuild = printing_rebuild(5_000);
    let exported = Exported::start(&dashboard, &rebuild, |o| {
        // About 1,100 of the 5,000 lines fit.
        o.extra_toml.push("log_max_bytes = 100000".into());
    });
    let Some(Exported {
        exporter,
        agent: _agent,
        conn,
        file: _,
        _textfiles,
    }) = exported.await
    else {
        return;
    };
    exporter
        .wait_for(&[
            "nixfleet_agent_output_lines_total{outcome=\"delivered\"} 0",
            "nixfleet_agent_output_lines_total{outcome=\"dropped\"} 0",
        ])
        .await;

    dashboard.command(conn, "switch");
    let status = dashboard.wait_frame("status", 1, 30 * SECOND).await;
    assert_eq!(status.payload()["status"], "ok", "{:?}", status.payload());
    let lines: Vec<String> = dashboard
        .frames("output")
        .iter()
        .filter_map(|s| s.payload()["line"].as_str().map(str::to_owned))
        .collect();
    let notice = "[nixfleet] ";
    let delivered = lines.iter().filter(|l| !l.starts_with(notice)).count() as u64;
    let dropped: u64 = lines
        .iter()
        .find_map(|l| l.strip_prefix(notice)?.strip_suffix(" lines dropped"))
        .expect("a dropped-lines notice")
        .parse()
        .unwrap();
    assert!(dropped > 3_000 && delivered > 500, "{delivered} {dropped}");
    // Every line the dashboard got, once its batch was acknowledged; the
    // agent's own notice is not a line of the command.
    exporter
        .wait_for(&[
            &format!("nixfleet_agent_output_lines_total{{outcome=\"delivered\"}} {delivered}"),
            &format!("nixfleet_agent_output_lines_total{{outcome=\"dropped\"}} {dropped}"),
        ])
        .await;
}

/// Fake NixOS systems under `dir` for the reboot check: `system-1` and
/// `system-2` differ only in their kernel; `booted-system` and
/// `current-system` both link to `system-1`.
fn boot_trees(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use std::os::unix::fs::symlink;
    let store = dir.join("store");
    let file = |name: &str, entry: &str| {
        std::fs::create_dir_all(store.join(name)).unwrap();
        std::fs::write(store.join(name).join(entry), name).unwrap();
        store.join(name).join(entry)
    };
    let modules = store.join("modules-6.6");
    std::fs::create_dir_all(modules.join("lib/modules")).unwrap();
    let initrd = file("initrd-1", "initrd");
    for (name, kernel) in [("system-1", "linux-6.6"), ("system-2", "linux-6.12")] {
        let system = dir.join(name);
        std::fs::create_dir_all(&system).unwrap();
        std::fs::write(system.join("nixos-version"), "25.11.20251120.abcdef0").unwrap();
        symlink(file(kernel, "bzImage"), system.join("kernel")).unwrap();
        symlink(&initrd, system.join("initrd")).unwrap();
        symlink(&modules, system.join("kernel-modules")).unwrap();
    }
    let (booted, current) = (dir.join("booted-system"), dir.join("current-system"));
    symlink(dir.join("system-1"), &booted).unwrap();
    symlink(dir.join("system-1"), &current).unwrap();
    (booted, current, dir.join("system-2"))
}

/// Heartbeats after the first `after` that satisfy `wanted`, waited for.
async fn heartbeat_after(
    dashboard: &Dashboard,
    after: usize,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    dashboard
        .wait_for(10 * SECOND, "a heartbeat", |log| {
            log.iter()
                .filter(|s| s.kind() == Some("heartbeat"))
                .skip(after)
                .find(|s| wanted(s.payload()))
                .map(|s| s.payload().clone())
        })
        .await
}

#[tokio::test]
async fn a_new_kernel_makes_heartbeats_status_and_metrics_say_reboot() {
    let trees = tempfile::tempdir().unwrap();
    let (booted, current, system_2) = boot_trees(trees.path());
    let textfiles = tempfile::tempdir().unwrap();
    let file = textfiles.path().join("nixfleet-agent.prom");
    let dashboard = Dashboard::start().await;
    let setting = format!("metrics_textfile = {:?}", file.display().to_string());
    let agent = start_with_rebuild(dashboard.url(), "exit 0", |o| {
        o.extra_toml.push(setting);
        o.env.push((
            "NIXFLEET_TEST_CURRENT_SYSTEM".into(),
            current.display().to_string(),
        ));
        o.env.push((
            "NIXFLEET_TEST_BOOTED_SYSTEM".into(),
            booted.display().to_string(),
        ));
    })
    .await;
    dashboard.wait_frame("heartbeat", 2, 10 * SECOND).await;
    let before = dashboard.frames("heartbeat");
    for beat in &before {
        assert!(
            beat.payload().get("needs_reboot").is_none(),
            "{:?}",
            beat.payload()
        );
    }
    let value = wait_status(&agent, "connected", |code, _| code == 0).await;
    assert_eq!(value["needs_reboot"], false, "{value}");

    // A switch to a system with another kernel: the link is replaced.
    let next = trees.path().join("current-system.new");
    std::os::unix::fs::symlink(&system_2, &next).unwrap();
    std::fs::rename(&next, &current).unwrap();
    let beat = heartbeat_after(&dashboard, before.len(), |p| {
        p.get("needs_reboot").is_some()
    })
    .await;
    assert_eq!(beat["needs_reboot"], true, "{beat}");
    let message = beat["update_status"]["system"]["message"].as_str().unwrap();
    assert!(
        message.ends_with("reboot needed: kernel changed since boot"),
        "{beat}"
    );

    let value = wait_status(&agent, "the reboot need", |_, v| v["needs_reboot"] == true).await;
    assert_eq!(
        value["reboot_entries"],
        serde_json::json!(["kernel"]),
        "{value}"
    );
    let (_, text) = agent_status(&agent, false);
    assert!(
        text.contains("reboot:      needed: kernel changed since boot"),
        "{text}"
    );
    let metrics = wait_for_file_line(&file, "nixfleet_agent_needs_reboot 1").await;
    assert!(
        metrics.contains("# TYPE nixfleet_agent_needs_reboot gauge"),
        "{metrics}"
    );

    // Back to the booted kernel (a rollback): no reboot needed any more.
    let seen = dashboard.frames("heartbeat").len();
    std::os::unix::fs::symlink(trees.path().join("system-1"), &next).unwrap();
    std::fs::rename(&next, &current).unwrap();
    let beat = heartbeat_after(&dashboard, seen, |p| p.get("needs_reboot").is_none()).await;
    let message = beat["update_status"]["system"]["message"].as_str().unwrap();
    assert!(!message.contains("reboot"), "{beat}");
    wait_for_file_line(&file, "nixfleet_agent_needs_reboot 0").await;
}

/// Reads `file` until it has the line `wanted`, up to 15 s; its text.
async fn wait_for_file_line(file: &Path, wanted: &str) -> String {
    let deadline = Instant::now() + 15 * SECOND;
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.lines().any(|l| l == wanted) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "never found {wanted:?} in:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
