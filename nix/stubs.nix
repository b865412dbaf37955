# Stand-ins for Nixpkgs and for the NixOS options that the flake, the module
# and the VM tests use, so that nixpkgs' `lib` alone can evaluate them (no
# Nix store, no Nixpkgs). Used by nix/eval-module.nix, nix/eval-flake.nix
# and nix/render-unit.nix.
#
# `systemd.services` is NOT a stand-in: it is declared with NixOS's own
# types from `nixosLib` (nixpkgs' nixos/lib: systemd-unit-options.nix,
# systemd-types.nix, systemd-lib.nix, utils.nix), and `systemd.units` is
# filled from it with systemd-lib's serviceToUnit, as nixpkgs'
# nixos/modules/system/boot/systemd.nix does. So a misspelt or mistyped
# service attribute, or an invalid Type=/Restart=, fails the evaluation,
# and the unit text is the one NixOS would write.
{ lib, nixosLib }:
let
  inherit (lib) mkOption types;

  # lib.fileset needs builtins.readFileType (Nix 2.14). On older Nix (Debian's
  # 2.8) give lib the readDir-based lib.filesystem.pathType it used to have.
  libCompat =
    if builtins ? readFileType then
      lib
    else
      lib.extend (
        _final: prev: {
          filesystem = prev.filesystem // {
            pathType =
              path:
              if toString path == "/" then "directory" else (builtins.readDir (dirOf path)).${baseNameOf path};
          };
        }
      );

  fakeStorePath = name: "${builtins.storeDir}/00000000000000000000000000000000-${name}";

  fakePackage =
    name: mainProgram:
    {
      type = "derivation";
      inherit name;
      outPath = fakeStorePath name;
    }
    // lib.optionalAttrs (mainProgram != null) { meta.mainProgram = mainProgram; };

  # A derivation-like result that keeps its arguments, with overrideAttrs.
  fakeDerivation =
    args:
    fakePackage args.name null
    // {
      inherit args;
      meta = args.meta or { };
      overrideAttrs = f: fakeDerivation (args // f args);
    };

  # A package build whose store path, like a real one, changes with any of
  # its arguments: two calls give the same outPath exactly when they would
  # give the same derivation. (Only for arguments that are plain data.)
  fakeBuild =
    args:
    let
      hash = builtins.substring 0 32 (
        builtins.hashString "sha256" (builtins.unsafeDiscardStringContext (builtins.toJSON args))
      );
    in
    fakeDerivation args
    // {
      outPath = "${builtins.storeDir}/${hash}-${args.name}";
      overrideAttrs = f: fakeBuild (args // f args);
    };

  # Nixpkgs for `system`; `overrides` replace packages (callPackage sees them).
  pkgsWith =
    system: overrides:
    lib.fix (
      self:
      {
        lib = libCompat;
        stdenv.hostPlatform = {
          inherit system;
          isLinux = lib.hasSuffix "-linux" system;
        };

        callPackage =
          fn: args:
          let
            f = if builtins.isFunction fn then fn else import fn;
          in
          f (builtins.intersectAttrs (builtins.functionArgs f) self // args);

        rustPlatform = {
          buildRustPackage = args: fakeBuild (args // { name = "${args.pname}-${args.version}"; });
          rustLibSrc = fakeStorePath "rust-lib-src";
        };
        runCommand =
          name: env: buildCommand:
          fakeDerivation (env // { inherit name buildCommand; });
        mkShell = args: fakeDerivation (args // { name = "nix-shell"; });
        writeText = name: _text: fakeStorePath name;
        testers.runNixOSTest =
          test:
          fakeDerivation {
            name = "vm-test-run-${test.name}";
            inherit test;
          };

        formats.toml =
          { }:
          {
            # Same shape as the TOML value type of nixpkgs' pkgs/pkgs-lib/formats.nix.
            type =
              let
                value =
                  types.oneOf [
                    types.bool
                    types.int
                    types.float
                    types.str
                    types.path
                    (types.attrsOf value)
                    (types.listOf value)
                  ]
                  // {
                    description = "TOML value";
                  };
              in
              value;
            # The real generator serialises through JSON; so does this one.
            generate = name: value: builtins.seq (builtins.toJSON value) (fakeStorePath name);
          };

        # What the overlay adds; the module's default package.
        nixfleet-agent = fakePackage "nixfleet-agent-0.1.0" "nixfleet-agent";

        cargo = fakePackage "cargo-1.91.1" "cargo";
        clippy = fakePackage "clippy-1.91.1" "cargo-clippy";
        deadnix = fakePackage "deadnix-1.3.1" "deadnix";
        coreutils = fakePackage "coreutils-9.8" "coreutils";
        findutils = fakePackage "findutils-4.10.0" "find";
        git = fakePackage "git-2.51.0" "git";
        gnugrep = fakePackage "gnugrep-3.12" "grep";
        gnused = fakePackage "gnused-4.9" "sed";
        gitMinimal = fakePackage "git-minimal-2.51.0" "git";
        nixfmt = fakePackage "nixfmt-1.1.0" "nixfmt";
        nixfmt-tree = fakePackage "nixfmt-tree" "treefmt";
        openssh = fakePackage "openssh-10.0p2" "ssh";
        rust-analyzer = fakePackage "rust-analyzer-2025-10-06" "rust-analyzer";
        rustc = fakePackage "rustc-1.91.1" "rustc" // {
          version = "1.91.1";
        };
        rustfmt = fakePackage "rustfmt-1.91.1" "rustfmt";
      }
      // overrides
    );

  pkgsFor = system: pkgsWith system { };

  evalNixosWith =
    specialArgs: modules:
    (lib.evalModules {
      inherit specialArgs;
      modules = [ nixos ] ++ modules;
    }).config;

  listOption = mkOption {
    type = types.listOf types.str;
    default = [ ];
  };

  # Stand-in declarations of the NixOS options the module reads or sets,
  # and the real ones of systemd services.
  nixos =
    {
      config,
      pkgs,
      utils,
      ...
    }:
    {
      options = {
        assertions = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
        warnings = listOption;
        networking.hostName = mkOption {
          type = types.str;
          default = "nixos";
        };
        # As nixos/modules/config/networking.nix declares them; envVars is
        # computed from the others in `config` below, as there.
        networking.proxy =
          lib.genAttrs [ "default" "noProxy" ] (
            _:
            mkOption {
              type = types.nullOr types.str;
              default = null;
            }
          )
          // lib.genAttrs [ "httpProxy" "httpsProxy" "ftpProxy" "rsyncProxy" ] (
            _:
            mkOption {
              type = types.nullOr types.str;
              default = config.networking.proxy.default;
            }
          )
          // {
            envVars = mkOption {
              type = types.attrs;
              internal = true;
              default = { };
            };
          };
        nix.package = mkOption {
          type = types.package;
          default = fakePackage "nix-2.31.2" "nix";
        };
        # Internal in NixOS too; set by the modules that need Nix variables.
        nix.envVars = mkOption {
          type = types.attrs;
          internal = true;
          default = { };
        };
        # Options the VM tests' configurations set, not read here.
        nix.settings = mkOption {
          type = types.attrsOf types.anything;
          default = { };
        };
        documentation.enable = mkOption {
          type = types.bool;
          default = true;
        };
        environment.systemPackages = mkOption {
          type = types.listOf types.package;
          default = [ ];
        };
        environment.etc = mkOption {
          type = types.attrsOf types.anything;
          default = { };
        };
        virtualisation = mkOption {
          type = types.attrsOf types.anything;
          default = { };
        };
        boot.loader.grub.enable = mkOption {
          type = types.bool;
          default = true;
        };
        system.includeBuildDependencies = mkOption {
          type = types.bool;
          default = false;
        };
        system.switch.enable = mkOption {
          type = types.bool;
          default = false;
        };
        system.extraDependencies = mkOption {
          type = types.listOf types.anything;
          default = [ ];
        };
        programs.ssh.package = mkOption {
          type = types.package;
          default = pkgs.openssh;
        };
        system.build = mkOption {
          type = types.lazyAttrsOf types.unspecified;
          default = { };
        };
        systemd.package = mkOption {
          type = types.package;
          default = fakePackage "systemd-258.2" "systemctl";
        };
        # What systemd-lib.nix reads besides the services.
        systemd.globalEnvironment = mkOption {
          type = types.attrsOf (
            types.nullOr (
              types.oneOf [
                types.str
                types.path
                types.package
              ]
            )
          );
          default = { };
        };
        systemd.enableStrictShellChecks = lib.mkEnableOption "shellcheck on unit scripts";
        # As nixos/modules/system/boot/systemd/tmpfiles.nix declares it.
        systemd.tmpfiles.rules = listOption;
        # The three options of nixpkgs' node exporter module
        # (nixos/modules/services/monitoring/prometheus/exporters{,/node}.nix)
        # that the module touches, with their types and defaults there.
        services.prometheus.exporters.node = {
          enable = lib.mkEnableOption "the prometheus node exporter";
          enabledCollectors = listOption;
          extraFlags = listOption;
        };
        # As in nixos/modules/system/boot/systemd.nix.
        systemd.services = mkOption {
          type = utils.systemdUtils.types.services;
          default = { };
        };
        systemd.units = mkOption {
          type = utils.systemdUtils.types.units;
          default = { };
        };
      };
      config = {
        # As nixos/modules/misc/extra-arguments.nix provides it.
        _module.args = {
          pkgs = pkgsFor "x86_64-linux";
          utils = import (nixosLib + "/utils.nix") { inherit lib config pkgs; };
        };
        system.build.nixos-rebuild = fakePackage "nixos-rebuild-ng-25.11" "nixos-rebuild";
        networking.proxy.envVars =
          let
            proxy = config.networking.proxy;
            set = name: value: lib.optionalAttrs (value != null) { ${name} = value; };
          in
          lib.optionalAttrs (proxy.default != null) { no_proxy = "127.0.0.1,localhost"; }
          // set "http_proxy" proxy.httpProxy
          // set "https_proxy" proxy.httpsProxy
          // set "rsync_proxy" proxy.rsyncProxy
          // set "ftp_proxy" proxy.ftpProxy
          // set "no_proxy" proxy.noProxy;
        systemd.units = lib.mapAttrs' (
          _: service: lib.nameValuePair service.name (utils.systemdUtils.lib.serviceToUnit service)
        ) config.systemd.services;
      };
    };
in
{
  inherit
    libCompat
    fakeStorePath
    fakePackage
    pkgsFor
    pkgsWith
    nixos
    ;

  # The NixOS configuration of `modules` on top of the stand-ins.
  evalNixos = evalNixosWith { };
  # The same with module arguments that NixOS passes as specialArgs
  # (`modulesPath`).
  inherit evalNixosWith;
}
