//! `on_settle_status`, `passive_peers`.

use super::*;
use crate::controller::core::Command;

#[test]
fn an_assigned_group_is_nudged_until_its_voters_match_then_left_alone() {
    let mut core = core_of(1);
    with_topic(&mut core);
    core.reconcile(|_| false);
    core.on_hosted(GROUP_0);
    replace(&mut core, 3, 4);
    core.reconcile(|_| false);
    assert_eq!(core.unsettled(), vec![GROUP_0]);
    assert_eq!(
        core.on_settle_status(GROUP_0, &view(&[1, 2, 3], &[4])),
        Some(Command::Reconfigure {
            group: GROUP_0,
            voters: vec![1, 2, 4],
        })
    );
    assert_eq!(core.on_settle_status(GROUP_0, &view(&[4, 2, 1], &[])), None);
    assert!(core.unsettled().is_empty(), "settled");
    core.reconcile(|_| false);
    assert!(core.unsettled().is_empty(), "the same assignment does not unsettle it");
    replace(&mut core, 4, 5);
    core.reconcile(|_| false);
    assert_eq!(core.unsettled(), vec![GROUP_0], "a new assignment does");
}

#[test]
fn a_learner_left_over_keeps_the_group_unsettled() {
    let mut core = core_of(1);
    with_topic(&mut core);
    core.reconcile(|_| false);
    let nudge = core.on_settle_status(GROUP_0, &view(&[1, 2, 3], &[5]));
    assert!(matches!(nudge, Some(Command::Reconfigure { .. })));
}

#[test]
fn a_passive_replica_asks_its_group_and_its_assigned_nodes_but_not_itself() {
    let mut core = core_of(2);
    with_topic(&mut core);
    replace(&mut core, 3, 4);
    assert_eq!(core.passive_peers(GROUP_0, &view(&[1, 2, 3], &[5])), vec![1, 3, 4, 5]);
}
