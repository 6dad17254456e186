//! Runnel's storage engine: everything that touches disk.
//!
//! - [`batch`]: the record-batch codec (CRC32C-checked), the unit producers
//!   send, Raft replicates and the log stores. The byte format is documented
//!   there.
//! - [`Log`]: a partition's segmented log: append, read by offset or timestamp,
//!   truncate, retention, compaction (latest record per key), fsync policy,
//!   and recovery of a torn tail on open.
//! - [`DurableKv`]: a small atomically-replaced file for Raft hard state and
//!   other metadata.
//! - [`sequence`]: producer sequence numbers, counting modulo 2^31.
//!
//! Nothing here knows about the network, actors or Raft; the layers above use
//! these types as plain values.

pub mod batch;
mod error;
mod index;
pub mod kv;
mod log;
mod segment;
pub mod sequence;
mod varint;

pub use batch::{BatchBuilder, BatchHeader, Header, ProducerInfo, Record, RecordBatch, RecordView, StoredRecord};
pub use error::{Result, StorageError};
pub use kv::DurableKv;
pub use log::{
    CompactionOutcome, CompactionPolicy, CompactionSettings, CompactionStep, Compactor, FsyncPolicy, Log, LogConfig,
    RetentionOutcome,
};
