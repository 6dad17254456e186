//! Tests of the controller core, one file per handler, each driving
//! [`ControllerCore`] with events and checking the commands it returns.

mod admin;
mod healing;
mod hosting;
mod preferring;
mod repairing;
mod retaining;
mod settling;
mod stale;

use super::core::{ControllerCore, CoreConfig, GroupView, Liveness, MemberView};
use crate::metadata::{command_batch, GroupId, MetadataCommand, NodeId, TopicConfig};

/// Replicas of a partition founded on nodes 1, 2, 3 of a 3-partition topic:
/// partition 0 is group (1 << 20).
const GROUP_0: GroupId = GroupId(1 << 20);

/// Node ids from bare numbers, to keep the cases short.
fn ids(nodes: &[u32]) -> Vec<NodeId> {
    nodes.iter().copied().map(NodeId).collect()
}

/// Dataflow `d` reading `t` into `s`, with `placement` (empty: to be placed).
fn dataflow_d(stages: u32, partitions: u32, placement: Vec<NodeId>) -> crate::metadata::DataflowMeta {
    crate::metadata::DataflowMeta {
        name: "d".to_string(),
        source: "t".to_string(),
        sink: "s".to_string(),
        stages,
        partitions,
        placement,
    }
}

fn core_of(me: u32) -> ControllerCore {
    ControllerCore::new(CoreConfig {
        me: NodeId(me),
        replace_after_ms: 1_000,
        heal_interval_ms: 500,
        quiet_before_ms: 0,
    })
}

/// Applies `command` as the next controller-log record.
fn apply(core: &mut ControllerCore, command: MetadataCommand) {
    let mut batch = command_batch(&command, 0).expect("batch");
    batch.set_base_offset(core.meta().applied_offset);
    core.apply_batch(&batch).expect("apply");
}

/// A topic `t` of one partition on nodes 1, 2, 3.
fn with_topic(core: &mut ControllerCore) {
    apply(
        core,
        MetadataCommand::CreateTopic {
            name: "t".to_string(),
            config: TopicConfig::new(1, 3),
            assignment: vec![ids(&[1, 2, 3])],
        },
    );
}

fn replace(core: &mut ControllerCore, dead: u32, replacement: u32) {
    apply(
        core,
        MetadataCommand::ReplaceReplica {
            topic: "t".to_string(),
            partition: 0,
            dead: NodeId(dead),
            replacement: NodeId(replacement),
        },
    );
}

fn view(voters: &[u32], learners: &[u32]) -> GroupView {
    GroupView {
        voters: ids(voters),
        learners: ids(learners),
    }
}

fn alive(nodes: &[u32]) -> Vec<MemberView> {
    nodes
        .iter()
        .map(|&node| MemberView {
            node: NodeId(node),
            liveness: Liveness::Alive,
        })
        .collect()
}
