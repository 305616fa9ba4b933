//! Generated gRPC types and stubs for the containerd APIs we serve and call.
//! The module tree mirrors the protobuf packages so cross-package references
//! in the generated code resolve.
#![allow(clippy::all, missing_docs)]

pub mod containerd {
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    pub mod services {
        pub mod snapshots {
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
        pub mod content {
            pub mod v1 {
                tonic::include_proto!("containerd.services.content.v1");
            }
        }
        pub mod images {
            pub mod v1 {
                tonic::include_proto!("containerd.services.images.v1");
            }
        }
        pub mod diff {
            pub mod v1 {
                tonic::include_proto!("containerd.services.diff.v1");
            }
        }
        pub mod leases {
            pub mod v1 {
                tonic::include_proto!("containerd.services.leases.v1");
            }
        }
    }
}

/// The Kubernetes CRI (package `runtime.v1`): the image service's messages.
pub mod runtime {
    pub mod v1 {
        tonic::include_proto!("runtime.v1");
    }
}

pub mod nixsnapshotter {
    pub mod admin {
        pub mod v1 {
            tonic::include_proto!("nixsnapshotter.admin.v1");
        }
    }
}

pub use containerd::services::content::v1 as content;
pub use containerd::services::diff::v1 as diff;
pub use containerd::services::images::v1 as images;
pub use containerd::services::leases::v1 as leases;
pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types::Mount;
pub use nixsnapshotter::admin::v1 as admin;
pub use runtime::v1 as cri;
