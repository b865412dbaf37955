# The agent, and only the agent: `cargo build -p nixfleet-agent` over the
# workspace's sources. Used by flake.nix (packages, overlays.default,
# checks) and by the flake's NixOS module, always through `callPackage`, so
# it builds with the caller's Nixpkgs.
#
# The derivation depends on nothing but those sources and Nixpkgs: no git
# revision, no flag of the caller's. So every host of a fleet on the same
# Nixpkgs wants the same store path, which one builder (CI, a cache) makes
# once and every host substitutes. The commit the agent reports is a
# setting (`source_commit`), written by the flake's module at run time.
{
  lib,
  rustPlatform,
  rustc,
  gitMinimal,
  # Run the crate's test suite in the build. Off for what hosts install
  # (minutes of loopback tests on every host, and one timing hiccup would
  # fail a production `nixos-rebuild`); the flake's `checks.package` turns
  # it on, and CI and `nix flake check` build that.
  runTests ? false,
}:
let
  workspace = (lib.importTOML ../Cargo.toml).workspace.package;
  agentToml = (lib.importTOML ../crates/nixfleet-agent/Cargo.toml).package;
in
# Older channels would fail deep inside cargo ("package requires rustc
# 1.88"); say what to do instead.
assert lib.assertMsg (lib.versionAtLeast rustc.version workspace.rust-version) ''
  nixfleet-agent needs rustc ${workspace.rust-version} or newer (rust-version in Cargo.toml), but this
  Nixpkgs has rustc ${rustc.version}: build it with nixos-25.11 or newer. Through the flake, do not make
  its nixpkgs input follow an older channel; its NixOS module then uses the flake's own package.'';
rustPlatform.buildRustPackage {
  pname = agentToml.name;
  inherit (workspace) version;

  src = import ./source.nix { inherit lib; };

  # Every crate is pinned with its checksum in Cargo.lock: no cargoHash.
  # nix/mock-dashboard.nix names the same lock file, so both packages use
  # one vendored-dependencies derivation.
  cargoLock.lockFile = ../Cargo.lock;

  # Only the agent's crate: the mock dashboard (a web server that can send
  # commands to agents) is its own package and never in a host's closure.
  cargoBuildFlags = [
    "-p"
    agentToml.name
  ];
  cargoTestFlags = [
    "-p"
    agentToml.name
  ];

  doCheck = runTests;

  # The tests run in the debug profile, not the release profile the
  # program is built in: the test-only hooks (such as a short first
  # reconnect delay, NIXFLEET_TEST_FIRST_BACKOFF_MS) exist only with debug
  # assertions, and without them the 1,000-reconnect test waits out real
  # one-second backoffs for over 20 minutes. The installed binary is the
  # release build either way.
  checkType = "debug";

  # Tests of the `pull` command drive a real git against local repositories.
  nativeCheckInputs = [ gitMinimal ];

  # The integration tests talk to the binary over loopback, which the build
  # sandbox has (scripts/sandbox-check.sh runs this check phase in a sandbox
  # like it). `--exact` makes every `--skip` name one whole test, so a skip
  # never drops another test that merely shares part of its name;
  # nix/check.sh checks that each name is a test of the crate.
  checkFlags = [
    "--exact"
  ]
  ++ map (test: "--skip=${test}") [
    # Boot systemd-nspawn containers: need root and a Debian tree.
    "systemd_nspawn_harness_runs_a_notify_service"
    "systemd_nspawn_agent_lifecycle"
    "systemd_nspawn_agent_watchdog_and_long_switch"
    "systemd_nspawn_agent_death_mid_switch_loses_nothing"
    "systemd_nspawn_countdown_survives_the_agents_self_restart"
    "systemd_nspawn_timer_rolls_back_a_system_that_breaks_the_agent"
    # Compare docs/config.md with the code: docs/ is not in this source.
    "docs_every_key_has_a_row_and_every_row_a_key"
    "docs_rows_name_the_right_environment_variable_and_flag"
    "docs_every_environment_variable_and_flag_is_documented"
    "docs_defaults_match_the_built_in_ones"
    # Timing bounds of a second or less (heartbeat gaps, time to the first
    # heartbeat) that a busy builder can miss. CI runs them
    # (scripts/test.sh); here they would only make the build flaky.
    "connection_success_registers_then_heartbeats_at_once"
    "heartbeats_are_regular"
    "reconnects_after_the_dashboard_restarts_and_registers_again"
    "heartbeats_carry_the_command_while_it_runs_and_null_after"
    "a_flood_of_output_never_stalls_heartbeats_and_memory_stays_bounded"
    "a_slow_reader_during_a_flood_costs_neither_memory_nor_child_speed_nor_heartbeats"
  ];

  meta = {
    inherit (agentToml) description;
    license = lib.licenses.mit;
    mainProgram = "nixfleet-agent";
    platforms = lib.platforms.linux;
  };
}
