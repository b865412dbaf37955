# The generation the agent switches to, from the configuration repository.
# Like nixpkgs' nixos-rebuild tests: the VM's hardware configuration (made by
# nixos-generate-config in the test) plus the test instrumentation, which
# keeps the test driver's backdoor shell alive across the switch.
{ modulesPath, ... }:
{
  imports = [
    ./hardware-configuration.nix
    ./common.nix
    (modulesPath + "/testing/test-instrumentation.nix")
  ];

  networking.hostName = "host";
  # The VM boots its kernel directly; nothing to install.
  boot.loader.grub.enable = false;

  # The observable change.
  environment.etc."nixfleet-test-generation".text = "2\n";
}
