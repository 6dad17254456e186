//! Table–table joins end to end without a cluster: both tables' changes
//! (upserts and tombstones, keyed by primary key) run through their source
//! stages into the join stage, and after every change the table the output
//! materializes must equal the join of the two tables as they stand then,
//! computed here.

use std::collections::BTreeMap;

use runnel_client::plan::{ObjectKind, SqlObject, SqlType};
use runnel_dataflow::builder::{Emitted, WindowStage};
use runnel_dataflow::compile::compile;
use runnel_dataflow::task::{CHECKPOINT_BYTES_MAX, CHECKPOINT_INTERVAL};
use runnel_dataflow::testing::{self, MemoryIo};
use runnel_storage::Record;
use serde_json::{json, Value};

use super::{object, plan_in, Tasks};

fn table(name: &str, columns: &[(&str, SqlType)]) -> SqlObject {
    object(name, ObjectKind::Table, columns, None)
}

fn catalog() -> Vec<SqlObject> {
    let users = table("users", &[("ID", SqlType::String), ("NAME", SqlType::String)]);
    let accounts = table("accounts", &[("ID", SqlType::String), ("BALANCE", SqlType::BigInt)]);
    let numbered = table("numbered", &[("ID", SqlType::BigInt), ("X", SqlType::String)]);
    let stream = object("clicks", ObjectKind::Stream, &[("ID", SqlType::String)], None);
    vec![users, accounts, numbered, stream]
}

fn plan(statement: &str) -> Result<runnel_client::plan::Plan, String> {
    plan_in(catalog(), statement)
}

/// One change: side (0 users, 1 accounts), key, and the new value or a
/// deletion.
type Change = (usize, String, Option<Value>);

/// Changes to both tables over eight keys: inserts, updates, deletions,
/// deletions of keys never written.
fn changes() -> Vec<Change> {
    let mut rng = runnel_dataflow::testing::Lcg::new(5);
    (0..400)
        .map(|i| {
            let state = rng.next_state();
            let roll = state >> 33;
            let side = (roll % 2) as usize;
            let key = format!("k{}", (roll >> 2) % 8);
            let value = match ((roll >> 6) % 4, side) {
                (0, _) => None,
                (_, 0) => Some(json!({"name": format!("n{i}")})),
                _ => Some(json!({"balance": i})),
            };
            (side, key, value)
        })
        .collect()
}

/// The join of the tables as they stand, as the statement's output shows it.
fn reference(tables: &[BTreeMap<String, Value>; 2], kind: &str) -> BTreeMap<String, Value> {
    let keys: std::collections::BTreeSet<&String> = tables[0].keys().chain(tables[1].keys()).collect();
    keys.into_iter()
        .filter_map(|key| {
            let (user, account) = (tables[0].get(key), tables[1].get(key));
            let kept = match kind {
                "JOIN" => user.is_some() && account.is_some(),
                "LEFT JOIN" => user.is_some(),
                _ => true,
            };
            let id = user.map(|_| json!(key)).unwrap_or(Value::Null);
            let row = json!({
                "ID": id,
                "NAME": user.map_or(Value::Null, |u| u["name"].clone()),
                "BALANCE": account.map_or(Value::Null, |a| a["balance"].clone()),
            });
            kept.then(|| (key.clone(), row))
        })
        .collect()
}

fn statement(kind: &str) -> String {
    format!("CREATE TABLE joined AS SELECT u.id, u.name, a.balance FROM users u {kind} accounts a ON u.id = a.id;")
}

/// Runs `changes` through the join, checking after each that the output
/// materializes the reference; restarts from a checkpoint (its snapshot
/// and the changelog's entries) after `restart_at`.
fn run_checked(kind: &str, changes: &[Change], restart_at: Option<usize>) -> Vec<(Option<Value>, Option<Value>)> {
    let plan = plan(&statement(kind)).unwrap_or_else(|e| panic!("{kind}: {e}"));
    let def = compile("q", &plan).expect("compiles");
    let factory = def.window_stage.as_ref().expect("a join stage");
    let mut join: Box<dyn WindowStage> = factory();
    let mut tables: [BTreeMap<String, Value>; 2] = Default::default();
    let mut materialized: BTreeMap<String, Value> = BTreeMap::new();
    let mut log = Vec::new();
    // The changelog, as checkpoints write it: every 37 changes, and at the
    // restart, the entries changed since the last.
    let mut changelog = testing::Changelog::new();
    for (i, (side, key, value)) in changes.iter().enumerate() {
        if i % 37 == 0 || restart_at == Some(i) {
            testing::checkpoint_into(join.store_mut().expect("a state store"), &mut changelog, true);
        }
        if restart_at == Some(i) {
            let snapshot = join.snapshot().expect("snapshots");
            join = factory();
            join.restore(&snapshot).expect("restores");
            testing::replay_into(join.store_mut().expect("a state store"), &changelog, i % 2 == 0);
        }
        let (_, source) = def.source_of(*side as u32).expect("a source stage");
        let (mut staged, mut out) = (Emitted::default(), Emitted::default());
        let bytes = value.as_ref().map(|v| v.to_string().into_bytes());
        source
            .process_record(Some(key.as_bytes()), bytes.as_deref(), i as i64, &[], &mut staged)
            .expect("decodes");
        for r in staged.iter() {
            join.add(r.key.expect("key"), r.value.expect("carried"), r.timestamp_ms, &mut out)
                .expect("adds");
        }
        match value {
            Some(v) => tables[*side].insert(key.clone(), v.clone()),
            None => tables[*side].remove(key),
        };
        for r in out.iter() {
            let out_key: Value = serde_json::from_slice(r.key.expect("keyed")).expect("JSON key");
            let key = out_key["ID"].as_str().expect("keyed by the join key").to_string();
            let value: Option<Value> = r.value.map(|v| serde_json::from_slice(v).expect("JSON"));
            match &value {
                Some(v) => materialized.insert(key, v.clone()),
                None => materialized.remove(&key),
            };
            log.push((Some(out_key), value));
        }
        assert_eq!(materialized, reference(&tables, kind), "{kind}: after change {i}");
    }
    let read = join.read(None, 1_000).expect("reads").expect("under the limit");
    assert_eq!(
        read.len(),
        materialized.len(),
        "{kind}: a pull query reads every joined row"
    );
    log
}

#[test]
fn inner_left_and_outer_joins_of_two_tables_materialize_the_join_after_every_change() {
    let changes = changes();
    for kind in ["JOIN", "LEFT JOIN", "FULL OUTER JOIN"] {
        let log = run_checked(kind, &changes, None);
        let deletions = log.iter().filter(|(_, v)| v.is_none()).count();
        assert!(deletions > 0 && log.len() > 100, "{kind}: upserts and deletions");
    }
}

#[test]
fn a_table_join_restored_from_its_checkpoint_and_changelog_emits_what_an_uninterrupted_one_does() {
    let changes = changes();
    let whole = run_checked("FULL OUTER JOIN", &changes, None);
    for restart_at in [1, 150, 399] {
        assert_eq!(run_checked("FULL OUTER JOIN", &changes, Some(restart_at)), whole);
    }
}

#[test]
fn a_join_of_two_tables_plans_a_table_keyed_by_the_key_and_explains_itself() {
    let plan = plan(&statement("LEFT JOIN")).expect("plans");
    assert_eq!(plan.stages(), 3);
    assert_eq!(plan.sink.key, [0]);
    let explained = plan.explain("CTAS_JOINED_0");
    assert!(
        explained.contains(
            "Left JOIN TABLE ACCOUNTS (ID STRING, BALANCE BIGINT, ROWTIME) from accounts (stage 1) ON ID = ACCOUNTS.ID"
        ),
        "{explained}"
    );
    let plan = super::table_join::plan(
        "SELECT a.id AS account, u.name FROM users u FULL OUTER JOIN accounts a ON a.id = u.id EMIT CHANGES",
    )
    .expect("the right key keys it too");
    assert_eq!(plan.sink.key, [0]);
}

#[test]
fn refused_table_joins_name_the_problem() {
    for (statement, expected) in [
        (
            "SELECT u.id FROM users u JOIN accounts a ON u.name = a.id",
            "on both PRIMARY KEYs: ON U.ID = A.ID",
        ),
        (
            "SELECT u.id, COUNT(*) FROM users u JOIN accounts a ON u.id = a.id GROUP BY u.id",
            "an aggregate over a join of two tables",
        ),
        (
            "SELECT u.name FROM users u JOIN accounts a ON u.id = a.id",
            "must include the key",
        ),
        (
            "SELECT u.id FROM users u JOIN numbered n ON u.id = n.id",
            "a join on values of different types: U.ID is STRING, N.ID is BIGINT",
        ),
        (
            "SELECT u.id FROM users u JOIN accounts a WITHIN 1 SECOND ON u.id = a.id",
            "without WITHIN",
        ),
        (
            "SELECT u.id FROM users u JOIN clicks c ON u.id = c.id",
            "put the stream on the left",
        ),
    ] {
        let refused = plan(statement).expect_err(statement);
        assert!(refused.contains(expected), "{statement}: {refused}");
    }
}

#[test]
fn a_table_record_without_a_usable_key_is_a_dead_letter() {
    let plan = plan(&statement("JOIN")).expect("plans");
    let def = compile("q", &plan).expect("compiles");
    let mut out = Emitted::default();
    let value = br#"{"name": "x"}"#;
    let refused = def.source_stage.process_record(None, Some(value), 0, &[], &mut out);
    assert!(refused.expect_err("no key").contains("without a key"));
    let keyed_by_value = br#"{"id": "k1", "name": "x"}"#;
    def.source_stage
        .process_record(None, Some(keyed_by_value), 0, &[], &mut out)
        .expect("the value's key column keys a record without a record key");
    assert_eq!(out.len(), 1);
    out.clear();
    let numbered =
        super::table_join::plan("CREATE TABLE j AS SELECT n.id, n.x FROM numbered n JOIN numbered m ON n.id = m.id;")
            .expect("plans");
    let def = compile("q", &numbered).expect("compiles");
    let refused = def
        .source_stage
        .process_record(Some(b"seven"), Some(b"{}"), 0, &[], &mut out);
    assert!(refused.expect_err("not a number").contains("is not a BIGINT"));
    assert!(out.is_empty());
}

/// The sink's rows, folded by key (a tombstone deletes).
fn materialized(io: &MemoryIo) -> BTreeMap<String, Value> {
    let mut rows = BTreeMap::new();
    for record in io.records("out", 0) {
        let key: Value = serde_json::from_slice(record.key.as_deref().expect("keyed")).expect("JSON key");
        let key = key["ID"].as_str().expect("the join key").to_string();
        match record.value.as_deref() {
            Some(value) => rows.insert(key, serde_json::from_slice(value).expect("JSON")),
            None => rows.remove(&key),
        };
    }
    rows
}

/// The join of `kind` as its three tasks (a source per table, the join).
async fn join_tasks(kind: &str) -> Tasks {
    Tasks::new(&plan(&statement(kind)).expect("plans"), MemoryIo::default()).await
}

fn append(tasks: &Tasks, index: usize, (side, key, value): &Change) {
    let record = Record {
        timestamp_ms: index as i64,
        key: Some(key.clone().into()),
        value: value.as_ref().map(|v| v.to_string().into()),
        headers: Vec::new(),
    };
    tasks.io.append(["users", "accounts"][*side], 0, record);
}

fn key_of(record: &Record) -> &[u8] {
    record.key.as_deref().unwrap_or_default()
}

fn fold(tables: &mut [BTreeMap<String, Value>; 2], (side, key, value): Change) {
    match value {
        Some(v) => tables[side].insert(key, v),
        None => tables[side].remove(&key),
    };
}

/// The join task is restored twice from its checkpoint partition: its rows
/// come back from the changelog entries its checkpoints wrote, and the sink
/// still materializes the join exactly. The incarnation replaced the second
/// time lingers and reads on: its checkpoint is refused (fenced), so it
/// cannot add entries the restored one knows nothing of.
#[tokio::test]
async fn a_join_task_restores_its_rows_from_its_changelog_and_a_stale_incarnation_is_fenced() {
    let mut tasks = join_tasks("JOIN").await;
    let mut tables: [BTreeMap<String, Value>; 2] = Default::default();
    let mut stale = None;
    for (i, change) in changes().into_iter().enumerate() {
        append(&tasks, i, &change);
        fold(&mut tables, change);
        if i % 40 == 39 {
            for task in &mut tasks.tasks {
                task.step().await.expect("steps");
            }
            tasks.io.pass(CHECKPOINT_INTERVAL);
            tasks.tasks[2].step().await.expect("checkpoints");
        }
        if i == 161 || i == 323 {
            let restored = tasks.start(2).await.expect("restores");
            let replaced = std::mem::replace(&mut tasks.tasks[2], restored);
            // The last one replaced: the first one's input is gone by
            // then (the live one checkpointed past it and deleted it from
            // the repartition topic), so it would fail reading, not at
            // its checkpoint.
            stale = Some(replaced);
        }
    }
    let mut stale = stale.expect("replaced at 323");
    tasks.io.pass(CHECKPOINT_INTERVAL);
    let refused = async {
        for _ in 0..100 {
            stale.step().await?;
        }
        Ok(())
    };
    let refused: Result<(), runnel_dataflow::task::TaskError> = refused.await;
    let refused = refused
        .expect_err("the stale incarnation's checkpoint is refused")
        .to_string();
    assert!(refused.contains("fenced"), "{refused}");
    tasks.drain().await;
    assert_eq!(materialized(&tasks.io), reference(&tables, "JOIN"));
    let log = tasks.io.records("q.checkpoints", 2);
    assert!(
        log.iter().any(|r| key_of(r).starts_with(b"s/")),
        "entries in the changelog"
    );
    assert_eq!(
        log.iter().filter(|r| key_of(r) == b"barrier").count(),
        3,
        "one per start"
    );
}

/// Rows far larger than the records that change them (each account change
/// writes its user's 4 KiB row again): a step stops folding once its
/// changes fill a checkpoint, so every checkpoint's batch stays within the
/// limit however much one fetch holds, and a restore reads them all back.
#[tokio::test]
async fn a_join_task_checkpoints_early_when_its_changes_fill_a_checkpoint() {
    let mut tasks = join_tasks("LEFT JOIN").await;
    let mut tables: [BTreeMap<String, Value>; 2] = Default::default();
    let name = "n".repeat(4096);
    let keys = 1500;
    let users = (0..keys).map(|k| (0, format!("k{k}"), Some(json!({"name": name}))));
    let accounts = (0..keys).map(|k| (1, format!("k{k}"), Some(json!({"balance": k}))));
    for (i, change) in users.chain(accounts).enumerate() {
        append(&tasks, i, &change);
        fold(&mut tables, change);
    }
    tasks.drain().await;
    let batches = tasks.io.batches("q.checkpoints", 2);
    let largest = batches.iter().map(|b| b.size_bytes()).max().unwrap_or(0);
    assert!(largest <= CHECKPOINT_BYTES_MAX, "a checkpoint of {largest} bytes");
    assert!(
        batches.len() >= 6,
        "{} checkpoint writes for 12 MB of changes",
        batches.len()
    );
    tasks.tasks[2] = tasks.start(2).await.expect("restores");
    let change = (1, "k7".to_string(), None);
    append(&tasks, 2 * keys, &change);
    fold(&mut tables, change);
    tasks.drain().await;
    assert_same(&materialized(&tasks.io), &reference(&tables, "LEFT JOIN"));
}

/// Compares two materialized tables, naming the first keys that differ
/// (rows here are too large to print whole).
fn assert_same(got: &BTreeMap<String, Value>, want: &BTreeMap<String, Value>) {
    let keys: std::collections::BTreeSet<&String> = got.keys().chain(want.keys()).collect();
    let differ: Vec<String> = keys
        .into_iter()
        .filter(|k| got.get(*k) != want.get(*k))
        .map(|k| {
            let short = |v: Option<&Value>| v.map(|v| v.to_string().chars().take(60).collect::<String>());
            format!("{k}: {:?} != {:?}", short(got.get(k)), short(want.get(k)))
        })
        .take(5)
        .collect();
    assert!(
        differ.is_empty(),
        "{} of {} keys; first: {differ:#?}",
        got.len(),
        want.len()
    );
}
