# NixOS module: nix-snapshotter as a system service and containerd's `nix`
# snapshotter; rootless variants as user units for every user (the Go
# project's option paths). The units run the binary's own subcommands.
{ config, lib, pkgs, ... }:

let
  shared = import ./lib.nix { inherit lib pkgs; };
  cfg = config.services.nix-snapshotter;
  rootless = cfg.rootless;
  ctrdRootless = config.virtualisation.containerd.rootless;
  address = cfg.settings.address or "/run/nix-snapshotter/nix-snapshotter.sock";
  # Home Manager's unit form to NixOS's.
  toNixOS = unit: {
    description = unit.Unit.Description;
    wantedBy = unit.Install.WantedBy;
    serviceConfig = unit.Service;
    unitConfig = builtins.removeAttrs unit.Unit [ "Description" ];
  };
in
{
  options.services.nix-snapshotter = shared.snapshotterOptions { rootless = false; } // {
    rootless = shared.snapshotterOptions { rootless = true; };
  };
  options.virtualisation.containerd.rootless = shared.containerdRootlessOptions;

  config = lib.mkMerge [
    (lib.mkIf cfg.enable {
      virtualisation.containerd = {
        enable = true;
        settings = shared.containerdSettings { inherit address; };
      };

      systemd.services.nix-snapshotter = {
        description = "nix-snapshotter";
        wantedBy = [ "multi-user.target" ];
        before = [ "containerd.service" ];
        requiredBy = [ "containerd.service" ];
        path = cfg.path;
        # A switch restarts the daemon in place: running containers keep their
        # /nix/store, since the FUSE session waits in systemd's fd store.
        stopIfChanged = false;
        serviceConfig = {
          Type = "notify";
          ExecStart = shared.daemonCommand cfg [ ];
          Restart = "always";
          RestartSec = 1;
          # The store keeps backing files open for every container; the daemon
          # raises its soft limit to this hard limit at start.
          LimitNOFILE = 1048576;
          # The FUSE session (the /dev/fuse fd and the inode journal) is handed
          # to systemd's file descriptor store and resumed by the next start,
          # whatever ended the last one (see docs/operations.md).
          FileDescriptorStoreMax = 16;
          FileDescriptorStorePreserve = "yes";
        };
      };

      systemd.services.preload-containerd-images = lib.mkIf (cfg.preloadContainerdImages != [ ]) {
        description = "Load Nix images into containerd";
        wantedBy = [ "multi-user.target" ];
        after = [ "containerd.service" "nix-snapshotter.service" ];
        wants = [ "containerd.service" "nix-snapshotter.service" ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = map (a: "${lib.getExe cfg.package} image load ${a}") cfg.preloadContainerdImages;
        };
      };

      environment.extraInit = shared.shellInit { snapshotter = cfg.setContainerdSnapshotter; };
    })

    (lib.mkIf (rootless.enable || ctrdRootless.enable) {
      systemd.user.services = builtins.mapAttrs (_: toNixOS)
        (shared.rootlessUnits { snapshotter = rootless; containerd = ctrdRootless; });
      environment.extraInit = shared.shellInit {
        address = if ctrdRootless.enable then "$XDG_RUNTIME_DIR/containerd/containerd.sock" else null;
        snapshotter = rootless.setContainerdSnapshotter;
      };
    })
  ];
}
