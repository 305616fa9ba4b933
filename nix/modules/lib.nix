# What the NixOS and Home Manager modules share: option declarations and the
# units, which only run the binary's own subcommands (the logic is tested
# Rust, see src/rootless.rs): `nix-snapshotter` (the daemon),
# `nix-snapshotter rootless containerd` (containerd under rootlesskit) and
# `nix-snapshotter --rootless` (the daemon joined to its namespaces).
{ lib, pkgs }:

let
  settingsFormat = pkgs.formats.toml { };
  exe = pkg: lib.getExe pkg;
  bin = pkg: name: "${pkg}/bin/${name}";
in
rec {
  inherit settingsFormat;

  # services.nix-snapshotter.* and services.nix-snapshotter.rootless.*
  # (the Go project's option paths).
  snapshotterOptions = { rootless }: {
    enable = lib.mkEnableOption (if rootless
      then "nix-snapshotter for this user (rootless, next to rootless containerd)"
      else "nix-snapshotter, containerd's `nix` snapshotter");
    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.nix-snapshotter;
      description = "The nix-snapshotter package.";
    };
    path = lib.mkOption {
      type = lib.types.listOf lib.types.package;
      default = [ ];
      description = "Packages on the service's PATH.";
    };
    settings = lib.mkOption {
      type = settingsFormat.type;
      default = { };
      example = {
        substituters = [ "https://cache.nixos.org" ];
        store.max_size = "20GiB";
      };
      description = "Configuration (docs/configuration.md); unknown keys are an error.";
    };
    configFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      description = "Configuration file; overrides `settings`.";
    };
    extraFlags = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "--log-level" "debug" ];
      description = "Extra command-line flags of the daemon.";
    };
    setContainerdSnapshotter = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Export CONTAINERD_SNAPSHOTTER=nix in login shells (when unset), so that `ctr` and `nerdctl` use nix by default.";
    };
    preloadContainerdImages = lib.mkOption {
      type = lib.types.listOf lib.types.package;
      default = [ ];
      description = "Image archives (buildImage results) loaded into containerd at start, with `nix-snapshotter image load`.";
    };
  };

  # virtualisation.containerd.rootless.*
  containerdRootlessOptions = {
    enable = lib.mkEnableOption "containerd under rootlesskit for this user, with nix-snapshotter as its `nix` snapshotter";
    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.containerd;
      description = "The containerd package.";
    };
    path = lib.mkOption {
      type = lib.types.listOf lib.types.package;
      default = [ ];
      description = "Extra packages on containerd's PATH (runtimes, CNI plugins).";
    };
    settings = lib.mkOption {
      type = settingsFormat.type;
      default = { };
      description = "containerd TOML merged over the generated configuration (tables key by key).";
    };
    network = lib.mkOption {
      type = lib.types.enum [ "slirp4netns" "host" ];
      default = "slirp4netns";
      description = "Containers' network: their own namespace through slirp4netns, or the host's.";
    };
  };

  configFileOf = cfg:
    if cfg.configFile != null then cfg.configFile
    else settingsFormat.generate "nix-snapshotter.toml" cfg.settings;

  daemonCommand = cfg: extra: lib.concatStringsSep " " ([ (exe cfg.package) ] ++ extra
    ++ [ "--config" "${configFileOf cfg}" ] ++ map lib.escapeShellArg cfg.extraFlags);

  # Lines for a login shell's profile.
  shellInit = { address ? null, snapshotter ? false }:
    lib.optionalString (address != null) ''
      if [ -z "$CONTAINERD_ADDRESS" ]; then export CONTAINERD_ADDRESS="${address}"; fi
    '' + lib.optionalString snapshotter ''
      if [ -z "$CONTAINERD_SNAPSHOTTER" ]; then export CONTAINERD_SNAPSHOTTER=nix; fi
    '';

  # Rootless user units in Home Manager's form ({ Unit; Service; Install; }).
  rootlessUnits = { snapshotter, containerd }:
    let
      # setuid newuidmap/newgidmap: NixOS's wrappers, else the distribution's.
      pathOf = pkgs': "PATH=" + lib.concatStringsSep ":"
        ((if pkgs' == [ ] then [ ] else [ (lib.makeBinPath pkgs') ]) ++ [ "/run/wrappers/bin" "/usr/bin" "/bin" ]);
      ctrdPath = pathOf ([ containerd.package pkgs.runc pkgs.rootlesskit pkgs.slirp4netns pkgs.util-linux ] ++ containerd.path);
      extra = lib.optionalString (containerd.settings != { })
        " --extra-config ${settingsFormat.generate "containerd-extra.toml" containerd.settings}";
    in
    lib.optionalAttrs containerd.enable {
      containerd = {
        Unit = {
          Description = "containerd under rootlesskit, with nix-snapshotter (rootless)";
          StartLimitBurst = 16;
          StartLimitIntervalSec = 120;
        };
        Service = {
          Type = "notify";
          NotifyAccess = "all";
          ExecStart = "${exe snapshotter.package} rootless containerd --net ${containerd.network}"
            + " --containerd ${bin containerd.package "containerd"}${extra}";
          Environment = [ ctrdPath ];
          Delegate = "yes";
          KillMode = "mixed";
          Restart = "always";
          RestartSec = 2;
        };
        Install.WantedBy = [ "default.target" ];
      };
    } // lib.optionalAttrs snapshotter.enable {
      nix-snapshotter = {
        Unit = {
          Description = "nix-snapshotter (rootless)";
          # It serves mounts in containerd's namespaces: it stops with
          # containerd, and ends by itself when those namespaces do.
          After = [ "containerd.service" ];
          PartOf = [ "containerd.service" ];
        };
        Service = {
          Type = "notify";
          ExecStart = daemonCommand snapshotter [ "--rootless" ];
          Environment = [ (pathOf snapshotter.path) ];
          # The FUSE session outlives restarts in systemd's fd store.
          FileDescriptorStoreMax = 16;
          FileDescriptorStorePreserve = "yes";
          Restart = "always";
          RestartSec = 2;
        };
        Install.WantedBy = [ "default.target" ];
      };
    } // lib.optionalAttrs (snapshotter.enable && snapshotter.preloadContainerdImages != [ ]) {
      preload-containerd-images = {
        Unit = {
          Description = "Load Nix images into rootless containerd";
          After = [ "containerd.service" "nix-snapshotter.service" ];
          Wants = [ "containerd.service" "nix-snapshotter.service" ];
        };
        Service = {
          Type = "oneshot";
          RemainAfterExit = true;
          Environment = [ "CONTAINERD_ADDRESS=%t/containerd/containerd.sock" ];
          ExecStart = map (a: "${exe snapshotter.package} image load ${a}") snapshotter.preloadContainerdImages;
        };
        Install.WantedBy = [ "default.target" ];
      };
    };

  # containerd settings that make nix its snapshotter, in configuration
  # version 2 (what NixOS's containerd module writes; containerd 2.x
  # migrates it, tests/cri.rs runs it on 1.6, 1.7 and 2.1).
  containerdSettings = { address }: {
    proxy_plugins.nix = {
      type = "snapshot";
      inherit address;
    };
    plugins = {
      # Pulls through the Transfer service (containerd >= 1.7) unpack for nix too.
      "io.containerd.transfer.v1.local".unpack_config = [{
        platform = "linux/${pkgs.go.GOARCH}";
        snapshotter = "nix";
      }];
      "io.containerd.grpc.v1.cri".containerd = {
        snapshotter = "nix";
        # Remote snapshots: the CRI passes layer labels to nix.
        disable_snapshot_annotations = false;
      };
    };
  };
}
