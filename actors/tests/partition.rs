//! One partition replica with its produce admission ([`PartitionCore`]),
//! driven step by step: what retention means for idempotent producers.

use std::cell::RefCell;
use std::rc::Rc;

use bytes::Bytes;
use runnel_actors::metadata::{group_id, NodeId};
use runnel_actors::partition::{PartitionCore, ProduceReply};
use runnel_actors::{Acks, BrokerError, ReplicaConfig};
use runnel_storage::{BatchBuilder, FsyncPolicy, LogConfig, ProducerInfo, Record, RecordBatch};

/// Where a produce's answer lands.
#[derive(Clone, Default)]
struct Answer(Rc<RefCell<Option<Result<u64, BrokerError>>>>);

impl ProduceReply for Answer {
    fn answer(self, result: Result<u64, BrokerError>) {
        *self.0.borrow_mut() = Some(result);
    }
}

type Part = PartitionCore<Answer>;

const ROUNDS_MAX: usize = 1_000;

fn log_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 4096,
        fsync: FsyncPolicy::Never,
        retention_age: None,
        ..LogConfig::default()
    }
}

fn open(dir: &std::path::Path) -> Part {
    let group = group_id(1, 0);
    let (part, _) = Part::open(group, dir, log_config(), &ReplicaConfig::new(1), Some(&[NodeId(1)])).expect("open");
    part
}

/// Ticks until the single replica leads.
fn lead(part: &mut Part) {
    for _ in 0..ROUNDS_MAX {
        part.tick();
        part.drive().expect("drive");
        if part.core().is_leader() && part.core().knows_commit_point() {
            return;
        }
    }
    panic!("the single replica never led");
}

/// A producer's batch of 10 records from `sequence`, stamped 1 ms after
/// the epoch (long expired by any retention).
fn batch(producer_id: i64, sequence: i32) -> RecordBatch {
    let mut builder = BatchBuilder::new().producer(ProducerInfo {
        producer_id,
        producer_epoch: 0,
        base_sequence: sequence,
    });
    for i in 0..10 {
        let record = Record {
            timestamp_ms: 1,
            value: Some(Bytes::from(format!("{sequence}-{i}-{}", "x".repeat(60)))),
            ..Record::default()
        };
        builder.push(&record).expect("push");
    }
    builder.build().expect("build")
}

fn produce(part: &mut Part, batch: RecordBatch) -> Result<u64, BrokerError> {
    let answer = Answer::default();
    part.produce(batch, Acks::All, 0, answer.clone());
    for _ in 0..ROUNDS_MAX {
        part.drive().expect("drive");
        if let Some(result) = answer.0.borrow_mut().take() {
            return result;
        }
        part.tick();
    }
    panic!("no answer to a produce");
}

/// A producer whose batches retention deleted is unknown to a replica
/// opened afterwards; it goes on writing as a new producer there, as its
/// history expired. A log that never lost its start still refuses a
/// stranger's non-zero sequence.
#[test]
fn a_producer_whose_history_retention_deleted_writes_on() {
    let compacted = tempfile::tempdir().expect("tempdir");
    let untouched = tempfile::tempdir().expect("tempdir");
    for dir in [compacted.path(), untouched.path()] {
        let mut part = open(dir);
        lead(&mut part);
        // Producer 77 first, then 88 fills segments past it.
        for n in 0..20 {
            produce(&mut part, batch(77, n * 10)).expect("produce");
        }
        for n in 0..20 {
            produce(&mut part, batch(88, n * 10)).expect("produce");
        }
        assert!(part.core().store().log().segment_count() > 2);
        if dir == compacted.path() {
            let done = part
                .core_mut()
                .compact_for_retention(1_000_000, 1_000)
                .expect("retention");
            assert!(done.is_some(), "closed segments expired");
        }
        part.core_mut().close().expect("close");
    }
    // Reopened, a replica knows producers from what its log holds now.
    let mut part = open(untouched.path());
    lead(&mut part);
    let refused = produce(&mut part, batch(99, 1_000)).expect_err("a stranger's sequence");
    assert!(refused.to_string().contains("is not known here"), "{refused}");
    produce(&mut part, batch(77, 200)).expect("77 is known and next");

    let mut part = open(compacted.path());
    lead(&mut part);
    let offset = produce(&mut part, batch(77, 200)).expect("77's history expired: accepted as new");
    assert_eq!(
        produce(&mut part, batch(77, 200)).expect("a retry"),
        offset,
        "then deduplicated"
    );
}
