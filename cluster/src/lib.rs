//! Runnel's cluster layer: node identity, the QUIC transport with mutual TLS,
//! seed-list membership and failure detection, the per-node actor directory
//! and remote send/call, and the `Transport` trait with its in-memory
//! simulation.
//!
//! Not built yet: this crate is the home of issue 3 ("Cluster layer"). It
//! must never depend on `runnel-storage` or anything above it.
