# The agent and the mock dashboard: one Cargo workspace (crates/), one
# derivation that builds and installs both programs.
# Used by flake.nix (packages, overlays.default) and by the flake's NixOS
# module, always through `callPackage`, so it builds with the caller's Nixpkgs.
{
  lib,
  rustPlatform,
  rustc,
  gitMinimal,
  # The git commit the agent is built from (the flake passes `self.rev` or
  # `self.dirtyRev`); reported to v3 dashboards as `source_commit`. The
  # sandbox has no .git, so without it the field is left out.
  sourceCommit ? "",
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

  # Only what Cargo reads: edits to Nix files, docs or CI do not rebuild.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../crates
    ];
  };

  # Read by crates/nixfleet-agent/build.rs.
  env.NIXFLEET_SOURCE_COMMIT = sourceCommit;

  # Every crate is pinned with its checksum in Cargo.lock: no cargoHash.
  cargoLock.lockFile = ../Cargo.lock;

  # The tests run in the debug profile, not the release profile the
  # programs are built in: the test-only hooks (such as a short first
  # reconnect delay, NIXFLEET_TEST_FIRST_BACKOFF_MS) exist only with debug
  # assertions, and without them the 1,000-reconnect test waits out real
  # one-second backoffs for over 20 minutes. The installed binaries are the
  # release build either way.
  checkType = "debug";

  # Tests of the `pull` command drive a real git against local repositories.
  nativeCheckInputs = [ gitMinimal ];

  # The integration tests talk to the binaries over loopback, which the
  # build sandbox has (scripts/sandbox-check.sh runs this check phase in a
  # sandbox like it). `--skip` is the test harness's filter: it drops every
  # test whose name contains the string.
  checkFlags = [
    # Boots systemd-nspawn containers: needs root and a Debian tree.
    "--skip=systemd_nspawn"
    # Compare docs/config.md with the code: docs/ is not in this source.
    "--skip=docs_"
  ]
  # Timing bounds of a second or less (heartbeat gaps, time to the first
  # heartbeat) that a busy builder can miss. CI runs them (scripts/test.sh);
  # here they would only make the build flaky.
  ++ map (test: "--skip=${test}") [
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
