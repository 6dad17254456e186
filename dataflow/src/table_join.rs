//! Table–table joins: both tables read as tables (the record key is the
//! primary key, a null value deletes the row), repartitioned by that key,
//! and a join stage holding each key's latest left and right rows.
//!
//! Every change to either side emits the key's joined row as it now
//! stands, as ksqlDB's table–table join does: an upsert when the join kind
//! keeps the key (inner: both rows; left: the left row; outer: either),
//! else a tombstone if it was kept before. The operators after the join
//! (a `WHERE`, the projection) apply to each joined row; a row a filter
//! drops is deleted like an unmatched one. Pull queries read the joined
//! rows by key.
//!
//! Everything here is a function of the records in order, so a task
//! replaying its input from a checkpoint emits the same changes.

mod rows;

use std::sync::Arc;

use runnel_client::plan::{Column, JoinKind, Operator, Sink};
use runnel_client::tasks::StateRow;
use serde::{Deserialize, Serialize};

pub use self::rows::{KeyRows, Rows};
use crate::builder::{state_rows, Emitted, SourceStage, StageError, StateStore, WindowStage};
use crate::compile::{group_key, run_ops};
use crate::join::{LEFT, RIGHT};
use crate::row::{decode_row, JsonRow, Value};
use crate::table::{key_value, TableState};

/// Keys one table–table join task holds at most.
pub const TABLE_JOIN_KEYS_MAX: usize = 500_000;
/// The format of [`TablesSnapshot`].
/// 2: the rows are in the changelog, the snapshot holds none (version 1
/// held them all, and still reads).
const TABLES_STATE_VERSION: u8 = 2;
const TABLES_STATE_V1: u8 = 1;

/// The source stage of one side of a table–table join.
pub struct TableSource {
    pub columns: Vec<Column>,
    /// The primary key column, whose value the record key holds as text;
    /// `None`: the record key as it is names the row, and the value holds
    /// every column (a table a query writes, keyed by a JSON object).
    pub key: Option<usize>,
    /// [`LEFT`] or [`RIGHT`].
    pub side: i64,
}

impl SourceStage for TableSource {
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
        let mut row = Vec::with_capacity(self.columns.len() + 1);
        if let Some(value) = value {
            decode_row(&self.columns, value, &mut row)?;
        }
        let pk = self.primary_key(key, value.is_some(), &mut row)?;
        let mut carried = vec![Value::Int(self.side)];
        if value.is_some() {
            row.push(Value::Int(timestamp_ms));
            carried.extend(row);
        }
        let key = group_key(&[pk])?;
        let key = out.encode(|b| {
            b.extend_from_slice(&key);
            Ok::<_, String>(())
        })?;
        let value = out
            .encode(|b| postcard::to_io(&carried, b).map(drop))
            .map_err(|e| e.to_string())?;
        out.push(timestamp_ms, Some(key), Some(value));
        Ok(())
    }
}

impl TableSource {
    /// The row's primary key (set in `row`, when it has a row): the record
    /// key, or without one, the value's key column (as a stream–table join
    /// reads a table).
    fn primary_key(&self, key: Option<&[u8]>, has_row: bool, row: &mut [Value]) -> Result<Value, String> {
        let text = key
            .map(|key| std::str::from_utf8(key).map_err(|_| "a table's record key is not UTF-8 text".to_string()))
            .transpose()?;
        let Some(column) = self.key else {
            // A table a query writes: its record key (a JSON object) as is.
            let text = text.ok_or("a table's record without a key")?;
            return Ok(Value::String(text.to_string()));
        };
        let pk = match text {
            Some(text) => {
                let pk = key_value(text, self.columns[column].ty);
                if pk == Value::Null {
                    return Err(format!("the record key {text:?} is not a {}", self.columns[column].ty));
                }
                pk
            }
            None if has_row && row[column] != Value::Null => row[column].clone(),
            None => {
                return Err("a table's record without a key (its primary key) in the record key or the value".into())
            }
        };
        if has_row {
            row[column] = pk.clone();
        }
        Ok(pk)
    }
}

/// What every task of a table–table join stage shares.
#[derive(Clone, Debug)]
pub struct TablesSpec {
    pub kind: JoinKind,
    pub left_width: usize,
    pub right_width: usize,
    pub ops: Vec<Operator>,
    pub sink: Sink,
}

#[derive(Serialize, Deserialize)]
struct TablesSnapshot {
    version: u8,
    rows: Vec<(Vec<u8>, Rows<Vec<Value>>)>,
}

/// Whether a join of `kind` keeps a key with `rows`.
pub fn keeps<R>(kind: JoinKind, rows: &Rows<R>) -> bool {
    match kind {
        JoinKind::Inner => rows[0].is_some() && rows[1].is_some(),
        JoinKind::Left => rows[0].is_some(),
        JoinKind::Outer => rows[0].is_some() || rows[1].is_some(),
    }
}

/// One task's table–table join state.
pub struct TableJoinStage {
    spec: Arc<TablesSpec>,
    rows: KeyRows<Vec<Value>>,
    max_event_ms: i64,
    scratch: Vec<Value>,
}

/// The key's joined row after the stage's operators, if the join keeps it.
fn joined(spec: &TablesSpec, scratch: &mut Vec<Value>, rows: &Rows<Vec<Value>>) -> Option<Vec<Value>> {
    if !keeps(spec.kind, rows) {
        return None;
    }
    let mut row = Vec::with_capacity(spec.left_width + spec.right_width);
    match &rows[0] {
        Some(left) => row.extend_from_slice(left),
        None => row.resize(spec.left_width, Value::Null),
    }
    match &rows[1] {
        Some(right) => row.extend_from_slice(right),
        None => row.resize(spec.left_width + spec.right_width, Value::Null),
    }
    run_ops(&spec.ops, &[], &mut row, scratch).then_some(row)
}

impl TableJoinStage {
    pub fn new(spec: Arc<TablesSpec>) -> TableJoinStage {
        TableJoinStage {
            spec,
            rows: KeyRows::default(),
            max_event_ms: i64::MIN,
            scratch: Vec::new(),
        }
    }

    /// A repartitioned value: its side, then the row (none: a deletion).
    fn decode(&self, value: &[u8]) -> Result<(usize, Option<Vec<Value>>), StageError> {
        let mut carried: Vec<Value> =
            postcard::from_bytes(value).map_err(|e| StageError::Corrupt(format!("table join value: {e}")))?;
        let (side, width) = match carried.first() {
            Some(Value::Int(LEFT)) => (0, self.spec.left_width),
            Some(Value::Int(RIGHT)) => (1, self.spec.right_width),
            other => {
                return Err(StageError::Corrupt(format!(
                    "table join value names no side: {other:?}"
                )))
            }
        };
        carried.remove(0);
        match carried.len() {
            0 => Ok((side, None)),
            n if n == width => Ok((side, Some(carried))),
            n => Err(StageError::Corrupt(format!("a table row of {n} values, not {width}"))),
        }
    }

    /// Emits the key's joined `row` (a tombstone when `None`), keyed by
    /// the join key itself: an outer join's row may lack the side whose
    /// key column the SELECT shows.
    fn emit(&self, key: &[u8], row: Option<&[Value]>, t_ms: i64, out: &mut Emitted) -> Result<(), StageError> {
        let sink = &self.spec.sink;
        let mut keys: Vec<Value> =
            postcard::from_bytes(key).map_err(|e| StageError::Corrupt(format!("table join key: {e}")))?;
        let mut values = vec![Value::Null; sink.columns.len()];
        for (&column, value) in sink.key.iter().zip(keys.drain(..)) {
            if let Some(slot) = values.get_mut(column) {
                *slot = value;
            }
        }
        let json_key = JsonRow {
            columns: &sink.columns,
            values: &values,
            picked: Some(&sink.key),
            extra: &[],
        };
        let json_key = out
            .encode(|b| serde_json::to_writer(b, &json_key))
            .map_err(|e| StageError::Unencodable(e.to_string()))?;
        let value = match row {
            Some(row) => {
                let value = JsonRow {
                    columns: &sink.columns,
                    values: row,
                    picked: None,
                    extra: &[],
                };
                Some(
                    out.encode(|b| serde_json::to_writer(b, &value))
                        .map_err(|e| StageError::Unencodable(e.to_string()))?,
                )
            }
            None => None,
        };
        out.push(t_ms, Some(json_key), value);
        Ok(())
    }
}

impl WindowStage for TableJoinStage {
    fn add(&mut self, key: &[u8], value: &[u8], t_ms: i64, out: &mut Emitted) -> Result<(), StageError> {
        let (side, row) = self.decode(value)?;
        self.max_event_ms = self.max_event_ms.max(t_ms);
        let (spec, scratch) = (&self.spec, &mut self.scratch);
        let (before, after) = self
            .rows
            .update(key, side, row, |rows| Ok(joined(spec, scratch, rows)))?;
        match (before, after) {
            (_, Some(row)) => self.emit(key, Some(&row), t_ms, out),
            (Some(_), None) => self.emit(key, None, t_ms, out),
            (None, None) => Ok(()),
        }
    }

    fn snapshot(&self) -> Result<Vec<u8>, StageError> {
        let snapshot = TablesSnapshot {
            version: TABLES_STATE_VERSION,
            rows: Vec::new(),
        };
        postcard::to_allocvec(&snapshot).map_err(|e| StageError::Unencodable(e.to_string()))
    }

    /// A snapshot of version 1 holds every row: they are all changes to
    /// write to the changelog with the next checkpoint.
    fn restore(&mut self, bytes: &[u8]) -> Result<(), StageError> {
        let snapshot: TablesSnapshot =
            postcard::from_bytes(bytes).map_err(|e| StageError::Corrupt(format!("table join state: {e}")))?;
        if !(TABLES_STATE_V1..=TABLES_STATE_VERSION).contains(&snapshot.version) {
            return Err(StageError::Corrupt(format!(
                "table join state of format {} (this node reads {TABLES_STATE_V1} to {TABLES_STATE_VERSION})",
                snapshot.version
            )));
        }
        self.rows.restore_rows(snapshot.rows);
        Ok(())
    }

    fn store(&self) -> Option<&dyn StateStore> {
        Some(&self.rows)
    }

    fn store_mut(&mut self) -> Option<&mut dyn StateStore> {
        Some(&mut self.rows)
    }

    fn watermark_ms(&self) -> i64 {
        self.max_event_ms
    }

    fn read(&self, key: Option<&[u8]>, limit: usize) -> Result<Option<Vec<StateRow>>, StageError> {
        let (mut out, mut scratch) = (Emitted::default(), Vec::new());
        for (key, rows) in self.rows.iter(key) {
            if out.len() >= limit {
                return Ok(None);
            }
            if let Some(row) = joined(&self.spec, &mut scratch, rows) {
                self.emit(key, Some(&row), 0, &mut out)?;
            }
        }
        Ok(Some(state_rows(&out)))
    }
}
