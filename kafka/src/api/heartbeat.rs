//! Heartbeat: keeps a member alive; answered `REBALANCE_IN_PROGRESS` when it
//! must rejoin, `ILLEGAL_GENERATION` or `UNKNOWN_MEMBER_ID` when fenced.

use kafka_protocol::messages::{HeartbeatRequest, HeartbeatResponse};

use super::Context;
use crate::errors::group_result_code;

pub async fn handle(context: &Context, request: HeartbeatRequest, _version: i16) -> HeartbeatResponse {
    let group = request.group_id.0.as_str();
    let instance = request.group_instance_id.as_deref();
    let result = match context
        .service
        .check_instance(group, instance, &request.member_id)
        .await
    {
        Ok(()) => {
            context
                .service
                .heartbeat(group, request.generation_id, request.member_id.as_str())
                .await
        }
        Err(e) => Err(e),
    };
    HeartbeatResponse::default().with_error_code(group_result_code(&result))
}
