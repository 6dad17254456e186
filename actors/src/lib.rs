//! Runnel's broker: partition replicas replicated by Raft (one raft-rs group
//! per partition), and, as they are built, the controller, placement, the
//! node supervisor and the client API.
//!
//! - [`raft_store`]: the Raft log of a partition *is* its record log; one
//!   entry is one record batch, and offsets follow deterministically.
//! - [`replica`]: a replica as a pure state machine around `RawNode`:
//!   propose, step, tick, and ready handling that persists before it answers.

mod error;
pub mod metadata;
pub mod raft_store;
pub mod replica;

pub use error::{ActorError, Result};
pub use replica::{Committed, ReadyOutput, ReplicaConfig, ReplicaCore};
