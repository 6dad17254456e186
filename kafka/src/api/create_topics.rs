//! CreateTopics: topics made through the controller, with Runnel's
//! placement. `num_partitions` and `replication_factor` of -1 take the
//! defaults (1 partition; 3 replicas, or fewer on a smaller cluster).
//! Settings Runnel has are taken from `configs` (`retention.ms`,
//! `min.insync.replicas`, `cleanup.policy`, `delete.retention.ms`,
//! `min.compaction.lag.ms`); any other is refused by
//! name rather than silently ignored. Manual replica assignments are
//! refused: Runnel places replicas itself.

use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::{CreateTopicsRequest, CreateTopicsResponse};
use kafka_protocol::ResponseError;
use runnel_actors::metadata::{CleanupPolicy, TopicConfig, TopicSetting};

use super::{str_bytes, Context};
use crate::errors::KafkaError;

/// Topics one request may create at most.
const TOPICS_MAX: usize = 1000;
const DEFAULT_REPLICATION: u16 = 3;

pub async fn handle(context: &Context, request: CreateTopicsRequest, _version: i16) -> CreateTopicsResponse {
    let live = context.service.alive_nodes().len().max(1);
    let mut topics = Vec::with_capacity(request.topics.len());
    for topic in request.topics.into_iter().take(TOPICS_MAX) {
        let result = CreatableTopicResult::default().with_name(topic.name.clone());
        let created = match topic_config(&topic, live) {
            Ok(config) if request.validate_only => config
                .validate()
                .map(|()| config)
                .map_err(|e| KafkaError::new(ResponseError::InvalidConfig, e.to_string())),
            Ok(config) => context
                .service
                .create_topic(topic.name.0.to_string(), config.clone())
                .await
                .map(|()| config)
                .map_err(KafkaError::from),
            Err(e) => Err(e),
        };
        topics.push(match created {
            Ok(config) => result
                .with_num_partitions(config.partitions as i32)
                .with_replication_factor(config.replication as i16),
            Err(e) => result
                .with_error_code(e.code())
                .with_error_message(Some(str_bytes(&e.message)))
                .with_num_partitions(-1)
                .with_replication_factor(-1),
        });
    }
    CreateTopicsResponse::default().with_topics(topics)
}

/// The Runnel settings a Kafka topic request asks for.
pub fn topic_config(topic: &CreatableTopic, live_nodes: usize) -> Result<TopicConfig, KafkaError> {
    if !topic.assignments.is_empty() {
        return Err(KafkaError::new(
            ResponseError::InvalidReplicaAssignment,
            "manual replica assignments are not supported: Runnel places replicas itself",
        ));
    }
    let partitions = match topic.num_partitions {
        -1 => 1,
        n if n > 0 => n as u32,
        n => {
            return Err(KafkaError::new(
                ResponseError::InvalidPartitions,
                format!("{n} partitions"),
            ))
        }
    };
    let replication = match topic.replication_factor {
        -1 => DEFAULT_REPLICATION.min(live_nodes as u16),
        n if n > 0 => n as u16,
        n => {
            return Err(KafkaError::new(
                ResponseError::InvalidReplicationFactor,
                format!("replication factor {n}"),
            ))
        }
    };
    let mut config = TopicConfig::new(partitions, replication);
    for setting in &topic.configs {
        apply_setting(
            &mut config,
            setting.name.as_str(),
            setting.value.as_ref().map(|v| v.as_str()),
        )?;
    }
    Ok(config)
}

fn apply_setting(config: &mut TopicConfig, name: &str, value: Option<&str>) -> Result<(), KafkaError> {
    if let Some(setting) = topic_setting(name, value)? {
        setting.apply_to(config);
    }
    Ok(())
}

/// A Kafka topic setting as Runnel's; any setting Runnel lacks is refused
/// by name.
pub(crate) fn topic_setting(name: &str, value: Option<&str>) -> Result<Option<TopicSetting>, KafkaError> {
    let invalid = |why: &str| KafkaError::new(ResponseError::InvalidConfig, format!("{name}={value:?}: {why}"));
    let value = value.ok_or_else(|| invalid("no value"))?;
    Ok(match name {
        "retention.ms" => {
            let ms: i64 = value.parse().map_err(|_| invalid("not a number"))?;
            Some(TopicSetting::RetentionMs(u64::try_from(ms).ok()))
        }
        "min.insync.replicas" => Some(TopicSetting::MinInsync(
            value.parse().map_err(|_| invalid("not a number"))?,
        )),
        "cleanup.policy" => Some(TopicSetting::Cleanup(
            CleanupPolicy::parse(value).map_err(|e| invalid(e.as_str()))?,
        )),
        "delete.retention.ms" => Some(TopicSetting::DeleteRetentionMs(
            value.parse().map_err(|_| invalid("not a whole number of ms"))?,
        )),
        "min.compaction.lag.ms" => Some(TopicSetting::MinCompactionLagMs(
            value.parse().map_err(|_| invalid("not a whole number of ms"))?,
        )),
        _ => return Err(invalid(
            "not a setting Runnel has (it has retention.ms, min.insync.replicas, cleanup.policy, delete.retention.ms, min.compaction.lag.ms)",
        )),
    })
}
