//! SyncGroup: the leader sends the assignment; every member gets its share
//! once the leader's has arrived.

use kafka_protocol::messages::{SyncGroupRequest, SyncGroupResponse};

use super::{str_bytes, Context};
use crate::errors::group_result_code;

pub async fn handle(context: &Context, request: SyncGroupRequest, _version: i16) -> SyncGroupResponse {
    let assignments = request
        .assignments
        .into_iter()
        .map(|a| (a.member_id.to_string(), a.assignment))
        .collect();
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
                .sync_group(group, request.generation_id, request.member_id.as_str(), assignments)
                .await
        }
        Err(e) => Err(e),
    };
    let code = group_result_code(&result);
    match result {
        Ok(synced) => SyncGroupResponse::default()
            .with_protocol_type(Some(str_bytes(&synced.protocol_type)))
            .with_protocol_name(Some(str_bytes(&synced.protocol)))
            .with_assignment(synced.assignment),
        Err(_) => SyncGroupResponse::default().with_error_code(code),
    }
}
