//! A stage's state kept as a changelog: the entries of its store, written
//! to its task's checkpoint partition (compacted) rather than whole into
//! each checkpoint, as Kafka Streams backs a state store with a compacted
//! changelog topic.
//!
//! Each checkpoint of such a stage is one batch: the entries changed since
//! the last checkpoint (keyed [`ENTRY_PREFIX`] + the store key; a null
//! value removes the key), then the checkpoint's chunks. A batch is one
//! Raft entry, so a checkpoint and its changes are committed together or
//! not at all, and the state a checkpoint stands for is the fold of every
//! entry up to it. Compaction keeps each key's latest entry, so the
//! partition holds about the live state, however long the task runs.
//!
//! **Fencing.** Only one incarnation of a task may write entries: one that
//! lingers (a node cut off from the controller, a write still on its way
//! when its task failed) would otherwise add entries after a checkpoint
//! that a restored incarnation knows nothing of, and compaction could drop
//! the older entries that checkpoint stands for. So checkpoints are written
//! as an idempotent producer ([`checkpoint_producer_id`]) whose epoch each
//! restore raises: a restoring task [`claim`]s the partition by committing
//! a [`BARRIER_KEY`] record under the next epoch, and the partition's
//! leader then refuses every write of an older epoch. Raft commits in
//! order, so a write of an older epoch is committed before the barrier (and
//! read as usual) or never. The barrier carries a random value: of two
//! incarnations claiming the same epoch at once, the one whose value is
//! not the one committed claims again.
//!
//! Memory: the entries are read back one fetch at a time; the stage bounds
//! what it holds. The changes of one checkpoint must fit its batch with
//! the chunks: a task stops folding its input once they pass
//! [`CHANGES_EARLY_BYTES`] and checkpoints at once.

use std::hash::{BuildHasher, Hasher};

use bytes::Bytes;
use runnel_client::{Acks, BrokerError, ClientError};
use runnel_storage::{BatchBuilder, ProducerInfo, Record};

use crate::builder::{Change, StateStore};
use crate::task::{task_producer_id, TaskError, TaskIo};

/// Key prefix of a store entry in the checkpoint partition.
pub const ENTRY_PREFIX: &[u8] = b"s/";
/// Key of the record a restoring task commits before it reads.
pub const BARRIER_KEY: &[u8] = b"barrier";
/// Pending changes past this end a step's fold and make a checkpoint come
/// at once (a step stops at the record that passes it; one record changes
/// at most one aggregate or join record's entry, plus a small entry per
/// partner it first matches).
pub const CHANGES_EARLY_BYTES: usize = 2 << 20;
/// What a changelog read fetches at a time.
const FETCH_BYTES: u32 = 4 << 20;
/// Claims tried before a restore gives up (each loses only to another
/// incarnation claiming at the same moment).
const CLAIM_ATTEMPTS_MAX: usize = 8;
/// Batches stepped back over, looking for the newest checkpoint write.
const PROBE_BATCHES_MAX: usize = 4096;
/// A writer claims a new epoch before its sequence passes this.
const SEQUENCE_RENEW_AT: i32 = 1 << 30;

/// The producer id a task's checkpoints are written under (distinct from
/// its output's).
pub fn checkpoint_producer_id(dataflow: &str, task: u32) -> i64 {
    task_producer_id(&format!("{dataflow}\u{0}checkpoints"), task)
}

/// The claimed right to write a task's checkpoint partition: the epoch
/// and the sequence of the next record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointWriter {
    pub producer_id: i64,
    pub epoch: i16,
    pub next_sequence: i32,
}

impl CheckpointWriter {
    /// Stamps a batch of `records` records as this writer's next.
    pub fn stamp(&mut self, builder: &mut BatchBuilder, records: usize) {
        builder.set_producer(ProducerInfo {
            producer_id: self.producer_id,
            producer_epoch: self.epoch,
            base_sequence: self.next_sequence,
        });
        self.next_sequence = self.next_sequence.saturating_add(records as i32);
    }

    /// Whether the writer must claim anew before a batch of `records`.
    pub fn worn_out(&self, records: usize) -> bool {
        self.next_sequence.saturating_add(records as i32) >= SEQUENCE_RENEW_AT
    }
}

/// Claims `topic`/`partition` for this incarnation of a task (see the
/// module doc): commits a barrier under the epoch after the newest one
/// written, and checks the committed barrier is its own. Answers the
/// writer and the barrier's offset (the checkpoint to restore is below it).
pub async fn claim<C: TaskIo>(
    client: &C,
    topic: &str,
    partition: u32,
    producer_id: i64,
) -> Result<(CheckpointWriter, u64), TaskError> {
    for _ in 0..CLAIM_ATTEMPTS_MAX {
        let epoch = match newest_epoch(client, topic, partition, producer_id).await? {
            None => 0,
            Some(epoch) => next_epoch(topic, partition, epoch)?,
        };
        if let Some(claimed) = try_claim(client, topic, partition, producer_id, epoch).await? {
            return Ok(claimed);
        }
    }
    Err(TaskError::Checkpoint {
        task: partition,
        reason: format!(
            "{topic}/{partition} could not be claimed in {CLAIM_ATTEMPTS_MAX} attempts: other incarnations of the task claim it too"
        ),
    })
}

/// A running writer's claim renewed under the next epoch (its sequence
/// is worn out). Only while its own epoch is still the newest: a writer
/// fenced meanwhile must never claim past the incarnation that fenced it.
pub async fn renew<C: TaskIo>(
    client: &C,
    topic: &str,
    partition: u32,
    writer: CheckpointWriter,
) -> Result<CheckpointWriter, TaskError> {
    let fenced = || fenced(topic, partition, writer.epoch);
    if newest_epoch(client, topic, partition, writer.producer_id).await? != Some(writer.epoch) {
        return Err(fenced());
    }
    let epoch = next_epoch(topic, partition, writer.epoch)?;
    match try_claim(client, topic, partition, writer.producer_id, epoch).await? {
        Some((renewed, _)) => Ok(renewed),
        None => Err(fenced()),
    }
}

/// The error of a writer whose epoch a newer incarnation fenced.
pub fn fenced(topic: &str, partition: u32, epoch: i16) -> TaskError {
    TaskError::Checkpoint {
        task: partition,
        reason: format!(
            "{topic}/{partition} was claimed by an incarnation of this task restored since this one (epoch {epoch} is fenced); this one stops"
        ),
    }
}

fn next_epoch(topic: &str, partition: u32, epoch: i16) -> Result<i16, TaskError> {
    epoch.checked_add(1).ok_or_else(|| TaskError::Checkpoint {
        task: partition,
        reason: format!(
            "{topic}/{partition} was claimed {} times; reset the dataflow to write it anew",
            i16::MAX
        ),
    })
}

/// Commits a barrier under `epoch`: the writer and the barrier's offset,
/// or `None` when another incarnation's claim won.
async fn try_claim<C: TaskIo>(
    client: &C,
    topic: &str,
    partition: u32,
    producer_id: i64,
    epoch: i16,
) -> Result<Option<(CheckpointWriter, u64)>, TaskError> {
    let mut writer = CheckpointWriter {
        producer_id,
        epoch,
        next_sequence: 0,
    };
    let nonce = std::collections::hash_map::RandomState::new().build_hasher().finish();
    let mut builder = BatchBuilder::new();
    builder.push(&Record {
        timestamp_ms: 0,
        key: Some(Bytes::from_static(BARRIER_KEY)),
        value: Some(Bytes::copy_from_slice(&nonce.to_le_bytes())),
        headers: Vec::new(),
    })?;
    writer.stamp(&mut builder, 1);
    let offset = match client.produce(topic, partition, builder.build()?, Acks::All).await {
        Ok(offset) => offset,
        // Another incarnation claimed a later epoch meanwhile.
        Err(ClientError::Broker(BrokerError::ProducerFenced { .. } | BrokerError::StaleSequence { .. })) => {
            return Ok(None)
        }
        Err(e) => return Err(e.into()),
    };
    let own = barrier_at(client, topic, partition, offset).await? == Some(nonce);
    Ok(own.then_some((writer, offset)))
}

/// The epoch of the newest batch `producer_id` wrote to the partition
/// (`None`: it wrote none, e.g. checkpoints written before fencing).
/// Batches of an older epoch are refused once a newer one is in, so the
/// newest batch with a producer is the writer's.
async fn newest_epoch<C: TaskIo>(
    client: &C,
    topic: &str,
    partition: u32,
    producer_id: i64,
) -> Result<Option<i16>, TaskError> {
    let mut probe = client.fetch(topic, partition, 0, 1).await?.committed_offset;
    for _ in 0..PROBE_BATCHES_MAX {
        let Some(at) = probe.checked_sub(1) else {
            return Ok(None);
        };
        let fetched = client.fetch(topic, partition, at, 1).await?;
        let Some(batch) = fetched
            .batches
            .iter()
            .find(|b| b.base_offset() <= at && at < b.next_offset())
        else {
            return Ok(None);
        };
        let producer = batch.header().producer;
        if producer.producer_id == producer_id {
            return Ok(Some(producer.producer_epoch));
        }
        if !batch.is_control() && batch.header().record_count > 0 {
            // A user batch of no producer: written before fencing.
            return Ok(None);
        }
        probe = batch.base_offset();
    }
    Err(TaskError::Checkpoint {
        task: partition,
        reason: format!("{topic}/{partition}: no checkpoint write in its last {PROBE_BATCHES_MAX} batches"),
    })
}

/// The value of the barrier committed at `offset`, if one is there.
async fn barrier_at<C: TaskIo>(client: &C, topic: &str, partition: u32, offset: u64) -> Result<Option<u64>, TaskError> {
    let fetched = client.fetch(topic, partition, offset, 1 << 10).await?.into_records()?;
    let record = fetched.records.into_iter().find(|r| r.offset == offset);
    Ok(record
        .filter(|r| r.record.key.as_deref() == Some(BARRIER_KEY))
        .and_then(|r| r.record.value)
        .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
        .map(u64::from_le_bytes))
}

/// Decodes the whole of an entry's key part or value as `T` (postcard):
/// bytes left over mean the entry is not what it claims to be.
pub fn decode_exact<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err(format!("{} bytes left over", rest.len()));
    }
    Ok(value)
}

/// Pushes `changes` as entry records onto `builder`.
pub fn push_entries(builder: &mut BatchBuilder, changes: Vec<Change>) -> Result<(), TaskError> {
    for (key, value) in changes {
        let mut entry_key = ENTRY_PREFIX.to_vec();
        entry_key.extend_from_slice(&key);
        builder.push(&Record {
            timestamp_ms: 0,
            key: Some(Bytes::from(entry_key)),
            value: value.map(Bytes::from),
            headers: Vec::new(),
        })?;
    }
    Ok(())
}

/// The bytes `changes` take as entry records, about.
pub fn entries_bytes(changes: &[Change]) -> usize {
    changes
        .iter()
        .map(|(key, value)| ENTRY_PREFIX.len() + key.len() + value.as_ref().map_or(0, Vec::len) + 16)
        .sum()
}

/// Applies every entry of the partition below `end` (the end of the
/// checkpoint restored) to `store`, in order. An entry that does not apply,
/// or a partition that no longer starts at 0, fails the task naming where:
/// state is never silently skipped.
pub async fn replay<C: TaskIo>(
    client: &C,
    topic: &str,
    partition: u32,
    end: u64,
    store: &mut dyn StateStore,
) -> Result<u64, TaskError> {
    let failed = |reason: String| TaskError::Checkpoint {
        task: partition,
        reason,
    };
    let (mut offset, mut applied) = (0, 0);
    while offset < end {
        let fetched = match client.fetch(topic, partition, offset, FETCH_BYTES).await {
            Ok(fetched) => fetched,
            Err(ClientError::Broker(BrokerError::OffsetOutOfRange { start, .. })) if offset < start => {
                return Err(failed(format!(
                    "{topic}/{partition} starts at {start}: the changelog entries below are gone"
                )))
            }
            Err(e) => return Err(e.into()),
        };
        for view in fetched.views() {
            let view = view?;
            let Some(key) = view.key.and_then(|k| k.strip_prefix(ENTRY_PREFIX)) else {
                continue;
            };
            if view.offset >= end {
                break;
            }
            store
                .apply_change(key, view.value)
                .map_err(|e| failed(format!("changelog entry at {topic}/{partition}@{}: {e}", view.offset)))?;
            applied += 1;
        }
        if fetched.next_offset <= offset {
            return Err(failed(format!(
                "{topic}/{partition} could not be read at {offset}, below its checkpoint's end {end}"
            )));
        }
        offset = fetched.next_offset;
    }
    Ok(applied)
}
