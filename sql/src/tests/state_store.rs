//! An aggregate whose state is larger than a checkpoint holds (7 MiB), run
//! by the real task code over an in-memory cluster: its state lives in its
//! changelog, written with checkpoints that each stay within the limit, and
//! a restored task reads it back and goes on to the exact results.

use std::collections::BTreeMap;

use runnel_dataflow::task::{CHECKPOINT_BYTES_MAX, CHECKPOINT_INTERVAL};
use runnel_dataflow::testing::MemoryIo;
use runnel_storage::Record;
use serde_json::{json, Value};

use super::{attempts, plan_in, Tasks};

const CARDS: usize = 30_000;
/// Each card's note: its attempt's number and 294 more characters.
const NOTE_PAD: usize = 294;

fn append(tasks: &Tasks, i: usize) {
    let note = format!("{i:06}{}", "x".repeat(NOTE_PAD));
    let value = json!({"card": format!("card-{:05}", i % CARDS), "amount": 1, "at_ms": i, "note": note});
    let record = Record {
        timestamp_ms: i as i64,
        key: None,
        value: Some(value.to_string().into()),
        headers: Vec::new(),
    };
    tasks.io.append("attempts", 0, record);
}

/// The sink's rows by card (each change replaces the card's row).
fn materialized(io: &MemoryIo, sink: &str) -> BTreeMap<String, (i64, String)> {
    let mut rows = BTreeMap::new();
    for record in io.records(sink, 0) {
        let row: Value = serde_json::from_slice(record.value.as_deref().expect("an upsert")).expect("JSON");
        let card = row["CARD"].as_str().expect("a card").to_string();
        let note = row["NOTE"].as_str().expect("a note").to_string();
        rows.insert(card, (row["N"].as_i64().expect("a count"), note));
    }
    rows
}

/// 30,000 cards each keep the longest of their 300-character notes: about
/// 10 MB of state in one task, more than one checkpoint holds. The
/// aggregate task is restored half-way from its checkpoint partition, and
/// the results equal the reference.
#[tokio::test]
async fn an_aggregate_larger_than_a_checkpoint_restores_from_its_changelog() {
    let statement = "CREATE TABLE noted AS SELECT card, COUNT(*) AS n, MAX(note) AS note FROM attempts GROUP BY card;";
    let plan = plan_in(vec![attempts()], statement).expect("plans");
    let mut tasks = Tasks::new(&plan, MemoryIo::default()).await;
    let sink = tasks.def.sink.clone();
    for i in 0..CARDS {
        append(&tasks, i);
    }
    tasks.drain().await;
    tasks.io.pass(CHECKPOINT_INTERVAL);
    tasks.drain().await;
    let batches = tasks.io.batches("q.checkpoints", 1);
    let written: usize = batches.iter().map(|b| b.size_bytes()).sum();
    let largest = batches.iter().map(|b| b.size_bytes()).max().unwrap_or(0);
    assert!(
        written > CHECKPOINT_BYTES_MAX,
        "{written} bytes of state and checkpoints"
    );
    assert!(largest <= CHECKPOINT_BYTES_MAX, "a checkpoint of {largest} bytes");

    tasks.tasks[1] = tasks.start(1).await.expect("restores from the changelog");
    for i in CARDS..2 * CARDS {
        append(&tasks, i);
    }
    tasks.drain().await;
    let expected: BTreeMap<String, (i64, String)> = (CARDS..2 * CARDS)
        .map(|i| {
            (
                format!("card-{:05}", i % CARDS),
                (2, format!("{i:06}{}", "x".repeat(NOTE_PAD))),
            )
        })
        .collect();
    let got = materialized(&tasks.io, &sink);
    assert_eq!(got.len(), expected.len());
    let wrong: Vec<_> = got
        .iter()
        .filter(|(card, row)| expected.get(*card) != Some(*row))
        .take(3)
        .collect();
    assert!(
        wrong.is_empty(),
        "cards whose row is not the reference's: {:?}",
        wrong.iter().map(|w| w.0).collect::<Vec<_>>()
    );
}

/// A window of 35,000 keys of 200 characters closes at once: its
/// tombstones (about 8 MB) are not a checkpoint's changes but go after it
/// in batches of their own, so no batch passes the limit; the window's
/// results are exact, and a task restored after the close holds nothing of
/// the closed window.
#[tokio::test]
async fn a_window_of_many_keys_closes_without_an_oversized_checkpoint() {
    let statement = "CREATE TABLE per_card AS SELECT card, COUNT(*) AS n FROM attempts \
                     WINDOW TUMBLING (SIZE 1 MINUTE, GRACE PERIOD 1 SECOND) GROUP BY card EMIT FINAL;";
    let plan = plan_in(vec![attempts()], statement).expect("plans");
    let mut tasks = Tasks::new(&plan, MemoryIo::default()).await;
    let sink = tasks.def.sink.clone();
    let keys = 35_000;
    let card = |i: usize| format!("card-{i:05}-{}", "x".repeat(200));
    let attempt = |card: String, at_ms: usize| {
        let value = json!({"card": card, "amount": 1, "at_ms": at_ms, "note": ""});
        Record {
            timestamp_ms: at_ms as i64,
            key: None,
            value: Some(value.to_string().into()),
            headers: Vec::new(),
        }
    };
    for i in 0..keys {
        tasks.io.append("attempts", 0, attempt(card(i), i % 60_000));
    }
    tasks.drain().await;
    tasks.io.append("attempts", 0, attempt(card(0), 200_000));
    tasks.drain().await;
    tasks.io.pass(CHECKPOINT_INTERVAL);
    tasks.drain().await;
    let batches = tasks.io.batches("q.checkpoints", 1);
    let largest = batches.iter().map(|b| b.size_bytes()).max().unwrap_or(0);
    assert!(largest <= CHECKPOINT_BYTES_MAX, "a batch of {largest} bytes");
    let tombstones = tasks
        .io
        .records("q.checkpoints", 1)
        .iter()
        .filter(|r| r.key.as_deref().is_some_and(|k| k.starts_with(b"s/")) && r.value.is_none())
        .count();
    assert_eq!(tombstones, keys, "one tombstone per closed aggregate");
    let results = tasks.io.records(&sink, 0);
    assert_eq!(results.len(), keys, "one final count per card");
    assert!(results.iter().all(|r| {
        let row: Value = serde_json::from_slice(r.value.as_deref().unwrap_or_default()).expect("JSON");
        row["N"] == json!(1)
    }));
    tasks.tasks[1] = tasks.start(1).await.expect("restores");
    tasks.drain().await;
    assert_eq!(tasks.io.records(&sink, 0).len(), keys, "nothing emitted again");
}

/// A checkpoint whose answers are lost (written, but the task hears
/// nothing) is sent again as it is: the task carries on rather than fail,
/// the partition holds that checkpoint once, and a restore finds it.
#[tokio::test]
async fn a_checkpoint_whose_answer_is_lost_is_sent_again_and_written_once() {
    let statement = "CREATE TABLE per_card AS SELECT card, COUNT(*) AS n FROM attempts GROUP BY card;";
    let plan = plan_in(vec![attempts()], statement).expect("plans");
    let mut tasks = Tasks::new(&plan, MemoryIo::default()).await;
    for i in 0..100 {
        append(&tasks, i);
    }
    tasks.drain().await;
    let chunks = |tasks: &Tasks| {
        let records = tasks.io.records("q.checkpoints", 1);
        records
            .iter()
            .filter(|r| r.key.as_deref() == Some(b"0/1".as_slice()))
            .count()
    };
    let before = chunks(&tasks);
    tasks.io.lose_answers("q.checkpoints", 1, 3);
    tasks.io.pass(CHECKPOINT_INTERVAL);
    tasks.drain().await;
    assert_eq!(chunks(&tasks), before + 1, "the checkpoint is written once");
    tasks.tasks[1] = tasks.start(1).await.expect("restores from it");
    for i in 100..200 {
        append(&tasks, i);
    }
    tasks.drain().await;
    assert_eq!(
        tasks
            .io
            .records("q.checkpoints", 1)
            .iter()
            .filter(|r| r.key.as_deref() == Some(b"barrier".as_slice()))
            .count(),
        2,
        "one claim per incarnation: the lost answers cost no restore"
    );
}
