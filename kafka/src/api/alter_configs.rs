//! AlterConfigs: a topic's settings replaced as a whole, as Kafka means it:
//! a setting the request leaves out goes back to its default. All of a
//! resource's settings change or none; a broker resource is refused (nodes
//! take their settings from flags and a config file).

use kafka_protocol::messages::alter_configs_request::AlterConfigsResource;
use kafka_protocol::messages::alter_configs_response::AlterConfigsResourceResponse;
use kafka_protocol::messages::{AlterConfigsRequest, AlterConfigsResponse};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;
use runnel_actors::metadata::{TopicConfig, TopicSetting};

use super::create_topics::topic_setting;
use super::{str_bytes, Context};
use crate::errors::KafkaError;

/// Kafka's resource type of a topic.
const TOPIC: i8 = 2;
/// Resources one request may change at most.
const RESOURCES_MAX: usize = 1000;
/// The topic settings Runnel keeps, by their Kafka names.
const SETTINGS: [&str; 5] = [
    "cleanup.policy",
    "delete.retention.ms",
    "min.compaction.lag.ms",
    "min.insync.replicas",
    "retention.ms",
];

pub async fn handle(context: &Context, request: AlterConfigsRequest, _version: i16) -> AlterConfigsResponse {
    let mut responses = Vec::with_capacity(request.resources.len().min(RESOURCES_MAX));
    for resource in request.resources.iter().take(RESOURCES_MAX) {
        let name = resource.resource_name.as_str();
        let (code, message) = outcome(context, name, settings(context, resource).await, request.validate_only).await;
        responses.push(
            AlterConfigsResourceResponse::default()
                .with_resource_type(resource.resource_type)
                .with_resource_name(resource.resource_name.clone())
                .with_error_code(code)
                .with_error_message(message),
        );
    }
    AlterConfigsResponse::default().with_responses(responses)
}

/// Changes topic `name` to `settings` (as the request's resource gave
/// them): the error code and message of its answer (0 and none: changed).
pub(crate) async fn outcome(
    context: &Context,
    name: &str,
    settings: Result<Vec<TopicSetting>, KafkaError>,
    validate_only: bool,
) -> (i16, Option<StrBytes>) {
    let changed = match settings {
        Ok(settings) => alter(context, name, settings, validate_only).await,
        Err(e) => Err(e),
    };
    match changed {
        Ok(()) => (0, None),
        Err(e) => (e.code(), Some(str_bytes(&e.message))),
    }
}

/// Only topics are altered: nodes take their settings from flags and a
/// config file.
pub(crate) fn topic_resource(resource_type: i8) -> Result<(), KafkaError> {
    match resource_type {
        TOPIC => Ok(()),
        other => Err(KafkaError::new(
            ResponseError::InvalidRequest,
            format!("resource type {other}: only topics (2) are altered; nodes take their settings from flags and a config file"),
        )),
    }
}

/// Every setting of the topic: the request's value, else the default.
async fn settings(context: &Context, resource: &AlterConfigsResource) -> Result<Vec<TopicSetting>, KafkaError> {
    topic_resource(resource.resource_type)?;
    let topic = context.service.describe_topic(resource.resource_name.as_str()).await?;
    let mut settings = Vec::with_capacity(SETTINGS.len());
    for config in &resource.configs {
        settings.extend(topic_setting(
            config.name.as_str(),
            config.value.as_ref().map(|v| v.as_str()),
        )?);
    }
    for name in SETTINGS {
        if !resource.configs.iter().any(|c| c.name.as_str() == name) {
            settings.extend(default_setting(name, &topic.config)?);
        }
    }
    Ok(settings)
}

/// The default of a setting for a topic like `config`.
pub(crate) fn default_setting(name: &str, config: &TopicConfig) -> Result<Option<TopicSetting>, KafkaError> {
    let defaults = TopicConfig::new(config.partitions, config.replication);
    Ok(match name {
        "cleanup.policy" => Some(TopicSetting::Cleanup(defaults.cleanup)),
        "delete.retention.ms" => Some(TopicSetting::DeleteRetentionMs(defaults.delete_retention_ms)),
        "min.compaction.lag.ms" => Some(TopicSetting::MinCompactionLagMs(defaults.min_compaction_lag_ms)),
        "min.insync.replicas" => Some(TopicSetting::MinInsync(defaults.min_insync)),
        "retention.ms" => Some(TopicSetting::RetentionMs(defaults.retention_ms)),
        other => {
            return Err(KafkaError::new(
                ResponseError::InvalidConfig,
                format!("{other}: not a setting Runnel has (it has {})", SETTINGS.join(", ")),
            ))
        }
    })
}

/// Commits `settings` to `topic`, or with `validate_only` checks them
/// against the topic as it is and changes nothing.
pub(crate) async fn alter(
    context: &Context,
    topic: &str,
    settings: Vec<TopicSetting>,
    validate_only: bool,
) -> Result<(), KafkaError> {
    if !validate_only {
        return Ok(context.service.alter_topic(topic.to_string(), settings).await?);
    }
    let mut config = context.service.describe_topic(topic).await?.config;
    for setting in &settings {
        setting.apply_to(&mut config);
    }
    config
        .validate()
        .map_err(|e| KafkaError::new(ResponseError::InvalidConfig, e.to_string()))
}
