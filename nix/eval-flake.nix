# Evaluates flake.nix's outputs with nixpkgs' `lib` alone: the nixpkgs input
# is a stand-in (nix/stubs.nix) whose packages only record their arguments.
# Run by nix/check.sh:
#
#   nix-instantiate --readonly-mode --eval --strict --json nix/eval-flake.nix \
#     --arg lib 'import /path/to/nixpkgs/lib' --arg nixosLib /path/to/nixpkgs/nixos/lib
#
# The result is { results = [ { name; ok; detail; } … ]; testScripts = …; }:
# one entry per expectation, and the Python test scripts of the VM tests
# (keyed by check name, with their node names) for check.sh to lint.
{ lib, nixosLib }:
let
  stubs = import ./stubs.nix { inherit lib nixosLib; };

  systems = [
    "aarch64-linux"
    "x86_64-linux"
  ];

  nixpkgs = {
    lib = stubs.libCompat;
    legacyPackages = lib.genAttrs systems stubs.pkgsFor;
    outPath = stubs.fakeStorePath "source";
  };

  flake = import ../flake.nix;

  self =
    flake.outputs {
      inherit self nixpkgs;
    }
    // {
      outPath = toString ../.;
      inputs = { inherit nixpkgs; };
    };

  expect = name: ok: detail: { inherit name ok detail; };
  expectEqual =
    name: actual: expected:
    expect name (
      actual == expected
    ) "expected ${builtins.toJSON expected}, got ${builtins.toJSON actual}";

  names = builtins.attrNames;
  x86 = "x86_64-linux";
  packages = self.packages.${x86};
  agent = packages.nixfleet-agent;
  checks = self.checks.${x86};

  # The flake's module on the stand-in NixOS, with a minimal configuration.
  moduleConfig = stubs.evalNixos [
    self.nixosModules.default
    {
      services.nixfleet = {
        enable = true;
        url = "wss://fleet.example.com/ws";
        tokenFile = "/run/keys/nixfleet-token";
      };
    }
  ];

  minimalHost = {
    services.nixfleet = {
      enable = true;
      url = "wss://fleet.example.com/ws";
      tokenFile = "/run/keys/nixfleet-token";
    };
  };

  # Both names of the module imported at once, as a configuration that
  # merges two people's imports may do.
  bothModules = builtins.tryEval (
    (stubs.evalNixos [
      self.nixosModules.default
      self.nixosModules.nixfleet
      minimalHost
    ]).systemd.services.nixfleet.serviceConfig.ExecStart
  );

  # A host on an older channel: its rustc is older than rust-version, so
  # building the agent with its Nixpkgs would fail (nix/package.nix asserts).
  oldChannelHost = builtins.tryEval (
    (stubs.evalNixos [
      self.nixosModules.default
      minimalHost
      {
        _module.args.pkgs = lib.mkForce (
          stubs.pkgsWith x86 {
            rustc = stubs.fakePackage "rustc-1.86.0" "rustc" // {
              version = "1.86.0";
            };
          }
        );
      }
    ]).systemd.services.nixfleet.serviceConfig.ExecStart
  );

  vmTests = lib.filterAttrs (name: _: lib.hasPrefix "vm-" name) checks;
in
{
  results = [
    (expectEqual "flake: the only input is nixpkgs" (names flake.inputs) [ "nixpkgs" ])
    (expectEqual "flake: nixpkgs follows nixos-25.11" flake.inputs.nixpkgs.url
      "github:NixOS/nixpkgs/nixos-25.11"
    )
    (expectEqual "flake: per-system outputs for aarch64-linux and x86_64-linux" (map
      (output: names self.${output})
      [
        "apps"
        "checks"
        "devShells"
        "formatter"
        "packages"
      ]
    ) (builtins.genList (_: systems) 5))
    (expectEqual "flake: packages" (names packages) [
      "default"
      "nixfleet-agent"
      "nixfleet-mock-dashboard"
    ])
    (expectEqual "flake: packages.default is the agent" packages.default.outPath agent.outPath)
    (expectEqual "flake: the mock dashboard is the same build" packages.nixfleet-mock-dashboard.outPath
      agent.outPath
    )
    (expectEqual "flake: mainPrograms"
      (map (p: p.meta.mainProgram) [
        agent
        packages.nixfleet-mock-dashboard
      ])
      [
        "nixfleet-agent"
        "nixfleet-mock-dashboard"
      ]
    )
    (expectEqual "flake: the package builds nix/package.nix" agent.name "nixfleet-agent-0.1.0")
    (expectEqual "flake: apps run the agent and the mock dashboard" self.apps.${x86} {
      default = {
        type = "app";
        program = "${agent.outPath}/bin/nixfleet-agent";
        meta.description = agent.meta.description;
      };
      mock-dashboard = {
        type = "app";
        program = "${agent.outPath}/bin/nixfleet-mock-dashboard";
        meta.description = agent.meta.description;
      };
    })
    (expectEqual "flake: overlays.default adds nixfleet-agent" (names (
      self.overlays.default nixpkgs.legacyPackages.${x86} { }
    )) [ "nixfleet-agent" ])
    (expectEqual "flake: nixosModules" (names self.nixosModules) [
      "default"
      "nixfleet"
    ])
    (expectEqual "flake: the module's package is the flake's package built with the host's pkgs"
      moduleConfig.systemd.services.nixfleet.serviceConfig.ExecStart
      "${agent.outPath}/bin/nixfleet-agent --config ${stubs.fakeStorePath "nixfleet.toml"}"
    )
    (expectEqual "flake: importing nixosModules.default and nixosModules.nixfleet together is harmless"
      bothModules
      {
        success = true;
        value = moduleConfig.systemd.services.nixfleet.serviceConfig.ExecStart;
      }
    )
    (expectEqual "flake: on a channel with an older rustc the module uses the flake's own package"
      oldChannelHost
      {
        success = true;
        value = "${agent.outPath}/bin/nixfleet-agent --config ${stubs.fakeStorePath "nixfleet.toml"}";
      }
    )
    (expectEqual "flake: checks" (names checks) [
      "formatting"
      "package"
      "vm-rebuild"
      "vm-service"
    ])
    (expectEqual "flake: checks.package is the package" checks.package.outPath agent.outPath)
    (expectEqual "flake: the formatting check runs nixfmt --check"
      {
        inherit (checks.formatting.args) nativeBuildInputs;
        runsCheck = lib.hasInfix "nixfmt --check" checks.formatting.args.buildCommand;
      }
      {
        nativeBuildInputs = [ nixpkgs.legacyPackages.${x86}.nixfmt ];
        runsCheck = true;
      }
    )
    (expectEqual "flake: VM tests and their nodes"
      (lib.mapAttrs (_: check: names check.args.test.nodes) vmTests)
      {
        vm-rebuild = [ "host" ];
        vm-service = [
          "dashboard"
          "host"
        ];
      }
    )
    (expectEqual "flake: devShell tools" (map (p: p.name) self.devShells.${x86}.default.args.packages) (
      map (name: nixpkgs.legacyPackages.${x86}.${name}.name) [
        "cargo"
        "rustc"
        "clippy"
        "rustfmt"
        "rust-analyzer"
        "nixfmt"
        "deadnix"
      ]
    ))
    (expectEqual "flake: formatter is nixfmt-tree (nix fmt formats the whole tree)"
      self.formatter.${x86}
      nixpkgs.legacyPackages.${x86}.nixfmt-tree
    )
  ];

  testScripts = lib.mapAttrs (_: check: {
    nodes = names check.args.test.nodes;
    script = check.args.test.testScript;
  }) vmTests;
}
