//! Repairing a damaged replica: [`ControllerCore::on_damaged_status`] on
//! the damaged node, [`ControllerCore::voters_without_damaged`] on the
//! group's leader.

use super::*;
use crate::controller::core::RepairStep;
use crate::metadata::CONTROLLER_GROUP;

#[test]
fn a_damaged_replica_waits_for_a_leader_elsewhere_asks_to_be_removed_then_is_quarantined() {
    let mut core = core_of(3);
    with_topic(&mut core);
    assert_eq!(core.damaged_to_repair(&[GROUP_0]), vec![(GROUP_0, ids(&[1, 2]))]);
    assert_eq!(
        core.on_damaged_status(GROUP_0, None),
        RepairStep::Keep,
        "no leader elsewhere: the files may be the last copy"
    );
    let counted = view(&[1, 2, 3], &[]);
    assert_eq!(
        core.on_damaged_status(GROUP_0, Some((NodeId(1), &counted))),
        RepairStep::AskRemoval { leader: NodeId(1) }
    );
    let learner = view(&[1, 2], &[3]);
    assert_eq!(
        core.on_damaged_status(GROUP_0, Some((NodeId(1), &learner))),
        RepairStep::AskRemoval { leader: NodeId(1) },
        "a learner too: the leader's record of what it held goes first"
    );
    let removed = view(&[1, 2], &[]);
    assert_eq!(
        core.on_damaged_status(GROUP_0, Some((NodeId(1), &removed))),
        RepairStep::Quarantine
    );
    assert_eq!(
        core.on_damaged_status(GROUP_0, Some((NodeId(3), &counted))),
        RepairStep::Keep,
        "a damaged replica never counts as the leader that confirms"
    );
}

#[test]
fn the_controller_group_and_unassigned_groups_are_not_repaired_here() {
    let mut core = core_of(3);
    with_topic(&mut core);
    assert!(core.damaged_to_repair(&[CONTROLLER_GROUP]).is_empty());
    let counted = view(&[1, 2, 3], &[]);
    assert_eq!(
        core.on_damaged_status(CONTROLLER_GROUP, Some((NodeId(1), &counted))),
        RepairStep::Keep
    );
    let mut elsewhere = core_of(4);
    with_topic(&mut elsewhere);
    assert!(
        elsewhere.damaged_to_repair(&[GROUP_0]).is_empty(),
        "node 4 holds no replica"
    );
}

#[test]
fn only_the_leader_removes_a_damaged_voter_or_learner_and_never_itself() {
    let mut leader = core_of(1);
    let voters = view(&[1, 2, 3], &[]);
    assert_eq!(
        leader.voters_without_damaged(GROUP_0, Some(NodeId(1)), &voters, NodeId(3), 0),
        Ok(Some(ids(&[1, 2])))
    );
    assert_eq!(
        leader.voters_without_damaged(GROUP_0, Some(NodeId(1)), &view(&[1, 2], &[3]), NodeId(3), 0),
        Ok(Some(ids(&[1, 2]))),
        "a learner is removed by moving to the voters without it"
    );
    assert_eq!(
        leader.voters_without_damaged(GROUP_0, Some(NodeId(1)), &view(&[1, 2], &[]), NodeId(3), 0),
        Ok(None),
        "already removed: nothing to do"
    );
    assert_eq!(
        leader.voters_without_damaged(GROUP_0, Some(NodeId(1)), &voters, NodeId(1), 0),
        Err(Some(NodeId(1)))
    );
    let mut follower = core_of(2);
    assert_eq!(
        follower.voters_without_damaged(GROUP_0, Some(NodeId(1)), &voters, NodeId(3), 0),
        Err(Some(NodeId(1))),
        "a follower names the leader to ask"
    );
    assert_eq!(
        follower.voters_without_damaged(GROUP_0, None, &voters, NodeId(3), 0),
        Err(None)
    );
}

#[test]
fn a_node_removed_for_damage_is_left_out_of_settling_for_a_while() {
    let mut leader = core_of(1);
    with_topic(&mut leader);
    leader.on_hosted(GROUP_0);
    let removed = leader.voters_without_damaged(GROUP_0, Some(NodeId(1)), &view(&[1, 2, 3], &[]), NodeId(3), 1_000);
    assert_eq!(removed, Ok(Some(ids(&[1, 2]))));
    assert_eq!(
        leader.settle_targets(1_000),
        vec![(GROUP_0, ids(&[1, 2]))],
        "not added back before the damaged node moved its files aside"
    );
    let later_ms = 1_000 + crate::controller::core::DAMAGED_HOLD_HEALS * 500;
    assert_eq!(leader.settle_targets(later_ms), vec![(GROUP_0, ids(&[1, 2, 3]))]);
}
