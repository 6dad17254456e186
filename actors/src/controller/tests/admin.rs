//! `create_topic`, `delete_topic`, `start_dataflow`, `stop_dataflow`, `rebalance`.

use super::*;
use crate::metadata::MetadataError;

#[test]
fn a_topic_is_validated_and_placed_on_live_nodes() {
    let mut core = core_of(1);
    let command = core
        .create_topic("orders".to_string(), TopicConfig::new(2, 2), &ids(&[1, 2, 3]))
        .expect("placed");
    let MetadataCommand::CreateTopic { assignment, .. } = &command else {
        panic!("{command:?}");
    };
    assert_eq!(assignment.len(), 2);
    assert!(assignment.iter().all(|r| r.len() == 2));
    apply(&mut core, command);
    assert_eq!(
        core.create_topic("orders".to_string(), TopicConfig::new(1, 1), &ids(&[1])),
        Err(MetadataError::TopicExists("orders".to_string()))
    );
    assert!(matches!(
        core.create_topic("bad name".to_string(), TopicConfig::new(1, 1), &ids(&[1])),
        Err(MetadataError::InvalidName { .. })
    ));
    assert_eq!(
        core.create_topic("wide".to_string(), TopicConfig::new(1, 3), &ids(&[1, 2])),
        Err(MetadataError::NotEnoughNodes {
            replication: 3,
            live: 2
        })
    );
    assert_eq!(
        core.delete_topic("nope".to_string()),
        Err(MetadataError::UnknownTopic("nope".to_string()))
    );
}

#[test]
fn a_dataflow_is_placed_task_by_task_and_stopped_only_when_running() {
    let mut core = core_of(1);
    let dataflow = dataflow_d(2, 2, Vec::new());
    let command = core.start_dataflow(dataflow, &ids(&[1, 2])).expect("placed");
    let MetadataCommand::StartDataflow { dataflow } = &command else {
        panic!("{command:?}");
    };
    assert_eq!(dataflow.placement.len(), 4);
    assert_eq!(
        core.stop_dataflow("d".to_string()),
        Err(MetadataError::UnknownDataflow("d".to_string()))
    );
    apply(&mut core, command);
    assert!(core.stop_dataflow("d".to_string()).is_ok());
}

#[test]
fn a_topic_a_running_dataflow_uses_is_not_deleted_while_it_runs() {
    let mut core = core_of(1);
    for name in ["t", "s", "d.checkpoints", "d.dlq", "other"] {
        let assignment = vec![ids(&[1])];
        let config = TopicConfig::new(1, 1);
        apply(
            &mut core,
            MetadataCommand::CreateTopic {
                name: name.to_string(),
                config,
                assignment,
            },
        );
    }
    let dataflow = dataflow_d(1, 1, Vec::new());
    let command = core.start_dataflow(dataflow, &ids(&[1])).expect("placed");
    apply(&mut core, command);
    for used in ["t", "s", "d.checkpoints", "d.dlq"] {
        let refused = core.delete_topic(used.to_string()).expect_err(used);
        assert_eq!(
            refused,
            MetadataError::TopicInUse {
                topic: used.to_string(),
                dataflows: vec!["d".to_string()]
            }
        );
        assert!(refused.to_string().contains("runnel dataflow stop"), "{refused}");
    }
    assert!(core.delete_topic("other".to_string()).is_ok());
    apply(&mut core, MetadataCommand::StopDataflow { name: "d".to_string() });
    assert!(core.delete_topic("d.checkpoints".to_string()).is_ok(), "once stopped");
}

#[test]
fn rebalancing_moves_replicas_until_loads_differ_by_at_most_one() {
    let mut core = core_of(1);
    apply(
        &mut core,
        MetadataCommand::CreateTopic {
            name: "t".to_string(),
            config: TopicConfig::new(4, 1),
            assignment: vec![ids(&[1]), ids(&[1]), ids(&[1]), ids(&[1])],
        },
    );
    let moves = core.rebalance(&ids(&[1, 2, 3]));
    assert_eq!(moves.len(), 2, "{moves:?}");
    for command in moves {
        apply(&mut core, command);
    }
    let load = core.meta().metadata.load();
    assert_eq!(load.values().max(), Some(&2));
    assert!(core.rebalance(&ids(&[1, 2, 3])).is_empty());
}

#[test]
fn partitions_are_added_on_live_nodes_and_founded_by_their_first_replicas() {
    let mut core = core_of(1);
    let created = core
        .create_topic("orders".to_string(), TopicConfig::new(2, 2), &ids(&[1, 2, 3]))
        .expect("placed");
    apply(&mut core, created);
    let refused = core.add_partitions("orders".to_string(), 2, &ids(&[1, 2, 3]));
    assert!(
        matches!(&refused, Err(MetadataError::InvalidConfig(why)) if why.contains("can only be added")),
        "{refused:?}"
    );
    assert_eq!(
        core.add_partitions("nope".to_string(), 3, &ids(&[1])),
        Err(MetadataError::UnknownTopic("nope".to_string()))
    );
    assert!(matches!(
        core.add_partitions("orders".to_string(), 5, &ids(&[1])),
        Err(MetadataError::NotEnoughNodes { .. })
    ));
    let command = core
        .add_partitions("orders".to_string(), 5, &ids(&[2, 3]))
        .expect("placed");
    let MetadataCommand::AddPartitions { assignment, .. } = &command else {
        panic!("{command:?}");
    };
    assert_eq!(assignment.len(), 3, "partitions 2, 3 and 4");
    assert!(
        assignment.iter().all(|r| r.len() == 2 && !r.contains(&NodeId(1))),
        "{assignment:?}"
    );
    apply(&mut core, command);
    let topic = &core.meta().metadata.topics["orders"];
    assert_eq!((topic.config.partitions, topic.assignment.len()), (5, 5));
    assert_eq!(
        topic.founders[2..],
        topic.assignment[2..],
        "new groups are founded by their replicas"
    );
    assert_eq!(topic.departed.len(), 5);
    let wanted = core.meta().wanted_groups(NodeId(2));
    assert!(wanted.contains_key(&topic.group_id(4)), "node 2 hosts a new partition");
}

#[test]
fn settings_change_all_or_none_and_a_running_dataflow_keeps_its_partitions() {
    use crate::metadata::TopicSetting;
    let mut core = core_of(1);
    let created = core
        .create_topic("t".to_string(), TopicConfig::new(1, 3), &ids(&[1, 2, 3]))
        .expect("placed");
    apply(&mut core, created);
    let alter = |settings| MetadataCommand::AlterTopic {
        name: "t".to_string(),
        settings,
    };
    let refused = core.checked(alter(vec![
        TopicSetting::RetentionMs(Some(5)),
        TopicSetting::MinInsync(4),
    ]));
    assert!(
        matches!(&refused, Err(MetadataError::InvalidConfig(why)) if why.contains("min-insync")),
        "{refused:?}"
    );
    let command = core
        .checked(alter(vec![TopicSetting::RetentionMs(None), TopicSetting::MinInsync(3)]))
        .expect("valid");
    apply(&mut core, command);
    let config = &core.meta().metadata.topics["t"].config;
    assert_eq!((config.min_insync, config.retention_ms), (3, None));

    let dataflow = dataflow_d(1, 1, Vec::new());
    let started = core.start_dataflow(dataflow, &ids(&[1])).expect("placed");
    apply(&mut core, started);
    assert_eq!(
        core.add_partitions("t".to_string(), 2, &ids(&[1, 2, 3])),
        Err(MetadataError::TopicInUse {
            topic: "t".to_string(),
            dataflows: vec!["d".to_string()]
        })
    );
}

#[test]
fn a_reset_starts_a_stopped_dataflows_next_generation_which_its_tasks_write_as() {
    let mut core = core_of(1);
    let dataflow = dataflow_d(1, 2, Vec::new());
    let start = core.start_dataflow(dataflow.clone(), &ids(&[1])).expect("placed");
    apply(&mut core, start.clone());
    let generations = |core: &ControllerCore| -> Vec<i16> {
        core.meta()
            .metadata
            .tasks_of(NodeId(1))
            .iter()
            .map(|t| t.generation)
            .collect()
    };
    assert_eq!(generations(&core), [0, 0]);
    let reset = MetadataCommand::ResetDataflow { name: "d".to_string() };
    assert_eq!(
        core.checked(reset.clone()),
        Err(MetadataError::DataflowRunning("d".to_string())),
        "a running dataflow is stopped first"
    );
    let stop = core.stop_dataflow("d".to_string()).expect("running");
    apply(&mut core, stop);
    for _ in 0..2 {
        let next = core.checked(reset.clone()).expect("stopped");
        apply(&mut core, next);
    }
    apply(&mut core, start);
    assert_eq!(generations(&core), [2, 2], "the producer epoch of every task");
}

#[test]
fn a_dataflows_checkpoints_are_compacted_and_its_state_topics_never_expire() {
    use crate::metadata::CleanupPolicy;
    let core = core_of(1);
    let shape = runnel_client::tasks::DataflowShape {
        source: "in".to_string(),
        sink: "out".to_string(),
        stages: 2,
    };
    let missing: std::collections::BTreeMap<String, TopicConfig> =
        core.dataflow_topics_missing("d", &shape, 3, 2).into_iter().collect();
    let checkpoints = &missing["d.checkpoints"];
    assert_eq!(
        (checkpoints.partitions, checkpoints.cleanup),
        (6, CleanupPolicy::Compact)
    );
    assert_eq!(checkpoints.retention_ms, None);
    let repartition = &missing["d.repartition"];
    assert_eq!(
        (repartition.cleanup, repartition.retention_ms),
        (CleanupPolicy::Delete, None)
    );
    assert_eq!(missing["out"].cleanup, CleanupPolicy::Delete);
}
