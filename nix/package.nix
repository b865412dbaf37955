# The agent and the mock dashboard: one Cargo workspace (crates/), one
# derivation that builds and installs both programs.
# Used by flake.nix (packages, overlays.default) and by the flake's NixOS
# module, always through `callPackage`, so it builds with the caller's Nixpkgs.
{
  lib,
  rustPlatform,
  git,
  # The git commit the agent is built from (the flake passes `self.rev` or
  # `self.dirtyRev`); reported to v3 dashboards as `source_commit`. The
  # sandbox has no .git, so without it the field is left out.
  sourceCommit ? "",
}:
let
  workspace = (lib.importTOML ../Cargo.toml).workspace.package;
  agentToml = (lib.importTOML ../crates/nixfleet-agent/Cargo.toml).package;
in
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

  # Tests of the `pull` command drive a real git against local repositories.
  nativeCheckInputs = [ git ];

  # The integration tests talk to the binaries over loopback, which the
  # build sandbox has. The systemd-nspawn test boots a container and cannot
  # run there. `--skip` is the test harness's filter: it drops every test
  # whose name contains the string, so the tests of that target carry the
  # target's name (`systemd_nspawn::…` or a `systemd_nspawn_` prefix).
  # The tests that compare docs/config.md with the code (`docs_…`) need
  # docs/, which is not part of this source.
  checkFlags = [
    "--skip=systemd_nspawn"
    "--skip=docs_"
  ];

  meta = {
    inherit (agentToml) description;
    license = lib.licenses.mit;
    mainProgram = "nixfleet-agent";
    platforms = lib.platforms.linux;
  };
}
