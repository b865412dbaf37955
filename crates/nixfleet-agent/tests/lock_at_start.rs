//! The lock compartment is known at once: its answer (one `git log` of
//! `flake.lock`) arrives just after the first heartbeat, and with the
//! default 30 s interval a v3 page showed the lock unknown for 30 s after
//! every start and every re-register (issue 26).

mod common;

use common::*;
use std::time::Duration;

/// Known within this long of a `register`, with a 30 s interval.
const KNOWN_WITHIN: Duration = Duration::from_secs(3);

/// A committed repository with a `flake.lock`.
fn commit_repo(repo: &std::path::Path) {
    git(repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("flake.nix"), "{ }\n").unwrap();
    std::fs::write(repo.join("flake.lock"), "{\"version\":7}\n").unwrap();
    git(repo, &["add", "."]);
    git(repo, &["commit", "-q", "-m", "one"]);
}

/// Waits for a heartbeat on `register`'s connection whose lock compartment
/// has a verdict, and says how long after the register it came.
async fn lock_known_after(dashboard: &Dashboard, register: &Seen) -> Duration {
    let conn = register.conn();
    let beat = dashboard
        .wait_for(10 * SECOND, "a heartbeat with the lock known", |log| {
            log.iter()
                .find(|s| {
                    s.conn() == conn
                        && s.kind() == Some("heartbeat")
                        && lock_known(&s.payload()["update_status"]["lock"])
                })
                .cloned()
        })
        .await;
    beat.at().duration_since(register.at())
}

fn lock_known(lock: &serde_json::Value) -> bool {
    lock["checked_at"].as_str().is_some_and(|t| !t.is_empty())
        && lock["status"] != "unknown"
        && lock["status"] != "working"
}

#[tokio::test]
async fn the_lock_is_known_within_seconds_of_register_and_reregister() {
    let dashboard = Dashboard::start().await;
    let mut options = AgentOptions::new(dashboard.url());
    options.interval = 30;
    options.ping_timeout = 90;
    let (dir, bin) = Agent::prepare(&options);
    commit_repo(&dir.path().join("repo"));
    script(&bin, "nixos-rebuild", "echo built");
    let _agent = Agent::spawn(dir, options).await;

    let first = dashboard.wait_frame("register", 1, 10 * SECOND).await;
    let after = lock_known_after(&dashboard, &first).await;
    assert!(after < KNOWN_WITHIN, "lock known {after:?} after register");

    // A successful switch: the agent registers again on a fresh connection.
    dashboard.command(first.conn(), "switch");
    let second = dashboard.wait_frame("register", 2, 20 * SECOND).await;
    let after = lock_known_after(&dashboard, &second).await;
    assert!(
        after < KNOWN_WITHIN,
        "lock known {after:?} after re-register"
    );
}
