# NixOS module: nix-snapshotter as a system service and containerd's `nix`
# snapshotter.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.nix-snapshotter;
  settingsFormat = pkgs.formats.toml { };
  configFile = settingsFormat.generate "nix-snapshotter.toml" cfg.settings;
in
{
  options.services.nix-snapshotter = {
    enable = lib.mkEnableOption "nix-snapshotter, a containerd snapshotter for Nix store paths";
    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.nix-snapshotter;
      description = "The nix-snapshotter package.";
    };
    settings = lib.mkOption {
      type = settingsFormat.type;
      default = { };
      example = {
        substituters = [ "https://cache.nixos.org" ];
        store.max_size = "20GiB";
      };
      description = "Configuration (see docs/configuration.md); unknown keys are an error.";
    };
    setContainerdSnapshotter = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Make nix the default snapshotter of containerd's CRI plugin.";
    };
  };

  config = lib.mkIf cfg.enable {
    services.nix-snapshotter.settings = {
      address = lib.mkDefault "/run/nix-snapshotter/nix-snapshotter.sock";
      root = lib.mkDefault "/var/lib/containerd/io.containerd.snapshotter.v1.nix";
    };

    virtualisation.containerd = {
      enable = true;
      settings = {
        proxy_plugins.nix = {
          type = "snapshot";
          address = cfg.settings.address;
        };
        plugins."io.containerd.grpc.v1.cri".containerd.snapshotter = lib.mkIf cfg.setContainerdSnapshotter "nix";
      };
    };

    systemd.services.nix-snapshotter = {
      description = "nix-snapshotter";
      wantedBy = [ "multi-user.target" ];
      before = [ "containerd.service" ];
      requiredBy = [ "containerd.service" ];
      path = [ pkgs.fuse3 ];
      # A switch restarts the daemon in place: running containers keep their
      # /nix/store, since the FUSE session waits in systemd's fd store.
      stopIfChanged = false;
      serviceConfig = {
        Type = "notify";
        ExecStart = "${lib.getExe cfg.package} --config ${configFile}";
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
  };
}
