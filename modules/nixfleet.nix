# NixOS module for the NixFleet agent (`services.nixfleet`).
#
# The agent keeps one WebSocket connection to a NixFleet dashboard, sends
# heartbeats, and runs the dashboard's commands (`pull`, `switch`, …) in its
# configuration repository. Its configuration keys are those of
# `nixfleet-agent --config FILE`; the options below set the common ones and
# `settings` takes any other. Secrets reach the agent only as systemd
# credentials, never through the Nix store.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.nixfleet;

  settingsFormat = pkgs.formats.toml { };
  configFile = settingsFormat.generate "nixfleet.toml" cfg.settings;

  # A file the service reads at run time: absolute, and never a store path
  # (world-readable) or a Nix path literal (which would be copied into the
  # store when interpolated). The type refuses both, with the option's name.
  runtimePath = lib.types.pathWith {
    inStore = false;
    absolute = true;
  };

  # Keys of the configuration file that must come from a credential instead.
  secretSettings = {
    token = "tokenFile";
    token_file = "tokenFile";
    ssh_key = "sshKeyFile";
    tls_client_key = "tlsClientKeyFile";
  };

  matches = regex: value: lib.isString value && builtins.match regex value != null;

  # User info that may be a secret: a password in any URL, or any user name
  # in an http(s) URL (where access tokens go). `git@host:…` and
  # `ssh://git@host/…` name a user only.
  hasCredentials =
    url: matches "[A-Za-z][A-Za-z0-9+.-]*://[^/@]*:[^/@]*@.*" url || matches "https?://[^/@]+@.*" url;

  # Where `prometheus.enable` puts the metrics file. Under /run (a tmpfs)
  # rather than /var/lib: the file says "connected 1" until the agent
  # rewrites it, so a file left from before a reboot, by an agent that has
  # not started since (a configuration error, a unit that fails), would
  # keep an alert on `nixfleet_agent_connected == 0` quiet; gone with the
  # boot, its absence is what an `absent()` rule sees. It is also never
  # written to disk. Not the agent's state directory, which is private
  # (0700) and node_exporter runs as its own user; not node_exporter's
  # RuntimeDirectory, which systemd removes whenever the exporter stops.
  metricsDir = "/run/nixfleet-metrics";
in
{
  options.services.nixfleet = {
    enable = lib.mkEnableOption "the NixFleet agent, which keeps this host connected to a NixFleet dashboard and runs the commands it sends";

    package = lib.mkPackageOption pkgs "nixfleet-agent" { };

    url = lib.mkOption {
      type = lib.types.str;
      example = "wss://fleet.example.com/ws";
      description = ''
        WebSocket URL of the dashboard, `ws://` or `wss://`. Sets `settings.url`.
      '';
    };

    tokenFile = lib.mkOption {
      type = runtimePath;
      example = "/run/agenix/nixfleet-token";
      description = ''
        Absolute path of a file holding the agent's token. systemd reads it
        when the service starts and passes it to the agent as the credential
        `token` ({manpage}`systemd.exec(5)`, `LoadCredential=`), so the file
        may be readable by root only and the token never enters the Nix
        store. Give it as a string: a Nix path literal such as `./token`
        is refused, because it would be copied into the store.
      '';
    };

    hostname = lib.mkOption {
      type = lib.types.str;
      default = config.networking.hostName;
      defaultText = lib.literalExpression "config.networking.hostName";
      example = "web-01";
      description = ''
        Name of this host at the dashboard. It is also the
        `nixosConfigurations` attribute that `switch` builds
        (`nixos-rebuild switch --flake <repoDir>#<hostname>`), so only
        letters, digits, `-`, `_` and `.` are allowed. Sets `settings.hostname`.
      '';
    };

    repoDir = lib.mkOption {
      type = runtimePath;
      default = "/var/lib/nixfleet/repo";
      description = ''
        Directory of the configuration repository (a flake) that `pull` and
        `switch` work in. The default lies in the service's state directory.
        Sets `settings.repo_dir`.
      '';
    };

    repoUrl = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "git@github.com:example/fleet.git";
      description = ''
        Git URL of the configuration repository. When set, the agent owns the
        clone in {option}`services.nixfleet.repoDir` (isolated mode): `pull`
        clones it if missing and resets it hard to `origin/<branch>`. When
        `null`, `pull` runs `git pull --ff-only` in an existing checkout.
        Sets `settings.repo_url`.
      '';
    };

    branch = lib.mkOption {
      type = lib.types.str;
      default = "main";
      description = "Branch of the configuration repository to follow. Sets `settings.branch`.";
    };

    interval = lib.mkOption {
      type = lib.types.ints.positive;
      default = 30;
      description = ''
        Seconds between heartbeats. The dashboard marks the host offline after
        three missed intervals. Sets `settings.interval`.
      '';
    };

    sshKeyFile = lib.mkOption {
      type = lib.types.nullOr runtimePath;
      default = null;
      example = "/run/agenix/nixfleet-deploy-key";
      description = ''
        Absolute path of an SSH private key for git, passed to the agent as
        the credential `ssh_key` like {option}`services.nixfleet.tokenFile`.
        `null` leaves git to its usual SSH configuration.
      '';
    };

    tlsClientCertFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      example = "/run/agenix/nixfleet-client.crt";
      description = ''
        PEM client certificate (chain) this host shows a `wss://` dashboard,
        or a reverse proxy in front of it, that asks for one (mTLS), so the
        dashboard can tell hosts apart. A certificate is public: a store
        path is fine. Needs {option}`services.nixfleet.tlsClientKeyFile`.
        Sets `settings.tls_client_cert`.
      '';
    };

    tlsClientKeyFile = lib.mkOption {
      type = lib.types.nullOr runtimePath;
      default = null;
      example = "/run/agenix/nixfleet-client.key";
      description = ''
        Absolute path of the PEM private key of
        {option}`services.nixfleet.tlsClientCertFile`, passed to the agent as
        the credential `tls_client_key` like
        {option}`services.nixfleet.tokenFile`, so it never enters the Nix
        store. A key that does not belong to the certificate stops the
        agent (exit 78).
      '';
    };

    allowedSignersFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      example = lib.literalExpression "./allowed_signers";
      description = ''
        git's SSH allowed-signers file (the format of
        `gpg.ssh.allowedSignersFile`): when set, `pull` deploys only a tip
        signed by one of these keys, and `switch`/`boot` build only a
        verified HEAD. Public keys only, so a Nix path literal (copied into
        the store) is fine. `null` checks no signatures. Sets
        `settings.allowed_signers_file`.
      '';
    };

    gpgKeyring = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      example = lib.literalExpression "./fleet-signers.asc";
      description = ''
        OpenPGP public keys (a file, or a directory of key files as
        `gpg --export` writes them) for the same rule as
        {option}`services.nixfleet.allowedSignersFile`, with OpenPGP
        signatures. Public keys only: the store is fine. Sets
        `settings.gpg_keyring`.
      '';
    };

    logLevel = lib.mkOption {
      type = lib.types.str;
      default = "info";
      example = "debug";
      description = ''
        Log level: `debug`, `info`, `warn` or `error`, or a `RUST_LOG`-style
        filter. Sets `settings.log_level`.
      '';
    };

    metrics = lib.mkOption {
      type = lib.types.enum [
        "auto"
        "stasysmo"
        "proc"
        "none"
      ];
      default = "auto";
      description = ''
        Source of the CPU, memory, swap and load figures in heartbeats:
        `stasysmo` files, the kernel's own counters (`proc`), `auto` (StaSysMo
        when its files are fresh, else `proc`) or `none`. Sets `settings.metrics`.
      '';
    };

    watchdogSec = lib.mkOption {
      type = lib.types.ints.unsigned;
      default = 60;
      description = ''
        systemd watchdog timeout in seconds (`WatchdogSec=`): an agent that
        stops answering for this long is killed and restarted. `0` disables
        the watchdog.
      '';
    };

    themeColor = lib.mkOption {
      type = lib.types.nullOr (lib.types.strMatching "#[0-9a-fA-F]{6}");
      default = null;
      example = "#7aa2f7";
      description = ''
        Colour of this host on v3 dashboards (`#rrggbb`); `null` leaves the
        dashboard's default. Sets `settings.theme_color`.
      '';
    };

    location = lib.mkOption {
      type = lib.types.nullOr (
        lib.types.enum [
          "home"
          "work"
          "cloud"
        ]
      );
      default = null;
      description = "Where the host is, as v3 dashboards group it. Sets `settings.location`.";
    };

    deviceType = lib.mkOption {
      type = lib.types.nullOr (
        lib.types.enum [
          "server"
          "desktop"
          "laptop"
          "gaming"
        ]
      );
      default = null;
      description = "What kind of machine the host is, for v3 dashboards. Sets `settings.device_type`.";
    };

    reportAgentVersion = lib.mkOption {
      type = lib.types.nullOr (lib.types.strMatching "[A-Za-z0-9.+_-]{1,64}");
      default = null;
      example = "3.1.5";
      description = ''
        The version this agent reports as `agent_version`. A v3 dashboard
        marks every agent whose version differs from its own as outdated
        (and draws its lock compartment red); set this to the dashboard's
        version to be counted as current. The agent's real version is still
        sent (`real_agent_version`), logged and shown by `check-version`;
        the dashboard's own "agent outdated" hint is what is lost. `null`
        reports the real version. Sets `settings.report_agent_version`.
      '';
    };

    allowReboot = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Whether the dashboard's `reboot` command may reboot this host (with
        `systemctl reboot`, a few seconds after it is acknowledged). Off, the
        agent refuses it with a reason. Sets `settings.allow_reboot`.
      '';
    };

    confirmTimeout = lib.mkOption {
      type = lib.types.ints.between 0 86400;
      default = 300;
      example = 600;
      description = ''
        Safe deployments: seconds a switch that changed the running system
        waits for the dashboard to confirm it (the agent completes a
        register) before the agent rolls the host back to exactly the system
        it recorded before the switch. The countdown is kept on disk and
        survives the agent's restart. `0` turns it off. Sets
        `settings.confirm_timeout`.
      '';
    };

    rollbackOnFailedTests = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        After an activation, run the host's tests (as the `test` command
        does) and roll back the same way if any of them fails. Sets
        `settings.rollback_on_failed_tests`.
      '';
    };
    prometheus.enable = lib.mkEnableOption ''
      Prometheus metrics through node_exporter's textfile collector: the
      agent writes `${metricsDir}/nixfleet.prom` (the key
      `metrics_textfile`; the directory is created with systemd-tmpfiles)
      and {option}`services.prometheus.exporters.node` gets the `textfile`
      collector reading that directory. The node exporter itself is not
      turned on: add `services.prometheus.exporters.node.enable = true;`
      if it is not on already
    '';

    settings = lib.mkOption {
      type = lib.types.submodule { freeformType = settingsFormat.type; };
      default = { };
      example = lib.literalExpression ''
        {
          ping_interval = 15;
          backoff_max = 120;
          stop_grace = "30s";
          ca_file = "/etc/ssl/certs/fleet-ca.pem";
        }
      '';
      description = ''
        Configuration of the agent, written to a TOML file in the Nix store
        and passed with `--config`. Any key the agent knows may be set here
        (`ping_interval`, `ping_timeout`, `backoff_max`, `stop_grace`,
        `stasysmo_dir`, `ca_file`, …). The options of this module set their
        keys with `lib.mkDefault`, so a value given here takes precedence.

        Because the file is world-readable, `token`, `token_file`, `ssh_key`
        and `tls_client_key` are refused: use
        {option}`services.nixfleet.tokenFile`,
        {option}`services.nixfleet.sshKeyFile` and
        {option}`services.nixfleet.tlsClientKeyFile`.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    services.nixfleet.settings = lib.mapAttrs (_: lib.mkDefault) (
      {
        inherit (cfg)
          url
          hostname
          branch
          interval
          metrics
          ;
        repo_dir = cfg.repoDir;
        log_level = cfg.logLevel;
      }
      // lib.optionalAttrs cfg.allowReboot { allow_reboot = true; }
      // lib.optionalAttrs (cfg.confirmTimeout != 300) { confirm_timeout = cfg.confirmTimeout; }
      // lib.optionalAttrs cfg.rollbackOnFailedTests { rollback_on_failed_tests = true; }
      // lib.optionalAttrs (cfg.repoUrl != null) { repo_url = cfg.repoUrl; }
      # Interpolated, so that a path literal is copied into the store and
      # the agent gets a store path rather than one in the flake's source.
      // lib.optionalAttrs (cfg.allowedSignersFile != null) {
        allowed_signers_file = "${cfg.allowedSignersFile}";
      }
      // lib.optionalAttrs (cfg.gpgKeyring != null) { gpg_keyring = "${cfg.gpgKeyring}"; }
      // lib.optionalAttrs (cfg.tlsClientCertFile != null) {
        tls_client_cert = "${cfg.tlsClientCertFile}";
      }
      // lib.optionalAttrs (cfg.themeColor != null) { theme_color = cfg.themeColor; }
      // lib.optionalAttrs (cfg.location != null) { inherit (cfg) location; }
      // lib.optionalAttrs (cfg.deviceType != null) { device_type = cfg.deviceType; }
      // lib.optionalAttrs (cfg.reportAgentVersion != null) {
        report_agent_version = cfg.reportAgentVersion;
      }
      // lib.optionalAttrs cfg.prometheus.enable { metrics_textfile = "${metricsDir}/nixfleet.prom"; }
    );

    # World-readable: node_exporter runs as its own user. The agent (root)
    # replaces the file there by a rename, mode 0644.
    systemd.tmpfiles.rules = lib.optional cfg.prometheus.enable "d ${metricsDir} 0755 root root -";

    # Only the collector's settings, never `enable`: a host that does not
    # run the node exporter does not get one from this module. Plain list
    # definitions, so they add to the user's own flags and collectors
    # instead of replacing them (or being replaced, as a mkDefault list
    # would be by any other definition).
    services.prometheus.exporters.node = lib.mkIf cfg.prometheus.enable {
      enabledCollectors = [ "textfile" ];
      extraFlags = [ "--collector.textfile.directory=${metricsDir}" ];
    };

    assertions = [
      {
        assertion = matches "wss?://.+" cfg.settings.url;
        message = "services.nixfleet.url must start with ws:// or wss://, got \"${toString cfg.settings.url}\".";
      }
      {
        assertion = matches "[A-Za-z0-9._-]+" cfg.settings.hostname;
        message = "services.nixfleet.hostname \"${toString cfg.settings.hostname}\" must be non-empty and use only letters, digits, '-', '_' and '.': it names the nixosConfigurations attribute that switch builds. Set it explicitly if networking.hostName is empty.";
      }
    ]
    ++ lib.mapAttrsToList (key: option: {
      assertion = !(cfg.settings ? ${key});
      message = "services.nixfleet.settings.${key} is not allowed: the settings file is world-readable in the Nix store. Use services.nixfleet.${option}, which is passed as a systemd credential.";
    }) secretSettings
    ++ [
      {
        assertion = (cfg.tlsClientCertFile == null) == (cfg.tlsClientKeyFile == null);
        message = "services.nixfleet.tlsClientCertFile and services.nixfleet.tlsClientKeyFile go together: set both (mTLS) or neither.";
      }
      {
        assertion = !hasCredentials (cfg.settings.repo_url or null);
        message = "services.nixfleet.repoUrl (settings.repo_url) carries credentials in its user info: the settings file is world-readable in the Nix store. Use an ssh URL with services.nixfleet.sshKeyFile, which is passed as a systemd credential.";
      }
    ];

    systemd.services.nixfleet = {
      description = "NixFleet agent";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];

      # What the dashboard's commands run: the host's own nixos-rebuild,
      # Nix, ssh client (for git over SSH) and systemd.
      path = [
        config.system.build.nixos-rebuild
        pkgs.git
        config.nix.package
        config.programs.ssh.package
        config.systemd.package
      ];

      # The agent itself runs `nixos-rebuild switch`; restarting or stopping
      # the unit during activation would kill it half-way, before it reports
      # the result. Instead, after a successful switch the agent checks
      # whether its own unit file or binary changed and, if so, exits after
      # sending the status, and Restart=always starts the new version.
      # (With no restart there is no stop either: stopIfChanged has nothing
      # to decide.) For the same reason a new configuration that drops this
      # module does not stop the agent in the middle of its switch, as
      # nixpkgs' nixos-upgrade.service does it; the agent then runs until it
      # exits or the host reboots.
      restartIfChanged = false;
      unitConfig.X-StopOnRemoval = false;

      # What nixos-upgrade.service gives nixos-rebuild: Nix's own variables,
      # a HOME for git and Nix's caches, and the host's proxy settings
      # (networking.proxy), so that fetches go where the host's do. The
      # agent passes HOME and the proxy variables on to its commands.
      environment =
        config.nix.envVars
        // {
          HOME = "/root";
        }
        // config.networking.proxy.envVars;

      # Runs as root without sandboxing: `switch` and `rollback` activate
      # system configurations, which needs full access to the system (bind
      # mounts, /etc, /boot, systemd, the Nix daemon). Options such as
      # ProtectSystem= or PrivateTmp= would also apply to that activation.
      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${lib.getExe cfg.package} --config ${configFile}";
        Restart = "always";
        RestartSec = 2;
        # Exit 78 (EX_CONFIG) is a configuration error: starting again every
        # 2 s cannot fix it. The unit stays failed, with the agent's one-line
        # reason in the journal, until a switch changes the configuration
        # (or `systemctl restart nixfleet`).
        RestartPreventExitStatus = 78;
        WatchdogSec = cfg.watchdogSec;
        # Each command runs under a supervisor process of its own, in this
        # unit's cgroup, that outlives the agent: an agent restarted by the
        # watchdog, after a crash or after its own upgrade adopts the running
        # command from its log. The default control-group kill mode would
        # end the supervisor, and the evaluation and build under it, with
        # the agent. (The activation itself runs outside this unit:
        # nixos-rebuild starts switch-to-configuration as a transient unit.)
        KillMode = "process";
        StateDirectory = "nixfleet";
        # Command logs and the running-command record are the agent's alone
        # (a test script may print a secret).
        StateDirectoryMode = "0700";
        UMask = "0077";
        # No core dump of a process that holds the token (the agent also
        # marks itself not dumpable).
        LimitCORE = 0;
        LoadCredential = [
          "token:${cfg.tokenFile}"
        ]
        ++ lib.optional (cfg.sshKeyFile != null) "ssh_key:${cfg.sshKeyFile}"
        ++ lib.optional (cfg.tlsClientKeyFile != null) "tls_client_key:${cfg.tlsClientKeyFile}";
      };
    };
  };
}
