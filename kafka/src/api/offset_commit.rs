//! OffsetCommit: a group's next offsets per partition, written to the
//! offsets topic on a majority before the answer. A member must be of the
//! group's current generation; generation -1 commits from outside group
//! management (allowed while the group has no members). Commit metadata
//! strings are not kept.
//!
//! A negative offset is kept as it came, as Kafka keeps it: KafkaJS
//! commits -2 or -1 (earliest or latest) to reset a group after
//! OFFSET_OUT_OF_RANGE or from `admin.resetOffsets`, and resolves it when
//! it reads it back. A negative partition is answered
//! UNKNOWN_TOPIC_OR_PARTITION.

use kafka_protocol::messages::offset_commit_response::{OffsetCommitResponsePartition, OffsetCommitResponseTopic};
use kafka_protocol::messages::{OffsetCommitRequest, OffsetCommitResponse};
use kafka_protocol::ResponseError;

use super::Context;
use crate::errors::group_result_code;

pub async fn handle(context: &Context, request: OffsetCommitRequest, _version: i16) -> OffsetCommitResponse {
    let mut offsets = Vec::new();
    for topic in &request.topics {
        for p in &topic.partitions {
            if let Ok(partition) = u32::try_from(p.partition_index) {
                offsets.push((topic.name.0.to_string(), partition, p.committed_offset));
            }
        }
    }
    let group = request.group_id.0.as_str();
    let instance = request.group_instance_id.as_deref();
    let result = match context
        .service
        .check_instance(group, instance, &request.member_id)
        .await
    {
        Ok(()) => {
            context
                .service
                .commit_group_offsets(
                    group,
                    request.generation_id_or_member_epoch,
                    &request.member_id,
                    &offsets,
                )
                .await
        }
        Err(e) => Err(e),
    };
    let code = group_result_code(&result);
    let topics = request
        .topics
        .into_iter()
        .map(|topic| {
            let partitions = topic
                .partitions
                .iter()
                .map(|p| {
                    let code = match p.partition_index < 0 {
                        true => ResponseError::UnknownTopicOrPartition.code(),
                        false => code,
                    };
                    OffsetCommitResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(code)
                })
                .collect();
            OffsetCommitResponseTopic::default()
                .with_name(topic.name)
                .with_partitions(partitions)
        })
        .collect();
    OffsetCommitResponse::default().with_topics(topics)
}
