//! What the agent tells its operator (issue 26): a refused command is in
//! the agent's own log with its reason.

mod common;

use common::*;

#[tokio::test]
async fn a_rejected_command_is_logged_with_its_reason() {
    let dashboard = Dashboard::start().await;
    let agent = Agent::start(AgentOptions::new(dashboard.url())).await;
    dashboard.command_first("stop").await;
    dashboard
        .wait_frame("command_rejected", 1, 10 * SECOND)
        .await;
    let log = agent.wait_stderr("rejected a command", 10 * SECOND).await;
    assert!(log.contains("no command running"), "{log}");
}

/// A file with two bad values names both in one run, on one line, and
/// still exits 78.
#[test]
fn check_config_names_every_bad_value_of_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "url = \"ws://127.0.0.1:1/ws\"\ntoken = \"t\"\nrepo_dir = \"/tmp\"\n\
         theme_color = \"red\"\nlocation = \"moon\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nixfleet-agent"))
        .arg("--check-config")
        .arg("--config")
        .arg(&config)
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("theme_color") && stderr.contains("location"),
        "both bad values named: {stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}
