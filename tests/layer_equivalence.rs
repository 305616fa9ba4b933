//! A property test: random layer stacks full of symlinks, whiteouts and
//! opaque directories give the same tree through our `image load` as
//! through `ctr images import` (containerd's own unpacker). Seeded, so a
//! failure names the seed that reproduces it (`NST_LAYER_SEED`), and
//! `NST_LAYER_CASES` sets how many stacks (CI: 10).

mod common;

use std::collections::BTreeMap;

use common::image::{busybox_layers, Entry};
use common::{unique, Containerd};
use nix_snapshotter::image::{self as lib, Layer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const NAMES: [&str; 3] = ["a", "b", "c"];

fn random_path(rng: &mut StdRng) -> String {
    let depth = rng.random_range(1..=3);
    let mut parts = vec!["t".to_string()];
    for _ in 0..depth {
        parts.push(NAMES[rng.random_range(0..NAMES.len())].to_string());
    }
    parts.join("/")
}

/// One random layer under `/t`: directories, files, symlinks (relative,
/// absolute, out of `/t`, dangling), whiteouts and opaque markers.
fn random_layer(rng: &mut StdRng) -> Vec<Entry> {
    let mut entries = vec![Entry::Dir("t".into(), 0o755)];
    for _ in 0..rng.random_range(1..8) {
        let p = random_path(rng);
        let e = match rng.random_range(0..6) {
            0 => Entry::Dir(p, 0o755),
            1 => Entry::File(p, 0o644, format!("{}\n", rng.random::<u16>()).into_bytes()),
            2 => {
                let targets = ["a", "../b", "/t/c", "/etc", "../../..", "nowhere"];
                Entry::Symlink(p, targets[rng.random_range(0..targets.len())].into())
            }
            3 | 4 => {
                let (dir, name) = p.rsplit_once('/').unwrap();
                Entry::File(format!("{dir}/.wh.{name}"), 0o644, Vec::new())
            }
            _ => {
                let dir = p.rsplit_once('/').map(|(d, _)| d.to_string()).unwrap();
                Entry::File(format!("{dir}/.wh..wh..opq"), 0o644, Vec::new())
            }
        };
        entries.push(e);
    }
    // As a real layer diff: one entry per path (the last wins), and every
    // entry's parents present as directories (replacing whatever a lower
    // layer had there).
    let path_of = |e: &Entry| match e {
        Entry::Dir(p, _) | Entry::File(p, _, _) | Entry::Symlink(p, _) => p.clone(),
    };
    let mut by_path: BTreeMap<String, Entry> = BTreeMap::new();
    for e in entries {
        let p = path_of(&e);
        let parts: Vec<&str> = p.split('/').collect();
        for i in 1..parts.len() {
            let d = parts[..i].join("/");
            by_path.insert(d.clone(), Entry::Dir(d, 0o755));
        }
        // A path that now has entries below it stays a directory.
        let below = format!("{p}/");
        if by_path.keys().any(|k| k.starts_with(&below)) {
            continue;
        }
        by_path.insert(p, e);
    }
    by_path.into_values().collect()
}

/// What a container sees under `/t`: every entry's type, mode, size and
/// link target or content checksum.
const LIST: &str = "cd /t 2>/dev/null || { echo no-t; exit 0; }; \
    busybox find . | busybox sort | while read -r p; do \
      if [ -L \"$p\" ]; then echo \"$p -> $(busybox readlink \"$p\")\"; \
      elif [ -d \"$p\" ]; then echo \"$p/ $(busybox stat -c %a \"$p\")\"; \
      else echo \"$p $(busybox stat -c '%a %s' \"$p\") $(busybox md5sum < \"$p\")\"; fi; done";

fn tree(ctrd: &Containerd, ns: &str, name: &str) -> String {
    let out = ctrd.ctr_in(ns, &["run", "--rm", "--snapshotter", "nix", name, &unique("c")]);
    assert!(
        out.status.success(),
        "{name} in {ns}: the listing container failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn random_layer_stacks_unpack_alike_through_image_load_and_ctr_import() {
    let cases: u64 = common::env_or("NST_LAYER_CASES", 10);
    let first: u64 = common::env_or("NST_LAYER_SEED", 1);
    let (tmp, daemon, ctrd) = common::plain_stack("layereq");
    let ns_import = format!("{}-import", ctrd.namespace);
    let ns_load = format!("{}-load", ctrd.namespace);
    let mut compared = 0;
    let mut entries = 0;
    for seed in first..first + cases {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut layers: Vec<Layer> = busybox_layers()
            .iter()
            .map(|l| Layer::from_tar(&lib::layer_tar(l), BTreeMap::new()))
            .collect();
        for _ in 0..rng.random_range(2..5) {
            layers.push(Layer::from_tar(
                &lib::layer_tar(&random_layer(&mut rng)),
                BTreeMap::new(),
            ));
        }
        let name = format!("docker.io/library/layers{seed}:latest");
        let archive = tmp.join(&format!("layers{seed}.tar"));
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Cmd": ["/bin/sh", "-c", LIST], "Env": ["PATH=/bin"] },
        });
        lib::write_archive(&archive, Some(&name), config, &layers).unwrap();

        let imported = ctrd.ctr_in(
            &ns_import,
            &["images", "import", "--snapshotter", "nix", archive.to_str().unwrap()],
        );
        let loaded = ctrd.image_load(&ns_load, &archive);
        assert_eq!(
            imported.status.success(),
            loaded.status.success(),
            "seed {seed}: ctr import {} / image load {}: {} / {}",
            imported.status,
            loaded.status,
            String::from_utf8_lossy(&imported.stderr),
            String::from_utf8_lossy(&loaded.stderr)
        );
        if !imported.status.success() {
            eprintln!(
                "seed {seed}: neither could unpack: {}",
                String::from_utf8_lossy(&imported.stderr).trim()
            );
            continue;
        }
        let want = tree(&ctrd, &ns_import, &name);
        let got = tree(&ctrd, &ns_load, &name);
        assert_eq!(got, want, "seed {seed}: image load differs from ctr import");
        compared += 1;
        entries += want.lines().count();
    }
    println!("{compared} of {cases} random layer stacks compared equal ({entries} entries under /t)");
    assert!(compared > 0, "no stack could be imported at all");
    assert!(entries > compared, "the stacks left nothing to compare");
    drop(ctrd);
    drop(daemon);
}
