//! Reading: [`Client::fetch`] and friends read committed records of one
//! partition; [`Consumer`] reads assigned partitions from chosen offsets.

use std::collections::BTreeMap;
use std::sync::Arc;

use runnel_storage::{RecordBatch, RecordView, StoredRecord};

use crate::error::{ClientError, ClientResult};
use crate::protocol::{BrokerError, ClientRequest, ClientResponse, NodeId};
use crate::Client;

/// Committed records of one partition read by [`Client::fetch`].
#[derive(Debug)]
pub struct FetchedRecords {
    pub records: Vec<StoredRecord>,
    /// Where the next fetch should start.
    pub next_offset: u64,
    pub committed_offset: u64,
}

/// Committed batches of one partition read by [`Client::fetch_batches`],
/// decoded only as they are read.
#[derive(Debug)]
pub struct FetchedBatches {
    /// The offset asked for: earlier records of the first batch are not
    /// part of the answer.
    pub offset: u64,
    pub batches: Vec<RecordBatch>,
    /// Where the next fetch should start.
    pub next_offset: u64,
    pub committed_offset: u64,
}

impl FetchedBatches {
    pub fn new(offset: u64, batches: Vec<RecordBatch>, committed_offset: u64) -> FetchedBatches {
        let next_offset = batches.iter().map(RecordBatch::next_offset).fold(offset, u64::max);
        FetchedBatches {
            offset,
            batches,
            next_offset,
            committed_offset,
        }
    }

    /// The batches holding user records at or after `offset` (a batch
    /// log compaction emptied holds none).
    pub fn user_batches(&self) -> impl Iterator<Item = &RecordBatch> {
        self.batches.iter().filter(|b| {
            !b.is_control()
                && b.next_offset() > self.offset
                && b.size_bytes() > runnel_storage::batch::BATCH_HEADER_BYTES
        })
    }

    /// Whether there is any user record at or after `offset`.
    pub fn has_records(&self) -> bool {
        self.user_batches().next().is_some()
    }

    /// The user records at or after `offset`, in order, borrowing the
    /// batches (nothing is allocated per record).
    pub fn views(&self) -> impl Iterator<Item = Result<RecordView<'_>, runnel_storage::StorageError>> {
        self.user_batches().flat_map(move |batch| self.views_of(batch))
    }

    /// The records of `batch` (one of [`FetchedBatches::user_batches`]) at
    /// or after `offset`.
    pub fn views_of<'a>(
        &self,
        batch: &'a RecordBatch,
    ) -> impl Iterator<Item = Result<RecordView<'a>, runnel_storage::StorageError>> + use<'a> {
        let offset = self.offset;
        batch
            .views()
            .filter(move |view| view.as_ref().map_or(true, |v| v.offset >= offset))
    }

    /// The user records at or after `offset`, as owned records (their keys
    /// and values still share the batches' bytes).
    pub fn into_records(self) -> Result<FetchedRecords, runnel_storage::StorageError> {
        // A compacted batch's count is the span of its offsets, not the
        // records it still holds: reserve by what its bytes can hold.
        let bound = |b: &RecordBatch| (b.record_count() as usize).min(b.size_bytes() / 8);
        let mut records = Vec::with_capacity(self.user_batches().map(bound).sum());
        for batch in self.user_batches() {
            for record in batch.records() {
                let record = record?;
                if record.offset >= self.offset {
                    records.push(record);
                }
            }
        }
        Ok(FetchedRecords {
            records,
            next_offset: self.next_offset,
            committed_offset: self.committed_offset,
        })
    }
}

impl Client {
    /// The first committed offset of a partition whose record timestamp is at
    /// least `timestamp_ms`, or `None` when every record is older.
    pub async fn offset_for_timestamp(
        &self,
        topic: &str,
        partition: u32,
        timestamp_ms: i64,
    ) -> ClientResult<Option<u64>> {
        let request = ClientRequest::OffsetForTimestamp {
            topic: topic.to_string(),
            partition,
            timestamp_ms,
        };
        match self.route(topic, partition, &request).await? {
            ClientResponse::Offset(offset) => Ok(offset),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Deletes a partition's records below `before_offset` (below its
    /// commit point for `None`), as Kafka's DeleteRecords: readers start
    /// there from now on, and whole segments below go from every replica's
    /// disk. Returns where the partition starts now (already past the
    /// offset: unchanged). An offset past the commit point is refused.
    pub async fn delete_records(&self, topic: &str, partition: u32, before_offset: Option<u64>) -> ClientResult<u64> {
        let request = ClientRequest::DeleteRecords {
            topic: topic.to_string(),
            partition,
            before_offset,
        };
        match self.route(topic, partition, &request).await? {
            ClientResponse::Offset(Some(start)) => Ok(start),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Committed records of a partition from `offset`, up to `max_bytes`.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
    ) -> ClientResult<FetchedRecords> {
        Ok(self
            .fetch_batches(topic, partition, offset, max_bytes)
            .await?
            .into_records()?)
    }

    /// As [`Client::fetch`], leaving the records in their batches.
    pub async fn fetch_batches(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
    ) -> ClientResult<FetchedBatches> {
        let request = ClientRequest::Fetch {
            topic: topic.to_string(),
            partition,
            offset,
            max_bytes,
            any_replica: false,
        };
        let response = self.route(topic, partition, &request).await?;
        decode_fetched(offset, response, topic, partition)
    }

    /// As [`Client::fetch`], from a given replica's node (to compare replicas).
    pub async fn fetch_from_replica(
        &self,
        node: NodeId,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
    ) -> ClientResult<FetchedRecords> {
        let addr = self.known_node(node)?;
        let request = ClientRequest::Fetch {
            topic: topic.to_string(),
            partition,
            offset,
            max_bytes,
            any_replica: true,
        };
        Ok(decode_fetched(offset, self.call(Some(addr), &request).await?, topic, partition)?.into_records()?)
    }
}

fn decode_fetched(offset: u64, response: ClientResponse, topic: &str, partition: u32) -> ClientResult<FetchedBatches> {
    let ClientResponse::Fetched {
        batches,
        committed_offset,
        ..
    } = response
    else {
        return match response {
            ClientResponse::Failed(e) => Err(e.into()),
            ClientResponse::UnknownTopic(name) => Err(ClientError::UnknownTopic(name)),
            ClientResponse::PartitionOutOfRange { partitions, .. } => Err(ClientError::PartitionOutOfRange {
                topic: topic.to_string(),
                partition,
                partitions,
            }),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        };
    };
    let batches = batches
        .into_iter()
        .map(|bytes| RecordBatch::from_bytes(bytes.into_vec()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(FetchedBatches::new(offset, batches, committed_offset))
}

/// Reads assigned partitions of a topic from chosen offsets.
pub struct Consumer {
    pub(crate) client: Arc<Client>,
    pub(crate) topic: String,
    /// Next offset per assigned partition.
    pub(crate) positions: BTreeMap<u32, u64>,
    pub fetch_bytes_max: u32,
}

impl Consumer {
    pub fn new(client: Arc<Client>, topic: &str) -> Consumer {
        Consumer {
            client,
            topic: topic.to_string(),
            positions: BTreeMap::new(),
            fetch_bytes_max: 1 << 20,
        }
    }

    /// Reads `partition` from `offset` on.
    pub fn assign(&mut self, partition: u32, offset: u64) {
        self.positions.insert(partition, offset);
    }

    pub fn position(&self, partition: u32) -> Option<u64> {
        self.positions.get(&partition).copied()
    }

    /// One round over the assigned partitions; returns (partition, record).
    pub async fn poll(&mut self) -> ClientResult<Vec<(u32, StoredRecord)>> {
        let mut out = Vec::new();
        let mut first_error = None;
        for (partition, position) in self.positions.clone() {
            let fetched = match self
                .client
                .fetch(&self.topic, partition, position, self.fetch_bytes_max)
                .await
            {
                Ok(fetched) => fetched,
                // A new leader learns the commit point a moment after it is
                // elected: nothing to read there yet.
                Err(ClientError::Broker(BrokerError::OffsetOutOfRange { offset, end, .. })) if offset > end => continue,
                // Retention deleted the records from here: read on from the
                // oldest one left, as a Kafka consumer resetting to earliest.
                Err(ClientError::Broker(BrokerError::OffsetOutOfRange { offset, start, .. })) if offset < start => {
                    self.positions.insert(partition, start);
                    continue;
                }
                // The other partitions are still read (their positions move
                // on with what is delivered); this one is tried again on the
                // next poll. The error is returned only if nothing was read.
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            self.positions.insert(partition, fetched.next_offset);
            out.extend(fetched.records.into_iter().map(|r| (partition, r)));
        }
        match first_error {
            Some(e) if out.is_empty() => Err(e),
            _ => Ok(out),
        }
    }

    /// The committed offset (the end for readers) of each assigned partition.
    pub async fn end_offsets(&self) -> ClientResult<BTreeMap<u32, u64>> {
        let mut ends = BTreeMap::new();
        for &partition in self.positions.keys() {
            let position = self.positions[&partition];
            let end = match self.client.fetch(&self.topic, partition, position, 1).await {
                Ok(fetched) => fetched.committed_offset,
                // Below the log's start (retention) or past its end: the
                // refusal names the end.
                Err(ClientError::Broker(BrokerError::OffsetOutOfRange { end, .. })) => end,
                Err(e) => return Err(e),
            };
            ends.insert(partition, end);
        }
        Ok(ends)
    }

    /// Moves every assigned partition to its first record at or after
    /// `timestamp_ms` (or to its end when all records are older).
    pub async fn seek_to_timestamp(&mut self, timestamp_ms: i64) -> ClientResult<()> {
        let ends = self.end_offsets().await?;
        for (partition, position) in self.positions.iter_mut() {
            let found = self
                .client
                .offset_for_timestamp(&self.topic, *partition, timestamp_ms)
                .await?;
            *position = found.unwrap_or_else(|| ends.get(partition).copied().unwrap_or(*position));
        }
        Ok(())
    }
}
