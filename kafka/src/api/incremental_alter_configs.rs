//! IncrementalAlterConfigs: a topic's settings changed one by one (SET, or
//! DELETE back to the default), all of a resource's changes or none.
//! Runnel's topic settings are single values, so APPEND and SUBTRACT are
//! refused; nodes take their settings from flags and a config file, so a
//! broker resource is refused too.

use kafka_protocol::messages::incremental_alter_configs_request::AlterConfigsResource;
use kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse;
use kafka_protocol::messages::{IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse};
use kafka_protocol::ResponseError;
use runnel_actors::metadata::TopicSetting;

use super::alter_configs::{default_setting, outcome, topic_resource};
use super::create_topics::topic_setting;
use super::Context;
use crate::errors::KafkaError;

/// Resources one request may change at most.
const RESOURCES_MAX: usize = 1000;
const SET: i8 = 0;
const DELETE: i8 = 1;

pub async fn handle(
    context: &Context,
    request: IncrementalAlterConfigsRequest,
    _version: i16,
) -> IncrementalAlterConfigsResponse {
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
    IncrementalAlterConfigsResponse::default().with_responses(responses)
}

/// The Runnel settings a resource's changes ask for.
async fn settings(context: &Context, resource: &AlterConfigsResource) -> Result<Vec<TopicSetting>, KafkaError> {
    topic_resource(resource.resource_type)?;
    let mut settings = Vec::with_capacity(resource.configs.len());
    for config in &resource.configs {
        let name = config.name.as_str();
        let setting = match config.config_operation {
            SET => topic_setting(name, config.value.as_ref().map(|v| v.as_str()))?,
            DELETE => {
                let topic = context.service.describe_topic(resource.resource_name.as_str()).await?;
                default_setting(name, &topic.config)?
            }
            op => {
                return Err(KafkaError::new(
                    ResponseError::InvalidConfig,
                    format!(
                        "{name}: operation {op} (APPEND/SUBTRACT) applies to list settings; Runnel's are single values"
                    ),
                ))
            }
        };
        settings.extend(setting);
    }
    Ok(settings)
}
