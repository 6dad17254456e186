//! `settle_targets`, `on_settle_status`, `passive_peers`.

use super::*;
use crate::controller::core::Command;

#[test]
fn every_hosted_group_is_nudged_whenever_its_voters_differ_from_its_assignment() {
    let mut core = core_of(1);
    with_topic(&mut core);
    core.on_hosted(GROUP_0);
    replace(&mut core, 3, 4);
    assert_eq!(core.settle_targets(), vec![(GROUP_0, ids(&[1, 2, 4]))]);
    assert_eq!(
        core.on_settle_status(GROUP_0, &ids(&[1, 2, 4]), &view(&[1, 2, 3], &[4])),
        Some(Command::Reconfigure {
            group: GROUP_0,
            voters: ids(&[1, 2, 4]),
        })
    );
    assert_eq!(
        core.on_settle_status(GROUP_0, &ids(&[1, 2, 4]), &view(&[4, 2, 1], &[])),
        None
    );
    assert_eq!(
        core.settle_targets(),
        vec![(GROUP_0, ids(&[1, 2, 4]))],
        "looked at again next time: another leader's change may unsettle it"
    );
    assert!(
        core.on_settle_status(GROUP_0, &ids(&[1, 2, 4]), &view(&[4, 2, 1], &[5]))
            .is_some(),
        "a learner left over by an earlier leader (seed 6)"
    );
}

#[test]
fn an_unassigned_member_moves_its_group_towards_the_assignment_until_it_stops() {
    let mut core = core_of(3);
    with_topic(&mut core);
    core.on_hosted(GROUP_0);
    replace(&mut core, 3, 4);
    assert_eq!(core.on_unassigned(GROUP_0, true), None);
    assert_eq!(core.settle_targets(), vec![(GROUP_0, ids(&[1, 2, 4]))]);
    core.on_unassigned(GROUP_0, false);
    assert!(core.settle_targets().is_empty());
}

#[test]
fn a_passive_replica_asks_its_group_and_its_assigned_nodes_but_not_itself() {
    let mut core = core_of(2);
    with_topic(&mut core);
    replace(&mut core, 3, 4);
    assert_eq!(core.passive_peers(GROUP_0, &view(&[1, 2, 3], &[5])), ids(&[1, 3, 4, 5]));
}
