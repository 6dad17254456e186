//! The broker's node-to-node wire messages (Raft batches, controller
//! requests), postcard-encoded inside the cluster layer's envelopes.
//! Variants are tagged by position: **append new variants at the end; never
//! reorder or remove one.**
//!
//! The client protocol (`ClientRequest`, `ClientResponse` and the types they
//! carry) lives in `runnel_client::protocol`; it is re-exported here.

pub use runnel_client::protocol::{
    Acks, BrokerError, ClientRequest, ClientResponse, PartitionInfo, ReplicaHealthInfo, TopicInfo, CLIENT_ACTOR,
};
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

/// The cluster-directory name of each node's controller service (node to node).
pub const CONTROLLER_ACTOR: &str = "broker.controller";

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
