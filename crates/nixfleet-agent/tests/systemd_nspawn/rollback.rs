//! Safe deployments under the real systemd (issue 28): a switch that cuts
//! the host off the dashboard is rolled back on time, by the agent systemd
//! starts again or by the transient timer when no agent can start.

use super::agent::{AgentSetup, CONFIG_PATH, STAND_IN_BIN};
use super::container::Container;
use super::util::{WAIT, expect, expect_eq, fill, wait_until};
use serde_json::Value;
use std::time::Duration;

/// The system running before the switch, and the one the switch activates.
const OLD_SYSTEM: &str = "/nix/store/00000000000000000000000000000000-nixos-system-old";
const NEW_SYSTEM: &str = "/nix/store/11111111111111111111111111111111-nixos-system-new";
const PROFILE: &str = "/nix/var/nix/profiles/system";
/// Present: the new system's activation breaks the agent's config.
const BREAK_AGENT_FLAG: &str = "/etc/nixfleet/break-agent";
/// Seconds the switch waits for confirmation in these tests.
const CONFIRM_SECS: u64 = 10;

/// Stand-in `nixos-rebuild switch`: activates the "new system":
/// `/run/current-system` and the profile move, and the agent's unit file
/// changes, so that the agent exits 75 once its status is delivered. The
/// new unit cuts the host off the dashboard when it starts (its
/// `ExecStartPre=` stops the dashboard): the agent systemd starts cannot
/// confirm. With the flag the new config is one the agent refuses (78).
const SWITCH_TO_NEW: &str = r#"#!/bin/sh
echo "stand-in nixos-rebuild $*"
ln -sfn @new@ /run/current-system
ln -sfn @new@ @profile@-2-link
ln -sfn system-2-link @profile@
echo '# changed by the new system' >> /etc/systemd/system/nixfleet.service
printf '[Service]\nExecStartPre=/bin/systemctl stop nixfleet-mock-dashboard.service\n' \
  > /etc/systemd/system/nixfleet.service.d/new-system.conf
if [ -e @flag@ ]; then
  printf 'interval = "never"\n' >> /etc/nixfleet/agent.toml
fi
systemctl daemon-reload
echo "stand-in nixos-rebuild: the new system is active"
"#;

/// Stand-in for the old system's `switch-to-configuration`: restores what
/// the new system broke, brings the dashboard back, and starts the agent's
/// unit if it is not running (as a real activation restarts failed units).
const SWITCH_TO_OLD: &str = r#"#!/bin/sh
echo "old system: switch-to-configuration $*"
cp /etc/nixfleet/agent.toml.good /etc/nixfleet/agent.toml
rm -f /etc/systemd/system/nixfleet.service.d/new-system.conf
systemctl daemon-reload
ln -sfn @old@ /run/current-system
systemctl --no-block start nixfleet-mock-dashboard.service
if ! systemctl -q is-active nixfleet.service; then
  systemctl reset-failed nixfleet.service
  systemctl --no-block restart nixfleet.service
fi
echo "old system: active"
"#;

/// Stand-in `nix-env --profile P --set S`: a new generation of P pointing
/// at S; each call is logged.
const NIX_ENV_SET: &str = r#"#!/bin/sh
[ "$1" = --profile ] && [ "$3" = --set ] || { echo "unexpected: $*" >&2; exit 2; }
n=$(( $(ls -d "$2"-*-link 2>/dev/null | wc -l) + 1 ))
ln -sfn "$4" "$2-$n-link"
ln -sfn "$(basename "$2")-$n-link" "$2"
echo "$4" >> /var/tmp/nix-env-set
echo "nix-env: $2 is generation $n"
"#;

/// The agent with `confirm_timeout`, the old system running and recorded
/// in the profile, the stand-ins installed, the dashboard and the agent
/// started and registered.
pub fn install_safe_deployment(c: &Container, hostname: &str, break_agent: bool) -> AgentSetup {
    let setup = AgentSetup::install(c, hostname);
    let mut config = String::from_utf8_lossy(&c.read(CONFIG_PATH)).into_owned();
    config.push_str(&format!("confirm_timeout = {CONFIRM_SECS}\n"));
    c.write(CONFIG_PATH, config.as_bytes(), 0o644);
    c.write("/etc/nixfleet/agent.toml.good", config.as_bytes(), 0o644);
    if break_agent {
        c.write(BREAK_AGENT_FLAG, b"", 0o644);
    }
    let to_new = [
        ("@new@", NEW_SYSTEM),
        ("@profile@", PROFILE),
        ("@flag@", BREAK_AGENT_FLAG),
    ];
    c.mkdir(&format!("{NEW_SYSTEM}/bin"));
    c.write(
        &format!("{OLD_SYSTEM}/bin/switch-to-configuration"),
        fill(SWITCH_TO_OLD, &[("@old@", OLD_SYSTEM)]).as_bytes(),
        0o755,
    );
    c.write(
        &format!("{STAND_IN_BIN}/nixos-rebuild"),
        fill(SWITCH_TO_NEW, &to_new).as_bytes(),
        0o755,
    );
    // On the PATH of both the agent's unit and systemd's transient units.
    c.write("/usr/local/bin/nix-env", NIX_ENV_SET.as_bytes(), 0o755);
    c.mkdir("/nix/var/nix/profiles");
    c.ok(&["ln", "-sfn", OLD_SYSTEM, &format!("{PROFILE}-1-link")]);
    c.ok(&["ln", "-sfn", "system-1-link", PROFILE]);
    c.ok(&["ln", "-sfn", OLD_SYSTEM, "/run/current-system"]);
    setup.start(c);
    setup
}

/// `switch` from the dashboard; the new system's agent unit stops the
/// dashboard.
pub fn switch_and_lose_the_dashboard(c: &Container, setup: &AgentSetup) {
    setup.command(c, "switch");
    c.check(
        wait_until("the dashboard stopped by the new system", WAIT, || {
            (c.prop("nixfleet-mock-dashboard.service", "ActiveState") == "inactive").then_some(())
        }),
        "the switch cut the host off the dashboard",
    );
}

/// The old system's activation output is among the `output` lines of
/// `rollback` at the dashboard: `what` delivered it.
pub fn rollback_output_delivered(c: &Container, setup: &AgentSetup, rollback: &Value, what: &str) {
    let lines = rollback_lines(setup);
    c.check(
        expect(lines.iter().any(|l| l.contains("old system: active")), what),
        &format!("the rollback's output: {lines:?}; status {rollback}"),
    );
}

/// The `output` lines of `rollback` the dashboard got.
fn rollback_lines(setup: &AgentSetup) -> Vec<String> {
    let outputs = setup.messages("output", 0);
    outputs["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["payload"]["command"] == "rollback")
        .filter_map(|m| m["payload"]["line"].as_str().map(str::to_owned))
        .collect()
}

/// The `rollback` status at the dashboard (started again by the old
/// system), and the host back on exactly the recorded system, set once.
pub fn await_rollback_report(c: &Container, setup: &AgentSetup) -> Value {
    let limit = Duration::from_secs(CONFIRM_SECS) + WAIT + WAIT;
    let status = c.check(
        wait_until("the rollback's status", limit, || {
            let statuses = setup.messages("status", 0);
            statuses["messages"]
                .as_array()?
                .iter()
                .find(|m| m["payload"]["command"] == "rollback")
                .cloned()
        }),
        "the rollback reported to the dashboard",
    );
    let message = status["payload"]["message"].as_str().unwrap_or_default();
    c.check(
        expect(
            status["payload"]["status"] == "error"
                && message.contains("rolled back to 0000000-nixos-system-old"),
            "status error, rolled back to the recorded system",
        ),
        &format!("the rollback status: {status}"),
    );
    let set = c.ok(&["cat", "/var/tmp/nix-env-set"]);
    c.check(
        expect_eq(set.trim_end(), OLD_SYSTEM),
        "nix-env --set ran once, with the recorded system",
    );
    let current = c.ok(&["readlink", "/run/current-system"]);
    c.check(
        expect_eq(current.trim_end(), OLD_SYSTEM),
        "the old system runs again",
    );
    status
}

/// One rollback status at the dashboard, and the timer's service ran the
/// old system's activation.
pub fn the_timer_rolled_back_once(c: &Container, setup: &AgentSetup) {
    let statuses = setup.messages("status", 0);
    let rollbacks = statuses["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["payload"]["command"] == "rollback")
        .count();
    c.check(
        expect(rollbacks == 1, "one rollback status"),
        &format!("{rollbacks} rollback statuses"),
    );
    let timer_log = c.ok(&[
        "journalctl",
        "--no-pager",
        "-o",
        "cat",
        "-u",
        "nixfleet-rollback-*.service",
    ]);
    c.check(
        expect(
            timer_log.contains("old system: active"),
            "the timer's service ran the old system's activation",
        ),
        &format!("the timer's journal: {timer_log}"),
    );
}
