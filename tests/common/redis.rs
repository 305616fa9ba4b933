//! Debian's redis, packaged the Nix way for tests: the binaries and each
//! group of shared libraries in store paths of their own, the binaries
//! patched with patchelf to load their interpreter and libraries from the
//! store (the Go project's redis example, without nixpkgs).

use super::nix::{derivation, NixStore};

/// Builds it in `nix`; returns the redis store path (`bin/redis-server`,
/// `bin/redis-cli`).
pub fn build(nix: &NixStore) -> String {
    let libs = [
        ("glibc", vec!["libc.so.6", "libm.so.6", "ld-linux-x86-64.so.2"]),
        ("gcc-libs", vec!["libatomic.so.1", "libgcc_s.so.1", "libstdc++.so.6"]),
        (
            "compression",
            vec!["liblzf.so.1", "liblzma.so.5", "libzstd.so.1", "liblz4.so.1"],
        ),
        ("openssl", vec!["libssl.so.3", "libcrypto.so.3"]),
        (
            "systemd-libs",
            vec!["libsystemd.so.0", "libcap.so.2", "libgcrypt.so.20", "libgpg-error.so.0"],
        ),
        ("jemalloc", vec!["libjemalloc.so.2"]),
    ];
    let mut attrs = String::new();
    for (name, files) in &libs {
        let cp: Vec<String> = files
            .iter()
            .map(|f| format!("b cp -L /lib/x86_64-linux-gnu/{f} $out/lib/"))
            .collect();
        attrs.push_str(&format!(
            "{} = {};\n",
            name.replace('-', "_"),
            derivation(
                &format!("redis-{name}"),
                &format!("b mkdir -p $out/lib; {}", cp.join("; ")),
                &[]
            )
        ));
    }
    let rpath: Vec<String> = libs
        .iter()
        .map(|(n, _)| format!("${{{}}}/lib", n.replace('-', "_")))
        .collect();
    let patch = |bin: &str| {
        format!(
            "b chmod u+w $out/bin/{bin}; /usr/bin/patchelf --set-interpreter ${{glibc}}/lib/ld-linux-x86-64.so.2 --force-rpath --set-rpath {} $out/bin/{bin}",
            rpath.join(":")
        )
    };
    let redis = derivation(
        "redis",
        &format!(
            "b mkdir -p $out/bin; b cp /usr/bin/redis-check-rdb $out/bin/; b ln -s redis-check-rdb $out/bin/redis-server; b cp /usr/bin/redis-cli $out/bin/; {}; {}",
            patch("redis-check-rdb"),
            patch("redis-cli")
        ),
        &libs.iter().map(|(n, _)| n).map(|n| n.replace('-', "_")).collect::<Vec<_>>().iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let outs = nix.build_with_host(&format!("rec {{ {attrs} redis = {redis}; }}"));
    outs.iter().find(|o| o.ends_with("-redis")).unwrap().clone()
}
