//! Produce: each partition's one record batch, rebuilt as a Runnel batch
//! and appended on this node if it leads the partition.
//!
//! `acks=-1` (all) answers once the batch is committed on a majority, as
//! Runnel's own `Acks::All`; `acks=1` once the leader appended it; `acks=0`
//! gets no answer at all (the Kafka protocol's rule). Partitions of one
//! request are appended concurrently.

use futures_util::future::join_all;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse};
use kafka_protocol::ResponseError;
use runnel_actors::Acks;

use super::{str_bytes, Context};
use crate::errors::KafkaError;
use crate::records::produced_batch;

/// Partitions one produce request may write at most.
const PARTITIONS_MAX: usize = 10_000;

pub async fn handle(context: &Context, request: ProduceRequest, _version: i16) -> ProduceResponse {
    let acks = match request.acks {
        -1 => Ok(Acks::All),
        1 => Ok(Acks::Leader),
        0 => Ok(Acks::None),
        other => Err(KafkaError::new(
            ResponseError::InvalidRequiredAcks,
            format!("acks={other}: use -1 (all), 1 or 0"),
        )),
    };
    let refusal = match (&acks, &request.transactional_id) {
        (Err(e), _) => Some(e.clone()),
        (_, Some(_)) => Some(KafkaError::new(
            ResponseError::TransactionalIdAuthorizationFailed,
            "transactional producers are not supported: Runnel has no Kafka transactions",
        )),
        _ => None,
    };
    let mut responses = Vec::with_capacity(request.topic_data.len());
    let mut budget = PARTITIONS_MAX;
    for topic in request.topic_data {
        let name = topic.name.0.to_string();
        let take = topic.partition_data.len().min(budget);
        budget -= take;
        let appends = topic.partition_data.into_iter().take(take).map(|data| {
            let name = name.as_str();
            let refusal = refusal.clone();
            let acks = acks.clone().unwrap_or(Acks::All);
            async move {
                let result = match refusal {
                    Some(e) => Err(e),
                    None => append(context, name, data.index, data.records, acks).await,
                };
                partition_response(data.index, result)
            }
        });
        let partitions = join_all(appends).await;
        responses.push(
            TopicProduceResponse::default()
                .with_name(topic.name)
                .with_partition_responses(partitions),
        );
    }
    ProduceResponse::default().with_responses(responses)
}

async fn append(
    context: &Context,
    topic: &str,
    partition: i32,
    records: Option<bytes::Bytes>,
    acks: Acks,
) -> Result<u64, KafkaError> {
    let partition = u32::try_from(partition)
        .map_err(|_| KafkaError::new(ResponseError::UnknownTopicOrPartition, format!("partition {partition}")))?;
    let records = records.ok_or_else(|| KafkaError::new(ResponseError::InvalidRecord, "no records"))?;
    let batch = produced_batch(records, runnel_client::unix_now_ms())
        .map_err(|e| KafkaError::new(ResponseError::CorruptMessage, e.to_string()))?;
    Ok(context.service.produce(topic, partition, acks, batch).await?)
}

fn partition_response(index: i32, result: Result<u64, KafkaError>) -> PartitionProduceResponse {
    let response = PartitionProduceResponse::default()
        .with_index(index)
        .with_log_append_time_ms(-1)
        .with_log_start_offset(-1);
    match result {
        Ok(base_offset) => response.with_base_offset(base_offset as i64),
        Err(e) => {
            if e.code != ResponseError::NotLeaderOrFollower {
                tracing::debug!(partition = index, error = %e.message, "Kafka produce refused");
            }
            response
                .with_base_offset(-1)
                .with_error_code(e.code())
                .with_error_message(Some(str_bytes(&e.message)))
        }
    }
}
