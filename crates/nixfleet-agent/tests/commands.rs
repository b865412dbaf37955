//! Commands end to end: the real agent, stand-in `nixos-rebuild` scripts
//! first on PATH, real git, and an in-test dashboard.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

// The tests by concern; the helpers below serve them all. The two tests
// in this file stay here: nix/package.nix skips them by their whole
// names, which a module would prefix.
#[path = "commands/output.rs"]
mod output;
#[path = "commands/pull.rs"]
mod pull;
#[path = "commands/stop.rs"]
mod stop;
#[path = "commands/test_command.rs"]
mod test_command;

/// Starts an agent whose PATH holds a stand-in `nixos-rebuild` with `body`.
async fn agent_with_rebuild(
    dashboard: &Dashboard,
    body: &str,
    tweak: impl FnOnce(&mut AgentOptions),
) -> (Agent, u64) {
    let agent = start_with_rebuild(dashboard.url(), body, tweak).await;
    let register = dashboard.wait_frame("register", 1, 10 * SECOND).await;
    (agent, register.conn())
}

fn statuses(dashboard: &Dashboard) -> Vec<Value> {
    dashboard
        .frames("status")
        .iter()
        .map(|s| s.payload().clone())
        .collect()
}

fn output_lines(dashboard: &Dashboard) -> Vec<(String, String, bool)> {
    dashboard
        .frames("output")
        .iter()
        .map(|s| {
            let p = s.payload();
            (
                p["line"].as_str().unwrap().to_owned(),
                p["stream"].as_str().unwrap().to_owned(),
                p["is_error"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// `N` from a "[nixfleet] N lines dropped" notice.
fn dropped_notice(line: &str) -> Option<u64> {
    line.strip_prefix("[nixfleet] ")?
        .strip_suffix(" lines dropped")?
        .parse()
        .ok()
}

#[tokio::test]
async fn heartbeats_carry_the_command_while_it_runs_and_null_after() {
    let dashboard = Dashboard::start().await;
    let (agent, conn) = agent_with_rebuild(
        &dashboard,
        "echo $$ > \"$HOME/pid\"\necho building\nsleep 5\necho done",
        |_| {},
    )
    .await;
    dashboard.command(conn, "switch");
    let status = dashboard.wait_frame("status", 1, 20 * SECOND).await;
    assert_eq!(status.payload()["status"], "ok");
    let pid = read_pid(&agent.dir.path().join("pid"));

    let log = dashboard.log();
    let during: Vec<&Seen> = log
        .iter()
        .filter(|s| s.kind() == Some("heartbeat") && s.payload()["pending_command"] == "switch")
        .collect();
    assert!(
        during.len() >= 4,
        "a 5 s command at interval 1 spans several beats: {}",
        during.len()
    );
    assert!(
        during
            .iter()
            .skip(1)
            .all(|s| s.payload()["command_pid"] == pid),
        "command_pid is the group leader {pid}"
    );
    let gaps: Vec<Duration> = during.windows(2).map(|w| w[1].at() - w[0].at()).collect();
    assert!(
        gaps.iter().all(|g| *g <= Duration::from_millis(1500)),
        "{gaps:?}"
    );

    let after = dashboard
        .wait_for(5 * SECOND, "heartbeat after the status", |log| {
            log.iter()
                .find(|s| s.kind() == Some("heartbeat") && s.at() > status.at())
                .cloned()
        })
        .await;
    assert_eq!(after.payload()["pending_command"], Value::Null);
    assert_eq!(after.payload()["command_pid"], Value::Null);
}

#[tokio::test]
async fn a_flood_of_output_never_stalls_heartbeats_and_memory_stays_bounded() {
    let dashboard = Dashboard::start().await;
    let body = r#"
awk 'BEGIN { for (i = 0; i < 300000; i++) printf "line %06d of the flood, padded to about ninety bytes ...............\n", i }'"#;
    let (agent, conn) = agent_with_rebuild(&dashboard, body, |_| {}).await;
    let before_kib = agent.rss_kib();
    dashboard.command(conn, "switch");
    let status = dashboard.wait_frame("status", 1, 120 * SECOND).await;
    assert_eq!(status.payload()["status"], "ok");
    // Two more beats, so that the gaps span the whole flood.
    let beats = dashboard.frames("heartbeat").len();
    dashboard
        .wait_frame("heartbeat", beats + 2, 5 * SECOND)
        .await;
    let log = dashboard.log();
    let gaps = heartbeat_gaps(&log, conn);
    let worst = gaps.iter().max().copied().unwrap_or_default();
    assert!(
        worst <= Duration::from_millis(1500),
        "heartbeat gap {worst:?} during the flood"
    );
    let (mut delivered, mut dropped) = (0u64, 0u64);
    for line in log
        .iter()
        .filter(|s| s.kind() == Some("output"))
        .filter_map(|s| s.payload()["line"].as_str())
    {
        match dropped_notice(line) {
            Some(n) => dropped += n,
            None => delivered += 1,
        }
    }
    assert_eq!(
        delivered + dropped,
        300_000,
        "every line delivered or accounted for ({dropped} dropped)"
    );
    let peak_kib = agent.hwm_kib();
    eprintln!(
        "flood: worst heartbeat gap {worst:?}, {dropped} lines dropped, RSS {before_kib} KiB before, {peak_kib} KiB peak"
    );
    assert!(
        peak_kib < before_kib + 32 * 1024,
        "peak RSS {peak_kib} KiB (was {before_kib} KiB before)"
    );
}
