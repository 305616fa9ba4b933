# overlays.default: pkgs.nix-snapshotter, with pkgs.nix-snapshotter.buildImage,
# copyToRegistry and copyToContainerd.
final: prev: {
  nix-snapshotter = (final.callPackage ./package.nix { }).overrideAttrs (old: {
    passthru = (old.passthru or { }) // {
      inherit (import ./build-image.nix { pkgs = final; }) buildImage copyToRegistry copyToContainerd;
    };
  });
}
