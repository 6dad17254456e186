//! OffsetDelete: forgets a group's committed offsets of some partitions
//! (`kafka-consumer-groups --delete-offsets`), as Kafka does. A partition
//! of a topic a member of the group subscribes to is refused with
//! GROUP_SUBSCRIBED_TO_TOPIC; a group with members whose subscriptions
//! cannot be read (not a `consumer` group) with NON_EMPTY_GROUP; a group
//! with neither members nor committed offsets with GROUP_ID_NOT_FOUND; an
//! unknown topic or partition with UNKNOWN_TOPIC_OR_PARTITION.

use std::collections::BTreeSet;

use bytes::Bytes;
use kafka_protocol::messages::offset_delete_response::{OffsetDeleteResponsePartition, OffsetDeleteResponseTopic};
use kafka_protocol::messages::{ConsumerProtocolSubscription, OffsetDeleteRequest, OffsetDeleteResponse};
use kafka_protocol::protocol::Decodable;
use kafka_protocol::ResponseError;
use runnel_actors::groups::core::Group;

use super::Context;
use crate::errors::group_result_code;

/// Partitions one request may name at most.
const PARTITIONS_MAX: usize = 10_000;

pub async fn handle(context: &Context, request: OffsetDeleteRequest, _version: i16) -> OffsetDeleteResponse {
    let named: usize = request.topics.iter().map(|t| t.partitions.len()).sum();
    if named > PARTITIONS_MAX {
        return OffsetDeleteResponse::default().with_error_code(ResponseError::InvalidRequest.code());
    }
    // Each named partition's code; the existing ones are asked of the group.
    let mut codes: Vec<Vec<i16>> = Vec::with_capacity(request.topics.len());
    let (mut wanted, mut places) = (Vec::new(), Vec::new());
    for (t, topic) in request.topics.iter().enumerate() {
        let name = topic.name.0.to_string();
        let partitions = context
            .service
            .describe_topic(&name)
            .await
            .ok()
            .map(|i| i.config.partitions);
        let mut topic_codes = Vec::with_capacity(topic.partitions.len());
        for (i, p) in topic.partitions.iter().enumerate() {
            let index = u32::try_from(p.partition_index)
                .ok()
                .filter(|p| partitions.is_some_and(|n| *p < n));
            topic_codes.push(ResponseError::UnknownTopicOrPartition.code());
            if let Some(index) = index {
                wanted.push((name.clone(), index));
                places.push((t, i));
            }
        }
        codes.push(topic_codes);
    }
    let group = request.group_id.0.as_str();
    let result = context
        .service
        .delete_group_offsets(group, &wanted, subscribed_topics)
        .await;
    let Ok(outcomes) = &result else {
        return OffsetDeleteResponse::default().with_error_code(group_result_code(&result));
    };
    for ((t, i), forgotten) in places.into_iter().zip(outcomes) {
        codes[t][i] = match forgotten {
            true => 0,
            false => ResponseError::GroupSubscribedToTopic.code(),
        };
    }
    OffsetDeleteResponse::default().with_topics(answer(request, codes))
}

fn answer(request: OffsetDeleteRequest, codes: Vec<Vec<i16>>) -> Vec<OffsetDeleteResponseTopic> {
    request
        .topics
        .into_iter()
        .zip(codes)
        .map(|(topic, codes)| {
            let partitions = topic
                .partitions
                .iter()
                .zip(codes)
                .map(|(p, code)| {
                    OffsetDeleteResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(code)
                })
                .collect();
            OffsetDeleteResponseTopic::default()
                .with_name(topic.name)
                .with_partitions(partitions)
        })
        .collect()
}

/// The topics the members of a `consumer` group subscribe to, read from
/// the subscriptions they joined with; `None` when one cannot be read.
fn subscribed_topics(group: &Group) -> Option<BTreeSet<String>> {
    if group.protocol_type != "consumer" {
        return None;
    }
    let mut topics = BTreeSet::new();
    for member in group.members.values() {
        let mut read = false;
        for (_, metadata) in &member.protocols {
            if let Some(subscribed) = subscription_topics(metadata) {
                topics.extend(subscribed);
                read = true;
            }
        }
        if !read {
            return None;
        }
    }
    Some(topics)
}

/// The topics of a consumer protocol subscription (its version first; a
/// version newer than the `kafka-protocol` crate knows starts with the
/// same fields).
fn subscription_topics(metadata: &Bytes) -> Option<Vec<String>> {
    let version = i16::from_be_bytes([*metadata.first()?, *metadata.get(1)?]);
    let mut body = metadata.slice(2..);
    let subscription = ConsumerProtocolSubscription::decode(&mut body, version.clamp(0, 3)).ok()?;
    Some(subscription.topics.iter().map(|t| t.to_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::protocol::{Encodable, StrBytes};

    fn subscription(version: i16, topics: &[&str]) -> Bytes {
        let mut out = bytes::BytesMut::new();
        out.extend_from_slice(&version.to_be_bytes());
        let topics = topics.iter().map(|t| StrBytes::from_string(t.to_string())).collect();
        let body = ConsumerProtocolSubscription::default().with_topics(topics);
        body.encode(&mut out, version.clamp(0, 3)).expect("encode");
        out.freeze()
    }

    #[test]
    fn subscriptions_of_every_version_name_their_topics_and_garbage_names_none() {
        for version in 0..=3 {
            let topics = subscription_topics(&subscription(version, &["a", "b"]));
            assert_eq!(
                topics,
                Some(vec!["a".to_string(), "b".to_string()]),
                "version {version}"
            );
        }
        assert_eq!(subscription_topics(&Bytes::from_static(&[0])), None);
        assert_eq!(subscription_topics(&Bytes::from_static(&[0, 0, 0, 9, 1])), None);
    }
}
