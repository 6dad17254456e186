//! An in-memory cluster for tests of task code: [`MemoryIo`] is a
//! [`TaskIo`] whose topics are lists of records per partition and whose
//! clock moves only when told, so a test can run the real [`TaskRunner`]
//! (restore, steps, checkpoints) deterministically without nodes.
//!
//! Writes of an idempotent producer are checked as a partition's leader
//! checks them, in brief: a producer's first batch starts at sequence 0
//! (else `InvalidRequest`, as for a producer the leader does not know), a
//! batch of an epoch older than the producer's newest is refused
//! (`ProducerFenced`), a batch starting before the next sequence is a retry
//! (answered with where its original is, not written again;
//! `SequenceMismatch` when the original is of another length), and one
//! starting after it is refused (`OutOfOrderSequence`); before and after
//! across the wrap of sequences ([`runnel_storage::sequence`]).
//!
//! [`TaskRunner`]: crate::task::TaskRunner

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use runnel_client::{Acks, BrokerError, ClientError, ClientResult, FetchedBatches};
use runnel_storage::sequence::{sequence_add, sequence_before};
use runnel_storage::{BatchBuilder, Record, RecordBatch};

use crate::builder::{Change, StageError, StateStore, WindowStage, WindowStageFactory};
use crate::task::TaskIo;

/// A partition (topic, partition) and a producer id on it.
type ProducerKey = (String, u32, i64);

/// Topics in memory, and a clock moved by hand.
#[derive(Default)]
pub struct MemoryIo {
    /// Per partition, its batches as produced (producer ids kept), with
    /// their offsets.
    logs: Mutex<BTreeMap<(String, u32), Vec<RecordBatch>>>,
    /// Per partition and producer id: its newest epoch and next sequence.
    producers: Mutex<BTreeMap<ProducerKey, (i16, i32)>>,
    now: Mutex<Duration>,
    /// Batches one fetch answers at most (all when 0).
    fetch_batches_max: usize,
    /// Per partition, where deleting records moved its start (0 if absent).
    starts: Mutex<BTreeMap<(String, u32), u64>>,
    /// Per partition, how many more produces are written but answered as
    /// if the cluster did not answer ([`MemoryIo::lose_answers`]).
    lost_answers: Mutex<BTreeMap<(String, u32), usize>>,
}

impl MemoryIo {
    /// Topics whose fetches answer at most `fetch_batches_max` batches
    /// (all when 0).
    pub fn fetching(fetch_batches_max: usize) -> MemoryIo {
        MemoryIo {
            fetch_batches_max,
            ..MemoryIo::default()
        }
    }

    /// Appends `record`, as a batch of its own, to partition `partition`
    /// of `topic`.
    pub fn append(&self, topic: &str, partition: u32, record: Record) {
        let mut builder = BatchBuilder::new();
        builder.push(&record).expect("a record within the batch limits");
        let batch = builder.build().expect("a batch of one record");
        self.write(topic, partition, batch);
    }

    /// Checks a producer's batch (see the module doc): `Some` offset of the
    /// original for a retry, `None` to write it.
    fn check(&self, topic: &str, partition: u32, batch: &RecordBatch) -> ClientResult<Option<u64>> {
        let producer = batch.header().producer;
        if producer.producer_id < 0 || producer.base_sequence < 0 {
            return Ok(None);
        }
        let mut producers = self.producers.lock().unwrap_or_else(|p| p.into_inner());
        let key = (topic.to_string(), partition, producer.producer_id);
        if !producers.contains_key(&key) && producer.base_sequence != 0 {
            return Err(ClientError::Broker(BrokerError::InvalidRequest(format!(
                "producer {} is not known here and its sequence {} is not 0",
                producer.producer_id, producer.base_sequence
            ))));
        }
        let (epoch, next) = producers.entry(key).or_insert((producer.producer_epoch, 0));
        let stale = BrokerError::StaleSequence {
            producer_id: producer.producer_id,
            last_sequence: sequence_add(*next, -1),
            got: producer.base_sequence,
        };
        if producer.producer_epoch < *epoch {
            return Err(ClientError::Broker(BrokerError::ProducerFenced {
                producer_id: producer.producer_id,
                epoch: producer.producer_epoch,
                newest_epoch: *epoch,
            }));
        }
        if producer.producer_epoch > *epoch {
            (*epoch, *next) = (producer.producer_epoch, 0);
        }
        if sequence_before(*next, producer.base_sequence) {
            return Err(ClientError::Broker(BrokerError::OutOfOrderSequence {
                producer_id: producer.producer_id,
                expected: *next,
                got: producer.base_sequence,
            }));
        }
        if producer.base_sequence != *next {
            let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
            let log = logs.get(&(topic.to_string(), partition)).map_or(&[][..], Vec::as_slice);
            let original = log.iter().rev().find(|b| {
                let p = b.header().producer;
                (p.producer_id, p.producer_epoch, p.base_sequence)
                    == (producer.producer_id, *epoch, producer.base_sequence)
            });
            let Some(original) = original else {
                return Err(ClientError::Broker(stale));
            };
            let stored = original.header().record_count as i32;
            if stored != batch.header().record_count as i32 {
                return Err(ClientError::Broker(BrokerError::SequenceMismatch {
                    producer_id: producer.producer_id,
                    base_sequence: producer.base_sequence,
                    stored_last_sequence: sequence_add(producer.base_sequence, i64::from(stored) - 1),
                }));
            }
            return Ok(Some(original.base_offset()));
        }
        *next = sequence_add(*next, i64::from(batch.header().record_count));
        Ok(None)
    }

    /// Takes producer `producer_id` (of `epoch`) to have written up to
    /// just before `next` on partition `partition` of `topic`, as if it had
    /// written that many records (to test what follows its 2^31st).
    pub fn seed_sequence(&self, topic: &str, partition: u32, producer_id: i64, epoch: i16, next: i32) {
        let mut producers = self.producers.lock().unwrap_or_else(|p| p.into_inner());
        producers.insert((topic.to_string(), partition, producer_id), (epoch, next));
    }

    /// The batches of partition `partition` of `topic`, as written.
    pub fn batches(&self, topic: &str, partition: u32) -> Vec<RecordBatch> {
        let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        logs.get(&(topic.to_string(), partition)).cloned().unwrap_or_default()
    }

    /// Appends `batch` as it is, its producer's sequence unchecked: a
    /// retry as a replica that forgot its producer takes it, as new.
    pub fn write_again(&self, topic: &str, partition: u32, batch: RecordBatch) -> u64 {
        self.write(topic, partition, batch)
    }

    fn write(&self, topic: &str, partition: u32, mut batch: RecordBatch) -> u64 {
        let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        let log = logs.entry((topic.to_string(), partition)).or_default();
        let base = log.last().map_or(0, RecordBatch::next_offset);
        batch.set_base_offset(base);
        log.push(batch);
        base
    }

    /// The records of partition `partition` of `topic`, in order.
    pub fn records(&self, topic: &str, partition: u32) -> Vec<Record> {
        let mut records = Vec::new();
        for batch in &self.batches(topic, partition) {
            for view in batch.views().flatten() {
                records.push(Record {
                    timestamp_ms: view.timestamp_ms,
                    key: view.key.map(Bytes::copy_from_slice),
                    value: view.value.map(Bytes::copy_from_slice),
                    headers: Vec::new(),
                });
            }
        }
        records
    }

    /// The next `count` produces to partition `partition` of `topic` are
    /// written (or recognised as retries) but answered `Unavailable`, as
    /// when the answer is lost.
    pub fn lose_answers(&self, topic: &str, partition: u32, count: usize) {
        let mut lost = self.lost_answers.lock().unwrap_or_else(|p| p.into_inner());
        lost.insert((topic.to_string(), partition), count);
    }

    /// Where a partition starts: what deleting records left.
    pub fn start_of(&self, topic: &str, partition: u32) -> u64 {
        let starts = self.starts.lock().unwrap_or_else(|p| p.into_inner());
        starts.get(&(topic.to_string(), partition)).copied().unwrap_or(0)
    }

    /// Moves the clock on.
    pub fn pass(&self, time: Duration) {
        *self.now.lock().unwrap_or_else(|p| p.into_inner()) += time;
    }
}

impl TaskIo for MemoryIo {
    async fn fetch(&self, topic: &str, partition: u32, offset: u64, _: u32) -> ClientResult<FetchedBatches> {
        let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        let log = logs.get(&(topic.to_string(), partition)).cloned().unwrap_or_default();
        let end = log.last().map_or(0, RecordBatch::next_offset);
        let start = self.start_of(topic, partition);
        if offset < start {
            return Err(ClientError::Broker(BrokerError::OffsetOutOfRange {
                offset,
                start,
                end,
            }));
        }
        let max = match self.fetch_batches_max {
            0 => usize::MAX,
            max => max,
        };
        let batches = log.into_iter().filter(|b| b.next_offset() > offset).take(max).collect();
        Ok(FetchedBatches::new(offset, batches, end))
    }

    async fn produce(&self, topic: &str, partition: u32, batch: RecordBatch, _: Acks) -> ClientResult<u64> {
        let offset = match self.check(topic, partition, &batch)? {
            Some(original) => original,
            None => self.write(topic, partition, batch),
        };
        let mut lost = self.lost_answers.lock().unwrap_or_else(|p| p.into_inner());
        match lost.get_mut(&(topic.to_string(), partition)).filter(|left| **left > 0) {
            Some(left) => {
                *left -= 1;
                Err(ClientError::Unavailable {
                    topic: topic.to_string(),
                    partition,
                    timeout_ms: 0,
                    last_error: "the answer was lost (MemoryIo::lose_answers)".to_string(),
                })
            }
            None => Ok(offset),
        }
    }

    async fn delete_records(&self, topic: &str, partition: u32, before_offset: u64) -> ClientResult<u64> {
        let end = {
            let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
            let log = logs.get(&(topic.to_string(), partition));
            log.and_then(|l| l.last()).map_or(0, RecordBatch::next_offset)
        };
        let mut starts = self.starts.lock().unwrap_or_else(|p| p.into_inner());
        let start = starts.entry((topic.to_string(), partition)).or_default();
        if before_offset > end {
            let (offset, start) = (before_offset, *start);
            return Err(ClientError::Broker(BrokerError::OffsetOutOfRange {
                offset,
                start,
                end,
            }));
        }
        *start = (*start).max(before_offset);
        Ok(*start)
    }

    fn now(&self) -> Duration {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn sleep(&self, pause: Duration) {
        self.pass(pause);
    }
}

/// A seeded linear congruential generator (Knuth's MMIX constants): test
/// inputs that are the same on every run.
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Lcg {
        Lcg(seed)
    }

    /// The next state; callers take the bits they need (`>> 33` is well
    /// mixed).
    pub fn next_state(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0
    }
}

/// A new stage from `factory`, restored as a task restores one from a
/// checkpoint taken now: `from`'s snapshot, then the entries its state
/// store has not yet had written (all of them, when it never had).
pub fn restored(factory: &WindowStageFactory, from: &dyn WindowStage) -> Result<Box<dyn WindowStage>, StageError> {
    let mut stage = factory();
    stage.restore(&from.snapshot()?)?;
    if let (Some(source), Some(store)) = (from.store(), stage.store_mut()) {
        for (key, value) in source.changes()? {
            store.apply_change(&key, value.as_deref())?;
        }
    }
    Ok(stage)
}

/// A partition's changelog entries, in the order written.
pub type Changelog = Vec<Change>;

/// What a task's checkpoint writes of `store` into `log`: its changes,
/// then (when `tombstones`, else as if the task crashed first) the
/// tombstones of the entries that checkpoint made obsolete.
pub fn checkpoint_into(store: &mut dyn StateStore, log: &mut Changelog, tombstones: bool) {
    log.extend(store.changes().expect("changes encode"));
    store.changes_written();
    let obsolete = store.take_obsolete(usize::MAX);
    if tombstones {
        log.extend(obsolete.into_iter().map(|key| (key, None)));
    }
}

/// `log` as compaction leaves it at most: each key's latest entry.
pub fn compacted(log: &Changelog) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
    log.iter().cloned().collect()
}

/// Applies the entries of `log` to `store`, as a restore replays them:
/// every version in order, or (`compacted`) each key's latest.
pub fn replay_into(store: &mut dyn StateStore, log: &Changelog, compacted_first: bool) {
    let entries: Changelog = match compacted_first {
        true => compacted(log).into_iter().collect(),
        false => log.clone(),
    };
    for (key, value) in &entries {
        store.apply_change(key, value.as_deref()).expect("an entry applies");
    }
}

/// A sink record as [`run_through`] returns it: key and value.
pub type KeyValue = (Vec<u8>, Option<Vec<u8>>);

/// Runs one source record (`key`, `value`, time `t_ms`) through `def`'s
/// source stage and then `stages` in order (each reading what the one
/// before emitted), as a task of each would; what the last emits.
pub fn run_through(
    def: &crate::DataflowDef,
    stages: &mut [Box<dyn WindowStage>],
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    t_ms: i64,
) -> Result<Vec<KeyValue>, String> {
    let mut staged = crate::builder::Emitted::default();
    def.source_stage.process_record(key, value, t_ms, &[], &mut staged)?;
    for stage in stages.iter_mut() {
        let mut out = crate::builder::Emitted::default();
        for r in staged.iter() {
            let (key, value) = (r.key.unwrap_or_default(), r.value.unwrap_or_default());
            stage
                .add(key, value, r.timestamp_ms, &mut out)
                .map_err(|e| e.to_string())?;
        }
        staged = out;
    }
    Ok(staged
        .iter()
        .map(|r| (r.key.unwrap_or_default().to_vec(), r.value.map(<[u8]>::to_vec)))
        .collect())
}
