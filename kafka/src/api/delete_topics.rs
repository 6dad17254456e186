//! DeleteTopics: each named topic deleted through the controller.

use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::{DeleteTopicsRequest, DeleteTopicsResponse};

use super::{str_bytes, Context};
use crate::errors::KafkaError;

/// Topics one request may delete at most.
const TOPICS_MAX: usize = 1000;

pub async fn handle(context: &Context, request: DeleteTopicsRequest, _version: i16) -> DeleteTopicsResponse {
    let mut responses = Vec::with_capacity(request.topic_names.len());
    for name in request.topic_names.into_iter().take(TOPICS_MAX) {
        let result = DeletableTopicResult::default().with_name(Some(name.clone()));
        responses.push(match context.service.delete_topic(name.0.to_string()).await {
            Ok(()) => result,
            Err(e) => {
                let e = KafkaError::from(e);
                result
                    .with_error_code(e.code())
                    .with_error_message(Some(str_bytes(&e.message)))
            }
        });
    }
    DeleteTopicsResponse::default().with_responses(responses)
}
