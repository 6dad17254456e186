//! ListOffsets: a partition's earliest offset (timestamp -2), its latest
//! (-1: the high watermark, the next offset to be written and committed),
//! or the first offset whose record's timestamp is at least the one given.

use kafka_protocol::messages::list_offsets_request::ListOffsetsPartition;
use kafka_protocol::messages::list_offsets_response::{ListOffsetsPartitionResponse, ListOffsetsTopicResponse};
use kafka_protocol::messages::{ListOffsetsRequest, ListOffsetsResponse};
use kafka_protocol::ResponseError;

use super::Context;
use crate::errors::KafkaError;

const LATEST: i64 = -1;
const EARLIEST: i64 = -2;

pub async fn handle(context: &Context, request: ListOffsetsRequest, _version: i16) -> ListOffsetsResponse {
    let mut topics = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let mut partitions = Vec::with_capacity(topic.partitions.len());
        for wanted in &topic.partitions {
            let response = ListOffsetsPartitionResponse::default()
                .with_partition_index(wanted.partition_index)
                .with_leader_epoch(-1);
            partitions.push(match offset(context, topic.name.0.as_str(), wanted).await {
                Ok(offset) => response.with_offset(offset).with_timestamp(-1),
                Err(e) => response.with_error_code(e.code()).with_offset(-1).with_timestamp(-1),
            });
        }
        topics.push(
            ListOffsetsTopicResponse::default()
                .with_name(topic.name)
                .with_partitions(partitions),
        );
    }
    ListOffsetsResponse::default().with_topics(topics)
}

async fn offset(context: &Context, topic: &str, wanted: &ListOffsetsPartition) -> Result<i64, KafkaError> {
    let partition = u32::try_from(wanted.partition_index)
        .map_err(|_| KafkaError::new(ResponseError::UnknownTopicOrPartition, "negative partition"))?;
    let (start, committed, _) = context.service.offset_range(topic, partition).await?;
    match wanted.timestamp {
        EARLIEST => Ok(start as i64),
        LATEST => Ok(committed as i64),
        at if at >= 0 => {
            let found = context.service.offset_for_timestamp(topic, partition, at).await?;
            // No record that recent: Kafka answers the latest offset.
            Ok(found.map_or(committed, |o| o.max(start)) as i64)
        }
        other => Err(KafkaError::new(
            ResponseError::UnsupportedVersion,
            format!("timestamp {other} (only -1 latest, -2 earliest and times are served)"),
        )),
    }
}
