//! Produce: each partition's one record batch, rebuilt as a Runnel batch
//! and appended on this node if it leads the partition.
//!
//! `acks=-1` (all) answers once the batch is committed on a majority, as
//! Runnel's own `Acks::All`; `acks=1` once the leader appended it; `acks=0`
//! gets no answer at all (the Kafka protocol's rule). A request's batches
//! are handed to their replicas in order ([`submit`]), then answered
//! together once each is acknowledged, while the connection reads on.

use std::future::Future;
use std::pin::Pin;

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

/// Hands every partition's batch to its replica, in the request's order,
/// and returns the answer to await: requests submitted one after another
/// append each partition's batches in that order, so a connection's
/// pipelined requests keep an idempotent producer's sequence.
pub async fn submit(
    context: &Context,
    request: ProduceRequest,
) -> impl Future<Output = ProduceResponse> + Send + 'static {
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
    let acks = acks.unwrap_or(Acks::All);
    let mut topics = Vec::with_capacity(request.topic_data.len());
    let mut budget = PARTITIONS_MAX;
    for topic in request.topic_data {
        let name = topic.name.0.to_string();
        let take = topic.partition_data.len().min(budget);
        budget -= take;
        let mut partitions = Vec::with_capacity(take);
        for data in topic.partition_data.into_iter().take(take) {
            let answer = match &refusal {
                Some(e) => ready_answer(Err(e.clone())),
                None => submit_one(context, &name, data.index, data.records, acks).await,
            };
            partitions.push((data.index, answer));
        }
        topics.push((topic.name, partitions));
    }
    async move {
        let mut responses = Vec::with_capacity(topics.len());
        for (name, partitions) in topics {
            let answers = partitions
                .into_iter()
                .map(|(index, answer)| async move { partition_response(index, answer.await) });
            responses.push(
                TopicProduceResponse::default()
                    .with_name(name)
                    .with_partition_responses(join_all(answers).await),
            );
        }
        ProduceResponse::default().with_responses(responses)
    }
}

/// One partition's append, to be answered.
type Answer = Pin<Box<dyn Future<Output = Result<u64, KafkaError>> + Send>>;

fn ready_answer(result: Result<u64, KafkaError>) -> Answer {
    Box::pin(std::future::ready(result))
}

async fn submit_one(
    context: &Context,
    topic: &str,
    partition: i32,
    records: Option<bytes::Bytes>,
    acks: Acks,
) -> Answer {
    let submitted = async {
        let partition = u32::try_from(partition)
            .map_err(|_| KafkaError::new(ResponseError::UnknownTopicOrPartition, format!("partition {partition}")))?;
        let records = records.ok_or_else(|| KafkaError::new(ResponseError::InvalidRecord, "no records"))?;
        let batch = produced_batch(records, runnel_client::unix_now_ms())
            .map_err(|e| KafkaError::new(ResponseError::CorruptMessage, e.to_string()))?;
        Ok::<_, KafkaError>(context.service.submit_produce(topic, partition, acks, batch).await?)
    };
    match submitted.await {
        Ok(answer) => Box::pin(async move { Ok(answer.await?) }),
        Err(e) => ready_answer(Err(e)),
    }
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
