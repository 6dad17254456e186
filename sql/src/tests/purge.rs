//! Repartitioned records every stateful stage has checkpointed past are
//! deleted, by the real task code over an in-memory cluster; a stage that
//! lags holds the deletion back, and tasks restored afterwards read on to
//! the exact results.

use std::collections::BTreeMap;

use runnel_client::tasks::repartition_topic;
use runnel_dataflow::task::{CHECKPOINT_INTERVAL, PURGE_INTERVAL};
use runnel_dataflow::testing::MemoryIo;
use runnel_storage::Record;
use serde_json::{json, Value};

use super::stream_join::payments;
use super::{attempts, plan_in, Tasks};

const CARDS: usize = 50;

fn append(io: &MemoryIo, topic: &str, value: Value, at_ms: i64) {
    let record = Record {
        timestamp_ms: at_ms,
        key: None,
        value: Some(value.to_string().into()),
        headers: Vec::new(),
    };
    io.append(topic, 0, record);
}

/// `round` attempts per card (at 1 s, 2 s, …) and, in round 0, one
/// payment per card at 0 s.
fn feed(io: &MemoryIo, round: i64) {
    for card in 0..CARDS {
        let card = format!("c{card:02}");
        if round == 0 {
            append(io, "payments", json!({"card": card, "paid": 1, "at_ms": 0}), 0);
        }
        let at_ms = 1000 * (round + 1);
        append(
            io,
            "attempts",
            json!({"card": card, "amount": 1, "at_ms": at_ms, "note": ""}),
            at_ms,
        );
    }
}

/// Each card's latest count in the sink.
fn counts(io: &MemoryIo, sink: &str) -> BTreeMap<String, i64> {
    let mut rows = BTreeMap::new();
    for record in io.records(sink, 0) {
        let row: Value = serde_json::from_slice(record.value.as_deref().expect("an upsert")).expect("JSON");
        let card = row["CARD"]
            .as_str()
            .unwrap_or_else(|| panic!("a card in {row}"))
            .to_string();
        rows.insert(card, row["N"].as_i64().expect("a count"));
    }
    rows
}

/// A join then an aggregate: two stateful stages read the repartition
/// topic. Nothing is deleted while the aggregate has read nothing; once
/// both checkpointed past the records, they go; both tasks restored then
/// count every pair exactly once.
#[tokio::test]
async fn repartitioned_records_go_once_every_stage_checkpointed_past_them() {
    let statement = "CREATE TABLE paid AS SELECT a.card AS card, COUNT(*) AS n FROM attempts a \
                     JOIN payments p WITHIN 1 MINUTE ON a.card = p.card GROUP BY a.card;";
    let plan = plan_in(vec![attempts(), payments()], statement).expect("plans");
    let mut tasks = Tasks::new(&plan, MemoryIo::default()).await;
    assert_eq!(tasks.def.stages(), 4, "two sources, the join, the aggregate");
    let (sink, repartition) = (tasks.def.sink.clone(), repartition_topic("q"));
    feed(&tasks.io, 0);
    for pause in [CHECKPOINT_INTERVAL, PURGE_INTERVAL, PURGE_INTERVAL] {
        for task in &mut tasks.tasks[..3] {
            while task.step().await.expect("steps") {}
        }
        tasks.io.pass(pause);
    }
    assert_eq!(tasks.io.start_of(&repartition, 0), 0, "the aggregate read nothing yet");

    tasks.drain().await;
    tasks.io.pass(CHECKPOINT_INTERVAL);
    tasks.drain().await;
    tasks.io.pass(PURGE_INTERVAL);
    tasks.drain().await;
    let start = tasks.io.start_of(&repartition, 0);
    let end = tasks.io.batches(&repartition, 0).last().map_or(0, |b| b.next_offset());
    assert!(start > 0 && start <= end, "deleted below {start} of {end}");

    tasks.tasks[2] = tasks.start(2).await.expect("the join restores");
    tasks.tasks[3] = tasks.start(3).await.expect("the aggregate restores");
    feed(&tasks.io, 1);
    tasks.drain().await;
    let expected: BTreeMap<String, i64> = (0..CARDS).map(|c| (format!("c{c:02}"), 2)).collect();
    assert_eq!(counts(&tasks.io, &sink), expected, "each attempt paired once");
}

/// The repartition topic holds a retry twice, as a replica that forgot
/// the writer (its batches deleted, the replica reopened) takes it: the
/// aggregate, restored from its checkpoint before reading the copies,
/// counts every record once.
#[tokio::test]
async fn a_retry_the_repartition_topic_holds_twice_is_read_once() {
    let statement = "CREATE TABLE per_card AS SELECT card, COUNT(*) AS n FROM attempts GROUP BY card;";
    let plan = plan_in(vec![attempts()], statement).expect("plans");
    let mut tasks = Tasks::new(&plan, MemoryIo::default()).await;
    let (sink, repartition) = (tasks.def.sink.clone(), repartition_topic("q"));
    for card in 0..CARDS {
        let value = json!({"card": format!("c{card:02}"), "amount": 1, "at_ms": 1000, "note": ""});
        append(&tasks.io, "attempts", value, 1000);
    }
    tasks.drain().await;
    tasks.io.pass(CHECKPOINT_INTERVAL);
    tasks.drain().await;
    let sent = tasks.io.batches(&repartition, 0);
    let retried = sent.iter().filter(|b| b.header().producer.base_sequence >= 0).count();
    assert!(retried > 0, "the source task's batches carry sequences");
    for batch in sent {
        tasks.io.write_again(&repartition, 0, batch);
    }
    tasks.tasks[1] = tasks.start(1).await.expect("the aggregate restores");
    tasks.drain().await;
    let expected: BTreeMap<String, i64> = (0..CARDS).map(|c| (format!("c{c:02}"), 1)).collect();
    assert_eq!(counts(&tasks.io, &sink), expected, "each attempt counted once");
}
