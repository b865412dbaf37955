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
//!
//! The tests stay in this file, under the names `nix/package.nix` skips
//! (a module would prefix them); what they do is in the modules.

#[path = "systemd_nspawn/agent.rs"]
mod agent;
#[path = "systemd_nspawn/container.rs"]
mod container;
#[path = "systemd_nspawn/lifecycle.rs"]
mod lifecycle;
#[path = "systemd_nspawn/rollback.rs"]
mod rollback;
#[path = "systemd_nspawn/switch.rs"]
mod switch;
#[path = "systemd_nspawn/tree.rs"]
mod tree;
#[path = "systemd_nspawn/util.rs"]
mod util;

use agent::AgentSetup;
use container::Container;
use std::time::Duration;
use tree::environment;
use util::{WAIT, unique_token, wait_until};

/// The harness itself, with a stand-in service written in shell: boot,
/// a `Type=notify` unit that is `activating` until READY=1, STATUS=,
/// credentials, the journal, and a clean teardown.
#[test]
fn systemd_nspawn_harness_runs_a_notify_service() {
    let Some(env) = environment() else { return };
    let mut c = Container::boot(env, "harness");
    let token = unique_token();
    lifecycle::start_standin(&c, &token);
    lifecycle::standin_becomes_ready(&c);
    lifecycle::standin_journal(&c, &token);
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
    lifecycle::token_not_in_unit_or_config(&c, &setup);
    lifecycle::ready_without_a_dashboard(&c);
    lifecycle::connects_when_the_dashboard_comes_up(&c, &setup);
    lifecycle::environment_has_no_token(&c, &setup);
    lifecycle::status_follows_the_dashboard(&c, &setup);
    lifecycle::structured_journal_entries(&c, &setup);
    lifecycle::clean_stop(&c, &setup);
    setup.check_token_not_in_journal(&c);
}

/// A long, noisy `switch` keeps the unit healthy (watchdog pings continue,
/// heartbeats continue); a stopped agent (SIGSTOP) is killed by systemd's
/// watchdog, restarted, and registers again.
#[test]
fn systemd_nspawn_agent_watchdog_and_long_switch() {
    let Some(env) = environment() else { return };
    let c = Container::boot(env, "wd");
    let setup = AgentSetup::install(&c, "nspawn-wd");
    setup.start(&c);
    switch::long_switch_keeps_the_unit_healthy(&c, &setup);
    switch::watchdog_restarts_a_frozen_agent(&c, &setup);
    setup.check_token_not_in_journal(&c);
}

/// The agent dies mid-switch (SIGKILL of its main process, then a
/// watchdog abort after SIGSTOP) while the switch floods output, under the
/// module's unit settings: each time the switch runs to its end, every line
/// reaches the dashboard, and exactly one status `ok`/0 follows.
#[test]
fn systemd_nspawn_agent_death_mid_switch_loses_nothing() {
    let Some(env) = environment() else { return };
    let c = Container::boot(env, "death");
    let setup = AgentSetup::install(&c, "nspawn-death");
    switch::install_numbered_rebuild(&c);
    setup.start(&c);
    for (round, death) in ["SIGKILL", "watchdog"].into_iter().enumerate() {
        switch::die_mid_switch(&c, &setup, round, death);
    }
}

/// (a) The countdown survives the agent's self-restart (exit 75) after a
/// switch that replaced its unit: the agent systemd starts rolls back on
/// time and reports it once the dashboard is back.
#[test]
fn systemd_nspawn_countdown_survives_the_agents_self_restart() {
    let Some(env) = environment() else { return };
    let c = Container::boot(env, "rollback-restart");
    let setup = rollback::install_safe_deployment(&c, "nspawn-rollback-restart", false);
    let first_pid = c.prop("nixfleet.service", "MainPID");
    rollback::switch_and_lose_the_dashboard(&c, &setup);
    c.check(
        wait_until("the agent's restart after the switch", WAIT, || {
            let pid = c.prop("nixfleet.service", "MainPID");
            let restarts: u64 = c.prop("nixfleet.service", "NRestarts").parse().ok()?;
            (restarts >= 1 && pid != first_pid && pid != "0").then_some(())
        }),
        "the agent replaced by the switch exited 75 and systemd started it again",
    );
    let rollback = rollback::await_rollback_report(&c, &setup);
    // The agent ran the rollback itself: its output reached the dashboard.
    rollback::rollback_output_delivered(
        &c,
        &setup,
        &rollback,
        "the old system's activation output among the rollback's lines",
    );
}

/// (b) A new system in which the agent cannot start at all (exit 78) is
/// still rolled back on time, by the transient timer; the old agent, which
/// the old system's activation starts, reports it.
#[test]
fn systemd_nspawn_timer_rolls_back_a_system_that_breaks_the_agent() {
    let Some(env) = environment() else { return };
    let c = Container::boot(env, "rollback-broken");
    let setup = rollback::install_safe_deployment(&c, "nspawn-rollback-broken", true);
    rollback::switch_and_lose_the_dashboard(&c, &setup);
    c.check(
        wait_until("the agent's unit failing", WAIT, || {
            let state = c.prop("nixfleet.service", "ActiveState");
            let code = c.prop("nixfleet.service", "ExecMainStatus");
            (state == "failed" && code == "78").then_some(())
        }),
        "the new system's config stops the agent (exit 78)",
    );
    let rollback = rollback::await_rollback_report(&c, &setup);
    // The timer ran it under a supervisor into a command log, which the
    // old agent adopted: the output reached the dashboard before the status.
    rollback::rollback_output_delivered(
        &c,
        &setup,
        &rollback,
        "the timer's rollback output, delivered by the next agent",
    );
    rollback::the_timer_rolled_back_once(&c, &setup);
}

#[test]
fn apt_sources_give_the_mirror() {
    let deb822 = "Types: deb\n# comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
                  Components: main\n\nTypes: deb\nURIs: http://security.example/debian-security\n\
                  Suites: bookworm-security\n";
    assert_eq!(
        tree::mirror_from_deb822(deb822).as_deref(),
        Some("http://mirror.example/debian")
    );
    assert_eq!(
        tree::mirror_from_deb822(
            "Types: deb\nURIs: http://x/debian\nSuites: bookworm\nEnabled: no\n"
        ),
        None
    );
    let list = "# deb http://old/ bookworm main\ndeb-src http://src/ bookworm main\n\
                deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n";
    assert_eq!(
        tree::mirror_from_one_line(list).as_deref(),
        Some("http://mirror.example/debian")
    );
    assert_eq!(
        tree::mirror_from_one_line("deb http://security/ bookworm-security main\n"),
        None
    );
}
