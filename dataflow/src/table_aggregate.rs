//! Aggregates over a table (`SELECT country, COUNT(*) FROM users GROUP BY
//! country`), as Kafka Streams' `KGroupedTable.aggregate(adder,
//! subtractor)`: a row that changes leaves its old group and joins its new
//! one, and a deleted row leaves its group.
//!
//! Three stages: the table read by primary key ([`crate::table_join::TableSource`]);
//! the *changes* stage ([`TableChangesStage`]), holding each key's latest
//! row and sending every change on, repartitioned by the `GROUP BY` key,
//! as the old row taken out and the new row added, each after the `WHERE`
//! — or, when both are in one group, as one replacement, so that the
//! group never shows the row missing (Kafka Streams' KIP-904); and the
//! aggregate ([`TableAggregateStage`]), which adds and
//! subtracts. COUNT, SUM and AVG can take a value back out (sums exactly:
//! [`ExactSum`]); MIN, MAX and COUNT_DISTINCT cannot, and are refused. A
//! group left with no rows is deleted (a tombstone), as is one `HAVING` no
//! longer keeps.
//!
//! Both stages keep their state as changelog entries ([`KeyRows`], one row
//! per key), so everything here is a function of the records in order: a
//! task replaying its input from a checkpoint emits the same changes.

use std::sync::Arc;

use runnel_client::plan::{Expr, Operator};
use runnel_client::tasks::StateRow;
use serde::{Deserialize, Serialize};

use crate::builder::{one_store_stage, state_rows, Emitted, StageError, WindowStage};
use crate::compile::{emit_deletion, emit_row, group_key, run_ops, Accumulator, AggregateStage};
use crate::join::LEFT;
use crate::row::{eval, Value};
use crate::table_join::{KeyRows, Rows};
use crate::window::WindowBounds;

/// A change's first byte: the row (postcard of the values it carries) is
/// taken out of its group.
pub(crate) const TAKEN_OUT: u8 = 0;
/// A change's first byte: the row is added to its group.
pub(crate) const ADDED: u8 = 1;
/// A change's first byte: the row is replaced within its group; the old
/// row, then the new one, follow.
pub(crate) const REPLACED: u8 = 2;
/// The format of both stages' snapshots (their state is in the changelog).
const TABLE_AGGREGATE_STATE_VERSION: u8 = 1;

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u8,
    max_event_ms: i64,
}

fn snapshot(max_event_ms: i64) -> Result<Vec<u8>, StageError> {
    let snapshot = Snapshot {
        version: TABLE_AGGREGATE_STATE_VERSION,
        max_event_ms,
    };
    postcard::to_allocvec(&snapshot).map_err(|e| StageError::Unencodable(e.to_string()))
}

/// Sets `max_event_ms` to the greatest event time a snapshot holds.
fn restore_clock(max_event_ms: &mut i64, bytes: &[u8]) -> Result<(), StageError> {
    *max_event_ms = restored(bytes)?;
    Ok(())
}

/// The greatest event time a snapshot holds.
fn restored(bytes: &[u8]) -> Result<i64, StageError> {
    let snapshot: Snapshot =
        postcard::from_bytes(bytes).map_err(|e| StageError::Corrupt(format!("table aggregate state: {e}")))?;
    if snapshot.version != TABLE_AGGREGATE_STATE_VERSION {
        return Err(StageError::Corrupt(format!(
            "table aggregate state of format {} (this node reads {TABLE_AGGREGATE_STATE_VERSION})",
            snapshot.version
        )));
    }
    Ok(snapshot.max_event_ms)
}

/// What every task of a changes stage shares.
#[derive(Clone, Debug)]
pub struct ChangesSpec {
    /// Values in a table row: its columns, then ROWTIME.
    pub width: usize,
    /// The operators before the repartition (a `WHERE`).
    pub ops: Vec<Operator>,
    /// The `GROUP BY` key and the aggregates' arguments over a row.
    pub key: Vec<Expr>,
    pub carry: Vec<Expr>,
}

/// A row's group key and the values it carries to the aggregate, each as
/// the aggregate reads them (postcard), or `None` when the `WHERE` drops
/// it. Compared as bytes, as the aggregate tells groups apart (`0.0` and
/// `-0.0` are two groups, NaN one).
type Grouped = Option<(Vec<u8>, Vec<u8>)>;

fn grouped(spec: &ChangesSpec, scratch: &mut Vec<Value>, rows: &Rows<Vec<Value>>) -> Result<Grouped, StageError> {
    let Some(mut row) = rows[0].clone() else {
        return Ok(None);
    };
    if !run_ops(&spec.ops, &[], &mut row, scratch) {
        return Ok(None);
    }
    let key: Vec<Value> = spec.key.iter().map(|e| eval(e, &row)).collect();
    let carried: Vec<Value> = spec.carry.iter().map(|e| eval(e, &row)).collect();
    let unencodable = |e: String| StageError::Unencodable(e);
    let carried = postcard::to_allocvec(&carried).map_err(|e| unencodable(e.to_string()))?;
    Ok(Some((group_key(&key).map_err(unencodable)?, carried)))
}

/// One task's changes stage: each primary key's latest row.
pub struct TableChangesStage {
    spec: Arc<ChangesSpec>,
    rows: KeyRows<Vec<Value>>,
    max_event_ms: i64,
    scratch: Vec<Value>,
}

impl TableChangesStage {
    pub fn new(spec: Arc<ChangesSpec>) -> TableChangesStage {
        TableChangesStage {
            spec,
            rows: KeyRows::default(),
            max_event_ms: i64::MIN,
            scratch: Vec::new(),
        }
    }

    /// A repartitioned table record: the row, or none for a deletion.
    fn decode(&self, value: &[u8]) -> Result<Option<Vec<Value>>, StageError> {
        let mut carried: Vec<Value> =
            postcard::from_bytes(value).map_err(|e| StageError::Corrupt(format!("table row: {e}")))?;
        if carried.first() != Some(&Value::Int(LEFT)) {
            return Err(StageError::Corrupt(format!(
                "a table row that is not the aggregated table's: {:?}",
                carried.first()
            )));
        }
        carried.remove(0);
        match carried.len() {
            0 => Ok(None),
            n if n == self.spec.width => Ok(Some(carried)),
            n => Err(StageError::Corrupt(format!(
                "a table row of {n} values, not {}",
                self.spec.width
            ))),
        }
    }
}

/// Sends one change to the aggregate, keyed by its group: its first byte,
/// then the rows' carried values. (No window needs its time in range: it
/// is only passed on.)
fn emit_change(out: &mut Emitted, key: &[u8], sign: u8, rows: &[&[u8]], t_ms: i64) -> Result<(), StageError> {
    let key = out
        .encode(|b| {
            b.extend_from_slice(key);
            Ok::<_, String>(())
        })
        .map_err(StageError::Unencodable)?;
    let value = out
        .encode(|b| {
            b.push(sign);
            rows.iter().for_each(|row| b.extend_from_slice(row));
            Ok::<_, String>(())
        })
        .map_err(StageError::Unencodable)?;
    out.push(t_ms, Some(key), Some(value));
    Ok(())
}

impl WindowStage for TableChangesStage {
    fn add(&mut self, key: &[u8], value: &[u8], t_ms: i64, out: &mut Emitted) -> Result<(), StageError> {
        let row = self.decode(value)?;
        self.max_event_ms = self.max_event_ms.max(t_ms);
        let (spec, scratch) = (&self.spec, &mut self.scratch);
        let (before, after) = self.rows.update(key, 0, row, |rows| grouped(spec, scratch, rows))?;
        match (before, after) {
            // Nothing the aggregate sees changed.
            (before, after) if before == after => Ok(()),
            (Some((old_key, old)), Some((key, new))) if old_key == key => {
                emit_change(out, &key, REPLACED, &[&old, &new], t_ms)
            }
            (before, after) => {
                if let Some((key, carried)) = before {
                    emit_change(out, &key, TAKEN_OUT, &[&carried], t_ms)?;
                }
                if let Some((key, carried)) = after {
                    emit_change(out, &key, ADDED, &[&carried], t_ms)?;
                }
                Ok(())
            }
        }
    }

    one_store_stage!(rows, snapshot, restore_clock);

    /// The aggregate holds the state a pull query reads, not this stage.
    fn read(&self, _key: Option<&[u8]>, _limit: usize) -> Result<Option<Vec<StateRow>>, StageError> {
        Err(StageError::NoTable(
            "a table's changes stage holds rows by primary key; its aggregate holds the groups",
        ))
    }
}

/// A change's row taken out and row added, as their carried values.
type Change = (Option<Vec<Value>>, Option<Vec<Value>>);

/// One task's aggregate over a table's changes: each group's state (the
/// aggregates', then the group's row count).
pub struct TableAggregateStage {
    stage: Arc<AggregateStage>,
    groups: KeyRows<Vec<Accumulator>>,
    max_event_ms: i64,
}

impl TableAggregateStage {
    pub(crate) fn new(stage: Arc<AggregateStage>) -> TableAggregateStage {
        TableAggregateStage {
            stage,
            groups: KeyRows::default(),
            max_event_ms: i64::MIN,
        }
    }

    /// A change's sign and the values it carries.
    /// A change's row taken out and row added (both for a replacement).
    fn decode(value: &[u8]) -> Result<Change, StageError> {
        let corrupt = |e: postcard::Error| StageError::Corrupt(format!("a table change: {e}"));
        let row = |bytes: &[u8]| postcard::from_bytes::<Vec<Value>>(bytes).map_err(corrupt);
        match value {
            [TAKEN_OUT, rest @ ..] => Ok((Some(row(rest)?), None)),
            [ADDED, rest @ ..] => Ok((None, Some(row(rest)?))),
            [REPLACED, rest @ ..] => {
                let (old, new) = postcard::take_from_bytes::<Vec<Value>>(rest).map_err(corrupt)?;
                Ok((Some(old), Some(row(new)?)))
            }
            _ => Err(StageError::Corrupt("a table change without a sign".to_string())),
        }
    }

    /// `state` with one row's values taken out and another's added (either
    /// or both); `None` when the group has no rows left.
    fn fold(&self, state: Option<Vec<Accumulator>>, change: Change) -> Result<Option<Vec<Accumulator>>, StageError> {
        let calls = &self.stage.calls;
        let empty = || {
            calls
                .iter()
                .map(Accumulator::subtracting)
                .chain([Accumulator::Count(0)])
        };
        let mut state = match state {
            None if change.0.is_some() => {
                return Err(StageError::Corrupt(
                    "a row taken out of (or replaced in) a group that holds none".to_string(),
                ))
            }
            None => empty().collect(),
            Some(state) => state,
        };
        let kinds_match = state.len() == calls.len() + 1
            && state
                .iter()
                .zip(empty())
                .all(|(a, b)| std::mem::discriminant(a) == std::mem::discriminant(&b));
        if !kinds_match {
            return Err(StageError::Corrupt(format!(
                "a group's state {state:?} is not that of {calls:?} and a row count"
            )));
        }
        for (row, sign) in [(change.0, -1), (change.1, 1)] {
            let Some(row) = row else { continue };
            for (accumulator, call) in state.iter_mut().zip(calls) {
                accumulator.fold_signed(call.argument.map(|i| row.get(i).unwrap_or(&Value::Null)), sign);
            }
            // The group's row count, last.
            state[calls.len()].fold_signed(None, sign);
        }
        match state[calls.len()] {
            Accumulator::Count(rows) if rows > 0 => Ok(Some(state)),
            Accumulator::Count(0) => Ok(None),
            _ => Err(StageError::Corrupt("a group's row count fell below 0".to_string())),
        }
    }

    /// Writes the group's row, or its deletion when it has no rows left or
    /// `HAVING` drops it.
    fn emit(&self, key: &[u8], state: Option<&[Accumulator]>, t_ms: i64, out: &mut Emitted) -> Result<(), StageError> {
        let calls = self.stage.calls.len();
        let all_time = WindowBounds { start_ms: 0, end_ms: 0 };
        if let Some(state) = state {
            if let Some(row) = self.stage.row(key, &all_time, &state[..calls])? {
                return emit_row(out, &self.stage.sink, &row, t_ms, &[]).map_err(StageError::Unencodable);
            }
        }
        let empty: Vec<Accumulator> = self.stage.calls.iter().map(Accumulator::subtracting).collect();
        let row = self.stage.projected(key, state.map_or(&empty[..], |s| &s[..calls]))?;
        emit_deletion(out, &self.stage.sink, &row, t_ms, &[])
    }
}

impl WindowStage for TableAggregateStage {
    fn add(&mut self, key: &[u8], value: &[u8], t_ms: i64, out: &mut Emitted) -> Result<(), StageError> {
        let change = Self::decode(value)?;
        self.max_event_ms = self.max_event_ms.max(t_ms);
        let before = self.groups.iter(Some(key)).next().and_then(|(_, rows)| rows[0].clone());
        let after = self.fold(before, change)?;
        self.groups.update(key, 0, after.clone(), |_| Ok(()))?;
        self.emit(key, after.as_deref(), t_ms, out)
    }

    one_store_stage!(groups, snapshot, restore_clock);

    fn read(&self, key: Option<&[u8]>, limit: usize) -> Result<Option<Vec<StateRow>>, StageError> {
        let calls = self.stage.calls.len();
        let all_time = WindowBounds { start_ms: 0, end_ms: 0 };
        let mut out = Emitted::default();
        for (key, rows) in self.groups.iter(key) {
            if out.len() >= limit {
                return Ok(None);
            }
            let Some(state) = &rows[0] else { continue };
            if let Some(row) = self.stage.row(key, &all_time, &state[..calls.min(state.len())])? {
                emit_row(&mut out, &self.stage.sink, &row, 0, &[]).map_err(StageError::Unencodable)?;
            }
        }
        Ok(Some(state_rows(&out)))
    }
}

/// A sum that values can be taken back out of without leaving errors
/// behind: integers exactly (in an `i128`), doubles with Neumaier's
/// compensation, and infinities and NaNs counted apart, so that taking
/// one back out leaves the finite sum as it was.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ExactSum {
    ints: i128,
    /// Doubles folded in (less those taken out).
    doubles: i64,
    sum: f64,
    compensation: f64,
    nans: i64,
    /// +∞ and −∞.
    infinities: [i64; 2],
}

impl ExactSum {
    /// Adds `sign` × `value` (1 or −1).
    pub(crate) fn add(&mut self, value: &Value, sign: i64) {
        match value {
            Value::Int(i) => self.ints += i128::from(sign) * i128::from(*i),
            Value::Double(d) => {
                self.doubles += sign;
                if d.is_nan() {
                    self.nans += sign;
                } else if d.is_infinite() {
                    self.infinities[usize::from(*d < 0.0)] += sign;
                } else {
                    self.add_finite(sign as f64 * d);
                }
            }
            _ => {}
        }
    }

    fn add_finite(&mut self, x: f64) {
        let total = self.sum + x;
        if !total.is_finite() {
            // Past the doubles: infinite (not NaN) until the group empties.
            self.sum = total;
            return;
        }
        self.compensation += if self.sum.abs() >= x.abs() {
            (self.sum - total) + x
        } else {
            (x - total) + self.sum
        };
        self.sum = total;
    }

    /// The sum as a double.
    pub(crate) fn double(&self) -> f64 {
        match (self.nans, self.infinities) {
            (0, [0, 0]) => self.ints as f64 + (self.sum + self.compensation),
            (0, [_, 0]) => f64::INFINITY,
            (0, [0, _]) => f64::NEG_INFINITY,
            _ => f64::NAN,
        }
    }

    /// As SUM shows it: a BIGINT while no double is in it (wrapping, as a
    /// SUM over a stream wraps), else a DOUBLE.
    pub(crate) fn sum(&self) -> Value {
        match self.doubles {
            0 => Value::Int(self.ints as i64),
            _ => Value::Double(self.double()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum_of(changes: &[(Value, i64)]) -> ExactSum {
        let mut sum = ExactSum::default();
        for (value, sign) in changes {
            sum.add(value, *sign);
        }
        sum
    }

    #[test]
    fn a_sum_takes_values_back_out_without_leaving_rounding_or_infinities_behind() {
        let d = Value::Double;
        let small = sum_of(&[(d(1e16), 1), (d(1.0), 1), (d(1e16), -1)]);
        assert_eq!(small.sum(), d(1.0), "the 1.0 survives its large neighbour");
        let tenths: Vec<(Value, i64)> = (0..1_000).map(|_| (d(0.1), 1)).chain([(d(0.3), 1)]).collect();
        let mut sum = sum_of(&tenths);
        for _ in 0..1_000 {
            sum.add(&d(0.1), -1);
        }
        assert_eq!(sum.sum(), d(0.3));
        let infinite = sum_of(&[(d(2.0), 1), (d(f64::INFINITY), 1)]);
        assert_eq!(infinite.sum(), d(f64::INFINITY));
        let both = sum_of(&[(d(f64::INFINITY), 1), (d(f64::NEG_INFINITY), 1), (d(f64::NAN), 1)]);
        assert!(matches!(both.sum(), Value::Double(x) if x.is_nan()));
        let back = sum_of(&[
            (d(2.0), 1),
            (d(f64::NAN), 1),
            (d(f64::INFINITY), 1),
            (d(f64::NAN), -1),
            (d(f64::INFINITY), -1),
        ]);
        assert_eq!(back.sum(), d(2.0), "taking them out leaves the finite sum");
        let past = sum_of(&[(d(1e308), 1), (d(1e308), 1), (d(1e308), -1)]);
        assert_eq!(past.sum(), d(f64::INFINITY), "past the doubles: infinite, not NaN");
        let big = sum_of(&[
            (Value::Int(i64::MAX), 1),
            (Value::Int(i64::MAX), 1),
            (Value::Int(i64::MAX), -1),
        ]);
        assert_eq!(big.sum(), Value::Int(i64::MAX), "integers exactly, past i64 on the way");
        assert_eq!(big.double(), i64::MAX as f64);
    }

    #[test]
    fn signed_accumulators_fold_take_out_and_empty_to_null() {
        use runnel_client::plan::{AggregateCall, AggregateFunction};
        let call = |function| AggregateCall {
            function,
            argument: Some(0),
            argument_type: None,
        };
        let mut sum = Accumulator::subtracting(&call(AggregateFunction::Sum));
        let mut avg = Accumulator::subtracting(&call(AggregateFunction::Avg));
        let mut count = Accumulator::subtracting(&call(AggregateFunction::Count));
        for (value, sign) in [
            (Value::Int(4), 1),
            (Value::Null, 1),
            (Value::Int(8), 1),
            (Value::Int(4), -1),
        ] {
            for accumulator in [&mut sum, &mut avg, &mut count] {
                accumulator.fold_signed(Some(&value), sign);
            }
        }
        assert_eq!(
            (sum.result(), avg.result(), count.result()),
            (Value::Int(8), Value::Double(8.0), Value::Int(1))
        );
        for accumulator in [&mut sum, &mut avg, &mut count] {
            accumulator.fold_signed(Some(&Value::Int(8)), -1);
        }
        assert_eq!(
            (sum.result(), avg.result(), count.result()),
            (Value::Null, Value::Null, Value::Int(0))
        );
    }
}
