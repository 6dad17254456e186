//! FindCoordinator: the node coordinating a consumer group (the leader of
//! the group's offsets partition), one key (v0–3) or a batch (v4). The
//! offsets topic is made on first use. Transaction coordinators are refused:
//! Runnel has no Kafka transactions.

use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::{BrokerId, FindCoordinatorRequest, FindCoordinatorResponse};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;

use super::metadata::split_host_port;
use super::{str_bytes, Context};
use crate::errors::KafkaError;

/// Keys one batched request may name at most.
const KEYS_MAX: usize = 1000;
const GROUP_KEY: i8 = 0;

pub async fn handle(context: &Context, request: FindCoordinatorRequest, version: i16) -> FindCoordinatorResponse {
    if version >= 4 {
        let mut coordinators = Vec::new();
        for key in request.coordinator_keys.iter().take(KEYS_MAX) {
            let found = find(context, key, request.key_type).await;
            let coordinator = Coordinator::default().with_key(key.clone());
            coordinators.push(match found {
                Ok((node, host, port)) => coordinator
                    .with_node_id(node)
                    .with_host(str_bytes(&host))
                    .with_port(port),
                Err(e) => coordinator
                    .with_node_id(BrokerId(-1))
                    .with_error_code(e.code())
                    .with_error_message(Some(str_bytes(&e.message))),
            });
        }
        return FindCoordinatorResponse::default().with_coordinators(coordinators);
    }
    match find(context, &request.key, request.key_type).await {
        Ok((node, host, port)) => FindCoordinatorResponse::default()
            .with_node_id(node)
            .with_host(str_bytes(&host))
            .with_port(port),
        Err(e) => FindCoordinatorResponse::default()
            .with_node_id(BrokerId(-1))
            .with_error_code(e.code())
            .with_error_message(Some(str_bytes(&e.message))),
    }
}

async fn find(context: &Context, key: &StrBytes, key_type: i8) -> Result<(BrokerId, String, i32), KafkaError> {
    if key_type != GROUP_KEY {
        return Err(KafkaError::new(
            ResponseError::CoordinatorNotAvailable,
            "transaction coordinators: Runnel has no Kafka transactions",
        ));
    }
    let unavailable = |why: &str| KafkaError::new(ResponseError::CoordinatorNotAvailable, why.to_string());
    let node = context
        .service
        .find_coordinator(key.as_str())
        .await?
        .ok_or_else(|| unavailable("the group's offsets partition has no leader yet"))?;
    let brokers = context.service.kafka_brokers();
    let advertised = brokers
        .iter()
        .find(|(n, _)| *n == node)
        .ok_or_else(|| unavailable("the coordinator node serves no Kafka listener"))?;
    let (host, port) = split_host_port(&advertised.1).ok_or_else(|| unavailable("bad advertised address"))?;
    Ok((BrokerId(node.0 as i32), host, i32::from(port)))
}
