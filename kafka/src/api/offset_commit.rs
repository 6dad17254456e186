//! OffsetCommit: a group's next offsets per partition, written to the
//! offsets topic on a majority before the answer. A member must be of the
//! group's current generation; generation -1 commits from outside group
//! management (allowed while the group has no members). Commit metadata
//! strings are not kept.

use kafka_protocol::messages::offset_commit_response::{OffsetCommitResponsePartition, OffsetCommitResponseTopic};
use kafka_protocol::messages::{OffsetCommitRequest, OffsetCommitResponse};

use super::Context;
use crate::errors::group_result_code;

pub async fn handle(context: &Context, request: OffsetCommitRequest, _version: i16) -> OffsetCommitResponse {
    let mut offsets = Vec::new();
    for topic in &request.topics {
        for p in &topic.partitions {
            if let (Ok(partition), Ok(offset)) = (u32::try_from(p.partition_index), u64::try_from(p.committed_offset)) {
                offsets.push((topic.name.0.to_string(), partition, offset));
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
