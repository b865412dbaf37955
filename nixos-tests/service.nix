# VM test: the agent as a NixOS service against the mock dashboard.
#
# Checks READY (Type=notify), register and heartbeats at the dashboard, the
# token travelling only as a systemd credential (never in the store, the
# unit, the config file, the environment or the journal), the watchdog
# restarting a hung agent, and a clean close (code 1000) on `systemctl stop`.
{ pkgs, self, ... }:
let
  inherit (pkgs) lib;
  mockDashboard = self.packages.${pkgs.stdenv.hostPlatform.system}.nixfleet-mock-dashboard;
in
pkgs.testers.runNixOSTest {
  name = "nixfleet-service";

  nodes = {
    dashboard = {
      networking.firewall.allowedTCPPorts = [ 8000 ];
      # Started by the test script once the token exists.
      systemd.services.nixfleet-mock-dashboard = {
        description = "NixFleet mock dashboard";
        serviceConfig.ExecStart = "${lib.getExe mockDashboard} --listen 0.0.0.0:8000 --token-file /run/keys/dashboard-token";
      };
    };

    host = {
      imports = [ self.nixosModules.default ];
      services.nixfleet = {
        enable = true;
        url = "ws://dashboard:8000/ws";
        # A test network: clear text to another VM is what is tested here.
        settings.allow_insecure_url = true;
        tokenFile = "/run/keys/nixfleet-token";
        interval = 2;
        watchdogSec = 10;
        logLevel = "debug";
      };
      # The token is written at run time, so the test starts the agent.
      systemd.services.nixfleet.wantedBy = lib.mkForce [ ];
    };
  };

  testScript = ''
    import json
    import secrets
    import time

    TOKEN = secrets.token_hex(16)


    def api(path):
        status, out = dashboard.execute(f"curl -sf http://127.0.0.1:8000/api{path}")
        return json.loads(out) if status == 0 else None


    def messages(kind):
        data = api(f"/hosts/host/messages?type={kind}")
        return data["messages"] if data else []


    def wait_for(what, fn, timeout=120):
        deadline = time.monotonic() + timeout
        while True:
            value = fn()
            if value:
                return value
            if time.monotonic() > deadline:
                raise Exception(f"timed out waiting for {what}")
            time.sleep(1)


    def main_pid():
        return int(host.succeed("systemctl show -p MainPID --value nixfleet.service"))


    def absent(machine, command):
        """grep-style command that must run fine and find nothing (status 1)."""
        status, out = machine.execute(command)
        assert status == 1, f"{command!r}: status {status}, output {out!r}"


    start_all()
    dashboard.wait_for_unit("multi-user.target")
    host.wait_for_unit("multi-user.target")

    with subtest("the token is written at run time, outside the store"):
        dashboard.succeed(f"(umask 077; mkdir -p /run/keys; printf %s {TOKEN} > /run/keys/dashboard-token)")
        host.succeed(f"(umask 077; mkdir -p /run/keys; printf %s {TOKEN} > /run/keys/nixfleet-token)")
        dashboard.succeed("systemctl start nixfleet-mock-dashboard.service")
        dashboard.wait_for_open_port(8000)
        host.wait_until_succeeds("curl -sf http://dashboard:8000/health", timeout=60)

    with subtest("the agent signals READY, registers and sends heartbeats"):
        # Type=notify: the start job completes once the agent sent READY=1.
        host.succeed("systemctl start nixfleet.service")
        host.wait_for_unit("nixfleet.service")
        register = wait_for("register", lambda: messages("register"))[0]["payload"]
        assert register["hostname"] == "host", register
        assert register["host_type"] == "nixos", register
        assert register["heartbeat_interval"] == 2, register
        wait_for("three heartbeats", lambda: len(messages("heartbeat")) >= 3, timeout=30)
        entry = [h for h in api("/hosts") if h["hostname"] == "host"][0]
        assert entry["online"] and entry["connected"], entry

    with subtest("the token reached the agent only as a credential"):
        host.succeed(f"test \"$(cat /run/credentials/nixfleet.service/token)\" = {TOKEN}")
        unit = host.succeed("readlink -f /etc/systemd/system/nixfleet.service").strip()
        config = host.succeed(f"grep -o '/nix/store/[^ ]*-nixfleet.toml' {unit}").split()[0]
        absent(host, f"grep -F {TOKEN} {unit} {config}")
        absent(host, f"grep -rlF {TOKEN} /nix/store/*nixfleet*")
        absent(host, f"grep -aF {TOKEN} /proc/{main_pid()}/environ")
        absent(host, f"journalctl -u nixfleet.service | grep -F {TOKEN}")

    with subtest("the watchdog restarts a hung agent"):
        pid = main_pid()
        restarts = int(host.succeed("systemctl show -p NRestarts --value nixfleet.service"))
        registers = len(messages("register"))
        host.succeed(f"kill -STOP {pid}")
        host.wait_until_succeeds(
            # No grep -q: the driver runs commands with pipefail.
            "journalctl -u nixfleet.service | grep -F \"Failed with result 'watchdog'\"",
            timeout=60,
        )
        host.wait_until_succeeds(
            f"test $(systemctl show -p NRestarts --value nixfleet.service) -gt {restarts}",
            timeout=60,
        )
        host.wait_for_unit("nixfleet.service")
        assert main_pid() != pid
        wait_for("a new register", lambda: len(messages("register")) > registers)

    with subtest("systemctl stop closes the connection with code 1000"):
        host.succeed("systemctl stop nixfleet.service")

        def closed():
            connections = api("/hosts/host/connections") or []
            last = connections[-1] if connections else None
            return last if last and not last["open"] else None

        last = wait_for("the connection to close", closed, timeout=30)
        assert last["close_code"] == 1000, last
        assert last["closed_by"] == "agent", last
        assert host.succeed("systemctl show -p ExecMainStatus --value nixfleet.service").strip() == "0"
  '';
}
