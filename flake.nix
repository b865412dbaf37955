{
  description = "NixFleet agent: keeps NixOS hosts connected to a NixFleet dashboard";

  # The only input. flake.lock pins it by hand (see nix/check.sh).
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      forAllSystems =
        f:
        lib.genAttrs [
          "x86_64-linux"
          "aarch64-linux"
        ] (system: f nixpkgs.legacyPackages.${system});

      # One derivation per source and Nixpkgs: nothing of this flake's own
      # revision goes into the packages (see nix/package.nix).
      buildAgent = pkgs: pkgs.callPackage ./nix/package.nix { };
      buildMockDashboard = pkgs: pkgs.callPackage ./nix/mock-dashboard.nix { };

      # Reported by the agent as `source_commit` (v3 dashboards compare it
      # before and after a switch). A run-time setting, not a build input:
      # a commit that only changes docs leaves the agent's store path alone.
      sourceCommit = self.rev or self.dirtyRev or null;

      mkApp = drv: {
        type = "app";
        program = lib.getExe drv;
        meta.description = drv.meta.description;
      };
    in
    {
      packages = forAllSystems (
        pkgs:
        let
          nixfleet-agent = buildAgent pkgs;
        in
        {
          inherit nixfleet-agent;
          default = nixfleet-agent;
          nixfleet-mock-dashboard = buildMockDashboard pkgs;
        }
      );

      apps = forAllSystems (pkgs: {
        default = mkApp self.packages.${pkgs.stdenv.hostPlatform.system}.nixfleet-agent;
        mock-dashboard = mkApp self.packages.${pkgs.stdenv.hostPlatform.system}.nixfleet-mock-dashboard;
      });

      overlays.default = final: _prev: {
        nixfleet-agent = buildAgent final;
        nixfleet-mock-dashboard = buildMockDashboard final;
      };

      # The module proper lives in modules/nixfleet.nix and, like a Nixpkgs
      # module, defaults its package to `pkgs.nixfleet-agent`. Through the
      # flake it needs no overlay: the package is built with the host's own
      # Nixpkgs (`callPackage`), so it shares that system's toolchain, when
      # that Nixpkgs' rustc is new enough for the crate (nixos-25.11 and
      # later). On an older channel it is the flake's own package, built
      # with the pinned nixos-25.11. Either way it is the package without
      # its test suite: hosts install it, CI tests it (checks.package).
      nixosModules = {
        nixfleet =
          { lib, pkgs, ... }:
          let
            inherit (pkgs.stdenv.hostPlatform) system;
            rustVersion = (lib.importTOML ./Cargo.toml).workspace.package.rust-version;
          in
          {
            # Importing both nixosModules.default and nixosModules.nixfleet
            # (the same module) must not define the package twice: the
            # module system keeps one module per key.
            key = "${toString ./flake.nix}#nixosModules.nixfleet";
            _file = "${toString ./flake.nix}#nixosModules.nixfleet";
            imports = [ ./modules/nixfleet.nix ];
            services.nixfleet = {
              package = lib.mkDefault (
                if lib.versionAtLeast pkgs.rustc.version rustVersion then
                  buildAgent pkgs
                else
                  self.packages.${system}.nixfleet-agent
                    or (throw "services.nixfleet: this host's Nixpkgs has rustc ${pkgs.rustc.version}, older than the ${rustVersion} the agent needs, and the flake has no package for ${system}; set services.nixfleet.package")
              );
              # A flake without a revision (a `path:` input, an unlocked
              # checkout) has no commit to report; the agent then reports
              # the one it was built from, if any.
              settings = lib.optionalAttrs (sourceCommit != null) {
                source_commit = lib.mkDefault sourceCommit;
              };
            };
          };
        default = self.nixosModules.nixfleet;
      };

      checks = forAllSystems (
        pkgs:
        let
          testArgs = { inherit pkgs self; };
        in
        {
          # The packages with their test suites (hosts install them
          # without: nix/package.nix).
          package = pkgs.callPackage ./nix/package.nix { runTests = true; };
          mock-dashboard = pkgs.callPackage ./nix/mock-dashboard.nix { runTests = true; };

          formatting =
            pkgs.runCommand "nixfleet-nixfmt-check"
              {
                nativeBuildInputs = [ pkgs.nixfmt ];
                src = lib.fileset.toSource {
                  root = ./.;
                  fileset = lib.fileset.fileFilter (file: file.hasExt "nix") ./.;
                };
              }
              ''
                cd "$src"
                find . -name '*.nix' -print0 | xargs -0 nixfmt --check
                touch "$out"
              '';
        }
        // lib.optionalAttrs pkgs.stdenv.hostPlatform.isLinux {
          vm-service = import ./nixos-tests/service.nix testArgs;
          vm-rebuild = import ./nixos-tests/rebuild.nix testArgs;
        }
      );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            pkgs.cargo
            pkgs.rustc
            pkgs.clippy
            pkgs.rustfmt
            pkgs.rust-analyzer
            pkgs.nixfmt
            pkgs.deadnix
          ];
          env.RUST_SRC_PATH = "${pkgs.rustPlatform.rustLibSrc}";
        };
      });

      # `nix fmt` with no arguments formats every Nix file of the tree
      # (treefmt running nixfmt); `pkgs.nixfmt` alone would need the files
      # named.
      formatter = forAllSystems (pkgs: pkgs.nixfmt-tree);
    };
}
