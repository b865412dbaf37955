# Evaluates modules/nixfleet.nix and nix/package.nix with nixpkgs' `lib`
# alone, against the stand-ins of nix/stubs.nix for the NixOS options and
# packages they use and NixOS's own systemd service types and unit
# rendering (nixos/lib). Run by nix/check.sh:
#
#   nix-instantiate --readonly-mode --eval --strict --json nix/eval-module.nix \
#     --arg lib 'import /path/to/nixpkgs/lib' --arg nixosLib /path/to/nixpkgs/nixos/lib
#
# The result is { results = [ { name; ok; detail; } … ]; }: one entry per
# expectation.
{ lib, nixosLib }:
let
  stubs = import ./stubs.nix { inherit lib nixosLib; };
  inherit (stubs) fakePackage fakeStorePath;
  pkgs = stubs.pkgsFor "x86_64-linux";

  evalConfig =
    module:
    stubs.evalNixos [
      ../modules/nixfleet.nix
      module
    ];

  tokenFile = "/run/keys/nixfleet-token";

  minimal = {
    networking.hostName = "web-01";
    services.nixfleet = {
      enable = true;
      url = "wss://fleet.example.com/ws";
      inherit tokenFile;
    };
  };

  withMinimal = extra: evalConfig (lib.recursiveUpdate minimal extra);

  failedMessages = config: map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);

  expect = name: ok: detail: { inherit name ok detail; };

  expectEqual =
    name: actual: expected:
    expect name (
      actual == expected
    ) "expected ${builtins.toJSON expected}, got ${builtins.toJSON actual}";

  # A bad configuration must fail exactly one assertion, whose message
  # contains `fragment`.
  expectAssertion =
    name: extra: fragment:
    let
      failed = failedMessages (withMinimal extra);
    in
    expect "assertion fires: ${name}" (
      builtins.length failed == 1 && lib.hasInfix fragment (builtins.head failed)
    ) "expected one failed assertion containing \"${fragment}\", got ${builtins.toJSON failed}";

  # A value the option's type must refuse (evaluation throws).
  expectTypeError =
    name: extra: select:
    expect "type refuses: ${name}" (
      !(builtins.tryEval (builtins.deepSeq (select (withMinimal extra)) true)).success
    ) "expected a type error, the value was accepted";

  base = evalConfig minimal;
  disabled = evalConfig { services.nixfleet.enable = false; };
  prometheus = withMinimal { services.nixfleet.prometheus.enable = true; };
  unit = base.systemd.services.nixfleet;
  sc = unit.serviceConfig;
  unitLines = lib.splitString "\n" base.systemd.units."nixfleet.service".text;
  agentExe = "${pkgs.nixfleet-agent.outPath}/bin/nixfleet-agent";
  configFile = fakeStorePath "nixfleet.toml";

  moduleResults = [
    (expectEqual "minimal config passes every assertion" (failedMessages base) [ ])
    (expectEqual "Type=notify" sc.Type "notify")
    (expectEqual "NotifyAccess=main" sc.NotifyAccess "main")
    (expectEqual "Restart=always" sc.Restart "always")
    (expectEqual "RestartSec=2" sc.RestartSec 2)
    (expectEqual "RestartPreventExitStatus=78: a configuration error is not restarted forever"
      (sc.RestartPreventExitStatus or null)
      78
    )
    (expectEqual "WatchdogSec defaults to 60" sc.WatchdogSec 60)
    (expectEqual "KillMode=process" sc.KillMode "process")
    (expectEqual "StateDirectory=nixfleet" sc.StateDirectory "nixfleet")
    (expectEqual "StateDirectoryMode=0700" sc.StateDirectoryMode "0700")
    (expectEqual "UMask=0077" sc.UMask "0077")
    (expectEqual "LimitCORE=0" sc.LimitCORE 0)
    (expectEqual "LoadCredential=token:<tokenFile>" sc.LoadCredential [ "token:${tokenFile}" ])
    (expectEqual "ExecStart runs the agent with --config" sc.ExecStart
      "${agentExe} --config ${configFile}"
    )
    (expectEqual "restartIfChanged = false" unit.restartIfChanged false)
    (expectEqual
      "X-StopOnRemoval=false (a switch that drops the module does not stop the agent mid-switch)"
      (unit.unitConfig.X-StopOnRemoval or null)
      false
    )
    (expectEqual "environment: Nix's variables, HOME=/root, no proxy unless one is set" unit.environment
      {
        HOME = "/root";
        inherit (unit.environment) PATH;
      }
    )
    (expectEqual "environment: nix.envVars and networking.proxy, as nixos-upgrade.service has them"
      (lib.removeAttrs
        (withMinimal {
          nix.envVars.NIX_REMOTE = "daemon";
          networking.proxy = {
            default = "http://proxy.example.com:3128";
            noProxy = "127.0.0.1,localhost,.example.com";
          };
        }).systemd.services.nixfleet.environment
        [ "PATH" ]
      )
      {
        NIX_REMOTE = "daemon";
        HOME = "/root";
        http_proxy = "http://proxy.example.com:3128";
        https_proxy = "http://proxy.example.com:3128";
        ftp_proxy = "http://proxy.example.com:3128";
        rsync_proxy = "http://proxy.example.com:3128";
        no_proxy = "127.0.0.1,localhost,.example.com";
      }
    )
    (expectEqual "wantedBy multi-user.target" unit.wantedBy [ "multi-user.target" ])
    (expectEqual "wants network-online.target" unit.wants [ "network-online.target" ])
    (expectEqual "after network-online.target" unit.after [ "network-online.target" ])
    (expectEqual "path: nixos-rebuild, git, nix, the ssh client, systemd (then NixOS's default path)"
      (map (p: p.name) (lib.take 5 unit.path))
      [
        "nixos-rebuild-ng-25.11"
        "git-2.51.0"
        "nix-2.31.2"
        "openssh-10.0p2"
        "systemd-258.2"
      ]
    )
    (expectEqual "path: the ssh client is programs.ssh.package"
      (map (p: p.name) (
        lib.take 5
          (withMinimal { programs.ssh.package = fakePackage "openssh-hpn-10.0" "ssh"; })
          .systemd.services.nixfleet.path
      ))
      [
        "nixos-rebuild-ng-25.11"
        "git-2.51.0"
        "nix-2.31.2"
        "openssh-hpn-10.0"
        "systemd-258.2"
      ]
    )
    (expectEqual "unit file: the lines NixOS writes" (lib.subtractLists unitLines [
      "[Unit]"
      "Description=NixFleet agent"
      "Wants=network-online.target"
      "After=network-online.target"
      "[Service]"
      "Type=notify"
      "NotifyAccess=main"
      "ExecStart=${agentExe} --config ${configFile}"
      "Restart=always"
      "RestartSec=2"
      "WatchdogSec=60"
      "KillMode=process"
      "RestartPreventExitStatus=78"
      "StateDirectory=nixfleet"
      "LoadCredential=token:${tokenFile}"
      "X-RestartIfChanged=false"
      "X-StopOnRemoval=false"
      "Environment=\"HOME=/root\""
      "Environment=\"PATH=${unit.environment.PATH}\""
      "[Install]"
      "WantedBy=multi-user.target"
    ]) [ ])
    (expectEqual "unit file: the service's PATH starts with the module's path"
      (lib.hasPrefix (lib.makeBinPath (lib.take 5 unit.path)) unit.environment.PATH)
      true
    )
    (expectEqual "settings carry the options' keys" base.services.nixfleet.settings {
      url = "wss://fleet.example.com/ws";
      hostname = "web-01";
      repo_dir = "/var/lib/nixfleet/repo";
      branch = "main";
      interval = 30;
      log_level = "info";
      metrics = "auto";
    })
    (expectEqual "no secret in the settings file" (lib.intersectLists
      (builtins.attrNames base.services.nixfleet.settings)
      [
        "token"
        "token_file"
        "ssh_key"
        "tls_client_key"
      ]
    ) [ ])
    (expectEqual "options map to settings keys"
      (withMinimal {
        services.nixfleet = {
          hostname = "db-02";
          repoDir = "/srv/fleet";
          repoUrl = "git@example.com:fleet.git";
          branch = "prod";
          interval = 10;
          logLevel = "debug";
          metrics = "none";
        };
      }).services.nixfleet.settings
      {
        url = "wss://fleet.example.com/ws";
        hostname = "db-02";
        repo_dir = "/srv/fleet";
        repo_url = "git@example.com:fleet.git";
        branch = "prod";
        interval = 10;
        log_level = "debug";
        metrics = "none";
      }
    )
    (expectEqual "v3 presentation options and allowReboot map to settings keys"
      (withMinimal {
        services.nixfleet = {
          themeColor = "#7aa2f7";
          location = "cloud";
          deviceType = "server";
          allowReboot = true;
          reportAgentVersion = "3.1.5";
        };
      }).services.nixfleet.settings
      {
        url = "wss://fleet.example.com/ws";
        hostname = "web-01";
        repo_dir = "/var/lib/nixfleet/repo";
        branch = "main";
        interval = 30;
        log_level = "info";
        metrics = "auto";
        theme_color = "#7aa2f7";
        location = "cloud";
        device_type = "server";
        allow_reboot = true;
        report_agent_version = "3.1.5";
      }
    )
    (expectEqual "confirmTimeout and rollbackOnFailedTests map to settings keys"
      (withMinimal {
        services.nixfleet = {
          confirmTimeout = 0;
          rollbackOnFailedTests = true;
        };
      }).services.nixfleet.settings
      {
        url = "wss://fleet.example.com/ws";
        hostname = "web-01";
        repo_dir = "/var/lib/nixfleet/repo";
        branch = "main";
        interval = 30;
        log_level = "info";
        metrics = "auto";
        confirm_timeout = 0;
        rollback_on_failed_tests = true;
      }
    )
    (expectEqual "confirmTimeout at its default leaves the agent's default" (
      (withMinimal { }).services.nixfleet.settings ? confirm_timeout
    ) false)
    (expectEqual "allowedSignersFile and gpgKeyring map to allowed_signers_file and gpg_keyring"
      (lib.filterAttrs (key: _: key == "allowed_signers_file" || key == "gpg_keyring")
        (withMinimal {
          services.nixfleet = {
            allowedSignersFile = "/etc/nixfleet/allowed_signers";
            gpgKeyring = "/etc/nixfleet/signers";
          };
        }).services.nixfleet.settings
      )
      {
        allowed_signers_file = "/etc/nixfleet/allowed_signers";
        gpg_keyring = "/etc/nixfleet/signers";
      }
    )
    # Public keys may come from the configuration's own repository: a path
    # literal is copied into the store, and the agent is given that copy
    # (this file stands in for a key file).
    (expect "allowedSignersFile and gpgKeyring as path literals become store paths" (
      let
        settings =
          (withMinimal {
            services.nixfleet = {
              allowedSignersFile = ./eval-module.nix;
              gpgKeyring = ./stubs.nix;
            };
          }).services.nixfleet.settings;
      in
      lib.hasPrefix "${builtins.storeDir}/" settings.allowed_signers_file
      && lib.hasSuffix "-eval-module.nix" settings.allowed_signers_file
      && lib.hasPrefix "${builtins.storeDir}/" settings.gpg_keyring
      && lib.hasSuffix "-stubs.nix" settings.gpg_keyring
    ) "expected store paths for allowed_signers_file and gpg_keyring")
    (expectEqual "signing keys are public: no credential for them"
      (withMinimal { services.nixfleet.allowedSignersFile = "/etc/nixfleet/allowed_signers"; })
      .systemd.services.nixfleet.serviceConfig.LoadCredential
      [ "token:${tokenFile}" ]
    )
    (expectEqual
      "tlsClientCertFile sets tls_client_cert, tlsClientKeyFile becomes the credential tls_client_key"
      (
        let
          c = withMinimal {
            services.nixfleet = {
              tlsClientCertFile = "/run/keys/client.crt";
              tlsClientKeyFile = "/run/keys/client.key";
            };
          };
        in
        {
          cert = c.services.nixfleet.settings.tls_client_cert or null;
          key = c.services.nixfleet.settings.tls_client_key or null;
          inherit (c.systemd.services.nixfleet.serviceConfig) LoadCredential;
          failed = failedMessages c;
        }
      )
      {
        cert = "/run/keys/client.crt";
        key = null;
        LoadCredential = [
          "token:${tokenFile}"
          "tls_client_key:/run/keys/client.key"
        ];
        failed = [ ];
      }
    )
    (expectEqual "settings override the options and take extra keys"
      (withMinimal {
        services.nixfleet.settings = {
          interval = 5;
          ping_interval = 20;
        };
      }).services.nixfleet.settings
      {
        url = "wss://fleet.example.com/ws";
        hostname = "web-01";
        repo_dir = "/var/lib/nixfleet/repo";
        branch = "main";
        interval = 5;
        log_level = "info";
        metrics = "auto";
        ping_interval = 20;
      }
    )
    (expectEqual "sshKeyFile becomes the credential ssh_key"
      (withMinimal { services.nixfleet.sshKeyFile = "/run/keys/deploy"; })
      .systemd.services.nixfleet.serviceConfig.LoadCredential
      [
        "token:${tokenFile}"
        "ssh_key:/run/keys/deploy"
      ]
    )
    (expectEqual "watchdogSec = 0 disables the watchdog"
      (withMinimal { services.nixfleet.watchdogSec = 0; })
      .systemd.services.nixfleet.serviceConfig.WatchdogSec
      0
    )
    (expectEqual "package option sets ExecStart"
      (withMinimal {
        services.nixfleet.package = fakePackage "nixfleet-agent-custom" "nixfleet-agent";
      }).systemd.services.nixfleet.serviceConfig.ExecStart
      "${fakeStorePath "nixfleet-agent-custom"}/bin/nixfleet-agent --config ${configFile}"
    )
    (expectEqual
      "prometheus.enable: the metrics file in a tmpfiles directory, the textfile collector reading it, the exporter left as it was"
      {
        file = prometheus.services.nixfleet.settings.metrics_textfile or null;
        tmpfiles = prometheus.systemd.tmpfiles.rules;
        inherit (prometheus.services.prometheus.exporters.node) enable enabledCollectors extraFlags;
      }
      {
        file = "/run/nixfleet-metrics/nixfleet.prom";
        tmpfiles = [ "d /run/nixfleet-metrics 0755 root root -" ];
        enable = false;
        enabledCollectors = [ "textfile" ];
        extraFlags = [ "--collector.textfile.directory=/run/nixfleet-metrics" ];
      }
    )
    (expectEqual
      "prometheus.enable: the user's exporter, collectors and flags are kept beside the module's"
      {
        inherit
          ((withMinimal {
            services.nixfleet.prometheus.enable = true;
            services.prometheus.exporters.node = {
              enable = true;
              enabledCollectors = [ "systemd" ];
              extraFlags = [ "--collector.filesystem.mount-points-exclude=^/nix/store" ];
            };
          }).services.prometheus.exporters.node
          )
          enable
          enabledCollectors
          extraFlags
          ;
      }
      {
        enable = true;
        enabledCollectors = [
          "systemd"
          "textfile"
        ];
        extraFlags = [
          "--collector.filesystem.mount-points-exclude=^/nix/store"
          "--collector.textfile.directory=/run/nixfleet-metrics"
        ];
      }
    )
    (expectEqual "prometheus.enable off (the default): no metrics file, no tmpfiles rule, no collector"
      {
        file = base.services.nixfleet.settings.metrics_textfile or null;
        tmpfiles = base.systemd.tmpfiles.rules;
        inherit (base.services.prometheus.exporters.node) enabledCollectors extraFlags;
      }
      {
        file = null;
        tmpfiles = [ ];
        enabledCollectors = [ ];
        extraFlags = [ ];
      }
    )
    (expectEqual "prometheus.enable: settings.metrics_textfile still takes precedence"
      (withMinimal {
        services.nixfleet.prometheus.enable = true;
        services.nixfleet.settings.metrics_textfile = "/srv/metrics/agent.prom";
      }).services.nixfleet.settings.metrics_textfile
      "/srv/metrics/agent.prom"
    )
    (expectEqual "disabled: no unit" (builtins.attrNames disabled.systemd.services) [ ])
    (expectEqual "disabled: no assertions" disabled.assertions [ ])

    (expectAssertion "url with http:// scheme" {
      services.nixfleet.url = "https://fleet.example.com/ws";
    } "must start with ws:// or wss://")
    (expectAssertion "url overridden in settings" {
      services.nixfleet.settings.url = "fleet.example.com";
    } "must start with ws:// or wss://")
    (expectAssertion "hostname with a space" {
      services.nixfleet.hostname = "web 01";
    } "must be non-empty and use only letters")
    (expectAssertion "empty networking.hostName" {
      networking.hostName = "";
    } "must be non-empty and use only letters")
    (expectAssertion "token in settings" {
      services.nixfleet.settings.token = "s3cr3t";
    } "services.nixfleet.settings.token is not allowed")
    (expectAssertion "token_file in settings" {
      services.nixfleet.settings.token_file = "/run/keys/t";
    } "services.nixfleet.settings.token_file is not allowed")
    (expectAssertion "ssh_key in settings" {
      services.nixfleet.settings.ssh_key = "/root/.ssh/id_ed25519";
    } "services.nixfleet.settings.ssh_key is not allowed")
    (expectAssertion "tlsClientCertFile without tlsClientKeyFile" {
      services.nixfleet.tlsClientCertFile = "/run/keys/client.crt";
    } "go together")
    (expectAssertion "tlsClientKeyFile without tlsClientCertFile" {
      services.nixfleet.tlsClientKeyFile = "/run/keys/client.key";
    } "go together")
    (expectAssertion "tls_client_key in settings" {
      services.nixfleet.settings.tls_client_key = "/run/keys/client.key";
    } "services.nixfleet.settings.tls_client_key is not allowed")
    (expectAssertion "repoUrl with a password" {
      services.nixfleet.repoUrl = "https://deploy:s3cr3t@git.example.com/fleet.git";
    } "carries credentials in its user info")
    (expectAssertion "repo_url in settings with a token as user name" {
      services.nixfleet.settings.repo_url = "https://ghp_0123456789abcdef@github.com/org/fleet.git";
    } "carries credentials in its user info")
    (expectAssertion "ssh:// repoUrl with a password" {
      services.nixfleet.repoUrl = "ssh://git:s3cr3t@git.example.com/fleet.git";
    } "carries credentials in its user info")
    (expectEqual "repoUrl naming only an ssh user passes"
      (map
        (
          url:
          failedMessages (withMinimal {
            services.nixfleet.repoUrl = url;
          })
        )
        [
          "git@github.com:org/fleet.git"
          "ssh://git@github.com/org/fleet.git"
          "https://github.com/org/fleet.git"
        ]
      )
      [
        [ ]
        [ ]
        [ ]
      ]
    )

    (expectTypeError "a negative confirmTimeout" {
      services.nixfleet.confirmTimeout = -1;
    } (c: c.services.nixfleet.confirmTimeout))
    (expectTypeError "a confirmTimeout over a day" {
      services.nixfleet.confirmTimeout = 86401;
    } (c: c.services.nixfleet.confirmTimeout))
    (expectTypeError "tokenFile as a Nix path literal (would be copied to the store)" {
      services.nixfleet.tokenFile = ./eval-module.nix;
    } (c: c.services.nixfleet.tokenFile))
    (expectTypeError "tokenFile in the Nix store" {
      services.nixfleet.tokenFile = "${builtins.storeDir}/00000000000000000000000000000000-token";
    } (c: c.services.nixfleet.tokenFile))
    (expectTypeError "relative tokenFile" { services.nixfleet.tokenFile = "secrets/token"; } (
      c: c.services.nixfleet.tokenFile
    ))
    (expectTypeError "sshKeyFile in the Nix store" {
      services.nixfleet.sshKeyFile = "${builtins.storeDir}/00000000000000000000000000000000-id_ed25519";
    } (c: c.services.nixfleet.sshKeyFile))
    (expectTypeError "relative sshKeyFile" { services.nixfleet.sshKeyFile = "id_ed25519"; } (
      c: c.services.nixfleet.sshKeyFile
    ))
    (expectTypeError "repoDir in the Nix store" {
      services.nixfleet.repoDir = "${builtins.storeDir}/00000000000000000000000000000000-repo";
    } (c: c.services.nixfleet.repoDir))
    (expectTypeError "relative repoDir" { services.nixfleet.repoDir = "fleet"; } (
      c: c.services.nixfleet.repoDir
    ))
    (expectTypeError "tlsClientKeyFile in the Nix store" {
      services.nixfleet.tlsClientKeyFile = "${builtins.storeDir}/00000000000000000000000000000000-client.key";
    } (c: c.services.nixfleet.tlsClientKeyFile))
    (expectTypeError "relative allowedSignersFile" {
      services.nixfleet.allowedSignersFile = "allowed_signers";
    } (c: c.services.nixfleet.allowedSignersFile))
    (expectTypeError "relative gpgKeyring" { services.nixfleet.gpgKeyring = "keys"; } (
      c: c.services.nixfleet.gpgKeyring
    ))
    (expectTypeError "interval = 0" { services.nixfleet.interval = 0; } (
      c: c.services.nixfleet.interval
    ))
    (expectTypeError "metrics = \"bogus\"" { services.nixfleet.metrics = "bogus"; } (
      c: c.services.nixfleet.metrics
    ))
    (expectTypeError "watchdogSec = -1" { services.nixfleet.watchdogSec = -1; } (
      c: c.services.nixfleet.watchdogSec
    ))
  ];

  # nix/package.nix with a buildRustPackage that returns its arguments and a
  # lib.fileset.toSource that returns the file set, to list the sources.
  workspaceToml = lib.importTOML ../Cargo.toml;
  agentToml = lib.importTOML ../crates/nixfleet-agent/Cargo.toml;
  package = import ../nix/package.nix {
    lib = stubs.libCompat // {
      fileset = stubs.libCompat.fileset // {
        toSource = args: args;
      };
    };
    rustPlatform.buildRustPackage = args: args;
    inherit (pkgs) rustc gitMinimal;
  };
  # The same with the rustc of an older channel.
  packageWithRustc =
    version:
    pkgs.callPackage ../nix/package.nix {
      rustc = pkgs.rustc // {
        inherit version;
      };
    };
  packageTested =
    let
      f = import ../nix/package.nix;
    in
    f (
      builtins.intersectAttrs (builtins.functionArgs f) {
        lib = stubs.libCompat;
        rustPlatform.buildRustPackage = args: args;
        inherit (pkgs) rustc gitMinimal;
        runTests = true;
      }
    );
  root = toString ../.;
  # The tests of tests/systemd_nspawn.rs that boot a container.
  nspawnTests = lib.concatLists (
    builtins.filter builtins.isList (
      builtins.split "fn (systemd_nspawn_[a-z_]+)\\(" (
        builtins.readFile ../crates/nixfleet-agent/tests/systemd_nspawn.rs
      )
    )
  );
  skipped = map (lib.removePrefix "--skip=") (
    builtins.filter (lib.hasPrefix "--skip=") package.checkFlags
  );
  # lib.hasInfix is a regular expression match, which overflows the stack
  # on text this long; replaceStrings is a plain search.
  containsText = needle: text: builtins.replaceStrings [ needle ] [ "" ] text != text;
  rustSources = lib.concatMapStrings builtins.readFile (
    builtins.filter (lib.hasSuffix ".rs") (lib.filesystem.listFilesRecursive ../crates)
  );
  sourceFiles = map (f: lib.removePrefix "${root}/" (toString f)) (
    stubs.libCompat.fileset.toList package.src.fileset
  );
  hasPrefixIn = prefixes: f: builtins.any (p: lib.hasPrefix p f) prefixes;
  isCargoFile = f: f == "Cargo.toml" || f == "Cargo.lock";
  cargoDirs = [ "crates/" ];

  packageResults = [
    (expectEqual "package: pname from the agent's Cargo.toml" package.pname agentToml.package.name)
    (expectEqual "package: version from the workspace's Cargo.toml" package.version
      workspaceToml.workspace.package.version
    )
    (expectEqual "package: cargoLock.lockFile = ./Cargo.lock" (toString package.cargoLock.lockFile)
      "${root}/Cargo.lock"
    )
    (expectEqual "package: meta.mainProgram" package.meta.mainProgram "nixfleet-agent")
    (expectEqual "package: tests run in the debug profile (test-only hooks)" package.checkType "debug")
    (expectEqual "package: --exact, so that each --skip drops one whole test name"
      (builtins.head package.checkFlags)
      "--exact"
    )
    (expectEqual "package: checkFlags skip every test that boots a systemd-nspawn container"
      (lib.subtractLists skipped nspawnTests)
      [ ]
    )
    (expect "package: there are systemd-nspawn tests to skip" (
      builtins.length nspawnTests >= 4
    ) "found ${builtins.toJSON nspawnTests}")
    (expectEqual
      "package: builds and tests the agent's crate only (no mock dashboard in a host's closure)"
      {
        cargoBuildFlags = package.cargoBuildFlags or null;
        cargoTestFlags = package.cargoTestFlags or null;
      }
      {
        cargoBuildFlags = [
          "-p"
          "nixfleet-agent"
        ];
        cargoTestFlags = [
          "-p"
          "nixfleet-agent"
        ];
      }
    )
    (expectEqual "package: no test suite by default (hosts install it); runTests = true runs it"
      [
        (package.doCheck or true)
        (packageTested.doCheck or true)
      ]
      [
        false
        true
      ]
    )
    (expectEqual "package: no commit or revision among its inputs (one derivation per source)"
      {
        arguments = builtins.filter (
          arg: lib.hasInfix "commit" (lib.toLower arg) || lib.hasInfix "rev" (lib.toLower arg)
        ) (builtins.attrNames (builtins.functionArgs (import ../nix/package.nix)));
        env = package.env or { };
      }
      {
        arguments = [ ];
        env = { };
      }
    )
    (expectEqual "package: every --skip names a test of the workspace" (builtins.filter (
      name: !containsText "fn ${name}" rustSources
    ) skipped) [ ])
    (expect "package: refuses a rustc older than rust-version with a readable message"
      (
        !(builtins.tryEval (packageWithRustc "1.86.0").outPath).success
        && (builtins.tryEval (packageWithRustc workspaceToml.workspace.package.rust-version).outPath)
          .success
      )
      "expected rustc 1.86.0 to be refused and rustc ${workspaceToml.workspace.package.rust-version} to be accepted"
    )
    (expectEqual "package: source root is the repository" (toString package.src.root) root)
    (expectEqual "package: source holds Cargo.toml, Cargo.lock and crates/ only" (builtins.filter (
      f: !(isCargoFile f || hasPrefixIn cargoDirs f)
    ) sourceFiles) [ ])
    (expectEqual "package: source has both programs of the workspace" (lib.subtractLists sourceFiles [
      "Cargo.toml"
      "Cargo.lock"
      "crates/nixfleet-agent/Cargo.toml"
      "crates/nixfleet-agent/src/main.rs"
      "crates/nixfleet-mock-dashboard/Cargo.toml"
      "crates/nixfleet-mock-dashboard/src/main.rs"
    ]) [ ])
  ];
in
{
  results = moduleResults ++ packageResults;
}
