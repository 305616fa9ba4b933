//! The workload of the cold-start benchmarks: Debian's python3 packaged the
//! Nix way (glibc, zlib and expat each in a store path of their own,
//! python3.11 and its standard library in another, the binary patched with
//! patchelf to load them from the store), in one closure with ~390 MiB of
//! unrelated store paths (Debian's Go sources), built by real Nix into a
//! chroot store. The program reads a small part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{closure_of, du, nix_build, run, store_name};

pub struct PythonClosure {
    /// The chroot store it was built in.
    pub chroot: PathBuf,
    /// The store path referring to all the others.
    pub top: String,
    /// Every store path of the closure.
    pub paths: Vec<String>,
    /// The python3 store path.
    pub python: String,
    /// Bytes on disk.
    pub bytes: u64,
}

impl PythonClosure {
    /// Builds it under `dir` (`dir/src-store`, `dir/closure.nix`,
    /// `dir/store-paths`).
    pub fn build(dir: &Path) -> PythonClosure {
        let chroot = dir.join("src-store");
        let mut bulk = Vec::new();
        for org in std::fs::read_dir("/usr/share/gocode/src/github.com")
            .expect("golang-github-containerd-containerd-dev is needed")
        {
            let org = org.unwrap().path();
            let name = store_name(&org.file_name().unwrap().to_string_lossy());
            bulk.push(format!("(cp \"bulk-{name}\" \"{}\")", org.display()));
        }
        let expr = format!(
            r#"let
  shWith = attrs: name: script: deps: derivation ({{
    inherit name deps; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "b() {{ /bin/busybox \"$@\"; }}; ${{script}}" ];
  }} // attrs);
  sh = shWith {{ }};
  # Bytecode valid in the store, as a Nix-built python has (nixpkgs
  # compiles it against the store's mtime): sources dated 1, compiled.
  compile = ''
    import compileall, os, py_compile, sys
    for d, _, files in os.walk(sys.argv[1]):
        for f in files:
            if f.endswith(".py"):
                os.utime(os.path.join(d, f), (1, 1), follow_symlinks=False)
    compileall.compile_dir(sys.argv[1], quiet=2, force=True, workers=0,
        invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
  '';
  cp = name: src: sh name "b cp -a ${{src}} $out" [ ];
  lib = name: files: sh name ("b mkdir -p $out/lib; " + builtins.concatStringsSep "; " (map (f: "b cp -L /lib/x86_64-linux-gnu/${{f}} $out/lib/") files)) [ ];
  glibc = lib "glibc-debian" [ "libc.so.6" "libm.so.6" "ld-linux-x86-64.so.2" ];
  zlib = lib "zlib-debian" [ "libz.so.1" ];
  expat = lib "expat-debian" [ "libexpat.so.1" ];
  python = shWith {{ inherit compile; }} "python3-debian" ''
    b mkdir -p $out/bin $out/lib
    b cp /usr/bin/python3.11 $out/bin/python3.11
    b ln -s python3.11 $out/bin/python3
    b cp -a /usr/lib/python3.11 $out/lib/python3.11
    /usr/bin/python3.11 -I -c "$compile" $out/lib/python3.11
    b chmod u+w $out/bin/python3.11
    /usr/bin/patchelf --set-interpreter ${{glibc}}/lib/ld-linux-x86-64.so.2 --set-rpath ${{glibc}}/lib:${{zlib}}/lib:${{expat}}/lib $out/bin/python3.11
  '' [ ];
  bulk = [ {bulk} ];
in sh "python-closure" "b mkdir $out; for d in $deps; do b echo $d >> $out/refs; done" ([ python ] ++ bulk)"#,
            bulk = bulk.join(" ")
        );
        std::fs::write(dir.join("closure.nix"), expr).unwrap();
        eprintln!("building the closure ...");
        let top = nix_build(&chroot, &dir.join("closure.nix"), " /usr /lib /lib64");
        let paths = closure_of(&chroot, &top);
        let python = paths.iter().find(|p| p.ends_with("-python3-debian")).unwrap().clone();
        let bytes = du(&chroot.join("nix/store"));
        std::fs::write(dir.join("store-paths"), paths.join("\n") + "\n").unwrap();
        PythonClosure {
            chroot,
            top,
            paths,
            python,
            bytes,
        }
    }

    /// The program: prints `ready` once python and `json` are loaded.
    pub fn cmd(&self) -> Vec<String> {
        vec![
            format!("{}/bin/python3", self.python),
            "-c".into(),
            "import json; print('ready', flush=True)".into(),
        ]
    }

    /// `image build` of the Nix image running [`cmd`](Self::cmd) as
    /// `reference`, written to `out`, its closure in the Go project's
    /// labels (`nix-layer`, a `nix-store-path.<i>` per path); with
    /// `profile`, a store path of an access profile added to its closure
    /// and named by its label.
    pub fn nix_image(&self, dir: &Path, reference: &str, out: &Path, profile: Option<&str>) {
        let mut closure = dir.join("store-paths");
        if let Some(p) = profile {
            let with = dir.join("store-paths-profiled");
            let mut text = std::fs::read_to_string(&closure).unwrap();
            text.push_str(&format!("\n{p}\n"));
            std::fs::write(&with, text).unwrap();
            closure = with;
        }
        self.build_image(dir, &closure, reference, out, profile);
    }

    /// The same image as buildImage makes it: the closure listed by a
    /// closure-info store path (nixpkgs' `closureInfo`: `store-paths`),
    /// named by the Nix layer's one `nix-closure` label. Returns that store
    /// path (added to the chroot store), for the caches to publish.
    pub fn nix_image_info(&self, dir: &Path, reference: &str, out: &Path, profile: Option<&str>) -> String {
        let info = dir.join(format!(
            "closure-info{}",
            if profile.is_some() { "-profiled" } else { "" }
        ));
        let _ = std::fs::remove_dir_all(&info);
        std::fs::create_dir_all(&info).unwrap();
        let mut text = std::fs::read_to_string(dir.join("store-paths")).unwrap();
        if let Some(p) = profile {
            text.push_str(&format!("{p}\n"));
        }
        std::fs::write(info.join("store-paths"), text).unwrap();
        let path = run(Command::new("nix")
            .args(crate::common::NIXFLAGS)
            .args(["store", "add-path", "--name", "closure-info", "--store"])
            .arg(&self.chroot)
            .arg(&info))
        .trim()
        .to_string();
        let listed = self.chroot.join(path.trim_start_matches('/')).join("store-paths");
        self.build_image(dir, &listed, reference, out, profile);
        path
    }

    fn build_image(&self, dir: &Path, closure: &Path, reference: &str, out: &Path, profile: Option<&str>) {
        let config = dir.join("config.json");
        std::fs::write(
            &config,
            serde_json::to_vec(&serde_json::json!({ "Cmd": self.cmd() })).unwrap(),
        )
        .unwrap();
        run(Command::new(env!("CARGO_BIN_EXE_nix-snapshotter"))
            .args(["image", "build", "--config"])
            .arg(&config)
            .arg("--closure")
            .arg(closure)
            .arg("--store-root")
            .arg(&self.chroot)
            .args(["--ref", reference])
            .args(profile.map(|p| ["--profile", p]).into_iter().flatten())
            .arg(out));
    }

    /// An ordinary image of `layers` (each a list of store paths, unpacked as
    /// plain files in one gzip layer) running [`cmd`](Self::cmd).
    pub fn plain_image(&self, layers: &[Vec<&String>], reference: &str, out: &Path) {
        let layers: Vec<nix_snapshotter::image::Layer> = layers
            .iter()
            .map(|paths| {
                let mut tar = tar::Builder::new(Vec::new());
                tar.follow_symlinks(false);
                // The parents first, as any image has them (stargz's
                // optimizer refuses entries whose parent is not listed).
                for parent in ["nix", "nix/store"] {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    tar.append_data(&mut h, parent, std::io::empty()).unwrap();
                }
                for p in paths {
                    let rel = p.trim_start_matches('/');
                    tar.append_dir_all(rel, self.chroot.join(rel)).unwrap();
                }
                nix_snapshotter::image::Layer::from_tar(&tar.into_inner().unwrap(), Default::default())
            })
            .collect();
        let config = serde_json::json!({ "architecture": "amd64", "os": "linux", "config": { "Cmd": self.cmd() } });
        nix_snapshotter::image::write_archive(out, Some(reference), config, &layers).unwrap();
    }
}
