//! A join by event time with a grace, run by the real task over an
//! in-memory log: a stream record waits until the stream time is the grace
//! past it, so a table row dated before it but read after it still joins
//! it; the records held survive a restart in the checkpoint, and nothing
//! is emitted twice.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use runnel_client::tasks::{TaskAssignment, TaskStatus};
use runnel_dataflow::task::{TaskRunner, CHECKPOINT_INTERVAL};
use runnel_dataflow::testing::MemoryIo;
use runnel_dataflow::{Dataflow, DataflowDef};
use runnel_storage::Record;

/// A record of `topic`'s partition 0.
fn append(io: &MemoryIo, topic: &str, key: &str, timestamp_ms: i64, value: &str) {
    let record = Record {
        timestamp_ms,
        key: Some(key.to_string().into()),
        value: Some(value.to_string().into()),
        headers: Vec::new(),
    };
    io.append(topic, 0, record);
}

fn values(io: &MemoryIo, topic: &str) -> Vec<String> {
    io.records(topic, 0)
        .iter()
        .map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned())
        .collect()
}

#[derive(serde::Deserialize)]
struct Card {
    country: String,
}

/// Attempts `(card, time)` joined with their card's country as of their
/// time (NULL when none), with `grace_ms`.
fn dated(grace_ms: u64) -> Arc<DataflowDef> {
    let def = Dataflow::new("dated")
        .source::<(String, i64)>("attempts")
        .join_table_as_of(
            "cards",
            1,
            (Duration::from_secs(3_600), Duration::from_millis(grace_ms)),
            |(card, _)| card.clone(),
            |(card, at_ms), row: Option<Card>| Some((card, at_ms, row.map(|c| c.country))),
        )
        .sink("out");
    Arc::new(def)
}

async fn start(def: &Arc<DataflowDef>, io: &Arc<MemoryIo>) -> TaskRunner<MemoryIo> {
    let assignment = TaskAssignment {
        dataflow: def.name.clone(),
        task: 0,
        partitions: 1,
        stages: 1,
        generation: 0,
    };
    let status = Arc::new(Mutex::new(TaskStatus::default()));
    TaskRunner::restore(def.clone(), assignment, io.clone(), status)
        .await
        .expect("restores")
}

/// An attempt of card `a` at `at_ms`.
fn attempt(io: &MemoryIo, at_ms: i64) {
    append(io, "attempts", "", at_ms, &format!(r#"["a",{at_ms}]"#));
}

/// A step, and time for a checkpoint (which reads the table on).
async fn step(task: &mut TaskRunner<MemoryIo>, io: &MemoryIo) {
    task.step().await.expect("steps");
    io.pass(CHECKPOINT_INTERVAL + Duration::from_millis(1));
    task.step().await.expect("steps");
}

/// Runs the scenario: a row from 0, attempts at 1,000 and 2,000, then a
/// row dated 1,500 read only after them, then attempts at 3,000 and (after
/// a restart) 5,000.
async fn run(grace_ms: u64) -> Vec<String> {
    let io = Arc::new(MemoryIo::default());
    append(&io, "cards", "a", 0, r#"{"country":"NL"}"#);
    let def = dated(grace_ms);
    let mut task = start(&def, &io).await;
    attempt(&io, 1_000);
    attempt(&io, 2_000);
    step(&mut task, &io).await;
    append(&io, "cards", "a", 1_500, r#"{"country":"DE"}"#);
    step(&mut task, &io).await;
    attempt(&io, 3_000);
    step(&mut task, &io).await;
    drop(task); // a crash: what it held is in its checkpoint
    let mut task = start(&def, &io).await;
    attempt(&io, 5_000);
    step(&mut task, &io).await;
    values(&io, "out")
}

#[tokio::test]
async fn a_row_read_late_but_dated_within_the_grace_still_joins_and_held_records_survive_a_restart() {
    assert_eq!(
        run(1_000).await,
        [r#"["a",1000,"NL"]"#, r#"["a",2000,"DE"]"#, r#"["a",3000,"DE"]"#],
        "2,000 waits for stream time 3,000, by when the row of 1,500 is read; 5,000 waits still"
    );
    assert_eq!(
        run(0).await,
        [
            r#"["a",1000,"NL"]"#,
            r#"["a",2000,"NL"]"#,
            r#"["a",3000,"DE"]"#,
            r#"["a",5000,"DE"]"#
        ],
        "without a grace each attempt joins what was read when it came"
    );
}

/// The attempts at `times`, read `fetch_records_max` at a time (all at
/// once when 0), through a grace of 1 s; what the sink holds.
async fn read_in_fetches_of(fetch_records_max: usize, times: &[i64]) -> Vec<String> {
    let io = Arc::new(MemoryIo::fetching(fetch_records_max));
    append(&io, "cards", "a", 0, r#"{"country":"NL"}"#);
    let def = dated(1_000);
    let mut task = start(&def, &io).await;
    for &at_ms in times {
        attempt(&io, at_ms);
    }
    for _ in 0..times.len() {
        task.step().await.expect("steps");
    }
    values(&io, "out")
}

#[tokio::test]
async fn what_leaves_the_grace_and_in_which_order_does_not_depend_on_how_the_input_was_fetched() {
    // 5,000 leaves when 7,000 is read; 3,000 (older than the grace) at once.
    let times = [5_000, 7_000, 3_000, 9_000];
    let one_by_one = read_in_fetches_of(1, &times).await;
    assert_eq!(
        one_by_one,
        [r#"["a",5000,"NL"]"#, r#"["a",3000,"NL"]"#, r#"["a",7000,"NL"]"#]
    );
    assert_eq!(
        read_in_fetches_of(0, &times).await,
        one_by_one,
        "a replay reads in other fetches"
    );
}
