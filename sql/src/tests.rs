//! The front end end to end without a cluster: statements parsed, planned,
//! compiled into the stages a node runs, and fed records; their output
//! checked against references computed here.

use std::collections::BTreeMap;

use runnel_client::plan::{Column, ObjectKind, SqlObject, SqlType};
use runnel_client::protocol::Catalog;
use runnel_dataflow::builder::Emitted;
use runnel_dataflow::compile::compile;
use runnel_dataflow::table::TableState;
use runnel_storage::{BatchBuilder, Record};
use serde_json::{json, Value};

use crate::from::input_of;
use crate::parse::{parse_statement, Statement};
use crate::planner::plan_query;

mod as_of;
mod purge;
mod state_store;
mod stream_join;
mod table_aggregate;
mod table_join;

/// A declared stream or table of `columns` over the topic named `name`
/// in lower case.
fn object(name: &str, kind: ObjectKind, columns: &[(&str, SqlType)], timestamp: Option<usize>) -> SqlObject {
    SqlObject {
        name: name.to_uppercase(),
        kind,
        topic: name.to_lowercase(),
        columns: columns
            .iter()
            .map(|(name, ty)| Column {
                name: name.to_string(),
                ty: *ty,
            })
            .collect(),
        timestamp,
        key: if kind == ObjectKind::Table { vec![0] } else { Vec::new() },
        windowed: false,
        query: None,
        statement: String::new(),
    }
}

/// `ATTEMPTS (CARD STRING, AMOUNT BIGINT, AT_MS BIGINT, NOTE STRING, META STRUCT)`, event time AT_MS.
fn attempts() -> SqlObject {
    use SqlType::*;
    let columns = [
        ("CARD", String),
        ("AMOUNT", BigInt),
        ("AT_MS", BigInt),
        ("NOTE", String),
        ("META", Json),
    ];
    object("attempts", ObjectKind::Stream, &columns, Some(2))
}

/// `CARDS (CARD STRING PRIMARY KEY, COUNTRY STRING, CARD_LIMIT BIGINT)`,
/// a declared table over topic `cards` (2 partitions).
fn cards() -> SqlObject {
    use SqlType::*;
    let columns = [("CARD", String), ("COUNTRY", String), ("CARD_LIMIT", BigInt)];
    object("cards", ObjectKind::Table, &columns, None)
}

fn plan(statement: &str) -> Result<runnel_client::plan::Plan, String> {
    plan_in(vec![attempts(), cards()], statement)
}

/// `statement`'s plan in a catalog of `objects`, writing topic `out`; the
/// tables a stream joins have 2 partitions.
fn plan_in(objects: Vec<SqlObject>, statement: &str) -> Result<runnel_client::plan::Plan, String> {
    let parsed = parse_statement(statement).map_err(|e| e.to_string())?;
    let query = match parsed.statement {
        Statement::Select(query) | Statement::CreateAs { query, .. } => query,
        other => return Err(format!("not a query: {other:?}")),
    };
    let catalog = Catalog {
        objects,
        queries: Vec::new(),
    };
    let mut input = input_of(&catalog, &query).map_err(|e| e.to_string())?;
    for join in &mut input.joins {
        join.partitions = 2;
    }
    plan_query(statement, &query, &input, "out")
        .map(|planned| planned.plan)
        .map_err(|e| e.to_string())
}

/// The rows of CARDS the join tests hold, as (partition, key, value)
/// records in order: c3 has no row, c9's is deleted, c1's updated.
fn card_records() -> Vec<(u32, &'static str, Option<Value>)> {
    vec![
        (0, "c0", Some(json!({"card": "c0", "country": "NL", "card_limit": 100}))),
        (1, "c1", Some(json!({"card": "c1", "country": "DE", "card_limit": 50}))),
        (0, "c2", Some(json!({"country": "FR", "card_limit": 10}))),
        (1, "c9", Some(json!({"card": "c9", "country": "BE", "card_limit": 1}))),
        (1, "c1", Some(json!({"card": "c1", "country": "US", "card_limit": 500}))),
        (1, "c9", None),
    ]
}

/// `plan`'s tables, holding `card_records`.
fn tables_of(def: &runnel_dataflow::DataflowDef) -> Vec<TableState> {
    let mut tables: Vec<TableState> = def.source_stage.table_states();
    for table in &mut tables {
        let mut builders = [BatchBuilder::new(), BatchBuilder::new()];
        for (partition, key, value) in card_records() {
            let record = Record {
                timestamp_ms: 0,
                key: Some(key.as_bytes().to_vec().into()),
                value: value.map(|v| v.to_string().into_bytes().into()),
                headers: Vec::new(),
            };
            builders[partition as usize].push(&record).expect("pushes");
        }
        for (partition, builder) in builders.into_iter().enumerate() {
            let batch = builder.build().expect("builds");
            for view in batch.views() {
                table.apply(partition as u32, &view.expect("view")).expect("applies");
            }
        }
    }
    tables
}

/// One output record: its key and value as JSON (`None` for a tombstone).
type Out = (Option<Value>, Option<Value>);

/// Runs `records` (JSON values) through every stage of `statement`'s plan,
/// one task per stage, the watermark following the largest event time, then
/// closes every window. Records that do not decode count as dead letters.
fn run(statement: &str, records: &[Value]) -> (Vec<Out>, usize, u64) {
    let plan = plan(statement).unwrap_or_else(|e| panic!("{statement}: {e}"));
    let def = compile("q", &plan).expect("compiles");
    let tables = tables_of(&def);
    let mut window = def.window_stage.as_ref().map(|factory| factory());
    let (mut staged, mut out) = (Emitted::default(), Emitted::default());
    let (mut dead_letters, mut watermark_ms) = (0, i64::MIN);
    for record in records {
        staged.clear();
        if def
            .source_stage
            .process_joined(record.to_string().as_bytes(), 0, &tables, &mut staged)
            .is_err()
        {
            dead_letters += 1;
            continue;
        }
        match &mut window {
            None => collect(&staged, &mut out),
            Some(window) => {
                for r in staged.iter() {
                    window
                        .add(
                            r.key.expect("key"),
                            r.value.unwrap_or_default(),
                            r.timestamp_ms,
                            &mut out,
                        )
                        .expect("adds");
                    watermark_ms = watermark_ms.max(r.timestamp_ms);
                }
                window.advance(watermark_ms, &mut out).expect("advances");
            }
        }
    }
    let late = match &mut window {
        Some(window) => {
            window.advance(i64::MAX, &mut out).expect("closes");
            window.late_records()
        }
        None => 0,
    };
    let parse = |bytes: Option<&[u8]>| bytes.map(|b| serde_json::from_slice(b).expect("JSON"));
    let records = out.iter().map(|r| (parse(r.key), parse(r.value))).collect();
    (records, dead_letters, late)
}

fn collect(from: &Emitted, to: &mut Emitted) {
    for r in from.iter() {
        let key = r.key.map(|k| to.encode(copy(k)).expect("copies"));
        let value = r.value.map(|v| to.encode(copy(v)).expect("copies"));
        to.push(r.timestamp_ms, key, value);
    }
}

fn copy(bytes: &[u8]) -> impl FnOnce(&mut Vec<u8>) -> Result<(), ()> + '_ {
    move |buffer| {
        buffer.extend_from_slice(bytes);
        Ok(())
    }
}

fn attempt(card: &str, amount: i64, at_ms: i64) -> Value {
    json!({"card": card, "amount": amount, "at_ms": at_ms, "note": format!("n-{amount}"), "meta": {"geo": {"country": "NL"}, "risk": amount % 7}})
}

/// A deterministic spread of attempts over 4 cards and 20 minutes.
fn traffic() -> Vec<Value> {
    let mut rng = runnel_dataflow::testing::Lcg::new(7);
    (0..400)
        .map(|i| {
            let state = rng.next_state();
            let card = format!("c{}", (state >> 33) % 4);
            let amount = ((state >> 40) % 1000) as i64;
            let at_ms = i * 3_000 - ((state >> 50) % 2_000) as i64;
            attempt(&card, amount, at_ms.max(0))
        })
        .collect()
}

/// The latest value per key (what an EMIT CHANGES sink holds in the end).
fn latest(out: &[Out]) -> BTreeMap<String, Value> {
    let mut latest = BTreeMap::new();
    for (key, value) in out {
        let key = key.as_ref().expect("keyed").to_string();
        match value {
            Some(value) => latest.insert(key, value.clone()),
            None => latest.remove(&key),
        };
    }
    latest
}

#[test]
fn stateless_queries_filter_project_and_evaluate_like_ksqldb() {
    let records = vec![
        attempt("c1", 10, 1_000),
        attempt("c2", 2_000, 2_000),
        json!({"card": "c3", "amount": null, "at_ms": 3_000}),
        json!({"card": "c4", "amount": "lots", "at_ms": 4_000}),
        json!("not an object"),
    ];
    let statement = "SELECT card, amount * 2 AS double_amount, UPPER(card) || '!' AS shout, \
        CASE WHEN amount > 100 THEN 'big' WHEN amount IS NULL THEN 'none' ELSE 'small' END AS size, \
        CAST(amount AS STRING) AS text, meta->geo->country AS country, LEN(note), SUBSTRING(card, 2) AS digits \
        FROM attempts WHERE card LIKE 'c%' AND (amount IS NULL OR amount < 5000) EMIT CHANGES";
    let (out, dead_letters, _) = run(statement, &records);
    assert_eq!(
        dead_letters, 2,
        "a string where a BIGINT is declared, and a value that is no object"
    );
    let values: Vec<Value> = out.into_iter().map(|(_, v)| v.expect("value")).collect();
    assert_eq!(
        values,
        vec![
            json!({"CARD": "c1", "DOUBLE_AMOUNT": 20, "SHOUT": "C1!", "SIZE": "small", "TEXT": "10", "COUNTRY": "NL", "KSQL_COL_0": 4, "DIGITS": "1"}),
            json!({"CARD": "c2", "DOUBLE_AMOUNT": 4000, "SHOUT": "C2!", "SIZE": "big", "TEXT": "2000", "COUNTRY": "NL", "KSQL_COL_0": 6, "DIGITS": "2"}),
            json!({"CARD": "c3", "DOUBLE_AMOUNT": null, "SHOUT": "C3!", "SIZE": "none", "TEXT": null, "COUNTRY": null, "KSQL_COL_0": null, "DIGITS": "3"}),
        ]
    );
    let (out, _, _) = run("SELECT card, amount FROM attempts PARTITION BY card", &records[..1]);
    assert_eq!(out[0].0, Some(json!({"CARD": "c1"})), "PARTITION BY keys the output");
}

#[test]
fn every_aggregate_over_tumbling_windows_equals_a_reference() {
    let records = traffic();
    let statement = "SELECT card, COUNT(*), COUNT(note), SUM(amount), MIN(amount), MAX(amount), AVG(amount), \
        COUNT_DISTINCT(amount % 10) AS digits, WINDOWSTART AS ws FROM attempts \
        WINDOW TUMBLING (SIZE 1 MINUTE, GRACE PERIOD 5 SECONDS) GROUP BY card EMIT FINAL";
    let (out, _, late) = run(statement, &records);
    assert_eq!(late, 0, "the traffic's disorder stays within the grace");
    let mut reference: BTreeMap<(String, i64), Vec<i64>> = BTreeMap::new();
    for r in &records {
        let start = r["at_ms"].as_i64().expect("time") / 60_000 * 60_000;
        reference
            .entry((r["card"].as_str().expect("card").to_string(), start))
            .or_default()
            .push(r["amount"].as_i64().expect("amount"));
    }
    assert_eq!(out.len(), reference.len(), "one final result per card and window");
    for (key, value) in &out {
        let (key, value) = (key.as_ref().expect("key"), value.as_ref().expect("value"));
        let card = key["CARD"].as_str().expect("card").to_string();
        let start = key["WINDOWSTART"].as_i64().expect("start");
        assert_eq!(key["WINDOWEND"].as_i64(), Some(start + 60_000));
        let amounts = &reference[&(card.clone(), start)];
        let sum: i64 = amounts.iter().sum();
        let distinct: std::collections::BTreeSet<i64> = amounts.iter().map(|a| a % 10).collect();
        let average = sum as f64 / amounts.len() as f64;
        let found_average = value["KSQL_COL_5"].as_f64().expect("AVG is a DOUBLE");
        // serde_json's default float parsing may be one ULP off.
        assert!((found_average - average).abs() < 1e-9, "{found_average} vs {average}");
        let mut value = value.clone();
        value["KSQL_COL_5"] = json!(null);
        let expected = json!({
            "CARD": card, "KSQL_COL_0": amounts.len(), "KSQL_COL_1": amounts.len(), "KSQL_COL_2": sum,
            "KSQL_COL_3": amounts.iter().min(), "KSQL_COL_4": amounts.iter().max(),
            "KSQL_COL_5": null, "DIGITS": distinct.len(), "WS": start,
        });
        assert_eq!(value, expected);
    }
}

#[test]
fn hopping_and_session_windows_and_emit_changes_equal_references() {
    let records = traffic();
    // Hopping: every record counts in each window of 2 minutes every 30 s
    // it falls in (windows may start before 0, as the builders' do).
    let statement = "SELECT card, COUNT(*) AS n FROM attempts \
        WINDOW HOPPING (SIZE 2 MINUTES, ADVANCE BY 30 SECONDS, GRACE PERIOD 5 SECONDS) GROUP BY card HAVING COUNT(*) > 2";
    let (out, _, _) = run(statement, &records);
    let mut reference: BTreeMap<(String, i64), u64> = BTreeMap::new();
    for r in &records {
        let t = r["at_ms"].as_i64().expect("time");
        let mut start = t / 30_000 * 30_000;
        while start > t - 120_000 {
            *reference
                .entry((r["card"].as_str().expect("card").to_string(), start))
                .or_default() += 1;
            start -= 30_000;
        }
    }
    reference.retain(|_, n| *n > 2);
    let found: BTreeMap<(String, i64), u64> = latest(&out)
        .into_iter()
        .map(|(key, value)| {
            let key: Value = serde_json::from_str(&key).expect("key");
            let card = key["CARD"].as_str().expect("card").to_string();
            (
                (card, key["WINDOWSTART"].as_i64().expect("start")),
                value["N"].as_u64().expect("n"),
            )
        })
        .collect();
    assert_eq!(found, reference, "EMIT CHANGES ends at the final counts");
    let changes = out.len();
    let total_above: u64 = reference.values().map(|n| n - 2).sum();
    assert_eq!(
        changes as u64, total_above,
        "one change per count above the HAVING bound"
    );

    // Sessions: a card's attempts closer than the gap form one session.
    let bursts: Vec<Value> = [0, 10_000, 15_000, 100_000, 105_000, 40_000]
        .iter()
        .map(|t| attempt("c", 1, *t))
        .collect();
    let statement = "SELECT card, COUNT(*) AS n, WINDOWSTART AS s, WINDOWEND AS e FROM attempts \
        WINDOW SESSION (30 SECONDS, GRACE PERIOD 2 MINUTES) GROUP BY card";
    let (out, _, _) = run(statement, &bursts);
    let mut sessions: Vec<(i64, i64, u64)> = latest(&out)
        .values()
        .map(|v| {
            (
                v["S"].as_i64().expect("s"),
                v["E"].as_i64().expect("e"),
                v["N"].as_u64().expect("n"),
            )
        })
        .collect();
    sessions.sort();
    // A session ends 1 ms after its last record.
    assert_eq!(
        sessions,
        vec![(0, 40_001, 4), (100_000, 105_001, 2)],
        "the 40 s attempt joins the first burst"
    );
    assert!(
        out.iter().any(|(_, v)| v.is_none()),
        "a merged-away session is retracted with a tombstone"
    );
}

#[test]
fn late_records_are_dropped_and_counted() {
    let records: Vec<Value> = [0, 70_000, 59_000, 120_500, 1_000]
        .iter()
        .map(|t| attempt("c", 1, *t))
        .collect();
    let statement =
        "SELECT card, COUNT(*) AS n FROM attempts WINDOW TUMBLING (SIZE 1 MINUTE, GRACE PERIOD 15 SECONDS) \
        GROUP BY card EMIT FINAL";
    let (out, _, late) = run(statement, &records);
    let counts: Vec<u64> = out
        .iter()
        .map(|(_, v)| v.as_ref().expect("value")["N"].as_u64().expect("n"))
        .collect();
    assert_eq!(
        counts,
        vec![2, 1, 1],
        "59 s is within the grace at 70 s; 1 s is not at 120.5 s"
    );
    assert_eq!(late, 1);
}

/// Found by fuzzing: an event time near i64::MAX overflowed window
/// arithmetic. Such a record is a dead letter; the rest count as before.
#[test]
fn event_times_no_window_holds_are_dead_letters() {
    let records: Vec<Value> = [0, i64::MAX, 30_000, i64::MIN, 1 << 60, 50_000]
        .iter()
        .map(|t| attempt("c", 1, *t))
        .collect();
    let statement = "SELECT card, COUNT(*) AS n FROM attempts WINDOW TUMBLING (SIZE 1 MINUTE) GROUP BY card EMIT FINAL";
    let (out, dead_letters, late) = run(statement, &records);
    assert_eq!((dead_letters, late), (3, 0));
    let counts: Vec<u64> = out
        .iter()
        .map(|(_, v)| v.as_ref().expect("value")["N"].as_u64().expect("n"))
        .collect();
    assert_eq!(counts, vec![3]);
}

#[test]
fn a_stream_joins_a_table_inner_and_left_as_the_table_stands() {
    let records = traffic();
    let countries = BTreeMap::from([("c0", "NL"), ("c1", "US"), ("c2", "FR")]);
    let statement = "SELECT a.card, c.country, a.amount FROM attempts a JOIN cards c ON a.card = c.card EMIT CHANGES";
    let (out, dead_letters, _) = run(statement, &records);
    assert_eq!(dead_letters, 0);
    let expected: Vec<Value> = records
        .iter()
        .filter_map(|r| {
            let card = r["card"].as_str().expect("card");
            let country = countries.get(card)?;
            Some(json!({"CARD": card, "COUNTRY": country, "AMOUNT": r["amount"]}))
        })
        .collect();
    assert!(
        expected.len() < records.len(),
        "c3 has no row: the inner join drops its attempts"
    );
    let found: Vec<Value> = out.into_iter().map(|(_, v)| v.expect("value")).collect();
    assert_eq!(found, expected);

    let statement = "SELECT * FROM attempts LEFT JOIN cards ON card_limit > 0 AND attempts.card = cards.card";
    assert!(plan(statement)
        .expect_err("not an equality")
        .contains("ON must be stream_expression = CARDS.CARD"));
    let statement = "SELECT * FROM attempts a LEFT OUTER JOIN cards c ON c.card = UPPER(a.card) || ''";
    let (out, _, _) = run(statement, &records[..3]);
    for (_, value) in &out {
        let value = value.as_ref().expect("value");
        assert_eq!(
            value["C_COUNTRY"],
            Value::Null,
            "no card is upper case: every row is kept, with NULLs"
        );
        assert!(
            value["A_CARD"].is_string() && value.get("C_CARD_LIMIT").is_some(),
            "{value}"
        );
    }
    assert_eq!(out.len(), 3);
}

/// The process query in miniature: attempts enriched with their
/// card's country, counted per country in 5-minute windows.
#[test]
fn counts_per_country_of_a_joined_stream_equal_a_reference() {
    let records = traffic();
    let countries = BTreeMap::from([("c0", "NL"), ("c1", "US"), ("c2", "FR")]);
    let statement = "SELECT c.country, COUNT(*) AS n, WINDOWSTART AS ws FROM attempts a LEFT JOIN cards c         ON a.card = c.card WINDOW TUMBLING (SIZE 5 MINUTES, GRACE PERIOD 5 SECONDS) GROUP BY c.country EMIT FINAL";
    let (out, _, late) = run(statement, &records);
    assert_eq!(late, 0);
    let mut reference: BTreeMap<(Option<String>, i64), u64> = BTreeMap::new();
    for r in &records {
        let country = countries.get(r["card"].as_str().expect("card")).map(|c| c.to_string());
        let start = r["at_ms"].as_i64().expect("time") / 300_000 * 300_000;
        *reference.entry((country, start)).or_default() += 1;
    }
    let found: BTreeMap<(Option<String>, i64), u64> = out
        .iter()
        .map(|(_, v)| {
            let v = v.as_ref().expect("value");
            let country = v["COUNTRY"].as_str().map(str::to_string);
            ((country, v["WS"].as_i64().expect("ws")), v["N"].as_u64().expect("n"))
        })
        .collect();
    assert_eq!(found, reference);
}

#[test]
fn refused_joins_name_the_problem() {
    for (statement, expected) in [
        (
            "SELECT * FROM attempts JOIN cards ON card = card",
            "column CARD is ambiguous: qualify it (CARDS.CARD)",
        ),
        (
            "SELECT * FROM attempts a JOIN cards c ON a.card = c.country",
            "CARDS joins on its PRIMARY KEY CARD, not on COUNTRY",
        ),
        (
            "SELECT * FROM attempts a JOIN cards c ON a.amount = c.card",
            "a join on values of different types: a.amount is BIGINT, C.CARD is STRING",
        ),
        (
            "SELECT * FROM attempts a JOIN attempts b ON a.card = b.card",
            "a join of two streams needs WITHIN",
        ),
        (
            "SELECT * FROM cards c JOIN attempts a ON a.card = c.card",
            "CARDS is a table and ATTEMPTS a stream: put the stream on the left",
        ),
        (
            "SELECT country, MAX(card_limit) FROM cards GROUP BY country",
            "MAX over a table (CARDS) cannot take a changed or deleted row's value back out",
        ),
        (
            "SELECT * FROM attempts a RIGHT JOIN cards c ON a.card = c.card",
            "only [INNER] JOIN, LEFT [OUTER] JOIN",
        ),
        (
            "SELECT * FROM attempts a FULL OUTER JOIN cards c ON a.card = c.card",
            "a stream–table join is [INNER] JOIN or LEFT JOIN, not FULL OUTER JOIN",
        ),
        (
            "SELECT * FROM attempts a JOIN cards c ON a.card = c.nope",
            "CARDS has no column NOPE",
        ),
        (
            "SELECT * FROM attempts a JOIN cards a ON a.card = a.card",
            "A names two relations",
        ),
        (
            "SELECT x.* FROM attempts a JOIN cards c ON a.card = c.card",
            "X.* names no stream or table",
        ),
        (
            "SELECT country FROM attempts a JOIN cards c ON a.card = c.card JOIN cards d ON a.card = d.card",
            "column COUNTRY is ambiguous",
        ),
        ("SELECT * FROM attempts, cards", "FROM takes one stream"),
    ] {
        let refused = plan(statement).expect_err(statement);
        assert!(refused.contains(expected), "{statement}: {refused}");
    }
}

#[test]
fn refused_statements_name_the_problem() {
    let refused = [
        ("SELECT nope FROM attempts", "unknown column NOPE"),
        ("SELECT SUM(card) FROM attempts GROUP BY amount", "takes a number"),
        (
            "SELECT card FROM attempts WINDOW TUMBLING (SIZE 1 MINUTE)",
            "WINDOW needs a GROUP BY",
        ),
        (
            "SELECT card, amount, COUNT(*) FROM attempts GROUP BY card",
            "AMOUNT must be in the GROUP BY",
        ),
        ("SELECT FROBNICATE(card) FROM attempts", "unknown function FROBNICATE"),
        ("SELECT card FROM attempts WHERE amount", "WHERE needs a BOOLEAN"),
        (
            "SELECT card FROM attempts WHERE card > 3",
            "cannot compare STRING with BIGINT",
        ),
        (
            "SELECT card FROM attempts EMIT FINAL",
            "EMIT FINAL needs a windowed aggregate",
        ),
        ("SELECT card, card FROM attempts", "two columns named CARD"),
        ("SELECT COUNT(*) FROM attempts", "needs a GROUP BY"),
        ("SELECT card FROM attempts HAVING card = 'x'", "HAVING needs a GROUP BY"),
        ("SELECT SUM(COUNT(*)) FROM attempts GROUP BY card", "cannot nest"),
        (
            "SELECT card FROM attempts WINDOW TUMBLING (SIZE 1 MINUTE, ADVANCE BY 1 SECOND) GROUP BY card",
            "takes SIZE and GRACE, not ADVANCE",
        ),
        (
            "SELECT card FROM attempts WINDOW HOPPING (SIZE 1 MINUTE, ADVANCE BY 2 MINUTES) GROUP BY card",
            "must not exceed",
        ),
        (
            "SELECT card FROM attempts WINDOW HOPPING (SIZE 1 MINUTE) GROUP BY card",
            "needs ADVANCE",
        ),
    ];
    for (statement, expected) in refused {
        let error = plan(statement).map(|p| format!("{p:?}")).expect_err(statement);
        assert!(error.contains(expected), "{statement}: {error}");
    }
    let deep = format!(
        "SELECT card FROM attempts WHERE {}TRUE{}",
        "(".repeat(80),
        ")".repeat(80)
    );
    let error = plan(&deep).expect_err("too deep");
    assert!(error.contains("nests too deep"), "{error}");
}

#[test]
fn the_seed_statement_plans_to_a_repartition_and_a_windowed_count() {
    let seed = "CREATE STREAM possible_fraud AS SELECT card, count(*) FROM attempts \
        WINDOW TUMBLING (SIZE 5 MINUTE) GROUP BY card HAVING count(*) > 3";
    let plan = plan(seed).expect("plans");
    assert_eq!(plan.stages(), 2);
    let explained = plan.explain("CSAS_POSSIBLE_FRAUD");
    for part in [
        "REPARTITION BY CARD (carrying [])",
        "CountRows(*) AS KSQL_AGG_0",
        "FILTER (KSQL_AGG_0 > 3)",
        "PROJECT CARD AS CARD, KSQL_AGG_0 AS KSQL_COL_0",
    ] {
        assert!(explained.contains(part), "{part} in:\n{explained}");
    }
    let columns: Vec<&str> = plan.sink.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!((columns, plan.sink.key.clone()), (vec!["CARD", "KSQL_COL_0"], vec![0]));
}

#[test]
fn an_unwindowed_aggregate_is_a_table_of_each_keys_latest_values() {
    let records = traffic();
    let statement =
        "CREATE TABLE totals AS SELECT card, COUNT(*) AS n, SUM(amount) AS total FROM attempts GROUP BY card";
    let (out, _, _) = run(statement, &records);
    assert_eq!(out.len(), records.len(), "EMIT CHANGES: one change per record");
    let mut reference: BTreeMap<String, (u64, i64)> = BTreeMap::new();
    for r in &records {
        let entry = reference
            .entry(r["card"].as_str().expect("card").to_string())
            .or_default();
        entry.0 += 1;
        entry.1 += r["amount"].as_i64().expect("amount");
    }
    let table: BTreeMap<String, (u64, i64)> = latest(&out)
        .into_iter()
        .map(|(key, value)| {
            let key: Value = serde_json::from_str(&key).expect("key");
            assert!(
                key.get("WINDOWSTART").is_none(),
                "an unwindowed key has no bounds: {key}"
            );
            let card = key["CARD"].as_str().expect("card").to_string();
            (
                card,
                (value["N"].as_u64().expect("n"), value["TOTAL"].as_i64().expect("total")),
            )
        })
        .collect();
    assert_eq!(table, reference);
}

/// `COUNTS`, a windowed count per card with HAVING, in a catalog, and its
/// window stage fed: card a 3 attempts in the first minute and 1 in the
/// second, card b 2 and 2.
struct PullFixture {
    catalog: runnel_client::protocol::Catalog,
    counts: SqlObject,
    window: Box<dyn runnel_dataflow::builder::WindowStage>,
}

impl PullFixture {
    fn new() -> PullFixture {
        use runnel_client::protocol::{Catalog, DataflowMeta, NodeId};
        let statement = "CREATE TABLE counts AS SELECT card, COUNT(*) AS n FROM attempts \
            WINDOW TUMBLING (SIZE 1 MINUTE) GROUP BY card HAVING COUNT(*) > 1;";
        let plan = plan(statement).expect("plans");
        let meta = DataflowMeta {
            name: "CTAS_COUNTS_0".into(),
            source: "attempts".into(),
            sink: "out".into(),
            stages: 2,
            partitions: 1,
            placement: vec![NodeId(1), NodeId(1)],
        };
        let counts = SqlObject {
            name: "COUNTS".into(),
            kind: ObjectKind::Table,
            topic: "out".into(),
            columns: plan.sink.columns.clone(),
            timestamp: None,
            key: plan.sink.key.clone(),
            windowed: true,
            query: Some(meta.name.clone()),
            statement: statement.into(),
        };
        let def = compile("q", &plan).expect("compiles");
        let mut window = def.window_stage.as_ref().expect("an aggregate")();
        let (mut staged, mut out) = (Emitted::default(), Emitted::default());
        let input = [
            ("a", 1_000),
            ("a", 2_000),
            ("b", 3_000),
            ("a", 4_000),
            ("b", 5_000),
            ("a", 61_000),
            ("b", 62_000),
            ("b", 63_000),
        ];
        for (card, at_ms) in input {
            let value = json!({"card": card, "amount": 1, "at_ms": at_ms}).to_string();
            def.source_stage
                .process(value.as_bytes(), 0, &mut staged)
                .expect("decodes");
        }
        for r in staged.iter() {
            let (key, value) = (r.key.unwrap_or_default(), r.value.unwrap_or_default());
            window.add(key, value, r.timestamp_ms, &mut out).expect("adds");
        }
        let catalog = Catalog {
            objects: vec![attempts(), counts.clone()],
            queries: vec![(meta, plan)],
        };
        PullFixture {
            catalog,
            counts,
            window,
        }
    }

    /// `select` planned as a pull query and answered from the stage.
    fn pull(&self, select: &str) -> Result<Vec<Vec<String>>, String> {
        use crate::pull::PullQuery;
        use crate::session::Outcome;
        let parsed = parse_statement(select).map_err(|e| e.to_string())?;
        let Statement::Select(query) = parsed.statement else {
            panic!("a select")
        };
        let object = if select.contains("attempts") {
            attempts()
        } else {
            self.counts.clone()
        };
        let pulled = PullQuery::plan(&self.catalog, &object, &query).map_err(|e| e.to_string())?;
        let read = self
            .window
            .read(pulled.key(), 100)
            .expect("reads")
            .expect("within the limit");
        match pulled.rows(&read).map_err(|e| e.to_string())? {
            Outcome::Table { rows, .. } => Ok(rows),
            other => panic!("{other:?}"),
        }
    }
}

/// A pull query's key is the one the aggregate's tasks group by: the rows
/// read from a stage fed the input are the reference's, filtered and
/// projected; shapes a pull query cannot take are refused by name.
#[test]
fn pull_queries_read_the_aggregate_state_by_its_key() {
    let fixture = PullFixture::new();
    let pull = |select: &str| fixture.pull(select);
    assert_eq!(
        pull("SELECT * FROM counts WHERE card = 'a';"),
        Ok(vec![vec!["a".into(), "3".into(), "0".into(), "60000".into()]]),
        "HAVING drops a's second minute"
    );
    assert_eq!(
        pull("SELECT n AS total, WINDOWSTART FROM counts WHERE card = 'b' AND WINDOWSTART >= 60000;"),
        Ok(vec![vec!["2".into(), "60000".into()]])
    );
    assert_eq!(
        pull("SELECT card FROM counts WHERE card >= 'a' LIMIT 2;").map(|r| r.len()),
        Ok(2),
        "a range scan"
    );
    assert_eq!(pull("SELECT * FROM counts WHERE card = 'zzz';"), Ok(vec![]));
    for (select, error) in [
        ("SELECT * FROM counts WHERE n > 1;", "looks rows up by its key CARD"),
        ("SELECT * FROM counts WHERE card = 3;", "CARD is STRING"),
        ("SELECT n + 1 FROM counts WHERE card = 'a';", "selects columns"),
        (
            "SELECT card, COUNT(*) FROM counts GROUP BY card;",
            "no WINDOW, GROUP BY",
        ),
        ("SELECT * FROM counts WHERE card = 'a' OR card = 'b';", "joined by AND"),
        ("SELECT nope FROM counts WHERE card = 'a';", "unknown column NOPE"),
        ("SELECT * FROM attempts WHERE card = 'a';", "ATTEMPTS holds no state"),
    ] {
        let refused = pull(select).expect_err(select);
        assert!(refused.contains(error), "{select}: {refused}");
    }
}

/// ksqlDB's EXPLODE: a row per element of an array, the other columns
/// repeated; none for NULL, an empty array or an object.
#[test]
fn explode_makes_a_row_per_array_element() {
    let records = [
        json!({"card": "c1", "amount": 5, "at_ms": 1, "meta": {"tags": ["a", 2, {"x": true}]}}),
        json!({"card": "c2", "amount": 6, "at_ms": 2, "meta": {"tags": []}}),
        json!({"card": "c3", "amount": 7, "at_ms": 3, "meta": {"tags": {"not": "an array"}}}),
        json!({"card": "c4", "amount": 8, "at_ms": 4}),
        json!({"card": "c5", "amount": 9, "at_ms": 5, "meta": {"tags": [null, 1.5]}}),
    ];
    let statement =
        "SELECT card, EXPLODE(meta->tags) AS tag, amount * 2 AS doubled FROM attempts WHERE amount > 0 EMIT CHANGES";
    let (out, dead_letters, _) = run(statement, &records);
    assert_eq!(dead_letters, 0);
    let rows: Vec<Value> = out.into_iter().map(|(_, v)| v.expect("a row")).collect();
    assert_eq!(
        rows,
        [
            json!({"CARD": "c1", "TAG": "a", "DOUBLED": 10}),
            json!({"CARD": "c1", "TAG": 2, "DOUBLED": 10}),
            json!({"CARD": "c1", "TAG": {"x": true}, "DOUBLED": 10}),
            json!({"CARD": "c5", "TAG": null, "DOUBLED": 18}),
            json!({"CARD": "c5", "TAG": 1.5, "DOUBLED": 18}),
        ]
    );
    // Bounded: at most 10,000 elements, and 16 MiB of copied rows; past
    // either the record is a dead letter, naming the bound.
    let many: Vec<i64> = (0..9_000).collect();
    let too_many: Vec<i64> = (0..10_001).collect();
    let huge = [
        json!({"card": "c6", "amount": 1, "at_ms": 6, "meta": {"tags": many}}),
        json!({"card": "c7", "amount": 1, "at_ms": 7, "meta": {"tags": too_many}}),
    ];
    let (out, dead_letters, _) = run(statement, &huge);
    assert_eq!((out.len(), dead_letters), (0, 2));
    let planned = plan("SELECT *, EXPLODE(meta) FROM attempts").expect("plans");
    let names: Vec<&str> = planned.sink.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["CARD", "AMOUNT", "AT_MS", "NOTE", "META", "KSQL_COL_0"],
        "* shows no exploded column"
    );
    assert!(
        planned.explain("q").contains("EXPLODE META"),
        "{}",
        planned.explain("q")
    );
    for (statement, expected) in [
        ("SELECT EXPLODE(amount) FROM attempts", "EXPLODE takes an array"),
        (
            "SELECT card, EXPLODE(meta), COUNT(*) FROM attempts GROUP BY card",
            "EXPLODE works in a query without GROUP BY",
        ),
        (
            "SELECT EXPLODE(meta), EXPLODE(meta) AS b FROM attempts",
            "one EXPLODE per query",
        ),
        ("SELECT EXPLODE(meta, meta) FROM attempts", "EXPLODE takes one array"),
        (
            "SELECT UPPER(EXPLODE(meta)) FROM attempts",
            "EXPLODE is a table function",
        ),
    ] {
        let refused = plan(statement).expect_err(statement);
        assert!(refused.contains(expected), "{statement}: {refused}");
    }
}

/// A query's tasks (one per stage, one partition each), run by the real
/// task code over an in-memory cluster.
struct Tasks {
    def: std::sync::Arc<runnel_dataflow::builder::DataflowDef>,
    io: std::sync::Arc<runnel_dataflow::testing::MemoryIo>,
    tasks: Vec<runnel_dataflow::task::TaskRunner<runnel_dataflow::testing::MemoryIo>>,
}

impl Tasks {
    async fn new(plan: &runnel_client::plan::Plan, io: runnel_dataflow::testing::MemoryIo) -> Tasks {
        let def = std::sync::Arc::new(compile("q", plan).expect("compiles"));
        let mut tasks = Tasks {
            def,
            io: std::sync::Arc::new(io),
            tasks: Vec::new(),
        };
        for task in 0..tasks.def.stages() {
            let runner = tasks.start(task).await.expect("starts");
            tasks.tasks.push(runner);
        }
        tasks
    }

    /// Task `task` as it starts or restores from its checkpoint partition.
    async fn start(
        &self,
        task: u32,
    ) -> Result<runnel_dataflow::task::TaskRunner<runnel_dataflow::testing::MemoryIo>, runnel_dataflow::task::TaskError>
    {
        let assignment = runnel_client::tasks::TaskAssignment {
            dataflow: "q".into(),
            task,
            partitions: 1,
            stages: self.def.stages(),
            generation: 0,
        };
        let status = std::sync::Arc::new(std::sync::Mutex::new(runnel_client::tasks::TaskStatus::default()));
        runnel_dataflow::task::TaskRunner::restore(self.def.clone(), assignment, self.io.clone(), status).await
    }

    /// Steps every task until none reads anything.
    async fn drain(&mut self) {
        for _ in 0..1000 {
            let mut read = false;
            for task in &mut self.tasks {
                read |= task.step().await.expect("steps");
            }
            if !read {
                return;
            }
        }
        panic!("the tasks still read after 1,000 rounds");
    }
}
