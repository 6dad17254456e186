//! An in-memory cluster for tests of task code: [`MemoryIo`] is a
//! [`TaskIo`] whose topics are lists of records per partition and whose
//! clock moves only when told, so a test can run the real [`TaskRunner`]
//! (restore, steps, checkpoints) deterministically without nodes.
//!
//! [`TaskRunner`]: crate::task::TaskRunner

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use runnel_client::{Acks, ClientResult, FetchedBatches};
use runnel_storage::{BatchBuilder, Record, RecordBatch};

use crate::task::TaskIo;

/// Topics in memory, and a clock moved by hand.
#[derive(Default)]
pub struct MemoryIo {
    /// Per partition, its batches as produced (producer ids kept), with
    /// their offsets.
    logs: Mutex<BTreeMap<(String, u32), Vec<RecordBatch>>>,
    now: Mutex<Duration>,
    /// Batches one fetch answers at most (all when 0).
    fetch_batches_max: usize,
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
        let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        let batches = logs.get(&(topic.to_string(), partition)).cloned().unwrap_or_default();
        let mut records = Vec::new();
        for batch in &batches {
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
        let max = match self.fetch_batches_max {
            0 => usize::MAX,
            max => max,
        };
        let batches = log.into_iter().filter(|b| b.next_offset() > offset).take(max).collect();
        Ok(FetchedBatches::new(offset, batches, end))
    }

    async fn produce(&self, topic: &str, partition: u32, batch: RecordBatch, _: Acks) -> ClientResult<u64> {
        Ok(self.write(topic, partition, batch))
    }

    fn now(&self) -> Duration {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn sleep(&self, pause: Duration) {
        self.pass(pause);
    }
}
