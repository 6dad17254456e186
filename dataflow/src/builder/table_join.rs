//! The Rust builders' table–table join: `Dataflow::table(topic)` reads a
//! topic as a table (the record key is the primary key, as text; a null
//! value deletes the row), and `left.join(right, kind, joiner)` joins two
//! tables on their keys, as Kafka Streams' `KTable#join`, `leftJoin` and
//! `outerJoin`. It runs as SQL's table–table join runs: a source stage per
//! table, both repartitioned by key, then a join stage holding each key's
//! latest rows ([`KeyRows`], a changelog-backed store) as their postcard
//! encodings (at most 500,000 keys a task, as SQL's). Every change emits
//! the key's joined record as it now stands:
//! an upsert of what `joiner` returns while the kind keeps the key, else a
//! tombstone if it was emitted before.

use std::marker::PhantomData;
use std::sync::Arc;

use runnel_client::plan::JoinKind;
use runnel_client::tasks::StateRow;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{
    state_rows, step, to_json, type_name, Dataflow, DataflowDef, Emitted, JoinedSource, SourceStage, StageError,
    StateStore, WindowStage, WindowStageFactory,
};
use crate::table::TableState;
use crate::table_join::{keeps, KeyRows, Rows};

/// What a join makes of a key's rows (`None`: no record for the key).
type TableJoiner<V, W, R> = Arc<dyn Fn(&str, Option<&V>, Option<&W>) -> Option<R> + Send + Sync>;

/// A topic read as a table of `V` rows, by key.
pub struct Table<V> {
    pub(super) name: String,
    pub(super) topic: String,
    _rows: PhantomData<fn() -> V>,
}

impl Dataflow {
    /// Reads `topic` as a table: each record's key is its row's primary
    /// key (UTF-8 text), its value the row (JSON decoded into `V`), and a
    /// record without a value deletes the key's row. A record without a
    /// key, or whose value does not decode, is a dead letter.
    pub fn table<V: Serialize + DeserializeOwned + 'static>(self, topic: &str) -> Table<V> {
        Table {
            name: self.name,
            topic: topic.to_string(),
            _rows: PhantomData,
        }
    }
}

impl<V: Serialize + DeserializeOwned + 'static> Table<V> {
    /// Joins with `other` on the key: `kind` says which keys are kept
    /// (inner: both rows; left: this table's; outer: either), and `joiner`
    /// makes the key's record from its rows (`None`: none, as a filter).
    /// Both tables must have as many partitions.
    pub fn join<W: Serialize + DeserializeOwned + 'static, R: Serialize + 'static>(
        self,
        other: Table<W>,
        kind: JoinKind,
        joiner: impl Fn(&str, Option<&V>, Option<&W>) -> Option<R> + Send + Sync + 'static,
    ) -> JoinedTable<V, W, R> {
        JoinedTable {
            left: self,
            right: other,
            kind,
            joiner: Arc::new(joiner),
        }
    }
}

/// Two tables joined on their keys, ready for a sink.
pub struct JoinedTable<V, W, R> {
    left: Table<V>,
    right: Table<W>,
    kind: JoinKind,
    joiner: TableJoiner<V, W, R>,
}

impl<V, W, R> JoinedTable<V, W, R>
where
    V: Serialize + DeserializeOwned + 'static,
    W: Serialize + DeserializeOwned + 'static,
    R: Serialize + 'static,
{
    /// Writes each key's joined record to `topic` as JSON, keyed by the key
    /// (JSON text); a key no longer kept gets a tombstone.
    pub fn sink(self, topic: &str) -> DataflowDef {
        let (left, right, kind, joiner) = (self.left, self.right, self.kind, self.joiner);
        let source_steps = |table: &str, row: &str| vec![step(format!("TABLE {table} of {row} by its record key"))];
        let join_steps = vec![
            step(format!("{kind:?} JOIN TABLE {} ON the key", right.topic)),
            step(format!("JOINER to {}", type_name::<R>())),
        ];
        let factory: WindowStageFactory = Arc::new(move || {
            Box::new(TypedTableJoinStage::<V, W, R> {
                rows: KeyRows::default(),
                kind,
                joiner: joiner.clone(),
                max_event_ms: i64::MIN,
            })
        });
        DataflowDef {
            name: left.name,
            source: left.topic.clone(),
            sink: topic.to_string(),
            source_stage: Arc::new(TypedTableSource::<V>::new(0)),
            joined_sources: vec![JoinedSource {
                topic: right.topic.clone(),
                stage: Arc::new(TypedTableSource::<W>::new(1)),
            }],
            window_stage: Some(factory),
            next_stages: Vec::new(),
            steps: vec![
                source_steps(&left.topic, type_name::<V>()),
                source_steps(&right.topic, type_name::<W>()),
                join_steps,
            ],
        }
    }
}

/// One side's source stage: a record becomes `[side, 1] + postcard(row)`
/// (`[side, 0]`: deleted), keyed by the postcard of its key.
pub(super) struct TypedTableSource<V> {
    side: u8,
    _rows: PhantomData<fn() -> V>,
}

impl<V> TypedTableSource<V> {
    pub(super) fn new(side: u8) -> TypedTableSource<V> {
        TypedTableSource {
            side,
            _rows: PhantomData,
        }
    }
}

impl<V: Serialize + DeserializeOwned> SourceStage for TypedTableSource<V> {
    fn process_joined(&self, _: &[u8], _: i64, _: &[TableState], _: &mut Emitted) -> Result<(), String> {
        Err("a table's record needs its key (process_record)".to_string())
    }

    fn process_record(
        &self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        timestamp_ms: i64,
        _: &[TableState],
        out: &mut Emitted,
    ) -> Result<(), String> {
        let key = key.ok_or("a table's record without a key (its primary key)")?;
        let key = std::str::from_utf8(key).map_err(|_| "a table's record key is not UTF-8 text".to_string())?;
        let mut carried = vec![self.side, u8::from(value.is_some())];
        if let Some(value) = value {
            let row: V = serde_json::from_slice(value)
                .map_err(|e| format!("row of key {key:?} does not decode as {}: {e}", type_name::<V>()))?;
            carried = postcard::to_extend(&row, carried).map_err(|e| e.to_string())?;
        }
        let key = out
            .encode(|b| postcard::to_io(key, b).map(drop))
            .map_err(|e| e.to_string())?;
        let value = out.encode(|b| {
            b.extend_from_slice(&carried);
            Ok::<_, String>(())
        })?;
        out.push(timestamp_ms, Some(key), Some(value));
        Ok(())
    }
}

/// A typed table–table join task: both sides' encoded rows in [`KeyRows`].
struct TypedTableJoinStage<V, W, R> {
    rows: KeyRows<Vec<u8>>,
    kind: JoinKind,
    joiner: TableJoiner<V, W, R>,
    max_event_ms: i64,
}

impl<V: DeserializeOwned, W: DeserializeOwned, R: Serialize> TypedTableJoinStage<V, W, R> {
    /// What the joiner makes of `key`'s `rows`, if the join keeps it.
    fn joined(
        kind: JoinKind,
        joiner: &TableJoiner<V, W, R>,
        key: &str,
        rows: &Rows<Vec<u8>>,
    ) -> Result<Option<R>, StageError> {
        if !keeps(kind, rows) {
            return Ok(None);
        }
        let corrupt = |what: &str| StageError::Corrupt(format!("a {what} row of key {key:?} does not decode"));
        let left: Option<V> = rows[0]
            .as_deref()
            .map(postcard::from_bytes)
            .transpose()
            .map_err(|_| corrupt("left"))?;
        let right: Option<W> = rows[1]
            .as_deref()
            .map(postcard::from_bytes)
            .transpose()
            .map_err(|_| corrupt("right"))?;
        Ok(joiner(key, left.as_ref(), right.as_ref()))
    }

    /// Emits `key`'s record (a tombstone when `None`).
    fn emit(key: &str, record: Option<&R>, t_ms: i64, out: &mut Emitted) -> Result<(), StageError> {
        let unencodable = |e: serde_json::Error| StageError::Unencodable(e.to_string());
        let json_key = out.encode(to_json(key)).map_err(unencodable)?;
        let value = record
            .map(|r| out.encode(to_json(r)))
            .transpose()
            .map_err(unencodable)?;
        out.push(t_ms, Some(json_key), value);
        Ok(())
    }
}

pub(super) fn decode_key(key: &[u8]) -> Result<String, StageError> {
    postcard::from_bytes(key).map_err(|e| StageError::Corrupt(format!("a table join key: {e}")))
}

impl<V, W, R> WindowStage for TypedTableJoinStage<V, W, R>
where
    V: DeserializeOwned + 'static,
    W: DeserializeOwned + 'static,
    R: Serialize + 'static,
{
    fn add(&mut self, key: &[u8], value: &[u8], t_ms: i64, out: &mut Emitted) -> Result<(), StageError> {
        let (side, row) = match value {
            [side @ (0 | 1), 0] => (*side as usize, None),
            [side @ (0 | 1), 1, row @ ..] => (*side as usize, Some(row.to_vec())),
            _ => return Err(StageError::Corrupt("a table join value names no side".to_string())),
        };
        self.max_event_ms = self.max_event_ms.max(t_ms);
        let text = decode_key(key)?;
        let (kind, joiner) = (self.kind, &self.joiner);
        let (before, after) = self
            .rows
            .update(key, side, row, |rows| Self::joined(kind, joiner, &text, rows))?;
        match (before, after) {
            (_, Some(record)) => Self::emit(&text, Some(&record), t_ms, out),
            (Some(_), None) => Self::emit(&text, None, t_ms, out),
            (None, None) => Ok(()),
        }
    }

    /// Nothing but the format: the rows are in the changelog.
    fn snapshot(&self) -> Result<Vec<u8>, StageError> {
        Ok(vec![TYPED_TABLES_STATE_VERSION])
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), StageError> {
        match bytes {
            [TYPED_TABLES_STATE_VERSION] => Ok(()),
            _ => Err(StageError::Corrupt(format!(
                "typed table join state {bytes:?} is not format {TYPED_TABLES_STATE_VERSION}"
            ))),
        }
    }

    fn watermark_ms(&self) -> i64 {
        self.max_event_ms
    }

    fn read(&self, key: Option<&[u8]>, limit: usize) -> Result<Option<Vec<StateRow>>, StageError> {
        let mut out = Emitted::default();
        for (key, rows) in self.rows.iter(key) {
            if out.len() >= limit {
                return Ok(None);
            }
            let text = decode_key(key)?;
            if let Some(record) = Self::joined(self.kind, &self.joiner, &text, rows)? {
                Self::emit(&text, Some(&record), 0, &mut out)?;
            }
        }
        Ok(Some(state_rows(&out)))
    }

    fn store(&self) -> Option<&dyn StateStore> {
        Some(&self.rows)
    }

    fn store_mut(&mut self) -> Option<&mut dyn StateStore> {
        Some(&mut self.rows)
    }
}

/// The format of a typed table join's snapshot (its rows are entries).
const TYPED_TABLES_STATE_VERSION: u8 = 1;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct User {
        name: String,
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct Account {
        balance: i64,
    }

    fn dataflow(kind: JoinKind) -> DataflowDef {
        let accounts = Dataflow::new("joined").table::<Account>("accounts");
        Dataflow::new("joined")
            .table::<User>("users")
            .join(accounts, kind, |id: &str, u: Option<&User>, a: Option<&Account>| {
                // A filter too: a balance of 13 is never shown.
                (a.map(|a| a.balance) != Some(13))
                    .then(|| (id.to_string(), u.map(|u| u.name.clone()), a.map(|a| a.balance)))
            })
            .sink("joined")
    }

    /// One change: side (0 users, 1 accounts), key, and the new row or a
    /// deletion, over eight keys.
    fn changes() -> Vec<(usize, String, Option<serde_json::Value>)> {
        let mut rng = crate::testing::Lcg::new(29);
        (0..400i64)
            .map(|i| {
                let state = rng.next_state();
                let roll = state >> 33;
                let side = (roll % 2) as usize;
                let key = format!("k{}", (roll >> 2) % 8);
                let row = match ((roll >> 6) % 4, side) {
                    (0, _) => None,
                    (_, 0) => Some(serde_json::json!({"name": format!("n{i}")})),
                    _ => Some(serde_json::json!({"balance": i % 20})),
                };
                (side, key, row)
            })
            .collect()
    }

    type Joined = (String, Option<String>, Option<i64>);

    /// The join of the tables as they stand.
    fn reference(tables: &[BTreeMap<String, serde_json::Value>; 2], kind: JoinKind) -> BTreeMap<String, Joined> {
        let keys: std::collections::BTreeSet<&String> = tables[0].keys().chain(tables[1].keys()).collect();
        keys.into_iter()
            .filter_map(|key| {
                let (user, account) = (tables[0].get(key), tables[1].get(key));
                let rows: Rows<()> = [user.map(drop), account.map(drop)];
                let balance = account.and_then(|a| a["balance"].as_i64());
                let joined = (
                    key.clone(),
                    user.and_then(|u| u["name"].as_str()).map(String::from),
                    balance,
                );
                (keeps(kind, &rows) && balance != Some(13)).then(|| (key.clone(), joined))
            })
            .collect()
    }

    /// Runs the changes through the stages, checkpointing (entries
    /// folded by key, as compaction keeps them) every 37 changes and
    /// restoring from snapshot and entries at each of `restarts`; after
    /// every change the sink materializes the reference.
    fn run_checked(kind: JoinKind, restarts: &[usize]) {
        let def = dataflow(kind);
        let factory = def.window_stage.clone().expect("a join stage");
        let mut join = factory();
        let mut tables: [BTreeMap<String, serde_json::Value>; 2] = Default::default();
        let mut materialized: BTreeMap<String, Joined> = BTreeMap::new();
        let mut log = crate::testing::Changelog::new();
        for (i, (side, key, row)) in changes().into_iter().enumerate() {
            if i % 37 == 0 || restarts.contains(&i) {
                crate::testing::checkpoint_into(join.store_mut().expect("a store"), &mut log, true);
            }
            if restarts.contains(&i) {
                let snapshot = join.snapshot().expect("snapshots");
                join = factory();
                join.restore(&snapshot).expect("restores");
                crate::testing::replay_into(join.store_mut().expect("a store"), &log, i % 2 == 0);
            }
            let (_, source) = def.source_of(side as u32).expect("a source stage");
            let (mut staged, mut out) = (Emitted::default(), Emitted::default());
            let bytes = row.as_ref().map(|r| r.to_string().into_bytes());
            source
                .process_record(Some(key.as_bytes()), bytes.as_deref(), i as i64, &[], &mut staged)
                .expect("decodes");
            for r in staged.iter() {
                join.add(
                    r.key.expect("keyed"),
                    r.value.expect("carried"),
                    r.timestamp_ms,
                    &mut out,
                )
                .expect("adds");
            }
            match row {
                Some(row) => tables[side].insert(key, row),
                None => tables[side].remove(&key),
            };
            for r in out.iter() {
                let key: String = serde_json::from_slice(r.key.expect("keyed")).expect("a JSON key");
                match r.value {
                    Some(v) => materialized.insert(key, serde_json::from_slice(v).expect("JSON")),
                    None => materialized.remove(&key),
                };
            }
            assert_eq!(materialized, reference(&tables, kind), "{kind:?} after change {i}");
        }
        let read = join.read(None, 1_000).expect("reads").expect("within the limit");
        assert_eq!(read.len(), materialized.len(), "a pull query reads every joined record");
    }

    #[test]
    fn typed_tables_join_inner_left_and_outer_as_a_reference_says_through_restores() {
        for kind in [JoinKind::Inner, JoinKind::Left, JoinKind::Outer] {
            run_checked(kind, &[]);
            run_checked(kind, &[1, 150, 299, 399]);
        }
    }

    #[test]
    fn a_row_that_does_not_decode_or_has_no_key_is_a_dead_letter() {
        let def = dataflow(JoinKind::Inner);
        let (_, users) = def.source_of(0).expect("a source");
        let mut out = Emitted::default();
        let refused = users
            .process_record(Some(b"k1"), Some(b"{\"name\": 7}"), 0, &[], &mut out)
            .expect_err("not a User");
        assert!(
            refused.contains("does not decode as") && refused.contains("k1"),
            "{refused}"
        );
        let refused = users
            .process_record(None, Some(b"{\"name\": \"a\"}"), 0, &[], &mut out)
            .expect_err("no key");
        assert!(refused.contains("without a key"), "{refused}");
        assert!(out.is_empty());
        assert_eq!((def.stages(), def.source_count()), (3, 2));
    }

    /// The dataflow's three tasks run by the real task code over an
    /// in-memory cluster, the join task restored from its changelog
    /// half-way: the sink materializes the reference.
    #[tokio::test]
    async fn its_tasks_join_the_tables_through_a_restore() {
        use std::sync::{Arc, Mutex};

        use runnel_client::tasks::{TaskAssignment, TaskStatus};
        use runnel_storage::Record;

        use crate::task::TaskRunner;
        use crate::testing::MemoryIo;

        let def = Arc::new(dataflow(JoinKind::Outer));
        let io = Arc::new(MemoryIo::default());
        let start = |task: u32| {
            let assignment = TaskAssignment {
                dataflow: "joined".into(),
                task,
                partitions: 1,
                stages: def.stages(),
                generation: 0,
            };
            TaskRunner::restore(
                def.clone(),
                assignment,
                io.clone(),
                Arc::new(Mutex::new(TaskStatus::default())),
            )
        };
        let mut tasks = vec![
            start(0).await.expect("starts"),
            start(1).await.expect("starts"),
            start(2).await.expect("starts"),
        ];
        let mut tables: [BTreeMap<String, serde_json::Value>; 2] = Default::default();
        for (i, (side, key, row)) in changes().into_iter().enumerate() {
            let record = Record {
                timestamp_ms: i as i64,
                key: Some(key.clone().into()),
                value: row.as_ref().map(|r| r.to_string().into()),
                headers: Vec::new(),
            };
            io.append(["users", "accounts"][side], 0, record);
            match row {
                Some(row) => tables[side].insert(key, row),
                None => tables[side].remove(&key),
            };
            if i % 50 == 49 {
                for task in &mut tasks {
                    task.step().await.expect("steps");
                }
                io.pass(crate::task::CHECKPOINT_INTERVAL);
                tasks[2].step().await.expect("checkpoints");
            }
            if i == 222 {
                tasks[2] = start(2).await.expect("restores");
            }
        }
        for _ in 0..3 {
            for task in &mut tasks {
                task.step().await.expect("steps");
            }
        }
        let mut materialized: BTreeMap<String, Joined> = BTreeMap::new();
        for record in io.records("joined", 0) {
            let key: String = serde_json::from_slice(record.key.as_deref().expect("keyed")).expect("a JSON key");
            match record.value.as_deref() {
                Some(v) => materialized.insert(key, serde_json::from_slice(v).expect("JSON")),
                None => materialized.remove(&key),
            };
        }
        assert_eq!(materialized, reference(&tables, JoinKind::Outer));
    }
}
