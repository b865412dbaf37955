# The agent's unit file as NixOS writes it for modules/nixfleet.nix: the
# service is checked by NixOS's own systemd option types and rendered by
# systemd-lib's serviceToUnit (see nix/stubs.nix). The systemd-nspawn test
# (crates/nixfleet-agent/tests/systemd_nspawn.rs) installs exactly this text
# in its container, so the module is the only source of the unit.
#
# The test's own values come in as arguments; the store paths that exist
# only on NixOS go out as placeholders for the test to fill:
#   @agent@   the agent's executable
#   @config@  the configuration file the module generates
#   @path@    the service's PATH (the programs the commands run)
#
#   nix-instantiate --readonly-mode --eval --strict --json nix/render-unit.nix \
#     --arg lib 'import …/nixpkgs/lib' --arg nixosLib …/nixpkgs/nixos/lib \
#     --argstr tokenFile /etc/nixfleet/token --arg watchdogSec 3
#
# `module` lets nix/check.sh render deliberately broken copies of the module
# to show that the real types refuse them.
{
  lib,
  nixosLib,
  module ? ../modules/nixfleet.nix,
  tokenFile ? "/run/keys/nixfleet-token",
  watchdogSec ? 60,
}:
let
  stubs = import ./stubs.nix { inherit lib nixosLib; };

  config = stubs.evalNixos [
    module
    {
      networking.hostName = "nixfleet-test";
      services.nixfleet = {
        enable = true;
        url = "ws://127.0.0.1/ws";
        inherit tokenFile watchdogSec;
      };
    }
  ];

  failed = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
  service = config.systemd.services.nixfleet;
  text = config.systemd.units."nixfleet.service".text;
in
if failed != [ ] then
  throw "the module's assertions failed: ${lib.concatStringsSep "; " failed}"
else
  builtins.replaceStrings
    [
      (lib.getExe config.services.nixfleet.package)
      (stubs.fakeStorePath "nixfleet.toml")
      service.environment.PATH
    ]
    [
      "@agent@"
      "@config@"
      "@path@"
    ]
    text
