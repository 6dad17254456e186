//! JoinGroup: a member joins (or rejoins) its group; the answer comes when
//! the rebalance completes, naming the generation, the chosen protocol and
//! the leader (which alone gets every member's metadata). A static member
//! (`group.instance.id`, v5+) that restarts takes its place back without a
//! rebalance while the group is stable (see `GroupsCore`).
//!
//! From version 4 a new member without a static instance is first answered
//! MEMBER_ID_REQUIRED with its member id, and admitted when it joins again
//! with it (KIP-394): a join its client gave up on leaves no member behind.

use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::{JoinGroupRequest, JoinGroupResponse};
use kafka_protocol::ResponseError;
use runnel_actors::groups::core::Join;

use super::{str_bytes, Context};
use crate::errors::group_result_code;

pub async fn handle(context: &Context, request: JoinGroupRequest, version: i16) -> JoinGroupResponse {
    // Version 0 has no rebalance timeout: it is the session timeout.
    let rebalance_timeout_ms = match version {
        0 => request.session_timeout_ms,
        _ => request.rebalance_timeout_ms,
    };
    let join = Join {
        group: request.group_id.0.to_string(),
        member_id: request.member_id.to_string(),
        client_id: context.client_id.clone(),
        client_host: context.peer.map(|p| format!("/{}", p.ip())).unwrap_or_default(),
        protocol_type: request.protocol_type.to_string(),
        protocols: request
            .protocols
            .into_iter()
            .map(|p| (p.name.to_string(), p.metadata))
            .collect(),
        session_timeout_ms: request.session_timeout_ms.max(0) as u64,
        rebalance_timeout_ms: rebalance_timeout_ms.max(0) as u64,
        instance_id: request.group_instance_id.as_ref().map(|i| i.to_string()),
    };
    if version >= 4 && join.member_id.is_empty() && join.instance_id.is_none() {
        return member_id_required(context, &join).await;
    }
    let result = context.service.join_group(join).await;
    let code = group_result_code(&result);
    match result {
        Ok(joined) => JoinGroupResponse::default()
            .with_generation_id(joined.generation)
            .with_protocol_type(Some(str_bytes(&joined.protocol_type)))
            .with_protocol_name(Some(str_bytes(&joined.protocol)))
            .with_leader(str_bytes(&joined.leader))
            .with_member_id(str_bytes(&joined.member_id))
            .with_members(
                joined
                    .members
                    .into_iter()
                    .map(|(id, metadata)| {
                        JoinGroupResponseMember::default()
                            .with_member_id(str_bytes(&id))
                            .with_metadata(metadata)
                    })
                    .collect(),
            ),
        Err(_) => JoinGroupResponse::default()
            .with_error_code(code)
            .with_generation_id(-1)
            .with_member_id(request.member_id),
    }
}

/// The answer to a new member's first JoinGroup (v4+): its member id, with
/// MEMBER_ID_REQUIRED, or why none is given.
async fn member_id_required(context: &Context, join: &Join) -> JoinGroupResponse {
    let result = context.service.member_id_for(join).await;
    let (code, member_id) = match &result {
        Ok(member_id) => (ResponseError::MemberIdRequired.code(), member_id.as_str()),
        Err(_) => (group_result_code(&result), ""),
    };
    JoinGroupResponse::default()
        .with_error_code(code)
        .with_generation_id(-1)
        .with_member_id(str_bytes(member_id))
}
