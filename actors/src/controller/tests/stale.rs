//! `stale_candidates`, `stale_checks`, `on_stale_answer`.

use super::*;
use crate::controller::core::{Command, StaleCheck};

/// Node 3, replaced by node 4 while it was away, finds its old files.
fn replaced_node() -> ControllerCore {
    let mut core = core_of(3);
    with_topic(&mut core);
    replace(&mut core, 3, 4);
    core
}

#[test]
fn only_unassigned_directories_not_running_elsewhere_are_candidates() {
    let mut core = replaced_node();
    assert_eq!(core.stale_candidates(&[GroupId(0), GROUP_0], |_| false), vec![GROUP_0]);
    assert!(
        core.stale_candidates(&[GROUP_0], |_| true).is_empty(),
        "running but not hosted by the metadata: someone else's business"
    );
    core.on_hosted(GROUP_0);
    assert_eq!(core.stale_candidates(&[GROUP_0], |_| true), vec![GROUP_0]);
    let assigned = {
        let mut core = core_of(1);
        with_topic(&mut core);
        core
    };
    assert!(assigned.stale_candidates(&[GROUP_0], |_| false).is_empty());
}

#[test]
fn nothing_is_checked_from_a_view_behind_the_controller_leader() {
    let core = replaced_node();
    let applied = core.meta().applied_offset;
    assert!(core.stale_checks(&[GROUP_0], applied + 1).is_empty());
    assert_eq!(
        core.stale_checks(&[GROUP_0], applied),
        vec![StaleCheck {
            group: GROUP_0,
            ask: Some(ids(&[1, 2, 4])),
        }]
    );
    assert_eq!(
        core.stale_checks(&[GroupId(7)], applied),
        vec![StaleCheck {
            group: GroupId(7),
            ask: None
        }],
        "a group no topic has: nobody to ask"
    );
}

#[test]
fn a_group_of_a_topic_this_node_has_not_seen_created_is_never_stale() {
    // Seeds 489 and 788: a restarted node whose metadata stops before newer
    // topics must not take their replicas for those of deleted topics.
    let core = replaced_node();
    let applied = core.meta().applied_offset;
    let later_topic = crate::metadata::group_id(2, 0);
    assert!(core.stale_checks(&[later_topic], applied).is_empty());
    let fresh = core_of(3);
    assert!(fresh.stale_checks(&[GROUP_0], 0).is_empty(), "nothing applied yet");
}

#[test]
fn files_are_deleted_only_once_the_leader_confirms_the_replica_left() {
    let mut core = replaced_node();
    assert_eq!(
        core.on_stale_answer(GROUP_0, false),
        vec![Command::Host {
            group: GROUP_0,
            founders: None,
            rejoin: true,
        }],
        "maybe a voter the group needs: run it until it is known removed"
    );
    core.on_hosted(GROUP_0);
    assert!(core.on_stale_answer(GROUP_0, false).is_empty(), "already running");
    assert_eq!(
        core.on_stale_answer(GROUP_0, true),
        vec![
            Command::Unhost { group: GROUP_0 },
            Command::DeleteFiles { group: GROUP_0 }
        ]
    );
    assert!(
        core.on_stale_answer(GROUP_0, false).is_empty(),
        "closed since: never reopened"
    );
}
