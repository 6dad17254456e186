//! `heal`, `replace_failed`, `failed_to_report`.

use super::*;

fn dead(node: u32, since_ms: u64) -> MemberView {
    MemberView {
        node: NodeId(node),
        liveness: Liveness::Dead { since_ms },
    }
}

#[test]
fn a_node_dead_longer_than_the_grace_loses_its_replicas_to_a_live_node() {
    let mut core = core_of(1);
    with_topic(&mut core);
    let mut members = alive(&[1, 2, 4]);
    members.push(dead(3, 10_000));
    assert!(core.heal(10_999, &members).is_empty(), "within the grace");
    assert_eq!(
        core.heal(11_000, &members),
        vec![MetadataCommand::ReplaceReplica {
            topic: "t".to_string(),
            partition: 0,
            dead: NodeId(3),
            replacement: NodeId(4),
        }]
    );
}

#[test]
fn suspects_are_neither_healed_nor_chosen() {
    let mut core = core_of(1);
    with_topic(&mut core);
    let mut members = alive(&[1, 2]);
    members.push(dead(3, 0));
    members.push(MemberView {
        node: NodeId(4),
        liveness: Liveness::Suspect,
    });
    assert!(
        core.heal(60_000, &members).is_empty(),
        "no live node outside the partition"
    );
}

#[test]
fn a_failed_replica_moves_to_the_least_loaded_node_outside_its_partition() {
    let mut core = core_of(1);
    with_topic(&mut core);
    assert_eq!(
        core.replace_failed(GROUP_0, NodeId(2), &ids(&[1, 2, 3, 4, 5])),
        Some(MetadataCommand::ReplaceReplica {
            topic: "t".to_string(),
            partition: 0,
            dead: NodeId(2),
            replacement: NodeId(4),
        })
    );
    assert_eq!(
        core.replace_failed(GROUP_0, NodeId(5), &ids(&[1, 2, 3, 4])),
        None,
        "not a replica of it"
    );
    assert_eq!(
        core.replace_failed(GROUP_0, NodeId(2), &ids(&[1, 2, 3])),
        None,
        "nowhere to go"
    );
}

#[test]
fn only_hosted_partition_replicas_are_reported_failed() {
    let mut core = core_of(1);
    with_topic(&mut core);
    core.on_hosted(GROUP_0);
    assert_eq!(
        core.failed_to_report(&[GroupId(0), GROUP_0, GroupId(99)]),
        vec![GROUP_0]
    );
}

#[test]
fn with_every_member_alive_tasks_spread_out_one_move_a_heal() {
    let mut core = core_of(1);
    // Node 1 was down: its tasks went to nodes 2 and 3.
    let dataflow = dataflow_d(2, 3, ids(&[2, 3, 2, 3, 2, 3]));
    apply(&mut core, MetadataCommand::StartDataflow { dataflow });
    let mut members = alive(&[1, 2, 3]);
    members[0].liveness = Liveness::Suspect;
    assert!(core.heal(0, &members).is_empty(), "not while a node is suspect");
    let members = alive(&[1, 2, 3]);
    let mut moves = 0;
    while let Some(command) = core.heal(0, &members).pop() {
        let MetadataCommand::MoveDataflowTask { replacement, .. } = &command else {
            panic!("{command:?}");
        };
        assert_eq!(*replacement, NodeId(1), "to the node running the fewest");
        apply(&mut core, command);
        moves += 1;
        assert!(moves <= 2, "balanced after two moves");
    }
    let load = core.meta().metadata.task_load();
    assert_eq!(load.values().copied().collect::<Vec<_>>(), [2, 2, 2], "{load:?}");
}
