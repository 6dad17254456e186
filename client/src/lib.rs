//! Runnel's client, and the protocol it shares with the broker.
//!
//! [`Client`] does admin, produce and fetch against any node, following
//! leader hints (`NotLeader`) and replica lists (`NotHere`) to the node that
//! leads a partition; [`Producer`] (batching, key -> partition by a stable
//! hash) and [`Consumer`] (assigned partitions, offsets, polling) sit on
//! top. Batches from a [`Producer`] carry a producer id and sequence
//! numbers, so a produce whose outcome is unknown (no answer, a leader lost
//! mid-request) is retried and the leader writes it once; a batch without
//! a producer id is retried only when it certainly was not written.
//!
//! - [`protocol`]: the client's wire messages (`ClientRequest`,
//!   `ClientResponse`) and what they carry: `Acks`, `BrokerError`,
//!   `TopicInfo`, `TopicConfig`, `MetadataError`, `DataflowMeta`. The
//!   broker (`runnel-actors`) serves these and re-exports them.
//! - [`policy`]: which failures are safe to retry, which leave the outcome
//!   unknown, which are final; pure functions the client and the
//!   simulation share.
//! - [`routing`]: [`Client`] itself: calls to a node (or straight to the
//!   node it runs in, [`LocalNode`]), the metadata cache, and routing to a
//!   partition's leader with retries.
//! - [`admin`]: topics, rebalancing, dataflows, the test fault hook.
//! - [`producer`]: [`Client::produce`], [`Producer`], [`partition_for_key`].
//! - [`consumer`]: [`Client::fetch`] and friends, [`FetchedBatches`],
//!   [`Consumer`].
//! - [`offsets`]: consumers' committed offsets in [`OFFSETS_TOPIC`].
//! - [`groups`]: consumer groups: requests to a group's coordinator, the
//!   members' side of the group protocol ([`groups::GroupMember`]), and
//!   Kafka's consumer-protocol encoding, so Runnel and Kafka consumers can
//!   share a group.
//! - [`plan`]: dataflows as data: the versioned logical plan SQL statements
//!   compile to, committed with the query, and the SQL catalog's objects.
//! - [`state`]: reading dataflow tasks' state (pull queries), from the
//!   node that runs the task owning a key.
//! - [`tasks`]: the seam between the controller and a node's dataflow
//!   runtime (`TaskHost`, task assignments and figures, internal topic
//!   names) and the supervisors' `RestartPolicy`, here so that the dataflow
//!   crate need not depend on the broker.
//!
//! Dependencies: `runnel-cluster` (transport) and `runnel-storage` (record
//! batches) only.

pub mod admin;
pub mod consumer;
mod error;
pub mod groups;
pub mod offsets;
pub mod plan;
pub mod policy;
pub mod producer;
pub mod protocol;
pub mod routing;
pub mod state;
pub mod tasks;

pub use consumer::{Consumer, FetchedBatches, FetchedRecords};
pub use error::{ClientError, ClientResult};
pub use offsets::{OFFSETS_PARTITIONS, OFFSETS_TOPIC};
pub use producer::{new_producer_id, partition_for_key, unix_now_ms, Producer, RECORD_BYTES_MAX};
pub use protocol::{Acks, BrokerError};
pub use routing::{Client, LocalNode};
