use std::net::SocketAddr;
use std::path::PathBuf;

use crate::NodeId;

/// Everything the cluster layer can report. Tests match on the variants.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Certificates or keys that cannot be used, with what is wrong.
    #[error("TLS setup: {0}")]
    Tls(String),

    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    /// A frame that does not decode, is too large, or has an unknown version.
    #[error("bad frame: {0}")]
    BadFrame(String),

    #[error("node {0} is not known to this node")]
    UnknownNode(NodeId),

    #[error("no actor named {name:?} on node {node}")]
    UnknownActor { node: NodeId, name: String },

    #[error("actor name {0:?} is already registered on this node")]
    NameTaken(String),

    /// A bounded queue is full: the caller should slow down and retry.
    #[error("queue towards {0} is full")]
    Backpressure(String),

    #[error("call to {name:?} on node {node} timed out after {timeout_ms} ms")]
    CallTimeout {
        node: NodeId,
        name: String,
        timeout_ms: u64,
    },

    #[error("too many calls in flight (limit {0})")]
    TooManyCalls(usize),

    /// Could not reach any address given.
    #[error("could not reach the cluster through {addrs:?}: {last_error}")]
    Unreachable { addrs: Vec<SocketAddr>, last_error: String },

    /// The request was sent but no answer came: it may or may not have
    /// taken effect.
    #[error("sent to {addr} but got no answer ({reason}); the request may or may not have taken effect")]
    NoAnswer { addr: SocketAddr, reason: String },

    #[error("the node is shutting down")]
    ShuttingDown,

    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
}

pub type Result<T> = std::result::Result<T, ClusterError>;

pub(crate) fn io_at(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Io {
        path: path.to_path_buf(),
        source,
    }
}
