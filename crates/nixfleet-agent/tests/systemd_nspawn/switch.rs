//! Long switches under systemd: a noisy switch keeps the unit healthy, the
//! watchdog restarts a frozen agent, and an agent that dies mid-switch
//! loses no line and reports the switch once.

use super::agent::{AgentSetup, STAND_IN_BIN, wait_for_heartbeats};
use super::container::Container;
use super::tree::WATCHDOG_SEC;
use super::util::{WAIT, expect, expect_eq, wait_until};
use serde_json::Value;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// A long switch and the watchdog

/// A long switch (the stand-in takes ~5 s and floods its output): the
/// unit stays active, the process survives, heartbeats and output flow.
pub fn long_switch_keeps_the_unit_healthy(c: &Container, setup: &AgentSetup) {
    let main_pid = c.prop("nixfleet.service", "MainPID");
    let before = setup.messages("heartbeat", 0)["next"].as_u64().unwrap_or(0);
    setup.command(c, "switch");
    let (status, saw_running_status) = await_switch_on_a_healthy_unit(c, setup);
    c.check(
        expect_eq(&status["payload"]["status"].to_string(), "\"ok\""),
        &format!("the switch's status: {status}"),
    );
    c.check(
        expect_eq(&c.prop("nixfleet.service", "MainPID"), &main_pid),
        "the agent's process survived the switch",
    );
    c.check(
        expect(
            saw_running_status.is_some(),
            "StatusText showed `running switch since …` during the switch",
        ),
        "StatusText during the switch",
    );
    let (during, max_gap) = heartbeats_during_the_switch(c, setup, before, &status);
    let stored = output_reached_the_dashboard(c, setup);
    let withheld = c
        .journal_messages("nixfleet.service")
        .iter()
        .filter(|line| line.contains("withholding the watchdog ping"))
        .count();
    eprintln!(
        "switch: {during} heartbeats with pending_command=switch, largest heartbeat gap {max_gap} ms, \
         {stored} messages stored, {withheld} watchdog pings withheld"
    );
}

/// The switch's last status, awaited while the unit stays active and
/// unrestarted; and the `running switch since …` StatusText, if seen.
fn await_switch_on_a_healthy_unit(c: &Container, setup: &AgentSetup) -> (Value, Option<String>) {
    let mut saw_running_status = None;
    let status = c.check(
        wait_until("the switch's status", Duration::from_secs(40), || {
            let state = c.prop("nixfleet.service", "ActiveState");
            let restarts = c.prop("nixfleet.service", "NRestarts");
            if state != "active" || restarts != "0" {
                return Some(Err(format!(
                    "during the switch: ActiveState={state} NRestarts={restarts}"
                )));
            }
            let text = c.prop("nixfleet.service", "StatusText");
            if text.starts_with("running switch since ") {
                saw_running_status = Some(text);
            }
            let statuses = setup.messages("status", 0);
            let last = statuses["messages"].as_array()?.last()?.clone();
            Some(Ok(last))
        })
        .and_then(|r| r),
        "the switch ran to its end with the unit active and not restarted",
    );
    (status, saw_running_status)
}

/// Heartbeats continue during the switch: how many carried the switch, and
/// the largest gap (ms) between heartbeats up to its status.
fn heartbeats_during_the_switch(
    c: &Container,
    setup: &AgentSetup,
    before: u64,
    status: &Value,
) -> (usize, u64) {
    let switch_end = status["t"].as_u64().unwrap_or(0);
    let heartbeats = setup.messages("heartbeat", before);
    let during = heartbeats["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["payload"]["pending_command"] == "switch")
        .filter_map(|m| m["t"].as_u64())
        .count();
    c.check(
        expect(
            during >= 3,
            &format!(
                "heartbeats with pending_command=switch during a ~5 s switch at interval 1 s: {during}"
            ),
        ),
        "heartbeats continue during the switch",
    );
    let all: Vec<u64> = heartbeats["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["t"].as_u64())
        .filter(|&t| t <= switch_end)
        .collect();
    let max_gap = all.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    c.check(
        expect(
            max_gap <= 3000,
            &format!("largest gap between heartbeats during the switch: {max_gap} ms"),
        ),
        "heartbeats continue during the switch",
    );
    (during, max_gap)
}

/// The switch's output lines reached the dashboard; how many messages it
/// stores.
fn output_reached_the_dashboard(c: &Container, setup: &AgentSetup) -> u64 {
    let stored = setup.api("GET", &setup.host_path(""), None)["messages"]
        .as_u64()
        .unwrap_or(0);
    let first_output = setup.api(
        "GET",
        &setup.host_path("/messages?type=output&limit=1"),
        None,
    );
    c.check(
        expect(
            stored > 1000 && first_output["messages"][0]["type"] == "output",
            &format!("the switch's output lines reached the dashboard ({stored} messages stored)"),
        ),
        "output reached the dashboard",
    );
    stored
}

/// A frozen agent (SIGSTOP) is killed by systemd's watchdog, restarted,
/// and registers again.
pub fn watchdog_restarts_a_frozen_agent(c: &Container, setup: &AgentSetup) {
    let connections_before = setup
        .api("GET", &setup.host_path("/connections"), None)
        .as_array()
        .map_or(0, Vec::len);
    freeze_until_the_watchdog_restarts(c);
    c.check(
        wait_until("a new registered connection", WAIT, || {
            let connections = setup.api("GET", &setup.host_path("/connections"), None);
            let list = connections.as_array()?;
            let last = list.last()?;
            (list.len() > connections_before
                && last["live"] == true
                && !last["registered_at"].is_null())
            .then_some(())
        }),
        "the restarted agent registers again",
    );
    c.check(
        wait_for_heartbeats(setup, 1),
        "the restarted agent heartbeats",
    );
}

/// SIGSTOP to the agent; systemd's watchdog restarts it, and the journal
/// says it was the watchdog.
fn freeze_until_the_watchdog_restarts(c: &Container) {
    let frozen = c.prop("nixfleet.service", "MainPID");
    c.ok(&["sh", "-c", &format!("kill -STOP {frozen}")]);
    let froze_at = Instant::now();
    let new_pid = c.check(
        wait_until(
            "a watchdog restart",
            Duration::from_secs(WATCHDOG_SEC + 25),
            || {
                let restarts = c.prop("nixfleet.service", "NRestarts");
                let pid = c.prop("nixfleet.service", "MainPID");
                let state = c.prop("nixfleet.service", "ActiveState");
                (restarts == "1" && state == "active" && pid != frozen && pid != "0").then_some(pid)
            },
        ),
        "systemd's watchdog restarts a stopped agent",
    );
    eprintln!(
        "watchdog restart after {:?} (MainPID {frozen} -> {new_pid})",
        froze_at.elapsed()
    );
    let journal = c.ok(&[
        "journalctl",
        "--no-pager",
        "-o",
        "cat",
        "-u",
        "nixfleet.service",
    ]);
    c.check(
        expect(
            journal.contains("Watchdog timeout") && journal.contains("'watchdog'"),
            "the journal says `Watchdog timeout` and `Failed with result 'watchdog'`",
        ),
        "the restart was the watchdog's",
    );
}

// ---------------------------------------------------------------------------
// The agent's death mid-switch

/// A stand-in switch for the death tests: 60,000 numbered lines over
/// about 4 s (seq in bursts), then a line in /var/tmp/rebuild-done, exit 0.
const NUMBERED_REBUILD: &str = r#"#!/bin/sh
i=0
while [ "$i" -lt 60 ]; do
  seq -f "line %.0f of the stand-in switch" $((i * 1000 + 1)) $((i * 1000 + 1000))
  i=$((i + 1))
  sleep 0.06
done
echo "done 60000" >> /var/tmp/rebuild-done
"#;
const NUMBERED_LINES: u64 = 60_000;

/// Installs the numbered stand-in switch.
pub fn install_numbered_rebuild(c: &Container) {
    c.write(
        &format!("{STAND_IN_BIN}/nixos-rebuild"),
        NUMBERED_REBUILD.as_bytes(),
        0o755,
    );
}

/// Round `round` (from 0): a switch, the agent's `death` once 2,000 lines
/// arrived, and then the real status, once, and every line.
pub fn die_mid_switch(c: &Container, setup: &AgentSetup, round: usize, death: &str) {
    let outputs_from = setup.next_index("output");
    let statuses_from = setup.next_index("status");
    let restarts: u64 = c.prop("nixfleet.service", "NRestarts").parse().unwrap_or(0);
    setup.command(c, "switch");
    c.check(
        wait_until("the first 2,000 lines", WAIT, || {
            (setup.count("output", outputs_from) >= 2_000).then_some(())
        }),
        "the switch's output flows",
    );
    kill_the_agent(c, death);
    let status = c.check(
        wait_until(
            "the switch's status",
            Duration::from_secs(WATCHDOG_SEC + 60),
            || {
                let statuses = setup.messages("status", statuses_from);
                statuses["messages"].as_array()?.first().cloned()
            },
        ),
        &format!("{death}: a status after the agent's death"),
    );
    let restarted: u64 = c.prop("nixfleet.service", "NRestarts").parse().unwrap_or(0);
    c.check(
        expect(restarted > restarts, "systemd restarted the agent"),
        &format!("{death}: the agent was restarted"),
    );
    the_switchs_one_real_status(c, setup, round, death, &status, statuses_from);
    let repeats = every_line_arrived(c, setup, death, outputs_from);
    eprintln!(
        "{death}: {NUMBERED_LINES} lines, all delivered, {repeats} sent twice; status {}",
        status["payload"]
    );
}

/// `SIGKILL` of the agent's main process, or SIGSTOP for the `watchdog`.
fn kill_the_agent(c: &Container, death: &str) {
    let main_pid = c.prop("nixfleet.service", "MainPID");
    match death {
        "SIGKILL" => {
            c.ok(&[
                "systemctl",
                "kill",
                "--kill-whom=main",
                "-s",
                "SIGKILL",
                "nixfleet.service",
            ]);
        }
        _ => {
            c.ok(&["sh", "-c", &format!("kill -STOP {main_pid}")]);
        }
    }
}

/// The status is the switch's real one (`ok`/0), the stand-in ran to its
/// end, and two heartbeats later there is still exactly one status.
fn the_switchs_one_real_status(
    c: &Container,
    setup: &AgentSetup,
    round: usize,
    death: &str,
    status: &Value,
    statuses_from: u64,
) {
    c.check(
        expect_eq(
            &format!(
                "{} {}",
                status["payload"]["status"], status["payload"]["exit_code"]
            ),
            "\"ok\" 0",
        ),
        &format!("{death}: the real status: {status}"),
    );
    let done = c.ok(&["cat", "/var/tmp/rebuild-done"]);
    c.check(
        expect(
            done.lines().count() == round + 1,
            "the stand-in ran to its end",
        ),
        &format!("{death}: the switch survived the agent: {done:?}"),
    );
    let status_index = status["index"].as_u64().unwrap_or(0);
    c.check(
        wait_until("two heartbeats after the status", WAIT, || {
            (setup.count("heartbeat", status_index) >= 2).then_some(())
        }),
        "heartbeats after the status",
    );
    let statuses = setup.count("status", statuses_from);
    c.check(
        expect(statuses == 1, "exactly one status"),
        &format!("{death}: {statuses} statuses"),
    );
}

/// Every numbered line reached the dashboard in order; returns how many
/// were sent twice.
fn every_line_arrived(c: &Container, setup: &AgentSetup, death: &str, outputs_from: u64) -> u64 {
    let outputs = setup.messages("output", outputs_from);
    let (mut next, mut repeats) = (1u64, 0u64);
    for message in outputs["messages"].as_array().into_iter().flatten() {
        let Some(n) = message["payload"]["line"]
            .as_str()
            .and_then(|l| l.strip_prefix("line "))
            .and_then(|l| l.split(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if n == next {
            next += 1;
        } else if n < next {
            repeats += 1;
        } else {
            c.check::<()>(
                Err(format!("line {next} missing: line {n} came next")),
                &format!("{death}: every line"),
            );
        }
    }
    c.check(
        expect(next == NUMBERED_LINES + 1, "every line arrived"),
        &format!("{death}: lines 1..{} of {NUMBERED_LINES} arrived", next - 1),
    );
    repeats
}
