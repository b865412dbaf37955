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
#
# `rebuildRepo` is a directory laid out as the rebuild VM test's
# configuration repository (nixos-tests/rebuild/: flake.nix,
# configuration.nix, common.nix, and a hardware-configuration.nix that the
# VM would generate), plus `modules/testing/test-instrumentation.nix`
# standing in for NixOS's; check.sh makes it. With it, the repository's
# flake is evaluated as the VM evaluates it, against this flake without a
# revision, as its `path:` input is.
{
  lib,
  nixosLib,
  rebuildRepo ? null,
}:
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

  # This flake as Nix gives it to itself: `extra` holds what its source
  # adds (a git checkout's `rev`, `dirtyRev`; a `path:` flake has neither).
  selfWith =
    extra:
    let
      this =
        flake.outputs {
          self = this;
          inherit nixpkgs;
        }
        // {
          outPath = toString ../.;
          inputs = { inherit nixpkgs; };
        }
        // extra;
    in
    this;
  rev = "0123456789abcdef0123456789abcdef01234567";
  # As `nix flake check` on a clean checkout sees it.
  self = selfWith { inherit rev; };
  # As a `path:` input, or an unlocked tree, sees it.
  selfWithoutRev = selfWith { };
  otherRev = selfWith { rev = "89abcdef0123456789abcdef0123456789abcdef"; };
  dirty = selfWith { dirtyRev = "${rev}-dirty"; };

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
  mock = packages.nixfleet-mock-dashboard;
  checks = self.checks.${x86};
  # The stand-in builds' store paths change with every argument (nix/stubs.nix).
  agentPath = flakeSelf: flakeSelf.packages.${x86}.nixfleet-agent.outPath;
  # A package's arguments, comparable with `==`: the source as its store
  # path (two evaluations of lib.fileset.toSource are equal only as text).
  argsOf = drv: drv.args // { src = toString drv.args.src; };

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

  moduleWith =
    flakeSelf:
    stubs.evalNixos [
      flakeSelf.nixosModules.default
      minimalHost
    ];
  unitText = config: config.systemd.units."nixfleet.service".text;

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
  vmNodes = lib.mapAttrs (_: check: check.args.test.nodes) vmTests;
  mockExe = "${mock.outPath}/bin/nixfleet-mock-dashboard";

  # The rebuild VM test: its host's first generation, from this flake ...
  rebuildFirst = stubs.evalNixos [ vmNodes.vm-rebuild.host ];
  # ... and the generation the switch builds, from the configuration
  # repository's flake, whose nixfleet input is this flake without a revision.
  repoFlake = import "${rebuildRepo}/flake.nix";
  rebuildSecond =
    (repoFlake.outputs {
      nixpkgs = nixpkgs // {
        lib = nixpkgs.lib // {
          nixosSystem =
            { modules, ... }:
            {
              config = stubs.evalNixosWith {
                modulesPath = "${rebuildRepo}/modules";
              } modules;
            };
        };
      };
      nixfleet = selfWithoutRev;
    }).nixosConfigurations.host.config;
  rebuildResults = lib.optionals (rebuildRepo != null) [
    (expectEqual "vm-rebuild: the repository flake takes nixpkgs and this flake as path: inputs"
      repoFlake.inputs
      {
        nixpkgs.url = "path:@nixpkgs@";
        nixfleet.url = "path:@nixfleet@";
        nixfleet.inputs.nixpkgs.follows = "nixpkgs";
      }
    )
    (expectEqual "vm-rebuild: the switch builds the same agent package (nothing to compile in the VM)"
      rebuildSecond.services.nixfleet.package.outPath
      rebuildFirst.services.nixfleet.package.outPath
    )
    (expectEqual "vm-rebuild: the switch renders the same agent unit (the agent lives on)"
      (unitText rebuildSecond)
      (unitText rebuildFirst)
    )
    (expectEqual "vm-rebuild: the new generation is another system (the /etc file changes)"
      (map (config: config.environment.etc."nixfleet-test-generation".text) [
        rebuildFirst
        rebuildSecond
      ])
      [
        "1\n"
        "2\n"
      ]
    )
    (expectEqual "vm-rebuild: the VM's memory and disk are set for the switch"
      (lib.mapAttrs (_: builtins.isInt) {
        memorySize = vmNodes.vm-rebuild.host.virtualisation.memorySize or null;
        diskSize = vmNodes.vm-rebuild.host.virtualisation.diskSize or null;
      })
      {
        memorySize = true;
        diskSize = true;
      }
    )
  ];
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
    (expect "flake: the mock dashboard is a package of its own" (
      mock.outPath != agent.outPath
      &&
        mock.args.cargoBuildFlags or null == [
          "-p"
          "nixfleet-mock-dashboard"
        ]
    ) "mock ${mock.outPath}, agent ${agent.outPath}")
    (expectEqual "flake: the mock dashboard shares the agent's source and vendored dependencies"
      {
        inherit (argsOf mock) src cargoLock;
      }
      {
        inherit (argsOf agent) src cargoLock;
      }
    )
    (expectEqual "flake: one agent derivation per source: the flake's revision is not a build input"
      (map agentPath [
        otherRev
        selfWithoutRev
        dirty
      ])
      [
        agent.outPath
        agent.outPath
        agent.outPath
      ]
    )
    (expectEqual "flake: the module reports the flake's revision as the setting source_commit"
      (map (flakeSelf: (moduleWith flakeSelf).services.nixfleet.settings.source_commit or null) [
        self
        dirty
        selfWithoutRev
      ])
      [
        rev
        "${rev}-dirty"
        null
      ]
    )
    (expectEqual "flake: a new revision changes the host's settings file, not its agent package"
      (map (flakeSelf: (moduleWith flakeSelf).services.nixfleet.package.outPath) [
        self
        otherRev
      ])
      [
        agent.outPath
        agent.outPath
      ]
    )
    (expect "flake: the host's unit and package do not carry the mock dashboard" (
      !(lib.hasInfix mock.outPath (unitText moduleConfig))
      && agent.args ? cargoBuildFlags
      && !(lib.hasInfix "mock" (builtins.toJSON agent.args.cargoBuildFlags))
    ) "unit: ${unitText moduleConfig}")
    (expectEqual "flake: the VM tests run the mock dashboard's own package"
      {
        vm-service = lib.hasInfix mockExe vmNodes.vm-service.dashboard.systemd.services.nixfleet-mock-dashboard.serviceConfig.ExecStart;
        vm-rebuild = lib.hasInfix mockExe checks.vm-rebuild.args.test.testScript;
      }
      {
        vm-service = true;
        vm-rebuild = true;
      }
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
        program = mockExe;
        meta.description = mock.meta.description;
      };
    })
    (expectEqual "flake: overlays.default adds both packages"
      (names (self.overlays.default nixpkgs.legacyPackages.${x86} { }))
      [
        "nixfleet-agent"
        "nixfleet-mock-dashboard"
      ]
    )
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
      "mock-dashboard"
      "package"
      "vm-rebuild"
      "vm-service"
    ])
    (expectEqual "flake: checks.package is the package with its test suite"
      {
        doCheck = checks.package.args.doCheck or true;
        rest = removeAttrs (argsOf checks.package) [ "doCheck" ];
      }
      {
        doCheck = true;
        rest = removeAttrs (argsOf agent) [ "doCheck" ];
      }
    )
    (expectEqual "flake: the packages hosts install run no test suite"
      (map (p: p.args.doCheck or true) [
        agent
        mock
        (moduleWith self).services.nixfleet.package
      ])
      [
        false
        false
        false
      ]
    )
    (expectEqual "flake: checks.mock-dashboard is the mock with its test suite" (
      removeAttrs (argsOf (checks.mock-dashboard or mock)) [ "doCheck" ]
      // {
        doCheck = checks.mock-dashboard.args.doCheck or null;
      }
    ) (removeAttrs (argsOf mock) [ "doCheck" ] // { doCheck = true; }))
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
  ]
  ++ rebuildResults;

  testScripts = lib.mapAttrs (_: check: {
    nodes = names check.args.test.nodes;
    script = check.args.test.testScript;
  }) vmTests;
}
