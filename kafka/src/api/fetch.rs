//! Fetch: committed records of the partitions this node leads, as Kafka
//! record batches, with Kafka's long poll: the answer waits up to
//! `max_wait_ms` for `min_bytes` to be there.
//!
//! Fetch sessions (KIP-227) are not kept: every answer is a full one with
//! session id 0, which clients accept by sending full requests.

use std::time::{Duration, Instant};

use kafka_protocol::messages::fetch_request::FetchPartition;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::{FetchRequest, FetchResponse};
use kafka_protocol::ResponseError;

use super::Context;
use runnel_actors::controller::ServiceError;
use runnel_actors::metadata::NodeId;
use runnel_actors::partition::Fetched;
use runnel_actors::BrokerError;

use crate::errors::KafkaError;
use crate::records::{emptied_span, fetched_batches};

/// The longest a fetch waits for data, whatever the client asks.
pub const WAIT_MAX: Duration = Duration::from_secs(30);
/// Bytes one fetch answers with at most, whatever the client asks.
pub const RESPONSE_BYTES_MAX: usize = 64 << 20;
/// How often a waiting fetch looks for new data.
const POLL: Duration = Duration::from_millis(5);
/// Partitions one fetch may read at most.
const PARTITIONS_MAX: usize = 10_000;

/// Reads one fetch makes past batches compaction emptied, at most.
const EMPTIED_READS_MAX: usize = 64;

pub async fn handle(context: &Context, request: FetchRequest, _version: i16) -> FetchResponse {
    let wait = Duration::from_millis(request.max_wait_ms.max(0) as u64).min(WAIT_MAX);
    let deadline = Instant::now() + wait;
    let max_bytes = (request.max_bytes.max(1) as usize).min(RESPONSE_BYTES_MAX);
    let min_bytes = request.min_bytes.max(0) as usize;
    loop {
        let (responses, bytes, failed) = read_all(context, &request, max_bytes).await;
        if bytes >= min_bytes.max(1) || failed || Instant::now() >= deadline {
            return FetchResponse::default().with_responses(responses);
        }
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// One pass over the requested partitions: the responses, the record bytes
/// they hold, and whether any partition failed (answered at once).
async fn read_all(
    context: &Context,
    request: &FetchRequest,
    max_bytes: usize,
) -> (Vec<FetchableTopicResponse>, usize, bool) {
    let mut total = 0usize;
    let mut failed = false;
    let mut budget = PARTITIONS_MAX;
    let mut responses = Vec::with_capacity(request.topics.len());
    for topic in &request.topics {
        let name = topic.topic.0.as_str();
        let mut partitions = Vec::with_capacity(topic.partitions.len());
        for wanted in topic.partitions.iter().take(budget) {
            let room = max_bytes.saturating_sub(total);
            let data = read_partition(context, name, wanted, room).await;
            failed |= data.error_code != 0;
            total += data.records.as_ref().map_or(0, |r| r.len());
            partitions.push(data);
        }
        budget = budget.saturating_sub(topic.partitions.len());
        responses.push(
            FetchableTopicResponse::default()
                .with_topic(topic.topic.clone())
                .with_partitions(partitions),
        );
    }
    (responses, total, failed)
}

async fn read_partition(context: &Context, topic: &str, wanted: &FetchPartition, room: usize) -> PartitionData {
    let response = PartitionData::default()
        .with_partition_index(wanted.partition)
        .with_aborted_transactions(Some(Vec::new()));
    match read(context, topic, wanted, room).await {
        Ok((records, start, committed)) => response
            .with_high_watermark(committed as i64)
            .with_last_stable_offset(committed as i64)
            .with_log_start_offset(start as i64)
            .with_records(Some(records)),
        Err(e) => {
            tracing::debug!(topic, partition = wanted.partition, error = %e.message, "Kafka fetch refused");
            response
                .with_error_code(e.code())
                .with_high_watermark(-1)
                .with_last_stable_offset(-1)
                .with_log_start_offset(-1)
                .with_records(Some(bytes::Bytes::new()))
        }
    }
}

/// The partition's records from the fetch offset (nothing when `room` is
/// 0), its start offset and its committed offset (the high watermark).
async fn read(
    context: &Context,
    topic: &str,
    wanted: &FetchPartition,
    room: usize,
) -> Result<(bytes::Bytes, u64, u64), KafkaError> {
    let partition = u32::try_from(wanted.partition)
        .map_err(|_| KafkaError::new(ResponseError::UnknownTopicOrPartition, "negative partition"))?;
    let offset = u64::try_from(wanted.fetch_offset)
        .map_err(|_| KafkaError::new(ResponseError::OffsetOutOfRange, "negative fetch offset"))?;
    let limit = room.min(wanted.partition_max_bytes.max(0) as usize);
    let (first, any_replica) = first_fetch(context, topic, partition, offset, limit.max(1) as u32).await;
    let fetched = match first {
        Ok(fetched) => fetched,
        Err(ServiceError::Failed(BrokerError::OffsetOutOfRange { start, end, .. })) if offset > end => {
            // Past the high watermark: nothing to read yet when within the
            // log (a new leader whose commit point has not caught up), as
            // Kafka answers, rather than an error that resets the consumer.
            // A leader not serving reads yet cannot tell where the log's
            // committed end is: nothing to read yet, too.
            if !any_replica {
                let (_, _, log_end) = context.service.offset_range(topic, partition).await?;
                if offset > log_end {
                    return Err(out_of_range(offset, start, end));
                }
            }
            return Ok((bytes::Bytes::new(), start, end));
        }
        Err(e) => return Err(e.into()),
    };
    if limit == 0 {
        return Ok((bytes::Bytes::new(), fetched.start_offset, fetched.committed_offset));
    }
    let (start, committed) = (fetched.start_offset, fetched.committed_offset);
    let mut batches = fetched.batches;
    let mut from = offset;
    for _ in 0..EMPTIED_READS_MAX {
        let records = fetched_batches(&batches, from, limit)
            .map_err(|e| KafkaError::new(ResponseError::KafkaStorageError, format!("{e:#}")))?;
        let read_to = batches.last().map_or(from, |b| b.next_offset()).min(committed);
        if !records.is_empty() || read_to <= from {
            return Ok((records, start, committed));
        }
        if read_to >= committed {
            // Emptied up to the high watermark: a batch of no record
            // moves the client past them.
            return Ok((emptied_span(offset, read_to), start, committed));
        }
        // Every batch read was emptied by compaction: a Kafka client would
        // ask for the same offset again, so read on past them.
        from = read_to;
        batches = context
            .service
            .fetch(topic, partition, from, limit as u32, any_replica)
            .await?
            .batches;
    }
    Ok((emptied_span(offset, from), start, committed))
}

/// The partition's committed records from `offset`, and whether they were
/// read as any replica's. A leader just elected (its commit point not yet
/// of its own term, a moment) refuses reads as a leader; what it knows to
/// be committed is answered instead, up to its commit point, with that
/// point as the high watermark, as a Kafka leader whose high watermark
/// lags answers. NOT_LEADER_OR_FOLLOWER would send KafkaJS to rejoin its
/// group.
async fn first_fetch(
    context: &Context,
    topic: &str,
    partition: u32,
    offset: u64,
    max_bytes: u32,
) -> (Result<Fetched, ServiceError>, bool) {
    let service = &context.service;
    match service.fetch(topic, partition, offset, max_bytes, false).await {
        Err(e) if leads_but_serves_no_reads_yet(&e, service.node_id()) => {
            (service.fetch(topic, partition, offset, max_bytes, true).await, true)
        }
        answer => (answer, false),
    }
}

/// Whether a refusal names this node itself as the leader: elected here,
/// not serving reads as the leader yet.
fn leads_but_serves_no_reads_yet(error: &ServiceError, me: NodeId) -> bool {
    matches!(error, ServiceError::Failed(BrokerError::NotLeader { leader: Some(leader), .. }) if *leader == me)
}

fn out_of_range(offset: u64, start: u64, end: u64) -> KafkaError {
    KafkaError::new(
        ResponseError::OffsetOutOfRange,
        format!("offset {offset} is out of range [{start}, {end}]"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use runnel_actors::metadata::GroupId;

    #[test]
    fn only_a_refusal_naming_this_node_as_leader_is_read_as_what_it_knows_committed() {
        let not_leader = |leader| {
            ServiceError::Failed(BrokerError::NotLeader {
                group: GroupId(4),
                leader,
            })
        };
        assert!(leads_but_serves_no_reads_yet(&not_leader(Some(NodeId(2))), NodeId(2)));
        assert!(!leads_but_serves_no_reads_yet(&not_leader(Some(NodeId(3))), NodeId(2)));
        assert!(!leads_but_serves_no_reads_yet(&not_leader(None), NodeId(2)));
        let moved = ServiceError::NotHere {
            replicas: vec![NodeId(2)],
        };
        assert!(!leads_but_serves_no_reads_yet(&moved, NodeId(2)));
    }
}
