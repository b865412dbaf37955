# Stand-ins for Nixpkgs and for the NixOS options that the flake, the module
# and the VM tests use, so that nixpkgs' `lib` alone can evaluate them (no
# Nix store, no Nixpkgs). Used by nix/eval-module.nix and nix/eval-flake.nix.
{ lib }:
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

  pkgsFor =
    system:
    lib.fix (self: {
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
        buildRustPackage = args: fakeDerivation (args // { name = "${args.pname}-${args.version}"; });
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
      git = fakePackage "git-2.51.0" "git";
      nixfmt = fakePackage "nixfmt-1.1.0" "nixfmt";
      openssh = fakePackage "openssh-10.0p2" "ssh";
      rust-analyzer = fakePackage "rust-analyzer-2025-10-06" "rust-analyzer";
      rustc = fakePackage "rustc-1.91.1" "rustc";
      rustfmt = fakePackage "rustfmt-1.91.1" "rustfmt";
    });

  unitValue = types.oneOf [
    types.bool
    types.int
    types.str
  ];

  listOption = mkOption {
    type = types.listOf types.str;
    default = [ ];
  };

  # Stand-in declarations of the NixOS options the module reads or sets.
  nixos =
    { ... }:
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
        nix.package = mkOption {
          type = types.package;
          default = fakePackage "nix-2.31.2" "nix";
        };
        system.build = mkOption {
          type = types.lazyAttrsOf types.unspecified;
          default = { };
        };
        systemd.package = mkOption {
          type = types.package;
          default = fakePackage "systemd-258.2" "systemctl";
        };
        systemd.services = mkOption {
          default = { };
          type = types.attrsOf (
            types.submodule {
              freeformType = types.attrsOf types.anything;
              options = {
                description = mkOption {
                  type = types.str;
                  default = "";
                };
                wantedBy = listOption;
                wants = listOption;
                after = listOption;
                path = mkOption {
                  type = types.listOf (types.either types.package types.str);
                  default = [ ];
                };
                restartIfChanged = mkOption {
                  type = types.bool;
                  default = true;
                };
                stopIfChanged = mkOption {
                  type = types.bool;
                  default = true;
                };
                serviceConfig = mkOption {
                  type = types.attrsOf (types.either unitValue (types.listOf unitValue));
                  default = { };
                };
              };
            }
          );
        };
      };
      config = {
        _module.args.pkgs = pkgsFor "x86_64-linux";
        system.build.nixos-rebuild = fakePackage "nixos-rebuild-ng-25.11" "nixos-rebuild";
      };
    };
in
{
  inherit
    libCompat
    fakeStorePath
    fakePackage
    pkgsFor
    nixos
    ;

  # The NixOS configuration of `modules` on top of the stand-ins.
  evalNixos =
    modules:
    (lib.evalModules {
      modules = [ nixos ] ++ modules;
    }).config;
}
