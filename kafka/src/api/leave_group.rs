//! LeaveGroup: members leave at once (one member up to v2, a batch from
//! v3, where a static member may be named by its `group.instance.id`), so
//! the rest rebalance without waiting for a session timeout.

use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::{LeaveGroupRequest, LeaveGroupResponse};

use super::Context;
use crate::errors::group_result_code;

pub async fn handle(context: &Context, request: LeaveGroupRequest, version: i16) -> LeaveGroupResponse {
    let members: Vec<(String, Option<String>)> = match version {
        0..=2 => vec![(request.member_id.to_string(), None)],
        _ => request
            .members
            .iter()
            .map(|m| {
                (
                    m.member_id.to_string(),
                    m.group_instance_id.as_ref().map(|i| i.to_string()),
                )
            })
            .collect(),
    };
    let result = context.service.leave_group(request.group_id.0.as_str(), &members).await;
    let code = group_result_code(&result);
    let Ok(outcomes) = result else {
        return LeaveGroupResponse::default().with_error_code(code);
    };
    if version <= 2 {
        let code = outcomes
            .first()
            .map_or(0, |o| group_result_code(&o.map_err(Into::into)));
        return LeaveGroupResponse::default().with_error_code(code);
    }
    let responses = request
        .members
        .into_iter()
        .zip(outcomes)
        .map(|(m, outcome)| {
            MemberResponse::default()
                .with_member_id(m.member_id)
                .with_group_instance_id(m.group_instance_id)
                .with_error_code(group_result_code(&outcome.map_err(Into::into)))
        })
        .collect();
    LeaveGroupResponse::default().with_members(responses)
}
