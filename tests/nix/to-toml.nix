# TOML text of an attribute set (what pkgs.formats.toml's generate writes),
# enough for containerd's and our configurations: tables, arrays of tables,
# strings, numbers, booleans and arrays.
value:
let
  inherit (builtins) attrNames concatStringsSep concatMap filter isAttrs isList isBool isInt isFloat isString toJSON match;
  isTable = v: isAttrs v && !(v ? outPath);
  isTableList = v: isList v && v != [ ] && builtins.all isTable v;
  key = k: if match "[A-Za-z0-9_-]+" k != null then k else toJSON k;
  scalar = v:
    if isString v || (isAttrs v && v ? outPath) || builtins.isPath v then toJSON "${v}"
    else if isBool v then (if v then "true" else "false")
    else if isInt v || isFloat v then toString v
    else if isList v then "[" + concatStringsSep ", " (map scalar v) + "]"
    else throw "cannot write ${toJSON v} as TOML";
  keys = attrs: pred: filter (n: pred attrs.${n}) (attrNames attrs);
  body = path: attrs:
    concatStringsSep "" (map (n: "${key n} = ${scalar attrs.${n}}\n") (keys attrs (v: !(isTable v) && !(isTableList v))))
    + concatStringsSep "" (map (n: table (path ++ [ n ]) attrs.${n}) (keys attrs isTable))
    + concatStringsSep "" (concatMap (n: map (t: "\n[[${dotted (path ++ [ n ])}]]\n" + body (path ++ [ n ]) t) attrs.${n}) (keys attrs isTableList));
  dotted = path: concatStringsSep "." (map key path);
  table = path: attrs: "\n[${dotted path}]\n" + body path attrs;
in
body [ ] value
