//! One dataflow task: the actor that runs one stage over one input partition.
//!
//! A step reads a batch of committed input, runs it through the stage, sends
//! the output through [`ExactlyOnceSender`] and, every
//! [`CHECKPOINT_INTERVAL`], writes a checkpoint. One step runs at a time, so
//! a task never has more than one input batch in flight and a slow sink
//! slows its source (backpressure through acknowledgements).
//!
//! Exactly-once rests on determinism: a task's output is a function of its
//! input, so output record *n* to a partition is always the same record, and
//! its sequence number *n* under the task's fixed producer id says whether
//! the sink has it. A checkpoint holds {input offset, the next sequence per
//! output partition, the stage's state}; after a crash the task restores the
//! newest checkpoint and replays, and the broker recognises and drops what
//! the lost incarnation already wrote.
//!
//! Watermarks: a window task knows which upstream (source task) wrote a
//! repartitioned batch by the batch's producer id, and a source task sends
//! watermark markers (unsequenced, carrying its upstream id as a header) to
//! partitions it has not written to lately and, once caught up with its
//! input for [`IDLE_AFTER`], "idle" markers. A
//! window task's watermark is the minimum of its upstreams' maximum event
//! times, ignoring idle ones, so a lagging or restarting upstream holds the
//! windows open instead of making its records late.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use runnel_client::tasks::{
    checkpoint_topic, dead_letter_topic, repartition_topic, StateError, StateRow, TaskAssignment, TaskStatus,
    STATE_ROWS_MAX,
};
use runnel_client::{partition_for_key, Acks, BrokerError, Client, ClientError, ClientResult, FetchedBatches};
use runnel_storage::sequence::{sequence_add, sequence_distance, SEQUENCE_SPACE};
use runnel_storage::{BatchBuilder, Header, ProducerInfo, Record, RecordBatch, RecordView};
use serde::{Deserialize, Serialize};

use crate::builder::{Change, DataflowDef, Emitted, SourceStage, WindowStage};
use crate::changelog::{self, CheckpointWriter, CHANGES_EARLY_BYTES};
use crate::grace::{GraceBuffer, Held};
use crate::table::TableState;

mod dedup;
mod purge;
use dedup::ReadSequences;
pub use purge::PURGE_INTERVAL;

/// How often a task checkpoints (when it has made progress).
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);
/// Input read per step.
const FETCH_BYTES: u32 = 1 << 20;
/// Records and bytes per output batch.
const BATCH_RECORDS_MAX: usize = 4096;
const BATCH_BYTES_MAX: usize = 1 << 20;
/// A checkpoint is one batch: it must stay under the broker's batch limit.
pub const CHECKPOINT_BYTES_MAX: usize = 7 << 20;
const CHECKPOINT_CHUNK_BYTES: usize = 512 << 10;
/// 2: window state keeps keys encoded (version 1 kept them decoded).
/// 3: followed by the read positions of the tables the stage joins with.
/// 4: then by the records a join by event time holds for its grace.
/// 5: a stage with a state store keeps its state in the changelog, not
/// in the checkpoint (a node that reads only 4 would find it empty).
const CHECKPOINT_VERSION: u8 = 6;
/// Batches stepped back over looking for the newest checkpoint (barriers,
/// entry-only batches, Raft's control entries).
const CHUNK_PROBES_MAX: usize = 4096;
/// Changelog entries written outside a checkpoint go in batches of about
/// this many bytes at most, obsolete entries' tombstones this many keys.
const ENTRY_BATCH_BYTES: usize = 1 << 20;
const OBSOLETE_KEYS_PER_BATCH: usize = 65_536;
/// How often, and how long apart, a restoring task asks whether its
/// barrier is committed before it gives up.
const COMMIT_WAITS_MAX: usize = 200;
const COMMIT_WAIT: Duration = Duration::from_millis(50);
/// Version 2 reads as version 3 without tables, 3 as 4 without held
/// records.
const CHECKPOINT_V2: u8 = 2;
const CHECKPOINT_V3: u8 = 3;
/// The first format whose stateful stages keep their state in a changelog.
const CHECKPOINT_V5: u8 = 5;
/// How long an output batch is retried through unavailability before the
/// task fails (and is restarted from its checkpoint).
const SEND_RETRY_FOR: Duration = Duration::from_secs(60);
/// A source task sends a watermark marker to a partition it has not written
/// to for this long.
const MARKER_INTERVAL: Duration = Duration::from_millis(200);
/// A source task caught up with its input this long declares itself idle,
/// so an empty source partition does not hold every window open forever.
/// Records that reach an idle partition later may be late (as with Flink's
/// idleness); a task that is merely between two reads is never idle.
pub const IDLE_AFTER: Duration = Duration::from_secs(30);

const HEADER_UPSTREAM: &str = "u";
const HEADER_WATERMARK: &str = "wm";
const HEADER_IDLE: &str = "idle";
const HEADER_ERROR: &str = "error";

/// How a task reaches the cluster and tells the time: the [`Client`] in a
/// node, the simulated network and clock in `runnel_verify::sim` (which runs the
/// same task code, deterministically).
pub trait TaskIo: Send + Sync + 'static {
    /// Committed records of a partition from `offset`.
    fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
    ) -> impl Future<Output = ClientResult<FetchedBatches>> + Send;
    /// Appends a batch; the base offset it was written at.
    fn produce(
        &self,
        topic: &str,
        partition: u32,
        batch: RecordBatch,
        acks: Acks,
    ) -> impl Future<Output = ClientResult<u64>> + Send;
    /// Deletes a partition's records below `before_offset` (Kafka's
    /// DeleteRecords); where the partition starts now.
    fn delete_records(
        &self,
        topic: &str,
        partition: u32,
        before_offset: u64,
    ) -> impl Future<Output = ClientResult<u64>> + Send;
    /// Monotonic time since an arbitrary start.
    fn now(&self) -> Duration;
    fn sleep(&self, pause: Duration) -> impl Future<Output = ()> + Send;
}

impl TaskIo for Client {
    async fn fetch(&self, topic: &str, partition: u32, offset: u64, max_bytes: u32) -> ClientResult<FetchedBatches> {
        Client::fetch_batches(self, topic, partition, offset, max_bytes).await
    }

    async fn produce(&self, topic: &str, partition: u32, batch: RecordBatch, acks: Acks) -> ClientResult<u64> {
        Client::produce(self, topic, partition, batch, acks).await
    }

    async fn delete_records(&self, topic: &str, partition: u32, before_offset: u64) -> ClientResult<u64> {
        Client::delete_records(self, topic, partition, Some(before_offset)).await
    }

    fn now(&self) -> Duration {
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed()
    }

    async fn sleep(&self, pause: Duration) {
        tokio::time::sleep(pause).await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Storage(#[from] runnel_storage::StorageError),
    #[error("dataflow {0:?} is not registered in this node's binary")]
    Unregistered(String),
    #[error("checkpoint of task {task}: {reason}")]
    Checkpoint { task: u32, reason: String },
    #[error("input record at {topic}/{partition}@{offset}: {reason}")]
    BadInput {
        topic: String,
        partition: u32,
        offset: u64,
        reason: String,
    },
    #[error("sink {topic}/{partition} lost records of this task: {reason}")]
    OutputLost {
        topic: String,
        partition: u32,
        reason: String,
    },
    #[error(transparent)]
    Stage(#[from] crate::builder::StageError),
    #[error(transparent)]
    Table(#[from] crate::table::TableError),
}

/// Who a task writes as: its producer id, fixed across restarts and nodes,
/// and the dataflow's generation as the producer epoch. A reset starts a new
/// generation, whose sequences start again at 0: the broker takes a higher
/// epoch as a new producer rather than as retries of the old one's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskProducer {
    pub id: i64,
    pub epoch: i16,
}

impl TaskProducer {
    pub fn of(dataflow: &str, assignment: &TaskAssignment) -> TaskProducer {
        TaskProducer {
            id: task_producer_id(dataflow, assignment.task),
            epoch: assignment.generation,
        }
    }
}

/// A producer id fixed for a task across restarts and nodes (FNV-1a of the
/// dataflow name and task), so its sequences stay meaningful to the broker.
pub fn task_producer_id(dataflow: &str, task: u32) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in dataflow.bytes().chain(task.to_le_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash >> 1) as i64
}

pub(crate) fn retryable(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::Unavailable { .. }
            | ClientError::Cluster(_)
            | ClientError::Broker(
                BrokerError::Timeout(_)
                    | BrokerError::ReplicaFailed { .. }
                    | BrokerError::LeadershipLost
                    | BrokerError::Busy(_)
                    | BrokerError::NotYetCommitted(_)
                    | BrokerError::NotLeader { .. }
            )
    )
}

/// Sends a task's output with its fixed producer id and deterministic
/// sequence numbers, so output already written by an earlier incarnation is
/// recognised and skipped, never written twice.
pub struct ExactlyOnceSender {
    producer: TaskProducer,
    /// The next sequence per (topic, partition).
    sequences: BTreeMap<(String, u32), i32>,
}

impl ExactlyOnceSender {
    pub fn new(producer: TaskProducer) -> ExactlyOnceSender {
        ExactlyOnceSender {
            producer,
            sequences: BTreeMap::new(),
        }
    }

    /// Writes each partition's records (in order), the partitions
    /// concurrently: one step waits for one round of acknowledgements, not
    /// one per partition. On an error the sequences of the partitions that
    /// were written still advance.
    pub async fn send_all<C: TaskIo>(
        &mut self,
        client: &C,
        topic: &str,
        outputs: BTreeMap<u32, PartitionOutput>,
    ) -> Result<(), TaskError> {
        let producer = self.producer;
        let sequences = &self.sequences;
        let sends = outputs.into_iter().map(|(partition, output)| {
            let first = sequences.get(&(topic.to_string(), partition)).copied().unwrap_or(0);
            async move {
                let next = send_partition(client, producer, topic, partition, first, output).await;
                (partition, next)
            }
        });
        let sent = futures_util::future::join_all(sends).await;
        let mut outcome = Ok(());
        for (partition, next) in sent {
            match next {
                Ok(next) => {
                    self.sequences.insert((topic.to_string(), partition), next);
                }
                Err(e) => {
                    if outcome.is_ok() {
                        outcome = Err(e);
                    }
                }
            }
        }
        outcome
    }
}

/// A step's output to one partition, encoded as it is produced (no
/// [`Record`] per output record): batches of at most `BATCH_RECORDS_MAX`
/// records and about `BATCH_BYTES_MAX` bytes, stamped with the task's
/// producer id and sequence only when sent.
pub struct PartitionOutput {
    batches: Vec<BatchBuilder>,
    records: usize,
    /// Initial capacity of a new batch.
    capacity: usize,
}

impl PartitionOutput {
    /// An empty output whose batches start with room for `bytes_hint`.
    pub fn new(bytes_hint: usize) -> PartitionOutput {
        PartitionOutput {
            batches: Vec::new(),
            records: 0,
            capacity: bytes_hint.clamp(4096, BATCH_BYTES_MAX + (64 << 10)),
        }
    }

    /// Records pushed so far.
    pub fn len(&self) -> usize {
        self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// The batch to push the next record to.
    fn open_batch(&mut self) -> &mut BatchBuilder {
        let full = self
            .batches
            .last()
            .is_none_or(|b| b.record_count() as usize >= BATCH_RECORDS_MAX || b.size_bytes() >= BATCH_BYTES_MAX);
        if full {
            self.batches.push(BatchBuilder::with_capacity(self.capacity));
        }
        let last = self.batches.len() - 1;
        &mut self.batches[last]
    }

    pub fn push(
        &mut self,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
    ) -> Result<(), TaskError> {
        self.open_batch().push_parts(timestamp_ms, key, value, headers)?;
        self.records += 1;
        Ok(())
    }

    pub fn push_record(&mut self, record: &Record) -> Result<(), TaskError> {
        self.open_batch().push(record)?;
        self.records += 1;
        Ok(())
    }
}

/// Writes `output` to a partition numbered from `sequence`; the sequence
/// after it.
async fn send_partition<C: TaskIo>(
    client: &C,
    producer: TaskProducer,
    topic: &str,
    partition: u32,
    mut sequence: i32,
    output: PartitionOutput,
) -> Result<i32, TaskError> {
    for builder in output.batches {
        sequence = send_batch(client, producer, topic, partition, sequence, builder).await?;
    }
    Ok(sequence)
}

/// Stamps a batch with the task's producer id and epoch and its first sequence.
fn stamp(mut builder: BatchBuilder, producer: TaskProducer, base_sequence: i32) -> Result<RecordBatch, TaskError> {
    builder.set_producer(ProducerInfo {
        producer_id: producer.id,
        producer_epoch: producer.epoch,
        base_sequence,
    });
    Ok(builder.build()?)
}

/// The records of `batch` after its first `skip`, as a new unstamped batch.
fn records_after(batch: &RecordBatch, skip: usize) -> Result<BatchBuilder, TaskError> {
    let mut builder = BatchBuilder::with_capacity(batch.size_bytes());
    for view in batch.views().skip(skip) {
        let view = view?;
        let headers: Vec<(&str, Option<&[u8]>)> = view.headers().collect();
        builder.push_parts(view.timestamp_ms, view.key, view.value, &headers)?;
    }
    Ok(builder)
}

/// Writes one batch numbered from `sequence`, skipping what the sink
/// already holds; the sequence after it.
async fn send_batch<C: TaskIo>(
    client: &C,
    producer: TaskProducer,
    topic: &str,
    partition: u32,
    mut sequence: i32,
    builder: BatchBuilder,
) -> Result<i32, TaskError> {
    if builder.is_empty() {
        return Ok(sequence);
    }
    let deadline = client.now() + SEND_RETRY_FOR;
    let mut backoff = Duration::from_millis(20);
    let mut batch = stamp(builder, producer, sequence)?;
    loop {
        let count = batch.record_count() as usize;
        // How many of these records the sink holds already.
        let written = match client.produce(topic, partition, batch.clone(), Acks::All).await {
            Ok(_) => count,
            Err(ClientError::Broker(BrokerError::StaleSequence { last_sequence, .. }))
            | Err(ClientError::Broker(BrokerError::SequenceMismatch {
                stored_last_sequence: last_sequence,
                ..
            })) => {
                // An earlier incarnation wrote (and the leader committed)
                // up to `last_sequence`: the same records, by determinism.
                // (Sequences wrap after i32::MAX: `runnel_storage::sequence`.)
                let held = match sequence_distance(sequence, last_sequence) {
                    ahead if ahead < SEQUENCE_SPACE / 2 => ahead + 1,
                    _ => 1,
                };
                held.clamp(1, count as i64) as usize
            }
            Err(ClientError::Broker(e @ BrokerError::OutOfOrderSequence { .. })) => {
                return Err(TaskError::OutputLost {
                    topic: topic.to_string(),
                    partition,
                    reason: e.to_string(),
                })
            }
            Err(e) if retryable(&e) && client.now() < deadline => {
                tracing::debug!(topic, partition, error = %e, "output batch not acknowledged; retrying");
                client.sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        sequence = sequence_add(sequence, written as i64);
        if written == count {
            return Ok(sequence);
        }
        batch = stamp(records_after(&batch, written)?, producer, sequence)?;
    }
}

/// What a checkpoint holds (postcard; chunked into one batch of records).
/// From version 3 it is followed by [`TablePositions`].
#[derive(Debug, Default, Serialize, Deserialize)]
struct Checkpoint {
    version: u8,
    task: u32,
    input_offset: u64,
    sequences: Vec<(String, u32, i32)>,
    max_event_ms: i64,
    upstreams: Vec<(u32, Upstream)>,
    /// `serde_bytes`: one copy to decode, not one call per byte (same encoding).
    #[serde(with = "serde_bytes")]
    window_state: Vec<u8>,
    records_in: u64,
    records_out: u64,
    dead_letters: u64,
}

/// Per table the stage joins with (in plan order), the offset read up to
/// in each of its partitions: the rows the task joined with since.
type TablePositions = Vec<Vec<u64>>;

/// A checkpoint, the table positions that follow it (none before version
/// 3) and the records it holds for a grace (none before version 4).
fn decode_checkpoint(bytes: &[u8]) -> Result<Restored, postcard::Error> {
    let (checkpoint, rest): (Checkpoint, _) = postcard::take_from_bytes(bytes)?;
    let (positions, held, read) = match checkpoint.version {
        CHECKPOINT_V2 => (Vec::new(), None, ReadSequences::default()),
        CHECKPOINT_V3 => (postcard::from_bytes(rest)?, None, ReadSequences::default()),
        version if version <= CHECKPOINT_V5 => {
            let (positions, held) = postcard::from_bytes(rest)?;
            (positions, held, ReadSequences::default())
        }
        _ => postcard::from_bytes(rest)?,
    };
    Ok((checkpoint, positions, held, read))
}

/// How many chunks the checkpoint whose last chunk is at offset `last`,
/// keyed `key`, has (its key is `i/n`); why not, naming the record.
fn chunk_count(last: u64, key: Option<&[u8]>) -> Result<u64, String> {
    let key = key.ok_or_else(|| format!("record at offset {last} has no key"))?;
    std::str::from_utf8(key)
        .ok()
        .and_then(|k| k.split_once('/'))
        .and_then(|(_, n)| n.parse().ok())
        .filter(|&n| n >= 1 && n <= last + 1)
        .ok_or_else(|| {
            format!(
                "last record's key {:?} is not a chunk key",
                String::from_utf8_lossy(key)
            )
        })
}

/// What a checkpoint restores.
type Restored = (Checkpoint, TablePositions, Option<GraceBuffer>, ReadSequences);

/// One input record of a source task, read now or held for a grace.
#[derive(Clone, Copy)]
struct Input<'a> {
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
    timestamp_ms: i64,
    offset: u64,
}

impl<'a> Input<'a> {
    fn of(held: &'a Held) -> Input<'a> {
        Input {
            key: held.key.as_deref().map(|k| &k[..]),
            value: held.value.as_deref().map(|v| &v[..]),
            timestamp_ms: held.timestamp_ms,
            offset: held.offset,
        }
    }

    fn held(self, event_ms: i64) -> Held {
        Held {
            event_ms,
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
            key: self.key.map(|k| serde_bytes::ByteBuf::from(k.to_vec())),
            value: self.value.map(|v| serde_bytes::ByteBuf::from(v.to_vec())),
        }
    }
}

/// What one step of a source task sends: per output partition (indexed
/// by it) the records and the greatest event time it receives (what it
/// learns of this task's progress from the data alone), and dead letters.
struct SourceOutput {
    outputs: Vec<Option<PartitionOutput>>,
    partition_max: Vec<i64>,
    dead_letters: PartitionOutput,
    /// Bytes to reserve per output partition.
    per_partition: usize,
}

impl SourceOutput {
    fn new(partitions: u32, per_partition: usize) -> SourceOutput {
        SourceOutput {
            outputs: (0..partitions).map(|_| None).collect(),
            partition_max: vec![i64::MIN; partitions as usize],
            dead_letters: PartitionOutput::new(0),
            per_partition,
        }
    }
}

/// What a window task knows of one upstream source task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    pub max_event_ms: i64,
    pub idle: bool,
}

/// The watermark of a task fed by `upstreams` (of `count` in all): unknown
/// until every upstream has spoken; then the least maximum event time of
/// the active ones (or the greatest, when all are idle).
pub fn watermark(upstreams: &BTreeMap<u32, Upstream>, count: u32) -> Option<i64> {
    if upstreams.len() < count as usize {
        return None;
    }
    let active = upstreams.values().filter(|u| !u.idle).map(|u| u.max_event_ms).min();
    active.or_else(|| upstreams.values().map(|u| u.max_event_ms).max())
}

/// Where a source task's markers to one partition stand.
#[derive(Clone, Copy)]
struct MarkerState {
    last_sent: Option<Duration>,
    announced: Upstream,
}

/// A running task: its input position, output sequences and stage state.
pub struct TaskRunner<C: TaskIo = Client> {
    def: Arc<DataflowDef>,
    assignment: TaskAssignment,
    client: Arc<C>,
    status: Arc<Mutex<TaskStatus>>,
    sender: ExactlyOnceSender,
    input_topic: String,
    input_offset: u64,
    /// Source stage: the greatest event time emitted so far.
    max_event_ms: i64,
    markers: Vec<MarkerState>,
    /// Since when a source task has been caught up with its input.
    caught_up_since: Option<Duration>,
    /// Window stage: its upstreams and its windows.
    upstreams: BTreeMap<u32, Upstream>,
    window: Option<Box<dyn WindowStage>>,
    /// Source stage: the tables it joins with, at the positions the newest
    /// checkpoint records.
    tables: Vec<TableState>,
    /// Source stage of a join by event time with a grace: the records it
    /// holds until their time is the grace past.
    grace: Option<GraceBuffer>,
    counters: Counters,
    last_checkpoint: Duration,
    dirty: bool,
    /// Who writes the checkpoints of a stage keeping a changelog (fenced;
    /// see [`changelog`]); others write them unsequenced.
    writer: Option<CheckpointWriter>,
    /// Scratch space, reused between records.
    emitted: Emitted,
    /// Deleting the repartitioned records every stage has read ([`purge`]).
    purge: purge::Purge,
    /// Stateful stage: the next record sequence of each upstream ([`dedup`]).
    read_sequences: ReadSequences,
}

/// What a window stage's fold of one fetch did: whether any record was
/// its input, and where it stopped when the changes pending for its
/// changelog filled a checkpoint (the next step reads on from there).
#[derive(Clone, Copy, Debug, Default)]
struct Folded {
    consumed: bool,
    stopped_at: Option<u64>,
}

#[derive(Clone, Copy, Default)]
struct Counters {
    records_in: u64,
    records_out: u64,
    dead_letters: u64,
    checkpoints: u64,
}

impl<C: TaskIo> TaskRunner<C> {
    /// Opens a task from its newest checkpoint (or from the start).
    pub async fn restore(
        def: Arc<DataflowDef>,
        assignment: TaskAssignment,
        client: Arc<C>,
        status: Arc<Mutex<TaskStatus>>,
    ) -> Result<TaskRunner<C>, TaskError> {
        let stage = assignment.stage();
        let input_topic = match def.source_of(stage) {
            Some((topic, _)) => topic.to_string(),
            None => repartition_topic(&def.name),
        };
        let window = match stage.checked_sub(def.source_count()) {
            Some(0) => def.window_stage.as_ref().map(|make| make()),
            Some(j) => def.next_stages.get(j as usize - 1).map(|make| make()),
            None => None,
        };
        let (tables, grace) = match def.source_of(stage) {
            Some((_, source)) => (source.table_states(), source.grace_ms().map(GraceBuffer::new)),
            None => (Vec::new(), None),
        };
        let started = client.now();
        let mut runner = TaskRunner {
            sender: ExactlyOnceSender::new(TaskProducer::of(&def.name, &assignment)),
            markers: vec![
                MarkerState {
                    last_sent: None,
                    announced: Upstream {
                        max_event_ms: i64::MIN,
                        idle: false,
                    },
                };
                assignment.partitions as usize
            ],
            def,
            assignment,
            client,
            status,
            input_topic,
            input_offset: 0,
            caught_up_since: None,
            max_event_ms: i64::MIN,
            upstreams: BTreeMap::new(),
            window,
            tables,
            grace,
            counters: Counters::default(),
            last_checkpoint: started,
            dirty: false,
            writer: None,
            emitted: Emitted::default(),
            purge: purge::Purge::default(),
            read_sequences: ReadSequences::default(),
        };
        let topic = checkpoint_topic(&runner.def.name);
        let mut barrier_end = 0;
        if runner.logs_changes() {
            let id = changelog::checkpoint_producer_id(&runner.def.name, runner.assignment.task);
            let (writer, barrier) = changelog::claim(&*runner.client, &topic, runner.assignment.task, id).await?;
            runner.writer = Some(writer);
            barrier_end = barrier + 1;
        }
        match runner.read_checkpoint(barrier_end).await? {
            Some(((checkpoint, positions, held, read), end)) => {
                runner.read_sequences = read;
                let version = checkpoint.version;
                runner.apply_checkpoint(checkpoint)?;
                runner.restore_store(version, end).await?;
                runner.rebuild_tables(positions).await?;
                runner.grace = match (held, runner.grace.take()) {
                    // The definition's grace applies; records held under
                    // another (or none now) leave by it.
                    (Some(held), grace) if !held.is_empty() => {
                        Some(held.with_grace_ms(grace.map_or(0, |g| g.grace_ms())))
                    }
                    (_, grace) => grace,
                };
            }
            None if !runner.tables.is_empty() => runner.load_tables().await?,
            None => {}
        }
        if runner.logs_changes() {
            // The newest checkpoint follows this incarnation's barrier, so
            // the next restore finds it without stepping back over the
            // barriers of restores that made no progress.
            runner.write_checkpoint().await?;
        }
        runner.publish("running");
        Ok(runner)
    }

    /// Reads the stage's state store back from its changelog, up to the
    /// checkpoint (ending at `end`) restored. A checkpoint of a format
    /// before 5 held the state itself: the store then has it all as
    /// changes, written at once as entries (in batches of their own, ahead
    /// of the next checkpoint, which then needs only what changes next).
    async fn restore_store(&mut self, version: u8, end: u64) -> Result<(), TaskError> {
        let task = self.assignment.task;
        let topic = checkpoint_topic(&self.def.name);
        let Some(store) = self.window.as_mut().and_then(|w| w.store_mut()) else {
            return Ok(());
        };
        if version < CHECKPOINT_V5 {
            let changes = store.changes()?;
            store.changes_written();
            return self.send_entries(changes).await;
        }
        let entries = changelog::replay(&*self.client, &topic, task, end, store).await?;
        tracing::info!(dataflow = %self.def.name, task, entries, "state restored from the changelog");
        Ok(())
    }

    /// Rebuilds the tables up to the positions the checkpoint records.
    async fn rebuild_tables(&mut self, positions: TablePositions) -> Result<(), TaskError> {
        let task = self.assignment.task;
        let fits = positions.len() == self.tables.len()
            && positions
                .iter()
                .zip(&self.tables)
                .all(|(p, t)| p.len() == t.positions().len());
        if !fits {
            return Err(TaskError::Checkpoint {
                task,
                reason: format!(
                    "it records positions of {} table(s), and the stage joins with {}",
                    positions.len(),
                    self.tables.len()
                ),
            });
        }
        for (table, positions) in self.tables.iter_mut().zip(&positions) {
            table.rebuild(&*self.client, positions).await?;
            tracing::info!(dataflow = %self.def.name, task, table = %table.join().table, rows = table.len(), "table rebuilt");
        }
        Ok(())
    }

    /// A new task reads its tables to their ends, and checkpoints where it
    /// read to before it joins anything.
    async fn load_tables(&mut self) -> Result<(), TaskError> {
        for table in &mut self.tables {
            table.load(&*self.client).await?;
        }
        self.write_checkpoint().await
    }

    fn apply_checkpoint(&mut self, checkpoint: Checkpoint) -> Result<(), TaskError> {
        let task = self.assignment.task;
        if !(CHECKPOINT_V2..=CHECKPOINT_VERSION).contains(&checkpoint.version) || checkpoint.task != task {
            return Err(TaskError::Checkpoint {
                task,
                reason: format!(
                    "found version {} of task {} (expected version {CHECKPOINT_VERSION} of task {task})",
                    checkpoint.version, checkpoint.task
                ),
            });
        }
        self.input_offset = checkpoint.input_offset;
        self.purge.checkpointed = checkpoint.input_offset;
        self.sender.sequences = checkpoint
            .sequences
            .into_iter()
            .map(|(topic, partition, sequence)| ((topic, partition), sequence))
            .collect();
        self.max_event_ms = checkpoint.max_event_ms;
        self.upstreams = checkpoint.upstreams.into_iter().collect();
        if let Some(window) = self.window.as_mut() {
            window.restore(&checkpoint.window_state)?;
        }
        self.counters.records_in = checkpoint.records_in;
        self.counters.records_out = checkpoint.records_out;
        self.counters.dead_letters = checkpoint.dead_letters;
        // The checkpoint restored from counts: the task has one to resume
        // from, though it writes none until it makes progress.
        self.counters.checkpoints = 1;
        tracing::info!(
            dataflow = %self.def.name,
            task,
            input_offset = self.input_offset,
            "task restored from its checkpoint"
        );
        Ok(())
    }

    /// The current rows of this task's state for `key` (or every key): a
    /// pull query's answer, from the state restored and kept up to date
    /// by this task.
    pub fn read_state(&self, key: Option<&[u8]>) -> Result<Vec<StateRow>, StateError> {
        let (dataflow, task) = (self.def.name.clone(), self.assignment.task);
        let Some(window) = &self.window else {
            return Err(StateError::Stateless { dataflow, task });
        };
        match window.read(key, STATE_ROWS_MAX) {
            Ok(Some(rows)) => Ok(rows),
            Ok(None) => Err(StateError::TooManyRows { dataflow, task }),
            Err(e) => Err(StateError::Failed {
                dataflow,
                task,
                reason: e.to_string(),
            }),
        }
    }

    /// The next input from the input offset: `None` when there is none to
    /// read now (a new leader's commit point, a retryable failure, or input
    /// that retention deleted, skipped to the oldest left).
    async fn fetch_input(&mut self) -> Result<Option<FetchedBatches>, TaskError> {
        let partition = self.assignment.partition();
        let fetched = match self
            .client
            .fetch(&self.input_topic, partition, self.input_offset, FETCH_BYTES)
            .await
        {
            Ok(fetched) => Some(fetched),
            // A new leader learns the commit point a moment after election.
            Err(ClientError::Broker(BrokerError::OffsetOutOfRange { offset, end, .. })) if offset > end => None,
            // Records of the repartition topic go only once every stage
            // reading them checkpointed past them ([`purge`]): one gone
            // from under a reader is a fault, not input to skip.
            Err(ClientError::Broker(BrokerError::OffsetOutOfRange { offset, start, .. }))
                if offset < start && !self.is_source() =>
            {
                let reason = format!("deleted from under its reader (the partition starts at {start})");
                let (topic, partition) = (self.input_topic.clone(), partition);
                return Err(TaskError::BadInput {
                    topic,
                    partition,
                    offset,
                    reason,
                });
            }
            // Retention deleted the input from here: go on from the oldest
            // record left (the next checkpoint records the move).
            Err(ClientError::Broker(BrokerError::OffsetOutOfRange { offset, start, .. })) if offset < start => {
                tracing::warn!(topic = %self.input_topic, partition, offset, start, "input deleted by retention skipped");
                self.input_offset = start;
                None
            }
            Err(e) if retryable(&e) => None,
            Err(e) => return Err(e.into()),
        };
        Ok(fetched)
    }

    /// One round: read, process, send. Returns whether there was input.
    pub async fn step(&mut self) -> Result<bool, TaskError> {
        let Some(fetched) = self.fetch_input().await? else {
            return Ok(false);
        };
        let caught_up = fetched.next_offset >= fetched.committed_offset;
        let mut progressed = fetched.has_records();
        let mut read_to = fetched.next_offset;
        if progressed {
            if self.is_source() {
                self.run_source(&fetched).await?;
            } else {
                // Records of another stateful stage's upstreams (the topic
                // is shared) are no progress: a stage feeding another must
                // not be woken by its own output.
                let folded = self.run_window(&fetched).await?;
                progressed = folded.consumed;
                read_to = folded.stopped_at.unwrap_or(read_to);
            }
            self.dirty |= progressed;
        }
        self.input_offset = self.input_offset.max(read_to);
        if !caught_up || progressed {
            self.caught_up_since = None;
        } else if self.caught_up_since.is_none() {
            self.caught_up_since = Some(self.client.now());
        }
        if self.feeds_next_stage() {
            // Its progress for the stage after it: what it can still emit.
            if let Some(window) = &self.window {
                self.max_event_ms = window.output_watermark_ms();
            }
        }
        if (self.is_source() && self.def.window_stage.is_some()) || self.feeds_next_stage() {
            let now = self.client.now();
            // Records held for a grace leave only when more input comes:
            // a task holding some is not idle (they would be late).
            let idle = self.caught_up_since.is_some_and(|since| now >= since + IDLE_AFTER)
                && self.grace.as_ref().is_none_or(GraceBuffer::is_empty);
            self.send_markers(idle).await?;
        }
        // Changes kept for a changelog must fit one checkpoint's batch.
        let changes_bytes = self.changes_bytes();
        let due =
            self.client.now() >= self.last_checkpoint + CHECKPOINT_INTERVAL || changes_bytes >= CHANGES_EARLY_BYTES;
        if due && (self.dirty || !self.tables.is_empty()) {
            self.checkpoint().await?;
        }
        self.purge_repartitioned().await;
        {
            let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
            status.input_end = fetched.committed_offset;
        }
        self.publish("running");
        Ok(progressed)
    }

    /// Whether the stage keeps its state in a changelog ([`changelog`]).
    fn logs_changes(&self) -> bool {
        self.window.as_ref().is_some_and(|w| w.store().is_some())
    }

    /// About what the changes pending for the changelog take.
    fn changes_bytes(&self) -> usize {
        self.window
            .as_ref()
            .and_then(|w| w.store())
            .map_or(0, |s| s.changes_bytes())
    }

    /// Whether this task runs a source stage (else the window stage).
    fn is_source(&self) -> bool {
        self.assignment.stage() < self.def.source_count()
    }

    /// The tasks a stateful task reads from the repartition topic (which
    /// every stateful stage shares) and whose progress its watermark waits
    /// for: every source task for the first, the tasks of the stage before
    /// for a later one.
    fn upstream_tasks(&self) -> std::ops::Range<u32> {
        let (partitions, sources) = (self.assignment.partitions, self.def.source_count());
        match self.assignment.stage().saturating_sub(sources) {
            0 => 0..sources * partitions,
            j => (sources + j - 1) * partitions..(sources + j) * partitions,
        }
    }

    /// Whether this is a stateful stage that feeds another (through the
    /// repartition topic) rather than the sink.
    fn feeds_next_stage(&self) -> bool {
        !self.is_source() && self.assignment.stage() + 1 < self.def.stages()
    }

    async fn run_source(&mut self, input: &FetchedBatches) -> Result<(), TaskError> {
        let keyed = self.def.window_stage.is_some();
        let Some((_, source)) = self.def.source_of(self.assignment.stage()) else {
            return Err(TaskError::Unregistered(self.def.name.clone()));
        };
        let source = source.clone();
        let (out_topic, out_partitions) = if keyed {
            (repartition_topic(&self.def.name), self.assignment.partitions)
        } else {
            (self.def.sink.clone(), self.assignment.partitions)
        };
        let input_bytes: usize = input.batches.iter().map(RecordBatch::size_bytes).sum();
        let mut batch = SourceOutput::new(out_partitions, input_bytes / out_partitions.max(1) as usize);
        let mut emitted = std::mem::take(&mut self.emitted);
        for view in input.views() {
            let view = view?;
            self.counters.records_in += 1;
            let record = Input {
                key: view.key,
                value: view.value,
                timestamp_ms: view.timestamp_ms,
                offset: view.offset,
            };
            let Some(grace) = self.grace.as_mut() else {
                self.run_record(&*source, record, &mut emitted, &mut batch)?;
                continue;
            };
            let event_ms = source.event_time(view.value, view.timestamp_ms);
            // Released after every record, not every fetch: what leaves
            // when, and in which order, must follow from the input alone (a
            // replay reads it in other fetches), or output sequences would
            // not match.
            let released = match event_ms {
                Ok(event_ms) => {
                    grace.push(record.held(event_ms));
                    grace.release()
                }
                Err(reason) => {
                    batch.dead_letters.push_record(&self.dead_letter(record, &reason))?;
                    continue;
                }
            };
            for held in released {
                self.run_record(&*source, Input::of(&held), &mut emitted, &mut batch)?;
            }
        }
        let SourceOutput {
            outputs,
            partition_max,
            dead_letters,
            ..
        } = batch;
        self.emitted = emitted;
        let outputs: BTreeMap<u32, PartitionOutput> = (0..out_partitions)
            .zip(outputs)
            .filter_map(|(p, output)| Some((p, output?)))
            .collect();
        let written: Vec<(u32, usize)> = outputs.iter().map(|(&p, o)| (p, o.len())).collect();
        self.sender.send_all(&*self.client, &out_topic, outputs).await?;
        for (partition, records) in &written {
            self.counters.records_out += *records as u64;
            if let Some(marker) = self.markers.get_mut(*partition as usize) {
                // Data names its upstream (by producer id): it is a marker too.
                marker.last_sent = Some(self.client.now());
                let sent_max = partition_max[*partition as usize];
                marker.announced = Upstream {
                    max_event_ms: marker.announced.max_event_ms.max(sent_max),
                    idle: false,
                };
            }
        }
        if !dead_letters.is_empty() {
            let topic = dead_letter_topic(&self.def.name);
            let count = dead_letters.len() as u64;
            self.sender
                .send_all(&*self.client, &topic, BTreeMap::from([(0, dead_letters)]))
                .await?;
            self.counters.dead_letters += count;
        }
        Ok(())
    }

    /// Runs one input record through the source stage into `batch`: its
    /// output by partition, or a dead letter.
    fn run_record(
        &mut self,
        source: &dyn SourceStage,
        record: Input<'_>,
        emitted: &mut Emitted,
        batch: &mut SourceOutput,
    ) -> Result<(), TaskError> {
        emitted.clear();
        let (key, value) = (record.key, record.value);
        if let Err(reason) = source.process_record(key, value, record.timestamp_ms, &self.tables, emitted) {
            batch.dead_letters.push_record(&self.dead_letter(record, &reason))?;
            return Ok(());
        }
        let out_partitions = batch.partition_max.len() as u32;
        for e in emitted.iter() {
            let partition = match e.key {
                // A keyed record goes where its key hashes: the
                // repartition topic's, or a SQL PARTITION BY's sink.
                Some(key) => partition_for_key(key, out_partitions),
                None => self.assignment.partition() % out_partitions,
            };
            self.max_event_ms = self.max_event_ms.max(e.timestamp_ms);
            let sent_max = &mut batch.partition_max[partition as usize];
            *sent_max = (*sent_max).max(e.timestamp_ms);
            batch.outputs[partition as usize]
                .get_or_insert_with(|| PartitionOutput::new(batch.per_partition))
                .push(e.timestamp_ms, e.key, e.value, &[])?;
        }
        Ok(())
    }

    fn dead_letter(&self, record: Input<'_>, reason: &str) -> Record {
        let origin = format!("{}/{}@{}", self.input_topic, self.assignment.partition(), record.offset);
        Record {
            timestamp_ms: record.timestamp_ms,
            key: Some(Bytes::from(origin)),
            value: record.value.map(Bytes::copy_from_slice),
            headers: vec![Header {
                key: HEADER_ERROR.to_string(),
                value: Some(Bytes::from(reason.to_string())),
            }],
        }
    }

    /// Tells repartition partitions this task has not written to lately how
    /// far its event time has gone, and whether it is idle.
    async fn send_markers(&mut self, idle: bool) -> Result<(), TaskError> {
        let now = Upstream {
            max_event_ms: self.max_event_ms,
            idle,
        };
        let topic = repartition_topic(&self.def.name);
        // The upstream is the task (which is its partition in stage 0).
        let upstream_bytes = Bytes::copy_from_slice(&self.assignment.task.to_le_bytes());
        for q in 0..self.markers.len() {
            let marker = self.markers[q];
            let due = marker
                .last_sent
                .is_none_or(|at| self.client.now() >= at + MARKER_INTERVAL);
            if marker.announced == now || !due {
                continue;
            }
            let record = Record {
                timestamp_ms: self.max_event_ms.max(0),
                key: None,
                value: None,
                headers: vec![
                    Header {
                        key: HEADER_UPSTREAM.to_string(),
                        value: Some(upstream_bytes.clone()),
                    },
                    Header {
                        key: HEADER_WATERMARK.to_string(),
                        value: Some(Bytes::copy_from_slice(&self.max_event_ms.to_le_bytes())),
                    },
                    Header {
                        key: HEADER_IDLE.to_string(),
                        value: Some(Bytes::from_static(if idle { &[1] } else { &[0] })),
                    },
                ],
            };
            let mut builder = BatchBuilder::new();
            builder.push(&record)?;
            // Unsequenced: markers depend on timing, not only on input, and
            // a duplicate marker changes nothing.
            match self.client.produce(&topic, q as u32, builder.build()?, Acks::All).await {
                Ok(_) => {
                    self.markers[q] = MarkerState {
                        last_sent: Some(self.client.now()),
                        announced: now,
                    };
                }
                Err(e) if retryable(&e) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Whether any record was this stage's input, and where the fold
    /// stopped if it stopped early (see [`Folded`]).
    async fn run_window(&mut self, input: &FetchedBatches) -> Result<Folded, TaskError> {
        let Some(mut window) = self.window.take() else {
            return Err(TaskError::Unregistered(self.def.name.clone()));
        };
        let mut emitted = std::mem::take(&mut self.emitted);
        emitted.clear();
        let outcome = self.fold_window(&mut *window, input, &mut emitted);
        self.window = Some(window);
        let folded = outcome?;
        let sink_partitions = self.assignment.partitions;
        let mut outputs: BTreeMap<u32, PartitionOutput> = BTreeMap::new();
        for e in emitted.iter() {
            let key = e.key.unwrap_or_default();
            outputs
                .entry(partition_for_key(key, sink_partitions))
                .or_insert_with(|| PartitionOutput::new(0))
                .push(e.timestamp_ms, Some(key), e.value, &[])?;
        }
        emitted.clear();
        self.emitted = emitted;
        let records_out: usize = outputs.values().map(PartitionOutput::len).sum();
        let sink = if self.feeds_next_stage() {
            repartition_topic(&self.def.name)
        } else {
            self.def.sink.clone()
        };
        self.sender.send_all(&*self.client, &sink, outputs).await?;
        self.counters.records_out += records_out as u64;
        Ok(folded)
    }

    /// Runs repartitioned records through the windows, moving the watermark
    /// after each record, so the result never depends on read boundaries.
    fn fold_window(
        &mut self,
        window: &mut dyn WindowStage,
        input: &FetchedBatches,
        out: &mut Emitted,
    ) -> Result<Folded, TaskError> {
        let all_tasks = self.def.stages() * self.assignment.partitions;
        let mut folded = Folded::default();
        for batch in input.user_batches() {
            // Data batches come from the tasks' fixed producer ids; those of
            // another stateful stage's upstreams are not this stage's input.
            let producer = batch.header().producer.producer_id;
            let writer = (0..all_tasks).find(|&t| task_producer_id(&self.def.name, t) == producer);
            if writer.is_some_and(|t| !self.upstream_tasks().contains(&t)) {
                continue;
            }
            let info = batch.header().producer;
            let sequenced =
                (info.base_sequence >= 0).then_some((info.producer_epoch, info.base_sequence, batch.base_offset()));
            let batch_folded = self.fold_batch(window, input.views_of(batch), (writer, sequenced), out)?;
            folded.consumed |= batch_folded.consumed;
            if batch_folded.stopped_at.is_some() {
                folded.stopped_at = batch_folded.stopped_at;
                break;
            }
        }
        Ok(folded)
    }

    /// Folds one batch's records; `writer` is the upstream whose producer
    /// id the batch carries, if any, and `sequenced` the batch's producer
    /// epoch, base sequence and base offset when it has sequences (a
    /// record read before is skipped: [`dedup`]).
    fn fold_batch<'a>(
        &mut self,
        window: &mut dyn WindowStage,
        views: impl Iterator<Item = Result<RecordView<'a>, runnel_storage::StorageError>>,
        (writer, sequenced): (Option<u32>, Option<(i16, i32, u64)>),
        out: &mut Emitted,
    ) -> Result<Folded, TaskError> {
        let mut folded = Folded::default();
        let upstreams = self.upstream_tasks();
        let upstream_count = upstreams.len() as u32;
        // A source's data is its progress; a stateful stage's output is not
        // in time order, so only its markers say how far it has come.
        let data_moves_watermark = upstreams.start == 0;
        for view in views {
            let view = view?;
            let bad = |reason: &str| TaskError::BadInput {
                topic: self.input_topic.clone(),
                partition: self.assignment.partition(),
                offset: view.offset,
                reason: reason.to_string(),
            };
            let header = |name: &str| view.header(name).flatten();
            // Markers name their upstream; data is known by its producer.
            let upstream = match header(HEADER_UPSTREAM) {
                Some(v) => <[u8; 4]>::try_from(v)
                    .map(u32::from_le_bytes)
                    .map_err(|_| bad("upstream header is not 4 bytes"))?,
                None => writer.ok_or_else(|| bad("neither an upstream header nor a task's producer id"))?,
            };
            if !upstreams.contains(&upstream) {
                // Another stateful stage's upstream (they share the topic).
                continue;
            }
            if let (Some(writer), Some((epoch, base_sequence, base_offset))) = (writer, sequenced) {
                let delta = i64::try_from(view.offset.saturating_sub(base_offset)).unwrap_or(i64::MAX);
                let sequence = sequence_add(base_sequence, delta.min(SEQUENCE_SPACE));
                if !self.read_sequences.admit(writer, epoch, sequence) {
                    continue;
                }
            }
            folded.consumed = true;
            let entry = self.upstreams.entry(upstream).or_insert(Upstream {
                max_event_ms: i64::MIN,
                idle: false,
            });
            if let Some(wm) = header(HEADER_WATERMARK) {
                let wm = <[u8; 8]>::try_from(wm)
                    .map(i64::from_le_bytes)
                    .map_err(|_| bad("watermark header is not 8 bytes"))?;
                entry.max_event_ms = entry.max_event_ms.max(wm);
                entry.idle = header(HEADER_IDLE).is_some_and(|v| v == [1]);
            } else {
                self.counters.records_in += 1;
                if data_moves_watermark {
                    entry.max_event_ms = entry.max_event_ms.max(view.timestamp_ms);
                }
                entry.idle = false;
                let key = view.key.unwrap_or_default();
                let value = view.value.unwrap_or_default();
                window.add(key, value, view.timestamp_ms, out)?;
            }
            if let Some(wm) = watermark(&self.upstreams, upstream_count) {
                window.advance(wm, out)?;
            }
            if window.store().is_some_and(|s| s.changes_bytes() >= CHANGES_EARLY_BYTES) {
                folded.stopped_at = Some(view.offset + 1);
                break;
            }
        }
        Ok(folded)
    }

    /// Moves the tables on to their ends (their positions move only here,
    /// just before a checkpoint records them), then checkpoints if the
    /// input or a table moved.
    async fn checkpoint(&mut self) -> Result<(), TaskError> {
        let mut moved = false;
        for table in &mut self.tables {
            moved |= table.refresh(&*self.client).await?;
        }
        if self.dirty || moved {
            return self.write_checkpoint().await;
        }
        self.last_checkpoint = self.client.now();
        Ok(())
    }

    /// Writes the task's state as one batch of chunk records keyed `i/n`.
    async fn write_checkpoint(&mut self) -> Result<(), TaskError> {
        let task = self.assignment.task;
        let checkpoint_offset = self.input_offset;
        let checkpoint = Checkpoint {
            version: CHECKPOINT_VERSION,
            task,
            input_offset: self.input_offset,
            sequences: self
                .sender
                .sequences
                .iter()
                .map(|((topic, partition), sequence)| (topic.clone(), *partition, *sequence))
                .collect(),
            max_event_ms: self.max_event_ms,
            upstreams: self.upstreams.iter().map(|(&u, &s)| (u, s)).collect(),
            window_state: match &self.window {
                Some(window) => window.snapshot()?,
                None => Vec::new(),
            },
            records_in: self.counters.records_in,
            records_out: self.counters.records_out,
            dead_letters: self.counters.dead_letters,
        };
        let positions: TablePositions = self.tables.iter().map(|t| t.positions().to_vec()).collect();
        let bytes =
            postcard::to_allocvec(&(checkpoint, (positions, &self.grace, &self.read_sequences))).map_err(|e| {
                TaskError::Checkpoint {
                    task,
                    reason: e.to_string(),
                }
            })?;
        // A stage keeping a changelog writes its changed entries in the
        // same batch, before the chunks (see `changelog`).
        let changes = match self.window.as_ref().and_then(|w| w.store()) {
            Some(store) => store.changes()?,
            None => Vec::new(),
        };
        let batch_bytes = bytes.len() + changelog::entries_bytes(&changes);
        if batch_bytes > CHECKPOINT_BYTES_MAX && self.logs_changes() {
            // Its changes only grow until written: deferring cannot help.
            // (The task stops reading at CHANGES_EARLY_BYTES; an estimate
            // that far off means entries far larger than the records.)
            let reason = format!(
                "its changes since the last checkpoint take {batch_bytes} bytes, over the {CHECKPOINT_BYTES_MAX} a checkpoint holds"
            );
            return Err(TaskError::Checkpoint { task, reason });
        }
        if batch_bytes > CHECKPOINT_BYTES_MAX {
            // The windows are held open, typically by an upstream that lags
            // the others (the watermark waits for it). The last checkpoint
            // stays a valid place to restart from (replay is deterministic),
            // so the task goes on and tries again after the interval rather
            // than failing and restarting into the same state. (A source
            // stage keeps no window state: the table positions it joined
            // with are always recorded.)
            debug_assert!(self.tables.is_empty(), "a joining stage's checkpoint is small");
            tracing::warn!(
                dataflow = %self.def.name,
                task,
                state_bytes = bytes.len(),
                limit_bytes = CHECKPOINT_BYTES_MAX,
                "checkpoint deferred: the task's state is over the checkpoint limit (add partitions or shorten windows if this persists)"
            );
            self.last_checkpoint = self.client.now();
            return Ok(());
        }
        let chunks: Vec<&[u8]> = bytes.chunks(CHECKPOINT_CHUNK_BYTES).collect();
        let mut builder = BatchBuilder::new();
        changelog::push_entries(&mut builder, changes)?;
        for (i, chunk) in chunks.iter().enumerate() {
            builder.push(&Record {
                timestamp_ms: 0,
                key: Some(Bytes::from(format!("{i}/{}", chunks.len()))),
                value: Some(Bytes::copy_from_slice(chunk)),
                headers: Vec::new(),
            })?;
        }
        self.send_checkpoint(builder).await?;
        self.purge.checkpointed = checkpoint_offset;
        if let Some(store) = self.window.as_mut().and_then(|w| w.store_mut()) {
            store.changes_written();
        }
        self.send_obsolete().await?;
        self.last_checkpoint = self.client.now();
        self.dirty = false;
        self.counters.checkpoints += 1;
        Ok(())
    }

    /// Writes changelog entries outside a checkpoint (a restored format-4
    /// state, tombstones of entries a checkpoint made obsolete) as the
    /// claimed writer, in batches of at most [`ENTRY_BATCH_BYTES`].
    async fn send_entries(&mut self, entries: Vec<Change>) -> Result<(), TaskError> {
        let (mut builder, mut bytes) = (BatchBuilder::new(), 0);
        for entry in entries {
            let size = changelog::entries_bytes(std::slice::from_ref(&entry));
            if bytes > 0 && bytes + size > ENTRY_BATCH_BYTES {
                let full = std::mem::replace(&mut builder, BatchBuilder::new());
                self.send_checkpoint(full).await?;
                bytes = 0;
            }
            changelog::push_entries(&mut builder, vec![entry])?;
            bytes += size;
        }
        if bytes > 0 {
            self.send_checkpoint(builder).await?;
        }
        Ok(())
    }

    /// Tombstones for the entries the checkpoint just written made
    /// obsolete (a restore ignores them; these let compaction drop them).
    async fn send_obsolete(&mut self) -> Result<(), TaskError> {
        loop {
            let Some(store) = self.window.as_mut().and_then(|w| w.store_mut()) else {
                return Ok(());
            };
            let keys = store.take_obsolete(OBSOLETE_KEYS_PER_BATCH);
            if keys.is_empty() {
                return Ok(());
            }
            self.send_entries(keys.into_iter().map(|key| (key, None)).collect())
                .await?;
        }
    }

    /// Writes a batch to the checkpoint partition (a checkpoint, entries):
    /// unsequenced (a checkpoint written twice is harmless), or as the
    /// claimed writer of a changelog, whose write an incarnation restored
    /// since refuses.
    async fn send_checkpoint(&mut self, mut builder: BatchBuilder) -> Result<(), TaskError> {
        let (task, topic) = (self.assignment.task, checkpoint_topic(&self.def.name));
        if !self.logs_changes() {
            self.client.produce(&topic, task, builder.build()?, Acks::All).await?;
            return Ok(());
        }
        let Some(mut writer) = self.writer.take() else {
            let reason = "its last checkpoint write failed: it must be restored".to_string();
            return Err(TaskError::Checkpoint { task, reason });
        };
        let records = builder.record_count() as usize;
        if writer.worn_out(records) {
            writer = changelog::renew(&*self.client, &topic, task, writer).await?;
        }
        writer.stamp(&mut builder, records);
        let batch = builder.build()?;
        // Sent again as it is while the cluster does not answer: the
        // leader recognises its producer's sequence, so it is written at
        // most once, and its fate becomes known. Past that, the task fails
        // (the sequence moved on) and its next incarnation claims anew.
        let deadline = self.client.now() + SEND_RETRY_FOR;
        let mut backoff = Duration::from_millis(20);
        loop {
            match self.client.produce(&topic, task, batch.clone(), Acks::All).await {
                Ok(_) => {
                    self.writer = Some(writer);
                    return Ok(());
                }
                Err(ClientError::Broker(BrokerError::ProducerFenced { .. } | BrokerError::StaleSequence { .. })) => {
                    return Err(changelog::fenced(&topic, task, writer.epoch))
                }
                Err(e) if retryable(&e) && self.client.now() < deadline => {
                    tracing::debug!(topic, task, error = %e, "checkpoint not acknowledged; sending it again");
                    self.client.sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The newest checkpoint, and the offset after it: the last record
    /// (barriers aside) is chunk `n-1/n`, and the whole checkpoint is the
    /// `n` records ending there (one batch).
    async fn read_checkpoint(&self, after: u64) -> Result<Option<(Restored, u64)>, TaskError> {
        let task = self.assignment.task;
        let topic = checkpoint_topic(&self.def.name);
        let end = self.committed_past(&topic, after).await?;
        let corrupt = |reason: String| TaskError::Checkpoint { task, reason };
        let Some((last, key)) = self.last_chunk(&topic, task, end).await? else {
            return Ok(None);
        };
        let count = chunk_count(last, key.as_deref()).map_err(corrupt)?;
        let end = last + 1;
        let mut bytes = Vec::new();
        let mut offset = end - count;
        let mut expected = 0;
        while offset < end {
            let fetched = self.client.fetch(&topic, task, offset, 8 << 20).await?.into_records()?;
            if fetched.records.is_empty() {
                return Err(corrupt(format!("nothing read at offset {offset}")));
            }
            for record in fetched.records.iter().filter(|r| r.offset < end) {
                let want = format!("{expected}/{count}");
                if record.record.key.as_deref() != Some(want.as_bytes()) {
                    return Err(corrupt(format!("chunk at offset {} is not {want}", record.offset)));
                }
                bytes.extend_from_slice(record.record.value.as_deref().unwrap_or_default());
                expected += 1;
            }
            offset = fetched.next_offset;
        }
        let decoded = decode_checkpoint(&bytes).map_err(|e| corrupt(format!("does not decode: {e}")))?;
        Ok(Some((decoded, end)))
    }

    /// The partition's commit point once it is past `after` (a barrier
    /// this incarnation committed: a new leader may report an older commit
    /// point for a moment, and a checkpoint below the barrier must not be
    /// missed).
    async fn committed_past(&self, topic: &str, after: u64) -> Result<u64, TaskError> {
        let task = self.assignment.task;
        for _ in 0..COMMIT_WAITS_MAX {
            let end = self.client.fetch(topic, task, 0, 1).await?.committed_offset;
            if end >= after {
                return Ok(end);
            }
            self.client.sleep(COMMIT_WAIT).await;
        }
        let reason = format!("{topic}/{task} did not commit past offset {after} in {COMMIT_WAITS_MAX} tries");
        Err(TaskError::Checkpoint { task, reason })
    }

    /// The newest record below `end` that is neither a barrier nor a
    /// changelog entry (a checkpoint's last chunk, if the partition is
    /// sound): its offset and key. Steps back a batch at a time; Raft's
    /// own entries (a new leader's empty entry, configuration changes) are
    /// control batches that hold an offset but no record.
    async fn last_chunk(&self, topic: &str, task: u32, end: u64) -> Result<Option<(u64, Option<Bytes>)>, TaskError> {
        let mut probe = end;
        for _ in 0..CHUNK_PROBES_MAX {
            let Some(at) = probe.checked_sub(1) else {
                return Ok(None);
            };
            let fetched = self.client.fetch(topic, task, at, 1).await?;
            let Some(batch) = fetched.batches.first() else {
                let reason = format!("{topic}/{task} answered nothing at {at}, below its commit point {end}");
                return Err(TaskError::Checkpoint { task, reason });
            };
            let mut found = None;
            for view in batch.views().filter(|_| !batch.is_control()) {
                let view = view?;
                let skipped = view
                    .key
                    .is_some_and(|k| k == changelog::BARRIER_KEY || k.starts_with(changelog::ENTRY_PREFIX));
                if view.offset < end && !skipped {
                    found = Some((view.offset, view.key.map(Bytes::copy_from_slice)));
                }
            }
            if found.is_some() {
                return Ok(found);
            }
            probe = batch.base_offset().min(at);
        }
        let reason = format!("{topic}/{task}: no checkpoint in the last {CHUNK_PROBES_MAX} batches below {end}");
        Err(TaskError::Checkpoint { task, reason })
    }

    /// Publishes the task's figures for `runnel dataflow describe`.
    fn publish(&self, state: &str) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        status.state = state.to_string();
        status.input_topic = self.input_topic.clone();
        status.input_offset = self.input_offset;
        status.records_in = self.counters.records_in;
        status.records_out = self.counters.records_out;
        status.dead_letters = self.counters.dead_letters;
        status.checkpoints = self.counters.checkpoints;
        if let Some(window) = &self.window {
            status.late_records = window.late_records();
            status.watermark_ms = Some(window.watermark_ms()).filter(|&w| w > i64::MIN);
        } else {
            status.watermark_ms = Some(self.max_event_ms).filter(|&w| w > i64::MIN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_of_version_2_read_without_tables_3_without_held_records_4_and_5_with_them_and_6_with_sequences() {
        let checkpoint = |version| Checkpoint {
            version,
            task: 4,
            input_offset: 17,
            ..Checkpoint::default()
        };
        let old = postcard::to_allocvec(&checkpoint(CHECKPOINT_V2)).expect("encodes");
        let (read, positions, held, _) = decode_checkpoint(&old).expect("version 2 decodes");
        assert_eq!((read.task, read.input_offset, positions.len(), held), (4, 17, 0, None));
        let tables: TablePositions = vec![vec![3, 0, 9]];
        let v3 = postcard::to_allocvec(&(checkpoint(CHECKPOINT_V3), &tables)).expect("encodes");
        let (read, positions, held, _) = decode_checkpoint(&v3).expect("version 3 decodes");
        assert_eq!((read.input_offset, &positions, held), (17, &tables, None));
        let mut grace = GraceBuffer::new(1_000);
        grace.push(
            Input {
                key: None,
                value: Some(b"{}"),
                timestamp_ms: 5,
                offset: 16,
            }
            .held(5),
        );
        // Version 5 is encoded as 4 (its window state may be empty).
        for version in [4, CHECKPOINT_V5] {
            let v4 = postcard::to_allocvec(&(checkpoint(version), (&tables, Some(&grace)))).expect("encodes");
            let (read, positions, held, sequences) = decode_checkpoint(&v4).expect("version 4 decodes");
            assert_eq!(
                (read.input_offset, &positions, held.as_ref(), sequences),
                (17, &tables, Some(&grace), ReadSequences::default())
            );
            assert!(decode_checkpoint(&v4[..v4.len() - 1]).is_err(), "cut short");
        }
        let mut sequences = ReadSequences::default();
        assert!(sequences.admit(2, 0, 40));
        let v6 = postcard::to_allocvec(&(checkpoint(CHECKPOINT_VERSION), (&tables, Some(&grace), &sequences)))
            .expect("encodes");
        let (read, positions, held, read_sequences) = decode_checkpoint(&v6).expect("version 6 decodes");
        assert_eq!(
            (read.input_offset, &positions, held.as_ref(), read_sequences),
            (17, &tables, Some(&grace), sequences)
        );
        assert!(decode_checkpoint(&v6[..v6.len() - 1]).is_err(), "cut short");
    }

    /// Output whose sequence would pass i32::MAX is refused before it is
    /// sent (a wrapped sequence would be taken as stale and its records
    /// skipped as written), naming the partition.
    #[tokio::test]
    async fn output_past_the_largest_sequence_goes_on_from_0_and_a_retry_across_it_is_written_once() {
        let io = crate::testing::MemoryIo::default();
        let assignment = TaskAssignment {
            dataflow: "d".into(),
            task: 0,
            partitions: 1,
            stages: 2,
            generation: 0,
        };
        let producer = TaskProducer::of("d", &assignment);
        io.seed_sequence("out", 0, producer.id, producer.epoch, i32::MAX - 1);
        let records = |n: usize| {
            let mut builder = BatchBuilder::new();
            for _ in 0..n {
                builder.push(&Record::default()).expect("push");
            }
            builder
        };
        let next = send_batch(&io, producer, "out", 0, i32::MAX - 1, records(3)).await;
        assert_eq!(next.expect("written across the wrap"), 1);
        let again = send_batch(&io, producer, "out", 0, i32::MAX - 1, records(3)).await;
        assert_eq!(again.expect("a retry"), 1, "answered as written");
        assert_eq!(
            send_batch(&io, producer, "out", 0, 1, records(2))
                .await
                .expect("on from 1"),
            3
        );
        let written: Vec<(i32, u32)> = io
            .batches("out", 0)
            .iter()
            .map(|b| (b.header().producer.base_sequence, b.record_count()))
            .collect();
        assert_eq!(written, [(i32::MAX - 1, 3), (1, 2)], "each record once");
    }

    #[test]
    fn watermark_waits_for_every_upstream_and_ignores_idle_ones() {
        let mut upstreams = BTreeMap::new();
        let at = |max_event_ms, idle| Upstream { max_event_ms, idle };
        upstreams.insert(0, at(100, false));
        assert_eq!(watermark(&upstreams, 2), None, "upstream 1 has not spoken");
        upstreams.insert(1, at(50, false));
        assert_eq!(
            watermark(&upstreams, 2),
            Some(50),
            "the slowest active upstream holds it"
        );
        upstreams.insert(1, at(50, true));
        assert_eq!(watermark(&upstreams, 2), Some(100), "an idle upstream does not");
        upstreams.insert(0, at(100, true));
        assert_eq!(watermark(&upstreams, 2), Some(100), "all idle: the furthest");
    }

    #[test]
    fn producer_ids_are_stable_and_distinct() {
        assert_eq!(task_producer_id("f", 1), task_producer_id("f", 1));
        assert_ne!(task_producer_id("f", 1), task_producer_id("f", 2));
        assert_ne!(task_producer_id("f", 1), task_producer_id("g", 1));
        assert!(task_producer_id("f", 1) >= 0);
    }
}
