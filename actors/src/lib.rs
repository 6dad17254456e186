//! Runnel's broker: the node supervisor, partition replicas (one Raft group per
//! partition), the controller (Raft group 0), placement and re-replication,
//! and the client API (`Producer`, `Consumer`, `Admin`).
//!
//! Not built yet: this crate is the home of issues 4 and 5. It builds on
//! `runnel-storage` (the log each replica owns) and `runnel-cluster`.
