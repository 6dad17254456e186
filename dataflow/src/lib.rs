//! Runnel's dataflow engine: continuous queries over topics, the way Kafka
//! Streams and KSQL run them, with every operator instance an actor placed
//! and supervised by the cluster.
//!
//! - [`builder`]: the Rust builders (`Dataflow::new(..).source::<T>(..)
//!   .key_by(..).window(..).count().filter(..).sink(..)`) and the type-erased
//!   stages they compile to.
//! - [`window`]: event-time windows (tumbling, hopping, session) as a pure
//!   state machine: watermark, grace, late drops, emit-changes/emit-final,
//!   snapshots.
//! - [`compile`][compile]: plans (dataflows as data, what SQL statements become)
//!   compiled into the same stages, on every node that runs their tasks.
//! - [`join`]: the join stage of a stream–stream join: both sides' records
//!   held for the join window, pairs and unmatched rows out.
//! - [`row`]: SQL rows: values, JSON decoding by schema, expressions.
//! - [`table`]: the tables a stage joins with, each task holding the whole
//!   table at read positions its checkpoints record.
//! - [`versioned`]: a table's rows by time, for joins by event time
//!   (`FOR SYSTEM_TIME AS OF`); [`grace`]: their stream side's buffer.
//! - [`table_join`]: table–table joins: each table read by key, the join
//!   stage holding both tables' latest rows.
//! - [`table_aggregate`]: aggregates over a table: each change taken out
//!   of its old group and added to its new one.
//! - [`changelog`]: a stage's state as entries in its task's compacted
//!   checkpoint partition, written with each checkpoint.
//! - [`task`]: one task (a stage over one input partition): read, process,
//!   send with deterministic sequence numbers, checkpoint, restore.
//! - [`testing`]: an in-memory cluster for tests of task code.
//! - [`host`]: a node's runtime: the registry of known dataflows and the
//!   supervisor actor that runs the tasks the controller places here.
//! - [`fraud`]: the motivating query, a generator of card authorization
//!   attempts, and the reference its results must equal.

pub mod builder;
pub mod changelog;
pub mod compile;
pub mod fraud;
pub mod grace;
pub mod host;
pub mod join;
pub mod row;
pub mod table;
pub mod table_aggregate;
pub mod table_join;
pub mod task;
pub mod testing;
pub mod versioned;
pub mod window;

pub use builder::{Dataflow, DataflowDef};
pub use host::{ClientSettings, DataflowHost, Registry};
pub use window::{Emit, Window, WindowBounds};

/// The dataflows the `runnel` binary knows: every `runnel node` can run them.
pub fn builtin() -> Registry {
    Registry::new().register(fraud::dataflow())
}
