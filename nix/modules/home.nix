# Home Manager module: rootless containerd (under rootlesskit) and
# nix-snapshotter joined to its namespaces, as user units, with the Go
# project's option paths. The units run the binary's own subcommands; see
# docs/rootless.md.
{ config, lib, pkgs, ... }:

let
  shared = import ./lib.nix { inherit lib pkgs; };
  cfg = config.services.nix-snapshotter.rootless;
  ctrd = config.virtualisation.containerd.rootless;
in
{
  options.services.nix-snapshotter.rootless = shared.snapshotterOptions { rootless = true; };
  options.virtualisation.containerd.rootless = shared.containerdRootlessOptions;

  config = lib.mkIf (cfg.enable || ctrd.enable) {
    systemd.user.services = shared.rootlessUnits { snapshotter = cfg; containerd = ctrd; };
    home.sessionVariablesExtra = shared.shellInit {
      address = if ctrd.enable then "$XDG_RUNTIME_DIR/containerd/containerd.sock" else null;
      snapshotter = cfg.setContainerdSnapshotter;
    };
  };
}
