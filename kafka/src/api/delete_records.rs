//! DeleteRecords: moves each named partition's start to the offset given
//! (-1: its high watermark), through its leader; the records below are no
//! longer read and their whole segments go from every replica's disk. The
//! answer per partition is its new low watermark.

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

pub async fn handle(context: &Context, request: DeleteRecordsRequest, _version: i16) -> DeleteRecordsResponse {
    let mut budget = PARTITIONS_MAX;
    let mut topics = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let mut partitions = Vec::with_capacity(topic.partitions.len());
        for wanted in &topic.partitions {
            let result = DeleteRecordsPartitionResult::default().with_partition_index(wanted.partition_index);
            let moved = match budget.checked_sub(1) {
                Some(left) => {
                    budget = left;
                    delete(context, topic.name.0.as_str(), wanted).await
                }
                None => Err(KafkaError::new(
                    ResponseError::PolicyViolation,
                    format!("over {PARTITIONS_MAX} partitions in one DeleteRecords"),
                )),
            };
            partitions.push(match moved {
                Ok(low_watermark) => result.with_low_watermark(low_watermark),
                Err(e) => {
                    tracing::debug!(topic = %topic.name.0, partition = wanted.partition_index, error = %e.message, "DeleteRecords refused");
                    result.with_low_watermark(-1).with_error_code(e.code())
                }
            });
        }
        topics.push(
            DeleteRecordsTopicResult::default()
                .with_name(topic.name)
                .with_partitions(partitions),
        );
    }
    DeleteRecordsResponse::default().with_topics(topics)
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
