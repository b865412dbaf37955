//! The agent under a real systemd, in throw-away `systemd-nspawn` containers.
//!
//! What the unit tests cannot show: that `Type=notify` with `READY=1`,
//! `STATUS=`, the watchdog, `LoadCredential=` and the journal work with the
//! real systemd and the real binaries, through the unit file the NixOS module
//! renders: `nix/render-unit.nix` evaluates `modules/nixfleet.nix` with
//! NixOS's own systemd option types and `systemd-lib` (nixpkgs' `lib` and
//! `nixos/lib`, found like `nix/check.sh` finds them: `$NIXPKGS_LIB` and
//! `$NIXOS_LIB`, else `../shared/nix/nixpkgs` beside the repository), and
//! the test installs that text with its own paths for the store paths. The
//! module is the only source of the unit.
//!
//! How:
//!
//! - A Debian bookworm tree is built once per machine with `debootstrap`
//!   into `$NIXFLEET_NSPAWN_CACHE` (default `/var/cache/nixfleet-nspawn`),
//!   under a lock, in a temporary directory renamed into place when
//!   complete. The mirror comes from the host's apt sources
//!   (`$NIXFLEET_DEBIAN_MIRROR` overrides it).
//! - Each test boots its own container (`--volatile=overlay`, so the tree is
//!   never changed), in its own cgroups, with the freshly built binaries
//!   bound read-only at `/opt/nixfleet`; it runs `systemctl`/`journalctl`
//!   inside through `nsenter`, writes files through `/proc/<PID 1>/root`,
//!   and tears the container down (and its cgroups) in `Drop`. After a
//!   failure the container's journal is saved next to the test binary
//!   (`target/tmp/nspawn-<name>.journal`).
//! - The container shares the host's network: the mock dashboard runs inside
//!   as a unit on a free loopback port and the test talks to its HTTP API
//!   from the host.
//!
//! Requirements: root, `systemd-nspawn` (Debian: `systemd-container`),
//! `nsenter`, `nix-instantiate` (Debian: `nix-bin`) with nixpkgs' `lib` and
//! `nixos/lib`, and `debootstrap` with network access the first time. Without
//! them the tests print `skipped: …` and pass, except under `CI=true`, where
//! they fail.

use serde_json::Value;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const AGENT_DROP_IN: &str = include_str!("systemd/nixfleet-test.conf");
const MOCK_UNIT_TEMPLATE: &str = include_str!("systemd/mock-dashboard.service");
const STAND_IN_REBUILD: &str = include_str!("systemd/nixos-rebuild");
const STAND_IN_NOTIFY: &str = include_str!("systemd/notify-standin");

/// Inside the container.
const BIN_DIR: &str = "/opt/nixfleet";
const TOKEN_PATH: &str = "/etc/nixfleet/token";
const CONFIG_PATH: &str = "/etc/nixfleet/agent.toml";
const REPO_DIR: &str = "/srv/nixfleet-repo";
const STAND_IN_BIN: &str = "/opt/nixfleet-test/bin";
const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// `WatchdogSec=` of the agent's unit in these tests.
const WATCHDOG_SEC: u64 = 3;

/// Generous bounds: the machine may be busy with other builds.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// The tests

/// The harness itself, with a stand-in service written in shell: boot,
/// a `Type=notify` unit that is `activating` until READY=1, STATUS=,
/// credentials, the journal, and a clean teardown.
#[test]
fn systemd_nspawn_harness_runs_a_notify_service() {
    let Some(env) = environment() else { return };
    let mut c = Container::boot(env, "harness");
    let token = unique_token();
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
    let cgroups = c.cgroups.clone();
    let report = c.shutdown();
    assert!(report.clean, "nspawn did not exit cleanly: {report:?}");
    assert!(
        report.took < Duration::from_secs(15),
        "shutdown took {:?}",
        report.took
    );
    for cgroup in &cgroups {
        assert!(!cgroup.exists(), "{} is left behind", cgroup.display());
    }
}

/// READY without a dashboard, StatusText that follows the connection, the
/// token through the credential only, structured journal entries, and a
/// clean stop (close code 1000, `Result=success`).
#[test]
fn systemd_nspawn_agent_lifecycle() {
    let Some(env) = environment() else { return };
    let c = Container::boot(env, "life");
    let setup = AgentSetup::install(&c, "nspawn-life");
    let url = setup.url();

    // The unit file and the config never hold the token.
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

    // READY=1 comes once the config is valid and the agent runs, not once
    // the dashboard answers: with the dashboard down, `systemctl start`
    // (which waits for READY=1 of a Type=notify unit) still succeeds.
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
        wait_for_status(&c, "reconnecting in "),
        "StatusText while the dashboard is down",
    );

    // The dashboard comes up: the agent connects, registers, heartbeats.
    c.ok(&["systemctl", "start", "nixfleet-mock-dashboard.service"]);
    let connected = format!("connected to {url}");
    c.check(wait_for_status(&c, &connected), "StatusText once connected");
    c.check(
        wait_for_heartbeats(&setup, 2),
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

    // The agent's environment: the credential directory, never the token.
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

    // The dashboard goes away and comes back: StatusText follows.
    c.ok(&["systemctl", "stop", "nixfleet-mock-dashboard.service"]);
    c.check(
        wait_for_status(&c, "reconnecting in "),
        "StatusText after the dashboard stopped",
    );
    c.ok(&["systemctl", "start", "nixfleet-mock-dashboard.service"]);
    c.check(
        wait_for_status(&c, &connected),
        "StatusText after the dashboard came back",
    );
    c.check(
        wait_for_heartbeats(&setup, 1),
        "heartbeats to the restarted dashboard",
    );

    // Structured journal entries: fields become NIXFLEET_* journal fields.
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

    // A clean stop: close code 1000 at the dashboard, Result=success.
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

    let export = c.journal_export();
    c.check(
        expect(
            !contains(&export, setup.token.as_bytes()),
            "the token appears nowhere in the journal (journalctl -o export)",
        ),
        "journal",
    );
}

/// A long, noisy `switch` keeps the unit healthy (watchdog pings continue,
/// heartbeats continue); a stopped agent (SIGSTOP) is killed by systemd's
/// watchdog, restarted, and registers again.
#[test]
fn systemd_nspawn_agent_watchdog_and_long_switch() {
    let Some(env) = environment() else { return };
    let c = Container::boot(env, "wd");
    let setup = AgentSetup::install(&c, "nspawn-wd");
    c.ok(&["systemctl", "start", "nixfleet-mock-dashboard.service"]);
    c.ok(&["systemctl", "start", "nixfleet.service"]);
    c.check(wait_for_heartbeats(&setup, 2), "registered, heartbeats");

    // --- a long switch (the stand-in takes ~5 s and floods its output)
    let main_pid = c.prop("nixfleet.service", "MainPID");
    let before = setup.messages("heartbeat", 0)["next"].as_u64().unwrap_or(0);
    c.check(
        http(
            setup.port,
            "POST",
            &setup.host_path("/command"),
            Some(r#"{"command":"switch"}"#),
        ),
        "POST command switch",
    );
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
    let switch_end = status["t"].as_u64().unwrap_or(0);
    let heartbeats = setup.messages("heartbeat", before);
    let during: Vec<u64> = heartbeats["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["payload"]["pending_command"] == "switch")
        .filter_map(|m| m["t"].as_u64())
        .collect();
    c.check(
        expect(
            during.len() >= 3,
            &format!(
                "heartbeats with pending_command=switch during a ~5 s switch at interval 1 s: {}",
                during.len()
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

    let withheld = c
        .journal_messages("nixfleet.service")
        .iter()
        .filter(|line| line.contains("withholding the watchdog ping"))
        .count();
    eprintln!(
        "switch: {} heartbeats with pending_command=switch, largest heartbeat gap {max_gap} ms, \
         {stored} messages stored, {withheld} watchdog pings withheld",
        during.len()
    );

    // --- the watchdog: a frozen agent is killed and restarted
    let connections_before = setup
        .api("GET", &setup.host_path("/connections"), None)
        .as_array()
        .map_or(0, Vec::len);
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
        wait_for_heartbeats(&setup, 1),
        "the restarted agent heartbeats",
    );

    let export = c.journal_export();
    c.check(
        expect(
            !contains(&export, setup.token.as_bytes()),
            "the token appears nowhere in the journal",
        ),
        "journal",
    );
}

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

/// The agent dies mid-switch (SIGKILL of its main process, then a
/// watchdog abort after SIGSTOP) while the switch floods output, under the
/// module's unit settings: each time the switch runs to its end, every line
/// reaches the dashboard, and exactly one status `ok`/0 follows.
#[test]
fn systemd_nspawn_agent_death_mid_switch_loses_nothing() {
    let Some(env) = environment() else { return };
    let c = Container::boot(env, "death");
    let setup = AgentSetup::install(&c, "nspawn-death");
    c.write(
        &format!("{STAND_IN_BIN}/nixos-rebuild"),
        NUMBERED_REBUILD.as_bytes(),
        0o755,
    );
    c.ok(&["systemctl", "start", "nixfleet-mock-dashboard.service"]);
    c.ok(&["systemctl", "start", "nixfleet.service"]);
    c.check(wait_for_heartbeats(&setup, 2), "registered, heartbeats");
    for (round, death) in ["SIGKILL", "watchdog"].into_iter().enumerate() {
        let outputs_from = setup.messages("output", u64::MAX)["next"]
            .as_u64()
            .unwrap_or(0);
        let statuses_from = setup.messages("status", u64::MAX)["next"]
            .as_u64()
            .unwrap_or(0);
        let restarts: u64 = c.prop("nixfleet.service", "NRestarts").parse().unwrap_or(0);
        c.check(
            http(
                setup.port,
                "POST",
                &setup.host_path("/command"),
                Some(r#"{"command":"switch"}"#),
            ),
            "POST command switch",
        );
        c.check(
            wait_until("the first 2,000 lines", WAIT, || {
                let seen = setup.messages("output", outputs_from)["messages"]
                    .as_array()
                    .map_or(0, Vec::len);
                (seen >= 2_000).then_some(())
            }),
            "the switch's output flows",
        );
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
        // Two heartbeats later: still exactly one status.
        let status_index = status["index"].as_u64().unwrap_or(0);
        c.check(
            wait_until("two heartbeats after the status", WAIT, || {
                let beats = setup.messages("heartbeat", status_index)["messages"]
                    .as_array()
                    .map_or(0, Vec::len);
                (beats >= 2).then_some(())
            }),
            "heartbeats after the status",
        );
        let statuses = setup.messages("status", statuses_from)["messages"]
            .as_array()
            .map_or(0, Vec::len);
        c.check(
            expect(statuses == 1, "exactly one status"),
            &format!("{death}: {statuses} statuses"),
        );
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
        eprintln!(
            "{death}: {NUMBERED_LINES} lines, all delivered, {repeats} sent twice; status {}",
            status["payload"]
        );
    }
}

// ---------------------------------------------------------------------------
// Safe deployments under the real systemd (issue 28)

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

/// (a) The countdown survives the agent's self-restart (exit 75) after a
/// switch that replaced its unit: the agent systemd starts rolls back on
/// time and reports it once the dashboard is back.
#[test]
fn systemd_nspawn_countdown_survives_the_agents_self_restart() {
    let Some(env) = environment() else { return };
    let c = Container::boot(env, "rollback-restart");
    let setup = install_safe_deployment(&c, "nspawn-rollback-restart", false);
    let first_pid = c.prop("nixfleet.service", "MainPID");
    switch_and_lose_the_dashboard(&c, &setup);
    c.check(
        wait_until("the agent's restart after the switch", WAIT, || {
            let pid = c.prop("nixfleet.service", "MainPID");
            let restarts: u64 = c.prop("nixfleet.service", "NRestarts").parse().ok()?;
            (restarts >= 1 && pid != first_pid && pid != "0").then_some(())
        }),
        "the agent replaced by the switch exited 75 and systemd started it again",
    );
    let rollback = await_rollback_report(&c, &setup);
    // The agent ran the rollback itself: its output reached the dashboard.
    let lines = rollback_lines(&setup);
    c.check(
        expect(
            lines.iter().any(|l| l.contains("old system: active")),
            "the old system's activation output among the rollback's lines",
        ),
        &format!("the rollback's output: {lines:?}; status {rollback}"),
    );
}

/// (b) A new system in which the agent cannot start at all (exit 78) is
/// still rolled back on time, by the transient timer; the old agent, which
/// the old system's activation starts, reports it.
#[test]
fn systemd_nspawn_timer_rolls_back_a_system_that_breaks_the_agent() {
    let Some(env) = environment() else { return };
    let c = Container::boot(env, "rollback-broken");
    let setup = install_safe_deployment(&c, "nspawn-rollback-broken", true);
    switch_and_lose_the_dashboard(&c, &setup);
    c.check(
        wait_until("the agent's unit failing", WAIT, || {
            let state = c.prop("nixfleet.service", "ActiveState");
            let code = c.prop("nixfleet.service", "ExecMainStatus");
            (state == "failed" && code == "78").then_some(())
        }),
        "the new system's config stops the agent (exit 78)",
    );
    let rollback = await_rollback_report(&c, &setup);
    // The timer ran it under a supervisor into a command log, which the
    // old agent adopted: the output reached the dashboard before the status.
    let lines = rollback_lines(&setup);
    c.check(
        expect(
            lines.iter().any(|l| l.contains("old system: active")),
            "the timer's rollback output, delivered by the next agent",
        ),
        &format!("the rollback's output: {lines:?}; status {rollback}"),
    );
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

/// The agent with `confirm_timeout`, the old system running and recorded
/// in the profile, the stand-ins installed, the dashboard and the agent
/// started and registered.
fn install_safe_deployment(c: &Container, hostname: &str, break_agent: bool) -> AgentSetup {
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
    c.ok(&["systemctl", "start", "nixfleet-mock-dashboard.service"]);
    c.ok(&["systemctl", "start", "nixfleet.service"]);
    c.check(wait_for_heartbeats(&setup, 2), "registered, heartbeats");
    setup
}

/// `switch` from the dashboard; the new system's agent unit stops the
/// dashboard.
fn switch_and_lose_the_dashboard(c: &Container, setup: &AgentSetup) {
    c.check(
        http(
            setup.port,
            "POST",
            &setup.host_path("/command"),
            Some(r#"{"command":"switch"}"#),
        ),
        "POST command switch",
    );
    c.check(
        wait_until("the dashboard stopped by the new system", WAIT, || {
            (c.prop("nixfleet-mock-dashboard.service", "ActiveState") == "inactive").then_some(())
        }),
        "the switch cut the host off the dashboard",
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
fn await_rollback_report(c: &Container, setup: &AgentSetup) -> Value {
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

// ---------------------------------------------------------------------------
// The agent's setup inside a container

struct AgentSetup {
    port: u16,
    hostname: String,
    token: String,
}

impl AgentSetup {
    /// Writes the token, the agent's config, its unit (as the module renders
    /// it, the stand-in nixos-rebuild first on its PATH) with the test
    /// drop-in, the stand-in nixos-rebuild and the mock dashboard's unit;
    /// starts nothing.
    fn install(c: &Container, hostname: &str) -> AgentSetup {
        let setup = AgentSetup {
            port: free_port(),
            hostname: hostname.to_owned(),
            token: unique_token(),
        };
        c.write(TOKEN_PATH, setup.token.as_bytes(), 0o600);
        let config = format!(
            "url = \"{url}\"\nrepo_dir = \"{REPO_DIR}\"\nhostname = \"{hostname}\"\n\
             interval = 1\nping_interval = 1\nping_timeout = 3\nbackoff_max = 2\n\
             metrics = \"proc\"\nlog_level = \"info\"\n",
            url = setup.url()
        );
        c.write(CONFIG_PATH, config.as_bytes(), 0o644);
        c.mkdir(REPO_DIR);
        c.write(
            &format!("{STAND_IN_BIN}/nixos-rebuild"),
            STAND_IN_REBUILD.as_bytes(),
            0o755,
        );
        let unit = fill(
            &environment().expect("checked by the test").agent_unit,
            &[
                ("@agent@", &format!("{BIN_DIR}/nixfleet-agent")),
                ("@config@", CONFIG_PATH),
                ("@path@", &format!("{STAND_IN_BIN}:{CONTAINER_PATH}")),
            ],
        );
        assert!(
            !unit.contains("/nix/store/"),
            "a store path is left in the unit:\n{unit}"
        );
        c.write(
            "/etc/systemd/system/nixfleet.service",
            unit.as_bytes(),
            0o644,
        );
        c.write(
            "/etc/systemd/system/nixfleet.service.d/test.conf",
            AGENT_DROP_IN.as_bytes(),
            0o644,
        );
        let mock = fill(
            MOCK_UNIT_TEMPLATE,
            &[
                ("@mock@", &format!("{BIN_DIR}/nixfleet-mock-dashboard")),
                ("@listen@", &format!("127.0.0.1:{}", setup.port)),
                ("@token_file@", TOKEN_PATH),
            ],
        );
        c.write(
            "/etc/systemd/system/nixfleet-mock-dashboard.service",
            mock.as_bytes(),
            0o644,
        );
        c.ok(&["systemctl", "daemon-reload"]);
        setup
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    fn host_path(&self, rest: &str) -> String {
        format!("/api/hosts/{}{rest}", self.hostname)
    }

    /// The mock's JSON answer (`Null` when it is not reachable).
    fn api(&self, method: &str, path: &str, body: Option<&str>) -> Value {
        http(self.port, method, path, body).unwrap_or(Value::Null)
    }

    fn messages(&self, kind: &str, since: u64) -> Value {
        self.api(
            "GET",
            &self.host_path(&format!("/messages?type={kind}&since={since}")),
            None,
        )
    }
}

fn wait_for_status(c: &Container, prefix: &str) -> Result<String, String> {
    let mut last = String::new();
    wait_until(
        &format!("StatusText starting with {prefix:?}"),
        WAIT,
        || {
            last = c.prop("nixfleet.service", "StatusText");
            last.starts_with(prefix).then(|| last.clone())
        },
    )
    .map_err(|e| format!("{e}; last StatusText: {last:?}"))
}

/// Waits until the dashboard holds `count` heartbeats of the host's live,
/// registered connection and says it is online.
fn wait_for_heartbeats(setup: &AgentSetup, count: usize) -> Result<(), String> {
    wait_until(&format!("{count} heartbeats"), WAIT, || {
        let host = setup.api("GET", &setup.host_path(""), None);
        let live = host["live_connection"].as_u64()?;
        if host["online"] != true || host["last_heartbeat"].is_null() {
            return None;
        }
        let messages = setup.messages("heartbeat", 0);
        let on_live = messages["messages"]
            .as_array()?
            .iter()
            .filter(|m| m["conn"].as_u64() == Some(live))
            .count();
        (on_live >= count).then_some(())
    })
}

// ---------------------------------------------------------------------------
// Prerequisites and the cached tree

struct Env {
    tree: PathBuf,
    /// The agent's unit as the NixOS module renders it, with `@agent@`,
    /// `@config@` and `@path@` for the store paths.
    agent_unit: String,
}

/// The shared environment, or `None` (after printing why) when this machine
/// cannot run the tests. Under `CI=true` that is a failure instead.
fn environment() -> Option<&'static Env> {
    static ENV: OnceLock<Result<Env, Unavailable>> = OnceLock::new();
    match ENV.get_or_init(prepare) {
        Ok(env) => Some(env),
        Err(Unavailable::Skip(why)) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true, so not skipping: {why}");
            }
            eprintln!("skipped: {why}");
            None
        }
        Err(Unavailable::Broken(why)) => panic!("{why}"),
    }
}

enum Unavailable {
    /// The machine cannot run nspawn at all.
    Skip(String),
    /// It should, but something failed.
    Broken(String),
}

fn prepare() -> Result<Env, Unavailable> {
    if find_program("systemd-nspawn").is_none() {
        return Err(Unavailable::Skip(
            "no systemd-nspawn (apt-get install systemd-container)".into(),
        ));
    }
    if !rustix::process::geteuid().is_root() {
        return Err(Unavailable::Skip("systemd-nspawn needs root".into()));
    }
    if find_program("nsenter").is_none() {
        return Err(Unavailable::Skip("no nsenter (util-linux)".into()));
    }
    let agent_unit = render_agent_unit()?;
    let cache = std::env::var_os("NIXFLEET_NSPAWN_CACHE").map_or_else(
        || PathBuf::from("/var/cache/nixfleet-nspawn"),
        PathBuf::from,
    );
    let tree = cache.join("bookworm");
    if !tree_is_complete(&tree) && find_program("debootstrap").is_none() {
        return Err(Unavailable::Skip(format!(
            "no debootstrap (apt-get install debootstrap) and no cached tree at {}",
            tree.display()
        )));
    }
    build_tree(&cache, &tree).map_err(Unavailable::Broken)?;
    Ok(Env { tree, agent_unit })
}

/// The agent's unit from `nix/render-unit.nix`, with this test's token file
/// and watchdog timeout.
fn render_agent_unit() -> Result<String, Unavailable> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let lib = std::env::var_os("NIXPKGS_LIB")
        .map_or_else(|| repo.join("../shared/nix/nixpkgs/lib"), PathBuf::from);
    let nixos_lib =
        std::env::var_os("NIXOS_LIB").map_or_else(|| lib.join("../nixos/lib"), PathBuf::from);
    let Some(nix_instantiate) = find_program("nix-instantiate") else {
        return Err(Unavailable::Skip(
            "no nix-instantiate (apt-get install nix-bin) to render the unit from the NixOS module"
                .into(),
        ));
    };
    let (Ok(lib), Ok(nixos_lib)) = (lib.canonicalize(), nixos_lib.canonicalize()) else {
        return Err(Unavailable::Skip(format!(
            "no nixpkgs lib at {} with nixos/lib at {} to render the unit from the NixOS module \
             (set NIXPKGS_LIB and NIXOS_LIB)",
            lib.display(),
            nixos_lib.display()
        )));
    };
    let mut command = Command::new(nix_instantiate);
    command
        .args(["--readonly-mode", "--eval", "--strict", "--json"])
        .arg(repo.join("nix/render-unit.nix"))
        .args(["--arg", "lib", &format!("import {}", lib.display())])
        .args(["--arg", "nixosLib", &nixos_lib.display().to_string()])
        .args(["--argstr", "tokenFile", TOKEN_PATH])
        .args(["--arg", "watchdogSec", &WATCHDOG_SEC.to_string()]);
    let output = run_bounded(command, Duration::from_secs(120))
        .map_err(|e| Unavailable::Broken(format!("nix-instantiate nix/render-unit.nix: {e}")))?;
    if !output.status.success() {
        return Err(Unavailable::Broken(format!(
            "nix-instantiate nix/render-unit.nix failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    serde_json::from_slice(&output.stdout)
        .map_err(|e| Unavailable::Broken(format!("nix/render-unit.nix: not a JSON string: {e}")))
}

const TREE_MARKER: &str = ".nixfleet-nspawn-tree";

fn tree_is_complete(tree: &Path) -> bool {
    tree.join(TREE_MARKER).is_file()
}

/// Builds the bookworm tree unless it exists: under a lock (parallel test
/// processes wait for one build), in a temporary directory renamed into
/// place only when complete.
fn build_tree(cache: &Path, tree: &Path) -> Result<(), String> {
    if tree_is_complete(tree) {
        return Ok(());
    }
    fs::create_dir_all(cache).map_err(|e| format!("cannot create {}: {e}", cache.display()))?;
    let lock_path = cache.join(".lock");
    let lock = fs::File::create(&lock_path)
        .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
    if tree_is_complete(tree) {
        return Ok(()); // another process built it meanwhile
    }
    // Leftovers of interrupted builds (nobody else builds: we hold the lock).
    if let Ok(entries) = fs::read_dir(cache) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with("bookworm.tmp-") {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    let _ = fs::remove_dir_all(tree); // incomplete: no marker
    let mirror = debian_mirror();
    let building = cache.join(format!("bookworm.tmp-{}", std::process::id()));
    let log_path = cache.join("debootstrap.log");
    let log = fs::File::create(&log_path).map_err(|e| e.to_string())?;
    eprintln!(
        "building the bookworm tree for systemd-nspawn tests (once per machine, ~1 min) from {mirror} in {}",
        tree.display()
    );
    let started = Instant::now();
    let status = Command::new(find_program("debootstrap").expect("checked"))
        .args([
            "--variant=minbase",
            "--include=systemd,systemd-sysv,dbus,iproute2",
            "bookworm",
        ])
        .arg(&building)
        .arg(&mirror)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .status()
        .map_err(|e| format!("cannot run debootstrap: {e}"))?;
    if !status.success() {
        let _ = fs::remove_dir_all(&building);
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        return Err(format!(
            "debootstrap failed ({status}); the end of {}:\n{}",
            log_path.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    fs::write(
        building.join(TREE_MARKER),
        format!("debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,iproute2 bookworm {mirror}\n"),
    )
    .map_err(|e| e.to_string())?;
    fs::rename(&building, tree).map_err(|e| format!("cannot rename the tree into place: {e}"))?;
    eprintln!("built {} in {:?}", tree.display(), started.elapsed());
    Ok(())
}

/// The host's Debian mirror (the first apt source for bookworm), or
/// `$NIXFLEET_DEBIAN_MIRROR`, or deb.debian.org.
fn debian_mirror() -> String {
    if let Ok(mirror) = std::env::var("NIXFLEET_DEBIAN_MIRROR") {
        return mirror;
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        let name = file.to_string_lossy();
        let found = if name.ends_with(".sources") {
            mirror_from_deb822(&text)
        } else if name.ends_with(".list") {
            mirror_from_one_line(&text)
        } else {
            None
        };
        if let Some(mirror) = found {
            return mirror;
        }
    }
    "http://deb.debian.org/debian".to_owned()
}

/// `deb [options] URI bookworm components…`
fn mirror_from_one_line(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let mut words = line.split_whitespace();
        if words.next()? != "deb" {
            return None;
        }
        let mut uri = words.next()?;
        if uri.starts_with('[') {
            // options, possibly spread over several words
            while !uri.ends_with(']') {
                uri = words.next()?;
            }
            uri = words.next()?;
        }
        let suite = words.next()?;
        (suite == "bookworm" && uri.starts_with("http")).then(|| uri.to_owned())
    })
}

/// Stanzas of `Types: deb`, `URIs: …`, `Suites: bookworm …`.
fn mirror_from_deb822(text: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim().eq_ignore_ascii_case(name)).then(|| value.trim().to_owned())
            })
        };
        let enabled = field("Enabled").is_none_or(|v| v != "no");
        let types = field("Types")?;
        let suites = field("Suites")?;
        let uri = field("URIs")?.split_whitespace().next()?.to_owned();
        (enabled
            && types.split_whitespace().any(|t| t == "deb")
            && suites.split_whitespace().any(|s| s == "bookworm")
            && uri.starts_with("http"))
        .then_some(uri)
    })
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

// ---------------------------------------------------------------------------
// One container

struct Container {
    name: String,
    nspawn: Child,
    /// The container's PID 1, as the host sees it.
    pid1: u32,
    /// Our own cgroups (one per mounted hierarchy), removed on shutdown.
    cgroups: Vec<PathBuf>,
    console: PathBuf,
    /// Holds this container's copies of the binaries.
    _bins: tempfile::TempDir,
    down: bool,
}

#[derive(Debug)]
struct ShutdownReport {
    /// nspawn exited 0 after the first SIGTERM.
    clean: bool,
    took: Duration,
}

impl Container {
    /// Boots a container named after `tag` and waits until its systemd is
    /// up (`is-system-running --wait`).
    fn boot(env: &Env, tag: &str) -> Container {
        let name = format!("nf-{}-{tag}", std::process::id());
        let bins = private_binaries();
        let cgroups: Vec<PathBuf> = cgroup_roots()
            .into_iter()
            .map(|root| root.join(format!("T-{name}")))
            .collect();
        for cgroup in &cgroups {
            fs::create_dir_all(cgroup)
                .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", cgroup.display()));
        }
        let console =
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("nspawn-{name}.console"));
        let console_file = fs::File::create(&console).expect("console log");
        // The shell moves itself into our cgroups, then becomes nspawn, so
        // nspawn's own cgroups (payload/, supervisor/) land under ours.
        let started = Instant::now();
        let nspawn = Command::new("/bin/sh")
            .arg("-c")
            .arg(
                "for cg in $NF_CGROUPS; do echo $$ > \"$cg/cgroup.procs\" || exit 1; done; \
                 unset NF_CGROUPS; exec systemd-nspawn \"$@\"",
            )
            .arg("sh")
            .args([
                "--boot",
                "--volatile=overlay",
                "--register=no",
                "--keep-unit",
                "--console=passive",
                "--machine",
                &name,
            ])
            .arg("--directory")
            .arg(&env.tree)
            .arg(format!("--bind-ro={}:{BIN_DIR}", bins.path().display()))
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env(
                "NF_CGROUPS",
                cgroups
                    .iter()
                    .map(|c| c.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
            )
            .stdin(Stdio::null())
            .stdout(console_file.try_clone().expect("console log"))
            .stderr(console_file)
            .spawn()
            .expect("cannot start systemd-nspawn");
        let mut container = Container {
            name,
            nspawn,
            pid1: 0,
            cgroups,
            console,
            _bins: bins,
            down: false,
        };
        match container.wait_for_boot() {
            Ok(()) => {
                eprintln!(
                    "{}: booted in {:?} (PID 1 is {} on the host)",
                    container.name,
                    started.elapsed(),
                    container.pid1
                );
                container
            }
            Err(error) => {
                let console = fs::read_to_string(&container.console).unwrap_or_default();
                let tail: Vec<&str> = console.lines().rev().take(30).collect();
                let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
                drop(container);
                panic!("the container did not boot: {error}\nconsole:\n{tail}");
            }
        }
    }

    fn wait_for_boot(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let nspawn_pid = self.nspawn.id();
        loop {
            if let Ok(Some(status)) = self.nspawn.try_wait() {
                return Err(format!("systemd-nspawn exited: {status}"));
            }
            let init = children_of(nspawn_pid).into_iter().find(|&pid| {
                fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "systemd")
                    && Path::new(&format!("/proc/{pid}/root/run/systemd/private")).exists()
            });
            if let Some(pid) = init {
                self.pid1 = pid;
                break;
            }
            if Instant::now() > deadline {
                return Err("no systemd with a private bus in the container".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = self.exec_timeout(&["systemctl", "is-system-running", "--wait"], BOOT_TIMEOUT);
        let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        match state.as_str() {
            "running" => Ok(()),
            "degraded" => {
                let failed = self.exec(&["systemctl", "--failed", "--no-legend", "--plain"]);
                eprintln!(
                    "{}: degraded (harmless for these tests); failed units:\n{}",
                    self.name,
                    String::from_utf8_lossy(&failed.stdout)
                );
                Ok(())
            }
            _ => Err(format!(
                "is-system-running: {state:?} {}",
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    }

    /// Runs a command inside the container (all its namespaces), with a
    /// clean environment.
    fn exec(&self, args: &[&str]) -> Output {
        self.exec_timeout(args, Duration::from_secs(60))
    }

    fn exec_timeout(&self, args: &[&str], limit: Duration) -> Output {
        self.try_exec(args, limit)
            .unwrap_or_else(|e| panic!("{}: {args:?}: {e}", self.name))
    }

    fn try_exec(&self, args: &[&str], limit: Duration) -> Result<Output, String> {
        let secs = limit.as_secs().max(1).to_string();
        let mut command = Command::new("nsenter");
        command
            .args(["--target", &self.pid1.to_string(), "--all", "--"])
            // coreutils' timeout inside: a hung command dies with the limit.
            .args(["timeout", "--kill-after=5", &secs])
            .args(args)
            .env_clear()
            .env("PATH", CONTAINER_PATH)
            .env("LANG", "C.UTF-8")
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0");
        run_bounded(command, limit + Duration::from_secs(10))
    }

    /// Runs a command inside; it must succeed. Returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        if !out.status.success() {
            self.fail(&format!(
                "{args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `systemctl show -p <property> --value <unit>`.
    fn prop(&self, unit: &str, property: &str) -> String {
        let out = self.exec(&["systemctl", "show", "-p", property, "--value", unit]);
        String::from_utf8_lossy(&out.stdout)
            .trim_end_matches('\n')
            .to_owned()
    }

    /// The host's path to `path` in the container.
    fn host_path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid1)).join(path.trim_start_matches('/'))
    }

    fn mkdir(&self, path: &str) {
        fs::create_dir_all(self.host_path(path)).expect("mkdir in the container");
    }

    fn write(&self, path: &str, contents: &[u8], mode: u32) {
        let target = self.host_path(path);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).expect("mkdir in the container");
        }
        fs::write(&target, contents).unwrap_or_else(|e| panic!("write {path}: {e}"));
        fs::set_permissions(&target, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    fn read(&self, path: &str) -> Vec<u8> {
        fs::read(self.host_path(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
    }

    /// Reads a file from inside the container's namespaces (for `/proc`).
    fn read_in(&self, path: &str) -> Vec<u8> {
        let out = self.exec(&["cat", path]);
        assert!(
            out.status.success(),
            "cat {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// `journalctl -o json` of a unit, one object per entry.
    fn journal_json(&self, unit: &str) -> Vec<Value> {
        let out = self.exec(&["journalctl", "--no-pager", "-o", "json", "-u", unit]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// The MESSAGE of each of a unit's entries.
    fn journal_messages(&self, unit: &str) -> Vec<String> {
        let out = self.exec(&["journalctl", "--no-pager", "-o", "cat", "-u", unit]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The whole journal, `journalctl -o export`.
    fn journal_export(&self) -> Vec<u8> {
        self.exec(&["journalctl", "--no-pager", "-o", "export"])
            .stdout
    }

    /// `result`'s value, or a failure (with the units' journal) saying `what`.
    fn check<T>(&self, result: Result<T, String>, what: &str) -> T {
        result.unwrap_or_else(|error| self.fail(&format!("{what}: {error}")))
    }

    fn fail(&self, message: &str) -> ! {
        let journal = self.try_exec(
            &[
                "journalctl",
                "--no-pager",
                "-o",
                "short-precise",
                "-n",
                "60",
                "-u",
                "nixfleet.service",
                "-u",
                "nixfleet-mock-dashboard.service",
                "-u",
                "standin.service",
            ],
            Duration::from_secs(30),
        );
        let journal = journal.map_or_else(
            |e| e,
            |out| String::from_utf8_lossy(&out.stdout).into_owned(),
        );
        panic!(
            "{}: {message}\n--- the end of the units' journal ---\n{journal}",
            self.name,
        );
    }

    /// Halts the container (SIGTERM to nspawn; again, then SIGKILL, if it
    /// hangs), kills whatever is left in our cgroups and removes them.
    fn shutdown(&mut self) -> ShutdownReport {
        let started = Instant::now();
        self.down = true;
        let pid = rustix::process::Pid::from_child(&self.nspawn);
        let mut clean = false;
        for (attempt, (signal, patience)) in [
            (rustix::process::Signal::TERM, Duration::from_secs(20)),
            (rustix::process::Signal::TERM, Duration::from_secs(5)),
            (rustix::process::Signal::KILL, Duration::from_secs(5)),
        ]
        .into_iter()
        .enumerate()
        {
            let _ = rustix::process::kill_process(pid, signal);
            let deadline = Instant::now() + patience;
            let mut exited = None;
            while Instant::now() < deadline {
                if let Ok(Some(status)) = self.nspawn.try_wait() {
                    exited = Some(status);
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Some(status) = exited {
                clean = attempt == 0 && status.success();
                break;
            }
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        remove_cgroups(&self.cgroups);
        let _ = fs::remove_file(&self.console);
        ShutdownReport {
            clean,
            took: started.elapsed(),
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.down {
            return;
        }
        if std::thread::panicking() && self.pid1 != 0 {
            let journal = self.try_exec(
                &["journalctl", "--no-pager", "-o", "short-precise"],
                Duration::from_secs(30),
            );
            let saved = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("nspawn-{}.journal", self.name));
            if let Ok(journal) = journal
                && fs::write(&saved, &journal.stdout).is_ok()
            {
                eprintln!(
                    "{}: the container's journal is in {}",
                    self.name,
                    saved.display()
                );
            }
        }
        self.shutdown();
    }
}

/// The hierarchies to put a container's cgroups in: the named `systemd`
/// one and the `unified` one on a hybrid host, or the root of a pure
/// cgroup v2 host.
fn cgroup_roots() -> Vec<PathBuf> {
    let hybrid: Vec<PathBuf> = ["/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.join("cgroup.procs").exists())
        .collect();
    if !hybrid.is_empty() {
        hybrid
    } else {
        vec![PathBuf::from("/sys/fs/cgroup")]
    }
}

/// Kills what is left in `cgroups` (only our container's processes can be
/// there) and removes them depth-first.
fn remove_cgroups(cgroups: &[PathBuf]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut left = Vec::new();
        for root in cgroups {
            let mut dirs = Vec::new();
            collect_dirs(root, &mut dirs);
            // Deepest first.
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for dir in dirs {
                if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
                    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                            let _ =
                                rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                        }
                    }
                }
                if fs::remove_dir(&dir).is_err() && dir.exists() {
                    left.push(dir);
                }
            }
        }
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            eprintln!("cannot remove cgroups: {left:?}");
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    if !dir.is_dir() {
        return;
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
    out.push(dir.to_owned());
}

/// Processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // "pid (comm) state ppid …"; comm may hold spaces and parens.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

/// This container's own copies of the two binaries (hard links when
/// possible): a rebuild in the shared target directory during the test
/// cannot swap them underneath the running units.
fn private_binaries() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("nspawn-bin-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir for binaries");
    for source in [
        PathBuf::from(env!("CARGO_BIN_EXE_nixfleet-agent")),
        mock_dashboard_binary(),
    ] {
        let source = source.as_path();
        let target = dir.path().join(source.file_name().expect("file name"));
        if fs::hard_link(source, &target).is_err() {
            fs::copy(source, &target).unwrap_or_else(|e| panic!("copy {}: {e}", source.display()));
        }
    }
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// The mock dashboard is its own crate, so Cargo gives this test no
/// `CARGO_BIN_EXE_` for it; it sits beside the agent in the same target
/// directory. `cargo test --workspace` (what scripts/test.sh runs) builds
/// it; run alone, this test builds it first.
fn mock_dashboard_binary() -> PathBuf {
    let agent = Path::new(env!("CARGO_BIN_EXE_nixfleet-agent"));
    let beside = agent.with_file_name("nixfleet-mock-dashboard");
    if !beside.exists() {
        let profile_dir = agent.parent().expect("profile directory");
        let mut build = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        build.args(["build", "--quiet", "-p", "nixfleet-mock-dashboard"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        if let Some(target_dir) = profile_dir.parent() {
            build.arg("--target-dir").arg(target_dir);
        }
        let status = build.status().expect("run cargo build");
        assert!(
            status.success(),
            "cargo build -p nixfleet-mock-dashboard failed"
        );
    }
    beside
}

// ---------------------------------------------------------------------------
// Small helpers

/// Runs `command` to its end, killing it after `limit`.
fn run_bounded(mut command: Command, limit: Duration) -> Result<Output, String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("timed out after {limit:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(e.to_string()),
        }
    };
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

/// Polls `probe` every 100 ms until it returns `Some`, for at most `limit`.
fn wait_until<T>(
    what: &str,
    limit: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {limit:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn expect(condition: bool, what: &str) -> Result<(), String> {
    if condition {
        Ok(())
    } else {
        Err(format!("expected: {what}"))
    }
}

fn expect_eq(actual: &str, expected: &str) -> Result<(), String> {
    if actual == expected {
        Ok(())
    } else {
        Err(format!("expected {expected:?}, got {actual:?}"))
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn fill(template: &str, substitutions: &[(&str, &str)]) -> String {
    let mut text = template.to_owned();
    for (placeholder, value) in substitutions {
        assert!(
            text.contains(placeholder),
            "{placeholder} not in the template"
        );
        text = text.replace(placeholder, value);
    }
    assert!(
        !text
            .lines()
            .any(|l| !l.starts_with('#') && l.matches('@').count() >= 2),
        "a placeholder is left in:\n{text}"
    );
    text
}

/// A token no other test or run uses, so that finding it proves a leak.
fn unique_token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("nspawn-T0KEN-{}-{nanos:x}", std::process::id())
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A minimal HTTP/1.0 client for the mock's JSON API.
fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> Result<Value, String> {
    let mut stream =
        TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no end of the headers")?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with('2') {
        return Err(format!("{method} {path}: {head}"));
    }
    serde_json::from_str(body).map_err(|e| format!("{method} {path}: {e}"))
}

#[test]
fn apt_sources_give_the_mirror() {
    let deb822 = "Types: deb\n# comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
                  Components: main\n\nTypes: deb\nURIs: http://security.example/debian-security\n\
                  Suites: bookworm-security\n";
    assert_eq!(
        mirror_from_deb822(deb822).as_deref(),
        Some("http://mirror.example/debian")
    );
    assert_eq!(
        mirror_from_deb822("Types: deb\nURIs: http://x/debian\nSuites: bookworm\nEnabled: no\n"),
        None
    );
    let list = "# deb http://old/ bookworm main\ndeb-src http://src/ bookworm main\n\
                deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n";
    assert_eq!(
        mirror_from_one_line(list).as_deref(),
        Some("http://mirror.example/debian")
    );
    assert_eq!(
        mirror_from_one_line("deb http://security/ bookworm-security main\n"),
        None
    );
}
