//! The harness with a stand-in service, and the agent's life under systemd:
//! READY, StatusText, the credential, the journal and a clean stop.

use super::agent::{AgentSetup, CONFIG_PATH, wait_for_heartbeats, wait_for_status};
use super::container::Container;
use super::tree::TOKEN_PATH;
use super::util::{WAIT, contains, expect, expect_eq, wait_until};
use std::time::Instant;

const STAND_IN_NOTIFY: &str = include_str!("../systemd/notify-standin");

// ---------------------------------------------------------------------------
// The harness, with a stand-in service written in shell

/// The stand-in `Type=notify` unit with the token as its credential,
/// started without waiting for READY=1.
pub fn start_standin(c: &Container, token: &str) {
    c.write(TOKEN_PATH, token.as_bytes(), 0o600);
    c.write(
        "/usr/local/bin/notify-standin",
        STAND_IN_NOTIFY.as_bytes(),
        0o755,
    );
    c.write(
        "/etc/systemd/system/standin.service",
        b"[Service]\nType=notify\nNotifyAccess=main\nExecStart=/usr/local/bin/notify-standin\n\
          LoadCredential=token:/etc/nixfleet/token\n",
        0o644,
    );
    c.ok(&["systemctl", "daemon-reload"]);
    c.ok(&["systemctl", "start", "--no-block", "standin.service"]);
}

/// `activating` until READY=1, then `active`, with STATUS= in StatusText.
pub fn standin_becomes_ready(c: &Container) {
    let first_state = c.check(
        wait_until("the start job to run", WAIT, || {
            let state = c.prop("standin.service", "ActiveState");
            (state != "inactive").then_some(state)
        }),
        "the unit starts",
    );
    c.check(
        expect_eq(&first_state, "activating"),
        "the unit is activating before READY=1",
    );
    c.check(
        wait_until("standin active", WAIT, || {
            (c.prop("standin.service", "ActiveState") == "active").then_some(())
        }),
        "the unit becomes active after READY=1",
    );
    c.check(
        expect_eq(&c.prop("standin.service", "StatusText"), "stand-in ready"),
        "STATUS= reaches StatusText",
    );
}

/// The credential arrived, the journal has the unit's lines, and the token
/// is not in it.
pub fn standin_journal(c: &Container, token: &str) {
    let expected_line = format!("credential token: {} bytes", token.len());
    c.check(
        wait_until("stand-in journal lines", WAIT, || {
            let lines = c.journal_messages("standin.service");
            (lines.contains(&expected_line) && lines.iter().any(|l| l == "stand-in ready"))
                .then_some(())
        }),
        "the credential arrived and the journal has the unit's lines",
    );
    let export = c.journal_export();
    c.check(
        expect(
            contains(&export, b"_SYSTEMD_UNIT=standin.service"),
            "the export has the unit's entries",
        ),
        "journal export",
    );
    c.check(
        expect(
            !contains(&export, token.as_bytes()),
            "the token is not in the journal",
        ),
        "journal export",
    );
}

// ---------------------------------------------------------------------------
// The agent's life

/// The unit file and the config never hold the token.
pub fn token_not_in_unit_or_config(c: &Container, setup: &AgentSetup) {
    let unit_text = c.ok(&["systemctl", "cat", "nixfleet.service"]);
    c.check(
        expect(!unit_text.contains(&setup.token), "token not in the unit"),
        "unit",
    );
    let config_text = String::from_utf8_lossy(&c.read(CONFIG_PATH)).into_owned();
    c.check(
        expect(
            !config_text.contains(&setup.token),
            "token not in the config",
        ),
        "config",
    );
}

/// READY=1 comes once the config is valid and the agent runs, not once the
/// dashboard answers: with the dashboard down, `systemctl start` (which
/// waits for READY=1 of a Type=notify unit) still succeeds.
pub fn ready_without_a_dashboard(c: &Container) {
    let started = Instant::now();
    let start = c.exec(&["systemctl", "start", "nixfleet.service"]);
    c.check(
        expect(
            start.status.success(),
            &format!(
                "systemctl start nixfleet failed after {:?} (no READY=1?): {}",
                started.elapsed(),
                String::from_utf8_lossy(&start.stderr)
            ),
        ),
        "the agent sends READY=1 with the dashboard down",
    );
    c.check(
        expect_eq(&c.prop("nixfleet.service", "ActiveState"), "active"),
        "active after READY=1",
    );
    c.check(
        wait_for_status(c, "reconnecting in "),
        "StatusText while the dashboard is down",
    );
}

/// The dashboard comes up: the agent connects, registers, heartbeats.
pub fn connects_when_the_dashboard_comes_up(c: &Container, setup: &AgentSetup) {
    c.ok(&["systemctl", "start", "nixfleet-mock-dashboard.service"]);
    let connected = format!("connected to {}", setup.url());
    c.check(wait_for_status(c, &connected), "StatusText once connected");
    c.check(
        wait_for_heartbeats(setup, 2),
        "the dashboard accepted the token (from the credential) and sees heartbeats",
    );
    let registers = setup.messages("register", 0);
    c.check(
        expect(
            registers["messages"][0]["payload"]["hostname"] == setup.hostname.as_str(),
            &format!("a register with hostname {}: {registers}", setup.hostname),
        ),
        "the dashboard saw the register",
    );
    let rejected = setup.api("GET", "/api/rejected", None);
    c.check(
        expect_eq(&rejected.to_string(), "[]"),
        "no upgrade was refused",
    );
}

/// The agent's environment: the credential directory, never the token.
pub fn environment_has_no_token(c: &Container, setup: &AgentSetup) {
    let main_pid = c.prop("nixfleet.service", "MainPID");
    let environ = c.read_in(&format!("/proc/{main_pid}/environ"));
    c.check(
        expect(
            contains(&environ, b"CREDENTIALS_DIRECTORY="),
            "CREDENTIALS_DIRECTORY is set",
        ),
        "environment",
    );
    c.check(
        expect(
            !contains(&environ, setup.token.as_bytes()),
            "the token is not in /proc/<MainPID>/environ",
        ),
        "environment",
    );
    c.check(
        expect(
            !contains(&environ, b"NIXFLEET_TOKEN"),
            "no NIXFLEET_TOKEN variable",
        ),
        "environment",
    );
}

/// The dashboard goes away and comes back: StatusText follows.
pub fn status_follows_the_dashboard(c: &Container, setup: &AgentSetup) {
    c.ok(&["systemctl", "stop", "nixfleet-mock-dashboard.service"]);
    c.check(
        wait_for_status(c, "reconnecting in "),
        "StatusText after the dashboard stopped",
    );
    c.ok(&["systemctl", "start", "nixfleet-mock-dashboard.service"]);
    let connected = format!("connected to {}", setup.url());
    c.check(
        wait_for_status(c, &connected),
        "StatusText after the dashboard came back",
    );
    c.check(
        wait_for_heartbeats(setup, 1),
        "heartbeats to the restarted dashboard",
    );
}

/// Structured journal entries: fields become NIXFLEET_* journal fields.
pub fn structured_journal_entries(c: &Container, setup: &AgentSetup) {
    let url = setup.url();
    let entry = c.check(
        wait_until("a structured agent entry", WAIT, || {
            c.journal_json("nixfleet.service")
                .into_iter()
                .find(|entry| {
                    entry["SYSLOG_IDENTIFIER"] == "nixfleet-agent"
                        && entry["NIXFLEET_URL"] == url.as_str()
                        && entry["PRIORITY"].is_string()
                })
        }),
        "journal entries with NIXFLEET_URL (journalctl -o json)",
    );
    eprintln!("a structured journal entry of the agent: {entry}");
}

/// A clean stop: close code 1000 at the dashboard, Result=success.
pub fn clean_stop(c: &Container, setup: &AgentSetup) {
    c.ok(&["systemctl", "stop", "nixfleet.service"]);
    c.check(
        expect_eq(&c.prop("nixfleet.service", "ActiveState"), "inactive"),
        "inactive after stop",
    );
    c.check(
        expect_eq(&c.prop("nixfleet.service", "Result"), "success"),
        "Result after stop",
    );
    c.check(
        expect_eq(&c.prop("nixfleet.service", "NRestarts"), "0"),
        "no restarts",
    );
    c.check(
        wait_until("close code 1000", WAIT, || {
            let connections = setup.api("GET", &setup.host_path("/connections"), None);
            let last = connections.as_array()?.last()?.clone();
            (last["close_code"] == 1000).then_some(())
        }),
        "the dashboard saw close code 1000",
    );
}
