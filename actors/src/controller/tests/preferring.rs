//! `preferred_leaders` and the `prefer` duty of `due`.

use super::*;
use crate::controller::core::{Command, PREFER_INTERVAL_MS};

/// A core on node `me` hosting partition 0 of `t` (assigned to 1, 2, 3).
fn hosting(me: u32) -> ControllerCore {
    let mut core = core_of(me);
    with_topic(&mut core);
    core.reconcile(|_| false);
    core.on_hosted(GROUP_0);
    core
}

#[test]
fn a_replica_asks_for_leadership_to_go_to_the_first_assigned_replica_while_it_lives() {
    let core = hosting(2);
    assert_eq!(
        core.preferred_leaders(&alive(&[1, 2, 3])),
        vec![Command::PreferLeader {
            group: GROUP_0,
            node: NodeId(1)
        }]
    );
    let dead_1 = [
        MemberView {
            node: NodeId(1),
            liveness: Liveness::Dead { since_ms: 0 },
        },
        alive(&[2])[0],
        alive(&[3])[0],
    ];
    assert!(core.preferred_leaders(&dead_1).is_empty(), "not to a dead node");
    assert!(
        hosting(1).preferred_leaders(&alive(&[1, 2, 3])).is_empty(),
        "the preferred replica itself"
    );
    assert!(
        core_of(2).preferred_leaders(&alive(&[1, 2, 3])).is_empty(),
        "nothing hosted here"
    );
}

#[test]
fn preferred_leaders_are_asked_for_every_prefer_interval() {
    let mut core = core_of(1);
    assert!(core.due(1_000).prefer);
    assert!(!core.due(1_000 + PREFER_INTERVAL_MS - 1).prefer);
    assert!(core.due(1_000 + PREFER_INTERVAL_MS).prefer);
}

#[test]
fn group_coordinators_keep_their_partitions() {
    let mut core = core_of(2);
    apply(
        &mut core,
        MetadataCommand::CreateTopic {
            name: runnel_client::offsets::OFFSETS_TOPIC.to_string(),
            config: TopicConfig::new(1, 3),
            assignment: vec![ids(&[1, 2, 3])],
        },
    );
    for command in core.reconcile(|_| false) {
        if let Command::Host { group, .. } = command {
            core.on_hosted(group);
        }
    }
    assert!(core.preferred_leaders(&alive(&[1, 2, 3])).is_empty());
}
