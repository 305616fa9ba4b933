# Builds an image with nix/build-image.nix against the mock pkgs.
{ cli, resolvedByNix ? false, name ? "hello", accessProfile ? null }:
let
  pkgs = import ./mock-pkgs.nix { inherit cli; };
  inherit (import ../../nix/build-image.nix { inherit pkgs; }) buildImage;
in
buildImage {
  inherit name resolvedByNix accessProfile;
  copyToRoot = [ pkgs.hello ];
  config = {
    Cmd = [ "${pkgs.hello}/bin/hello" ];
    Env = [ "PATH=/bin" ];
  };
}
