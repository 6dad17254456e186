//! Runnel's broker: partition replicas replicated by Raft (one raft-rs group
//! per partition), supervised per node.
//!
//! - [`raft_store`]: the Raft log of a partition *is* its record log; one
//!   entry is one record batch, and offsets follow deterministically.
//! - [`replica`]: a replica as a pure state machine around `RawNode`:
//!   propose, step, tick, and ready handling that persists before it answers.
//! - [`partition`]: `PartitionReplica`, the ractor actor around a replica.
//! - [`producers`]: idempotent producers' sequence table, rebuilt from the log.
//! - [`supervisor`]: `NodeSupervisor`, which restarts crashed replicas.
//! - [`broker`]: one node's broker: Raft routing over the cluster layer, one
//!   ticker for all groups, produce/fetch entry points.
//! - [`metadata`]: the controller's topic metadata and replica placement.
//! - [`controller`]: the controller. [`controller::core`] holds its
//!   decisions as a deterministic state machine ([`ControllerCore`]: what to
//!   host, settle, heal, move, delete; topic and dataflow placement) that
//!   the tokio shell and the simulation both drive; the shell follows group
//!   0's log on every node and carries out the core's commands; the
//!   controller RPC service answers other nodes; [`BrokerService`] answers
//!   clients, one typed method per request kind.
//! - [`tasks`]: the seam to a node's dataflow runtime (task placement and
//!   status), re-exported from `runnel_client::tasks`.
//! - [`protocol`]: the broker's node-to-node wire messages; re-exports the
//!   client protocol it serves.
//!
//! The client, its wire protocol (`ClientRequest`, `ClientResponse`, `Acks`,
//! `BrokerError`, `TopicConfig`, ...) and its retry policy live in the
//! `runnel-client` crate, which this crate depends on and serves (as the
//! Kafka broker depends on kafka-clients' common protocol). They are
//! re-exported here ([`client`], [`Acks`], [`BrokerError`], and in
//! [`protocol`] and [`metadata`]) so existing paths keep working.

pub mod broker;
pub mod controller;
mod error;
pub mod groups;
pub mod metadata;
pub mod partition;
pub mod producers;
pub mod protocol;
pub mod raft_store;
pub mod replica;
pub mod supervisor;
pub mod tasks;

pub use broker::{Broker, BrokerConfig};
pub use controller::{BrokerService, Controller, ControllerConfig, ControllerCore};
pub use error::{ActorError, Result};
pub use protocol::{Acks, BrokerError};
pub use raft::eraftpb::Message as RaftMessage;
pub use raft::eraftpb::MessageType as RaftMessageType;
pub use replica::{Committed, ReadyOutput, ReplicaConfig, ReplicaCore, VoterProgress};
/// The client (and its protocol) moved to `runnel-client`; this keeps
/// `runnel_actors::client::..` paths working.
pub use runnel_client as client;
