# Just enough of nixpkgs, built from busybox alone, to evaluate and build
# nix/build-image.nix offline in tests. `cli` is the nix-snapshotter binary,
# made visible in the build sandbox by the test.
{ cli }:

let
  system = "x86_64-linux";
  sh = name: env: script: derivation ({
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" "b() { /bin/busybox \"$@\"; }; ${script}" ];
  } // env);
  lib = import ./mock-modules.nix // {
    toList = x: if builtins.isList x then x else [ x ];
    optional = c: x: if c then [ x ] else [ ];
    optionalString = c: s: if c then s else "";
    optionalAttrs = c: s: if c then s else { };
    escapeShellArg = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] s + "'";
    getExe = p: "${p}/bin/${p.name}";
    concatStringsSep = builtins.concatStringsSep;
    makeBinPath = ps: builtins.concatStringsSep ":" (map (p: "${p}/bin") ps);
  };
  # A package whose programs are the host's own (Debian's), linked in: the
  # units the modules render then run on this machine.
  hostPackage = name: programs: sh name { } ("b mkdir -p $out/bin; "
    + builtins.concatStringsSep "; " (map (p: "b ln -s /usr/bin/${p} $out/bin/${p}") programs));
  toTOML = import ./to-toml.nix;
in
rec {
  inherit lib toTOML hostPackage;
  writeShellScript = name: text:
    sh name { inherit text; passAsFile = [ "text" ]; } "b printf '#!/bin/sh\\n' > $out; b cat $textPath >> $out; b chmod 555 $out";
  writeText = name: text: sh name { inherit text; passAsFile = [ "text" ]; } "b cp $textPath $out";
  # closureInfo's store-paths, from Nix's exportReferencesGraph.
  # One graph file per root.
  closureInfo = { rootPaths }: sh "closure-info"
    {
      exportReferencesGraph = builtins.concatLists
        (builtins.genList (i: [ "graph${toString i}" (builtins.elemAt rootPaths i) ]) (builtins.length rootPaths));
    }
    "b mkdir $out; b cat graph* | b grep '^/nix/store/' | b grep -v '[.]drv$' | b sort -u > $out/store-paths";
  runCommand = name: env: script:
    sh name (builtins.removeAttrs env [ "nativeBuildInputs" ] // {
      PATH = builtins.concatStringsSep ":" (map (p: "${p}/bin") (env.nativeBuildInputs or [ ]));
    }) script;
  nix-snapshotter = sh "nix-snapshotter" { } "b mkdir -p $out/bin; b cp ${cli} $out/bin/nix-snapshotter";
  containerd = hostPackage "containerd" [ "containerd" "containerd-shim-runc-v2" "ctr" ];
  runc = hostPackage "runc" [ "runc" ];
  rootlesskit = hostPackage "rootlesskit" [ "rootlesskit" ];
  slirp4netns = hostPackage "slirp4netns" [ "slirp4netns" ];
  util-linux = hostPackage "util-linux" [ "nsenter" "unshare" ];
  go = { GOARCH = "amd64"; };
  formats.toml = { }: {
    type = lib.types.attrsOf lib.types.anything;
    generate = name: value: writeText name (toTOML value);
  };
  hello = sh "hello" { } "b mkdir -p $out/bin; b cp /bin/busybox $out/bin/busybox; b printf '#!'$out'/bin/busybox sh\\necho hello from buildImage\\n' > $out/bin/hello; b chmod 555 $out/bin/hello";
}
