//! Every message the broker puts on the wire, postcard-encoded inside the
//! cluster layer's envelopes. Variants are tagged by position: **append new
//! variants at the end; never reorder or remove one.**

use serde::{Deserialize, Serialize};

/// The cluster-directory name of each node's Raft message inbox.
pub const RAFT_ACTOR: &str = "broker.raft";

/// Raft messages from one node to another, for any number of groups: one
/// cluster message per ready round per peer, however many groups spoke.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftBatch {
    pub messages: Vec<GroupMessage>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMessage {
    pub group: u64,
    /// A protobuf-encoded `raft::eraftpb::Message`.
    #[serde(with = "serde_bytes")]
    pub message: Vec<u8>,
}

/// How much durability a produce waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Acks {
    /// Answer once the batch is committed on a majority (the default).
    All,
    /// Answer once the leader has appended the batch.
    Leader,
    /// Answer as soon as the leader accepted the proposal.
    None,
}

/// Why a broker refused or failed a request. The text names the problem.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum BrokerError {
    #[error("not the leader of group {group}; the leader is node {leader:?}")]
    NotLeader { group: u64, leader: Option<u64> },
    #[error("no replica of group {0} on this node")]
    UnknownGroup(u64),
    #[error("the batch was proposed by a leader that lost its term before it committed; retry")]
    LeadershipLost,
    #[error("record batch of {size_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    BatchTooLarge { size_bytes: usize, limit_bytes: usize },
    #[error("too many produce requests waiting on group {0}; retry")]
    Busy(u64),
    #[error("offset {offset} is out of range [{start}, {end})")]
    OffsetOutOfRange { offset: u64, start: u64, end: u64 },
    #[error("replica of group {group} failed: {reason}")]
    ReplicaFailed { group: u64, reason: String },
    /// The outcome is unknown: the batch may or may not be written.
    #[error("no answer from the replica of group {0} in time; the outcome is unknown")]
    Timeout(u64),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// An idempotent producer skipped sequence numbers: records are missing.
    #[error("out-of-order sequence from producer {producer_id}: expected {expected}, got {got}")]
    OutOfOrderSequence { producer_id: i64, expected: i32, got: i32 },
    /// A batch older than anything the partition remembers of its producer.
    #[error("stale sequence {got} from producer {producer_id} (its last is {last_sequence})")]
    StaleSequence {
        producer_id: i64,
        last_sequence: i32,
        got: i32,
    },
    /// A batch starting at a stored batch's first sequence with another
    /// length. The stored batch is committed.
    #[error(
        "producer {producer_id} sent sequence {base_sequence} again with other records (the stored batch ends at {stored_last_sequence})"
    )]
    SequenceMismatch {
        producer_id: i64,
        base_sequence: i32,
        stored_last_sequence: i32,
    },
    /// The producer's earlier batch this one is judged against is not yet
    /// committed; retry shortly.
    #[error("the producer's previous batch in group {0} is not committed yet; retry")]
    NotYetCommitted(u64),
}

/// The cluster-directory name of each node's controller service (node to node).
pub const CONTROLLER_ACTOR: &str = "broker.controller";
/// The cluster-directory name of each node's client service.
pub const CLIENT_ACTOR: &str = "client.broker";

/// What a node asks a controller node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControllerRequest {
    /// Committed controller log from `offset` (batches as bytes).
    FetchLog {
        offset: u64,
        max_bytes: u32,
    },
    /// Create a topic; only the controller leader does it.
    CreateTopic {
        name: String,
        config: crate::metadata::TopicConfig,
    },
    DeleteTopic {
        name: String,
    },
    /// Move replicas from the most to the least loaded live nodes.
    Rebalance,
    /// The controller log's commit point, from the leader only.
    CommittedOffset,
    /// `node`'s replica of `group` failed for good (its supervisor gave up):
    /// place it elsewhere.
    ReplicaFailed {
        group: u64,
        node: u32,
    },
    /// Place and start a dataflow whose topics exist (placement empty).
    StartDataflow {
        dataflow: crate::metadata::DataflowMeta,
    },
    StopDataflow {
        name: String,
    },
    /// The Raft configuration of `group`, from its leader only.
    GroupMembers {
        group: u64,
    },
    /// To a replica of `group`: the asking node's replica is passive since
    /// a leader's commit index `since`; answered with
    /// [`ControllerResponse::Passive`] (see `ReplicaCore::judge_passive`).
    PassiveReplica {
        group: u64,
        node: u64,
        since: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControllerResponse {
    Log { batches: Vec<serde_bytes::ByteBuf> },
    Done,
    Refused(crate::metadata::MetadataError),
    Failed(BrokerError),
    Offset(u64),
    Members { voters: Vec<u64>, learners: Vec<u64> },
    Passive(PassiveAnswer),
}

/// A peer's word to a passive replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PassiveAnswer {
    /// A committed change after it first heard from a leader made it a
    /// voter: it votes from now on.
    Promoted,
    /// This leader counted it as a voter from before; it demotes it to a
    /// learner, to be promoted once caught up.
    Demoting,
    /// Nothing known here.
    Unknown,
}

/// What a client asks any node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    Metadata,
    CreateTopic {
        name: String,
        config: crate::metadata::TopicConfig,
    },
    DeleteTopic {
        name: String,
    },
    Produce {
        topic: String,
        partition: u32,
        acks: Acks,
        #[serde(with = "serde_bytes")]
        batch: Vec<u8>,
    },
    Fetch {
        topic: String,
        partition: u32,
        offset: u64,
        max_bytes: u32,
        any_replica: bool,
    },
    DescribeTopic {
        name: String,
    },
    /// The first committed offset whose record timestamp is at least `timestamp_ms`.
    OffsetForTimestamp {
        topic: String,
        partition: u32,
        timestamp_ms: i64,
    },
    /// Restarts and failures of the answering node's replicas.
    ReplicaHealth,
    /// Test-only fault hook: the answering node's replica of the partition
    /// panics. Refused unless the node runs with test fault hooks enabled.
    InjectPanic {
        topic: String,
        partition: u32,
    },
    /// Spread replicas evenly over the live nodes (answered `Done`).
    Rebalance,
    /// Start a dataflow registered in the nodes' binary (answered `Done`).
    StartDataflow {
        name: String,
    },
    StopDataflow {
        name: String,
    },
    /// Running dataflows and their task placement (answered `Dataflows`).
    Dataflows,
    /// Figures of the dataflow tasks running on the answering node.
    DataflowTasks,
}

/// How one replica on a node has fared (its supervisor's record).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaHealthInfo {
    pub group: u64,
    pub restarts: u32,
    pub failed: bool,
    pub last_failure: Option<String>,
}

/// A partition as clients see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionInfo {
    pub partition: u32,
    pub replicas: Vec<u32>,
    /// The leader, where the answering node knows it.
    pub leader: Option<u32>,
    pub committed_offset: Option<u64>,
    pub end_offset: Option<u64>,
    pub voters: Vec<u32>,
    pub learners: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicInfo {
    pub name: String,
    pub config: crate::metadata::TopicConfig,
    pub partitions: Vec<PartitionInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientResponse {
    Metadata {
        topics: Vec<TopicInfo>,
        nodes: Vec<(u32, std::net::SocketAddr)>,
        /// The controller leader, as the answering node knows it.
        controller_leader: Option<u32>,
    },
    Done,
    Produced {
        base_offset: u64,
    },
    Fetched {
        batches: Vec<serde_bytes::ByteBuf>,
        start_offset: u64,
        committed_offset: u64,
    },
    Topic(TopicInfo),
    Refused(crate::metadata::MetadataError),
    Failed(BrokerError),
    UnknownTopic(String),
    PartitionOutOfRange {
        topic: String,
        partition: u32,
        partitions: u32,
    },
    /// The answering node has no replica of the partition; try these nodes.
    NotHere {
        replicas: Vec<u32>,
    },
    /// An offset, or none (every committed record is older).
    Offset(Option<u64>),
    Health(Vec<ReplicaHealthInfo>),
    Dataflows(Vec<crate::metadata::DataflowMeta>),
    Tasks(Vec<crate::tasks::TaskStatus>),
}

#[cfg(test)]
mod tests {
    //! Postcard tags enums by variant position. These tests pin every
    //! variant's tag: a change that reorders, removes or inserts a variant
    //! fails here. A retired tag stays retired (keep the variant, or a
    //! placeholder, in its place).

    use super::*;
    use crate::metadata::{DataflowMeta, MetadataError, TopicConfig};

    fn tag<T: Serialize>(value: &T) -> u8 {
        postcard::to_allocvec(value).expect("encodes")[0]
    }

    #[test]
    fn controller_request_tags_are_pinned() {
        let dataflow = DataflowMeta {
            name: String::new(),
            source: String::new(),
            sink: String::new(),
            stages: 1,
            partitions: 1,
            placement: Vec::new(),
        };
        let requests = [
            ControllerRequest::FetchLog {
                offset: 0,
                max_bytes: 0,
            },
            ControllerRequest::CreateTopic {
                name: String::new(),
                config: TopicConfig::new(1, 1),
            },
            ControllerRequest::DeleteTopic { name: String::new() },
            ControllerRequest::Rebalance,
            ControllerRequest::CommittedOffset,
            ControllerRequest::ReplicaFailed { group: 0, node: 0 },
            ControllerRequest::StartDataflow { dataflow },
            ControllerRequest::StopDataflow { name: String::new() },
            ControllerRequest::GroupMembers { group: 0 },
            ControllerRequest::PassiveReplica {
                group: 0,
                node: 0,
                since: 0,
            },
        ];
        let tags: Vec<u8> = requests.iter().map(tag).collect();
        assert_eq!(tags, (0..=9).collect::<Vec<u8>>());
    }

    #[test]
    fn controller_response_tags_are_pinned() {
        let responses = [
            ControllerResponse::Log { batches: Vec::new() },
            ControllerResponse::Done,
            ControllerResponse::Refused(MetadataError::NoLiveNodes),
            ControllerResponse::Failed(BrokerError::LeadershipLost),
            ControllerResponse::Offset(0),
            ControllerResponse::Members {
                voters: Vec::new(),
                learners: Vec::new(),
            },
            ControllerResponse::Passive(PassiveAnswer::Unknown),
        ];
        let tags: Vec<u8> = responses.iter().map(tag).collect();
        assert_eq!(tags, (0..=6).collect::<Vec<u8>>());
    }

    #[test]
    fn passive_answer_tags_are_pinned() {
        let answers = [PassiveAnswer::Promoted, PassiveAnswer::Demoting, PassiveAnswer::Unknown];
        let tags: Vec<u8> = answers.iter().map(tag).collect();
        assert_eq!(tags, vec![0, 1, 2]);
    }

    #[test]
    fn metadata_error_tags_are_pinned() {
        let errors = [
            MetadataError::InvalidName {
                name: String::new(),
                reason: String::new(),
            },
            MetadataError::TopicExists(String::new()),
            MetadataError::UnknownTopic(String::new()),
            MetadataError::InvalidConfig(String::new()),
            MetadataError::NotEnoughNodes {
                replication: 0,
                live: 0,
            },
            MetadataError::DataflowRunning(String::new()),
            MetadataError::UnknownDataflow(String::new()),
            MetadataError::UnregisteredDataflow(String::new()),
            MetadataError::NoLiveNodes,
        ];
        let tags: Vec<u8> = errors.iter().map(tag).collect();
        assert_eq!(tags, (0..=8).collect::<Vec<u8>>());
    }
}
