# copyToRegistry and copyToContainerd of a buildImage result, against the
# mock pkgs.
{ cli }:
let
  pkgs = import ./mock-pkgs.nix { inherit cli; };
  inherit (import ../../nix/build-image.nix { inherit pkgs; }) buildImage copyToRegistry copyToContainerd;
  image = buildImage {
    name = "ghcr.io/pdtpartners/hello";
    tag = "v1";
    config.Cmd = [ "${pkgs.hello}/bin/hello" ];
  };
in
pkgs.runCommand "copy-scripts" { } ''
  b() { /bin/busybox "$@"; }
  b mkdir $out
  b cp ${copyToRegistry image { plainHTTP = true; }} $out/registry
  b cp ${copyToContainerd image { namespace = "k8s.io"; }} $out/containerd
  b echo ${image} > $out/image
''
