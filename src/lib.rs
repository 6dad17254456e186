//! Runnel: a replicated, partitioned log and a stream processor in one Rust
//! system.
//!
//! This facade re-exports the crates a user needs:
//! - [`storage`]: the segmented log and the record-batch codec.
//! - [`cluster`]: nodes, membership, the QUIC transport with mutual TLS, and
//!   remote send/call between named actors.
//! - [`client`]: the client (`client::{Client, Producer, Consumer}`), its
//!   wire protocol, and the retry policy (`client::policy`).
//! - [`broker`]: replicated partitions (Raft per partition), the controller,
//!   and the client service.
//! - [`dataflow`]: dataflow builders, windows, operator tasks, checkpoints.
//! - [`kafka`]: the Kafka wire-protocol listener (`runnel node --kafka-listen`).
//!
//! The client, broker and dataflow layers live in `runnel-client`,
//! `runnel-actors` and `runnel-dataflow`; the simulation, checker, chaos
//! harness and test fixtures in `runnel-verify`, the benchmarks in
//! `runnel-bench`. The README says what each holds and what is built so far.

pub use runnel_actors as broker;
pub use runnel_client as client;
pub use runnel_cluster as cluster;
pub use runnel_dataflow as dataflow;
pub use runnel_kafka as kafka;
pub use runnel_storage as storage;
