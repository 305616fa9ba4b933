//! Errors of the snapshotter core, shaped after containerd's errdefs so each
//! maps to the gRPC code containerd turns back into the same error class.

use std::io;
use std::path::PathBuf;

/// Result alias for the snapshotter core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The named snapshot (or parent) does not exist. Maps to NOT_FOUND.
    #[error("{0}")]
    NotFound(String),
    /// A snapshot with that key already exists. Maps to ALREADY_EXISTS.
    #[error("{0}")]
    AlreadyExists(String),
    /// The snapshot is in the wrong state for the call. Maps to FAILED_PRECONDITION.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request itself is malformed. Maps to INVALID_ARGUMENT.
    #[error("{0}")]
    InvalidArgument(String),
    /// A filesystem operation on the snapshotter's own state failed.
    #[error("{context} {}: {source}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The metadata database failed or holds something we cannot read.
    #[error("metadata database: {0}")]
    Database(String),
    /// Something the call needs cannot be had right now (a binary cache
    /// that does not answer, a fetch that timed out); trying again later
    /// may work. Maps to UNAVAILABLE.
    #[error("{0}")]
    Unavailable(String),
    /// The lazy store filesystem failed. Maps to INTERNAL.
    #[error("lazy store filesystem: {0}")]
    Fuse(String),
}

impl Error {
    /// Wraps an io::Error with what we were doing and to which path.
    pub fn io(context: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { context, path, source }
    }
}

macro_rules! db_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Database(e.to_string())
            }
        }
    )*};
}
db_error_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error
);

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::NotFound(_) => tonic::Status::not_found(msg),
            Error::AlreadyExists(_) => tonic::Status::already_exists(msg),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            Error::Unavailable(_) => tonic::Status::unavailable(msg),
            Error::Io { .. } | Error::Database(_) | Error::Fuse(_) => tonic::Status::internal(msg),
        }
    }
}
