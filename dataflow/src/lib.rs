//! Runnel's dataflow engine: Rust builders, the logical and physical plan,
//! operator actors, event-time windows, state and checkpoints.
//!
//! Not built yet: this crate is the home of issue 6. It builds on
//! `runnel-actors`.
