//! The Rust builders' aggregate over a table:
//! `Dataflow::table(topic).group_by(key).aggregate(init, add, subtract)`
//! (or `.count()`), as Kafka Streams' `KTable#groupBy(…).aggregate(
//! initializer, adder, subtractor)`. It runs as SQL's aggregate over a
//! table ([`crate::table_aggregate`]): the table read by key; a changes
//! stage holding each key's latest row (postcard, in [`KeyRows`]) that
//! sends every change on, repartitioned by its group, as the old row taken
//! out and the new row added (as one replacement when both are in one
//! group, so the group never shows the row missing); and an aggregate stage holding each group's
//! aggregate and row count. A group left with no rows is deleted (a
//! tombstone); the sink's records are the JSON aggregate keyed by the JSON
//! group key.

use std::marker::PhantomData;
use std::sync::Arc;

use runnel_client::tasks::StateRow;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::table_join::{decode_key, Table, TypedTableSource};
use super::{
    one_store_stage, state_rows, step, to_json, type_name, DataflowDef, Emitted, StageError, WindowStage,
    WindowStageFactory,
};
use crate::table_aggregate::{ADDED, REPLACED, TAKEN_OUT};
use crate::table_join::{KeyRows, Rows};

/// The format of both stages' snapshots (their state is in the changelog).
const TYPED_TABLE_AGGREGATE_STATE_VERSION: u8 = 1;

type GroupKey<V, K> = Arc<dyn Fn(&str, &V) -> Option<K> + Send + Sync>;
type Adder<A, V> = Arc<dyn Fn(&mut A, &V) + Send + Sync>;

/// A table's rows grouped by a key computed from each row.
pub struct GroupedTable<V, K> {
    table: Table<V>,
    key: GroupKey<V, K>,
}

/// A grouped table's aggregate, ready for a sink.
pub struct AggregatedTable<V, K, A> {
    grouped: GroupedTable<V, K>,
    init: Arc<dyn Fn() -> A + Send + Sync>,
    add: Adder<A, V>,
    subtract: Adder<A, V>,
    described: String,
}

impl<V: Serialize + DeserializeOwned + 'static> Table<V> {
    /// Groups the rows by what `key` makes of each (its primary key and
    /// row; `None`: the row is in no group), for an aggregate that adds a
    /// row to its group and takes it back out when the row changes or is
    /// deleted.
    pub fn group_by<K: Serialize + DeserializeOwned + 'static>(
        self,
        key: impl Fn(&str, &V) -> Option<K> + Send + Sync + 'static,
    ) -> GroupedTable<V, K> {
        GroupedTable {
            table: self,
            key: Arc::new(key),
        }
    }
}

impl<V, K> GroupedTable<V, K>
where
    V: Serialize + DeserializeOwned + 'static,
    K: Serialize + DeserializeOwned + 'static,
{
    /// Each group's aggregate, from `init()`: `add` folds a row in,
    /// `subtract` takes a row added before back out.
    pub fn aggregate<A: Serialize + DeserializeOwned + 'static>(
        self,
        init: impl Fn() -> A + Send + Sync + 'static,
        add: impl Fn(&mut A, &V) + Send + Sync + 'static,
        subtract: impl Fn(&mut A, &V) + Send + Sync + 'static,
    ) -> AggregatedTable<V, K, A> {
        AggregatedTable {
            grouped: self,
            init: Arc::new(init),
            add: Arc::new(add),
            subtract: Arc::new(subtract),
            described: format!("AGGREGATE into {} (adder, subtractor)", type_name::<A>()),
        }
    }

    /// Each group's row count.
    pub fn count(self) -> AggregatedTable<V, K, u64> {
        let mut counted = self.aggregate(|| 0, |n, _| *n += 1, |n, _| *n -= 1);
        counted.described = "COUNT".to_string();
        counted
    }
}

impl<V, K, A> AggregatedTable<V, K, A>
where
    V: Serialize + DeserializeOwned + 'static,
    K: Serialize + DeserializeOwned + 'static,
    A: Serialize + DeserializeOwned + 'static,
{
    /// Writes each group's aggregate to `topic` as JSON, keyed by the
    /// group key (JSON); a group left with no rows gets a tombstone.
    pub fn sink(self, topic: &str) -> DataflowDef {
        let AggregatedTable {
            grouped,
            init,
            add,
            subtract,
            described,
        } = self;
        let (table, key) = (grouped.table, grouped.key);
        let changes: WindowStageFactory = Arc::new(move || {
            Box::new(TypedChangesStage::<V, K> {
                rows: KeyRows::default(),
                key: key.clone(),
                max_event_ms: i64::MIN,
            })
        });
        let aggregate: WindowStageFactory = Arc::new(move || {
            Box::new(TypedAggregateStage::<V, K, A> {
                groups: KeyRows::default(),
                init: init.clone(),
                add: add.clone(),
                subtract: subtract.clone(),
                max_event_ms: i64::MIN,
                _types: PhantomData,
            })
        });
        DataflowDef {
            name: table.name,
            source: table.topic.clone(),
            sink: topic.to_string(),
            source_stage: Arc::new(TypedTableSource::<V>::new(0)),
            joined_sources: Vec::new(),
            window_stage: Some(changes),
            next_stages: vec![aggregate],
            steps: vec![
                vec![step(format!(
                    "TABLE {} of {} by its record key",
                    table.topic,
                    type_name::<V>()
                ))],
                vec![step(format!("GROUP_BY {}", type_name::<K>()))],
                vec![step(described)],
            ],
        }
    }
}

/// A typed table aggregate's snapshot: its format only (its state is in
/// its store; its clock is not kept).
fn snapshot_version(_max_event_ms: i64) -> Result<Vec<u8>, StageError> {
    Ok(vec![TYPED_TABLE_AGGREGATE_STATE_VERSION])
}

fn restore_version(_max_event_ms: &mut i64, bytes: &[u8]) -> Result<(), StageError> {
    match bytes {
        [TYPED_TABLE_AGGREGATE_STATE_VERSION] => Ok(()),
        _ => Err(StageError::Corrupt(format!(
            "typed table aggregate state {bytes:?} is not format {TYPED_TABLE_AGGREGATE_STATE_VERSION}"
        ))),
    }
}

/// A typed changes task: each key's latest row (postcard).
struct TypedChangesStage<V, K> {
    rows: KeyRows<Vec<u8>>,
    key: GroupKey<V, K>,
    max_event_ms: i64,
}

/// A row's group (postcard) and the row, if it is in one.
type Grouped = Option<(Vec<u8>, Vec<u8>)>;

impl<V: DeserializeOwned, K: Serialize> TypedChangesStage<V, K> {
    fn grouped(key: &GroupKey<V, K>, primary_key: &str, rows: &Rows<Vec<u8>>) -> Result<Grouped, StageError> {
        let Some(bytes) = &rows[0] else { return Ok(None) };
        let row: V = postcard::from_bytes(bytes)
            .map_err(|e| StageError::Corrupt(format!("the row of key {primary_key:?} does not decode: {e}")))?;
        let Some(group) = key(primary_key, &row) else {
            return Ok(None);
        };
        let group = postcard::to_allocvec(&group).map_err(|e| StageError::Unencodable(e.to_string()))?;
        Ok(Some((group, bytes.clone())))
    }
}

/// Sends a change on: keyed by its group, the sign then the row (or both rows).
fn emit_change(out: &mut Emitted, (group, row): (Vec<u8>, Vec<u8>), sign: u8, t_ms: i64) -> Result<(), StageError> {
    let key = out
        .encode(|b| {
            b.extend_from_slice(&group);
            Ok::<_, String>(())
        })
        .map_err(StageError::Unencodable)?;
    let value = out
        .encode(|b| {
            b.push(sign);
            b.extend_from_slice(&row);
            Ok::<_, String>(())
        })
        .map_err(StageError::Unencodable)?;
    out.push(t_ms, Some(key), Some(value));
    Ok(())
}

impl<V, K> WindowStage for TypedChangesStage<V, K>
where
    V: DeserializeOwned + 'static,
    K: Serialize + 'static,
{
    fn add(&mut self, key: &[u8], value: &[u8], t_ms: i64, out: &mut Emitted) -> Result<(), StageError> {
        let row = match value {
            [0, 0] => None,
            [0, 1, row @ ..] => Some(row.to_vec()),
            _ => {
                return Err(StageError::Corrupt(
                    "a table row that is not the grouped table's".to_string(),
                ))
            }
        };
        self.max_event_ms = self.max_event_ms.max(t_ms);
        let primary_key = decode_key(key)?;
        let group = &self.key;
        let (before, after) = self
            .rows
            .update(key, 0, row, |rows| Self::grouped(group, &primary_key, rows))?;
        match (before, after) {
            (before, after) if before == after => Ok(()),
            (Some((old_group, old)), Some((group, new))) if old_group == group => {
                let both = postcard::to_allocvec(&(old, new)).map_err(|e| StageError::Unencodable(e.to_string()))?;
                emit_change(out, (group, both), REPLACED, t_ms)
            }
            (before, after) => {
                if let Some(before) = before {
                    emit_change(out, before, TAKEN_OUT, t_ms)?;
                }
                if let Some(after) = after {
                    emit_change(out, after, ADDED, t_ms)?;
                }
                Ok(())
            }
        }
    }

    one_store_stage!(rows, snapshot_version, restore_version);

    fn read(&self, _key: Option<&[u8]>, _limit: usize) -> Result<Option<Vec<StateRow>>, StageError> {
        Err(StageError::NoTable(
            "a table's changes stage holds rows by primary key; its aggregate holds the groups",
        ))
    }
}

/// A typed aggregate task: each group's aggregate and row count (postcard).
struct TypedAggregateStage<V, K, A> {
    groups: KeyRows<Vec<u8>>,
    init: Arc<dyn Fn() -> A + Send + Sync>,
    add: Adder<A, V>,
    subtract: Adder<A, V>,
    max_event_ms: i64,
    _types: PhantomData<fn() -> K>,
}

impl<V: DeserializeOwned, K: Serialize + DeserializeOwned, A: Serialize + DeserializeOwned>
    TypedAggregateStage<V, K, A>
{
    /// The group's aggregate and row count.
    fn state(&self, group: &[u8]) -> Result<Option<(A, u64)>, StageError> {
        let Some((_, rows)) = self.groups.iter(Some(group)).next() else {
            return Ok(None);
        };
        let Some(bytes) = &rows[0] else { return Ok(None) };
        let state =
            postcard::from_bytes(bytes).map_err(|e| StageError::Corrupt(format!("a group's aggregate: {e}")))?;
        Ok(Some(state))
    }

    /// A change's row taken out and row added (both for a replacement).
    fn decode(value: &[u8]) -> Result<(Option<V>, Option<V>), StageError> {
        let row = |bytes: &[u8]| {
            postcard::from_bytes::<V>(bytes).map_err(|e| StageError::Corrupt(format!("a changed row: {e}")))
        };
        match value {
            [TAKEN_OUT, rest @ ..] => Ok((Some(row(rest)?), None)),
            [ADDED, rest @ ..] => Ok((None, Some(row(rest)?))),
            [REPLACED, rest @ ..] => {
                let (old, new): (Vec<u8>, Vec<u8>) =
                    postcard::from_bytes(rest).map_err(|e| StageError::Corrupt(format!("a replaced row: {e}")))?;
                Ok((Some(row(&old)?), Some(row(&new)?)))
            }
            _ => Err(StageError::Corrupt("a table change without a sign".to_string())),
        }
    }

    /// Writes the group's aggregate (a tombstone when `None`).
    fn emit(group: &[u8], aggregate: Option<&A>, t_ms: i64, out: &mut Emitted) -> Result<(), StageError> {
        let group: K = postcard::from_bytes(group).map_err(|e| StageError::Corrupt(format!("a group key: {e}")))?;
        let unencodable = |e: serde_json::Error| StageError::Unencodable(e.to_string());
        let key = out.encode(to_json(&group)).map_err(unencodable)?;
        let value = aggregate
            .map(|a| out.encode(to_json(a)))
            .transpose()
            .map_err(unencodable)?;
        out.push(t_ms, Some(key), value);
        Ok(())
    }
}

impl<V, K, A> WindowStage for TypedAggregateStage<V, K, A>
where
    V: DeserializeOwned + 'static,
    K: Serialize + DeserializeOwned + 'static,
    A: Serialize + DeserializeOwned + 'static,
{
    fn add(&mut self, key: &[u8], value: &[u8], t_ms: i64, out: &mut Emitted) -> Result<(), StageError> {
        let (taken_out, added) = Self::decode(value)?;
        self.max_event_ms = self.max_event_ms.max(t_ms);
        let (mut aggregate, mut rows) = match self.state(key)? {
            Some(state) => state,
            None if taken_out.is_some() => {
                return Err(StageError::Corrupt(
                    "a row taken out of (or replaced in) a group that holds none".to_string(),
                ))
            }
            None => ((self.init)(), 0),
        };
        if let Some(row) = &taken_out {
            (self.subtract)(&mut aggregate, row);
            rows = rows
                .checked_sub(1)
                .ok_or_else(|| StageError::Corrupt("a group's row count fell below 0".to_string()))?;
        }
        if let Some(row) = &added {
            (self.add)(&mut aggregate, row);
            rows += 1;
        }
        let kept = match rows {
            0 => None,
            _ => Some(postcard::to_allocvec(&(&aggregate, rows)).map_err(|e| StageError::Unencodable(e.to_string()))?),
        };
        self.groups.update(key, 0, kept, |_| Ok(()))?;
        Self::emit(key, (rows > 0).then_some(&aggregate), t_ms, out)
    }

    one_store_stage!(groups, snapshot_version, restore_version);

    fn read(&self, key: Option<&[u8]>, limit: usize) -> Result<Option<Vec<StateRow>>, StageError> {
        let mut out = Emitted::default();
        for (group, _) in self.groups.iter(key) {
            if out.len() >= limit {
                return Ok(None);
            }
            if let Some((aggregate, _)) = self.state(group)? {
                Self::emit(group, Some(&aggregate), 0, &mut out)?;
            }
        }
        Ok(Some(state_rows(&out)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;
    use crate::Dataflow;

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct User {
        country: String,
        age: i64,
    }

    /// Users and the sum of their ages per country; the country "none"
    /// is in no group.
    fn dataflow() -> DataflowDef {
        Dataflow::new("per_country")
            .table::<User>("users")
            .group_by(|_id: &str, user: &User| (user.country != "none").then(|| user.country.clone()))
            .aggregate(
                || (0u64, 0i64),
                |(n, ages): &mut (u64, i64), user: &User| (*n, *ages) = (*n + 1, *ages + user.age),
                |(n, ages): &mut (u64, i64), user: &User| (*n, *ages) = (*n - 1, *ages - user.age),
            )
            .sink("per_country")
    }

    /// 500 changes over ten keys: rows moving between countries, into and
    /// out of no group, deleted, and deletions of keys never written.
    fn changes() -> Vec<(String, Option<User>)> {
        let mut rng = crate::testing::Lcg::new(31);
        (0..500)
            .map(|_| {
                let roll = rng.next_state() >> 33;
                let key = format!("u{}", roll % 10);
                let country = ["NL", "DE", "none"][((roll >> 4) % 3) as usize].to_string();
                let user = (!(roll >> 6).is_multiple_of(5)).then_some(User {
                    country,
                    age: ((roll >> 9) % 90) as i64,
                });
                (key, user)
            })
            .collect()
    }

    fn reference(table: &BTreeMap<String, User>) -> BTreeMap<String, (u64, i64)> {
        let mut groups: BTreeMap<String, (u64, i64)> = BTreeMap::new();
        for user in table.values().filter(|u| u.country != "none") {
            let group = groups.entry(user.country.clone()).or_default();
            *group = (group.0 + 1, group.1 + user.age);
        }
        groups
    }

    fn materialize(rows: &mut BTreeMap<String, (u64, i64)>, key: &[u8], value: Option<&[u8]>) {
        let key: String = serde_json::from_slice(key).expect("a JSON key");
        match value {
            Some(v) => rows.insert(key, serde_json::from_slice(v).expect("JSON")),
            None => rows.remove(&key),
        };
    }

    /// Runs the changes through the three stages, checkpointing every 41
    /// changes and restoring both stateful stages at each of `restarts`;
    /// after every change the sink materializes the reference.
    fn run_checked(restarts: &[usize]) -> usize {
        let def = dataflow();
        let factories = [def.window_stage.clone().expect("changes"), def.next_stages[0].clone()];
        let mut stages: Vec<Box<dyn WindowStage>> = factories.iter().map(|f| f()).collect();
        let mut logs = [crate::testing::Changelog::new(), crate::testing::Changelog::new()];
        let (mut table, mut materialized, mut deletions) = (BTreeMap::new(), BTreeMap::new(), 0);
        for (i, (key, user)) in changes().into_iter().enumerate() {
            for s in 0..2 {
                if i % 41 == 0 || restarts.contains(&i) {
                    crate::testing::checkpoint_into(stages[s].store_mut().expect("a store"), &mut logs[s], true);
                }
                if restarts.contains(&i) {
                    let snapshot = stages[s].snapshot().expect("snapshots");
                    stages[s] = factories[s]();
                    stages[s].restore(&snapshot).expect("restores");
                    crate::testing::replay_into(stages[s].store_mut().expect("a store"), &logs[s], i % 2 == 0);
                }
            }
            let bytes = user.as_ref().map(|u| serde_json::to_vec(u).expect("JSON"));
            let out = crate::testing::run_through(&def, &mut stages, Some(key.as_bytes()), bytes.as_deref(), i as i64)
                .unwrap_or_else(|e| panic!("change {i}: {e}"));
            let group = |user: Option<&User>| user.filter(|u| u.country != "none").map(|u| u.country.clone());
            let stays = user.is_some() && group(table.get(&key)) == group(user.as_ref());
            assert!(
                !stays || out.iter().all(|(_, value)| value.is_some()),
                "change {i} keeps its row in its group, which never shows it missing"
            );
            for (key, value) in &out {
                deletions += usize::from(value.is_none());
                materialize(&mut materialized, key, value.as_deref());
            }
            match user {
                Some(user) => table.insert(key, user),
                None => table.remove(&key),
            };
            assert_eq!(materialized, reference(&table), "after change {i}");
        }
        let mut pulled = BTreeMap::new();
        for row in stages[1].read(None, 100).expect("reads").expect("within the limit") {
            materialize(&mut pulled, &row.key, Some(&row.value));
        }
        assert_eq!(pulled, materialized, "a pull query reads every group");
        deletions
    }

    #[test]
    fn a_typed_table_aggregate_adds_and_subtracts_changed_rows_through_restores() {
        let deletions = run_checked(&[]);
        assert!(deletions > 0, "groups emptied and deleted");
        assert_eq!(run_checked(&[1, 200, 499]), deletions);
        let def = dataflow();
        assert_eq!(def.stages(), 3);
        let explained = def.plan().explain("per_country");
        assert!(explained.contains("RUST GROUP_BY alloc::string::String"), "{explained}");
    }
}
