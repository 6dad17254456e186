//! What runs while the nemesis works: idempotent `acks=all` producers whose
//! every record has a unique write id, consumers that read the log as it
//! grows, and a recorder of everything they saw.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use runnel_actors::client::{partition_for_key, Client, ClientError};
use runnel_actors::{Acks, BrokerError};
use runnel_dataflow::fraud;
use runnel_storage::{BatchBuilder, Header, ProducerInfo, Record, StoredRecord};

use super::checker::{Outcome, PartitionKey, Seen, Write, WRITE_ID_HEADER};

/// How long one batch is retried (same producer id and sequence, so the
/// cluster writes it once) before its outcome is declared unknown.
const RETRY_FOR: Duration = Duration::from_secs(20);
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Records per batch of the checked topic's producers.
const BATCH_RECORDS: usize = 20;
/// Writes recorded in one run at most: the history stays in memory for the
/// checker (a few hundred bytes a record with the consumers' reads), so the
/// producers stop when it is full.
pub const WRITES_MAX: usize = 10_000_000;
/// Attempts per fraud batch (split by card over the partitions).
const FRAUD_BATCH_RECORDS: usize = 50;
/// Tries (each retried for `RETRY_FOR`) to write a partition's closing attempt.
const CLOSING_TRIES: usize = 5;

/// Everything the workload saw, shared by its tasks.
#[derive(Default)]
pub struct Recorder {
    writes: Mutex<Vec<Write>>,
    pub acknowledged: AtomicU64,
    pub failed: AtomicU64,
    pub unknown: AtomicU64,
    reads: Mutex<BTreeMap<String, BTreeMap<PartitionKey, Vec<Seen>>>>,
}

impl Recorder {
    fn record(
        &self,
        topic: &str,
        partition: u32,
        ids: Vec<String>,
        outcome: &Result<u64, String>,
        maybe_written: bool,
    ) {
        let counter = match (outcome, maybe_written) {
            (Ok(_), _) => &self.acknowledged,
            (Err(_), true) => &self.unknown,
            (Err(_), false) => &self.failed,
        };
        counter.fetch_add(ids.len() as u64, Ordering::Relaxed);
        let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        for (i, id) in ids.into_iter().enumerate() {
            let outcome = match outcome {
                Ok(base) => Outcome::Acked {
                    offset: base + i as u64,
                },
                Err(e) if maybe_written => Outcome::Unknown(e.clone()),
                Err(e) => Outcome::Failed(e.clone()),
            };
            writes.push(Write {
                id,
                topic: topic.to_string(),
                partition,
                outcome,
            });
        }
    }

    fn saw(&self, consumer: &str, topic: &str, partition: u32, records: &[StoredRecord]) {
        let mut reads = self.reads.lock().unwrap_or_else(|p| p.into_inner());
        let seen = reads
            .entry(consumer.to_string())
            .or_default()
            .entry((topic.to_string(), partition))
            .or_default();
        seen.extend(records.iter().map(seen_of));
    }

    /// Whether the history is full (see `WRITES_MAX`).
    pub fn full(&self) -> bool {
        self.writes.lock().unwrap_or_else(|p| p.into_inner()).len() >= WRITES_MAX
    }

    pub fn take_writes(&self) -> Vec<Write> {
        std::mem::take(&mut *self.writes.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn take_reads(&self) -> BTreeMap<String, BTreeMap<PartitionKey, Vec<Seen>>> {
        std::mem::take(&mut *self.reads.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A stored record as the checker sees it.
pub fn seen_of(stored: &StoredRecord) -> Seen {
    let id = stored
        .record
        .headers
        .iter()
        .find(|h| h.key == WRITE_ID_HEADER)
        .and_then(|h| h.value.as_ref())
        .map(|v| String::from_utf8_lossy(v).into_owned());
    Seen {
        offset: stored.offset,
        id,
    }
}

fn with_write_id(mut record: Record, id: &str) -> Record {
    record.headers.push(Header {
        key: WRITE_ID_HEADER.to_string(),
        value: Some(Bytes::from(id.to_string())),
    });
    record
}

/// An idempotent producer's identity: a fresh id whenever a batch's outcome
/// is left unknown, so a sequence that may be stored is never reused.
struct Identity {
    worker: u32,
    generation: u32,
    next_sequence: BTreeMap<u32, i32>,
}

impl Identity {
    fn new(worker: u32) -> Identity {
        Identity {
            worker,
            generation: 0,
            next_sequence: BTreeMap::new(),
        }
    }

    fn producer_id(&self) -> i64 {
        (i64::from(self.worker) << 32) | i64::from(self.generation)
    }

    fn renew(&mut self) {
        self.generation += 1;
        self.next_sequence.clear();
    }
}

/// Refusals that say the batch was not written: the permanent ones except
/// the two that speak of a batch already stored, and the passing ones of a
/// node that did not take it. Anything else may have written it (stricter
/// than the client's own notion on purpose: the checker must never call a
/// write failed that could be in the log).
fn definitely_not_written(error: &ClientError) -> bool {
    let about_a_stored_batch = matches!(
        error,
        ClientError::Broker(
            BrokerError::StaleSequence { .. }
                | BrokerError::SequenceMismatch { .. }
                | BrokerError::ProducerFenced { .. }
        )
    );
    let not_taken = matches!(
        error,
        ClientError::Broker(BrokerError::NotLeader { .. } | BrokerError::UnknownGroup(_) | BrokerError::Busy(_))
    );
    (permanent(error) && !about_a_stored_batch) || not_taken
}

/// Refusals a retry cannot change.
fn permanent(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::UnknownTopic(_)
            | ClientError::PartitionOutOfRange { .. }
            | ClientError::RecordTooLarge { .. }
            | ClientError::Storage(_)
            | ClientError::Broker(
                BrokerError::BatchTooLarge { .. }
                    | BrokerError::InvalidRequest(_)
                    | BrokerError::OutOfOrderSequence { .. }
                    | BrokerError::StaleSequence { .. }
                    | BrokerError::SequenceMismatch { .. }
                    | BrokerError::ProducerFenced { .. }
            )
    )
}

/// Sends one batch with `acks=all`, retrying the very same batch until it is
/// acknowledged, refused for good, or `RETRY_FOR` passes; records the outcome
/// of every record in it. Returns whether it was acknowledged.
async fn send_tracked(
    client: &Client,
    recorder: &Recorder,
    identity: &mut Identity,
    topic: &str,
    partition: u32,
    records: Vec<(String, Record)>,
) -> bool {
    let base_sequence = identity.next_sequence.get(&partition).copied().unwrap_or(0);
    let mut builder = BatchBuilder::new();
    for (_, record) in &records {
        if let Err(e) = builder.push(record) {
            tracing::error!(error = %e, "a harness record does not encode");
            return false;
        }
    }
    builder.set_producer(ProducerInfo {
        producer_id: identity.producer_id(),
        producer_epoch: 0,
        base_sequence,
    });
    let batch = match builder.build() {
        Ok(batch) => batch,
        Err(e) => {
            tracing::error!(error = %e, "a harness batch does not encode");
            return false;
        }
    };
    let deadline = Instant::now() + RETRY_FOR;
    let mut maybe_written = false;
    let outcome = loop {
        match client.produce(topic, partition, batch.clone(), Acks::All).await {
            Ok(base) => break Ok(base),
            Err(e) => {
                maybe_written |= !definitely_not_written(&e);
                if permanent(&e) || Instant::now() >= deadline {
                    break Err(e.to_string());
                }
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    };
    let ids = records.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
    let count = ids.len() as i32;
    recorder.record(topic, partition, ids, &outcome, maybe_written);
    match outcome {
        Ok(_) => {
            let next = identity.next_sequence.entry(partition).or_insert(0);
            *next = runnel_storage::sequence::sequence_add(*next, i64::from(count));
            true
        }
        Err(_) => {
            identity.renew();
            false
        }
    }
}

/// What the producers share.
#[derive(Clone)]
pub struct Workload {
    pub client: Arc<Client>,
    pub recorder: Arc<Recorder>,
    pub stop: Arc<AtomicBool>,
}

impl Workload {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Producers go on until stopped or the history is full.
    fn producing(&self) -> bool {
        !self.stopped() && !self.recorder.full()
    }

    /// Writes batches of unique records round-robin over the partitions at
    /// about `records_per_s`, until stopped.
    pub async fn produce(self, worker: u32, topic: String, partitions: u32, records_per_s: u64) {
        let mut identity = Identity::new(worker);
        let period = Duration::from_secs_f64(BATCH_RECORDS as f64 / records_per_s.max(1) as f64);
        let mut pace = tokio::time::interval(period);
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next = 0u64;
        let mut partition = worker % partitions.max(1);
        while self.producing() {
            pace.tick().await;
            let records = (0..BATCH_RECORDS)
                .map(|_| {
                    let id = format!("w{worker}-{next}");
                    next += 1;
                    let record = Record {
                        timestamp_ms: runnel_client::unix_now_ms(),
                        key: None,
                        value: Some(Bytes::from(format!("{id:<100}"))),
                        headers: Vec::new(),
                    };
                    let record = with_write_id(record, &id);
                    (id, record)
                })
                .collect();
            send_tracked(&self.client, &self.recorder, &mut identity, &topic, partition, records).await;
            partition = (partition + 1) % partitions.max(1);
        }
    }

    /// Writes generated authorization attempts (keyed by card) to the fraud
    /// dataflow's source at about `records_per_s`, until stopped; then one
    /// closing attempt per partition, retried until acknowledged (it closes
    /// every window, so the final results can be compared).
    pub async fn produce_attempts(self, worker: u32, seed: u64, partitions: u32, records_per_s: u64) {
        let mut identity = Identity::new(worker);
        let mut generator = fraud::Generator::new(seed, 2_000, 1_700_000_000_000, 40);
        let period = Duration::from_secs_f64(FRAUD_BATCH_RECORDS as f64 / records_per_s.max(1) as f64);
        let mut pace = tokio::time::interval(period);
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next = 0u64;
        while self.producing() {
            pace.tick().await;
            let mut by_partition: BTreeMap<u32, Vec<(String, Record)>> = BTreeMap::new();
            for attempt in generator.by_ref().take(FRAUD_BATCH_RECORDS) {
                let id = format!("a{worker}-{next}");
                next += 1;
                let partition = partition_for_key(attempt.card_number.as_bytes(), partitions);
                let record = with_write_id(fraud::record(&attempt), &id);
                by_partition.entry(partition).or_default().push((id, record));
            }
            for (partition, records) in by_partition {
                send_tracked(
                    &self.client,
                    &self.recorder,
                    &mut identity,
                    fraud::SOURCE,
                    partition,
                    records,
                )
                .await;
            }
        }
        let closing = generator.closing_attempt();
        for partition in 0..partitions {
            for _ in 0..CLOSING_TRIES {
                let id = format!("a{worker}-closing-{partition}-{next}");
                next += 1;
                let record = with_write_id(fraud::record(&closing), &id);
                let records = vec![(id, record)];
                if send_tracked(
                    &self.client,
                    &self.recorder,
                    &mut identity,
                    fraud::SOURCE,
                    partition,
                    records,
                )
                .await
                {
                    break;
                }
            }
        }
    }

    /// Reads every partition of `topic` from the start as the log grows,
    /// recording each record read, until stopped.
    pub async fn consume(self, name: String, topic: String, partitions: u32) {
        let mut positions: BTreeMap<u32, u64> = (0..partitions).map(|p| (p, 0)).collect();
        while !self.stopped() {
            let mut read_any = false;
            for (partition, position) in positions.iter_mut() {
                match self.client.fetch(&topic, *partition, *position, 256 << 10).await {
                    Ok(fetched) => {
                        self.recorder.saw(&name, &topic, *partition, &fetched.records);
                        read_any |= !fetched.records.is_empty();
                        *position = fetched.next_offset;
                    }
                    Err(e) => tracing::debug!(consumer = %name, partition, error = %e, "fetch failed"),
                }
            }
            if !read_any {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
