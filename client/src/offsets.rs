//! Consumers' committed offsets, stored in the cluster as records of the
//! internal [`OFFSETS_TOPIC`] (one partition per consumer name, by key
//! hash), and the [`Consumer`] calls that use them.

use std::collections::BTreeMap;

use bytes::Bytes;
use runnel_storage::{BatchBuilder, Record};

use crate::error::{ClientError, ClientResult};
use crate::producer::partition_for_key;
use crate::protocol::{Acks, MetadataError, TopicConfig};
use crate::{Client, Consumer};

/// The internal topic holding consumers' committed offsets.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// Partitions of the offsets topic (a consumer's commits all go to one).
pub const OFFSETS_PARTITIONS: u32 = 8;

/// The key under which a consumer's offset for one partition is stored.
fn offset_key(consumer: &str, topic: &str, partition: u32) -> Bytes {
    Bytes::from(format!("{consumer}\u{0}{topic}\u{0}{partition}"))
}

impl Client {
    /// Makes sure the offsets topic exists (replicated like any topic).
    async fn ensure_offsets_topic(&self) -> ClientResult<()> {
        if self.cached_topics(false).await?.iter().any(|t| t.name == OFFSETS_TOPIC) {
            return Ok(());
        }
        let alive = self.alive_nodes().len().clamp(1, 3) as u16;
        match self
            .create_topic(OFFSETS_TOPIC, TopicConfig::new(OFFSETS_PARTITIONS, alive))
            .await
        {
            Ok(()) | Err(ClientError::Refused(MetadataError::TopicExists(_))) => {
                self.cached_topics(true).await?;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Stores `consumer`'s next offsets for `topic` partitions in the cluster.
    pub async fn commit_offsets(&self, consumer: &str, topic: &str, offsets: &BTreeMap<u32, u64>) -> ClientResult<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        self.ensure_offsets_topic().await?;
        let partition = partition_for_key(consumer.as_bytes(), OFFSETS_PARTITIONS);
        let mut builder = BatchBuilder::new();
        for (&p, &offset) in offsets {
            let timestamp_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            builder.push(&Record {
                timestamp_ms,
                key: Some(offset_key(consumer, topic, p)),
                value: Some(Bytes::copy_from_slice(&offset.to_le_bytes())),
                headers: Vec::new(),
            })?;
        }
        self.produce(OFFSETS_TOPIC, partition, builder.build()?, Acks::All)
            .await?;
        Ok(())
    }

    /// `consumer`'s committed offsets for `topic`, by partition (the latest
    /// commit of each). Reads the consumer's offsets partition from the start:
    /// fine while it is small; compaction will bound it.
    pub async fn committed_offsets(&self, consumer: &str, topic: &str) -> ClientResult<BTreeMap<u32, u64>> {
        if !self.cached_topics(true).await?.iter().any(|t| t.name == OFFSETS_TOPIC) {
            return Ok(BTreeMap::new());
        }
        let partition = partition_for_key(consumer.as_bytes(), OFFSETS_PARTITIONS);
        let prefix = format!("{consumer}\u{0}{topic}\u{0}");
        let mut committed = BTreeMap::new();
        let mut offset = 0;
        loop {
            let fetched = self.fetch(OFFSETS_TOPIC, partition, offset, 1 << 20).await?;
            for record in &fetched.records {
                let (Some(key), Some(value)) = (&record.record.key, &record.record.value) else {
                    continue;
                };
                let Some(p) = std::str::from_utf8(key)
                    .ok()
                    .and_then(|k| k.strip_prefix(&prefix))
                    .and_then(|p| p.parse().ok())
                else {
                    continue;
                };
                if let Ok(word) = <[u8; 8]>::try_from(value.as_ref()) {
                    committed.insert(p, u64::from_le_bytes(word));
                }
            }
            if fetched.next_offset == offset || fetched.next_offset >= fetched.committed_offset {
                return Ok(committed);
            }
            offset = fetched.next_offset;
        }
    }
}

impl Consumer {
    /// Stores this consumer's positions in the cluster under `name`.
    pub async fn commit(&self, name: &str) -> ClientResult<()> {
        self.client.commit_offsets(name, &self.topic, &self.positions).await
    }

    /// Moves assigned partitions to the positions committed under `name`;
    /// returns how many partitions had a committed position.
    pub async fn resume(&mut self, name: &str) -> ClientResult<usize> {
        let committed = self.client.committed_offsets(name, &self.topic).await?;
        let mut resumed = 0;
        for (partition, position) in self.positions.iter_mut() {
            if let Some(&offset) = committed.get(partition) {
                *position = offset;
                resumed += 1;
            }
        }
        Ok(resumed)
    }
}
