//! OffsetDelete: forgets a group's committed offsets of some partitions
//! (`kafka-consumer-groups --delete-offsets`), as Kafka does. A partition
//! of a topic a member of the group subscribes to is refused with
//! GROUP_SUBSCRIBED_TO_TOPIC (every partition, when a member's subscription
//! cannot be read); a group with members of another protocol type than
//! `consumer` with NON_EMPTY_GROUP; a group with neither members nor
//! committed offsets with GROUP_ID_NOT_FOUND; an empty group id with
//! INVALID_GROUP_ID; a topic or partition this node does not know with
//! UNKNOWN_TOPIC_OR_PARTITION.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use kafka_protocol::messages::offset_delete_response::{OffsetDeleteResponsePartition, OffsetDeleteResponseTopic};
use kafka_protocol::messages::{ConsumerProtocolSubscription, OffsetDeleteRequest, OffsetDeleteResponse};
use kafka_protocol::protocol::Decodable;
use kafka_protocol::ResponseError;
use runnel_actors::controller::Subscribed;

use super::Context;
use crate::errors::group_result_code;

/// Partitions one request may name at most.
const PARTITIONS_MAX: usize = 10_000;

pub async fn handle(context: &Context, request: OffsetDeleteRequest, _version: i16) -> OffsetDeleteResponse {
    let named: usize = request.topics.iter().map(|t| t.partitions.len()).sum();
    if named > PARTITIONS_MAX || request.topics.len() > PARTITIONS_MAX {
        return OffsetDeleteResponse::default().with_error_code(ResponseError::InvalidRequest.code());
    }
    let group = request.group_id.0.as_str();
    if group.is_empty() {
        return OffsetDeleteResponse::default().with_error_code(ResponseError::InvalidGroupId.code());
    }
    // Each named partition's code; the existing ones are asked of the group.
    let mut counts: BTreeMap<&str, Option<u32>> = BTreeMap::new();
    let mut codes: Vec<Vec<i16>> = Vec::with_capacity(request.topics.len());
    let (mut wanted, mut places) = (Vec::new(), Vec::new());
    for (t, topic) in request.topics.iter().enumerate() {
        let name = topic.name.0.as_str();
        let count = *counts
            .entry(name)
            .or_insert_with(|| context.service.partition_count(name));
        codes.push(vec![
            ResponseError::UnknownTopicOrPartition.code();
            topic.partitions.len()
        ]);
        for (i, p) in topic.partitions.iter().enumerate() {
            if let Some(index) = u32::try_from(p.partition_index)
                .ok()
                .filter(|p| count.is_some_and(|n| *p < n))
            {
                wanted.push((name.to_string(), index));
                places.push((t, i));
            }
        }
    }
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
/// the subscriptions they joined with (each member's every protocol), or
/// every topic when one cannot be read, as Kafka takes it; `None` for a
/// group of another protocol type.
fn subscribed_topics(protocol_type: &str, members: &[Vec<Bytes>]) -> Option<Subscribed> {
    if protocol_type != "consumer" {
        return None;
    }
    let mut topics = BTreeSet::new();
    for metadata in members.iter().flatten() {
        match subscription_topics(metadata) {
            Some(subscribed) => topics.extend(subscribed),
            None => return Some(Subscribed::Every),
        }
    }
    Some(Subscribed::Topics(topics))
}

/// The topics of a consumer protocol subscription: its version, then the
/// fields of version 0, which every later version starts with (read as
/// version 0, as Kafka reads it, so a client that writes a later version
/// with only those fields is read too).
fn subscription_topics(metadata: &Bytes) -> Option<Vec<String>> {
    let version = i16::from_be_bytes([*metadata.first()?, *metadata.get(1)?]);
    if version < 0 {
        return None;
    }
    let mut body = metadata.slice(2..);
    let subscription = ConsumerProtocolSubscription::decode(&mut body, 0).ok()?;
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
        // Version 1 said, only version 0's fields written.
        let mut short = subscription(0, &["a"]).to_vec();
        short[1] = 1;
        assert_eq!(subscription_topics(&Bytes::from(short)), Some(vec!["a".to_string()]));
        assert_eq!(subscription_topics(&Bytes::from_static(&[0])), None);
        assert_eq!(subscription_topics(&Bytes::from_static(&[0, 0, 0, 9, 1])), None);
    }

    #[test]
    fn an_unreadable_subscription_counts_as_every_topic_and_another_protocol_as_unknown() {
        let members = vec![vec![subscription(0, &["a"])], vec![subscription(2, &["b"])]];
        let both = Subscribed::Topics(["a".to_string(), "b".to_string()].into());
        assert_eq!(subscribed_topics("consumer", &members), Some(both));
        let garbage = vec![vec![subscription(0, &["a"])], vec![Bytes::from_static(&[9])]];
        assert_eq!(subscribed_topics("consumer", &garbage), Some(Subscribed::Every));
        assert_eq!(subscribed_topics("connect", &members), None);
    }
}
