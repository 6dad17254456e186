//! A stage's state kept as a changelog: the entries of its store, written
//! to its task's checkpoint partition (compacted) rather than whole into
//! each checkpoint, as Kafka Streams backs a state store with a compacted
//! changelog topic.
//!
//! Each checkpoint of such a stage is one batch: the entries changed since
//! the last checkpoint (keyed [`ENTRY_PREFIX`] + the store key; a null
//! value removes the key), then the checkpoint's chunks. A batch is one
//! Raft entry, so a checkpoint and its changes are committed together or
//! not at all: every entry in the partition belongs to a committed
//! checkpoint, and the state a checkpoint stands for is the fold of every
//! entry up to it. Compaction keeps each key's latest entry, so the
//! partition holds about the live state, however long the task runs.
//!
//! A checkpoint whose write failed may still commit later (its entry was
//! on its way when the task failed). Before restoring, a task therefore
//! appends a [`BARRIER_KEY`] record and waits for it to commit: Raft
//! commits in order, so any such checkpoint is then committed (and is the
//! newest) or gone, and cannot land after the restore with changes the
//! restored task knows nothing of.
//!
//! Memory: the entries are read back one fetch at a time; the stage bounds
//! what it holds. The changes of one checkpoint must fit its batch with
//! the chunks: a checkpoint comes early once they pass
//! [`CHANGES_EARLY_BYTES`].

use bytes::Bytes;
use runnel_client::{Acks, BrokerError, ClientError};
use runnel_storage::{BatchBuilder, Record};

use crate::builder::{Change, WindowStage};
use crate::task::{TaskError, TaskIo};

/// Key prefix of a store entry in the checkpoint partition.
pub const ENTRY_PREFIX: &[u8] = b"s/";
/// Key of the record a restoring task commits before it reads.
pub const BARRIER_KEY: &str = "barrier";
/// Pending changes past this make a checkpoint come early.
pub const CHANGES_EARLY_BYTES: usize = 2 << 20;
/// What a changelog read fetches at a time.
const FETCH_BYTES: u32 = 4 << 20;

/// Commits a barrier record to the task's checkpoint partition (see the
/// module doc).
pub async fn barrier<C: TaskIo>(client: &C, topic: &str, partition: u32) -> Result<(), TaskError> {
    let mut builder = BatchBuilder::new();
    builder.push(&Record {
        timestamp_ms: 0,
        key: Some(Bytes::from(BARRIER_KEY)),
        value: None,
        headers: Vec::new(),
    })?;
    client.produce(topic, partition, builder.build()?, Acks::All).await?;
    Ok(())
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
/// checkpoint restored) to `stage`, in order. An entry that does not apply
/// fails the task, naming where it is: state is never silently skipped.
pub async fn replay<C: TaskIo>(
    client: &C,
    topic: &str,
    partition: u32,
    end: u64,
    stage: &mut dyn WindowStage,
) -> Result<u64, TaskError> {
    let (mut offset, mut applied) = (0, 0);
    while offset < end {
        let fetched = match client.fetch(topic, partition, offset, FETCH_BYTES).await {
            Ok(fetched) => fetched,
            Err(ClientError::Broker(BrokerError::OffsetOutOfRange { offset: at, start, .. })) if at < start => {
                offset = start;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        for view in fetched.views() {
            let view = view?;
            let Some(key) = view.key.and_then(|k| k.strip_prefix(ENTRY_PREFIX)) else {
                continue;
            };
            if view.offset < offset || view.offset >= end {
                continue;
            }
            stage.apply_change(key, view.value).map_err(|e| TaskError::Checkpoint {
                task: partition,
                reason: format!("changelog entry at {topic}/{partition}@{}: {e}", view.offset),
            })?;
            applied += 1;
        }
        if fetched.next_offset <= offset {
            return Err(TaskError::Checkpoint {
                task: partition,
                reason: format!("{topic}/{partition} could not be read at {offset}, below its checkpoint's end {end}"),
            });
        }
        offset = fetched.next_offset;
    }
    Ok(applied)
}
