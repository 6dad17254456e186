//! Producing: [`Client::produce`] sends one batch to a partition's leader;
//! [`Producer`] batches records per partition (key -> partition by a stable
//! hash), stamps batches with a producer id and sequence numbers so the
//! leader writes a retried batch once, and takes a fresh id after an
//! outcome the cluster could not tell.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use runnel_storage::{BatchBuilder, ProducerInfo, Record, RecordBatch};

use crate::error::{ClientError, ClientResult};
use crate::policy;
use crate::protocol::{Acks, ClientRequest, ClientResponse};
use crate::Client;

/// Largest single record the client sends (the broker's batch limit is 8 MiB).
pub const RECORD_BYTES_MAX: usize = 1 << 20;

impl Client {
    /// Sends one batch to a partition's leader; returns its base offset.
    pub async fn produce(&self, topic: &str, partition: u32, batch: RecordBatch, acks: Acks) -> ClientResult<u64> {
        let request = ClientRequest::Produce {
            topic: topic.to_string(),
            partition,
            acks,
            batch: batch.into_bytes(),
        };
        match self.route(topic, partition, &request).await? {
            ClientResponse::Produced { base_offset } => Ok(base_offset),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }
}

/// A stable hash of a key (FNV-1a), so a key always maps to one partition.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for &byte in key {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions.max(1)
}

/// Batches records per partition and sends them with the chosen acks.
pub struct Producer {
    client: Arc<Client>,
    topic: String,
    partitions: u32,
    acks: Acks,
    /// Records per batch before it is sent.
    pub batch_records_max: usize,
    /// How long a started batch may wait for more records; checked on each
    /// `send` (and `flush_due`), so a slow trickle still goes out.
    pub linger: Duration,
    /// When each partition's pending batch got its first record.
    started: BTreeMap<u32, Instant>,
    pending: BTreeMap<u32, BatchBuilder>,
    next_partition: u32,
    /// Identifies this producer's batches so retries are written once.
    producer_id: i64,
    /// Sequence of the next record, per partition.
    next_sequence: BTreeMap<u32, i32>,
}

/// Now, in ms since the Unix epoch: the timestamp of a record made now.
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A producer id unlikely to collide with any other: random bits from the
/// standard library's hasher keys, the time and the process id.
pub fn new_producer_id() -> i64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(now);
    hasher.write_u32(std::process::id());
    (hasher.finish() >> 1) as i64
}

impl Producer {
    /// A producer to `topic`. A topic the answering node does not know yet
    /// (created a moment ago) is looked up again after that node catches
    /// up with the controller, so only a topic that does not exist is
    /// `UnknownTopic`.
    pub async fn new(client: Arc<Client>, topic: &str, acks: Acks) -> ClientResult<Producer> {
        let topics = client.topics().await?;
        let info = client.find_topic(topics, topic).await?;
        Ok(Producer {
            partitions: info.config.partitions,
            client,
            topic: topic.to_string(),
            acks,
            batch_records_max: 1000,
            linger: Duration::from_millis(5),
            started: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_partition: 0,
            producer_id: new_producer_id(),
            next_sequence: BTreeMap::new(),
        })
    }

    /// Queues a record: to `partition` if given, else by key hash, else
    /// round-robin. Sends the partition's batch when it is full; returns the
    /// acknowledged (partition, base offset, records) of what was sent.
    pub async fn send(&mut self, partition: Option<u32>, record: Record) -> ClientResult<Vec<(u32, u64, u32)>> {
        let size = record.key.as_ref().map_or(0, |k| k.len()) + record.value.as_ref().map_or(0, |v| v.len());
        if size > RECORD_BYTES_MAX {
            return Err(ClientError::RecordTooLarge {
                size_bytes: size,
                limit_bytes: RECORD_BYTES_MAX,
            });
        }
        let partition = match (partition, &record.key) {
            (Some(p), _) if p >= self.partitions => {
                return Err(ClientError::PartitionOutOfRange {
                    topic: self.topic.clone(),
                    partition: p,
                    partitions: self.partitions,
                })
            }
            (Some(p), _) => p,
            (None, Some(key)) => partition_for_key(key, self.partitions),
            (None, None) => {
                self.next_partition = (self.next_partition + 1) % self.partitions;
                self.next_partition
            }
        };
        let builder = self.pending.entry(partition).or_default();
        builder.push(&record)?;
        self.started.entry(partition).or_insert_with(Instant::now);
        if builder.record_count() as usize >= self.batch_records_max {
            if let Some(builder) = self.pending.remove(&partition) {
                self.started.remove(&partition);
                let mut sent = vec![self.send_batch(partition, builder).await?];
                sent.extend(self.flush_due().await?);
                return Ok(sent);
            }
        }
        self.flush_due().await
    }

    /// Sends the batches that have waited longer than `linger`.
    pub async fn flush_due(&mut self) -> ClientResult<Vec<(u32, u64, u32)>> {
        let due: Vec<u32> = self
            .started
            .iter()
            .filter(|(_, t)| t.elapsed() >= self.linger)
            .map(|(&p, _)| p)
            .collect();
        let mut sent = Vec::new();
        for partition in due {
            self.started.remove(&partition);
            if let Some(builder) = self.pending.remove(&partition) {
                sent.push(self.send_batch(partition, builder).await?);
            }
        }
        Ok(sent)
    }

    /// Stamps a partition's batch with this producer's id and next sequence
    /// and sends it. The sequence advances once the batch is written. After an
    /// outcome the cluster could not tell, the producer takes a fresh id, so a
    /// sequence that may already be stored is never used for other records.
    async fn send_batch(&mut self, partition: u32, mut builder: BatchBuilder) -> ClientResult<(u32, u64, u32)> {
        let base_sequence = self.next_sequence.get(&partition).copied().unwrap_or(0);
        builder.set_producer(ProducerInfo {
            producer_id: self.producer_id,
            producer_epoch: 0,
            base_sequence,
        });
        let batch = builder.build()?;
        let count = batch.record_count();
        match self.client.produce(&self.topic, partition, batch, self.acks).await {
            Ok(base) => {
                let next = self.next_sequence.entry(partition).or_insert(0);
                *next = runnel_storage::sequence::sequence_add(*next, i64::from(count));
                Ok((partition, base, count))
            }
            Err(e) => {
                if policy::is_unknown_outcome(&e) {
                    self.producer_id = new_producer_id();
                    self.next_sequence.clear();
                }
                Err(e)
            }
        }
    }

    /// Sends every queued record. On an error, partitions not yet tried stay
    /// queued; the failed partition's batch is reported by the error.
    pub async fn flush(&mut self) -> ClientResult<Vec<(u32, u64, u32)>> {
        let mut sent = Vec::new();
        let partitions: Vec<u32> = self.pending.keys().copied().collect();
        for partition in partitions {
            self.started.remove(&partition);
            let Some(builder) = self.pending.remove(&partition) else {
                continue;
            };
            if !builder.is_empty() {
                sent.push(self.send_batch(partition, builder).await?);
            }
        }
        Ok(sent)
    }
}
