//! ListGroups: the groups this node coordinates (Kafka clients ask every
//! node and merge the answers), filtered by state from v4.

use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::{GroupId, ListGroupsRequest, ListGroupsResponse};

use super::{str_bytes, Context};

pub async fn handle(context: &Context, request: ListGroupsRequest, _version: i16) -> ListGroupsResponse {
    let wanted: Vec<String> = request.states_filter.iter().map(|s| s.to_lowercase()).collect();
    let groups = context
        .service
        .list_groups()
        .into_iter()
        .filter(|(_, _, state)| wanted.is_empty() || wanted.contains(&state.to_lowercase()))
        .map(|(group, protocol_type, state)| {
            ListedGroup::default()
                .with_group_id(GroupId(str_bytes(&group)))
                .with_protocol_type(str_bytes(&protocol_type))
                .with_group_state(str_bytes(state))
        })
        .collect();
    ListGroupsResponse::default().with_groups(groups)
}
