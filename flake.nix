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

      # Reported by the agent as `source_commit` (v3 dashboards compare it
      # before and after a switch).
      sourceCommit = self.rev or self.dirtyRev or "";
      buildAgent = pkgs: pkgs.callPackage ./nix/package.nix { inherit sourceCommit; };

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
          # The same store path; only `nix run` picks the other binary.
          nixfleet-mock-dashboard = lib.addMetaAttrs {
            mainProgram = "nixfleet-mock-dashboard";
          } nixfleet-agent;
        }
      );

      apps = forAllSystems (pkgs: {
        default = mkApp self.packages.${pkgs.stdenv.hostPlatform.system}.nixfleet-agent;
        mock-dashboard = mkApp self.packages.${pkgs.stdenv.hostPlatform.system}.nixfleet-mock-dashboard;
      });

      overlays.default = final: _prev: {
        nixfleet-agent = buildAgent final;
      };

      # The module proper lives in modules/nixfleet.nix and, like a Nixpkgs
      # module, defaults its package to `pkgs.nixfleet-agent`. Through the
      # flake it needs no overlay: the package is built with the host's own
      # Nixpkgs (`callPackage`), so it shares that system's toolchain, when
      # that Nixpkgs' rustc is new enough for the crate (nixos-25.11 and
      # later). On an older channel it is the flake's own package, built
      # with the pinned nixos-25.11.
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
            services.nixfleet.package = lib.mkDefault (
              if lib.versionAtLeast pkgs.rustc.version rustVersion then
                buildAgent pkgs
              else
                self.packages.${system}.nixfleet-agent
                  or (throw "services.nixfleet: this host's Nixpkgs has rustc ${pkgs.rustc.version}, older than the ${rustVersion} the agent needs, and the flake has no package for ${system}; set services.nixfleet.package")
            );
          };
        default = self.nixosModules.nixfleet;
      };

      checks = forAllSystems (
        pkgs:
        let
          testArgs = { inherit pkgs self; };
        in
        {
          package = self.packages.${pkgs.stdenv.hostPlatform.system}.nixfleet-agent;

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
