//! Runnel's verification, kept out of the product: what checks that the
//! replicated log and the dataflows keep their guarantees, and the fixtures
//! every test shares.
//!
//! - [`sim`]: the deterministic simulation — a whole cluster (controller,
//!   partition replicas, dataflow tasks: the real cores without their actor
//!   shells) in one thread over a simulated network and clock, driven by one
//!   seed, under crashes, torn writes and partitions.
//! - [`check`]: the checker, a pure function from a history of writes and
//!   reads to the anomalies found (lost, duplicated, inconsistent offsets,
//!   replica disagreement, non-monotonic reads, dataflow results).
//! - [`chaos`]: the chaos harness behind `runnel chaos` — real `runnel node`
//!   processes, a seeded nemesis, producers and consumers, then the checker.
//! - [`fixtures`]: free loopback addresses, scratch directories,
//!   certificates, process clusters of `runnel node` (killed on drop), an
//!   embedded in-process cluster, and client helpers for a forming cluster.

pub mod chaos;
pub mod check;
pub mod fixtures;
pub mod sim;
