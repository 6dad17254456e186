//! The client protocol: every message a client and a node's client service
//! exchange, postcard-encoded inside the cluster layer's
//! `NodeRequest::Service` envelope, and the types those messages carry.
//!
//! Enums are tagged by position: **append new variants at the end; never
//! reorder or remove one.** A retired variant keeps its place (and its tag)
//! forever; `tests::tags_are_pinned` fails if a tag moves.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Node ids are the cluster layer's, in every message.
pub use runnel_cluster::NodeId;

use crate::tasks::TaskStatus;

/// A Raft group: the controller ([`GroupId::CONTROLLER`]) or one partition.
/// Transparent in serde, so postcard and JSON encode it exactly like the
/// bare `u64` it wraps.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GroupId(pub u64);

impl GroupId {
    /// The controller's group; partition groups are never 0.
    pub const CONTROLLER: GroupId = GroupId(0);

    /// For log lines: `topic/partition (group N)` once this process's
    /// metadata named the group (see [`name_groups`]), `controller` for
    /// group 0, else `group N`.
    pub fn named(self) -> NamedGroup {
        NamedGroup(self)
    }
}

/// The `topic/partition` names of the partition groups this process's
/// nodes know, for log lines (as many as the metadata has partitions).
static GROUP_NAMES: std::sync::RwLock<BTreeMap<GroupId, String>> = std::sync::RwLock::new(BTreeMap::new());

/// Replaces the names [`GroupId::named`] shows (a node calls it when its
/// metadata changes).
pub fn name_groups(names: BTreeMap<GroupId, String>) {
    *GROUP_NAMES.write().unwrap_or_else(|p| p.into_inner()) = names;
}

/// A group shown by name (see [`GroupId::named`]).
pub struct NamedGroup(GroupId);

impl std::fmt::Display for NamedGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == GroupId::CONTROLLER {
            return f.write_str("controller");
        }
        let names = GROUP_NAMES.read().unwrap_or_else(|p| p.into_inner());
        match names.get(&self.0) {
            Some(name) => write!(f, "{name} (group {})", self.0),
            None => write!(f, "group {}", self.0),
        }
    }
}

/// Forwards the formatter, so widths and alignment apply as they do to the
/// bare number.
impl std::fmt::Display for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

/// The bare number, like `Display`: group ids in `{:?}` output read as they
/// did when they were plain integers.
impl std::fmt::Debug for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

/// The cluster-directory name of each node's client service.
pub const CLIENT_ACTOR: &str = "client.broker";

/// Every payload Runnel puts inside the cluster layer's envelopes — client
/// requests and answers, and the broker's node-to-node messages — is
/// `[PAYLOAD_MAGIC, PAYLOAD_VERSION, postcard body]` ([`encode_payload`],
/// [`decode_payload`]). The cluster envelope's own version covers only the
/// cluster layer; this one lets a node refuse, by name, a payload of a
/// broker protocol it does not speak instead of misreading it. The magic
/// byte can never start an unversioned payload (a postcard enum tag below
/// 0x80).
pub const PAYLOAD_MAGIC: u8 = 0xB5;
/// Version 2: `TopicConfig` gained `cleanup` and `delete_retention_ms`.
/// Version 3: and `min_compaction_lag_ms`.
pub const PAYLOAD_VERSION: u8 = 3;

/// Why a payload could not be encoded or read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload format version {0} is unknown here (this side speaks version {PAYLOAD_VERSION}); run the same runnel version on both sides")]
    UnknownVersion(u8),
    #[error("payload has no format header; the sender runs an older runnel")]
    Unversioned,
    #[error("payload does not decode: {0}")]
    Malformed(String),
    #[error("payload does not encode: {0}")]
    Unencodable(String),
}

/// A value as a versioned payload.
pub fn encode_payload<T: Serialize>(value: &T) -> Result<Vec<u8>, PayloadError> {
    postcard::to_extend(value, vec![PAYLOAD_MAGIC, PAYLOAD_VERSION])
        .map_err(|e| PayloadError::Unencodable(e.to_string()))
}

/// A value from a versioned payload; any other version is refused by name.
pub fn decode_payload<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, PayloadError> {
    match payload {
        [PAYLOAD_MAGIC, PAYLOAD_VERSION, body @ ..] => {
            postcard::from_bytes(body).map_err(|e| PayloadError::Malformed(e.to_string()))
        }
        [PAYLOAD_MAGIC, version, ..] => Err(PayloadError::UnknownVersion(*version)),
        _ => Err(PayloadError::Unversioned),
    }
}
/// Partitions of one topic at most.
pub const PARTITIONS_MAX: u32 = 10_000;
/// Replicas of one partition at most.
pub const REPLICATION_MAX: u16 = 7;

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
    NotLeader { group: GroupId, leader: Option<NodeId> },
    #[error("no replica of group {0} on this node")]
    UnknownGroup(GroupId),
    #[error("the batch was proposed by a leader that lost its term before it committed; retry")]
    LeadershipLost,
    #[error("record batch of {size_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    BatchTooLarge { size_bytes: usize, limit_bytes: usize },
    #[error("too many produce requests waiting on group {0}; retry")]
    Busy(GroupId),
    #[error("offset {offset} is out of range [{start}, {end})")]
    OffsetOutOfRange { offset: u64, start: u64, end: u64 },
    #[error("replica of group {group} failed: {reason}")]
    ReplicaFailed { group: GroupId, reason: String },
    /// The outcome is unknown: the batch may or may not be written.
    #[error("no answer from the replica of group {0} in time; the outcome is unknown")]
    Timeout(GroupId),
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
    NotYetCommitted(GroupId),
    /// The answering node could not bring its metadata up to the
    /// controller's commit point (it just restarted, or cannot reach the
    /// controller), so it will not give a negative answer; retry.
    #[error("this node's metadata is behind the controller's ({0}); retry")]
    MetadataBehind(String),
    /// acks=all refused: fewer replicas are in sync than the topic's
    /// `min.insync.replicas`. Nothing was written.
    #[error(
        "group {group} has {in_sync} in-sync replicas, fewer than min.insync.replicas={required}; nothing was written, retry when replicas return"
    )]
    NotEnoughReplicas {
        group: GroupId,
        in_sync: u16,
        required: u16,
    },
    /// acks=all: the batch was committed, but fewer replicas than the
    /// topic's `min.insync.replicas` hold it and no more are in sync.
    #[error(
        "group {group}: the batch was written and committed, but only {copies} replicas hold it, fewer than min.insync.replicas={required}"
    )]
    NotEnoughReplicasAfterAppend { group: GroupId, copies: u16, required: u16 },
    /// A batch of an older epoch than the producer's newest on this
    /// partition: the producer was fenced (a newer incarnation took over).
    /// Nothing was written by this request.
    #[error("producer {producer_id} of epoch {epoch} is fenced: the partition has its epoch {newest_epoch}")]
    ProducerFenced {
        producer_id: i64,
        epoch: i16,
        newest_epoch: i16,
    },
}

/// Why a metadata change was refused. The text names the problem.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MetadataError {
    #[error("topic name {name:?} is invalid: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    #[error("topic {0:?} does not exist")]
    UnknownTopic(String),
    #[error("invalid topic settings: {0}")]
    InvalidConfig(String),
    #[error("replication factor {replication} is more than the {live} live nodes")]
    NotEnoughNodes { replication: u16, live: usize },
    #[error("dataflow {0:?} is already running")]
    DataflowRunning(String),
    #[error("dataflow {0:?} is not running")]
    UnknownDataflow(String),
    #[error("dataflow {0:?} is not registered in this node's binary")]
    UnregisteredDataflow(String),
    #[error("no live node to run dataflow tasks on")]
    NoLiveNodes,
    #[error("a stream or table named {0} already exists")]
    ObjectExists(String),
    #[error("no stream or table named {0}")]
    UnknownObject(String),
    #[error("{name} is used by running queries {queries:?}; TERMINATE them first")]
    ObjectInUse { name: String, queries: Vec<String> },
    /// A topic a running dataflow reads, writes or keeps its state in.
    #[error(
        "topic {topic:?} is used by running dataflows {dataflows:?}; stop them first (`runnel dataflow stop NAME`, or TERMINATE for a SQL query)"
    )]
    TopicInUse { topic: String, dataflows: Vec<String> },
}

/// Settings of a topic: partitions grow with `AddPartitions`, the
/// replication factor is fixed at creation, the rest change with
/// `AlterTopic`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    pub partitions: u32,
    pub replication: u16,
    /// Replicas that must hold a record before `acks=all` answers; Raft's
    /// majority is the floor.
    pub min_insync: u16,
    /// Closed segments older than this go (when `cleanup` deletes).
    pub retention_ms: Option<u64>,
    /// `cleanup.policy` (controller-log format 6 and payload version 2 on).
    pub cleanup: CleanupPolicy,
    /// `delete.retention.ms`: how long compaction keeps a key's tombstone.
    pub delete_retention_ms: u64,
    /// `min.compaction.lag.ms`: records stay uncompacted at least this long
    /// (controller-log format 7 and payload version 3 on).
    pub min_compaction_lag_ms: u64,
}

/// `delete.retention.ms`'s default, as Kafka's: a day.
pub const DELETE_RETENTION_MS_DEFAULT: u64 = 24 * 3600 * 1000;

/// What happens to a topic's old records (Kafka's `cleanup.policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CleanupPolicy {
    /// Closed segments past `retention.ms` are deleted.
    #[default]
    Delete,
    /// Closed segments keep only the latest record of each key.
    Compact,
    /// Both.
    CompactDelete,
}

impl CleanupPolicy {
    /// From Kafka's spelling: `delete`, `compact`, or both joined by a comma.
    pub fn parse(value: &str) -> Result<CleanupPolicy, String> {
        let mut parts: Vec<&str> = value.split(',').map(str::trim).collect();
        parts.sort_unstable();
        parts.dedup();
        match parts.as_slice() {
            ["delete"] => Ok(CleanupPolicy::Delete),
            ["compact"] => Ok(CleanupPolicy::Compact),
            ["compact", "delete"] => Ok(CleanupPolicy::CompactDelete),
            _ => Err(format!(
                "cleanup.policy {value:?} is not one of delete, compact, compact,delete"
            )),
        }
    }

    /// Kafka's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CleanupPolicy::Delete => "delete",
            CleanupPolicy::Compact => "compact",
            CleanupPolicy::CompactDelete => "compact,delete",
        }
    }

    pub fn compacts(self) -> bool {
        self != CleanupPolicy::Delete
    }

    pub fn deletes(self) -> bool {
        self != CleanupPolicy::Compact
    }
}

impl TopicConfig {
    pub fn new(partitions: u32, replication: u16) -> TopicConfig {
        TopicConfig {
            partitions,
            replication,
            min_insync: replication / 2 + 1,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            cleanup: CleanupPolicy::Delete,
            delete_retention_ms: DELETE_RETENTION_MS_DEFAULT,
            min_compaction_lag_ms: 0,
        }
    }

    pub fn validate(&self) -> Result<(), MetadataError> {
        let fail = |why: String| Err(MetadataError::InvalidConfig(why));
        if self.partitions == 0 || self.partitions > PARTITIONS_MAX {
            return fail(format!(
                "partitions must be in [1, {PARTITIONS_MAX}], not {}",
                self.partitions
            ));
        }
        if self.replication == 0 || self.replication > REPLICATION_MAX {
            return fail(format!(
                "replication must be in [1, {REPLICATION_MAX}], not {}",
                self.replication
            ));
        }
        if self.min_insync == 0 || self.min_insync > self.replication {
            return fail(format!(
                "min-insync must be in [1, {}], not {}",
                self.replication, self.min_insync
            ));
        }
        Ok(())
    }
}

/// A running dataflow and where its tasks run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataflowMeta {
    pub name: String,
    pub source: String,
    pub sink: String,
    pub stages: u32,
    /// Source partitions, and so tasks per stage.
    pub partitions: u32,
    /// The node running each task (task = stage * partitions + partition).
    pub placement: Vec<NodeId>,
}

/// What a client asks any node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    Metadata,
    CreateTopic {
        name: String,
        config: TopicConfig,
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
    /// Start a SQL query's dataflow from its plan, naming the stream or
    /// table it writes (answered `Done`). Its sink and internal topics are
    /// made when missing.
    StartQuery {
        name: String,
        plan: Box<crate::plan::Plan>,
        object: Option<Box<crate::plan::SqlObject>>,
    },
    /// Name a stream or table of the SQL catalog (answered `Done`).
    CreateObject {
        object: crate::plan::SqlObject,
    },
    DropObject {
        name: String,
    },
    /// The SQL catalog and the running queries' plans (answered `Catalog`).
    Catalog,
    /// The answering node's replicas that are no longer run (damaged
    /// files, or too many crashes), by partition (answered `FailedReplicas`).
    FailedReplicas,
    /// A consumer-group request (answered `Group`); all but
    /// `FindCoordinator` and `List` go to the group's coordinator.
    Group(GroupRequest),
    /// Changes settings of a topic (answered `Done`); at most
    /// [`TOPIC_SETTINGS_MAX`].
    AlterTopic {
        name: String,
        settings: Vec<TopicSetting>,
    },
    /// Grows a topic to `partitions` partitions in all (answered `Done`);
    /// the new ones are placed on live nodes.
    AddPartitions {
        name: String,
        partitions: u32,
    },
    /// Starts a new generation of a stopped dataflow (answered `Done`):
    /// started again, its tasks write with the next producer epoch.
    ResetDataflow {
        name: String,
    },
    /// Reads a dataflow task's state on the node running it (answered
    /// `State`): the rows of `key` (the postcard key its stage groups by),
    /// or every row without one. What a pull query sends.
    ReadState {
        dataflow: String,
        task: u32,
        key: Option<serde_bytes::ByteBuf>,
    },
    /// Deletes a partition's records below `before_offset` (below the
    /// commit point for `None`), as Kafka's DeleteRecords: readers start
    /// there from now on (answered `Offset` with the new start). Sent to
    /// the partition's leader.
    DeleteRecords {
        topic: String,
        partition: u32,
        before_offset: Option<u64>,
    },
}

/// Settings one `AlterTopic` changes at most.
pub const TOPIC_SETTINGS_MAX: usize = 16;

/// One setting `AlterTopic` changes. Tagged by position: append new
/// variants at the end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TopicSetting {
    /// `min.insync.replicas`.
    MinInsync(u16),
    /// `retention.ms`; none keeps records forever.
    RetentionMs(Option<u64>),
    /// `cleanup.policy` (controller-log format 6 on).
    Cleanup(CleanupPolicy),
    /// `delete.retention.ms` (controller-log format 6 on).
    DeleteRetentionMs(u64),
    /// `min.compaction.lag.ms` (controller-log format 7 on).
    MinCompactionLagMs(u64),
}

impl TopicSetting {
    /// `config` with this setting changed (not validated).
    pub fn apply_to(&self, config: &mut TopicConfig) {
        match self {
            TopicSetting::MinInsync(n) => config.min_insync = *n,
            TopicSetting::RetentionMs(ms) => config.retention_ms = *ms,
            TopicSetting::Cleanup(policy) => config.cleanup = *policy,
            TopicSetting::DeleteRetentionMs(ms) => config.delete_retention_ms = *ms,
            TopicSetting::MinCompactionLagMs(ms) => config.min_compaction_lag_ms = *ms,
        }
    }
}

/// Consumer-group requests: membership (Kafka's group protocol), committed
/// offsets, and administration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupRequest {
    /// The node coordinating `group` (answered `Coordinator`).
    FindCoordinator {
        group: String,
    },
    Join {
        group: String,
        /// Empty for a new member.
        member_id: String,
        client_id: String,
        protocol_type: String,
        /// (protocol name, metadata) in order of preference.
        protocols: Vec<(String, serde_bytes::ByteBuf)>,
        session_timeout_ms: u64,
        rebalance_timeout_ms: u64,
    },
    Sync {
        group: String,
        generation: i32,
        member_id: String,
        /// The leader's assignment: (member id, its share).
        assignments: Vec<(String, serde_bytes::ByteBuf)>,
    },
    Heartbeat {
        group: String,
        generation: i32,
        member_id: String,
    },
    Leave {
        group: String,
        member_id: String,
    },
    /// Commits next offsets (topic, partition, offset); a negative
    /// generation commits from outside group management.
    Commit {
        group: String,
        generation: i32,
        member_id: String,
        offsets: Vec<(String, u32, u64)>,
    },
    /// Committed offsets: of `topic` (all topics when none).
    Offsets {
        group: String,
        topic: Option<String>,
    },
    /// The groups the answering node coordinates (answered `Groups`).
    List,
    Describe {
        group: String,
    },
    /// Forgets a group with no members and its committed offsets.
    Delete {
        group: String,
    },
}

/// Answers to [`GroupRequest`]s.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupResponse {
    Coordinator(Option<NodeId>),
    Joined {
        generation: i32,
        protocol: String,
        leader: String,
        member_id: String,
        /// Every member's metadata, for the leader only.
        members: Vec<(String, serde_bytes::ByteBuf)>,
    },
    Synced {
        assignment: serde_bytes::ByteBuf,
    },
    Done,
    /// (topic, partition, committed offset).
    Offsets(Vec<(String, u32, Option<u64>)>),
    Groups(Vec<GroupListing>),
    Description(GroupInfo),
    Error {
        kind: GroupErrorKind,
        message: String,
    },
}

/// Why a group request was refused, as clients act on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupErrorKind {
    /// Ask where the coordinator is, and again.
    NotCoordinator,
    /// Rejoin.
    UnknownMember,
    IllegalGeneration,
    RebalanceInProgress,
    /// Final: the request is wrong (the message says how).
    Invalid,
    /// The cluster failed the request (the message says how); retry.
    Unavailable,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupListing {
    pub group: String,
    pub protocol_type: String,
    pub state: String,
    pub coordinator: NodeId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    pub group: String,
    pub state: String,
    pub protocol_type: String,
    pub protocol: String,
    pub generation: i32,
    pub members: Vec<GroupMemberInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMemberInfo {
    pub member_id: String,
    pub client_id: String,
    pub client_host: String,
    #[serde(with = "serde_bytes")]
    pub assignment: Vec<u8>,
}

/// How one replica on a node has fared (its supervisor's record).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaHealthInfo {
    pub group: GroupId,
    pub restarts: u32,
    pub failed: bool,
    pub last_failure: Option<String>,
}

/// A partition as clients see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionInfo {
    pub partition: u32,
    pub replicas: Vec<NodeId>,
    /// The leader, where the answering node knows it.
    pub leader: Option<NodeId>,
    /// The first offset the answering node's replica holds (retention
    /// moves it; Kafka's log start offset).
    pub start_offset: Option<u64>,
    pub committed_offset: Option<u64>,
    pub end_offset: Option<u64>,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicInfo {
    pub name: String,
    pub config: TopicConfig,
    pub partitions: Vec<PartitionInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientResponse {
    Metadata {
        topics: Vec<TopicInfo>,
        nodes: Vec<(NodeId, std::net::SocketAddr)>,
        /// The controller leader, as the answering node knows it.
        controller_leader: Option<NodeId>,
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
    Refused(MetadataError),
    Failed(BrokerError),
    UnknownTopic(String),
    PartitionOutOfRange {
        topic: String,
        partition: u32,
        partitions: u32,
    },
    /// The answering node has no replica of the partition; try these nodes.
    NotHere {
        replicas: Vec<NodeId>,
    },
    /// An offset, or none (every committed record is older).
    Offset(Option<u64>),
    Health(Vec<ReplicaHealthInfo>),
    Dataflows(Vec<DataflowMeta>),
    Tasks(Vec<TaskStatus>),
    Catalog(Catalog),
    FailedReplicas(Vec<FailedReplica>),
    Group(GroupResponse),
    State(Result<Vec<crate::tasks::StateRow>, crate::tasks::StateError>),
}

/// A replica its node no longer runs, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedReplica {
    pub topic: String,
    pub partition: u32,
    pub node: NodeId,
    /// Its files are damaged (kept as they are), rather than crashing.
    pub damaged: bool,
    pub reason: String,
}

/// The SQL catalog as the answering node has applied it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub objects: Vec<crate::plan::SqlObject>,
    /// Each SQL query's dataflow and plan.
    pub queries: Vec<(DataflowMeta, crate::plan::Plan)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first byte of a value's postcard encoding: its variant's tag
    /// (a varint, one byte below 128).
    fn tag<T: Serialize>(value: &T) -> u8 {
        postcard::to_allocvec(value).expect("encodes")[0]
    }

    /// Each variant keeps the tag it was first given: old nodes and clients
    /// decode by position. A retired tag stays retired: a variant that is
    /// no longer used keeps its slot, and a new variant takes the next free
    /// tag at the end of this list.
    #[test]
    fn tags_are_pinned() {
        let requests = [
            ClientRequest::Metadata,
            ClientRequest::CreateTopic {
                name: "t".into(),
                config: TopicConfig::new(1, 1),
            },
            ClientRequest::DeleteTopic { name: "t".into() },
            ClientRequest::Produce {
                topic: "t".into(),
                partition: 0,
                acks: Acks::All,
                batch: Vec::new(),
            },
            ClientRequest::Fetch {
                topic: "t".into(),
                partition: 0,
                offset: 0,
                max_bytes: 1,
                any_replica: false,
            },
            ClientRequest::DescribeTopic { name: "t".into() },
            ClientRequest::OffsetForTimestamp {
                topic: "t".into(),
                partition: 0,
                timestamp_ms: 0,
            },
            ClientRequest::ReplicaHealth,
            ClientRequest::InjectPanic {
                topic: "t".into(),
                partition: 0,
            },
            ClientRequest::Rebalance,
            ClientRequest::StartDataflow { name: "d".into() },
            ClientRequest::StopDataflow { name: "d".into() },
            ClientRequest::Dataflows,
            ClientRequest::DataflowTasks,
            ClientRequest::StartQuery {
                name: "q".into(),
                plan: Box::new(crate::plan::tests::sample_plan()),
                object: None,
            },
            ClientRequest::CreateObject {
                object: crate::plan::tests::sample_object(),
            },
            ClientRequest::DropObject { name: "o".into() },
            ClientRequest::Catalog,
            ClientRequest::FailedReplicas,
            ClientRequest::Group(GroupRequest::List),
            ClientRequest::AlterTopic {
                name: "t".into(),
                settings: Vec::new(),
            },
            ClientRequest::AddPartitions {
                name: "t".into(),
                partitions: 1,
            },
            ClientRequest::ResetDataflow { name: "d".into() },
            ClientRequest::ReadState {
                dataflow: "d".into(),
                task: 0,
                key: None,
            },
            ClientRequest::DeleteRecords {
                topic: "t".into(),
                partition: 0,
                before_offset: None,
            },
        ];
        assert_tags(&requests);
        assert_tags(&[
            TopicSetting::MinInsync(1),
            TopicSetting::RetentionMs(None),
            TopicSetting::Cleanup(CleanupPolicy::Compact),
            TopicSetting::DeleteRetentionMs(0),
            TopicSetting::MinCompactionLagMs(0),
        ]);
        assert_tags(&[
            CleanupPolicy::Delete,
            CleanupPolicy::Compact,
            CleanupPolicy::CompactDelete,
        ]);
        assert_tags(&group_requests());
        assert_tags(&group_responses());
        use GroupErrorKind::*;
        assert_tags(&[
            NotCoordinator,
            UnknownMember,
            IllegalGeneration,
            RebalanceInProgress,
            Invalid,
            Unavailable,
        ]);
        assert_tags(&responses());
        assert_tags(&broker_errors());
        assert_tags(&[Acks::All, Acks::Leader, Acks::None]);
    }

    fn assert_tags<T: Serialize + std::fmt::Debug>(values: &[T]) {
        for (expected, value) in values.iter().enumerate() {
            assert_eq!(usize::from(tag(value)), expected, "tag of {value:?}");
        }
    }

    fn responses() -> Vec<ClientResponse> {
        let topic = TopicInfo {
            name: "t".into(),
            config: TopicConfig::new(1, 1),
            partitions: Vec::new(),
        };
        vec![
            ClientResponse::Metadata {
                topics: Vec::new(),
                nodes: Vec::new(),
                controller_leader: None,
            },
            ClientResponse::Done,
            ClientResponse::Produced { base_offset: 0 },
            ClientResponse::Fetched {
                batches: Vec::new(),
                start_offset: 0,
                committed_offset: 0,
            },
            ClientResponse::Topic(topic),
            ClientResponse::Refused(MetadataError::NoLiveNodes),
            ClientResponse::Failed(BrokerError::LeadershipLost),
            ClientResponse::UnknownTopic("t".into()),
            ClientResponse::PartitionOutOfRange {
                topic: "t".into(),
                partition: 1,
                partitions: 1,
            },
            ClientResponse::NotHere { replicas: Vec::new() },
            ClientResponse::Offset(None),
            ClientResponse::Health(Vec::new()),
            ClientResponse::Dataflows(Vec::new()),
            ClientResponse::Tasks(Vec::new()),
            ClientResponse::Catalog(Catalog::default()),
            ClientResponse::FailedReplicas(Vec::new()),
            ClientResponse::Group(GroupResponse::Done),
        ]
    }

    fn group_requests() -> Vec<GroupRequest> {
        let g = || "g".to_string();
        vec![
            GroupRequest::FindCoordinator { group: g() },
            GroupRequest::Join {
                group: g(),
                member_id: g(),
                client_id: g(),
                protocol_type: g(),
                protocols: Vec::new(),
                session_timeout_ms: 0,
                rebalance_timeout_ms: 0,
            },
            GroupRequest::Sync {
                group: g(),
                generation: 0,
                member_id: g(),
                assignments: Vec::new(),
            },
            GroupRequest::Heartbeat {
                group: g(),
                generation: 0,
                member_id: g(),
            },
            GroupRequest::Leave {
                group: g(),
                member_id: g(),
            },
            GroupRequest::Commit {
                group: g(),
                generation: 0,
                member_id: g(),
                offsets: Vec::new(),
            },
            GroupRequest::Offsets {
                group: g(),
                topic: None,
            },
            GroupRequest::List,
            GroupRequest::Describe { group: g() },
            GroupRequest::Delete { group: g() },
        ]
    }

    fn group_responses() -> Vec<GroupResponse> {
        vec![
            GroupResponse::Coordinator(None),
            GroupResponse::Joined {
                generation: 0,
                protocol: String::new(),
                leader: String::new(),
                member_id: String::new(),
                members: Vec::new(),
            },
            GroupResponse::Synced {
                assignment: Default::default(),
            },
            GroupResponse::Done,
            GroupResponse::Offsets(Vec::new()),
            GroupResponse::Groups(Vec::new()),
            GroupResponse::Description(GroupInfo {
                group: String::new(),
                state: String::new(),
                protocol_type: String::new(),
                protocol: String::new(),
                generation: 0,
                members: Vec::new(),
            }),
            GroupResponse::Error {
                kind: GroupErrorKind::Invalid,
                message: String::new(),
            },
        ]
    }

    fn broker_errors() -> Vec<BrokerError> {
        vec![
            BrokerError::NotLeader {
                group: GroupId(1),
                leader: None,
            },
            BrokerError::UnknownGroup(GroupId(1)),
            BrokerError::LeadershipLost,
            BrokerError::BatchTooLarge {
                size_bytes: 2,
                limit_bytes: 1,
            },
            BrokerError::Busy(GroupId(1)),
            BrokerError::OffsetOutOfRange {
                offset: 0,
                start: 0,
                end: 0,
            },
            BrokerError::ReplicaFailed {
                group: GroupId(1),
                reason: "r".into(),
            },
            BrokerError::Timeout(GroupId(1)),
            BrokerError::InvalidRequest("r".into()),
            BrokerError::OutOfOrderSequence {
                producer_id: 1,
                expected: 0,
                got: 2,
            },
            BrokerError::StaleSequence {
                producer_id: 1,
                last_sequence: 2,
                got: 0,
            },
            BrokerError::SequenceMismatch {
                producer_id: 1,
                base_sequence: 0,
                stored_last_sequence: 1,
            },
            BrokerError::NotYetCommitted(GroupId(1)),
            BrokerError::MetadataBehind("r".into()),
            BrokerError::NotEnoughReplicas {
                group: GroupId(1),
                in_sync: 1,
                required: 2,
            },
            BrokerError::NotEnoughReplicasAfterAppend {
                group: GroupId(1),
                copies: 1,
                required: 2,
            },
            BrokerError::ProducerFenced {
                producer_id: 1,
                epoch: 0,
                newest_epoch: 1,
            },
        ]
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
            MetadataError::ObjectExists(String::new()),
            MetadataError::UnknownObject(String::new()),
            MetadataError::ObjectInUse {
                name: String::new(),
                queries: Vec::new(),
            },
            MetadataError::TopicInUse {
                topic: String::new(),
                dataflows: Vec::new(),
            },
        ];
        let tags: Vec<u8> = errors.iter().map(tag).collect();
        assert_eq!(tags, (0..=12).collect::<Vec<u8>>());
    }

    #[test]
    fn payloads_carry_their_version_and_others_are_refused_by_name() {
        let request = ClientRequest::DescribeTopic { name: "t".into() };
        let payload = encode_payload(&request).expect("encodes");
        assert_eq!(&payload[..3], &[PAYLOAD_MAGIC, PAYLOAD_VERSION, 5]);
        assert_eq!(decode_payload::<ClientRequest>(&payload), Ok(request.clone()));
        let mut future = payload.clone();
        future[1] = 7;
        let refused = decode_payload::<ClientRequest>(&future).expect_err("refused");
        assert_eq!(refused, PayloadError::UnknownVersion(7));
        assert!(refused.to_string().contains("version 7"), "{refused}");
        let unversioned = postcard::to_allocvec(&request).expect("encodes");
        assert_eq!(
            decode_payload::<ClientRequest>(&unversioned),
            Err(PayloadError::Unversioned)
        );
        assert_eq!(decode_payload::<ClientRequest>(&[]), Err(PayloadError::Unversioned));
        assert!(matches!(
            decode_payload::<ClientRequest>(&[PAYLOAD_MAGIC, PAYLOAD_VERSION, 200]),
            Err(PayloadError::Malformed(_))
        ));
    }

    /// The id newtypes encode exactly like the bare integers they replaced:
    /// assignments, partition infos and errors keep their bytes on the wire
    /// and on disk.
    #[test]
    fn ids_encode_like_bare_integers() {
        let assignment = vec![vec![NodeId(1), NodeId(300)], vec![NodeId(u32::MAX)]];
        let raw: Vec<Vec<u32>> = vec![vec![1, 300], vec![u32::MAX]];
        assert_eq!(
            postcard::to_allocvec(&assignment).expect("encodes"),
            postcard::to_allocvec(&raw).expect("encodes")
        );
        let decoded: Vec<Vec<NodeId>> =
            postcard::from_bytes(&postcard::to_allocvec(&raw).expect("encodes")).expect("decodes");
        assert_eq!(decoded, assignment);
        let groups = (GroupId::CONTROLLER, Some(GroupId(1 << 20 | 3)));
        let raw_groups: (u64, Option<u64>) = (0, Some(1 << 20 | 3));
        assert_eq!(
            postcard::to_allocvec(&groups).expect("encodes"),
            postcard::to_allocvec(&raw_groups).expect("encodes")
        );
    }

    #[test]
    fn ids_print_as_bare_numbers() {
        assert_eq!(
            format!("{} {:?} {:>4}", NodeId(3), Some(NodeId(3)), NodeId(3)),
            "3 Some(3)    3"
        );
        assert_eq!(format!("{} {:?}", GroupId(7), vec![GroupId(7)]), "7 [7]");
        let error = BrokerError::NotLeader {
            group: GroupId(5),
            leader: Some(NodeId(2)),
        };
        assert_eq!(
            error.to_string(),
            "not the leader of group 5; the leader is node Some(2)"
        );
    }

    /// `runnel ... --format json` prints these types through serde_json:
    /// ids must stay bare numbers there too.
    #[test]
    fn ids_are_numbers_in_json() {
        let info = PartitionInfo {
            partition: 0,
            replicas: vec![NodeId(1), NodeId(2)],
            leader: Some(NodeId(2)),
            start_offset: None,
            committed_offset: None,
            end_offset: None,
            voters: vec![NodeId(1)],
            learners: Vec::new(),
        };
        let json = serde_json::to_string(&info).expect("encodes");
        assert_eq!(
            json,
            r#"{"partition":0,"replicas":[1,2],"leader":2,"start_offset":null,"committed_offset":null,"end_offset":null,"voters":[1],"learners":[]}"#
        );
        assert_eq!(serde_json::to_string(&GroupId(9)).expect("encodes"), "9");
    }
}
