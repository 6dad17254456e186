//! OffsetFetch: a group's committed offsets, of the partitions asked for or
//! (no topics) all of them; -1 where nothing is committed.

use kafka_protocol::messages::offset_fetch_response::{OffsetFetchResponsePartition, OffsetFetchResponseTopic};
use kafka_protocol::messages::{OffsetFetchRequest, OffsetFetchResponse};

use super::{topic_name, Context};
use crate::errors::group_result_code;

pub async fn handle(context: &Context, request: OffsetFetchRequest, version: i16) -> OffsetFetchResponse {
    let wanted: Option<Vec<(String, u32)>> = request.topics.as_ref().map(|topics| {
        topics
            .iter()
            .flat_map(|t| {
                let name = t.name.0.to_string();
                t.partition_indexes
                    .iter()
                    .filter_map(move |p| Some((name.clone(), u32::try_from(*p).ok()?)))
            })
            .collect()
    });
    let result = context
        .service
        .group_offsets(request.group_id.0.as_str(), wanted.as_deref())
        .await;
    let code = group_result_code(&result);
    let Ok(found) = result else {
        // Version 2 on carries a top-level error; before it, each partition does.
        return match version {
            0..=1 => OffsetFetchResponse::default(),
            _ => OffsetFetchResponse::default().with_error_code(code),
        };
    };
    let mut topics: Vec<OffsetFetchResponseTopic> = Vec::new();
    for (topic, partition, offset) in found {
        let entry = OffsetFetchResponsePartition::default()
            .with_partition_index(partition as i32)
            .with_committed_offset(offset.unwrap_or(-1))
            .with_committed_leader_epoch(-1)
            .with_metadata(Some(Default::default()));
        match topics.iter_mut().find(|t| t.name.0.as_str() == topic) {
            Some(t) => t.partitions.push(entry),
            None => topics.push(
                OffsetFetchResponseTopic::default()
                    .with_name(topic_name(&topic))
                    .with_partitions(vec![entry]),
            ),
        }
    }
    OffsetFetchResponse::default().with_topics(topics)
}
