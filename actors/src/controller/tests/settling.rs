//! `settle_targets`, `on_settle_status`, `passive_peers`.

use super::*;
use crate::controller::core::Command;

#[test]
fn a_group_is_nudged_until_it_matches_its_assignment_and_all_are_looked_at_again_every_10_s() {
    let mut core = core_of(1);
    with_topic(&mut core);
    core.on_hosted(GROUP_0);
    replace(&mut core, 3, 4);
    let assigned = ids(&[1, 2, 4]);
    assert_eq!(core.settle_targets(0), vec![(GROUP_0, assigned.clone())]);
    assert_eq!(
        core.on_settle_status(GROUP_0, &assigned, &view(&[1, 2, 3], &[4])),
        Some(Command::Reconfigure {
            group: GROUP_0,
            voters: assigned.clone(),
        })
    );
    assert_eq!(
        core.settle_targets(500),
        vec![(GROUP_0, assigned.clone())],
        "not settled yet"
    );
    assert_eq!(core.on_settle_status(GROUP_0, &assigned, &view(&[4, 2, 1], &[])), None);
    assert!(core.settle_targets(1_000).is_empty(), "seen settled: left alone");
    replace(&mut core, 4, 5);
    assert_eq!(
        core.settle_targets(1_500),
        vec![(GROUP_0, ids(&[1, 2, 5]))],
        "a new assignment is looked at at once"
    );
    core.on_settle_status(GROUP_0, &ids(&[1, 2, 5]), &view(&[1, 2, 5], &[]));
    assert!(core.settle_targets(9_999).is_empty());
    assert_eq!(
        core.settle_targets(10_000),
        vec![(GROUP_0, ids(&[1, 2, 5]))],
        "every 10 s all are looked at: an earlier leader's change may unsettle one (seed 6)"
    );
    assert!(
        core.on_settle_status(GROUP_0, &ids(&[1, 2, 5]), &view(&[1, 2, 5], &[4]))
            .is_some(),
        "a learner left over by an earlier leader"
    );
    assert_eq!(
        core.settle_targets(10_500).len(),
        1,
        "and nudged each interval until settled"
    );
}

#[test]
fn an_unassigned_member_moves_its_group_towards_the_assignment_until_it_stops() {
    let mut core = core_of(3);
    with_topic(&mut core);
    core.on_hosted(GROUP_0);
    replace(&mut core, 3, 4);
    assert_eq!(core.on_unassigned(GROUP_0, true), None);
    assert_eq!(core.settle_targets(0), vec![(GROUP_0, ids(&[1, 2, 4]))]);
    core.on_unassigned(GROUP_0, false);
    assert!(core.settle_targets(10_000).is_empty());
}

#[test]
fn a_passive_replica_asks_its_group_and_its_assigned_nodes_but_not_itself() {
    let mut core = core_of(2);
    with_topic(&mut core);
    replace(&mut core, 3, 4);
    assert_eq!(core.passive_peers(GROUP_0, &view(&[1, 2, 3], &[5])), ids(&[1, 3, 4, 5]));
}
