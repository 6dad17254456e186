//! DescribeConfigs: a topic's settings (the ones Runnel has, under Kafka's
//! names) and, for a broker, none (Runnel nodes take their settings from
//! flags and a config file, not from the Kafka admin API).

use kafka_protocol::messages::describe_configs_response::{DescribeConfigsResourceResult, DescribeConfigsResult};
use kafka_protocol::messages::{DescribeConfigsRequest, DescribeConfigsResponse};
use kafka_protocol::ResponseError;
use runnel_actors::metadata::TopicConfig;

use super::{str_bytes, Context};
use crate::errors::KafkaError;

const TOPIC: i8 = 2;
const BROKER: i8 = 4;
/// Kafka's config sources and types.
const SOURCE_TOPIC: i8 = 1;
const TYPE_STRING: i8 = 2;
const TYPE_INT: i8 = 3;
const TYPE_LONG: i8 = 5;
/// Resources one request may name at most.
const RESOURCES_MAX: usize = 1000;

pub async fn handle(context: &Context, request: DescribeConfigsRequest, _version: i16) -> DescribeConfigsResponse {
    // Read your writes: a client that altered a topic through another
    // node sees the change here too (else this node's metadata may lag the
    // controller's by a moment). Unreachable, it answers from what it has.
    if let Err(e) = context.service.catch_up().await {
        tracing::debug!(error = %e, "describing configs from this node's metadata as it is");
    }
    let mut results = Vec::new();
    for resource in request.resources.iter().take(RESOURCES_MAX) {
        let result = DescribeConfigsResult::default()
            .with_resource_type(resource.resource_type)
            .with_resource_name(resource.resource_name.clone());
        let configs = match resource.resource_type {
            TOPIC => topic_configs(context, resource.resource_name.as_str()).await,
            BROKER => Ok(Vec::new()),
            other => Err(KafkaError::new(
                ResponseError::InvalidRequest,
                format!("resource type {other}: only topics (2) and brokers (4) are described"),
            )),
        };
        let wanted = resource.configuration_keys.as_ref();
        results.push(match configs {
            Ok(configs) => result.with_configs(
                configs
                    .into_iter()
                    .filter(|c| wanted.is_none_or(|keys| keys.contains(&c.name)))
                    .collect(),
            ),
            Err(e) => result
                .with_error_code(e.code())
                .with_error_message(Some(str_bytes(&e.message))),
        });
    }
    DescribeConfigsResponse::default().with_results(results)
}

async fn topic_configs(context: &Context, topic: &str) -> Result<Vec<DescribeConfigsResourceResult>, KafkaError> {
    let info = context.service.describe_topic(topic).await?;
    Ok(settings(&info.config)
        .into_iter()
        .map(|(name, value, kind)| {
            DescribeConfigsResourceResult::default()
                .with_name(str_bytes(name))
                .with_value(Some(str_bytes(&value)))
                .with_read_only(false)
                .with_config_source(SOURCE_TOPIC)
                .with_config_type(kind)
        })
        .collect())
}

/// A topic's settings under Kafka's names: (name, value, Kafka type).
pub(crate) fn settings(config: &TopicConfig) -> Vec<(&'static str, String, i8)> {
    vec![
        ("cleanup.policy", config.cleanup.as_str().to_string(), TYPE_STRING),
        ("delete.retention.ms", config.delete_retention_ms.to_string(), TYPE_LONG),
        (
            "min.compaction.lag.ms",
            config.min_compaction_lag_ms.to_string(),
            TYPE_LONG,
        ),
        ("min.insync.replicas", config.min_insync.to_string(), TYPE_INT),
        (
            "retention.ms",
            config.retention_ms.map_or("-1".to_string(), |ms| ms.to_string()),
            TYPE_LONG,
        ),
    ]
}
