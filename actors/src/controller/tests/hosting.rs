//! `reconcile`, `on_hosted`, `unassigned_hosted`, `on_unassigned`, `due`.

use super::*;
use crate::controller::core::Command;

#[test]
fn an_assigned_partition_is_hosted_from_its_founders_once() {
    let mut core = core_of(2);
    with_topic(&mut core);
    let commands = core.reconcile(|_| false);
    assert_eq!(
        commands,
        vec![Command::Host {
            group: GROUP_0,
            founders: Some(ids(&[1, 2, 3])),
            rejoin: false,
        }]
    );
    core.on_hosted(GROUP_0);
    assert_eq!(
        core.reconcile(|_| false),
        Vec::new(),
        "a hosted group is not hosted again"
    );
}

#[test]
fn a_failed_hosting_is_asked_for_again() {
    let mut core = core_of(2);
    with_topic(&mut core);
    assert_eq!(core.reconcile(|_| false).len(), 1);
    assert_eq!(core.reconcile(|_| false).len(), 1, "no on_hosted: still wanted");
}

#[test]
fn a_replacement_joins_as_a_rejoining_replica_on_top_of_the_founders() {
    let mut core = core_of(4);
    with_topic(&mut core);
    assert!(core.reconcile(|_| false).is_empty(), "node 4 holds nothing yet");
    replace(&mut core, 3, 4);
    assert_eq!(
        core.reconcile(|_| false),
        vec![Command::Host {
            group: GROUP_0,
            founders: Some(ids(&[1, 2, 3])),
            rejoin: true,
        }]
    );
}

#[test]
fn a_founder_moved_off_before_it_hosted_creates_its_founding_replica_unless_it_ever_did() {
    let mut core = core_of(3);
    with_topic(&mut core);
    replace(&mut core, 3, 4);
    assert_eq!(
        core.reconcile(|_| false),
        vec![Command::Host {
            group: GROUP_0,
            founders: Some(ids(&[1, 2, 3])),
            rejoin: false,
        }]
    );
    assert!(
        core.reconcile(|g| g == GROUP_0).is_empty(),
        "hosted once: never again as a founder"
    );
}

#[test]
fn an_unassigned_replica_runs_while_its_group_counts_it_then_stops_for_good() {
    let mut core = core_of(3);
    with_topic(&mut core);
    core.on_hosted(GROUP_0);
    replace(&mut core, 3, 4);
    assert_eq!(core.unassigned_hosted(), vec![GROUP_0]);
    assert_eq!(core.on_unassigned(GROUP_0, true), None, "still counted: keeps running");
    assert_eq!(
        core.on_unassigned(GROUP_0, false),
        Some(Command::Unhost { group: GROUP_0 })
    );
    assert!(core.unassigned_hosted().is_empty());
    assert!(
        core.reconcile(|_| false).is_empty(),
        "closed: not re-created as a founder"
    );
}

#[test]
fn hosting_is_reconciled_when_the_metadata_changes_or_each_heal_interval() {
    let mut core = core_of(1);
    let first = core.due(1_000);
    assert!(first.reconcile && first.heal);
    let idle = core.due(1_100);
    assert!(!idle.reconcile && !idle.heal);
    with_topic(&mut core);
    let changed = core.due(1_200);
    assert!(changed.reconcile && !changed.heal);
    let later = core.due(1_500);
    assert!(later.reconcile && later.heal);
}

#[test]
fn tasks_are_handed_over_only_when_they_change() {
    let mut core = core_of(1);
    with_topic(&mut core);
    assert_eq!(core.tasks_changed(), None);
    apply(
        &mut core,
        MetadataCommand::StartDataflow {
            dataflow: dataflow_d(1, 2, ids(&[1, 2])),
        },
    );
    let (tasks, plans) = core.tasks_changed().expect("one task placed here");
    assert!(plans.is_empty(), "a registered dataflow has no plan");
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0].task, 0);
    assert_eq!(core.tasks_changed(), None);
}
