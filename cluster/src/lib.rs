//! Runnel's cluster layer: the substrate every actor message crosses. It knows
//! nothing of partitions or dataflows.
//!
//! - [`tls`]: the cluster CA, node and client certificates (a node's id is
//!   bound to its certificate), and the mutual-TLS settings.
//! - [`quic`]: the QUIC transport (quinn, rustls with ring): long-lived
//!   per-peer streams for batched traffic, request/response streams for
//!   clients, bounded queues at both ends; and [`quic::ClusterClient`].
//! - [`membership`]: failure detection and gossip as a pure state machine
//!   (alive / suspect / dead, incarnations for restarts).
//! - [`node`]: a running node: the shell around membership and transport, the
//!   per-node actor directory, remote `send` and `call`.
//! - [`sim`]: the in-memory simulated network (drop, delay, duplicate,
//!   reorder, partition) driven by a seed, for deterministic tests.
//! - [`protocol`]: every wire message, versioned, postcard-encoded.

mod error;
pub mod membership;
pub mod node;
pub mod protocol;
pub mod quic;
pub mod sim;
pub mod tls;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use error::{ClusterError, Result};
pub use membership::{MemberState, MembershipConfig, MembershipEvent};
pub use node::{Mailbox, Message, Node, NodeConfig, NodeHandle, ReplyTo};
pub use protocol::{Envelope, MemberStatus};

/// A node's identity in the cluster, bound to its certificate. The one node
/// id type of every layer: transparent in serde, so postcard and JSON encode
/// it exactly like the bare `u32` it wraps.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub u32);

impl NodeId {
    /// The node a raft-rs id names; `None` for an id no node can have (raft
    /// speaks `u64`, node ids are `u32`).
    pub fn from_raft(id: u64) -> Option<NodeId> {
        u32::try_from(id).ok().map(NodeId)
    }

    /// This node's id as raft-rs speaks it.
    pub fn to_raft(self) -> u64 {
        u64::from(self.0)
    }
}

/// Forwards the formatter, so widths and alignment (`{:>4}`) apply as they
/// do to the bare number.
/// Parses the bare number, as ids are given on the command line.
impl std::str::FromStr for NodeId {
    type Err = std::num::ParseIntError;

    fn from_str(text: &str) -> std::result::Result<NodeId, Self::Err> {
        text.parse().map(NodeId)
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

/// The bare number, like `Display`: ids in `{:?}` output (lists of replicas,
/// log lines, simulation notes) read as they did when they were plain
/// integers.
impl std::fmt::Debug for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

/// An envelope as a transport hands it up, with the sender's identity as the
/// transport established it (for QUIC: from the peer's certificate).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inbound {
    pub from: NodeId,
    pub envelope: Envelope,
}

/// How envelopes leave a node: QUIC for real nodes, [`sim::SimTransport`] in
/// deterministic tests. Sending never blocks; a full queue is
/// `ClusterError::Backpressure`. Delivery is best effort: heartbeats repeat
/// and calls time out.
pub trait Transport: Send + Sync + 'static {
    fn send(&self, to: SocketAddr, envelope: Envelope) -> Result<()>;
}
