//! Runnel's Kafka wire-protocol listener: Kafka clients (librdkafka and
//! kcat, kafka-python, Java, …) produce, fetch and manage topics on a
//! Runnel cluster unchanged.
//!
//! It is a thin adapter over the node's [`BrokerService`], the same typed
//! service the QUIC client protocol uses; messages and record batches are
//! encoded by the `kafka-protocol` crate.
//!
//! - [`server`]: the TCP listener and one task per connection (frames read
//!   with a size bound, requests answered in order, as Kafka brokers do).
//! - [`api`]: one module per Kafka API, and the table of the versions this
//!   listener serves ([`api::SUPPORTED`]).
//! - [`records`]: record batches between Kafka's format and Runnel's.
//! - [`errors`]: Runnel's errors as Kafka error codes.
//!
//! Offsets are Runnel's own, which Kafka clients can use unchanged: they
//! start at 0 and grow by one per record; Raft's configuration entries
//! take offsets too and reach Kafka clients as control batches, which they
//! skip.

pub mod api;
pub mod errors;
pub mod records;
pub mod server;

pub use runnel_actors::controller::BrokerService;
pub use server::{KafkaListener, KafkaListenerConfig};
