//! DescribeGroups: each group's state, protocol and members with their
//! assignments (a group unknown here is `Dead`, as Kafka answers).

use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::{DescribeGroupsRequest, DescribeGroupsResponse};

use super::{str_bytes, Context};
use crate::errors::KafkaError;

/// Groups one request may describe at most.
const GROUPS_MAX: usize = 1000;

pub async fn handle(context: &Context, request: DescribeGroupsRequest, _version: i16) -> DescribeGroupsResponse {
    let mut groups = Vec::new();
    for group in request.groups.into_iter().take(GROUPS_MAX) {
        let described = DescribedGroup::default().with_group_id(group.clone());
        groups.push(match context.service.describe_group(group.0.as_str()).await {
            Ok(d) => described
                .with_group_state(str_bytes(d.state))
                .with_protocol_type(str_bytes(&d.protocol_type))
                .with_protocol_data(str_bytes(&d.protocol))
                .with_members(
                    d.members
                        .into_iter()
                        .map(|(id, client, host, assignment)| {
                            DescribedGroupMember::default()
                                .with_member_id(str_bytes(&id))
                                .with_client_id(str_bytes(&client))
                                .with_client_host(str_bytes(&host))
                                .with_member_assignment(assignment)
                        })
                        .collect(),
                ),
            Err(e) => {
                let e = KafkaError::from(e);
                described
                    .with_error_code(e.code())
                    .with_error_message(Some(str_bytes(&e.message)))
            }
        });
    }
    DescribeGroupsResponse::default().with_groups(groups)
}
