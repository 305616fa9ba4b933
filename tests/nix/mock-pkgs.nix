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
  lib = {
    toList = x: if builtins.isList x then x else [ x ];
    optionalString = c: s: if c then s else "";
    escapeShellArg = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] s + "'";
    getExe = p: "${p}/bin/${p.name}";
  };
in
rec {
  inherit lib;
  writeShellScript = name: text:
    sh name { inherit text; passAsFile = [ "text" ]; } "b printf '#!/bin/sh\\n' > $out; b cat $textPath >> $out; b chmod 555 $out";
  writeText = name: text: sh name { inherit text; passAsFile = [ "text" ]; } "b cp $textPath $out";
  # closureInfo's store-paths, from Nix's exportReferencesGraph.
  closureInfo = { rootPaths }: sh "closure-info" { exportReferencesGraph = builtins.concatLists (map (p: [ "graph" p ]) rootPaths); }
    "b mkdir $out; b grep '^/nix/store/' graph | b grep -v '[.]drv$' | b sort -u > $out/store-paths";
  runCommand = name: env: script:
    sh name (builtins.removeAttrs env [ "nativeBuildInputs" ] // {
      PATH = builtins.concatStringsSep ":" (map (p: "${p}/bin") (env.nativeBuildInputs or [ ]));
    }) script;
  nix-snapshotter = sh "nix-snapshotter" { } "b mkdir -p $out/bin; b cp ${cli} $out/bin/nix-snapshotter";
  hello = sh "hello" { } "b mkdir -p $out/bin; b cp /bin/busybox $out/bin/busybox; b printf '#!'$out'/bin/busybox sh\\necho hello from buildImage\\n' > $out/bin/hello; b chmod 555 $out/bin/hello";
}
