{
  description = "nix-snapshotter: a containerd snapshotter that runs containers straight from Nix store paths, fetched lazily";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system:
        f (import nixpkgs { inherit system; overlays = [ self.overlays.default ]; }));
    in
    {
      overlays.default = import ./nix/overlay.nix;

      packages = forAllSystems (pkgs: {
        default = pkgs.nix-snapshotter;
        nix-snapshotter = pkgs.nix-snapshotter;
        # An example image: busybox's hello, runnable with
        #   nix build .#hello-image && ctr images import --snapshotter nix result
        hello-image = pkgs.nix-snapshotter.buildImage {
          name = "hello";
          resolvedByNix = true;
          config.Cmd = [ "${pkgs.hello}/bin/hello" ];
        };
      });

      lib = forAllSystems (pkgs: { inherit (pkgs.nix-snapshotter) buildImage; });

      nixosModules.default = {
        imports = [ ./nix/modules/nixos.nix ];
        nixpkgs.overlays = [ self.overlays.default ];
      };

      homeModules.default = {
        imports = [ ./nix/modules/home.nix ];
        nixpkgs.overlays = [ self.overlays.default ];
      };
    };
}
