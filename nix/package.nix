# The nix-snapshotter package: daemon and CLI in one binary.
{ lib, rustPlatform }:

rustPlatform.buildRustPackage {
  pname = "nix-snapshotter";
  version = "0.1.0";
  src = lib.cleanSourceWith {
    src = ../.;
    filter = path: type: !(lib.hasSuffix "/target" path) && !(lib.hasInfix "/fuzz" path);
  };
  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = [ "--bin" "nix-snapshotter" ];
  # The test suite needs root, containerd, FUSE and real Nix (see scripts/test).
  doCheck = false;
  meta = {
    description = "containerd snapshotter that runs containers straight from Nix store paths, fetched lazily";
    license = lib.licenses.mit;
    platforms = lib.platforms.linux;
    mainProgram = "nix-snapshotter";
  };
}
