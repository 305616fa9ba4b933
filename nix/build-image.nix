# buildImage: Nix images in the nix-snapshotter format, with the arguments of
# the Go project (name, tag, config, copyToRoot, fromImage, resolvedByNix).
# Everything here is also doable with the CLI alone:
#   nix-snapshotter image build --config CONFIG.json --closure STORE_PATHS \
#     [--copy-to-root PATHS.json] [--from-image ARCHIVE] [--ref REF] [--profile P] OUT.tar
{ pkgs, nix-snapshotter ? pkgs.nix-snapshotter }:

let
  inherit (pkgs) lib;
in
{
  buildImage =
    { name
    , tag ? "latest"
      # Name the image "nix:0<out path>" so that Kubernetes can resolve it
      # through nix-snapshotter's image service (only the tag "latest").
    , resolvedByNix ? false
      # An OCI image-layout tar to build on; the Nix layer goes on top.
    , fromImage ? null
      # Store paths (a list, or one path such as a buildEnv) whose contents
      # are linked into the image's root: /bin/x -> /nix/store/.../bin/x.
    , copyToRoot ? null
      # The image config's `config`: Cmd, Entrypoint, Env, WorkingDir, ...
    , config ? { }
      # An access profile (a file: what `nix-snapshotter profile export`
      # wrote after a run) that cold starts prefetch by; it joins the
      # closure and the Nix layer's `nix-profile` label names it.
    , accessProfile ? null
    }:
    let
      roots = if copyToRoot == null then [ ] else lib.toList copyToRoot;
      # A store path name has no "/": "ghcr.io/pdtpartners/hello" is the
      # image's name, "hello" its files'.
      baseName = baseNameOf name;
      # Every store path the config mentions is in its string context, so the
      # closure of this file covers them.
      configFile = pkgs.writeText "nix-image-config-${baseName}.json" (builtins.toJSON config);
      profile = if accessProfile == null then null else builtins.path {
        path = accessProfile;
        name = "nix-access-profile-${baseName}";
      };
      closure = pkgs.closureInfo { rootPaths = [ configFile ] ++ roots ++ lib.optional (profile != null) profile; };
      copyToRootFile = pkgs.writeText "nix-image-copy-to-root-${baseName}.json" (builtins.toJSON (map toString roots));
      archive = pkgs.runCommand "nix-image-${baseName}.tar" { nativeBuildInputs = [ nix-snapshotter ]; } ''
        nix-snapshotter image build \
          --config ${configFile} \
          --closure ${closure}/store-paths \
          ${lib.optionalString (roots != [ ]) "--copy-to-root ${copyToRootFile}"} \
          ${lib.optionalString (fromImage != null) "--from-image ${fromImage}"} \
          ${lib.optionalString (profile != null) "--profile ${profile}"} \
          --ref ${if resolvedByNix then "nix:0$out" else lib.escapeShellArg "${name}:${tag}"} \
          $out
      '';
    in
    assert resolvedByNix -> tag == "latest";
    archive // {
      # As the Go project's: the image's name and tag, and the ref to use.
      imageName = name;
      imageTag = tag;
      image = if resolvedByNix then "nix:0${archive}" else "${name}:${tag}";
    };

  # A script that pushes `image` (a buildImage result) to a registry, under
  # its own name and tag unless told otherwise (`nix-snapshotter image push`).
  copyToRegistry =
    image:
    { imageName ? image.imageName
    , imageTag ? image.imageTag
    , plainHTTP ? false
    }:
    pkgs.writeShellScript "copy-to-registry-${baseNameOf imageName}" ''
      exec ${lib.getExe nix-snapshotter} image push \
        ${lib.optionalString plainHTTP "--plain-http"} "$@" \
        ${image} ${lib.escapeShellArg "${imageName}:${imageTag}"}
    '';

  # A script that loads `image` into containerd for snapshotter nix
  # (`nix-snapshotter image load`); arguments go to `image load`
  # (--address, --namespace).
  copyToContainerd =
    image:
    { namespace ? "default"
    , address ? "/run/containerd/containerd.sock"
    }:
    pkgs.writeShellScript "copy-to-containerd-${baseNameOf image.imageName}" ''
      exec ${lib.getExe nix-snapshotter} image load \
        --address ${lib.escapeShellArg address} --namespace ${lib.escapeShellArg namespace} \
        "$@" ${image}
    '';
}
