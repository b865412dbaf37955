//! The deployment metrics through the real node_exporter: safe-deployment
//! rollbacks by result, and the age of `repo_dir/flake.lock` (read when
//! the file changes, absent with one log line when it is unreadable).
//! The fake host (systems, links, stand-ins) is tests/rollback.rs's.

mod common;
#[path = "observability/exporter.rs"]
mod exporter;
// Only part of the fake host is needed here.
#[allow(dead_code)]
#[path = "rollback/host.rs"]
mod host;

use common::*;
use exporter::NodeExporter;
use host::*;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

const DAY: u64 = 86_400;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A `flake.lock` whose newest direct input was modified at `newest`, an
/// older one a year before, and a follows.
fn lock_file(newest: u64) -> String {
    format!(
        r#"{{
  "nodes": {{
    "home-manager": {{
      "inputs": {{ "nixpkgs": [ "nixpkgs" ] }},
      "locked": {{ "lastModified": {old}, "owner": "nix-community", "repo": "home-manager", "rev": "a", "type": "github" }},
      "original": {{ "owner": "nix-community", "repo": "home-manager", "type": "github" }}
    }},
    "nixpkgs": {{
      "locked": {{ "lastModified": {newest}, "owner": "NixOS", "repo": "nixpkgs", "rev": "b", "type": "github" }},
      "original": {{ "owner": "NixOS", "ref": "nixos-unstable", "repo": "nixpkgs", "type": "github" }}
    }},
    "root": {{ "inputs": {{ "home-manager": "home-manager", "nixpkgs": "nixpkgs" }} }}
  }},
  "root": "root",
  "version": 7
}}
"#,
        old = newest - 365 * DAY
    )
}

/// Replaces `repo/flake.lock` as git and Nix do: aside, then renamed.
fn replace_lock(repo: &Path, text: &str) {
    let aside = repo.join(".flake.lock.new");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, repo.join("flake.lock")).unwrap();
}

/// The scraped age, once present and within what `newest` allows between
/// `since` and now.
async fn wait_for_age(exporter: &NodeExporter, newest: u64, since: u64) -> f64 {
    let name = "nixfleet_agent_flake_lock_age_seconds ";
    let value = |body: &str| -> Option<f64> {
        let line = body.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].parse().ok()
    };
    let fits = |age: f64| (since - newest) as f64 <= age && age <= (unix_now() - newest) as f64;
    let body = exporter
        .wait_until("the lock's age", |body| value(body).is_some_and(fits))
        .await;
    value(&body).unwrap()
}

/// Waits for the `n`th status of `rollback`.
async fn rollback_statuses(dashboard: &Dashboard, n: usize) {
    dashboard
        .wait_for(30 * SECOND, "rollback statuses", |log| {
            let count = log
                .iter()
                .filter(|s| s.kind() == Some("status") && s.payload()["command"] == "rollback")
                .count();
            (count >= n).then_some(())
        })
        .await;
}

#[tokio::test]
async fn rollbacks_and_the_lock_files_age_reach_node_exporter() {
    if exporter::missing() {
        return;
    }
    let textfiles = tempfile::tempdir().unwrap();
    let file = textfiles.path().join("nixfleet-agent.prom");
    let dashboard = Dashboard::start().await;
    let (dir, paths, mut options, tests) = prepare_with_tests(dashboard.url(), 60);
    options.extra_toml.push(format!(
        "metrics_textfile = {:?}",
        file.display().to_string()
    ));
    let repo = paths.home.join("repo");
    script(&tests, "T1-net.sh", "echo 'no route' >&2\nexit 1");
    let started = unix_now();
    let ten_days_ago = started - 10 * DAY;
    replace_lock(&repo, &lock_file(ten_days_ago));
    let agent = Agent::spawn(dir, options).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    let exporter = NodeExporter::start(textfiles.path());

    // The lock as found at start; no rollback yet, both results at 0.
    let body = exporter
        .wait_for(&[
            "nixfleet_agent_rollbacks_total{result=\"ok\"} 0",
            "nixfleet_agent_rollbacks_total{result=\"failed\"} 0",
        ])
        .await;
    assert!(
        body.contains("# TYPE nixfleet_agent_rollbacks_total counter"),
        "{body}"
    );
    wait_for_age(&exporter, ten_days_ago, started).await;

    // A switch whose tests fail is rolled back: counted as ok.
    dashboard.command(dashboard.current_conn().unwrap(), "switch");
    rollback_statuses(&dashboard, 1).await;
    exporter
        .wait_for(&[
            "nixfleet_agent_rollbacks_total{result=\"ok\"} 1",
            "nixfleet_agent_rollbacks_total{result=\"failed\"} 0",
        ])
        .await;

    // A lock updated by hand (no command): seen through the file watch.
    let changed = unix_now();
    let yesterday = changed - DAY;
    replace_lock(&repo, &lock_file(yesterday));
    wait_for_age(&exporter, yesterday, changed).await;

    // Unreadable: the metric goes, one line says why, the agent goes on.
    replace_lock(&repo, "{ \"nodes\": ");
    exporter
        .wait_until("no lock age", |body| {
            !body.contains("nixfleet_agent_flake_lock_age_seconds")
                && body.contains("nixfleet_agent_connected 1")
        })
        .await;
    let complaint = "cannot read the inputs' times from";
    let log = agent.stderr();
    assert_eq!(log.matches(complaint).count(), 1, "{log}");
    assert!(log.contains("flake.lock: not a flake.lock: "), "{log}");

    // A second rollback that itself fails: counted as failed.
    std::fs::write(paths.home.join("old-exit"), "1\n").unwrap();
    dashboard.command(dashboard.current_conn().unwrap(), "switch");
    rollback_statuses(&dashboard, 2).await;
    exporter
        .wait_for(&[
            "nixfleet_agent_rollbacks_total{result=\"ok\"} 1",
            "nixfleet_agent_rollbacks_total{result=\"failed\"} 1",
        ])
        .await;
    assert_eq!(rollback_runs(&paths).len(), 2);
    // Still one line for the same unreadable lock, after two commands.
    assert_eq!(agent.stderr().matches(complaint).count(), 1);
}
