# Imported by the VM's first configuration and, from the configuration
# repository, by the generation it switches to: both render the same agent
# unit, so the switch leaves the running agent alone.
{ lib, pkgs, ... }:
{
  services.nixfleet = {
    enable = true;
    url = "ws://127.0.0.1:8000/ws";
    tokenFile = "/run/keys/nixfleet-token";
    hostname = "host";
    interval = 2;
    logLevel = "debug";
    # The first generation comes from this flake (a git revision, when the
    # test is built from a checkout), the second from the configuration
    # repository's `path:` copy of it, which has no revision. Both report
    # the same commit, so both render the same settings file and unit.
    settings.source_commit = "0000000000000000000000000000000000000000";
  };
  # The token is written at run time, so the test starts the agent.
  systemd.services.nixfleet.wantedBy = lib.mkForce [ ];

  # Everything is built from what the VM already has.
  nix.settings = {
    experimental-features = [
      "nix-command"
      "flakes"
    ];
    substituters = lib.mkForce [ ];
    hashed-mirrors = null;
    connect-timeout = 1;
  };

  documentation.enable = false;
  environment.systemPackages = [ pkgs.git ];
}
