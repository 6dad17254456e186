//! Aggregates over a table end to end without a cluster: the table's
//! changes (inserts, updates that move a row to another group or out of
//! the WHERE, deletions, deletions of keys never written) run through the
//! changes stage into the aggregate, and the table the output materializes
//! must equal the aggregate of the table as it stands, computed here.

use std::collections::BTreeMap;

use runnel_client::plan::{ObjectKind, SqlObject, SqlType};
use runnel_dataflow::builder::WindowStage;
use runnel_dataflow::compile::compile;
use runnel_dataflow::task::CHECKPOINT_INTERVAL;
use runnel_dataflow::testing::{self, MemoryIo};
use runnel_storage::Record;
use serde_json::{json, Value};

use super::{object, plan_in, Tasks};

fn users() -> SqlObject {
    use SqlType::*;
    let columns = [("ID", String), ("COUNTRY", String), ("AGE", BigInt)];
    object("users", ObjectKind::Table, &columns, None)
}

fn plan(statement: &str) -> Result<runnel_client::plan::Plan, String> {
    let stream = object("clicks", ObjectKind::Stream, &[("ID", SqlType::String)], None);
    let mut windowed = users();
    (windowed.name, windowed.windowed) = ("WINDOWED".into(), true);
    plan_in(vec![users(), stream, windowed], statement)
}

/// `plan` over USERS as a table a query writes: keyed by a JSON object,
/// its value holding every column.
fn derived_plan(statement: &str) -> Result<runnel_client::plan::Plan, String> {
    let mut derived = users();
    derived.query = Some("CTAS_USERS_0".into());
    plan_in(vec![derived], statement)
}

/// `changes` as a query writes them to its table.
fn derived(changes: &[Change]) -> Vec<Change> {
    let derive = |(key, value): &Change| {
        let value = value.clone().map(|mut v| {
            v["ID"] = json!(key);
            v
        });
        (json!({ "ID": key }).to_string(), value)
    };
    changes.iter().map(derive).collect()
}

const STATEMENT: &str = "CREATE TABLE per_country AS SELECT country, COUNT(*) AS users, COUNT(age) AS aged, \
     SUM(age) AS ages, AVG(age) AS mean FROM users WHERE age IS NULL OR age < 90 GROUP BY country;";
const HAVING: &str = "CREATE TABLE crowded AS SELECT country, COUNT(*) AS users FROM users \
     GROUP BY country HAVING COUNT(*) > 2;";

/// One change to the table: key, and the new row or a deletion.
type Change = (String, Option<Value>);

/// Changes over twelve keys and four countries: a row moves between
/// countries, into and out of the WHERE (age 90 and over), loses its age,
/// is deleted, and keys never written are deleted.
fn changes(seed: u64, count: usize) -> Vec<Change> {
    let mut rng = testing::Lcg::new(seed);
    (0..count)
        .map(|_| {
            let roll = rng.next_state() >> 33;
            let key = format!("u{}", roll % 12);
            let country = ["NL", "DE", "FR", "BE"][((roll >> 4) % 4) as usize];
            let value = match (roll >> 6) % 8 {
                0 => None,
                1 => Some(json!({"country": country})),
                n => Some(json!({"country": country, "age": (roll >> 9) % 100 + n})),
            };
            (key, value)
        })
        .collect()
}

/// The statement's output for the table as it stands: per country of the
/// rows the WHERE keeps (with `having`: of every row, and only countries
/// of more than 2).
fn reference(table: &BTreeMap<String, Value>, having: bool) -> BTreeMap<String, Value> {
    let mut groups: BTreeMap<String, Vec<Option<i64>>> = BTreeMap::new();
    for row in table.values() {
        let age = row["age"].as_i64();
        if !having && age.is_some_and(|a| a >= 90) {
            continue;
        }
        let country = row["country"].as_str().expect("a country").to_string();
        groups.entry(country).or_default().push(age);
    }
    groups
        .into_iter()
        .filter(|(_, ages)| !having || ages.len() > 2)
        .map(|(country, ages)| {
            let known: Vec<i64> = ages.iter().flatten().copied().collect();
            let sum: i64 = known.iter().sum();
            let row = if having {
                json!({"COUNTRY": country, "USERS": ages.len()})
            } else {
                json!({
                    "COUNTRY": country,
                    "USERS": ages.len(),
                    "AGED": known.len(),
                    "AGES": if known.is_empty() { Value::Null } else { json!(sum) },
                    "MEAN": if known.is_empty() { Value::Null } else { json!(sum as f64 / known.len() as f64) },
                })
            };
            (country, row)
        })
        .collect()
}

/// Folds the sink's records (a tombstone deletes) into `rows`, by country.
fn materialize<'a>(rows: &mut BTreeMap<String, Value>, records: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>) {
    for (key, value) in records {
        let key: Value = serde_json::from_slice(key).expect("JSON key");
        let country = key["COUNTRY"].as_str().expect("keyed by the group").to_string();
        match value {
            Some(value) => rows.insert(country, serde_json::from_slice(value).expect("JSON")),
            None => rows.remove(&country),
        };
    }
}

fn fold(table: &mut BTreeMap<String, Value>, (key, value): &Change) {
    match value {
        Some(v) => table.insert(key.clone(), v.clone()),
        None => table.remove(key),
    };
}

/// Runs `changes` through the source, changes and aggregate stages,
/// checking after each that the output materializes the reference;
/// restarts both stateful stages from their snapshots and changelogs after
/// `restart_at`. The sink's records, in order.
fn run_checked(statement: &str, changes: &[Change], restart_at: Option<usize>) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    run_plan_checked(statement, &plan(statement).expect("plans"), changes, restart_at)
}

fn run_plan_checked(
    statement: &str,
    plan: &runnel_client::plan::Plan,
    changes: &[Change],
    restart_at: Option<usize>,
) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let having = statement.contains("HAVING");
    let def = compile("q", plan).expect("compiles");
    let factories = [
        def.window_stage.clone().expect("a changes stage"),
        def.next_stages[0].clone(),
    ];
    let mut stages: Vec<Box<dyn WindowStage>> = factories.iter().map(|f| f()).collect();
    let mut changelogs = [testing::Changelog::new(), testing::Changelog::new()];
    let (mut table, mut materialized, mut log) = (BTreeMap::new(), BTreeMap::new(), Vec::new());
    for (i, change) in changes.iter().enumerate() {
        for (stage, changelog) in stages.iter_mut().zip(&mut changelogs) {
            if i % 29 == 0 || restart_at == Some(i) {
                testing::checkpoint_into(stage.store_mut().expect("a state store"), changelog, true);
            }
        }
        if restart_at == Some(i) {
            for ((stage, factory), changelog) in stages.iter_mut().zip(&factories).zip(&changelogs) {
                let snapshot = stage.snapshot().expect("snapshots");
                *stage = factory();
                stage.restore(&snapshot).expect("restores");
                testing::replay_into(stage.store_mut().expect("a state store"), changelog, i % 2 == 0);
            }
        }
        let (key, value) = change;
        let bytes = value.as_ref().map(|v| v.to_string().into_bytes());
        let out = testing::run_through(&def, &mut stages, Some(key.as_bytes()), bytes.as_deref(), i as i64)
            .unwrap_or_else(|e| panic!("{statement}: change {i}: {e}"));
        // The group a row is counted in: its country, if the WHERE keeps it.
        let group = |row: Option<&Value>| {
            row.filter(|r| having || r["age"].as_i64().is_none_or(|a| a < 90))
                .map(|r| r["country"].clone())
        };
        let stays = value.is_some() && group(table.get(key)) == group(value.as_ref());
        assert!(
            !stays || out.iter().all(|(_, value)| value.is_some()),
            "{statement}: change {i} keeps its row in its group, which never shows it missing"
        );
        materialize(&mut materialized, out.iter().map(|(k, v)| (&k[..], v.as_deref())));
        log.extend(out);
        fold(&mut table, change);
        assert_eq!(materialized, reference(&table, having), "{statement}: after change {i}");
    }
    let read = stages[1].read(None, 1_000).expect("reads").expect("under the limit");
    let mut pulled = BTreeMap::new();
    materialize(&mut pulled, read.iter().map(|row| (&row.key[..], Some(&row.value[..]))));
    assert_eq!(pulled, materialized, "a pull query reads every group's row");
    log
}

#[test]
fn an_aggregate_over_a_table_takes_changed_and_deleted_rows_out_of_their_groups() {
    let changes = changes(11, 600);
    let log = run_checked(STATEMENT, &changes, None);
    let deletions = log.iter().filter(|(_, v)| v.is_none()).count();
    assert!(
        deletions > 0 && log.len() > 300,
        "{deletions} deletions in {}",
        log.len()
    );
    let log = run_checked(HAVING, &changes, None);
    let deletions = log.iter().filter(|(_, v)| v.is_none()).count();
    assert!(deletions > 10, "HAVING deletes groups it drops: {deletions}");
}

#[test]
fn an_aggregate_over_a_table_a_query_writes_reads_its_json_keys() {
    let changes = changes(14, 300);
    let plan = derived_plan(STATEMENT).expect("plans");
    assert!(plan.explain("Q").contains("TABLE CHANGES by the record key"));
    let whole = run_plan_checked(STATEMENT, &plan, &derived(&changes), None);
    assert_eq!(
        whole,
        run_checked(STATEMENT, &changes, None),
        "as over the declared table"
    );
}

#[test]
fn a_table_aggregate_restored_from_its_checkpoints_and_changelogs_emits_what_an_uninterrupted_one_does() {
    let changes = changes(12, 300);
    let whole = run_checked(STATEMENT, &changes, None);
    for restart_at in [1, 100, 299] {
        assert_eq!(run_checked(STATEMENT, &changes, Some(restart_at)), whole);
    }
}

#[test]
fn an_aggregate_over_a_table_plans_three_stages_and_refuses_what_cannot_subtract() {
    let planned = plan(STATEMENT).expect("plans");
    assert_eq!(planned.stages(), 3);
    assert_eq!(planned.sink.key, [0]);
    let explained = planned.explain("CTAS_PER_COUNTRY_0");
    assert!(
        explained
            .contains("TABLE CHANGES by the primary key ID through CTAS_PER_COUNTRY_0.repartition: stage 1 starts"),
        "{explained}"
    );
    for (statement, expected) in [
        (
            "SELECT country, MIN(age) FROM users GROUP BY country",
            "MIN over a table (USERS) cannot take a changed or deleted row's value back out",
        ),
        (
            "SELECT country, COUNT_DISTINCT(age) FROM users GROUP BY country",
            "COUNT_DISTINCT over a table",
        ),
        (
            "SELECT country, COUNT(*) FROM users WINDOW TUMBLING (SIZE 1 MINUTE) GROUP BY country",
            "a WINDOW over a table (USERS)",
        ),
        (
            "SELECT country, COUNT(*) FROM windowed GROUP BY country",
            "an aggregate over a windowed table (WINDOWED)",
        ),
        (
            "SELECT COUNT(*) AS n FROM users GROUP BY country, age",
            "must show every GROUP BY column (country, age)",
        ),
    ] {
        let refused = plan(statement).expect_err(statement);
        assert!(refused.contains(expected), "{statement}: {refused}");
    }
}

fn append(io: &MemoryIo, index: usize, (key, value): &Change) {
    let record = Record {
        timestamp_ms: index as i64,
        key: Some(key.clone().into()),
        value: value.as_ref().map(|v| v.to_string().into()),
        headers: Vec::new(),
    };
    io.append("users", 0, record);
}

/// The real tasks (source, changes, aggregate) over an in-memory cluster,
/// the two stateful ones restored from their checkpoint partitions twice
/// mid-way: the sink still materializes the aggregate exactly, and the
/// restored state came from the changelog entries their checkpoints wrote.
#[tokio::test]
async fn table_aggregate_tasks_restore_their_rows_and_groups_from_their_changelogs() {
    let mut tasks = Tasks::new(&plan(STATEMENT).expect("plans"), MemoryIo::default()).await;
    let mut table = BTreeMap::new();
    for (i, change) in changes(13, 500).iter().enumerate() {
        append(&tasks.io, i, change);
        fold(&mut table, change);
        if i % 50 == 49 {
            tasks.drain().await;
            tasks.io.pass(CHECKPOINT_INTERVAL);
            tasks.drain().await;
        }
        if i == 170 || i == 340 {
            for task in [1, 2] {
                tasks.tasks[task as usize] = tasks.start(task).await.expect("restores");
            }
        }
    }
    tasks.drain().await;
    let mut materialized = BTreeMap::new();
    let records = tasks.io.records("out", 0);
    materialize(
        &mut materialized,
        records
            .iter()
            .map(|r| (r.key.as_deref().expect("keyed"), r.value.as_deref())),
    );
    assert_eq!(materialized, reference(&table, false));
    for task in [1, 2] {
        let log = tasks.io.records("q.checkpoints", task);
        assert!(
            log.iter()
                .any(|r| r.key.as_deref().unwrap_or_default().starts_with(b"s/")),
            "task {task} wrote entries to its changelog"
        );
    }
}

/// Groups are told apart as the aggregate keys them (by their encoding):
/// a row moving from group 0.0 to group -0.0 leaves the first and joins
/// the second, and its deletion then leaves the second.
#[test]
fn a_row_moving_between_groups_that_compare_equal_leaves_one_and_joins_the_other() {
    use SqlType::*;
    let scores = object("scores", ObjectKind::Table, &[("ID", String), ("SCORE", Double)], None);
    let statement = "SELECT score, COUNT(*) AS n FROM scores GROUP BY score EMIT CHANGES";
    let def = compile("q", &plan_in(vec![scores], statement).expect("plans")).expect("compiles");
    let mut stages = [def.window_stage.clone().expect("changes")(), def.next_stages[0]()];
    let mut sink = Vec::new();
    for (i, value) in [Some(r#"{"score": 0.0}"#), Some(r#"{"score": -0.0}"#), None]
        .iter()
        .enumerate()
    {
        let out = testing::run_through(&def, &mut stages, Some(b"u1"), value.map(str::as_bytes), i as i64)
            .unwrap_or_else(|e| panic!("change {i}: {e}"));
        sink.extend(out.into_iter().map(|(key, value)| {
            let key = std::string::String::from_utf8_lossy(&key).into_owned();
            (key, value.is_some())
        }));
    }
    let expected = [
        (r#"{"SCORE":0.0}"#, true),
        (r#"{"SCORE":0.0}"#, false),
        (r#"{"SCORE":-0.0}"#, true),
        (r#"{"SCORE":-0.0}"#, false),
    ];
    let expected: Vec<(std::string::String, bool)> = expected.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    assert_eq!(sink, expected);
    assert_eq!(
        stages[1].read(None, 10).expect("reads"),
        Some(Vec::new()),
        "no group left"
    );
}
