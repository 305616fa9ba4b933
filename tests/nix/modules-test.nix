# nix/modules/nixos.nix and home.nix evaluated against the mock pkgs and
# module system, with every option of ours set; their units and files
# rendered into one output for tests/modules.rs to check and run.
# `tmp`: a directory for the rootful daemon's state; `cache` and `key`: the
# binary cache the daemons fetch from and its public key.
{ cli, tmp, cache, key }:
let
  pkgs = import ./mock-pkgs.nix { inherit cli; };
  inherit (pkgs) lib;
  inherit (import ../../nix/build-image.nix { inherit pkgs; }) buildImage;
  image = buildImage {
    name = "preloaded";
    config.Cmd = [ "${pkgs.hello}/bin/hello" ];
  };
  eval = modules: (lib.evalModules { inherit modules; specialArgs = { inherit pkgs lib; }; }).config;
  freeform = lib.mkOption { type = lib.types.attrsOf lib.types.anything; default = { }; };
  lines = lib.mkOption { type = lib.types.lines; default = ""; };
  # The parts of NixOS and Home Manager the modules define.
  nixosBase = {
    options = {
      systemd.services = freeform;
      systemd.user.services = freeform;
      virtualisation.containerd.enable = lib.mkOption { type = lib.types.bool; default = false; };
      virtualisation.containerd.settings = lib.mkOption { type = (pkgs.formats.toml { }).type; default = { }; };
      environment.extraInit = lines;
      nixpkgs.overlays = lib.mkOption { type = lib.types.listOf lib.types.anything; default = [ ]; };
    };
    # As NixOS's containerd module does.
    config.virtualisation.containerd.settings.version = lib.mkOptionDefault 2;
  };
  homeBase = {
    options = {
      systemd.user.services = freeform;
      home.sessionVariablesExtra = lines;
      nixpkgs.overlays = lib.mkOption { type = lib.types.listOf lib.types.anything; default = [ ]; };
    };
  };
  rootlessSettings = {
    substituters = [ cache ];
    trusted_public_keys = [ key ];
    host_store = "";
  };
  nixos = eval [
    nixosBase
    ../../nix/modules/nixos.nix
    {
      services.nix-snapshotter = {
        enable = true;
        settings = {
          address = "${tmp}/nix.sock";
          root = "${tmp}/root";
          substituters = [ cache ];
          trusted_public_keys = [ key ];
          host_store = "";
          image_service.enable = false;
        };
        extraFlags = [ "--log-level" "debug" ];
        setContainerdSnapshotter = true;
        preloadContainerdImages = [ image ];
        rootless = {
          enable = true;
          settings = rootlessSettings;
        };
      };
      virtualisation.containerd.rootless.enable = true;
    }
  ];
  home = eval [
    homeBase
    ../../nix/modules/home.nix
    {
      services.nix-snapshotter.rootless = {
        enable = true;
        settings = rootlessSettings;
        preloadContainerdImages = [ image ];
      };
      virtualisation.containerd.rootless = {
        enable = true;
        settings.debug.level = "info";
      };
    }
  ];

  # Unit files, as systemd reads them (lists as repeated keys).
  render = v: if builtins.isBool v then (if v then "true" else "false") else toString v;
  section = name: attrs: "[${name}]\n" + builtins.concatStringsSep "" (builtins.concatMap
    (k: map (x: "${k}=${render x}\n") (lib.toList attrs.${k})) (builtins.attrNames attrs));
  hmUnit = u: builtins.concatStringsSep "\n" (map (s: section s u.${s}) (builtins.filter (s: u ? ${s}) [ "Unit" "Service" "Install" ]));
  nixosUnit = s: hmUnit {
    Unit = { Description = s.description; }
      // lib.optionalAttrs (s ? after) { After = s.after; }
      // lib.optionalAttrs (s ? wants) { Wants = s.wants; }
      // lib.optionalAttrs (s ? before) { Before = s.before; }
      // (s.unitConfig or { });
    Service = (s.serviceConfig or { })
      // lib.optionalAttrs ((s.path or [ ]) != [ ]) { Environment = "PATH=${lib.makeBinPath s.path}:/usr/bin:/bin"; };
    Install = { WantedBy = s.wantedBy or [ ]; }
      // lib.optionalAttrs (s ? requiredBy) { RequiredBy = s.requiredBy; };
  };
  files = {
    "nixos/nix-snapshotter.service" = nixosUnit nixos.systemd.services.nix-snapshotter;
    "nixos/preload-containerd-images.service" = nixosUnit nixos.systemd.services.preload-containerd-images;
    "nixos/user/containerd.service" = nixosUnit nixos.systemd.user.services.containerd;
    "nixos/user/nix-snapshotter.service" = nixosUnit nixos.systemd.user.services.nix-snapshotter;
    "nixos/containerd.toml" = pkgs.toTOML nixos.virtualisation.containerd.settings;
    "nixos/containerd-enabled" = render nixos.virtualisation.containerd.enable;
    "nixos/extra-init.sh" = nixos.environment.extraInit;
    "home/containerd.service" = hmUnit home.systemd.user.services.containerd;
    "home/nix-snapshotter.service" = hmUnit home.systemd.user.services.nix-snapshotter;
    "home/preload-containerd-images.service" = hmUnit home.systemd.user.services.preload-containerd-images;
    "home/session-variables.sh" = home.home.sessionVariablesExtra;
    "image" = "${image}";
    "hello" = "${pkgs.hello}";
  };
in
pkgs.runCommand "module-units" { } (''
  b() { /bin/busybox "$@"; }
  b mkdir -p $out/nixos/user $out/home
'' + builtins.concatStringsSep "" (map
  (name: "b cp ${pkgs.writeText "f" files.${name}} $out/${name}\n")
  (builtins.attrNames files)))
