//! The seam between the controller and a node's dataflow runtime.
//!
//! The controller knows dataflows only as metadata: a name, a source topic,
//! a number of stages and partitions, and the node each task is placed on.
//! What a task *does* lives in the `runnel-dataflow` crate, which implements
//! [`TaskHost`]: the controller asks it which dataflows this node's binary
//! knows ([`TaskHost::shape`]), tells it which tasks metadata assigns to
//! this node ([`TaskHost::assign`], whenever that changes), and reads its
//! tasks' figures for `runnel dataflow describe` ([`TaskHost::status`]).
//!
//! It lives in the client crate so that the controller (`runnel-actors`)
//! and the dataflow runtime (`runnel-dataflow`) share it without the
//! runtime depending on the broker. [`RestartPolicy`] is here for the same
//! reason: the broker's replica supervisor and the dataflow host's task
//! supervisor back off restarts alike.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use runnel_cluster::NodeId;
use serde::{Deserialize, Serialize};

use crate::plan::Plan;

/// What the controller needs to know of a registered dataflow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataflowShape {
    pub source: String,
    pub sink: String,
    /// 1 (stateless) or 2 (source stage, then window stage).
    pub stages: u32,
}

/// One task placed on this node. Task `t` runs stage `t / partitions` over
/// partition `t % partitions` of its stage's input.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskAssignment {
    pub dataflow: String,
    pub task: u32,
    pub partitions: u32,
    pub stages: u32,
    /// How many times the dataflow was reset: its tasks write with this
    /// producer epoch.
    pub generation: i16,
}

impl TaskAssignment {
    pub fn stage(&self) -> u32 {
        self.task / self.partitions.max(1)
    }

    pub fn partition(&self) -> u32 {
        self.task % self.partitions.max(1)
    }
}

/// One task's figures, as its node reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub dataflow: String,
    pub task: u32,
    pub stage: u32,
    pub partition: u32,
    pub node: NodeId,
    /// `running`, `restoring`, `restarting: <why>` or `failed: <why>`.
    pub state: String,
    pub input_topic: String,
    /// Next input offset to read.
    pub input_offset: u64,
    /// The input partition's committed end at the last read (lag = end - offset).
    pub input_end: u64,
    /// Event time below which the task's input is complete, once known.
    pub watermark_ms: Option<i64>,
    pub records_in: u64,
    pub records_out: u64,
    /// Records dropped because every window they belonged to had closed.
    pub late_records: u64,
    /// Source records that did not decode, sent to the dead-letter topic.
    pub dead_letters: u64,
    pub restarts: u32,
    /// Checkpoints written by this incarnation of the task, the one it
    /// restored from included.
    pub checkpoints: u64,
}

/// One row of a task's state, as its sink gets it: the record's key and
/// value, JSON (a windowed key carries the window's bounds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRow {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// Rows one state read returns at most.
pub const STATE_ROWS_MAX: usize = 10_000;

/// Why a task's state cannot be read (a pull query).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StateError {
    #[error("task {task} of {dataflow} does not run on this node (it may be moving)")]
    NotHere { dataflow: String, task: u32 },
    #[error("task {task} of {dataflow} is restoring its state from its checkpoint; retry shortly")]
    Restoring { dataflow: String, task: u32 },
    #[error("task {task} of {dataflow} keeps no state to read (a stage without an aggregate)")]
    Stateless { dataflow: String, task: u32 },
    #[error("task {task} of {dataflow} did not answer in time (restoring or busy); retry shortly")]
    Busy { dataflow: String, task: u32 },
    #[error("more than {STATE_ROWS_MAX} rows match in task {task} of {dataflow}; narrow the key range")]
    TooManyRows { dataflow: String, task: u32 },
    #[error("reading the state of task {task} of {dataflow}: {reason}")]
    Failed {
        dataflow: String,
        task: u32,
        reason: String,
    },
}

impl StateError {
    /// Whether asking again (after the task settles) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StateError::NotHere { .. } | StateError::Restoring { .. } | StateError::Busy { .. }
        )
    }
}

/// A state read under way.
pub type StateRead = Pin<Box<dyn Future<Output = Result<Vec<StateRow>, StateError>> + Send>>;

/// A node's dataflow runtime, as the controller drives it.
pub trait TaskHost: Send + Sync {
    /// The plan of registered steps of a dataflow this node's binary
    /// registered (see `Operator::Registered`).
    fn plan(&self, dataflow: &str) -> Option<Plan>;
    /// The topics a registered dataflow reads beyond its first source (a
    /// stream–stream join's other side), which must have as many partitions.
    fn joined_sources(&self, _dataflow: &str) -> Vec<String> {
        Vec::new()
    }
    /// Every task metadata places on this node now: start the missing ones,
    /// stop the rest. `plans` holds the plan of each of their dataflows
    /// that a SQL statement started (the rest are registered by name); a
    /// task whose plan changed restarts with the new one.
    fn assign(&self, tasks: Vec<TaskAssignment>, plans: BTreeMap<String, Plan>);
    /// Figures of the tasks running here.
    fn status(&self) -> Vec<TaskStatus>;
    /// The current rows of task `task`'s state for `key` (the postcard
    /// encoding its stage groups by), or every row without one: what a
    /// pull query reads.
    fn read_state(&self, dataflow: &str, task: u32, key: Option<Vec<u8>>) -> StateRead;
}

/// The topics a dataflow writes, with their partition counts, for a source
/// of `partitions` partitions: its checkpoints (one partition per task), its
/// dead letters, its sink and, with two stages, the repartition topic.
pub fn dataflow_topics(dataflow: &str, shape: &DataflowShape, partitions: u32) -> Vec<(String, u32)> {
    let mut topics = vec![
        (checkpoint_topic(dataflow), partitions * shape.stages),
        (dead_letter_topic(dataflow), 1),
        (shape.sink.clone(), partitions),
    ];
    if shape.stages > 1 {
        topics.push((repartition_topic(dataflow), partitions));
    }
    topics
}

/// The internal topic between a dataflow's two stages.
pub fn repartition_topic(dataflow: &str) -> String {
    format!("{dataflow}.repartition")
}

/// The internal topic holding each task's checkpoints (partition = task).
pub fn checkpoint_topic(dataflow: &str) -> String {
    format!("{dataflow}.checkpoints")
}

/// Source records that did not decode, with the error.
pub fn dead_letter_topic(dataflow: &str) -> String {
    format!("{dataflow}.dlq")
}

/// How a supervisor restarts what it supervises: back-off between restarts,
/// and (for replicas) how many failures in a window it tolerates.
#[derive(Clone, Debug)]
pub struct RestartPolicy {
    pub restart_limit: usize,
    pub restart_window: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            restart_limit: 5,
            restart_window: Duration::from_secs(60),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

impl RestartPolicy {
    /// The wait before restart number `failures` (1 for the first): doubling
    /// from `backoff_min`, capped at `backoff_max`.
    pub fn backoff(&self, failures: usize) -> Duration {
        let exponent = failures.saturating_sub(1).min(16) as u32;
        self.backoff_min
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(self.backoff_max)
    }
}
