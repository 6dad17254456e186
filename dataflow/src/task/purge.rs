//! Repartitioned records the dataflow has read are deleted, as Kafka
//! Streams purges its repartition topics: without it they would grow for
//! as long as the dataflow runs.
//!
//! Every stateful stage reads partition `p` of the one repartition topic
//! (its task `p`); the first stateful stage's task `p` deletes that
//! partition's records below the input offset that every one of them has
//! checkpointed past. It knows its own; a later stage's it reads from the
//! first chunk of that task's newest checkpoint (the checkpoint's head:
//! version, task, input offset).
//!
//! Why it is safe: a task restores from its newest checkpoint, whose input
//! offset only grows, so no incarnation reads below a checkpointed offset
//! again. That holds because every stage involved writes its checkpoints
//! fenced ([`crate::changelog`]): a stale incarnation cannot commit an older
//! checkpoint after a newer one. A stage that keeps no changelog is not
//! fenced, so a dataflow with one keeps its repartitioned records.
//! Deleting is housekeeping: a failure is logged, and tried again later.

use std::collections::BTreeMap;
use std::time::Duration;

use runnel_client::tasks::{checkpoint_topic, repartition_topic};
use serde::Deserialize;

use super::{chunk_count, TaskError, TaskIo, TaskRunner};

/// How often a task deletes what its stages have read: one DeleteRecords,
/// and a read of each later stage's newest checkpoint head.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(30);

/// Where a task stands in deleting its partition of the repartition topic.
#[derive(Clone, Debug, Default)]
pub(super) struct Purge {
    /// When it last tried.
    last_ms: Option<Duration>,
    /// Whether this task deletes (decided once, at its first try).
    deletes: Option<bool>,
    /// The input offset of the newest checkpoint written or restored.
    pub checkpointed: u64,
    /// Where the partition started after the last deletion.
    deleted_to: u64,
    /// Per later stage's task: its checkpoint partition's commit point and
    /// the input offset its newest checkpoint there holds (read again only
    /// once the commit point moves).
    peers: BTreeMap<u32, (u64, u64)>,
}

/// The fields every checkpoint format starts with.
#[derive(Deserialize)]
struct Head {
    _version: u8,
    task: u32,
    input_offset: u64,
}

impl<C: TaskIo> TaskRunner<C> {
    /// Deletes this task's partition of the repartition topic below what
    /// every stage reading it has checkpointed, at most every
    /// [`PURGE_INTERVAL`] (see the module's text).
    pub(super) async fn purge_repartitioned(&mut self) {
        let now = self.client.now();
        if self.purge.last_ms.is_some_and(|at| now < at + PURGE_INTERVAL) {
            return;
        }
        self.purge.last_ms = Some(now);
        let deletes = self.purge.deletes.unwrap_or_else(|| self.purges());
        self.purge.deletes = Some(deletes);
        if !deletes {
            return;
        }
        let point = match self.checkpointed_by_all().await {
            Ok(Some(point)) if point > self.purge.deleted_to => point,
            Ok(_) => return,
            Err(e) => {
                tracing::info!(dataflow = %self.def.name, task = self.assignment.task, error = %e, "repartitioned records kept for now");
                return;
            }
        };
        let (topic, partition) = (repartition_topic(&self.def.name), self.assignment.partition());
        match self.client.delete_records(&topic, partition, point).await {
            Ok(start) => {
                tracing::debug!(dataflow = %self.def.name, partition, start, "repartitioned records deleted");
                self.purge.deleted_to = start;
            }
            Err(e) => {
                tracing::info!(dataflow = %self.def.name, partition, error = %e, "deleting repartitioned records failed; tried again later");
            }
        }
    }

    /// Whether this task deletes its partition of the repartition topic:
    /// the first stateful stage's, when every stateful stage is fenced.
    fn purges(&self) -> bool {
        let sources = self.def.source_count();
        if self.is_source() || self.assignment.stage() != sources || !self.logs_changes() {
            return false;
        }
        self.def.next_stages.iter().all(|make| make().store().is_some())
    }

    /// The input offset every stateful stage's task of this partition has
    /// checkpointed past; `None` while one has no checkpoint.
    async fn checkpointed_by_all(&mut self) -> Result<Option<u64>, TaskError> {
        let (partitions, partition) = (self.assignment.partitions, self.assignment.partition());
        let mut point = self.purge.checkpointed;
        for stage in self.assignment.stage() + 1..self.def.stages() {
            match self.checkpointed_offset(stage * partitions + partition).await? {
                Some(offset) => point = point.min(offset),
                None => return Ok(None),
            }
        }
        Ok(Some(point))
    }

    /// The input offset of task `task`'s newest checkpoint, read from its
    /// first chunk (unless its partition committed nothing since the last
    /// read); `None` when it has none.
    async fn checkpointed_offset(&mut self, task: u32) -> Result<Option<u64>, TaskError> {
        let topic = checkpoint_topic(&self.def.name);
        // Asked from where it was last seen, an unmoved partition answers
        // no batch at all.
        let seen = self.purge.peers.get(&task).copied();
        let end = self
            .client
            .fetch(&topic, task, seen.map_or(0, |s| s.0), 1)
            .await?
            .committed_offset;
        if let Some((_, offset)) = seen.filter(|s| s.0 == end) {
            return Ok(Some(offset));
        }
        let Some((last, key)) = self.last_chunk(&topic, task, end).await? else {
            return Ok(None);
        };
        let corrupt = |reason: String| TaskError::Checkpoint { task, reason };
        let first = last + 1 - chunk_count(last, key.as_deref()).map_err(corrupt)?;
        let fetched = self.client.fetch(&topic, task, first, 1).await?;
        let chunk = fetched
            .views()
            .find(|view| view.as_ref().is_ok_and(|v| v.offset == first))
            .ok_or_else(|| corrupt(format!("no first chunk at offset {first}")))??;
        let value = chunk.value.unwrap_or_default();
        let (head, _): (Head, _) =
            postcard::take_from_bytes(value).map_err(|e| corrupt(format!("checkpoint head at {first}: {e}")))?;
        if head.task != task {
            return Err(corrupt(format!("the checkpoint at {first} is task {}'s", head.task)));
        }
        self.purge.peers.insert(task, (end, head.input_offset));
        Ok(Some(head.input_offset))
    }
}
