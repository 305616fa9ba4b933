//! Compiles our own definitions of containerd's gRPC APIs and of our admin
//! API (see `proto/`) with
//! protox, a pure-Rust protobuf compiler, so building needs no `protoc` binary.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/containerd/services/snapshots/v1/snapshots.proto",
        "proto/containerd/services/content/v1/content.proto",
        "proto/containerd/services/images/v1/images.proto",
        "proto/containerd/services/leases/v1/leases.proto",
        "proto/containerd/services/diff/v1/diff.proto",
        "proto/nixsnapshotter/admin/v1/admin.proto",
        "proto/k8s/cri/runtime/v1/images.proto",
        "proto/k8s/cri/runtime/v1/runtime.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
