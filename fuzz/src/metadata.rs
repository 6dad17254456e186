//! The controller log (actors/src/metadata.rs): versioned metadata commands,
//! with the dataflow plans they carry (client/src/plan.rs), as every node
//! decodes and applies them. Commands in a committed log were checked by the
//! leader, but a node must still not panic on one it cannot apply: it is
//! refused alike everywhere, and a refusal changes nothing.

use bytes::Bytes;
use runnel_actors::metadata::{decode_command, encode_command, AppliedMetadata, MetadataCommand};
use runnel_client::protocol::TopicConfig;
use runnel_cluster::NodeId;
use runnel_storage::{BatchBuilder, Record};

/// Commands one input applies at most.
const COMMANDS_MAX: usize = 16;

pub fn run(data: &[u8]) {
    let mut applied = AppliedMetadata::default();
    let start = MetadataCommand::CreateTopic {
        name: "t".to_string(),
        config: TopicConfig::new(3, 3),
        assignment: vec![vec![NodeId(1), NodeId(2), NodeId(3)]; 3],
    };
    applied.metadata.apply(&start).expect("a valid topic is created");
    let values: Vec<&[u8]> = crate::chunks(data).take(COMMANDS_MAX).collect();
    for value in &values {
        apply_one(&mut applied, value);
    }
    derived(&applied);
    apply_as_log(&values);
}

/// Decodes and applies one command; a refused one leaves the metadata as it was.
fn apply_one(applied: &mut AppliedMetadata, value: &[u8]) {
    let Ok(command) = decode_command(value) else { return };
    let again = encode_command(&command).expect("a decoded command encodes");
    assert_eq!(decode_command(&again).expect("re-decodes"), command);
    let before = applied.metadata.clone();
    if applied.metadata.apply(&command).is_err() {
        assert_eq!(
            applied.metadata, before,
            "a refused command changed the metadata: {command:?}"
        );
    }
}

/// What nodes compute from the metadata: their groups and tasks, moves off
/// a dead node, and each plan compiled and explained.
fn derived(applied: &AppliedMetadata) {
    let nodes: Vec<NodeId> = (1..=4).map(NodeId).collect();
    for &node in &nodes {
        let _ = applied.wanted_groups(node);
        let _ = applied.founded_groups_moved_off(node);
        let _ = applied.metadata.tasks_of(node);
    }
    let _ = applied.replica_moves(&nodes[..1], &nodes[1..]);
    let _ = applied.task_moves(&nodes[..1], &nodes[1..]);
    for (name, plan) in &applied.metadata.plans {
        let _ = plan.explain(name);
        let _ = runnel_dataflow::compile::compile(name, plan);
    }
}

/// The same values as one controller-log batch, applied as a node does.
fn apply_as_log(values: &[&[u8]]) {
    if values.is_empty() {
        return;
    }
    let mut builder = BatchBuilder::new();
    for value in values {
        let record = Record {
            value: Some(Bytes::copy_from_slice(value)),
            ..Record::default()
        };
        if builder.push(&record).is_err() {
            return;
        }
    }
    let Ok(batch) = builder.build() else { return };
    let mut applied = AppliedMetadata::default();
    if applied.apply_batch(&batch).is_ok() {
        assert_eq!(applied.applied_offset, batch.next_offset());
    }
}
