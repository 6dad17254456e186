//! The broker's node-to-node wire messages (Raft batches, controller
//! requests), postcard-encoded inside the cluster layer's envelopes.
//! Variants are tagged by position: **append new variants at the end; never
//! reorder or remove one.**
//!
//! The client protocol (`ClientRequest`, `ClientResponse` and the types they
//! carry) lives in `runnel_client::protocol`; it is re-exported here.

pub use runnel_client::protocol::{
    decode_payload, encode_payload, Acks, BrokerError, ClientRequest, ClientResponse, GroupId, NodeId, PartitionInfo,
    ReplicaHealthInfo, TopicInfo, CLIENT_ACTOR,
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
    pub group: GroupId,
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
        group: GroupId,
        node: NodeId,
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
        group: GroupId,
    },
    /// To a replica of `group`: the asking node's replica is passive since
    /// a leader's commit index `since`; answered with
    /// [`ControllerResponse::Passive`] (see `ReplicaCore::judge_passive`).
    PassiveReplica {
        group: GroupId,
        node: NodeId,
        since: u64,
    },
    /// Place and start a SQL query's dataflow whose topics exist.
    StartQuery {
        dataflow: crate::metadata::DataflowMeta,
        plan: Box<crate::metadata::Plan>,
        object: Option<Box<crate::metadata::SqlObject>>,
    },
    CreateObject {
        object: Box<crate::metadata::SqlObject>,
    },
    DropObject {
        name: String,
    },
    /// To the leader of `group`: `node`'s replica has damaged files; remove
    /// it from the voters, so that it can rejoin empty as a new learner
    /// (the leader's record of what it held must go with the files).
    RemoveDamaged {
        group: GroupId,
        node: NodeId,
    },
    /// Record where Kafka clients reach `node` (none: it serves no Kafka
    /// listener).
    KafkaListener {
        node: NodeId,
        advertised: Option<String>,
    },
    /// Change settings of a topic; only the controller leader does it.
    AlterTopic {
        name: String,
        settings: Vec<crate::metadata::TopicSetting>,
    },
    /// Grow a topic to `partitions` in all; only the controller leader
    /// places them.
    AddPartitions {
        name: String,
        partitions: u32,
    },
    /// Start a new generation of a stopped dataflow.
    ResetDataflow {
        name: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControllerResponse {
    Log { batches: Vec<serde_bytes::ByteBuf> },
    Done,
    Refused(crate::metadata::MetadataError),
    Failed(BrokerError),
    Offset(u64),
    Members { voters: Vec<NodeId>, learners: Vec<NodeId> },
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
        let sample = dataflow.clone();
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
            ControllerRequest::ReplicaFailed {
                group: GroupId(0),
                node: NodeId(0),
            },
            ControllerRequest::StartDataflow { dataflow },
            ControllerRequest::StopDataflow { name: String::new() },
            ControllerRequest::GroupMembers { group: GroupId(0) },
            ControllerRequest::PassiveReplica {
                group: GroupId(0),
                node: NodeId(0),
                since: 0,
            },
            ControllerRequest::StartQuery {
                dataflow: sample.clone(),
                plan: Box::new(crate::metadata::tests::sample_plan()),
                object: None,
            },
            ControllerRequest::CreateObject {
                object: crate::metadata::tests::sample_object(),
            },
            ControllerRequest::DropObject { name: String::new() },
            ControllerRequest::RemoveDamaged {
                group: GroupId(0),
                node: NodeId(0),
            },
            ControllerRequest::KafkaListener {
                node: NodeId(0),
                advertised: None,
            },
            ControllerRequest::AlterTopic {
                name: String::new(),
                settings: Vec::new(),
            },
            ControllerRequest::AddPartitions {
                name: String::new(),
                partitions: 1,
            },
            ControllerRequest::ResetDataflow { name: String::new() },
        ];
        let tags: Vec<u8> = requests.iter().map(tag).collect();
        assert_eq!(tags, (0..=17).collect::<Vec<u8>>());
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
}
