//! DeleteRecords: moves each named partition's start to the offset given
//! (-1: its high watermark), through its leader; the records below are no
//! longer read and their whole segments go from every replica's disk. The
//! answer per partition is its new low watermark. A topic's partitions are
//! deleted at once; the request waits up to its `timeout_ms` (at most 60
//! s) in all, then answers REQUEST_TIMED_OUT for what has not committed
//! (asking again is safe).

use std::time::Duration;

use futures_util::future::join_all;
use kafka_protocol::messages::delete_records_request::DeleteRecordsPartition;
use kafka_protocol::messages::delete_records_response::{DeleteRecordsPartitionResult, DeleteRecordsTopicResult};
use kafka_protocol::messages::{DeleteRecordsRequest, DeleteRecordsResponse};
use kafka_protocol::ResponseError;

use super::Context;
use crate::errors::KafkaError;

/// Partitions one request may move at most; the rest are refused.
const PARTITIONS_MAX: usize = 10_000;
/// The offset that names a partition's high watermark.
const HIGH_WATERMARK: i64 = -1;
/// How long a partition's deletion is waited for when the request names no
/// positive timeout, and the longest it may name.
const TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
const TIMEOUT_MAX: Duration = Duration::from_secs(60);

pub async fn handle(context: &Context, request: DeleteRecordsRequest, _version: i16) -> DeleteRecordsResponse {
    let timeout = match u64::try_from(request.timeout_ms) {
        Ok(ms) if ms > 0 => Duration::from_millis(ms).min(TIMEOUT_MAX),
        _ => TIMEOUT_DEFAULT,
    };
    // One deadline for the whole request, as Kafka's timeout_ms is.
    let deadline = tokio::time::Instant::now() + timeout;
    let mut budget = PARTITIONS_MAX;
    let mut topics = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let name = topic.name.0.to_string();
        // A topic's partitions are deleted at once, each on its leader.
        let answers: Vec<_> = topic
            .partitions
            .iter()
            .map(|wanted| {
                let admitted = budget.checked_sub(1).inspect(|left| budget = *left).is_some();
                partition_result(context, &name, wanted, admitted, deadline)
            })
            .collect();
        topics.push(
            DeleteRecordsTopicResult::default()
                .with_name(topic.name)
                .with_partitions(join_all(answers).await),
        );
    }
    DeleteRecordsResponse::default().with_topics(topics)
}

/// One partition's answer: its low watermark, or the error that names why
/// not (`admitted`: within the request's bound on partitions).
async fn partition_result(
    context: &Context,
    topic: &str,
    wanted: &DeleteRecordsPartition,
    admitted: bool,
    deadline: tokio::time::Instant,
) -> DeleteRecordsPartitionResult {
    let result = DeleteRecordsPartitionResult::default().with_partition_index(wanted.partition_index);
    let moved = match admitted {
        false => Err(KafkaError::new(
            ResponseError::PolicyViolation,
            format!("over {PARTITIONS_MAX} partitions in one DeleteRecords"),
        )),
        true => match tokio::time::timeout_at(deadline, delete(context, topic, wanted)).await {
            Ok(moved) => moved,
            // The deletion may still commit; asking again is safe.
            Err(_) => Err(KafkaError::new(
                ResponseError::RequestTimedOut,
                "not committed within the request's timeout",
            )),
        },
    };
    match moved {
        Ok(low_watermark) => result.with_low_watermark(low_watermark),
        Err(e) => {
            tracing::debug!(topic, partition = wanted.partition_index, error = %e.message, "DeleteRecords refused");
            result.with_low_watermark(-1).with_error_code(e.code())
        }
    }
}

async fn delete(context: &Context, topic: &str, wanted: &DeleteRecordsPartition) -> Result<i64, KafkaError> {
    let partition = u32::try_from(wanted.partition_index)
        .map_err(|_| KafkaError::new(ResponseError::UnknownTopicOrPartition, "negative partition"))?;
    let before_offset = match wanted.offset {
        HIGH_WATERMARK => None,
        offset => Some(u64::try_from(offset).map_err(|_| {
            KafkaError::new(
                ResponseError::OffsetOutOfRange,
                format!("offset {offset} (only -1, the high watermark, or an offset)"),
            )
        })?),
    };
    let start = context.service.delete_records(topic, partition, before_offset).await?;
    Ok(start as i64)
}
