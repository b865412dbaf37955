//! The real agent beside the mock, for the tests that start it
//! (`browser.rs`, `browser_fleet.rs` through `browser_kit`, and `trust.rs`):
//! its binary, built here when a workspace run did not, and its config.

// Each test binary uses its own part of the kit.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The agent binary beside the mock dashboard. It is another crate of the
/// workspace, so cargo builds it for this test only in a workspace run
/// (`cargo test --workspace`, what CI does); otherwise, when it is missing
/// or older than the agent's sources, it is built here.
pub fn agent_binary() -> PathBuf {
    let mock = Path::new(env!("CARGO_BIN_EXE_nixfleet-mock-dashboard"));
    let agent = mock.with_file_name("nixfleet-agent");
    let built = std::fs::metadata(&agent).and_then(|m| m.modified()).ok();
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("../nixfleet-agent");
    let stale = match built {
        None => true,
        Some(built) => {
            newest_file(&sources.join("src")).max(newest_file(&sources.join("Cargo.toml")))
                > Some(built)
        }
    };
    if stale {
        eprintln!(
            "building {} (missing or older than its sources)",
            agent.display()
        );
        let profile_dir = mock.parent().expect("profile directory");
        let mut build =
            std::process::Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()));
        build.args([
            "build",
            "--quiet",
            "-p",
            "nixfleet-agent",
            "--bin",
            "nixfleet-agent",
        ]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        if let Some(target_dir) = profile_dir.parent() {
            build.arg("--target-dir").arg(target_dir);
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "cargo build -p nixfleet-agent failed");
    }
    agent
}

pub fn newest_file(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .flatten()
        .filter_map(|entry| newest_file(&entry.path()))
        .max()
}

/// Writes `agent.toml` in `home` for the agent of `hostname` reaching `url`
/// with the token in `token_file`, its repository and state under `home`,
/// and the `extra` TOML lines (top-level keys); returns its path.
pub fn write_agent_config(
    home: &Path,
    url: &str,
    hostname: &str,
    token_file: &Path,
    extra: &str,
) -> PathBuf {
    let config = home.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "url = {url:?}\ntoken_file = {token:?}\nrepo_dir = {repo:?}\nstate_dir = {state:?}\n\
             hostname = {hostname:?}\n{extra}\n",
            token = token_file.display().to_string(),
            repo = home.join("repo").display().to_string(),
            state = home.join("state").display().to_string(),
        ),
    )
    .unwrap();
    config
}
