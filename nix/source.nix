# The sources Cargo reads, and nothing else: both packages build from this
# one store path, so an edit to Nix files, docs or CI changes neither.
{ lib }:
lib.fileset.toSource {
  root = ../.;
  fileset = lib.fileset.unions [
    ../Cargo.toml
    ../Cargo.lock
    ../crates
  ];
}
