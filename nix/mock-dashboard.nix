# The mock dashboard: a small NixFleet dashboard (WebSocket endpoint, HTTP
# API, a page) for the VM tests, the demo and trying the agent out. Its own
# package, so that no host that runs the agent carries a server that can
# send commands to agents. Built like nix/package.nix, from the same source
# and the same vendored dependencies.
{
  lib,
  rustPlatform,
  # As in nix/package.nix: on for the flake's checks, off otherwise.
  runTests ? false,
}:
let
  workspace = (lib.importTOML ../Cargo.toml).workspace.package;
  mockToml = (lib.importTOML ../crates/nixfleet-mock-dashboard/Cargo.toml).package;
in
rustPlatform.buildRustPackage {
  pname = mockToml.name;
  inherit (workspace) version;

  src = import ./source.nix { inherit lib; };

  # The same lock file as the agent's, so the same vendored dependencies.
  cargoLock.lockFile = ../Cargo.lock;

  cargoBuildFlags = [
    "-p"
    mockToml.name
  ];
  cargoTestFlags = [
    "-p"
    mockToml.name
  ];

  doCheck = runTests;
  checkFlags = [
    "--exact"
    # Drives a headless Chromium against the mock and the agent's binary,
    # neither of which this build has.
    "--skip=a_person_follows_a_host_and_runs_commands_in_the_browser"
  ];

  meta = {
    inherit (mockToml) description;
    license = lib.licenses.mit;
    mainProgram = "nixfleet-mock-dashboard";
    platforms = lib.platforms.linux;
  };
}
