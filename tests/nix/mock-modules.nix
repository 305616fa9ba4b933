# A small module system, enough to evaluate nix/modules/*.nix offline with
# real Nix and no nixpkgs: options with types and defaults, mkIf, mkMerge,
# mkDefault/mkOverride pushed down into attribute sets as nixpkgs does (so a
# module may read its own options under mkIf), definitions of undeclared
# options refused by name, conflicting definitions refused by name.
let
  isType = t: v: builtins.isAttrs v && (v._type or null) == t;
  concatMapAttrs = f: set: builtins.concatMap (n: f n set.${n}) (builtins.attrNames set);
  uniqueList = l: builtins.foldl' (acc: x: if builtins.elem x acc then acc else acc ++ [ x ]) [ ] l;
  showPath = p: builtins.concatStringsSep "." p;
in
rec {
  mkOption = attrs: attrs // { _type = "option"; };
  mkEnableOption = name: mkOption {
    type = types.bool;
    default = false;
    description = "Whether to enable ${name}.";
  };
  mkIf = condition: content: { _type = "if"; inherit condition content; };
  mkMerge = contents: { _type = "merge"; inherit contents; };
  mkOverride = priority: content: { _type = "override"; inherit priority content; };
  mkDefault = mkOverride 1000;
  mkOptionDefault = mkOverride 1500;
  mkForce = mkOverride 50;

  # A definition at an attribute-set level as plain sets, conditions and
  # priorities moved onto their attributes, unevaluated.
  pushDown = def:
    if isType "merge" def then builtins.concatMap pushDown def.contents
    else if isType "if" def then map (builtins.mapAttrs (_: mkIf def.condition)) (pushDown def.content)
    else if isType "override" def then map (builtins.mapAttrs (_: mkOverride def.priority)) (pushDown def.content)
    else [ def ];

  # The values of `defs` that count: conditions evaluated, merges flattened,
  # only those of the highest priority (lowest number) kept.
  winners = defs:
    let
      flatten = prio: def:
        if isType "merge" def then builtins.concatMap (flatten prio) def.contents
        else if isType "if" def then (if def.condition then flatten prio def.content else [ ])
        else if isType "override" def then flatten def.priority def.content
        else [{ priority = prio; value = def; }];
      all = builtins.concatMap (flatten 100) defs;
      best = builtins.foldl' (m: d: if d.priority < m then d.priority else m) 9999 all;
    in
    map (d: d.value) (builtins.filter (d: d.priority == best) all);

  # Sets merged attribute by attribute with `merge` (absent where nothing counts).
  mergeSets = merge: path: sets:
    let
      names = uniqueList (builtins.concatMap builtins.attrNames sets);
      defsOf = n: builtins.concatMap (s: if s ? ${n} then [ s.${n} ] else [ ]) sets;
      present = builtins.filter (n: winners (defsOf n) != [ ]) names;
    in
    builtins.listToAttrs (map (n: { name = n; value = merge (path ++ [ n ]) (defsOf n); }) present);

  isSet = v: builtins.isAttrs v && !(v ? outPath) && !(v ? _type);

  mergeAny = path: defs:
    let vs = winners defs; in
    if builtins.all isSet vs then mergeSets mergeAny path vs
    else if builtins.all builtins.isList vs then builtins.concatLists vs
    else if builtins.all (v: v == builtins.head vs) vs then builtins.head vs
    else throw "conflicting definitions of ${showPath path}";

  mkType = name: merge: { _type = "type"; inherit name merge; };
  unique = name: mkType name (path: defs:
    let vs = winners defs; in
    if builtins.all (v: v == builtins.head vs) vs then builtins.head vs
    else throw "conflicting definitions of ${showPath path}");

  types = {
    bool = unique "bool";
    str = unique "str";
    int = unique "int";
    path = unique "path";
    package = unique "package";
    enum = values: mkType "enum" (path: defs:
      let v = (unique "enum").merge path defs; in
      if builtins.elem v values then v else throw "${showPath path}: ${builtins.toJSON v} is not one of ${builtins.toJSON values}");
    lines = mkType "lines" (path: defs: builtins.concatStringsSep "\n" (winners defs));
    listOf = t: mkType "listOf" (path: defs: builtins.concatLists (winners defs));
    nullOr = t: mkType "nullOr" (path: defs:
      let nn = builtins.filter (v: v != null) (winners defs); in
      if nn == [ ] then null else t.merge path nn);
    attrsOf = t: mkType "attrsOf" (path: defs: mergeSets t.merge path (winners defs));
    anything = mkType "anything" mergeAny;
  };

  evalModules = { modules, specialArgs ? { } }:
    let
      load = m:
        let
          f = if builtins.isPath m || builtins.isString m then import m else m;
          r = if builtins.isFunction f then f ({ inherit config lib; options = decls; } // specialArgs) else f;
          explicit = r ? options || r ? config;
        in
        {
          options = r.options or { };
          config = if explicit then r.config or { } else builtins.removeAttrs r [ "imports" ];
          imports = r.imports or [ ];
        };
      collect = ms: builtins.concatMap (m: let l = load m; in [ l ] ++ collect l.imports) ms;
      loaded = collect modules;
      lib = specialArgs.lib or (specialArgs.pkgs.lib);
      mergeDecls = path: ds:
        if builtins.length ds == 1 then builtins.head ds
        else if builtins.any (isType "option") ds then throw "option ${showPath path} declared twice"
        else builtins.zipAttrsWith (n: mergeDecls (path ++ [ n ])) ds;
      decls = mergeDecls [ ] (map (l: l.options) loaded);
      evalTree = path: decl: defs:
        if isType "option" decl then
          let
            all = defs ++ (if decl ? default then [ (mkOptionDefault decl.default) ] else [ ]);
          in
          if winners all == [ ] then throw "option ${showPath path} is used but not defined"
          else decl.type.merge path all
        else
          let
            sets = builtins.concatMap pushDown defs;
            undeclared = builtins.filter (n: !(decl ? ${n})) (uniqueList (builtins.concatMap builtins.attrNames sets));
          in
          if undeclared != [ ] then throw "undeclared option ${showPath (path ++ [ (builtins.head undeclared) ])}"
          else builtins.mapAttrs (n: d: evalTree (path ++ [ n ]) d (builtins.concatMap (s: if s ? ${n} then [ s.${n} ] else [ ]) sets)) decl;
      config = evalTree [ ] decls (map (l: l.config) loaded);
    in
    { inherit config; options = decls; };
}
