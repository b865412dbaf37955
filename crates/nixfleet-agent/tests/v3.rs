//! What v3 dashboards need, end to end: a fresh `register` after every
//! successful switch, a heartbeat right after every status, the status
//! compartments, `operation_progress`, and the v3 commands.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

// The tests, in two modules: the commands that change the host or the
// agent, and the checks behind the compartments; the helpers below serve
// both.
#[path = "v3/checks.rs"]
mod checks;
#[path = "v3/commands.rs"]
mod commands;

/// Two fake NixOS systems and a `current-system` symlink to the first, for
/// `NIXFLEET_TEST_CURRENT_SYSTEM`.
fn fake_systems(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let make = |name: &str, version: &str| {
        let sys = dir.join(name);
        std::fs::create_dir_all(&sys).unwrap();
        std::fs::write(sys.join("nixos-version"), format!("{version}\n")).unwrap();
        sys
    };
    let old = make("system-old", "25.05.20250601.aaaaaaa");
    let new = make("system-new", "25.11.20251120.bbbbbbb");
    let link = dir.join("current-system");
    std::os::unix::fs::symlink(&old, &link).unwrap();
    (link, old, new)
}

/// A committed repo in `repo` with a flake.lock.
fn commit_repo(repo: &Path) -> String {
    git(repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("flake.nix"), "{ }\n").unwrap();
    std::fs::write(
        repo.join("flake.lock"),
        r#"{"nodes":{"root":{"inputs":{"nixfleet":"nixfleet"}}},"root":"root","version":7}"#,
    )
    .unwrap();
    git(repo, &["add", "."]);
    git(repo, &["commit", "-q", "-m", "one"]);
    git(repo, &["rev-parse", "HEAD"])
}

struct Host {
    agent: Agent,
    link: PathBuf,
    new_system: PathBuf,
}

/// An agent with a committed repo, fake systems, and stand-ins: a
/// `nixos-rebuild` running `rebuild` (with `$NEW_SYSTEM` and `$LINK`
/// set), plus any `(name, body)` in `more`.
async fn host(
    dashboard: &Dashboard,
    rebuild: &str,
    more: &[(&str, &str)],
    tweak: impl FnOnce(&mut AgentOptions),
) -> Host {
    let mut options = AgentOptions::new(dashboard.url());
    tweak(&mut options);
    let (dir, bin) = Agent::prepare(&options);
    let (link, _old, new_system) = fake_systems(dir.path());
    commit_repo(&dir.path().join("repo"));
    options.env.push((
        "NIXFLEET_TEST_CURRENT_SYSTEM".into(),
        link.display().to_string(),
    ));
    let prelude = format!(
        "LINK={:?}\nNEW_SYSTEM={:?}\n",
        link.display().to_string(),
        new_system.display().to_string()
    );
    script(&bin, "nixos-rebuild", &format!("{prelude}{rebuild}"));
    for (name, body) in more {
        script(&bin, name, &format!("{prelude}{body}"));
    }
    let agent = Agent::spawn(dir, options).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    Host {
        agent,
        link,
        new_system,
    }
}

/// Switches the fake current-system link to the new system.
const SWITCH_TO_NEW: &str = "echo building\nln -sfn \"$NEW_SYSTEM\" \"$LINK\"\necho activated";

fn send(dashboard: &Dashboard, command: &str) {
    dashboard.command(dashboard.current_conn().unwrap(), command);
}

async fn status_of(dashboard: &Dashboard, n: usize) -> Value {
    dashboard
        .wait_frame("status", n, 30 * SECOND)
        .await
        .payload()
        .clone()
}

/// The first heartbeat after `after` on `conn` satisfying `cond`.
async fn heartbeat_where(
    dashboard: &Dashboard,
    what: &str,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    dashboard
        .wait_frame_where("heartbeat", 10 * SECOND, |p| cond(p))
        .await
        .payload()
        .clone()
        .get("update_status")
        .cloned()
        .unwrap_or_else(|| panic!("no update_status while waiting for {what}"))
}

fn progress_frames(dashboard: &Dashboard, phase: &str) -> Vec<Value> {
    dashboard
        .frames("operation_progress")
        .iter()
        .filter_map(|f| f.payload()["progress"].get(phase).cloned())
        .collect()
}
