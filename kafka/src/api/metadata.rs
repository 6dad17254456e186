//! Metadata: the nodes serving Kafka, and each topic's partitions with
//! their leader, replicas and in-sync replicas (the Raft voters).
//!
//! A partition whose leader is unknown, or whose leader serves no Kafka
//! listener, is answered `LEADER_NOT_AVAILABLE`, which clients retry. Topics
//! are never created by a Metadata request.

use std::collections::BTreeMap;

use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{BrokerId, MetadataRequest, MetadataResponse};
use kafka_protocol::ResponseError;
use runnel_actors::controller::service::ClusterMetadata;
use runnel_actors::metadata::NodeId;
use runnel_actors::protocol::TopicInfo;

use super::{str_bytes, topic_name, Context};

/// The cluster id Kafka clients see.
pub const CLUSTER_ID: &str = "runnel";
/// Topics one Metadata request may name at most.
const TOPICS_MAX: usize = 10_000;

pub async fn handle(context: &Context, request: MetadataRequest, version: i16) -> MetadataResponse {
    let mut cluster = context.service.metadata().await;
    let brokers: BTreeMap<NodeId, (String, u16)> = context
        .service
        .kafka_brokers()
        .into_iter()
        .filter_map(|(node, advertised)| Some((node, split_host_port(&advertised)?)))
        .collect();
    let wanted: Option<Vec<String>> = match request.topics {
        // Version 0 asks for every topic with an empty list; later ones with none.
        Some(topics) if !(version == 0 && topics.is_empty()) => Some(
            topics
                .into_iter()
                .filter_map(|t| t.name.map(|n| n.0.to_string()))
                .take(TOPICS_MAX)
                .collect(),
        ),
        _ => None,
    };
    let missing = |cluster: &ClusterMetadata| {
        let names = wanted.as_deref().unwrap_or_default();
        names.iter().any(|n| !cluster.topics.iter().any(|t| &t.name == n))
    };
    // A topic this node does not know yet may be one it has not applied:
    // catch up with the controller before saying it does not exist (when
    // that fails, the answer below is retriable for clients anyway).
    if missing(&cluster) && context.service.catch_up().await.is_ok() {
        cluster = context.service.metadata().await;
    }
    let mut topics = Vec::new();
    match wanted {
        None => {
            for info in &cluster.topics {
                topics.push(topic(context, info, &brokers).await);
            }
        }
        Some(names) => {
            for name in names {
                match cluster.topics.iter().find(|t| t.name == name) {
                    Some(info) => topics.push(topic(context, info, &brokers).await),
                    None => topics.push(
                        MetadataResponseTopic::default()
                            .with_name(Some(topic_name(&name)))
                            .with_error_code(ResponseError::UnknownTopicOrPartition.code()),
                    ),
                }
            }
        }
    }
    let controller = cluster.controller_leader.filter(|c| brokers.contains_key(c));
    MetadataResponse::default()
        .with_brokers(
            brokers
                .iter()
                .map(|(node, (host, port))| broker(*node, host, *port))
                .collect(),
        )
        .with_cluster_id(Some(str_bytes(CLUSTER_ID)))
        .with_controller_id(BrokerId(controller.map_or(-1, |c| c.0 as i32)))
        .with_topics(topics)
}

fn broker(node: NodeId, host: &str, port: u16) -> MetadataResponseBroker {
    MetadataResponseBroker::default()
        .with_node_id(BrokerId(node.0 as i32))
        .with_host(str_bytes(host))
        .with_port(i32::from(port))
}

async fn topic(
    context: &Context,
    info: &TopicInfo,
    brokers: &BTreeMap<NodeId, (String, u16)>,
) -> MetadataResponseTopic {
    let mut partitions = Vec::with_capacity(info.partitions.len());
    for p in &info.partitions {
        let leader = match p.leader {
            Some(leader) => Some(leader),
            None => context
                .service
                .partition_leader(&info.name, p.partition)
                .await
                .ok()
                .flatten(),
        };
        let leader = leader.filter(|l| brokers.contains_key(l));
        let ids = |nodes: &[NodeId]| nodes.iter().map(|n| BrokerId(n.0 as i32)).collect::<Vec<_>>();
        let isr = if p.voters.is_empty() { &p.replicas } else { &p.voters };
        let error = match leader {
            Some(_) => 0,
            None => ResponseError::LeaderNotAvailable.code(),
        };
        partitions.push(
            MetadataResponsePartition::default()
                .with_error_code(error)
                .with_partition_index(p.partition as i32)
                .with_leader_id(BrokerId(leader.map_or(-1, |l| l.0 as i32)))
                .with_leader_epoch(-1)
                .with_replica_nodes(ids(&p.replicas))
                .with_isr_nodes(ids(isr)),
        );
    }
    MetadataResponseTopic::default()
        .with_name(Some(topic_name(&info.name)))
        .with_is_internal(info.name.starts_with("__"))
        .with_partitions(partitions)
}

/// `host:port` (an IPv6 host in brackets) as host and port.
pub fn split_host_port(advertised: &str) -> Option<(String, u16)> {
    let (host, port) = advertised.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_string(), port.parse().ok()?))
}
