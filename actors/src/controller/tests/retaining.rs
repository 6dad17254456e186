//! `retention`: which hosted partitions are asked to apply `retention.ms`.

use super::*;
use crate::controller::core::Command;
use crate::metadata::TopicSetting;

/// A core on node 2 hosting partition 0 of each topic (assigned to 1, 2, 3).
fn hosting(topics: &[(&str, Option<u64>)]) -> ControllerCore {
    let mut core = core_of(2);
    for &(name, retention_ms) in topics {
        let mut config = TopicConfig::new(1, 3);
        config.retention_ms = retention_ms;
        apply(
            &mut core,
            MetadataCommand::CreateTopic {
                name: name.to_string(),
                config,
                assignment: vec![ids(&[1, 2, 3])],
            },
        );
    }
    for command in core.reconcile(|_| false) {
        if let Command::Host { group, .. } = command {
            core.on_hosted(group);
        }
    }
    core
}

#[test]
fn every_hosted_stream_with_a_retention_is_asked_to_apply_it_but_internal_state_and_input_is_kept() {
    let core = hosting(&[
        ("payments", Some(60_000)),
        ("forever", None),
        (runnel_client::offsets::OFFSETS_TOPIC, Some(60_000)),
        ("q.checkpoints", Some(60_000)),
        ("q.repartition", Some(5_000)),
        ("q.dlq", Some(5_000)),
    ]);
    let group_of = |name: &str| core.meta().metadata.topics[name].group_id(0);
    let mut asked = core.retention();
    asked.sort_by_key(|command| format!("{command:?}"));
    let mut expected = vec![
        Command::Retain {
            group: group_of("payments"),
            retention_ms: 60_000,
        },
        Command::Retain {
            group: group_of("q.dlq"),
            retention_ms: 5_000,
        },
    ];
    expected.sort_by_key(|command| format!("{command:?}"));
    assert_eq!(asked, expected);
    assert!(core_of(2).retention().is_empty(), "nothing hosted here");
}

#[test]
fn compacted_topics_are_asked_to_compact_and_only_deleting_policies_expire() {
    use runnel_client::protocol::CleanupPolicy;
    let mut core = hosting(&[("compact", Some(60_000)), ("both", Some(60_000))]);
    for (name, policy) in [
        ("compact", CleanupPolicy::Compact),
        ("both", CleanupPolicy::CompactDelete),
    ] {
        apply(
            &mut core,
            MetadataCommand::AlterTopic {
                name: name.to_string(),
                settings: vec![
                    TopicSetting::Cleanup(policy),
                    TopicSetting::DeleteRetentionMs(1_000),
                    TopicSetting::MinCompactionLagMs(5_000),
                ],
            },
        );
    }
    let group_of = |name: &str| core.meta().metadata.topics[name].group_id(0);
    let mut asked = core.retention();
    asked.sort_by_key(|command| format!("{command:?}"));
    let mut expected = vec![
        Command::Compact {
            group: group_of("compact"),
            policy: runnel_storage::CompactionPolicy {
                delete_retention_ms: 1_000,
                min_lag_ms: 5_000,
            },
        },
        Command::Compact {
            group: group_of("both"),
            policy: runnel_storage::CompactionPolicy {
                delete_retention_ms: 1_000,
                min_lag_ms: 5_000,
            },
        },
        Command::Retain {
            group: group_of("both"),
            retention_ms: 60_000,
        },
    ];
    expected.sort_by_key(|command| format!("{command:?}"));
    assert_eq!(asked, expected, "retention.ms does not apply under compact alone");
}
