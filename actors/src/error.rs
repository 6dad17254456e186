use std::path::{Path, PathBuf};

/// Everything the broker layer can report. Tests match on the variants.
#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    #[error(transparent)]
    Storage(#[from] runnel_storage::StorageError),

    #[error(transparent)]
    Cluster(#[from] runnel_cluster::ClusterError),

    #[error("raft: {0}")]
    Raft(#[from] raft::Error),

    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Replica metadata on disk that cannot be right.
    #[error("corrupt replica state in {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },

    /// An operation that the replica's current state does not allow.
    #[error("invalid replica state: {0}")]
    InvalidState(String),

    /// This replica is not the leader; `leader` is the one it knows of.
    #[error("not the leader (leader is {leader:?})")]
    NotLeader { leader: Option<u64> },

    /// Too many proposals are waiting to commit: retry later.
    #[error("too many proposals in flight (limit {0})")]
    Backpressure(usize),
}

impl ActorError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> ActorError {
        ActorError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether the error is damage to the replica's files (a checksum
    /// mismatch, a missing segment, unreadable metadata): retrying cannot
    /// help, only a rebuild from peers can. I/O errors (a full disk, a
    /// permission) are not damage.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            ActorError::Corrupt { .. } | ActorError::Storage(runnel_storage::StorageError::Corrupt { .. })
        )
    }

    pub(crate) fn corrupt(path: &Path, reason: impl Into<String>) -> ActorError {
        ActorError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, ActorError>;
