//! What the agent says about itself in `register`: the commit it reports
//! (`source_commit`) comes from the settings when the NixOS module writes
//! it there (the flake's revision), else from the build, so that the Nix
//! package does not depend on the revision (issue 27).

mod common;

use common::*;

/// The commit build.rs recorded for this crate (empty when it had none).
const BUILT_FROM: &str = env!("NIXFLEET_SOURCE_COMMIT");

#[tokio::test]
async fn source_commit_comes_from_the_settings_when_set() {
    let dashboard = Dashboard::start().await;
    let mut options = AgentOptions::new(dashboard.url());
    options
        .extra_toml
        .push("source_commit = \"0123456789abcdef0123456789abcdef01234567\"".into());
    let _agent = Agent::start(options).await;

    let register = dashboard.wait_frame("register", 1, 10 * SECOND).await;
    let p = register.payload();
    assert_eq!(
        p["source_commit"], "0123456789abcdef0123456789abcdef01234567",
        "the configured commit wins over the one built in: {p}"
    );
    assert_eq!(p["agent_version"], env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn source_commit_falls_back_to_the_build_when_not_set() {
    let dashboard = Dashboard::start().await;
    let _agent = Agent::start(AgentOptions::new(dashboard.url())).await;

    let register = dashboard.wait_frame("register", 1, 10 * SECOND).await;
    let p = register.payload();
    if BUILT_FROM.is_empty() {
        assert!(p.get("source_commit").is_none(), "no commit known: {p}");
    } else {
        assert_eq!(p["source_commit"], BUILT_FROM, "{p}");
    }
}

#[test]
fn an_empty_source_commit_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "url = \"ws://127.0.0.1:1/ws\"\ntoken = \"t\"\nrepo_dir = \"/tmp\"\nsource_commit = \"\"\n",
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
    assert!(stderr.contains("source_commit"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

/// v3 dashboards call every `agent_version` but their own "outdated" (and
/// draw the lock red): `report_agent_version` is what the host says there,
/// while the real version stays in our own field.
#[tokio::test]
async fn report_agent_version_is_sent_and_the_real_version_kept() {
    let dashboard = Dashboard::start().await;
    let mut options = AgentOptions::new(dashboard.url());
    options
        .extra_toml
        .push("report_agent_version = \"3.1.5\"".into());
    let _agent = Agent::start(options).await;

    let register = dashboard.wait_frame("register", 1, 10 * SECOND).await;
    let p = register.payload();
    assert_eq!(p["agent_version"], "3.1.5", "{p}");
    assert_eq!(p["real_agent_version"], env!("CARGO_PKG_VERSION"), "{p}");
}

#[tokio::test]
async fn agent_version_is_ours_unless_configured() {
    let dashboard = Dashboard::start().await;
    let _agent = Agent::start(AgentOptions::new(dashboard.url())).await;

    let register = dashboard.wait_frame("register", 1, 10 * SECOND).await;
    let p = register.payload();
    assert_eq!(p["agent_version"], env!("CARGO_PKG_VERSION"), "{p}");
    assert_eq!(p["real_agent_version"], env!("CARGO_PKG_VERSION"), "{p}");
}

#[test]
fn a_report_agent_version_with_spaces_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "url = \"ws://127.0.0.1:1/ws\"\ntoken = \"t\"\nrepo_dir = \"/tmp\"\nreport_agent_version = \"3.1 beta\"\n",
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
    assert!(stderr.contains("report_agent_version"), "{stderr}");
}

/// Upstream's contract and the v3 dashboard know only `"nixos"` and
/// `"macos"`; this test host has no `/etc/NIXOS`, and is still `"nixos"`.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn host_type_is_nixos_on_linux_without_etc_nixos() {
    let dashboard = Dashboard::start().await;
    let _agent = Agent::start(AgentOptions::new(dashboard.url())).await;

    let register = dashboard.wait_frame("register", 1, 10 * SECOND).await;
    assert_eq!(
        register.payload()["host_type"],
        "nixos",
        "{}",
        register.payload()
    );
}
