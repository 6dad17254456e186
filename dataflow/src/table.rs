//! Tables a source stage joins its rows with (SQL's stream–table join).
//!
//! Every task that reads the stream holds the whole table, read from the
//! table's topic (Kafka Streams' global table): neither side has to be
//! partitioned by the join key, and partition counts need not match.
//!
//! Exactly-once rests on replay being deterministic, so a task joins with
//! the table as it stood at fixed read positions: the positions are moved
//! only just before a checkpoint, and the checkpoint records them. After a
//! crash the task rebuilds the table up to the recorded positions and
//! replays its input against the same rows it joined with before.
//!
//! Memory is bounded: past [`TABLE_ROWS_MAX`] rows or [`TABLE_BYTES_MAX`]
//! bytes (estimated) the task fails with an error naming the table.

use std::collections::HashMap;
use std::time::Duration;

use runnel_client::plan::{AsOf, SqlType, TableJoin};
use runnel_client::{BrokerError, ClientError};
use runnel_storage::RecordView;

use crate::row::{decode_row, Value};
use crate::task::{retryable, TaskError, TaskIo};
use crate::versioned::{Version, VersionedRows};

/// Rows one task holds of one table.
pub const TABLE_ROWS_MAX: usize = 1_000_000;
/// Bytes one task holds of one table, estimated from the records' sizes.
pub const TABLE_BYTES_MAX: usize = 256 << 20;
/// What a row costs beyond its key and value bytes (map entry, values).
const ROW_OVERHEAD_BYTES: usize = 96;
/// Bytes read per fetch.
const FETCH_BYTES: u32 = 1 << 20;
/// How long a rebuild waits out an unavailable partition before failing
/// the task (which is then restarted).
const REBUILD_RETRY_FOR: Duration = Duration::from_secs(60);

/// Why a table cannot be held.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("table {table}: the record at {topic}/{partition}@{offset} does not decode ({reason}); the task stops rather than join with a table missing it")]
    Decode {
        table: String,
        topic: String,
        partition: u32,
        offset: u64,
        reason: String,
    },
    #[error("table {table} partition {partition} could not be read up to offset {to}, where the task's checkpoint joined with it (read up to {at})")]
    Unreadable {
        table: String,
        partition: u32,
        at: u64,
        to: u64,
    },
    #[error("table {table} is over one task's bound ({rows} rows, about {bytes} bytes; at most {TABLE_ROWS_MAX} rows and {TABLE_BYTES_MAX} bytes): every task reading the stream holds the whole table")]
    Full { table: String, rows: usize, bytes: usize },
}

/// One table as a task holds it: the latest row of each key, read from the
/// table's topic up to `positions`.
pub struct TableState {
    join: TableJoin,
    /// Key (the record key, as text) to row (the table's columns).
    rows: HashMap<String, Vec<Value>>,
    bytes: usize,
    /// Per partition, the offset read up to (exclusive).
    positions: Vec<u64>,
    /// For a join by event time, the rows by time instead of `rows`.
    history: Option<History>,
}

/// A table joined by event time: its versions, and where its rows' times
/// are.
struct History {
    rows: VersionedRows,
    /// The column of the rows' times, if not the records' timestamps.
    time_column: Option<usize>,
}

impl TableState {
    /// A table of `join`'s columns; without columns (a Rust dataflow's
    /// table), each row is the whole value, as one JSON column.
    pub fn new(join: TableJoin) -> TableState {
        assert!(join.partitions > 0, "a validated join");
        assert!(
            join.columns.is_empty() || join.key < join.columns.len(),
            "a validated join"
        );
        TableState {
            positions: vec![0; join.partitions as usize],
            join,
            rows: HashMap::new(),
            bytes: 0,
            history: None,
        }
    }

    /// A table joined by event time: it keeps each key's rows by time,
    /// `as_of.history_ms` back.
    pub fn versioned(join: TableJoin, as_of: &AsOf) -> TableState {
        assert!(
            as_of.table_time.is_none_or(|i| i < join.columns.len()),
            "a validated join"
        );
        let mut table = TableState::new(join);
        table.history = Some(History {
            rows: VersionedRows::new(as_of.history_ms),
            time_column: as_of.table_time,
        });
        table
    }

    pub fn join(&self) -> &TableJoin {
        &self.join
    }

    pub fn positions(&self) -> &[u64] {
        &self.positions
    }

    /// Rows held: of a table joined by event time, every version.
    pub fn len(&self) -> usize {
        match &self.history {
            Some(history) => history.rows.versions(),
            None => self.rows.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The row of the key `text`.
    pub fn get(&self, text: &str) -> Option<&[Value]> {
        self.rows.get(text).map(Vec::as_slice)
    }

    /// The row whose key equals `key` (compared as text, as keys are written).
    pub fn lookup(&self, key: &Value) -> Option<&[Value]> {
        match key {
            Value::Null => None,
            Value::String(text) => self.rows.get(text.as_str()),
            other => self.rows.get(other.to_text()?.as_str()),
        }
        .map(Vec::as_slice)
    }

    /// The row of the key `text` as it was at `at_ms`, in a table joined
    /// by event time.
    pub fn get_at(&self, text: &str, at_ms: i64) -> Option<&[Value]> {
        let history = self.history.as_ref().expect("a table joined by event time");
        history.rows.get(text, at_ms)
    }

    /// The row whose key equals `key` as it was at `at_ms`, in a table
    /// joined by event time.
    pub fn lookup_at(&self, key: &Value, at_ms: i64) -> Option<&[Value]> {
        match key {
            Value::Null => None,
            Value::String(text) => self.get_at(text, at_ms),
            other => self.get_at(&other.to_text()?, at_ms),
        }
    }

    /// Applies one record of `partition`: an upsert, or a delete when its
    /// value is null (a tombstone).
    pub fn apply(&mut self, partition: u32, view: &RecordView<'_>) -> Result<(), TableError> {
        let fail = |reason: String| TableError::Decode {
            table: self.join.table.clone(),
            topic: self.join.topic.clone(),
            partition,
            offset: view.offset,
            reason,
        };
        let (key, row) = self.decode(view).map_err(fail)?;
        let Some(history) = &mut self.history else {
            return match row {
                Some(row) => self.insert(key, row),
                None => {
                    if let Some(row) = self.rows.remove(&key) {
                        self.bytes = self.bytes.saturating_sub(row_bytes(&key, &row));
                    }
                    Ok(())
                }
            };
        };
        // A row's time is its time column's (the record's timestamp when
        // NULL); a deletion has no columns: its record's timestamp dates it,
        // and, when the rows are timed by a column (whose times the
        // records' timestamps need not follow), it does not move the
        // table's time on.
        let (at_ms, moves_time) = match (history.time_column, &row) {
            (Some(column), Some(row)) => match row[column] {
                Value::Int(ms) => (ms, true),
                Value::Null => (view.timestamp_ms, true),
                ref other => return Err(fail(format!("its time column is {other}, not a BIGINT time in ms"))),
            },
            (time_column, _) => (view.timestamp_ms, time_column.is_none()),
        };
        let added = row.as_ref().map_or(0, |row| row_bytes(&key, row));
        let mut released = 0;
        let version = Version { at_ms, row, moves_time };
        let kept = history
            .rows
            .put(&key, version, |key, old| released += row_bytes(key, old));
        if kept {
            self.bytes = (self.bytes + added).saturating_sub(released);
        }
        self.check_bounds()
    }

    /// A record's key (as text) and row, `None` for a tombstone.
    fn decode(&self, view: &RecordView<'_>) -> Result<(String, Option<Vec<Value>>), String> {
        let key = match view.key {
            Some(key) => Some(std::str::from_utf8(key).map_err(|_| "its key is not UTF-8 text".to_string())?),
            None => None,
        };
        let Some(value) = view.value else {
            let key = key.ok_or("a tombstone without a key")?;
            return Ok((key.to_string(), None));
        };
        if self.join.columns.is_empty() {
            let key = key.ok_or("a row without a key")?;
            let text = std::str::from_utf8(value).map_err(|_| "its value is not UTF-8 JSON".to_string())?;
            serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| format!("not JSON: {e}"))?;
            return Ok((key.to_string(), Some(vec![Value::Json(text.to_string())])));
        }
        let mut row = Vec::with_capacity(self.join.columns.len());
        decode_row(&self.join.columns, value, &mut row)?;
        let key = match key {
            Some(key) => key.to_string(),
            None => row[self.join.key]
                .to_text()
                .ok_or("neither a record key nor a value in the key column")?,
        };
        if matches!(row[self.join.key], Value::Null) {
            row[self.join.key] = key_value(&key, self.join.columns[self.join.key].ty);
        }
        Ok((key, Some(row)))
    }

    fn insert(&mut self, key: String, row: Vec<Value>) -> Result<(), TableError> {
        self.bytes += row_bytes(&key, &row);
        if let Some(old) = self.rows.insert(key.clone(), row) {
            self.bytes = self.bytes.saturating_sub(row_bytes(&key, &old));
        }
        self.check_bounds()
    }

    fn check_bounds(&self) -> Result<(), TableError> {
        if self.len() > TABLE_ROWS_MAX || self.bytes > TABLE_BYTES_MAX {
            return Err(TableError::Full {
                table: self.join.table.clone(),
                rows: self.len(),
                bytes: self.bytes,
            });
        }
        Ok(())
    }

    /// Reads every partition on to its committed end, as far as the cluster
    /// answers now; whether any position moved. A partition that cannot be
    /// read now keeps its position (the next refresh goes on from there).
    pub async fn refresh<C: TaskIo>(&mut self, client: &C) -> Result<bool, TaskError> {
        Ok(self.read_on(client).await?.0)
    }

    /// Reads every partition to its committed end, waiting out
    /// unavailability for a bounded time: a new task's first table.
    pub async fn load<C: TaskIo>(&mut self, client: &C) -> Result<(), TaskError> {
        let deadline = client.now() + REBUILD_RETRY_FOR;
        loop {
            let (_, lagging) = self.read_on(client).await?;
            let Some(partition) = lagging else { return Ok(()) };
            if client.now() >= deadline {
                let at = self.positions[partition as usize];
                return Err(TableError::Unreadable {
                    table: self.join.table.clone(),
                    partition,
                    at,
                    to: at + 1,
                }
                .into());
            }
            client.sleep(Duration::from_millis(50)).await;
        }
    }

    /// One pass over the partitions: whether a position moved, and the
    /// last partition not known to be read to its end, if any.
    async fn read_on<C: TaskIo>(&mut self, client: &C) -> Result<(bool, Option<u32>), TaskError> {
        let (mut moved, mut lagging) = (false, None);
        for partition in 0..self.join.partitions {
            loop {
                let from = self.positions[partition as usize];
                let fetched = match self.fetch(client, partition, from).await {
                    Ok(Some(fetched)) => fetched,
                    Ok(None) => {
                        lagging = Some(partition);
                        break;
                    }
                    Err(e) if retryable(&e) => {
                        lagging = Some(partition);
                        break;
                    }
                    Err(e) => return Err(e.into()),
                };
                self.take(partition, &fetched, u64::MAX)?;
                let position = self.positions[partition as usize];
                moved |= position != from;
                if position >= fetched.committed_offset {
                    break;
                }
                if position == from {
                    lagging = Some(partition);
                    break;
                }
            }
        }
        Ok((moved, lagging))
    }

    /// Reads every partition up to exactly `positions` (a checkpoint's),
    /// waiting out unavailability for a bounded time.
    pub async fn rebuild<C: TaskIo>(&mut self, client: &C, positions: &[u64]) -> Result<(), TaskError> {
        assert_eq!(positions.len(), self.positions.len(), "positions of every partition");
        let deadline = client.now() + REBUILD_RETRY_FOR;
        for partition in 0..self.join.partitions {
            let to = positions[partition as usize];
            while self.positions[partition as usize] < to {
                let from = self.positions[partition as usize];
                match self.fetch(client, partition, from).await {
                    Ok(Some(fetched)) => self.take(partition, &fetched, to)?,
                    Ok(None) => {}
                    Err(e) if retryable(&e) => {}
                    Err(e) => return Err(e.into()),
                }
                if self.positions[partition as usize] == from {
                    if client.now() >= deadline {
                        return Err(TableError::Unreadable {
                            table: self.join.table.clone(),
                            partition,
                            at: from,
                            to,
                        }
                        .into());
                    }
                    client.sleep(Duration::from_millis(50)).await;
                }
            }
        }
        Ok(())
    }

    /// One fetch from `from`: `None` while the partition's commit point is
    /// not known yet; records deleted by retention are skipped.
    async fn fetch<C: TaskIo>(
        &mut self,
        client: &C,
        partition: u32,
        from: u64,
    ) -> Result<Option<runnel_client::FetchedBatches>, ClientError> {
        match client.fetch(&self.join.topic, partition, from, FETCH_BYTES).await {
            Ok(fetched) => Ok(Some(fetched)),
            Err(ClientError::Broker(BrokerError::OffsetOutOfRange { offset, end, .. })) if offset > end => Ok(None),
            Err(ClientError::Broker(BrokerError::OffsetOutOfRange { offset, start, .. })) if offset < start => {
                self.positions[partition as usize] = start;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Applies the fetched records below `to` and moves the position.
    fn take(&mut self, partition: u32, fetched: &runnel_client::FetchedBatches, to: u64) -> Result<(), TaskError> {
        let position = &mut self.positions[partition as usize];
        let end = fetched.next_offset.min(to);
        let start = *position;
        *position = (*position).max(end);
        for view in fetched.views() {
            let view = view?;
            if view.offset >= start && view.offset < end {
                self.apply(partition, &view)?;
            }
        }
        Ok(())
    }
}

fn row_bytes(key: &str, row: &[Value]) -> usize {
    let values: usize = row
        .iter()
        .map(|v| match v {
            Value::String(s) | Value::Json(s) => s.len(),
            _ => 0,
        })
        .sum();
    key.len() + values + ROW_OVERHEAD_BYTES + std::mem::size_of_val(row)
}

/// The key column's value when the record's value leaves it out: a
/// primary key's value from its text (the record key), by its column's type.
pub(crate) fn key_value(key: &str, ty: SqlType) -> Value {
    match ty {
        SqlType::Int | SqlType::BigInt => key.parse().map_or(Value::Null, Value::Int),
        SqlType::Double => key.parse().map_or(Value::Null, Value::Double),
        SqlType::Boolean => key.parse().map_or(Value::Null, Value::Boolean),
        SqlType::String => Value::String(key.to_string()),
        SqlType::Json => Value::Json(key.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use runnel_client::plan::{Column, Expr, JoinKind};
    use runnel_client::{Acks, ClientResult, FetchedBatches};
    use runnel_storage::{BatchBuilder, Record, RecordBatch};

    use super::*;

    /// Partitions as lists of one-record batches; a fetch answers at most
    /// two of them, so reads take several rounds.
    #[derive(Default)]
    struct Memory {
        partitions: Mutex<BTreeMap<u32, Vec<RecordBatch>>>,
    }

    impl Memory {
        fn append(&self, partition: u32, key: &str, value: Option<&str>) {
            let mut partitions = self.partitions.lock().expect("lock");
            let log = partitions.entry(partition).or_default();
            let mut builder = BatchBuilder::new();
            builder
                .push(&Record {
                    timestamp_ms: 0,
                    key: Some(key.to_string().into()),
                    value: value.map(|v| v.to_string().into()),
                    headers: Vec::new(),
                })
                .expect("pushes");
            let mut batch = builder.build().expect("builds");
            batch.set_base_offset(log.len() as u64);
            log.push(batch);
        }
    }

    impl TaskIo for Memory {
        async fn fetch(&self, _: &str, partition: u32, offset: u64, _: u32) -> ClientResult<FetchedBatches> {
            let partitions = self.partitions.lock().expect("lock");
            let log = partitions.get(&partition).cloned().unwrap_or_default();
            let batches = log.iter().skip(offset as usize).take(2).cloned().collect();
            Ok(FetchedBatches::new(offset, batches, log.len() as u64))
        }

        async fn produce(&self, _: &str, _: u32, _: RecordBatch, _: Acks) -> ClientResult<u64> {
            unreachable!("tables are only read")
        }

        async fn delete_records(&self, _: &str, _: u32, _: u64) -> ClientResult<u64> {
            unreachable!("tables are only read")
        }

        fn now(&self) -> Duration {
            Duration::ZERO
        }

        async fn sleep(&self, _: Duration) {}
    }

    fn cards() -> TableJoin {
        let column = |name: &str, ty| Column { name: name.into(), ty };
        TableJoin {
            table: "CARDS".into(),
            topic: "cards".into(),
            partitions: 2,
            columns: vec![column("ID", SqlType::BigInt), column("COUNTRY", SqlType::String)],
            key: 0,
            on: Expr::Column(0),
            kind: JoinKind::Inner,
        }
    }

    fn country(table: &TableState, id: i64) -> Option<String> {
        table.lookup(&Value::Int(id)).map(|row| row[1].to_string())
    }

    #[tokio::test]
    async fn a_table_holds_the_latest_row_per_key_and_rebuilds_to_exact_positions() {
        let io = Memory::default();
        io.append(0, "1", Some(r#"{"ID": 1, "COUNTRY": "NL"}"#));
        io.append(0, "2", Some(r#"{"COUNTRY": "DE"}"#));
        io.append(1, "3", Some(r#"{"ID": 3, "COUNTRY": "FR"}"#));
        io.append(0, "1", Some(r#"{"ID": 1, "COUNTRY": "BE"}"#));
        io.append(1, "3", None);
        let mut table = TableState::new(cards());
        table.load(&io).await.expect("loads");
        assert_eq!(table.positions(), &[3, 2]);
        assert_eq!(country(&table, 1).as_deref(), Some("BE"), "the latest row of a key");
        assert_eq!(country(&table, 2).as_deref(), Some("DE"));
        assert_eq!(
            table.lookup(&Value::Int(2)).expect("row")[0],
            Value::Int(2),
            "the key fills its column"
        );
        assert_eq!(country(&table, 3), None, "a tombstone deletes");
        assert_eq!(table.lookup(&Value::Null), None);

        io.append(0, "2", Some(r#"{"ID": 2, "COUNTRY": "US"}"#));
        let positions = table.positions().to_vec();
        let mut restored = TableState::new(cards());
        restored.rebuild(&io, &positions).await.expect("rebuilds");
        assert_eq!(
            country(&restored, 2).as_deref(),
            Some("DE"),
            "not past the recorded positions"
        );
        assert_eq!(restored.len(), table.len());
        assert!(table.refresh(&io).await.expect("refreshes"), "the update moves it");
        assert_eq!(country(&table, 2).as_deref(), Some("US"));
        assert!(!table.refresh(&io).await.expect("refreshes"), "nothing new");
    }

    #[tokio::test]
    async fn a_table_joined_by_event_time_keeps_each_keys_rows_by_its_time_column() {
        let io = Memory::default();
        io.append(0, "1", Some(r#"{"ID": 1, "COUNTRY": "NL", "AT": 100}"#));
        io.append(0, "1", Some(r#"{"ID": 1, "COUNTRY": "DE", "AT": 300}"#));
        io.append(0, "1", Some(r#"{"ID": 1, "COUNTRY": "BE", "AT": 200}"#));
        io.append(1, "3", Some(r#"{"ID": 3, "COUNTRY": "FR", "AT": 50}"#));
        let mut join = cards();
        join.columns.push(Column {
            name: "AT".into(),
            ty: SqlType::BigInt,
        });
        let as_of = AsOf {
            at: Expr::Column(0),
            table_time: Some(2),
            history_ms: 1_000,
            grace_ms: 0,
        };
        let mut table = TableState::versioned(join.clone(), &as_of);
        table.load(&io).await.expect("loads");
        assert_eq!(table.len(), 4, "every version");
        let country_at = |table: &TableState, id: i64, at_ms: i64| {
            table.lookup_at(&Value::Int(id), at_ms).map(|row| row[1].to_string())
        };
        assert_eq!(country_at(&table, 1, 99), None, "before the key's first row");
        assert_eq!(country_at(&table, 1, 250).as_deref(), Some("BE"));
        assert_eq!(country_at(&table, 1, 350).as_deref(), Some("DE"));
        assert_eq!(country_at(&table, 3, 60).as_deref(), Some("FR"));
        let mut restored = TableState::versioned(join, &as_of);
        restored.rebuild(&io, table.positions()).await.expect("rebuilds");
        assert_eq!(country_at(&restored, 1, 250).as_deref(), Some("BE"));

        io.append(1, "3", Some(r#"{"ID": 3, "COUNTRY": "BE"}"#));
        table.refresh(&io).await.expect("refreshes");
        assert_eq!(
            country_at(&table, 3, 10).as_deref(),
            Some("BE"),
            "without a time, the record's timestamp (0) dates the row"
        );
        assert_eq!(country_at(&table, 3, 60).as_deref(), Some("FR"));
    }

    #[tokio::test]
    async fn a_record_that_does_not_decode_names_its_place_and_stops_the_table() {
        let io = Memory::default();
        io.append(1, "1", Some(r#"{"ID": 1, "COUNTRY": "NL"}"#));
        io.append(1, "2", Some(r#"{"ID": "two"}"#));
        let mut table = TableState::new(cards());
        let failed = table.load(&io).await.expect_err("does not decode");
        let message = failed.to_string();
        assert!(
            message.contains("table CARDS: the record at cards/1@1 does not decode"),
            "{message}"
        );
    }

    #[test]
    fn a_table_past_its_bound_is_refused_by_name() {
        let mut table = TableState::new(cards());
        let row = vec![Value::Int(0), Value::String("x".repeat(1 << 20))];
        let mut refused = None;
        for i in 0..(TABLE_BYTES_MAX >> 20) + 1 {
            if let Err(e) = table.insert(i.to_string(), row.clone()) {
                refused = Some(e);
                break;
            }
        }
        let message = refused.expect("over the bound").to_string();
        assert!(message.contains("table CARDS is over one task's bound"), "{message}");
    }
}
