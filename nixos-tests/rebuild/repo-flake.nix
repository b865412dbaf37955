# flake.nix of the configuration repository in the rebuild VM test. The test
# substitutes the store paths of its own Nixpkgs and of this NixFleet source,
# which are in the VM's store: the rebuild needs no network.
{
  inputs = {
    nixpkgs.url = "path:@nixpkgs@";
    nixfleet.url = "path:@nixfleet@";
    nixfleet.inputs.nixpkgs.follows = "nixpkgs";
  };

  outputs =
    { nixpkgs, nixfleet, ... }:
    {
      nixosConfigurations.host = nixpkgs.lib.nixosSystem {
        modules = [
          nixfleet.nixosModules.default
          ./configuration.nix
        ];
      };
    };
}
