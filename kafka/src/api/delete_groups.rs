//! DeleteGroups: forgets groups without members and their committed
//! offsets; a group with members is refused with `NON_EMPTY_GROUP`.

use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::{DeleteGroupsRequest, DeleteGroupsResponse};

use super::Context;
use crate::errors::group_result_code;

/// Groups in one request at most (each is a round trip to its coordinator).
const GROUPS_PER_REQUEST_MAX: usize = 1_000;

pub async fn handle(context: &Context, request: DeleteGroupsRequest, _version: i16) -> DeleteGroupsResponse {
    let mut results = Vec::with_capacity(request.groups_names.len().min(GROUPS_PER_REQUEST_MAX));
    for (index, group) in request.groups_names.into_iter().enumerate() {
        let code = match index < GROUPS_PER_REQUEST_MAX {
            true => group_result_code(&context.service.delete_group(group.0.as_str()).await),
            false => kafka_protocol::ResponseError::PolicyViolation.code(),
        };
        results.push(
            DeletableGroupResult::default()
                .with_group_id(group)
                .with_error_code(code),
        );
    }
    DeleteGroupsResponse::default().with_results(results)
}
