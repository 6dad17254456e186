//! Stream–table joins by event time (`FOR SYSTEM_TIME AS OF`) without a
//! cluster: the table's records, written out of time order with updates
//! and deletions, feed the stage's tables; each attempt must join the
//! card's row in force at the attempt's time, as a reference computed here
//! from the same records finds it.

use runnel_dataflow::builder::Emitted;
use runnel_dataflow::compile::compile;
use runnel_dataflow::table::TableState;
use runnel_storage::{BatchBuilder, Record};
use serde_json::{json, Value};

use super::{plan, traffic};

/// One table record: partition, key, time (ms) and row (`None` deletes).
type CardRecord = (u32, String, i64, Option<Value>);

/// Rows of c0..c3 over the traffic's 20 minutes, in a log order that is
/// not time order: each key's records are shuffled within its partition.
fn card_history() -> Vec<CardRecord> {
    let mut rng = runnel_dataflow::testing::Lcg::new(11);
    let mut next = move || {
        let state = rng.next_state();
        state >> 33
    };
    let countries = ["NL", "DE", "FR", "BE", "US"];
    let mut records = Vec::new();
    for i in 0..60 {
        let card = format!("c{}", next() % 4);
        let at_ms = (next() % 1_250_000) as i64;
        let row = match i % 7 {
            6 => None,
            _ => Some(json!({"card": card, "country": countries[next() as usize % 5], "card_limit": i})),
        };
        let partition = card.as_bytes()[1] as u32 % 2;
        records.push((partition, card, at_ms, row));
    }
    records
}

/// The row of `card` in force at `at_ms`: its record of the latest time
/// at or before it (a later one in the log wins a tie), unless a deletion.
fn reference(records: &[CardRecord], card: &str, at_ms: i64) -> Option<Value> {
    let mut found: Option<&CardRecord> = None;
    for record in records.iter().filter(|r| r.1 == card && r.2 <= at_ms) {
        if found.is_none_or(|f| record.2 >= f.2) {
            found = Some(record);
        }
    }
    found.and_then(|r| r.3.clone())
}

fn feed(tables: &mut [TableState], records: &[CardRecord]) {
    for table in tables {
        for partition in 0..2 {
            let mut builder = BatchBuilder::new();
            let mut written = records.iter().filter(|r| r.0 == partition).peekable();
            if written.peek().is_none() {
                continue;
            }
            for (_, key, at_ms, row) in written {
                let record = Record {
                    timestamp_ms: *at_ms,
                    key: Some(key.as_bytes().to_vec().into()),
                    value: row.as_ref().map(|v| v.to_string().into_bytes().into()),
                    headers: Vec::new(),
                };
                builder.push(&record).expect("pushes");
            }
            let batch = builder.build().expect("builds");
            for view in batch.views() {
                table.apply(partition, &view.expect("view")).expect("applies");
            }
        }
    }
}

/// `statement`'s output values for `attempts`, its tables holding `records`.
fn joined(statement: &str, attempts: &[Value], records: &[CardRecord]) -> Vec<Value> {
    let plan = plan(statement).unwrap_or_else(|e| panic!("{statement}: {e}"));
    let def = compile("q", &plan).expect("compiles");
    let mut tables = def.source_stage.table_states();
    feed(&mut tables, records);
    let mut out = Emitted::default();
    for attempt in attempts {
        def.source_stage
            .process_joined(attempt.to_string().as_bytes(), 0, &tables, &mut out)
            .expect("processes");
    }
    out.iter()
        .map(|r| serde_json::from_slice(r.value.expect("value")).expect("JSON"))
        .collect()
}

#[test]
fn each_attempt_joins_its_cards_row_as_it_was_at_the_attempts_time() {
    let (attempts, records) = (traffic(), card_history());
    let statement = "SELECT a.card, a.at_ms, c.country, c.card_limit FROM attempts a \
        LEFT JOIN cards FOR SYSTEM_TIME AS OF a.at_ms AS c ON a.card = c.card EMIT CHANGES";
    let found = joined(statement, &attempts, &records);
    let expected: Vec<Value> = attempts
        .iter()
        .map(|a| {
            let row = reference(
                &records,
                a["card"].as_str().expect("card"),
                a["at_ms"].as_i64().expect("time"),
            );
            json!({
                "CARD": a["card"],
                "AT_MS": a["at_ms"],
                "COUNTRY": row.as_ref().map_or(Value::Null, |r| r["country"].clone()),
                "CARD_LIMIT": row.as_ref().map_or(Value::Null, |r| r["card_limit"].clone()),
            })
        })
        .collect();
    assert_eq!(found, expected);
    let matched = expected.iter().filter(|v| !v["COUNTRY"].is_null()).count();
    assert!(
        matched > 100 && matched < attempts.len(),
        "the history answers most attempts, not all: {matched}"
    );
    let latest: Vec<Value> = joined(
        "SELECT a.card, c.country FROM attempts a JOIN cards c ON a.card = c.card EMIT CHANGES",
        &attempts,
        &records,
    );
    let as_of: Vec<Value> = joined(
        "SELECT a.card, c.country FROM attempts a JOIN cards FOR SYSTEM_TIME AS OF at_ms c ON a.card = c.card EMIT CHANGES",
        &attempts,
        &records,
    );
    assert_eq!(
        as_of.len(),
        matched,
        "an inner join drops the attempts no row was in force for"
    );
    assert_ne!(latest, as_of, "joining the latest rows answers otherwise");
}

#[test]
fn history_bounds_how_far_back_a_lookup_is_answered() {
    let records: Vec<CardRecord> = vec![
        (
            0,
            "c0".into(),
            1_000,
            Some(json!({"card": "c0", "country": "NL", "card_limit": 1})),
        ),
        (
            0,
            "c0".into(),
            9_000,
            Some(json!({"card": "c0", "country": "DE", "card_limit": 2})),
        ),
        (
            0,
            "c0".into(),
            4_000,
            Some(json!({"card": "c0", "country": "late", "card_limit": 3})),
        ),
    ];
    let attempt = |at_ms: i64| json!({"card": "c0", "amount": 1, "at_ms": at_ms});
    let attempts = [attempt(6_999), attempt(7_000), attempt(9_000)];
    let statement =
        "SELECT c.country FROM attempts a LEFT JOIN cards FOR SYSTEM_TIME AS OF a.at_ms HISTORY 2 SECONDS c \
        ON a.card = c.card";
    let countries: Vec<Value> = joined(statement, &attempts, &records)
        .into_iter()
        .map(|v| v["COUNTRY"].clone())
        .collect();
    // The newest time is 9,000: the history begins at 7,000, and the
    // record of 4,000 came too late to be kept.
    assert_eq!(countries, [Value::Null, json!("NL"), json!("DE")]);
    let statement = "SELECT c.country FROM attempts a JOIN cards FOR SYSTEM_TIME AS OF a.ROWTIME c ON a.card = c.card";
    let at_zero = joined(statement, &attempts, &records);
    assert!(at_zero.is_empty(), "ROWTIME is 0 here: no row was in force then");
}

#[test]
fn a_join_by_event_time_explains_itself_and_refuses_what_it_cannot_be() {
    let planned =
        plan("SELECT * FROM attempts a JOIN cards FOR SYSTEM_TIME AS OF a.at_ms c ON a.card = c.card").expect("plans");
    let explained = planned.explain("Q");
    assert!(
        explained.contains(
            "AS OF AT_MS (the table's rows by its records' timestamps, 86400000 ms of history kept, 0 ms of grace)"
        ),
        "{explained}"
    );
    let graced = plan(
        "SELECT * FROM attempts a JOIN cards FOR SYSTEM_TIME AS OF a.at_ms HISTORY 1 HOUR GRACE PERIOD 5 SECONDS c \
         ON a.card = c.card",
    )
    .expect("plans");
    let aliased = plan("SELECT * FROM attempts a JOIN cards c FOR SYSTEM_TIME AS OF a.at_ms ON a.card = c.card")
        .expect("the alias may come before FOR");
    assert_eq!(aliased.joins().count(), 1);
    let explained = graced.explain("Q");
    assert!(
        explained.contains("3600000 ms of history kept, 5000 ms of grace"),
        "{explained}"
    );
    for (statement, expected) in [
        (
            "SELECT * FROM attempts a JOIN cards FOR SYSTEM_TIME AS OF a.note c ON a.card = c.card",
            "a.note is STRING; it must be a BIGINT time in ms",
        ),
        (
            "SELECT * FROM attempts a JOIN cards FOR SYSTEM_TIME AS OF c.card_limit c ON a.card = c.card",
            "unknown column CARD_LIMIT; known: A.CARD, A.AMOUNT, A.AT_MS",
        ),
        (
            "SELECT * FROM attempts a JOIN attempts FOR SYSTEM_TIME AS OF a.at_ms b WITHIN 1 MINUTE ON a.card = b.card",
            "FOR SYSTEM_TIME AS OF follows a table a stream joins with, once per table; ATTEMPTS is not one",
        ),
        (
            "SELECT * FROM attempts a JOIN cards FOR SYSTEM_TIME OF a.at_ms c ON a.card = c.card",
            "expected AS in FOR SYSTEM_TIME AS OF",
        ),
        (
            "SELECT * FROM attempts a JOIN cards FOR SYSTEM_TIME AS OF a.at_ms HISTORY 2 c ON a.card = c.card",
            "expected a unit",
        ),
        (
            "SELECT * FROM attempts a JOIN cards FOR SYSTEM_TIME AS OF a.at_ms GRACE 2 SECONDS c ON a.card = c.card",
            "expected PERIOD after GRACE",
        ),
        (
            "SELECT * FROM attempts a JOIN cards FOR SYSTEM_TIME AS OF a.amount GRACE PERIOD 2 SECONDS c ON a.card = c.card",
            "a GRACE PERIOD holds rows by ATTEMPTS's event time, AT_MS: FOR SYSTEM_TIME AS OF must name it, not a.amount",
        ),
    ] {
        let refused = plan(statement).expect_err(statement);
        assert!(refused.contains(expected), "{statement}: {refused}");
    }
}
