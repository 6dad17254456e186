//! The Rust builders users write dataflows with, and the type-erased stages
//! they compile to.
//!
//! A dataflow has one or two stages. The *source stage* decodes each source
//! record (JSON into the source type), runs the stateless operators (`map`,
//! `filter`, `flat_map`, `event_time`, `join_table`) and, for a keyed dataflow, encodes
//! key and value (postcard) for the repartition topic. The *window stage*
//! reads a repartition partition, so every key lives in exactly one task, and
//! runs the window, the aggregate and the having-filter; its results go to
//! the sink keyed by `{"key", "window_start_ms", "window_end_ms"}` with the
//! aggregate as JSON. A dataflow without `key_by` is one stage that writes
//! its records (JSON) straight to the sink. Operators inside a stage are
//! fused into the stage's task (like Flink's operator chaining); the
//! repartition topic is the boundary between stages. The window stage keeps
//! keys as the source stage encoded them, so a window's results leave in the
//! order of the encoded keys (postcard: strings by length, then bytes).

use std::hash::Hash;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use runnel_client::plan::{Operator, Plan, Sink, Source, TableJoin, PLAN_FORMAT_VERSION, STEP_CHARS_MAX};
use runnel_client::tasks::StateRow;

use crate::table::TableState;
use crate::window::{event_time_in_range, Emit, Window, WindowBounds, WindowError, WindowOperator, WindowResult};

mod stream_join;
mod table_aggregate;
mod table_join;
pub use stream_join::JoinedStream;
pub use table_aggregate::{AggregatedTable, GroupedTable};
pub use table_join::{JoinedTable, Table};

/// Hands one (value, event time) on to the next operator.
type Out<'a, T> = &'a mut dyn FnMut(T, i64);
/// Decodes a source record and runs every operator so far, joins with the
/// task's tables (in the order of [`Stream::join_table`] calls).
type Chain<T> = Arc<dyn Fn(&[u8], i64, &[TableState], Out<'_, T>) -> Result<(), String> + Send + Sync>;

/// Records leaving a stage, for the repartition topic or the sink, encoded
/// into one reusable buffer: a record's key and value are [`Span`]s of it,
/// so emitting costs no allocation per record.
#[derive(Debug, Default)]
pub struct Emitted {
    bytes: Vec<u8>,
    records: Vec<Slots>,
}

/// Where an encoded key or value lies in [`Emitted`]'s buffer.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    start: usize,
    end: usize,
}

#[derive(Clone, Copy, Debug)]
struct Slots {
    key: Option<Span>,
    value: Option<Span>,
    timestamp_ms: i64,
}

/// One emitted record, borrowed from [`Emitted`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmittedRecord<'a> {
    pub key: Option<&'a [u8]>,
    /// `None` is a tombstone (a retracted session window), or a record
    /// whose value the next stage does not need (a count).
    pub value: Option<&'a [u8]>,
    pub timestamp_ms: i64,
}

impl Emitted {
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.records.clear();
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Appends what `write` encodes (a key or a value) to the buffer; on an
    /// error the buffer is as before.
    pub fn encode<E>(&mut self, write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>) -> Result<Span, E> {
        let start = self.bytes.len();
        match write(&mut self.bytes) {
            Ok(()) => Ok(Span {
                start,
                end: self.bytes.len(),
            }),
            Err(e) => {
                self.bytes.truncate(start);
                Err(e)
            }
        }
    }

    /// Adds a record of encoded parts.
    pub fn push(&mut self, timestamp_ms: i64, key: Option<Span>, value: Option<Span>) {
        self.records.push(Slots {
            key,
            value,
            timestamp_ms,
        });
    }

    pub fn iter(&self) -> impl Iterator<Item = EmittedRecord<'_>> {
        self.records.iter().map(|slots| EmittedRecord {
            key: slots.key.map(|span| &self.bytes[span.start..span.end]),
            value: slots.value.map(|span| &self.bytes[span.start..span.end]),
            timestamp_ms: slots.timestamp_ms,
        })
    }
}

fn to_postcard<T: Serialize>(value: &T) -> impl FnOnce(&mut Vec<u8>) -> Result<(), postcard::Error> + '_ {
    move |bytes| postcard::to_io(value, bytes).map(drop)
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> impl FnOnce(&mut Vec<u8>) -> Result<(), serde_json::Error> + '_ {
    move |bytes| serde_json::to_writer(bytes, value)
}

/// The source stage of a dataflow, erased of its types.
pub trait SourceStage: Send + Sync {
    /// Runs one source record through the stateless operators, joining
    /// with `tables` (those of [`SourceStage::tables`], in order). An error
    /// is a record that does not decode as the source type (for the DLQ).
    fn process_joined(
        &self,
        value: &[u8],
        timestamp_ms: i64,
        tables: &[crate::table::TableState],
        out: &mut Emitted,
    ) -> Result<(), String>;

    /// The tables its operators join with (SQL's stream–table joins and
    /// [`Stream::join_table`]), in order: each task running the stage
    /// holds them.
    fn tables(&self) -> Vec<runnel_client::plan::TableJoin> {
        Vec::new()
    }

    /// The tables as a task holds them, empty: by key, or by key and time
    /// for a join by event time.
    fn table_states(&self) -> Vec<crate::table::TableState> {
        self.tables().into_iter().map(crate::table::TableState::new).collect()
    }

    /// Runs one record given its key too: a table's source stage reads its
    /// primary key there, and a null value as a deletion. Others read the
    /// value alone ([`SourceStage::process_joined`]).
    fn process_record(
        &self,
        _key: Option<&[u8]>,
        value: Option<&[u8]>,
        timestamp_ms: i64,
        tables: &[crate::table::TableState],
        out: &mut Emitted,
    ) -> Result<(), String> {
        self.process_joined(value.unwrap_or_default(), timestamp_ms, tables, out)
    }

    /// How long its input records wait, in stream time, before they run:
    /// the grace period of a join by event time (see [`crate::grace`]).
    /// `None` runs each record as it is read.
    fn grace_ms(&self) -> Option<i64> {
        None
    }

    /// A record's event time, as running it stamps its output; an error
    /// is a record that does not decode (for the DLQ).
    fn event_time(&self, _value: Option<&[u8]>, timestamp_ms: i64) -> Result<i64, String> {
        Ok(timestamp_ms)
    }

    /// [`SourceStage::process_joined`] for a stage that joins nothing.
    fn process(&self, value: &[u8], timestamp_ms: i64, out: &mut Emitted) -> Result<(), String> {
        self.process_joined(value, timestamp_ms, &[], out)
    }
}

/// A changed store entry: its key and value (`None`: removed).
pub type Change = (Vec<u8>, Option<Vec<u8>>);

/// One window task's state, erased of its types.
pub trait WindowStage: Send + Sync {
    /// Adds a repartitioned record (postcard key and value) at event time `t_ms`.
    fn add(&mut self, key: &[u8], value: &[u8], t_ms: i64, out: &mut Emitted) -> Result<(), StageError>;
    /// Moves the watermark; closed windows' results (if final) go to `out`.
    /// A stage without windows (a join of tables, an aggregate over a
    /// table) has nothing to close.
    fn advance(&mut self, _watermark_ms: i64, _out: &mut Emitted) -> Result<(), StageError> {
        Ok(())
    }
    fn snapshot(&self) -> Result<Vec<u8>, StageError>;
    fn restore(&mut self, bytes: &[u8]) -> Result<(), StageError>;
    /// Records dropped for coming after their window closed (none for a
    /// stage without windows).
    fn late_records(&self) -> u64 {
        0
    }
    fn watermark_ms(&self) -> i64;
    /// The event time below which this stage emits nothing more, for a
    /// stage whose output feeds another stateful stage (which takes it as
    /// this upstream's progress); `i64::MIN` when it cannot say.
    fn output_watermark_ms(&self) -> i64 {
        i64::MIN
    }
    /// The current rows of the open windows of `key` (postcard, as `add`
    /// takes it), or of every key, as the sink would get them; `None` when
    /// more than `limit` windows match.
    fn read(&self, key: Option<&[u8]>, limit: usize) -> Result<Option<Vec<StateRow>>, StageError>;

    /// The stage's state store, when it keeps its state as entries of a
    /// changelog (its task's checkpoint partition, compacted) rather than
    /// in each checkpoint's snapshot: each checkpoint then writes the
    /// entries changed since the last one, in the same batch (see
    /// [`crate::changelog`]).
    fn store(&self) -> Option<&dyn StateStore> {
        None
    }

    fn store_mut(&mut self) -> Option<&mut dyn StateStore> {
        None
    }
}

/// The [`WindowStage`] methods of a stage whose state is one store (the
/// field `$store`) and whose clock is its field `max_event_ms`: `snapshot`
/// is `$snapshot(max_event_ms)`, `restore` is
/// `$restore(&mut max_event_ms, bytes)`.
macro_rules! one_store_stage {
    ($store:ident, $snapshot:expr, $restore:expr) => {
        fn snapshot(&self) -> Result<Vec<u8>, $crate::builder::StageError> {
            ($snapshot)(self.max_event_ms)
        }

        fn restore(&mut self, bytes: &[u8]) -> Result<(), $crate::builder::StageError> {
            ($restore)(&mut self.max_event_ms, bytes)
        }

        fn watermark_ms(&self) -> i64 {
            self.max_event_ms
        }

        fn store(&self) -> Option<&dyn $crate::builder::StateStore> {
            Some(&self.$store)
        }

        fn store_mut(&mut self) -> Option<&mut dyn $crate::builder::StateStore> {
            Some(&mut self.$store)
        }
    };
}
pub(crate) use one_store_stage;

/// A stage's state as the entries of a changelog.
pub trait StateStore: Send + Sync {
    /// The entries changed since the last [`StateStore::changes_written`]:
    /// key and value (`None`: removed).
    fn changes(&self) -> Result<Vec<Change>, StageError>;

    /// The changes are in a committed checkpoint: start anew.
    fn changes_written(&mut self);

    /// About what the pending changes take as records (a task stops
    /// reading past a bound, so that they fit in a checkpoint's batch).
    fn changes_bytes(&self) -> usize;

    /// Applies one entry read back from the changelog on restore. An entry
    /// the restored state has no use for (a window its watermark closed, a
    /// record it released) is skipped and becomes obsolete.
    fn apply_change(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), StageError>;

    /// Up to `max` keys of entries a written checkpoint made obsolete (a
    /// closed window's aggregates, a released record): their tombstones go
    /// after that checkpoint, in batches of their own, so that however
    /// many close at once no checkpoint's batch holds them. A restore
    /// ignores such entries, so a lost tombstone changes nothing.
    fn take_obsolete(&mut self, _max: usize) -> Vec<Vec<u8>> {
        Vec::new()
    }
}

/// A window stage's current rows for `key` (or every key), encoded by
/// `encode` as the stage sends results; `None` past `limit` windows.
pub(crate) fn read_state<A: Clone + Serialize>(
    operator: &WindowOperator<EncodedKey, A>,
    key: Option<&[u8]>,
    limit: usize,
    encode: impl FnOnce(&[WindowResult<EncodedKey, A>], &mut Emitted) -> Result<(), StageError>,
) -> Result<Option<Vec<StateRow>>, StageError> {
    let key = key.map(EncodedKey::new);
    let Some(current) = operator.current(key.as_ref(), limit) else {
        return Ok(None);
    };
    let mut out = Emitted::default();
    encode(&current, &mut out)?;
    Ok(Some(state_rows(&out)))
}

/// What `Emitted` holds, as state rows.
pub(crate) fn state_rows(out: &Emitted) -> Vec<StateRow> {
    out.iter()
        .filter_map(|record| {
            Some(StateRow {
                key: record.key.unwrap_or_default().to_vec(),
                value: record.value?.to_vec(),
            })
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Window(#[from] WindowError),
    #[error("repartitioned record does not decode: {0}")]
    Corrupt(String),
    /// A result whose key or aggregate has no JSON form (e.g. a map with
    /// non-string keys): the task stops rather than drop or blank it.
    #[error("window result does not encode as JSON: {0}")]
    Unencodable(String),
    #[error("a join task holds {0} records, its bound; shorten the join's WITHIN or GRACE PERIOD, or add partitions")]
    JoinFull(usize),
    #[error("a join of two tables or an aggregate over a table holds {0} keys in one task, its bound; add partitions to the tables")]
    TableJoinFull(usize),
    #[error("a join's record pairs with {0} records of the other side (at most {1}): shorten the join's WITHIN, or join on a more selective key")]
    JoinFanOut(usize, usize),
    #[error("{0}")]
    NoTable(&'static str),
}

/// Makes a fresh window stage for each task.
pub type WindowStageFactory = Arc<dyn Fn() -> Box<dyn WindowStage> + Send + Sync>;

/// A complete dataflow, ready to register with a node.
#[derive(Clone)]
pub struct DataflowDef {
    pub name: String,
    pub source: String,
    pub sink: String,
    pub source_stage: Arc<dyn SourceStage>,
    /// More sources, each read by a stage of its own after the first
    /// (stage `1 + i` reads `joined_sources[i]`): the other side of a
    /// stream–stream join. They need a window stage, which reads what
    /// every source stage repartitions.
    pub joined_sources: Vec<JoinedSource>,
    /// `None` for a dataflow without `key_by` (one stage).
    pub window_stage: Option<WindowStageFactory>,
    /// Stateful stages after the window stage, each reading what the one
    /// before it repartitions (an aggregate over a stream–stream join).
    pub next_stages: Vec<WindowStageFactory>,
    /// What each builder call did, per stage (`[0]` the source stage, `[1]`
    /// the window stage): the plan's registered steps ([`DataflowDef::plan`]).
    pub steps: Vec<Vec<String>>,
}

/// A source read by a stage after the first (see [`DataflowDef::joined_sources`]).
#[derive(Clone)]
pub struct JoinedSource {
    pub topic: String,
    pub stage: Arc<dyn SourceStage>,
}

impl DataflowDef {
    /// Source stages: the first, then one per joined source.
    pub fn source_count(&self) -> u32 {
        1 + self.joined_sources.len() as u32
    }

    /// The topic and stage source stage `stage` reads, if it is one.
    pub fn source_of(&self, stage: u32) -> Option<(&str, &Arc<dyn SourceStage>)> {
        match stage {
            0 => Some((&self.source, &self.source_stage)),
            _ => self
                .joined_sources
                .get(stage as usize - 1)
                .map(|joined| (joined.topic.as_str(), &joined.stage)),
        }
    }

    /// The dataflow as a plan of registered steps: what the controller
    /// commits, `describe` shows, and each node resolves to this
    /// definition in its own registry (by name, steps compared).
    pub fn plan(&self) -> Plan {
        let mut operators = Vec::new();
        for (stage, steps) in self.steps.iter().enumerate() {
            if stage > 0 {
                operators.push(Operator::Repartition {
                    key: Vec::new(),
                    carry: Vec::new(),
                });
            }
            operators.extend(steps.iter().map(|step| Operator::Registered {
                dataflow: self.name.clone(),
                step: step.clone(),
            }));
        }
        Plan {
            version: PLAN_FORMAT_VERSION,
            statement: format!("Rust dataflow {} (registered in the node binary)", self.name),
            source: Source {
                topic: self.source.clone(),
                columns: Vec::new(),
                timestamp: None,
            },
            operators,
            sink: Sink {
                topic: self.sink.clone(),
                columns: Vec::new(),
                key: Vec::new(),
            },
        }
    }

    /// Stages, and so tasks per source partition.
    pub fn stages(&self) -> u32 {
        self.source_count() + u32::from(self.window_stage.is_some()) + self.next_stages.len() as u32
    }
}

impl std::fmt::Debug for DataflowDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataflowDef")
            .field("name", &self.name)
            .field("source", &self.source)
            .field("sink", &self.sink)
            .field("stages", &self.stages())
            .finish()
    }
}

/// The start of every dataflow: `Dataflow::new(name).source::<T>(topic)`.
pub struct Dataflow {
    name: String,
}

impl Dataflow {
    pub fn new(name: &str) -> Dataflow {
        Dataflow { name: name.to_string() }
    }

    /// Reads `topic`, decoding each record's value as JSON into `T`; the
    /// record's timestamp is the event time unless `event_time` says otherwise.
    pub fn source<T: DeserializeOwned + 'static>(self, topic: &str) -> Stream<T> {
        let chain: Chain<T> = Arc::new(|bytes, timestamp_ms, _, out| {
            let value: T = serde_json::from_slice(bytes)
                .map_err(|e| format!("record does not decode as {}: {e}", std::any::type_name::<T>()))?;
            out(value, timestamp_ms);
            Ok(())
        });
        Stream {
            name: self.name,
            source: topic.to_string(),
            chain,
            steps: vec![step(format!("DECODE JSON as {}", type_name::<T>()))],
            joins: Vec::new(),
        }
    }
}

/// A step's description, bounded as plans require.
fn step(text: String) -> String {
    text.chars().take(STEP_CHARS_MAX).collect()
}

fn type_name<T>() -> &'static str {
    std::any::type_name::<T>()
}

/// A stream of `T` with event times.
pub struct Stream<T> {
    name: String,
    source: String,
    chain: Chain<T>,
    steps: Vec<String>,
    /// The tables its records are joined with.
    joins: Vec<HeldTable>,
}

/// A table a stream's records are joined with: by its latest rows, or by
/// event time (`as_of`).
#[derive(Clone)]
struct HeldTable {
    join: TableJoin,
    as_of: Option<runnel_client::plan::AsOf>,
}

impl HeldTable {
    fn state(&self) -> TableState {
        match &self.as_of {
            None => TableState::new(self.join.clone()),
            Some(as_of) => TableState::versioned(self.join.clone(), as_of),
        }
    }
}

/// A Rust dataflow's table: each row the whole JSON value.
fn held_table(topic: &str, partitions: u32, as_of: Option<runnel_client::plan::AsOf>) -> HeldTable {
    HeldTable {
        join: TableJoin {
            table: topic.to_string(),
            topic: topic.to_string(),
            partitions,
            columns: Vec::new(),
            key: 0,
            on: runnel_client::plan::Expr::Literal(runnel_client::plan::Literal::Null),
            kind: runnel_client::plan::JoinKind::Left,
        },
        as_of,
    }
}

/// The longest grace of the tables joined by event time, if any.
fn grace_of(held: &[HeldTable]) -> Option<i64> {
    held.iter()
        .filter_map(|h| Some(h.as_of.as_ref()?.grace_ms))
        .max()
        .filter(|&grace_ms| grace_ms > 0)
}

fn tables_of(held: &[HeldTable]) -> Vec<TableJoin> {
    held.iter().map(|h| h.join.clone()).collect()
}

fn states_of(held: &[HeldTable]) -> Vec<TableState> {
    held.iter().map(HeldTable::state).collect()
}

impl<T: 'static> Stream<T> {
    fn then<U: 'static>(
        self,
        described: String,
        next: impl Fn(T, i64, Out<'_, U>) + Send + Sync + 'static,
    ) -> Stream<U> {
        let previous = self.chain;
        let mut steps = self.steps;
        steps.push(step(described));
        Stream {
            name: self.name,
            source: self.source,
            chain: Arc::new(move |bytes, timestamp_ms, tables, out| {
                previous(bytes, timestamp_ms, tables, &mut |value, t| next(value, t, &mut *out))
            }),
            steps,
            joins: self.joins,
        }
    }

    /// Joins each record with the row of the table over `topic` (its
    /// `partitions` partitions) whose key is `key(&record)`: `join` gets
    /// the row (JSON decoded into `V`; `None` when no row has the key) and
    /// says what goes on, if anything (`None` drops the record, as an inner
    /// join does). A table's records are keyed by the key as text; a null
    /// value deletes the key. Every task holds the whole table, at read
    /// positions its checkpoints record (see [`crate::table`]); a row that
    /// does not decode into `V` makes the record a dead letter, with the
    /// table and key in the reason.
    pub fn join_table<V: DeserializeOwned + 'static, U: 'static>(
        self,
        topic: &str,
        partitions: u32,
        key: impl Fn(&T) -> String + Send + Sync + 'static,
        join: impl Fn(T, Option<V>) -> Option<U> + Send + Sync + 'static,
    ) -> Stream<U> {
        self.join_held(held_table(topic, partitions, None), key, join)
    }

    /// As [`Stream::join_table`], by event time (Kafka Streams' versioned
    /// table, SQL's `FOR SYSTEM_TIME AS OF`): each record joins the row
    /// its key had at the record's event time, the table's rows timed by
    /// their records' timestamps and kept `history` back (see
    /// [`crate::versioned`]). With a `grace`, the stream's records wait
    /// that long in stream time (their records' timestamps) before they
    /// run, so table rows read a little later still join them (see
    /// [`crate::grace`]).
    pub fn join_table_as_of<V: DeserializeOwned + 'static, U: 'static>(
        self,
        topic: &str,
        partitions: u32,
        (history, grace): (std::time::Duration, std::time::Duration),
        key: impl Fn(&T) -> String + Send + Sync + 'static,
        join: impl Fn(T, Option<V>) -> Option<U> + Send + Sync + 'static,
    ) -> Stream<U> {
        let ms = |d: std::time::Duration| {
            i64::try_from(d.as_millis()).map_or(runnel_client::plan::JOIN_WINDOW_MS_MAX, |ms| {
                ms.min(runnel_client::plan::JOIN_WINDOW_MS_MAX)
            })
        };
        let as_of = runnel_client::plan::AsOf {
            at: runnel_client::plan::Expr::Literal(runnel_client::plan::Literal::Null),
            table_time: None,
            history_ms: ms(history),
            grace_ms: ms(grace),
        };
        self.join_held(held_table(topic, partitions, Some(as_of)), key, join)
    }

    fn join_held<V: DeserializeOwned + 'static, U: 'static>(
        self,
        held: HeldTable,
        key: impl Fn(&T) -> String + Send + Sync + 'static,
        join: impl Fn(T, Option<V>) -> Option<U> + Send + Sync + 'static,
    ) -> Stream<U> {
        let index = self.joins.len();
        let (topic, partitions, by_time) = (held.join.topic.clone(), held.join.partitions, held.as_of.is_some());
        let mut joins = self.joins;
        joins.push(held);
        let mut steps = self.steps;
        let as_of = if by_time { " AS OF the record's time" } else { "" };
        steps.push(step(format!(
            "JOIN TABLE {topic} ({partitions} partitions){as_of} as {}",
            type_name::<V>()
        )));
        let previous = self.chain;
        let table = topic;
        Stream {
            name: self.name,
            source: self.source,
            chain: Arc::new(move |bytes, timestamp_ms, tables, out| {
                let Some(rows) = tables.get(index) else {
                    return Err(format!("table {table} is not held by this task"));
                };
                let mut failed = None;
                previous(bytes, timestamp_ms, tables, &mut |value, t| {
                    let key = key(&value);
                    let found = if by_time { rows.get_at(&key, t) } else { rows.get(&key) };
                    let row = match found.map(|row| row[0].to_text().unwrap_or_default()) {
                        None => None,
                        Some(text) => match serde_json::from_str::<V>(&text) {
                            Ok(row) => Some(row),
                            Err(e) => {
                                failed = Some(format!(
                                    "table {table}: the row of key {key:?} does not decode as {}: {e}",
                                    type_name::<V>()
                                ));
                                return;
                            }
                        },
                    };
                    if let Some(joined) = join(value, row) {
                        out(joined, t)
                    }
                })?;
                failed.map_or(Ok(()), Err)
            }),
            steps,
            joins,
        }
    }

    pub fn map<U: 'static>(self, f: impl Fn(T) -> U + Send + Sync + 'static) -> Stream<U> {
        self.then(format!("MAP to {}", type_name::<U>()), move |value, t, out| {
            out(f(value), t)
        })
    }

    pub fn filter(self, keep: impl Fn(&T) -> bool + Send + Sync + 'static) -> Stream<T> {
        self.then(format!("FILTER {}", type_name::<T>()), move |value, t, out| {
            if keep(&value) {
                out(value, t)
            }
        })
    }

    pub fn flat_map<U: 'static, I: IntoIterator<Item = U>>(
        self,
        f: impl Fn(T) -> I + Send + Sync + 'static,
    ) -> Stream<U> {
        self.then(format!("FLAT_MAP to {}", type_name::<U>()), move |value, t, out| {
            for item in f(value) {
                out(item, t)
            }
        })
    }

    /// Takes each record's event time (ms since the epoch) from its value.
    pub fn event_time(self, at_ms: impl Fn(&T) -> i64 + Send + Sync + 'static) -> Stream<T> {
        self.then("EVENT_TIME from the value".to_string(), move |value, _, out| {
            let t = at_ms(&value);
            out(value, t)
        })
    }

    /// Groups by key: the records go through the repartition topic so each
    /// key's records meet in one task.
    pub fn key_by<K: 'static>(self, key: impl Fn(&T) -> K + Send + Sync + 'static) -> KeyedStream<K, T> {
        let mut stream = self;
        stream.steps.push(step(format!("KEY_BY {}", type_name::<K>())));
        KeyedStream {
            stream,
            key: Arc::new(key),
        }
    }
}

impl<T: Serialize + 'static> Stream<T> {
    /// Writes each record (JSON, no key) to `topic`: a one-stage dataflow.
    pub fn sink(self, topic: &str) -> DataflowDef {
        struct Stateless<T> {
            chain: Chain<T>,
            joins: Vec<HeldTable>,
        }
        impl<T: Serialize> SourceStage for Stateless<T> {
            fn tables(&self) -> Vec<TableJoin> {
                tables_of(&self.joins)
            }

            fn table_states(&self) -> Vec<TableState> {
                states_of(&self.joins)
            }

            fn grace_ms(&self) -> Option<i64> {
                grace_of(&self.joins)
            }

            fn process_joined(
                &self,
                value: &[u8],
                timestamp_ms: i64,
                tables: &[TableState],
                out: &mut Emitted,
            ) -> Result<(), String> {
                let mut failed = None;
                (self.chain)(
                    value,
                    timestamp_ms,
                    tables,
                    &mut |record, t| match out.encode(to_json(&record)) {
                        Ok(value) => out.push(t, None, Some(value)),
                        Err(e) => failed = Some(e.to_string()),
                    },
                )?;
                failed.map_or(Ok(()), Err)
            }
        }
        DataflowDef {
            name: self.name,
            source: self.source,
            sink: topic.to_string(),
            source_stage: Arc::new(Stateless {
                chain: self.chain,
                joins: self.joins,
            }),
            joined_sources: Vec::new(),
            window_stage: None,
            next_stages: Vec::new(),
            steps: vec![self.steps],
        }
    }
}

pub struct KeyedStream<K, T> {
    stream: Stream<T>,
    key: Arc<dyn Fn(&T) -> K + Send + Sync>,
}

impl<K: 'static, T: 'static> KeyedStream<K, T> {
    pub fn window(self, window: Window) -> WindowedStream<K, T> {
        WindowedStream { keyed: self, window }
    }
}

pub struct WindowedStream<K, T> {
    keyed: KeyedStream<K, T>,
    window: Window,
}

impl<K: 'static, T: Clone + 'static> WindowedStream<K, T> {
    /// Records per key and window.
    pub fn count(self) -> WindowedTable<K, T, u64> {
        // A count never looks at a record's value: the repartition topic
        // carries only keys and times (KSQL repartitions only the columns
        // a query uses, too).
        self.table(
            "COUNT".to_string(),
            Arc::new(|| 0),
            Folding::Count(Arc::new(|count, _| *count += 1)),
            Some(Arc::new(|a, b| *a += b)),
        )
    }

    /// Folds each key's records per window into an `A`, starting from
    /// `init()`. Session windows also need [`WindowedTable::merge`].
    pub fn aggregate<A: Default + 'static>(
        self,
        init: impl Fn() -> A + Send + Sync + 'static,
        fold: impl Fn(A, &T) -> A + Send + Sync + 'static,
    ) -> WindowedTable<K, T, A> {
        self.table(
            format!("AGGREGATE into {}", type_name::<A>()),
            Arc::new(init),
            Folding::Values(Arc::new(move |aggregate: &mut A, value: &T| {
                let current = std::mem::take(aggregate);
                *aggregate = fold(current, value);
            })),
            None,
        )
    }

    /// Combines each key's records per window with `f` (the first record
    /// as is); the result is `null` for an empty window.
    pub fn reduce(self, f: impl Fn(T, &T) -> T + Send + Sync + 'static) -> WindowedTable<K, T, Option<T>> {
        let f = Arc::new(f);
        let merge_f = f.clone();
        self.table(
            "REDUCE".to_string(),
            Arc::new(|| None),
            Folding::Values(Arc::new(move |aggregate: &mut Option<T>, value: &T| {
                *aggregate = Some(match aggregate.take() {
                    None => value.clone(),
                    Some(current) => f(current, value),
                });
            })),
            Some(Arc::new(move |a: &mut Option<T>, b: Option<T>| {
                if let Some(b) = b {
                    *a = Some(match a.take() {
                        None => b,
                        Some(current) => merge_f(current, &b),
                    });
                }
            })),
        )
    }

    fn table<A>(
        self,
        described: String,
        init: Init<A>,
        fold: Folding<A, T>,
        merge: Option<Merge<A>>,
    ) -> WindowedTable<K, T, A> {
        WindowedTable {
            steps: vec![step(format!("WINDOW {:?}", self.window)), step(described)],
            windowed: self,
            init,
            fold,
            merge,
            having: Arc::new(|_, _, _| true),
            emit: Emit::Changes,
        }
    }
}

type Init<A> = Arc<dyn Fn() -> A + Send + Sync>;
type Fold<A, T> = Arc<dyn Fn(&mut A, &T) + Send + Sync>;

/// How a record joins an aggregate: by its value, or (a count) by being
/// there, in which case no stage encodes or decodes its value.
enum Folding<A, T> {
    Values(Fold<A, T>),
    Count(Fold<A, ()>),
}

impl<A, T> Clone for Folding<A, T> {
    fn clone(&self) -> Self {
        match self {
            Folding::Values(fold) => Folding::Values(fold.clone()),
            Folding::Count(fold) => Folding::Count(fold.clone()),
        }
    }
}
type Merge<A> = Arc<dyn Fn(&mut A, A) + Send + Sync>;
type Having<K, A> = Arc<dyn Fn(&K, &WindowBounds, &A) -> bool + Send + Sync>;

/// Per key and window, an aggregate.
pub struct WindowedTable<K, T, A> {
    windowed: WindowedStream<K, T>,
    init: Init<A>,
    fold: Folding<A, T>,
    merge: Option<Merge<A>>,
    having: Having<K, A>,
    emit: Emit,
    /// The window stage's steps so far.
    steps: Vec<String>,
}

impl<K, T, A> WindowedTable<K, T, A>
where
    K: Serialize + DeserializeOwned + Clone + Eq + Hash + Ord + Send + Sync + 'static,
    T: Serialize + DeserializeOwned + Clone + 'static,
    A: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// Keeps only results passing `keep` (SQL's HAVING).
    pub fn filter(mut self, keep: impl Fn(&K, &WindowBounds, &A) -> bool + Send + Sync + 'static) -> Self {
        let previous = self.having;
        self.having = Arc::new(move |k, w, a| previous(k, w, a) && keep(k, w, a));
        self.steps.push("HAVING".to_string());
        self
    }

    /// How two session windows' aggregates combine when a record bridges them.
    pub fn merge(mut self, merge: impl Fn(A, A) -> A + Send + Sync + 'static) -> Self
    where
        A: Default,
    {
        self.merge = Some(Arc::new(move |a: &mut A, b: A| {
            let current = std::mem::take(a);
            *a = merge(current, b);
        }));
        self.steps.push("MERGE sessions".to_string());
        self
    }

    /// `Emit::Changes` (the default) or `Emit::Final`.
    pub fn emit(mut self, emit: Emit) -> Self {
        self.emit = emit;
        self
    }

    /// Writes results to `topic`. Panics when the dataflow is not valid
    /// (a hopping advance larger than its size, a session aggregate
    /// without `merge`): a programming error found when the binary starts.
    pub fn sink(self, topic: &str) -> DataflowDef {
        let window = self.windowed.window;
        if let Err(e) = window.validate() {
            panic!("dataflow {:?}: {e}", self.windowed.keyed.stream.name);
        }
        let merge: Merge<A> = match (self.merge, window.kind) {
            (Some(merge), _) => merge,
            (None, crate::window::WindowKind::Session { .. }) => panic!(
                "dataflow {:?}: a session-window aggregate needs .merge(...)",
                self.windowed.keyed.stream.name
            ),
            (None, _) => Arc::new(|_, _| {}),
        };
        let keyed = self.windowed.keyed;
        let source_stage = Arc::new(KeyedSource {
            chain: keyed.stream.chain,
            joins: keyed.stream.joins,
            key: keyed.key,
            carry_values: matches!(self.fold, Folding::Values(_)),
            side: None,
        });
        let (init, fold, having, emit) = (self.init, self.fold, self.having, self.emit);
        let mut window_steps = self.steps;
        window_steps.push(format!("EMIT {emit:?}"));
        let factory: WindowStageFactory = Arc::new(move || {
            Box::new(TypedWindowStage::<K, T, A> {
                operator: WindowOperator::logged(window, emit),
                init: init.clone(),
                fold: fold.clone(),
                merge: merge.clone(),
                having: having.clone(),
                results: Vec::new(),
            })
        });
        DataflowDef {
            name: keyed.stream.name,
            source: keyed.stream.source,
            sink: topic.to_string(),
            source_stage,
            joined_sources: Vec::new(),
            window_stage: Some(factory),
            next_stages: Vec::new(),
            steps: vec![keyed.stream.steps, window_steps],
        }
    }
}

struct KeyedSource<K, T> {
    chain: Chain<T>,
    joins: Vec<HeldTable>,
    key: Arc<dyn Fn(&T) -> K + Send + Sync>,
    /// Whether the window stage folds values (else records go without).
    carry_values: bool,
    /// A join side's byte (0 left, 1 right), written before each carried
    /// value so the join stage knows where a record comes from.
    side: Option<u8>,
}

impl<K: Serialize, T: Serialize> SourceStage for KeyedSource<K, T> {
    fn tables(&self) -> Vec<TableJoin> {
        tables_of(&self.joins)
    }

    fn table_states(&self) -> Vec<TableState> {
        states_of(&self.joins)
    }

    fn grace_ms(&self) -> Option<i64> {
        grace_of(&self.joins)
    }

    fn process_joined(
        &self,
        value: &[u8],
        timestamp_ms: i64,
        tables: &[TableState],
        out: &mut Emitted,
    ) -> Result<(), String> {
        let mut failed = None;
        (self.chain)(value, timestamp_ms, tables, &mut |record, t| {
            // A window cannot hold every i64 event time: refused by name
            // here (a dead letter), before it reaches one.
            if !event_time_in_range(t) {
                failed = Some(WindowError::EventTimeOutOfRange(t).to_string());
                return;
            }
            let encoded = out.encode(to_postcard(&(self.key)(&record))).and_then(|key| {
                let value = if self.carry_values {
                    Some(out.encode(|b| {
                        b.extend(self.side);
                        postcard::to_io(&record, b).map(drop)
                    })?)
                } else {
                    None
                };
                Ok((key, value))
            });
            match encoded {
                Ok((key, value)) => out.push(t, Some(key), value),
                Err(e) => failed = Some(e.to_string()),
            }
        })?;
        failed.map_or(Ok(()), Err)
    }
}

/// Encoded keys this short are kept inline (as long as a `String`).
const KEY_INLINE_BYTES: usize = 22;

/// A window key as the source stage encoded it (postcard), inline when
/// short. A window stage keeps keys so, not decoded: a window holds
/// thousands of keys, and a heap allocation per key, touched again only
/// when the window closes, cost more than the key's lookup. Keys are
/// decoded when results leave, and a window's results leave in the order
/// of these bytes (deterministic, which replays need).
#[derive(Clone, Debug)]
pub(crate) enum EncodedKey {
    Inline { len: u8, bytes: [u8; KEY_INLINE_BYTES] },
    Heap(Box<[u8]>),
}

impl EncodedKey {
    pub(crate) fn new(encoded: &[u8]) -> EncodedKey {
        if encoded.len() <= KEY_INLINE_BYTES {
            let mut bytes = [0u8; KEY_INLINE_BYTES];
            bytes[..encoded.len()].copy_from_slice(encoded);
            EncodedKey::Inline {
                len: encoded.len() as u8,
                bytes,
            }
        } else {
            EncodedKey::Heap(encoded.into())
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            EncodedKey::Inline { len, bytes } => &bytes[..usize::from(*len)],
            EncodedKey::Heap(bytes) => bytes,
        }
    }

    /// The key, if these bytes are exactly one encoded `K`.
    fn decode<K: DeserializeOwned>(&self) -> Result<K, String> {
        match postcard::take_from_bytes(self.as_bytes()) {
            Ok((key, [])) => Ok(key),
            Ok((_, rest)) => Err(format!("{} bytes after the key", rest.len())),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl PartialEq for EncodedKey {
    fn eq(&self, other: &EncodedKey) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for EncodedKey {}

impl Hash for EncodedKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl PartialOrd for EncodedKey {
    fn partial_cmp(&self, other: &EncodedKey) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for EncodedKey {
    fn cmp(&self, other: &EncodedKey) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl Serialize for EncodedKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.as_bytes())
    }
}

impl<'de> serde::Deserialize<'de> for EncodedKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<EncodedKey, D::Error> {
        let bytes: serde_bytes::ByteBuf = serde::Deserialize::deserialize(deserializer)?;
        Ok(EncodedKey::new(&bytes))
    }
}

struct TypedWindowStage<K, T, A> {
    operator: WindowOperator<EncodedKey, A>,
    init: Init<A>,
    fold: Folding<A, T>,
    merge: Merge<A>,
    having: Having<K, A>,
    /// Reused between calls.
    results: Vec<WindowResult<EncodedKey, A>>,
}

/// The sink record key of a window result (KSQL's windowed key).
#[derive(Serialize)]
struct SinkKey<'a, K> {
    key: &'a K,
    window_start_ms: i64,
    window_end_ms: i64,
}

impl<K, T, A> TypedWindowStage<K, T, A>
where
    K: Serialize + DeserializeOwned + Clone + Eq + Hash + Ord,
    A: Serialize + Clone,
{
    fn drain(&mut self, out: &mut Emitted) -> Result<(), StageError> {
        let mut results = std::mem::take(&mut self.results);
        let encoded = self.encode(&results, out);
        results.clear();
        self.results = results;
        encoded
    }

    /// Results as the sink's records (after `HAVING`).
    fn encode(&self, results: &[WindowResult<EncodedKey, A>], out: &mut Emitted) -> Result<(), StageError> {
        let unencodable = |e: serde_json::Error| StageError::Unencodable(e.to_string());
        for result in results {
            let (key, window, value, retract) = match result {
                WindowResult::Update { key, window, value } => (key, window, value, false),
                WindowResult::Retract { key, window, value } => (key, window, value, true),
            };
            let key: K = key.decode().map_err(|e| StageError::Corrupt(format!("key: {e}")))?;
            if !(self.having)(&key, window, value) {
                continue;
            }
            let sink_key = SinkKey {
                key: &key,
                window_start_ms: window.start_ms,
                window_end_ms: window.end_ms,
            };
            let key = out.encode(to_json(&sink_key)).map_err(unencodable)?;
            let value = if retract {
                None
            } else {
                Some(out.encode(to_json(value)).map_err(unencodable)?)
            };
            out.push(window.start_ms, Some(key), value);
        }
        Ok(())
    }
}

impl<K, T, A> WindowStage for TypedWindowStage<K, T, A>
where
    K: Serialize + DeserializeOwned + Clone + Eq + Hash + Ord + Send + Sync,
    T: DeserializeOwned,
    A: Serialize + DeserializeOwned + Clone + Send + Sync,
{
    fn add(&mut self, key: &[u8], value: &[u8], t_ms: i64, out: &mut Emitted) -> Result<(), StageError> {
        // Kept encoded; checked when it first enters a window, decoded
        // when the window's results leave.
        let key = EncodedKey::new(key);
        let admit = |key: &EncodedKey| key.decode::<K>().map(drop);
        let mut results = std::mem::take(&mut self.results);
        let outcome = match &self.fold {
            Folding::Values(fold) => {
                let value: T = postcard::from_bytes(value).map_err(|e| StageError::Corrupt(format!("value: {e}")))?;
                self.operator.add(
                    key,
                    t_ms,
                    &value,
                    &*self.init,
                    &**fold,
                    &*self.merge,
                    &admit,
                    &mut results,
                )
            }
            Folding::Count(fold) => {
                self.operator
                    .add(key, t_ms, &(), &*self.init, &**fold, &*self.merge, &admit, &mut results)
            }
        };
        self.results = results;
        self.drain(out)?;
        Ok(outcome?)
    }

    fn advance(&mut self, watermark_ms: i64, out: &mut Emitted) -> Result<(), StageError> {
        let mut results = std::mem::take(&mut self.results);
        let having = &self.having;
        // Keys were checked on the way in (or restored from a checkpoint);
        // one that does not decode is kept for `drain` to report.
        let keep = |key: &EncodedKey, window: &WindowBounds, value: &A| {
            key.decode::<K>().map_or(true, |key| having(&key, window, value))
        };
        self.operator.advance(watermark_ms, &keep, &mut results);
        self.results = results;
        self.drain(out)
    }

    fn snapshot(&self) -> Result<Vec<u8>, StageError> {
        Ok(self.operator.snapshot()?)
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), StageError> {
        Ok(self.operator.restore(bytes)?)
    }

    fn late_records(&self) -> u64 {
        self.operator.late_records()
    }

    fn watermark_ms(&self) -> i64 {
        self.operator.watermark_ms()
    }

    fn read(&self, key: Option<&[u8]>, limit: usize) -> Result<Option<Vec<StateRow>>, StageError> {
        read_state(&self.operator, key, limit, |current, out| self.encode(current, out))
    }

    fn store(&self) -> Option<&dyn StateStore> {
        Some(&self.operator)
    }

    fn store_mut(&mut self) -> Option<&mut dyn StateStore> {
        Some(&mut self.operator)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;

    /// What the source stage of `def` emits for one JSON record.
    fn source_output(def: &DataflowDef, value: &str) -> Emitted {
        let mut emitted = Emitted::default();
        def.source_stage
            .process(value.as_bytes(), 1_000, &mut emitted)
            .expect("decodes");
        emitted
    }

    /// Runs `values` (JSON source records at `t_ms`) through both stages
    /// of `def` and closes every window: the sink records, as text.
    fn run_both_stages(def: &DataflowDef, values: &[&str], t_ms: i64) -> Vec<(String, Option<String>)> {
        let mut repartitioned = Emitted::default();
        for value in values {
            def.source_stage
                .process(value.as_bytes(), t_ms, &mut repartitioned)
                .expect("decodes");
        }
        let mut window = (def.window_stage.as_ref().expect("keyed"))();
        let mut out = Emitted::default();
        for record in repartitioned.iter() {
            let value = record.value.unwrap_or_default();
            window
                .add(record.key.expect("key"), value, record.timestamp_ms, &mut out)
                .expect("adds");
        }
        window.advance(i64::MAX, &mut out).expect("closes");
        let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).expect("JSON");
        out.iter()
            .map(|r| (text(r.key.expect("sink key")), r.value.map(text)))
            .collect()
    }

    /// A table over `topic` holding `rows` (key, JSON value), each in
    /// partition 0.
    fn table_of(join: runnel_client::plan::TableJoin, rows: &[(&str, Option<&str>)]) -> TableState {
        let mut table = TableState::new(join);
        let timed: Vec<(&str, i64, Option<&str>)> = rows.iter().map(|(k, v)| (*k, 0, *v)).collect();
        fill(&mut table, &timed);
        table
    }

    /// Applies `rows` (key, time, JSON value or a deletion) to `table`.
    fn fill(table: &mut TableState, rows: &[(&str, i64, Option<&str>)]) {
        let mut builder = runnel_storage::BatchBuilder::new();
        for (key, timestamp_ms, value) in rows {
            builder
                .push(&runnel_storage::Record {
                    timestamp_ms: *timestamp_ms,
                    key: Some(key.to_string().into()),
                    value: value.map(|v| v.to_string().into()),
                    headers: Vec::new(),
                })
                .expect("pushes");
        }
        let batch = builder.build().expect("builds");
        for view in batch.views() {
            table.apply(0, &view.expect("view")).expect("applies");
        }
    }

    #[test]
    fn a_stream_joins_the_row_a_table_had_at_each_records_time() {
        #[derive(serde::Deserialize)]
        struct Card {
            country: String,
        }
        let dated = Dataflow::new("dated")
            .source::<(String, u32)>("in")
            .join_table_as_of(
                "cards",
                1,
                (Duration::from_secs(3_600), Duration::ZERO),
                |(card, _)| card.clone(),
                |(card, _), row: Option<Card>| Some((card, row.map(|c| c.country))),
            )
            .sink("out");
        assert!(dated.steps[0]
            .iter()
            .any(|s| s.starts_with("JOIN TABLE cards (1 partitions) AS OF the record's time as")));
        let mut tables = dated.source_stage.table_states();
        let (nl, de, be, fr) = (
            Some(r#"{"country":"NL"}"#),
            Some(r#"{"country":"DE"}"#),
            Some(r#"{"country":"BE"}"#),
            Some(r#"{"country":"FR"}"#),
        );
        let rows = [
            ("a", 1_000, nl),
            ("a", 5_000, de),
            ("a", 3_000, be),
            ("b", 2_000, fr),
            ("b", 4_000, None),
        ];
        fill(&mut tables[0], &rows);
        let cases = [
            ("a", 999, None),
            ("a", 1_000, Some("NL")),
            ("a", 3_500, Some("BE")),
            ("a", 6_000, Some("DE")),
            ("b", 2_500, Some("FR")),
            ("b", 4_000, None),
        ];
        for (card, at_ms, expected) in cases {
            let mut out = Emitted::default();
            let input = format!(r#"["{card}",1]"#);
            dated
                .source_stage
                .process_joined(input.as_bytes(), at_ms, &tables, &mut out)
                .expect("joins");
            let value: (String, Option<String>) =
                serde_json::from_slice(out.iter().next().expect("one record").value.expect("value")).expect("JSON");
            assert_eq!(value.1.as_deref(), expected, "{card} at {at_ms}");
        }
    }

    #[test]
    fn a_stream_joins_a_table_row_decoded_into_its_type() {
        #[derive(serde::Deserialize)]
        struct Card {
            country: String,
        }
        let enriched = Dataflow::new("enrich")
            .source::<(String, u32)>("in")
            .join_table(
                "cards",
                1,
                |(card, _)| card.clone(),
                |(card, n), row: Option<Card>| row.map(|c| (card, n, c.country)),
            )
            .key_by(|(_, _, country)| country.clone())
            .window(Window::tumbling(Duration::from_secs(60)))
            .count()
            .sink("out");
        let joins = enriched.source_stage.tables();
        assert_eq!(joins.len(), 1);
        assert!(enriched.steps[0]
            .iter()
            .any(|s| s.starts_with("JOIN TABLE cards (1 partitions) as")));
        let rows = [
            ("a", Some(r#"{"country":"NL"}"#)),
            ("b", Some(r#"{"country":"DE"}"#)),
            ("c", Some(r#"{"country":"FR"}"#)),
            ("c", None),
            ("d", Some(r#"{"land":"BE"}"#)),
        ];
        let tables = [table_of(joins[0].clone(), &rows)];
        let mut repartitioned = Emitted::default();
        for input in [r#"["a",1]"#, r#"["b",2]"#, r#"["a",3]"#, r#"["c",4]"#, r#"["x",5]"#] {
            enriched
                .source_stage
                .process_joined(input.as_bytes(), 1_000, &tables, &mut repartitioned)
                .expect("joins");
        }
        let keys: Vec<&[u8]> = repartitioned.iter().filter_map(|r| r.key).collect();
        assert_eq!(
            keys,
            vec![&b"\x02NL"[..], b"\x02DE", b"\x02NL"],
            "c was deleted, x has no row"
        );
        let refused = enriched
            .source_stage
            .process_joined(br#"["d",6]"#, 1_000, &tables, &mut repartitioned)
            .expect_err("the row has no country");
        assert!(
            refused.contains(r#"table cards: the row of key "d" does not decode as"#),
            "{refused}"
        );
        let unheld = enriched.source_stage.process(br#"["a",1]"#, 1_000, &mut repartitioned);
        assert!(unheld.expect_err("no table").contains("table cards is not held"));
    }

    /// Counts `[key, n]` records per key in minute windows.
    fn count_per_key() -> WindowedTable<String, (String, u32), u64> {
        Dataflow::new("n")
            .source::<(String, u32)>("in")
            .key_by(|(k, _)| k.clone())
            .window(Window::tumbling(Duration::from_secs(60)))
            .count()
    }

    #[test]
    fn a_count_repartitions_keys_only_and_an_aggregate_carries_values() {
        let counted = count_per_key().filter(|_, _, n| *n >= 2).emit(Emit::Final).sink("out");
        let emitted = source_output(&counted, r#"["a",5]"#);
        let record = emitted.iter().next().expect("one record");
        assert_eq!(record.key, Some(&b"\x01a"[..]), "postcard key");
        assert_eq!(record.value, None, "a count needs no value");
        let inputs = [r#"["a",5]"#, r#"["b",1]"#, r#"["a",7]"#];
        assert_eq!(
            run_both_stages(&counted, &inputs, 1_000),
            vec![(
                r#"{"key":"a","window_start_ms":0,"window_end_ms":60000}"#.to_string(),
                Some("2".to_string())
            )],
            "the having-filter drops b's window"
        );

        let summed = Dataflow::new("sum")
            .source::<(String, u32)>("in")
            .key_by(|(k, _)| k.clone())
            .window(Window::tumbling(Duration::from_secs(60)))
            .aggregate(|| 0u64, |sum, (_, n)| sum + u64::from(*n))
            .emit(Emit::Final)
            .sink("out");
        let emitted = source_output(&summed, r#"["a",5]"#);
        let record = emitted.iter().next().expect("one record");
        assert!(record.value.is_some(), "an aggregate folds values");
        let sums = run_both_stages(&summed, &inputs, 1_000);
        let sums: Vec<Option<String>> = sums.into_iter().map(|(_, v)| v).collect();
        assert_eq!(sums, vec![Some("12".to_string()), Some("1".to_string())]);
    }

    #[test]
    fn keys_inline_or_not_count_apart_survive_a_snapshot_and_a_corrupt_one_is_refused() {
        let def = count_per_key().emit(Emit::Final).sink("out");
        // Encoded: 1 length byte + the text. 21 characters are the longest
        // key kept inline, 22 the shortest on the heap.
        let inline_max = "i".repeat(KEY_INLINE_BYTES - 1);
        let heap_min = "h".repeat(KEY_INLINE_BYTES);
        let long = format!("{}1", "l".repeat(40));
        let long_too = format!("{}2", "l".repeat(40));
        let mut inputs = Vec::new();
        for (key, times) in [("a", 2), (&inline_max, 2), (&heap_min, 3), (&long, 1), (&long_too, 4)] {
            for _ in 0..times {
                inputs.push(format!("[\"{key}\",0]"));
            }
        }
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let counts: Vec<(String, u64)> = run_both_stages(&def, &inputs, 1_000)
            .into_iter()
            .map(|(key, count)| {
                let key: serde_json::Value = serde_json::from_str(&key).expect("JSON key");
                let key = key["key"].as_str().expect("text key").to_string();
                (key, count.expect("count").parse().expect("a number"))
            })
            .collect();
        let expected = vec![
            ("a".to_string(), 2),
            (inline_max.clone(), 2),
            (heap_min.clone(), 3),
            (long.clone(), 1),
            (long_too.clone(), 4),
        ];
        assert_eq!(counts, expected, "one count per key, in the order of the encoded keys");

        // A snapshot taken mid-window resumes to the same results.
        let mut repartitioned = Emitted::default();
        for value in &inputs {
            def.source_stage
                .process(value.as_bytes(), 1_000, &mut repartitioned)
                .expect("decodes");
        }
        let records: Vec<EmittedRecord<'_>> = repartitioned.iter().collect();
        let factory = def.window_stage.as_ref().expect("keyed");
        let (mut whole, mut first) = (factory(), factory());
        let (mut out_whole, mut out_resumed) = (Emitted::default(), Emitted::default());
        for (i, record) in records.iter().enumerate() {
            let key = record.key.expect("key");
            whole.add(key, &[], record.timestamp_ms, &mut out_whole).expect("adds");
            if i < 5 {
                first
                    .add(key, &[], record.timestamp_ms, &mut out_resumed)
                    .expect("adds");
            }
        }
        let mut resumed = crate::testing::restored(factory, &*first).expect("restores");
        for record in &records[5..] {
            resumed
                .add(record.key.expect("key"), &[], record.timestamp_ms, &mut out_resumed)
                .expect("adds");
        }
        whole.advance(i64::MAX, &mut out_whole).expect("closes");
        resumed.advance(i64::MAX, &mut out_resumed).expect("closes");
        let sink = |out: &Emitted| -> Vec<(Vec<u8>, Vec<u8>)> {
            out.iter()
                .map(|r| (r.key.unwrap_or_default().to_vec(), r.value.unwrap_or_default().to_vec()))
                .collect()
        };
        assert_eq!(sink(&out_resumed), sink(&out_whole));
        assert_eq!(sink(&out_whole).len(), expected.len());

        assert!(matches!(
            EncodedKey::new(&[7; KEY_INLINE_BYTES]),
            EncodedKey::Inline { .. }
        ));
        assert!(matches!(
            EncodedKey::new(&[7; KEY_INLINE_BYTES + 1]),
            EncodedKey::Heap(_)
        ));

        // A key is checked when it first enters a window.
        let mut window = factory();
        let mut out = Emitted::default();
        for (bad, why) in [
            (&b"\x05ab"[..], "shorter than its length"),
            (b"\x01ab", "a byte after the key"),
        ] {
            let err = window.add(bad, &[], 1_000, &mut out).expect_err(why);
            assert!(
                matches!(err, StageError::Window(WindowError::BadKey(_))),
                "{why}: {err}"
            );
        }
        window
            .add(b"\x01a", &[], 1_000, &mut out)
            .expect("a good key still counts");
        window.advance(i64::MAX, &mut out).expect("closes");
        assert_eq!(out.len(), 1, "only the good key has a result");
    }

    #[test]
    fn a_failed_encoding_leaves_the_buffer_as_it_was() {
        let mut emitted = Emitted::default();
        let key = emitted.encode(to_json("k")).expect("encodes");
        emitted.push(1, Some(key), None);
        let unencodable = BTreeMap::from([(vec![1u8], 1u8)]);
        assert!(emitted.encode(to_json(&unencodable)).is_err());
        let records: Vec<EmittedRecord<'_>> = emitted.iter().collect();
        assert_eq!(
            records,
            vec![EmittedRecord {
                key: Some(&b"\"k\""[..]),
                value: None,
                timestamp_ms: 1
            }]
        );
        assert_eq!(emitted.bytes.len(), 3, "nothing of the failed encoding is left");
    }

    #[test]
    fn a_result_without_a_json_form_fails_the_stage_instead_of_vanishing() {
        // JSON object keys must be strings: a map keyed by bytes has no JSON form.
        let def = Dataflow::new("odd")
            .source::<u32>("in")
            .key_by(|n| BTreeMap::from([(vec![*n as u8], 1u8)]))
            .window(Window::tumbling(Duration::from_secs(60)))
            .count()
            .sink("out");
        let mut emitted = Emitted::default();
        def.source_stage.process(b"7", 1_000, &mut emitted).expect("decodes");
        let record = emitted.iter().next().expect("one keyed record");
        let mut window = (def.window_stage.expect("keyed"))();
        let mut out = Emitted::default();
        let key = record.key.expect("key");
        let err = window.add(key, &[], 1_000, &mut out).expect_err("unencodable key");
        assert!(matches!(err, StageError::Unencodable(_)), "{err}");
        assert!(out.is_empty());
    }

    #[test]
    fn a_keyed_source_refuses_an_event_time_no_window_holds() {
        let def = crate::fraud::dataflow();
        let mut out = Emitted::default();
        let record = format!(r#"{{"card_number":"c","amount_cents":1,"at_ms":{}}}"#, i64::MAX);
        let refused = def
            .source_stage
            .process(record.as_bytes(), 0, &mut out)
            .expect_err("refused");
        assert!(refused.contains("outside the range a window holds"), "{refused}");
        let record = r#"{"card_number":"c","amount_cents":1,"at_ms":1700000000000}"#;
        def.source_stage
            .process(record.as_bytes(), 0, &mut out)
            .expect("in range");
        assert_eq!(out.len(), 1);
    }
}
