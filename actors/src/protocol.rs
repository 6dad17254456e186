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
}
