# Home Manager module: nix-snapshotter as a user service (rootless), next to
# a rootless containerd that runs under rootlesskit. The snapshotter joins
# containerd's namespaces (see docs/operations.md).
{ config, lib, pkgs, ... }:

let
  cfg = config.services.nix-snapshotter;
  settingsFormat = pkgs.formats.toml { };
  runtimeDir = "%t";
in
{
  options.services.nix-snapshotter = {
    enable = lib.mkEnableOption "nix-snapshotter as a user service";
    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.nix-snapshotter;
      description = "The nix-snapshotter package.";
    };
    settings = lib.mkOption {
      type = settingsFormat.type;
      default = { };
      description = "Configuration (see docs/configuration.md).";
    };
  };

  config = lib.mkIf cfg.enable {
    systemd.user.services.nix-snapshotter = {
      Unit = {
        Description = "nix-snapshotter (rootless)";
        PartOf = [ "containerd.service" ];
        After = [ "containerd.service" ];
      };
      Service = {
        Type = "notify";
        NotifyAccess = "all";
        LimitNOFILE = 1048576;
        # The FUSE session outlives restarts in systemd's fd store.
        FileDescriptorStoreMax = 16;
        FileDescriptorStorePreserve = "yes";
        ExecStart = lib.concatStringsSep " " [
          "${pkgs.util-linux}/bin/nsenter --no-fork --preserve-credentials --mount --net --user"
          "--target \${CHILD_PID}"
          (lib.getExe cfg.package)
          "--config ${settingsFormat.generate "nix-snapshotter.toml" cfg.settings}"
          "--address ${runtimeDir}/nix-snapshotter/nix-snapshotter.sock"
          "--root \${XDG_DATA_HOME}/containerd/io.containerd.snapshotter.v1.nix"
        ];
        ExecStartPre = "${pkgs.bash}/bin/bash -c 'echo CHILD_PID=$(cat ${runtimeDir}/containerd-rootless/child_pid) > ${runtimeDir}/nix-snapshotter.env'";
        EnvironmentFile = "-${runtimeDir}/nix-snapshotter.env";
        Restart = "always";
      };
      Install.WantedBy = [ "default.target" ];
    };
  };
}
