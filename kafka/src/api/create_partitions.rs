//! CreatePartitions: a topic grown to `count` partitions in all through the
//! controller, which places the new replicas. Manual assignments are
//! refused: Runnel places replicas itself. `validate_only` checks the
//! request against the topic as it is and changes nothing.

use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::{CreatePartitionsRequest, CreatePartitionsResponse};
use kafka_protocol::ResponseError;
use runnel_actors::metadata::PARTITIONS_MAX;

use super::{str_bytes, Context};
use crate::errors::KafkaError;

/// Topics one request may grow at most.
const TOPICS_MAX: usize = 1000;

pub async fn handle(context: &Context, request: CreatePartitionsRequest, _version: i16) -> CreatePartitionsResponse {
    let mut results = Vec::with_capacity(request.topics.len().min(TOPICS_MAX));
    for topic in request.topics.into_iter().take(TOPICS_MAX) {
        let result = CreatePartitionsTopicResult::default().with_name(topic.name.clone());
        results.push(match grow(context, &topic, request.validate_only).await {
            Ok(()) => result,
            Err(e) => result
                .with_error_code(e.code())
                .with_error_message(Some(str_bytes(&e.message))),
        });
    }
    CreatePartitionsResponse::default().with_results(results)
}

async fn grow(context: &Context, topic: &CreatePartitionsTopic, validate_only: bool) -> Result<(), KafkaError> {
    if topic.assignments.is_some() {
        return Err(KafkaError::new(
            ResponseError::InvalidReplicaAssignment,
            "manual replica assignments are not supported: Runnel places replicas itself",
        ));
    }
    let name = topic.name.0.to_string();
    let count = u32::try_from(topic.count)
        .ok()
        .filter(|c| (1..=PARTITIONS_MAX).contains(c))
        .ok_or_else(|| {
            KafkaError::new(
                ResponseError::InvalidPartitions,
                format!("{} partitions: the count must be in [1, {PARTITIONS_MAX}]", topic.count),
            )
        })?;
    // Checked here too so that Kafka's own error code names the problem
    // (the controller's refusal would be INVALID_CONFIG).
    let have = context.service.describe_topic(&name).await?.config.partitions;
    if count <= have {
        return Err(KafkaError::new(
            ResponseError::InvalidPartitions,
            format!("topic {name:?} has {have} partitions; partitions can only be added"),
        ));
    }
    if validate_only {
        return Ok(());
    }
    Ok(context.service.add_partitions(name, count).await?)
}
