//! The join stage of a stream–stream join, as a pure state machine: records
//! of both sides in, joined rows out, moved on by the watermark.
//!
//! Both sides reach the stage through the repartition topic keyed by their
//! side of the join condition, each record's first carried value naming its
//! side ([`LEFT`] or [`RIGHT`]). A left record at `t` joins right records
//! at `[t - before, t + after]`. As in Kafka Streams' `JoinWindows` (3.1 on):
//! - a record is late, counted and dropped, once its own window has closed:
//!   the watermark has passed `t + after + grace` (a right record's:
//!   `t + before + grace`);
//! - a pair is emitted as soon as its second record arrives, at the later
//!   of the two times;
//! - every record is held until no record of the other side can still join
//!   it without being late: the watermark has passed
//!   `t + before + after + grace` (as Kafka Streams' window store retains
//!   `before + after + grace`);
//! - a left (or outer) join's record that matched nothing leaves with NULLs
//!   for the other side when it is let go, never before, so a NULL row is
//!   never followed by a pair of the same record;
//! - a record whose join key is NULL matches nothing; a side whose unmatched
//!   rows leave with NULLs emits it at once (KIP-962), else it is dropped.
//!
//! Everything here is a function of the records and watermarks in order,
//! so a task replaying its input from a checkpoint emits the same rows.
//!
//! [`JoinBuffers`] is that state machine over any payload; SQL's join stage
//! ([`StreamJoinStage`]) holds rows of values, the Rust builders' join
//! ([`crate::builder::KeyedStream::join`]) each side's encoded records.

mod log;

use std::collections::BTreeMap;
use std::sync::Arc;

use runnel_client::plan::{Column, Expr, JoinKind, Operator, Sink, SqlType};
use runnel_client::tasks::StateRow;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::builder::{Emitted, StageError, StateStore, WindowStage};
use crate::compile::{emit_repartitioned, emit_row, run_ops};
use crate::row::{JsonRow, Value};

/// The first carried value of a repartitioned left record.
pub const LEFT: i64 = 0;
/// The first carried value of a repartitioned right record.
pub const RIGHT: i64 = 1;
/// Records one join task holds at most, both sides together.
pub const JOIN_HELD_RECORDS_MAX: usize = 200_000;
/// Records of the other side one record may pair with, at most: what one
/// record adds to a step's output stays bounded.
pub const JOIN_PAIRS_PER_RECORD_MAX: usize = 10_000;
/// The format of [`JoinSnapshot`].
const JOIN_STATE_VERSION: u8 = 1;

/// A join's window, in milliseconds: a left record at `l` joins right
/// records at `[l - before, l + after]`; records older than the watermark
/// by more than `grace` are late.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JoinWindow {
    pub before_ms: i64,
    pub after_ms: i64,
    pub grace_ms: i64,
}

/// Which side of the join a record comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Side {
    Left,
    Right,
}

impl Side {
    fn index(self) -> usize {
        match self {
            Side::Left => 0,
            Side::Right => 1,
        }
    }

    fn other(self) -> Side {
        match self {
            Side::Left => Side::Right,
            Side::Right => Side::Left,
        }
    }
}

impl JoinWindow {
    /// Records at most `span` apart join, either way round; no grace.
    pub fn within(span: std::time::Duration) -> JoinWindow {
        let ms = i64::try_from(span.as_millis()).unwrap_or(i64::MAX);
        JoinWindow {
            before_ms: ms,
            after_ms: ms,
            grace_ms: 0,
        }
    }

    /// How long after its window a record may still arrive.
    pub fn grace(self, grace: std::time::Duration) -> JoinWindow {
        JoinWindow {
            grace_ms: i64::try_from(grace.as_millis()).unwrap_or(i64::MAX),
            ..self
        }
    }

    /// Whether a record of `side` at `t_ms` is late under `watermark_ms`:
    /// its window (and the grace after it) closed.
    fn late(&self, side: Side, t_ms: i64, watermark_ms: i64) -> bool {
        let reach = match side {
            Side::Left => self.after_ms,
            Side::Right => self.before_ms,
        };
        t_ms.saturating_add(reach).saturating_add(self.grace_ms) < watermark_ms
    }

    /// When a held record at `t_ms` is let go: no record of the other side
    /// that is not late can join it any more.
    fn released_at(&self, t_ms: i64) -> i64 {
        t_ms.saturating_add(self.before_ms)
            .saturating_add(self.after_ms)
            .saturating_add(self.grace_ms)
    }

    /// The times of the other side's records a record of `side` at `t_ms`
    /// joins.
    fn partners(&self, side: Side, t_ms: i64) -> std::ops::RangeInclusive<i64> {
        match side {
            Side::Left => t_ms.saturating_sub(self.before_ms)..=t_ms.saturating_add(self.after_ms),
            Side::Right => t_ms.saturating_sub(self.after_ms)..=t_ms.saturating_add(self.before_ms),
        }
    }
}

/// Whether a join of `kind` emits `side`'s records that matched nothing.
pub fn keeps_unmatched(kind: JoinKind, side: Side) -> bool {
    matches!((kind, side), (JoinKind::Outer, _) | (JoinKind::Left, Side::Left))
}

/// What a join emits: a pair, or a record of one side that matched nothing.
/// `key` is the join key as repartitioned (empty for a NULL key).
pub enum Joined<'a, P> {
    Pair {
        key: &'a [u8],
        left: &'a P,
        right: &'a P,
        t_ms: i64,
    },
    Alone {
        key: &'a [u8],
        side: Side,
        payload: &'a P,
        t_ms: i64,
    },
}

impl<'a, P> Joined<'a, P> {
    /// The key, the left and right records (a lone record's other side
    /// missing), and the time the joined row is stamped with.
    pub fn parts(self) -> (&'a [u8], Option<&'a P>, Option<&'a P>, i64) {
        match self {
            Joined::Pair { key, left, right, t_ms } => (key, Some(left), Some(right), t_ms),
            Joined::Alone {
                key,
                side: Side::Left,
                payload,
                t_ms,
            } => (key, Some(payload), None, t_ms),
            Joined::Alone { key, payload, t_ms, .. } => (key, None, Some(payload), t_ms),
        }
    }
}

/// One held record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Held<P> {
    side: Side,
    t_ms: i64,
    payload: P,
    matched: bool,
}

/// A join's state as a checkpoint holds it.
#[derive(Serialize, Deserialize)]
struct JoinSnapshot<P> {
    version: u8,
    watermark_ms: i64,
    next_seq: u64,
    late: u64,
    /// Each held record with its key and arrival sequence.
    held: Vec<(Vec<u8>, u64, Held<P>)>,
}

/// One key's held records, per side by (time, arrival sequence).
type KeyHeld<P> = [BTreeMap<(i64, u64), Held<P>>; 2];

/// The records of both sides a join task holds, by key and time, until
/// their windows close.
pub struct JoinBuffers<P> {
    window: JoinWindow,
    kind: JoinKind,
    held: BTreeMap<Vec<u8>, KeyHeld<P>>,
    /// When each held record's window closes, by (time, sequence): its key,
    /// side and time.
    closing: BTreeMap<(i64, u64), (Vec<u8>, Side, i64)>,
    next_seq: u64,
    watermark_ms: i64,
    late: u64,
    /// What changed since the last checkpoint, when the records are kept
    /// as changelog entries (see [`log`]).
    changes: Option<log::Changes>,
}

impl<P: Clone + Serialize + DeserializeOwned> JoinBuffers<P> {
    pub fn new(window: JoinWindow, kind: JoinKind) -> JoinBuffers<P> {
        JoinBuffers {
            window,
            kind,
            held: BTreeMap::new(),
            closing: BTreeMap::new(),
            next_seq: 0,
            watermark_ms: i64::MIN,
            late: 0,
            changes: None,
        }
    }

    /// Records held now.
    pub fn held(&self) -> usize {
        self.closing.len()
    }

    pub fn late_records(&self) -> u64 {
        self.late
    }

    pub fn watermark_ms(&self) -> i64 {
        self.watermark_ms
    }

    /// The event time below which the join emits nothing more: a pair is
    /// at least as new as a record that is not late, an unmatched record
    /// is let go only past `t + before + after + grace`.
    pub fn output_watermark_ms(&self) -> i64 {
        if self.watermark_ms == i64::MIN {
            return i64::MIN;
        }
        let w = self.window;
        self.watermark_ms
            .saturating_sub(w.before_ms.saturating_add(w.after_ms).saturating_add(w.grace_ms))
    }

    /// Adds a record of `side` at `t_ms` under `key` (`None`: a NULL key,
    /// which matches nothing), emitting the pairs it makes.
    pub fn add(
        &mut self,
        key: Option<&[u8]>,
        side: Side,
        t_ms: i64,
        payload: P,
        emit: &mut dyn FnMut(Joined<'_, P>) -> Result<(), StageError>,
    ) -> Result<(), StageError> {
        if self.window.late(side, t_ms, self.watermark_ms) {
            self.late += 1;
            return Ok(());
        }
        let Some(key) = key else {
            if keeps_unmatched(self.kind, side) {
                emit(Joined::Alone {
                    key: &[],
                    side,
                    payload: &payload,
                    t_ms,
                })?;
            }
            return Ok(());
        };
        if self.held() >= JOIN_HELD_RECORDS_MAX {
            return Err(StageError::JoinFull(JOIN_HELD_RECORDS_MAX));
        }
        let mut matched = false;
        if let Some(held) = self.held.get_mut(key) {
            let times = self.window.partners(side, t_ms);
            let range = (*times.start(), 0)..=(*times.end(), u64::MAX);
            let partners = held[side.other().index()].range(range.clone()).count();
            if partners > JOIN_PAIRS_PER_RECORD_MAX {
                return Err(StageError::JoinFanOut(partners, JOIN_PAIRS_PER_RECORD_MAX));
            }
            for (&(other_ms, other_seq), other) in held[side.other().index()].range_mut(range) {
                if !other.matched {
                    if let Some(changes) = &mut self.changes {
                        changes.note_matched(other_seq, key, side.other(), other_ms);
                    }
                }
                other.matched = true;
                matched = true;
                let (left, right) = match side {
                    Side::Left => (&payload, &other.payload),
                    Side::Right => (&other.payload, &payload),
                };
                emit(Joined::Pair {
                    key,
                    left,
                    right,
                    t_ms: t_ms.max(other.t_ms),
                })?;
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.note_change(seq, key, side, t_ms, &payload);
        let held = Held {
            side,
            t_ms,
            payload,
            matched,
        };
        self.insert(key.to_vec(), seq, held);
        Ok(())
    }

    /// Lets the record `seq` go (a changelog's tombstone).
    fn remove(&mut self, key: &[u8], side: Side, t_ms: i64, seq: u64) {
        self.closing.remove(&(self.window.released_at(t_ms), seq));
        if let Some(of_key) = self.held.get_mut(key) {
            of_key[side.index()].remove(&(t_ms, seq));
            if of_key.iter().all(BTreeMap::is_empty) {
                self.held.remove(key);
            }
        }
    }

    fn insert(&mut self, key: Vec<u8>, seq: u64, held: Held<P>) {
        let closes_ms = self.window.released_at(held.t_ms);
        self.closing
            .insert((closes_ms, seq), (key.clone(), held.side, held.t_ms));
        self.held.entry(key).or_default()[held.side.index()].insert((held.t_ms, seq), held);
    }

    /// Moves the watermark on: records whose windows closed leave, those
    /// that matched nothing emitted if the join keeps them.
    pub fn advance(
        &mut self,
        watermark_ms: i64,
        emit: &mut dyn FnMut(Joined<'_, P>) -> Result<(), StageError>,
    ) -> Result<(), StageError> {
        if watermark_ms <= self.watermark_ms {
            return Ok(());
        }
        self.watermark_ms = watermark_ms;
        while let Some(entry) = self.closing.first_entry() {
            let (closes_ms, seq) = *entry.key();
            if closes_ms >= watermark_ms {
                break;
            }
            let (key, side, t_ms) = entry.remove();
            let Some(of_key) = self.held.get_mut(&key) else {
                continue;
            };
            let held = of_key[side.index()].remove(&(t_ms, seq));
            if of_key.iter().all(BTreeMap::is_empty) {
                self.held.remove(&key);
            }
            self.note_released(seq, &key, side, t_ms, held.as_ref().is_some_and(|h| h.matched));
            if let Some(held) = held.filter(|h| !h.matched && keeps_unmatched(self.kind, h.side)) {
                emit(Joined::Alone {
                    key: &key,
                    side: held.side,
                    payload: &held.payload,
                    t_ms: held.t_ms,
                })?;
            }
        }
        Ok(())
    }

    /// The state as a checkpoint holds it: without the held records when
    /// they are kept as changelog entries.
    pub fn snapshot(&self) -> Result<Vec<u8>, StageError> {
        let logged = self.changes.is_some();
        let held = self
            .held
            .iter()
            .filter(|_| !logged)
            .flat_map(|(key, of_key)| {
                of_key
                    .iter()
                    .flatten()
                    .map(move |(&(_, seq), h)| (key.clone(), seq, h.clone()))
            })
            .collect();
        let snapshot = JoinSnapshot {
            version: JOIN_STATE_VERSION,
            watermark_ms: self.watermark_ms,
            next_seq: self.next_seq,
            late: self.late,
            held,
        };
        postcard::to_allocvec(&snapshot).map_err(|e| StageError::Unencodable(e.to_string()))
    }

    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), StageError> {
        let snapshot: JoinSnapshot<P> =
            postcard::from_bytes(bytes).map_err(|e| StageError::Corrupt(format!("join state: {e}")))?;
        if snapshot.version != JOIN_STATE_VERSION {
            return Err(StageError::Corrupt(format!(
                "join state of format {} (this node reads {JOIN_STATE_VERSION})",
                snapshot.version
            )));
        }
        let logged = self.changes.is_some();
        *self = JoinBuffers::new(self.window, self.kind);
        if logged {
            self.changes = Some(log::Changes::default());
        }
        for (key, seq, held) in snapshot.held {
            if seq >= snapshot.next_seq {
                return Err(StageError::Corrupt(format!(
                    "join state holds sequence {seq} past {}",
                    snapshot.next_seq
                )));
            }
            // Held in a snapshot written before the log was: a change.
            self.note_change(seq, &key, held.side, held.t_ms, &held.payload);
            self.insert(key, seq, held);
        }
        (self.watermark_ms, self.next_seq, self.late) = (snapshot.watermark_ms, snapshot.next_seq, snapshot.late);
        Ok(())
    }
}

/// What every task of a SQL join stage shares.
#[derive(Clone, Debug)]
pub struct JoinSpec {
    pub kind: JoinKind,
    pub window: JoinWindow,
    /// Values in a left row (its columns, then ROWTIME).
    pub left_width: usize,
    pub right_width: usize,
    /// The stateless operators after the join.
    pub ops: Vec<Operator>,
    pub sink: Sink,
    /// The name the output's key gives the join key (as ksqlDB keys a
    /// join's result by it): the key column the SELECT shows, or `ROWKEY`;
    /// `None` when a `PARTITION BY` keys the output by other columns.
    pub key_name: Option<String>,
    /// Where the joined rows go instead of the sink: the repartition topic,
    /// keyed by these expressions and carrying those, for an aggregate.
    pub repartition: Option<(Vec<Expr>, Vec<Expr>)>,
}

/// One task's SQL join stage: rows of values held in [`JoinBuffers`].
pub struct StreamJoinStage {
    spec: Arc<JoinSpec>,
    buffers: JoinBuffers<Vec<Value>>,
    /// The repartitioned form of a NULL join key.
    null_key: Vec<u8>,
    scratch: Vec<Value>,
}

impl StreamJoinStage {
    pub fn new(spec: Arc<JoinSpec>) -> StreamJoinStage {
        StreamJoinStage {
            buffers: JoinBuffers::logged(spec.window, spec.kind),
            spec,
            // As the source stage encodes a key: a sequence of values.
            null_key: postcard::to_allocvec(&vec![Value::Null]).unwrap_or_default(),
            scratch: Vec::new(),
        }
    }

    /// Records held now.
    pub fn held(&self) -> usize {
        self.buffers.held()
    }

    /// A repartitioned value: its side, then the side's row.
    fn decode(&self, value: &[u8]) -> Result<(Side, Vec<Value>), StageError> {
        let mut row: Vec<Value> =
            postcard::from_bytes(value).map_err(|e| StageError::Corrupt(format!("join value: {e}")))?;
        let (side, width) = match row.first() {
            Some(Value::Int(LEFT)) => (Side::Left, self.spec.left_width),
            Some(Value::Int(RIGHT)) => (Side::Right, self.spec.right_width),
            other => return Err(StageError::Corrupt(format!("join value names no side: {other:?}"))),
        };
        row.remove(0);
        if row.len() != width {
            return Err(StageError::Corrupt(format!(
                "a {side:?} row of {} values, not {width}",
                row.len()
            )));
        }
        Ok((side, row))
    }
}

/// Emits the joined row of a pair or of an unmatched row (NULLs for the
/// missing side), after the stage's operators.
fn emit_joined(
    spec: &JoinSpec,
    scratch: &mut Vec<Value>,
    joined: Joined<'_, Vec<Value>>,
    out: &mut Emitted,
) -> Result<(), StageError> {
    let (key, left, right, t_ms) = joined.parts();
    let mut row = Vec::with_capacity(spec.left_width + spec.right_width);
    match left {
        Some(values) => row.extend_from_slice(values),
        None => row.resize(spec.left_width, Value::Null),
    }
    match right {
        Some(values) => row.extend_from_slice(values),
        None => row.resize(spec.left_width + spec.right_width, Value::Null),
    }
    if !run_ops(&spec.ops, &[], &mut row, scratch) {
        return Ok(());
    }
    if let Some((key, carry)) = &spec.repartition {
        return emit_repartitioned(out, key, carry, &row, t_ms).map_err(StageError::Unencodable);
    }
    let Some(name) = spec.key_name.as_deref().filter(|_| !key.is_empty()) else {
        return emit_row(out, &spec.sink, &row, t_ms, &[]).map_err(StageError::Unencodable);
    };
    let unencodable = |e: serde_json::Error| StageError::Unencodable(e.to_string());
    let keys: Vec<Value> = postcard::from_bytes(key).map_err(|e| StageError::Corrupt(format!("join key: {e}")))?;
    let columns = [Column {
        name: name.to_string(),
        ty: SqlType::String,
    }];
    let json_key = JsonRow {
        columns: &columns,
        values: &keys,
        picked: None,
        extra: &[],
    };
    let json_key = out
        .encode(|b| serde_json::to_writer(b, &json_key))
        .map_err(unencodable)?;
    let value = JsonRow {
        columns: &spec.sink.columns,
        values: &row,
        picked: None,
        extra: &[],
    };
    let value = out.encode(|b| serde_json::to_writer(b, &value)).map_err(unencodable)?;
    out.push(t_ms, Some(json_key), Some(value));
    Ok(())
}

impl WindowStage for StreamJoinStage {
    fn add(&mut self, key: &[u8], value: &[u8], t_ms: i64, out: &mut Emitted) -> Result<(), StageError> {
        let (side, row) = self.decode(value)?;
        let key = (key != self.null_key).then_some(key);
        let (spec, scratch) = (&self.spec, &mut self.scratch);
        self.buffers.add(key, side, t_ms, row, &mut |joined| {
            emit_joined(spec, scratch, joined, out)
        })
    }

    fn advance(&mut self, watermark_ms: i64, out: &mut Emitted) -> Result<(), StageError> {
        let (spec, scratch) = (&self.spec, &mut self.scratch);
        self.buffers
            .advance(watermark_ms, &mut |joined| emit_joined(spec, scratch, joined, out))
    }

    fn snapshot(&self) -> Result<Vec<u8>, StageError> {
        self.buffers.snapshot()
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), StageError> {
        self.buffers.restore(bytes)
    }

    fn late_records(&self) -> u64 {
        self.buffers.late_records()
    }

    fn watermark_ms(&self) -> i64 {
        self.buffers.watermark_ms()
    }

    fn output_watermark_ms(&self) -> i64 {
        self.buffers.output_watermark_ms()
    }

    fn read(&self, _key: Option<&[u8]>, _limit: usize) -> Result<Option<Vec<StateRow>>, StageError> {
        Err(StageError::NoTable(
            "a stream–stream join holds records, not a table's rows",
        ))
    }

    fn store(&self) -> Option<&dyn StateStore> {
        Some(&self.buffers)
    }

    fn store_mut(&mut self) -> Option<&mut dyn StateStore> {
        Some(&mut self.buffers)
    }
}
