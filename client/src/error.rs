use crate::protocol::{BrokerError, MetadataError};

/// Everything a client call can fail with. [`crate::policy`] says which of
/// these leave a request's outcome unknown.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Cluster(#[from] runnel_cluster::ClusterError),
    #[error(transparent)]
    Storage(#[from] runnel_storage::StorageError),
    #[error(transparent)]
    Refused(#[from] MetadataError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A dataflow task's state could not be read (a pull query).
    #[error(transparent)]
    State(#[from] crate::tasks::StateError),
    #[error("topic {0:?} does not exist")]
    UnknownTopic(String),
    #[error("partition {partition} of topic {topic:?} does not exist (it has {partitions})")]
    PartitionOutOfRange {
        topic: String,
        partition: u32,
        partitions: u32,
    },
    #[error("record of {size_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    RecordTooLarge { size_bytes: usize, limit_bytes: usize },
    #[error("no node could serve partition {partition} of {topic:?} within {timeout_ms} ms: {last_error}")]
    Unavailable {
        topic: String,
        partition: u32,
        timeout_ms: u64,
        last_error: String,
    },
    #[error("unexpected answer from the cluster: {0}")]
    Protocol(String),
    /// A consumer-group request refused by the group's coordinator.
    #[error("{message}")]
    Group {
        kind: crate::protocol::GroupErrorKind,
        message: String,
    },
}

pub type ClientResult<T> = std::result::Result<T, ClientError>;
