//! Plans compiled into the stages tasks run: what every node does with a
//! plan committed by a SQL statement, without anything in its binary.
//!
//! A plan runs as one stage (stateless operators straight to the sink) or
//! two: stateless operators and a repartition by the grouping key, then an
//! aggregate followed by stateless operators (`HAVING`, the projection).
//! A stream–stream join runs as three: a source stage per side, each
//! repartitioning by its side of the join condition, then the join stage
//! ([`crate::join`]) followed by stateless operators.
//! These stages are the same [`SourceStage`] and [`WindowStage`] the Rust
//! builders compile to, so SQL dataflows are placed, checkpointed and
//! restored exactly as builder dataflows are. A plan of another shape (an
//! aggregate of an aggregate) is refused with [`PlanError::Invalid`].
//!
//! An aggregate without a window is held as one window spanning all time
//! (`[0, 2^62)`; `[-2^62, 0)` for negative times) that never closes: a
//! table's rows are its keys' latest values.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use runnel_client::plan::{
    AggregateCall, AggregateFunction, Column, EmitMode, Expr, JoinKind, Literal, Operator, Plan, PlanError, StreamJoin,
    TableJoin, TablesJoin, WindowSpec,
};
use serde::{Deserialize, Serialize};

use crate::builder::{
    read_state, DataflowDef, Emitted, EncodedKey, JoinedSource, SourceStage, StageError, StateStore, WindowStage,
    WindowStageFactory,
};
use crate::join::{JoinSpec, JoinWindow, StreamJoinStage, LEFT, RIGHT};
use crate::row::{decode_row, eval, holds, JsonRow, Value};
use crate::table::TableState;
use crate::table_aggregate::{ChangesSpec, ExactSum, TableAggregateStage, TableChangesStage};
use crate::table_join::{TableJoinStage, TableSource, TablesSpec};
use crate::window::{event_time_in_range, Emit, Window, WindowBounds, WindowError, WindowOperator, WindowResult};
use runnel_client::tasks::StateRow;

/// The span of the one window of an unwindowed aggregate.
const ALL_TIME_MS: i64 = 1 << 62;

/// Compiles `plan` into dataflow `name`'s stages.
pub fn compile(name: &str, plan: &Plan) -> Result<DataflowDef, PlanError> {
    plan.validate()?;
    if let Some(dataflow) = plan.registered() {
        return Err(PlanError::Invalid(format!(
            "the plan runs the Rust dataflow {dataflow:?}: it resolves in a node's registry (Registry::resolve), not by compiling"
        )));
    }
    let split = plan.operators.iter().position(|op| {
        matches!(
            op,
            Operator::Repartition { .. } | Operator::JoinStream(_) | Operator::JoinTables(_)
        )
    });
    if let Some((Operator::TableChanges { key }, rest)) = plan.operators.split_first() {
        return compile_table_aggregate(name, plan, *key, rest);
    }
    let (before, after) = plan.operators.split_at(split.unwrap_or(plan.operators.len()));
    let stateless = source_ops(before)?;
    match after.split_first() {
        Some((Operator::JoinStream(join), rest)) => return compile_stream_join(name, plan, before, join, rest),
        Some((Operator::JoinTables(join), rest)) if before.is_empty() => {
            return compile_tables_join(name, plan, join, rest)
        }
        Some((Operator::JoinTables(_), _)) => return Err(invalid("operators before a table–table join")),
        _ => {}
    }
    let mut def = DataflowDef {
        name: name.to_string(),
        source: plan.source.topic.clone(),
        sink: plan.sink.topic.clone(),
        source_stage: Arc::new(SqlSource {
            columns: plan.source.columns.clone(),
            joins: plan.joins().count(),
            timestamp: plan.source.timestamp,
            ops: stateless,
            output: Output::Sink(plan.sink.clone()),
        }),
        joined_sources: Vec::new(),
        window_stage: None,
        next_stages: Vec::new(),
        steps: Vec::new(),
    };
    let Some((Operator::Repartition { key, carry }, rest)) = after.split_first() else {
        return Ok(def);
    };
    let source = SqlSource {
        columns: plan.source.columns.clone(),
        joins: plan.joins().count(),
        timestamp: plan.source.timestamp,
        ops: source_ops(before)?,
        output: Output::Repartition {
            key: key.clone(),
            carry: carry.clone(),
        },
    };
    def.source_stage = Arc::new(source);
    def.window_stage = Some(aggregate_stage(key, rest, &plan.sink)?);
    Ok(def)
}

/// The aggregate stage that `ops` (an aggregate, then stateless operators)
/// make of what a repartition by `key` carries.
fn aggregate_stage(
    key: &[Expr],
    ops: &[Operator],
    sink: &runnel_client::plan::Sink,
) -> Result<WindowStageFactory, PlanError> {
    let (aggregate, window, emit) = aggregate_of(key, ops, sink)?;
    let window = to_window(window);
    window.validate().map_err(|e| invalid(&e.to_string()))?;
    let emit = match emit {
        EmitMode::Changes => Emit::Changes,
        EmitMode::Final => Emit::Final,
    };
    Ok(Arc::new(move || {
        Box::new(SqlWindowStage {
            operator: WindowOperator::logged(window, emit),
            stage: aggregate.clone(),
            results: Vec::new(),
            row: Vec::new(),
        })
    }))
}

/// What `ops` (an aggregate, then stateless operators) make of what a
/// repartition by `key` carries: the aggregate, its window and emit mode.
fn aggregate_of(
    key: &[Expr],
    ops: &[Operator],
    sink: &runnel_client::plan::Sink,
) -> Result<(Arc<AggregateStage>, Option<WindowSpec>, EmitMode), PlanError> {
    let Some((
        Operator::Aggregate {
            keys,
            calls,
            window,
            emit,
        },
        rest,
    )) = ops.split_first()
    else {
        return Err(invalid("a repartition must be followed by an aggregate"));
    };
    if *keys as usize != key.len() {
        return Err(invalid("the aggregate's keys are not the repartition's"));
    }
    let aggregate = Arc::new(AggregateStage {
        keys: key.len(),
        calls: calls.clone(),
        windowed: window.is_some(),
        ops: stateless_ops(rest)?,
        sink: sink.clone(),
    });
    Ok((aggregate, *window, *emit))
}

/// A plan aggregating a table: the table read by primary key
/// ([`TableSource`]), the stage holding each key's latest row and sending
/// its changes on ([`TableChangesStage`]), then the aggregate that adds
/// and subtracts them ([`TableAggregateStage`]).
fn compile_table_aggregate(
    name: &str,
    plan: &Plan,
    primary_key: Option<usize>,
    after: &[Operator],
) -> Result<DataflowDef, PlanError> {
    let (ops, rest) = split_stateless(after);
    let Some((Operator::Repartition { key, carry }, aggregate)) = rest.split_first() else {
        return Err(invalid("a table's changes not repartitioned for an aggregate"));
    };
    let (aggregate, window, _) = aggregate_of(key, aggregate, &plan.sink)?;
    if window.is_some() {
        return Err(invalid("a windowed aggregate over a table"));
    }
    if let Some(call) = aggregate.calls.iter().find(|call| !call.function.subtracts()) {
        return Err(invalid(&format!(
            "{:?} over a table (it cannot take a changed row back out)",
            call.function
        )));
    }
    let changes = Arc::new(ChangesSpec {
        width: plan.source.columns.len() + 1,
        ops: ops.to_vec(),
        key: key.clone(),
        carry: carry.clone(),
    });
    let changes: WindowStageFactory = Arc::new(move || Box::new(TableChangesStage::new(changes.clone())));
    let aggregate: WindowStageFactory = Arc::new(move || Box::new(TableAggregateStage::new(aggregate.clone())));
    Ok(DataflowDef {
        next_stages: vec![aggregate],
        ..table_dataflow(name, plan, primary_key, changes)
    })
}

/// A dataflow that reads `plan`'s source as a table keyed by column `key`
/// (`None`: by the JSON object of a query-written table's key columns)
/// into `window_stage`; nothing more.
fn table_dataflow(name: &str, plan: &Plan, key: Option<usize>, window_stage: WindowStageFactory) -> DataflowDef {
    DataflowDef {
        name: name.to_string(),
        source: plan.source.topic.clone(),
        sink: plan.sink.topic.clone(),
        source_stage: Arc::new(TableSource {
            columns: plan.source.columns.clone(),
            key,
            side: LEFT,
        }),
        joined_sources: Vec::new(),
        window_stage: Some(window_stage),
        next_stages: Vec::new(),
        steps: Vec::new(),
    }
}

fn invalid(why: &str) -> PlanError {
    PlanError::Invalid(format!(
        "{why} (this node runs stateless operators and table joins, then at most one repartition and aggregate or one stream–stream join followed by stateless operators)"
    ))
}

/// A plan joining two streams: a source stage per side, each repartitioning
/// its rows by its side of the condition (the side first among the values
/// carried), then the join stage and the stateless operators after it.
fn compile_stream_join(
    name: &str,
    plan: &Plan,
    before: &[Operator],
    join: &StreamJoin,
    after: &[Operator],
) -> Result<DataflowDef, PlanError> {
    let (ops, rest) = split_stateless(after);
    let (output, next_stages) = match rest.split_first() {
        None => (None, Vec::new()),
        Some((Operator::Repartition { key, carry }, aggregate)) => (
            Some((key.clone(), carry.clone())),
            vec![aggregate_stage(key, aggregate, &plan.sink)?],
        ),
        Some((op, _)) => return Err(invalid(&format!("{op:?} after a stream–stream join"))),
    };
    let ops = ops.to_vec();
    let left_width = row_width(plan.source.columns.len() + 1, before);
    let right_width = join.source.columns.len() + 1;
    let carry = |side: i64, width: usize| {
        std::iter::once(Expr::Literal(Literal::Int(side)))
            .chain((0..width).map(Expr::Column))
            .collect()
    };
    let left = SqlSource {
        columns: plan.source.columns.clone(),
        joins: plan.joins().count(),
        timestamp: plan.source.timestamp,
        ops: before.to_vec(),
        output: Output::Repartition {
            key: vec![join.left_key.clone()],
            carry: carry(LEFT, left_width),
        },
    };
    let right = SqlSource {
        columns: join.source.columns.clone(),
        joins: 0,
        timestamp: join.source.timestamp,
        ops: Vec::new(),
        output: Output::Repartition {
            key: vec![join.right_key.clone()],
            carry: carry(RIGHT, right_width),
        },
    };
    let spec = Arc::new(JoinSpec {
        kind: join.kind,
        window: JoinWindow {
            before_ms: join.before_ms,
            after_ms: join.after_ms,
            grace_ms: join.grace_ms,
        },
        left_width,
        right_width,
        key_name: join_key_name(plan, join, left_width, &ops),
        ops,
        sink: plan.sink.clone(),
        repartition: output,
    });
    let factory: WindowStageFactory = Arc::new(move || Box::new(StreamJoinStage::new(spec.clone())));
    Ok(DataflowDef {
        name: name.to_string(),
        source: plan.source.topic.clone(),
        sink: plan.sink.topic.clone(),
        source_stage: Arc::new(left),
        joined_sources: vec![JoinedSource {
            topic: join.source.topic.clone(),
            stage: Arc::new(right),
        }],
        window_stage: Some(factory),
        next_stages,
        steps: Vec::new(),
    })
}

/// A plan joining two tables: a source stage per table, each keyed by its
/// primary key, then the join stage ([`crate::table_join`]) and the
/// stateless operators after it.
fn compile_tables_join(
    name: &str,
    plan: &Plan,
    join: &TablesJoin,
    after: &[Operator],
) -> Result<DataflowDef, PlanError> {
    let ops = stateless_ops(after).map_err(|_| invalid("an aggregate or a second join after a table–table join"))?;
    let spec = Arc::new(TablesSpec {
        kind: join.kind,
        left_width: plan.source.columns.len() + 1,
        right_width: join.source.columns.len() + 1,
        ops,
        sink: plan.sink.clone(),
    });
    let factory: WindowStageFactory = Arc::new(move || Box::new(TableJoinStage::new(spec.clone())));
    Ok(DataflowDef {
        joined_sources: vec![JoinedSource {
            topic: join.source.topic.clone(),
            stage: Arc::new(TableSource {
                columns: join.source.columns.clone(),
                key: Some(join.right_key),
                side: RIGHT,
            }),
        }],
        ..table_dataflow(name, plan, Some(join.left_key), factory)
    })
}

/// How a stream–stream join's output is keyed: by the join key, named as
/// the key column the SELECT shows (either side's column of the condition)
/// or `ROWKEY` when it shows none; `None` when the sink is keyed by other
/// columns (a `PARTITION BY`).
fn join_key_name(plan: &Plan, join: &StreamJoin, left_width: usize, ops: &[Operator]) -> Option<String> {
    let right_key = match join.right_key {
        Expr::Column(i) => Some(Expr::Column(left_width + i)),
        _ => None,
    };
    let projected = |column: usize| match ops.last() {
        Some(Operator::Project(projection)) => projection
            .get(column)
            .is_some_and(|(_, e)| *e == join.left_key || Some(e) == right_key.as_ref()),
        _ => false,
    };
    match plan.sink.key[..] {
        [] => Some("ROWKEY".to_string()),
        [column] if projected(column) => plan.sink.columns.get(column).map(|c| c.name.clone()),
        _ => None,
    }
}

/// Values in a row of `width` after `ops` (a source stage's).
fn row_width(width: usize, ops: &[Operator]) -> usize {
    ops.iter().fold(width, |width, op| match op {
        Operator::Project(columns) => columns.len(),
        Operator::JoinTable(join) | Operator::JoinTableAsOf(join, _) => width + join.columns.len(),
        Operator::Explode(_) => width + 1,
        _ => width,
    })
}

/// The operators of a source stage: stateless ones and table joins.
fn source_ops(ops: &[Operator]) -> Result<Vec<Operator>, PlanError> {
    let explodes = ops.iter().filter(|op| matches!(op, Operator::Explode(_))).count();
    if explodes > 1 {
        return Err(invalid("more than one EXPLODE"));
    }
    let source_op = |op: &&Operator| {
        matches!(
            op,
            Operator::Filter(_)
                | Operator::Project(_)
                | Operator::JoinTable(_)
                | Operator::JoinTableAsOf(..)
                | Operator::Explode(_)
        )
    };
    match ops.iter().find(|op| !source_op(op)) {
        Some(op) => Err(invalid(&format!(
            "{op:?} where a filter, projection, join or EXPLODE was expected"
        ))),
        None => Ok(ops.to_vec()),
    }
}

/// Elements an EXPLODE turns one row into, at most.
pub const EXPLODE_ELEMENTS_MAX: usize = 10_000;
/// Bytes an EXPLODE may copy for one record (each element's row holds a
/// copy of the record's values), estimated as elements × record bytes.
pub const EXPLODE_BYTES_MAX: usize = 16 << 20;

/// The elements of the JSON array `value` holds, as values (none for NULL
/// or anything but an array).
fn elements_of(value: &Value) -> Result<Vec<Value>, String> {
    let Value::Json(text) = value else {
        return Ok(Vec::new());
    };
    let Ok(serde_json::Value::Array(items)) = serde_json::from_str::<serde_json::Value>(text) else {
        return Ok(Vec::new());
    };
    if items.len() > EXPLODE_ELEMENTS_MAX {
        return Err(format!(
            "EXPLODE of an array of {} elements (at most {EXPLODE_ELEMENTS_MAX})",
            items.len()
        ));
    }
    Ok(items.into_iter().map(element_value).collect())
}

fn element_value(item: serde_json::Value) -> Value {
    match item {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Boolean(b),
        serde_json::Value::Number(n) => n
            .as_i64()
            .map_or_else(|| Value::Double(n.as_f64().unwrap_or(f64::NAN)), Value::Int),
        serde_json::Value::String(s) => Value::String(s),
        other => Value::Json(other.to_string()),
    }
}

/// `ops` split before the first that is not a filter or a projection.
fn split_stateless(ops: &[Operator]) -> (&[Operator], &[Operator]) {
    let split = ops
        .iter()
        .position(|op| !matches!(op, Operator::Filter(_) | Operator::Project(_)))
        .unwrap_or(ops.len());
    ops.split_at(split)
}

/// The operators of a stage that keeps no state.
fn stateless_ops(ops: &[Operator]) -> Result<Vec<Operator>, PlanError> {
    match ops
        .iter()
        .find(|op| !matches!(op, Operator::Filter(_) | Operator::Project(_)))
    {
        Some(op) => Err(invalid(&format!("{op:?} where a filter or projection was expected"))),
        None => Ok(ops.to_vec()),
    }
}

fn to_window(spec: Option<WindowSpec>) -> Window {
    let ms = |ms: i64| Duration::from_millis(ms.max(0) as u64);
    match spec {
        None => Window::tumbling(ms(ALL_TIME_MS)),
        Some(WindowSpec::Tumbling { size_ms, grace_ms }) => Window::tumbling(ms(size_ms)).grace(ms(grace_ms)),
        Some(WindowSpec::Hopping {
            size_ms,
            advance_ms,
            grace_ms,
        }) => Window::hopping(ms(size_ms), ms(advance_ms)).grace(ms(grace_ms)),
        Some(WindowSpec::Session { gap_ms, grace_ms }) => Window::session(ms(gap_ms)).grace(ms(grace_ms)),
    }
}

/// Runs a stage's operators over `row`, the `i`th join with `tables[i]`;
/// false when a filter or an inner join drops it.
pub(crate) fn run_ops(ops: &[Operator], tables: &[TableState], row: &mut Vec<Value>, scratch: &mut Vec<Value>) -> bool {
    let mut joined = 0;
    for op in ops {
        match op {
            Operator::Filter(condition) if !holds(condition, row) => return false,
            Operator::Project(columns) => {
                scratch.clear();
                scratch.extend(columns.iter().map(|(_, e)| eval(e, row)));
                std::mem::swap(row, scratch);
            }
            Operator::JoinTable(join) => {
                let found = tables[joined].lookup(&eval(&join.on, row));
                joined += 1;
                if !join_found(row, found, join) {
                    return false;
                }
            }
            Operator::JoinTableAsOf(join, as_of) => {
                // A NULL (or non-BIGINT) time finds no row, as a NULL key does.
                let found = match eval(&as_of.at, row) {
                    Value::Int(at_ms) => tables[joined].lookup_at(&eval(&join.on, row), at_ms),
                    _ => None,
                };
                joined += 1;
                if !join_found(row, found, join) {
                    return false;
                }
            }
            _ => {}
        }
    }
    true
}

/// The event time in `row`'s timestamp column.
fn time_in(row: &[Value], column: usize) -> Result<i64, String> {
    match &row[column] {
        Value::Int(t) => Ok(*t),
        other => Err(format!("timestamp column is {other}, not a BIGINT time in ms")),
    }
}

/// Appends a table's row found for `row` (NULLs for a left join's
/// miss); false when an inner join found none.
fn join_found(row: &mut Vec<Value>, found: Option<&[Value]>, join: &TableJoin) -> bool {
    match (found, join.kind) {
        (Some(found), _) => row.extend_from_slice(found),
        (None, JoinKind::Left | JoinKind::Outer) => row.resize(row.len() + join.columns.len(), Value::Null),
        (None, JoinKind::Inner) => return false,
    }
    true
}

/// Where a source stage's rows go.
enum Output {
    Sink(runnel_client::plan::Sink),
    /// Postcard key and carried values for the aggregate stage.
    Repartition {
        key: Vec<runnel_client::plan::Expr>,
        carry: Vec<runnel_client::plan::Expr>,
    },
}

struct SqlSource {
    columns: Vec<Column>,
    /// The table joins among `ops`.
    joins: usize,
    timestamp: Option<usize>,
    ops: Vec<Operator>,
    output: Output,
}

impl SourceStage for SqlSource {
    fn tables(&self) -> Vec<TableJoin> {
        self.ops
            .iter()
            .filter_map(|op| match op {
                Operator::JoinTable(join) | Operator::JoinTableAsOf(join, _) => Some(join.clone()),
                _ => None,
            })
            .collect()
    }

    fn grace_ms(&self) -> Option<i64> {
        self.ops
            .iter()
            .filter_map(|op| match op {
                Operator::JoinTableAsOf(_, as_of) => Some(as_of.grace_ms),
                _ => None,
            })
            .max()
            .filter(|&grace_ms| grace_ms > 0)
    }

    fn event_time(&self, value: Option<&[u8]>, timestamp_ms: i64) -> Result<i64, String> {
        let Some(column) = self.timestamp else {
            return Ok(timestamp_ms);
        };
        ROW.with_borrow_mut(|row| {
            decode_row(&self.columns, value.unwrap_or_default(), row)?;
            row.push(Value::Int(timestamp_ms));
            time_in(row, column)
        })
    }

    fn table_states(&self) -> Vec<TableState> {
        self.ops
            .iter()
            .filter_map(|op| match op {
                Operator::JoinTable(join) => Some(TableState::new(join.clone())),
                Operator::JoinTableAsOf(join, as_of) => Some(TableState::versioned(join.clone(), as_of)),
                _ => None,
            })
            .collect()
    }

    fn process_joined(
        &self,
        value: &[u8],
        timestamp_ms: i64,
        tables: &[TableState],
        out: &mut Emitted,
    ) -> Result<(), String> {
        assert_eq!(tables.len(), self.joins, "one table per join");
        // One row buffer per thread, reused: no allocation per record but
        // the values' own (strings).
        ROW.with_borrow_mut(|row| self.process_into(row, value, timestamp_ms, tables, out))
    }
}

thread_local! {
    static ROW: std::cell::RefCell<Vec<Value>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Expressions over a row, encoded as the sequence of their values without
/// cloning the columns they name (postcard: as a `Vec<Value>`).
struct Evaluated<'a> {
    exprs: &'a [runnel_client::plan::Expr],
    row: &'a [Value],
}

impl Serialize for Evaluated<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(Some(self.exprs.len()))?;
        for expr in self.exprs {
            match expr {
                runnel_client::plan::Expr::Column(i) => {
                    seq.serialize_element(self.row.get(*i).unwrap_or(&Value::Null))?
                }
                other => seq.serialize_element(&eval(other, self.row))?,
            }
        }
        seq.end()
    }
}

impl SqlSource {
    fn process_into(
        &self,
        row: &mut Vec<Value>,
        value: &[u8],
        timestamp_ms: i64,
        tables: &[TableState],
        out: &mut Emitted,
    ) -> Result<(), String> {
        decode_row(&self.columns, value, row)?;
        row.push(Value::Int(timestamp_ms));
        let t_ms = match self.timestamp {
            None => timestamp_ms,
            Some(column) => time_in(row, column)?,
        };
        let explode = self.ops.iter().position(|op| matches!(op, Operator::Explode(_)));
        let Some(at) = explode else {
            if !self.ops.is_empty() && !run_ops(&self.ops, tables, row, &mut Vec::new()) {
                return Ok(());
            }
            return self.output(out, row, t_ms);
        };
        let (before, after) = (&self.ops[..at], &self.ops[at + 1..]);
        if !run_ops(before, tables, row, &mut Vec::new()) {
            return Ok(());
        }
        let Operator::Explode(expr) = &self.ops[at] else {
            return Ok(());
        };
        // The tables joined after the EXPLODE are those not joined before it.
        let joined = before
            .iter()
            .filter(|op| matches!(op, Operator::JoinTable(_) | Operator::JoinTableAsOf(..)))
            .count();
        let elements = elements_of(&eval(expr, row))?;
        if elements.len().saturating_mul(value.len()) > EXPLODE_BYTES_MAX {
            return Err(format!(
                "EXPLODE of {} elements would copy a record of {} bytes past {EXPLODE_BYTES_MAX} bytes",
                elements.len(),
                value.len()
            ));
        }
        for element in elements {
            let mut exploded = row.clone();
            exploded.push(element);
            if run_ops(after, &tables[joined..], &mut exploded, &mut Vec::new()) {
                self.output(out, &exploded, t_ms)?;
            }
        }
        Ok(())
    }

    fn output(&self, out: &mut Emitted, row: &[Value], t_ms: i64) -> Result<(), String> {
        match &self.output {
            Output::Sink(sink) => emit_row(out, sink, row, t_ms, &[]),
            Output::Repartition { key, carry } => emit_repartitioned(out, key, carry, row, t_ms),
        }
    }
}

/// Emits `row` for the repartition topic: the postcard encodings of `key`
/// and of `carry` (no value when nothing is carried) over it.
pub(crate) fn emit_repartitioned(
    out: &mut Emitted,
    key: &[Expr],
    carry: &[Expr],
    row: &[Value],
    t_ms: i64,
) -> Result<(), String> {
    if !event_time_in_range(t_ms) {
        return Err(WindowError::EventTimeOutOfRange(t_ms).to_string());
    }
    let key = Evaluated { exprs: key, row };
    let key = out.encode(to_postcard(&key)).map_err(|e| e.to_string())?;
    let value = if carry.is_empty() {
        None
    } else {
        let carried = Evaluated { exprs: carry, row };
        Some(out.encode(to_postcard(&carried)).map_err(|e| e.to_string())?)
    };
    out.push(t_ms, Some(key), value);
    Ok(())
}

/// The key an aggregate stage groups by, encoded as its source stage
/// encodes it for the repartition topic: what a pull query looks a key's
/// rows up by (and routes by, with `partition_for_key`).
pub fn group_key(values: &[Value]) -> Result<Vec<u8>, String> {
    postcard::to_allocvec(values).map_err(|e| e.to_string())
}

fn to_postcard<T: Serialize>(value: &T) -> impl FnOnce(&mut Vec<u8>) -> Result<(), postcard::Error> + '_ {
    move |bytes| postcard::to_io(value, bytes).map(drop)
}

/// Writes `row` to the sink: a JSON object of its columns, keyed by the
/// JSON object of the key columns and `window` bounds (no key when neither).
pub(crate) fn emit_row(
    out: &mut Emitted,
    sink: &runnel_client::plan::Sink,
    row: &[Value],
    t_ms: i64,
    window: &[(&str, i64)],
) -> Result<(), String> {
    let key = if sink.key.is_empty() && window.is_empty() {
        None
    } else {
        let key = JsonRow {
            columns: &sink.columns,
            values: row,
            picked: Some(&sink.key),
            extra: window,
        };
        Some(
            out.encode(|b| serde_json::to_writer(b, &key))
                .map_err(|e| e.to_string())?,
        )
    };
    let value = JsonRow {
        columns: &sink.columns,
        values: row,
        picked: None,
        extra: &[],
    };
    let value = out
        .encode(|b| serde_json::to_writer(b, &value))
        .map_err(|e| e.to_string())?;
    out.push(t_ms, key, Some(value));
    Ok(())
}

/// Writes the deletion (a tombstone) of `row`'s key to the sink.
pub(crate) fn emit_deletion(
    out: &mut Emitted,
    sink: &runnel_client::plan::Sink,
    row: &[Value],
    t_ms: i64,
    window: &[(&str, i64)],
) -> Result<(), StageError> {
    let key = JsonRow {
        columns: &sink.columns,
        values: row,
        picked: Some(&sink.key),
        extra: window,
    };
    let key = out
        .encode(|b| serde_json::to_writer(b, &key))
        .map_err(|e| StageError::Unencodable(e.to_string()))?;
    out.push(t_ms, Some(key), None);
    Ok(())
}

/// One aggregate's running state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum Accumulator {
    Count(i64),
    Sum(Value),
    Min(Value),
    Max(Value),
    Avg {
        sum: f64,
        count: i64,
    },
    /// Distinct values, each as its postcard encoding.
    Distinct(BTreeSet<Vec<u8>>),
    /// A SUM over a table: NULL again once every value it added is taken
    /// back out.
    TableSum {
        sum: ExactSum,
        values: i64,
    },
    /// An AVG over a table.
    TableAvg {
        sum: ExactSum,
        values: i64,
    },
}

/// Distinct values one `COUNT_DISTINCT` keeps per key and window.
const DISTINCT_VALUES_MAX: usize = 100_000;

impl Accumulator {
    /// A state that values can also be taken out of (an aggregate over a
    /// table); only functions that [`AggregateFunction::subtracts`] take
    /// values out.
    pub(crate) fn subtracting(call: &AggregateCall) -> Accumulator {
        let (sum, values) = (ExactSum::default(), 0);
        match call.function {
            AggregateFunction::Sum => Accumulator::TableSum { sum, values },
            AggregateFunction::Avg => Accumulator::TableAvg { sum, values },
            _ => Accumulator::new(call),
        }
    }

    /// Folds one value in (`sign` 1) or takes one folded in before back
    /// out (−1), in a state made by [`Accumulator::subtracting`] (`None`
    /// for `COUNT(*)`).
    pub(crate) fn fold_signed(&mut self, value: Option<&Value>, sign: i64) {
        if let Some(Value::Null) = value {
            return;
        }
        match (self, value) {
            (Accumulator::Count(n), _) => *n += sign,
            (
                Accumulator::TableSum { sum, values } | Accumulator::TableAvg { sum, values },
                Some(v @ (Value::Int(_) | Value::Double(_))),
            ) => {
                sum.add(v, sign);
                *values += sign;
                if *values == 0 {
                    // Nothing left: no rounding either.
                    *sum = ExactSum::default();
                }
            }
            _ => {}
        }
    }

    fn new(call: &AggregateCall) -> Accumulator {
        match call.function {
            AggregateFunction::CountRows | AggregateFunction::Count => Accumulator::Count(0),
            AggregateFunction::Sum => Accumulator::Sum(Value::Null),
            AggregateFunction::Min => Accumulator::Min(Value::Null),
            AggregateFunction::Max => Accumulator::Max(Value::Null),
            AggregateFunction::Avg => Accumulator::Avg { sum: 0.0, count: 0 },
            AggregateFunction::CountDistinct => Accumulator::Distinct(BTreeSet::new()),
        }
    }

    /// Folds one value in (`None` for `COUNT(*)`).
    pub(crate) fn fold(&mut self, value: Option<&Value>) {
        if let Some(Value::Null) = value {
            return;
        }
        match (self, value) {
            (Accumulator::Count(n), _) => *n += 1,
            (Accumulator::Sum(sum), Some(v)) => *sum = add(sum, v),
            (Accumulator::Min(min), Some(v)) if min.is_null() || v.compare(min) == Some(Ordering::Less) => {
                *min = v.clone();
            }
            (Accumulator::Max(max), Some(v)) if max.is_null() || v.compare(max) == Some(Ordering::Greater) => {
                *max = v.clone();
            }
            (Accumulator::Avg { sum, count }, Some(Value::Int(i))) => (*sum, *count) = (*sum + *i as f64, *count + 1),
            (Accumulator::Avg { sum, count }, Some(Value::Double(d))) => (*sum, *count) = (*sum + d, *count + 1),
            (Accumulator::Distinct(seen), Some(v)) if seen.len() < DISTINCT_VALUES_MAX => {
                seen.insert(postcard::to_allocvec(v).unwrap_or_default());
            }
            _ => {}
        }
    }

    /// Combines two session windows' states.
    fn merge(&mut self, other: Accumulator) {
        match (self, other) {
            (Accumulator::Count(a), Accumulator::Count(b)) => *a += b,
            (Accumulator::Sum(a), Accumulator::Sum(b)) => *a = if b.is_null() { a.clone() } else { add(a, &b) },
            (a @ Accumulator::Min(_), Accumulator::Min(b)) => a.fold(Some(&b)),
            (a @ Accumulator::Max(_), Accumulator::Max(b)) => a.fold(Some(&b)),
            (Accumulator::Avg { sum, count }, Accumulator::Avg { sum: s, count: c }) => {
                (*sum, *count) = (*sum + s, *count + c)
            }
            (Accumulator::Distinct(a), Accumulator::Distinct(b)) => {
                a.extend(b);
                while a.len() > DISTINCT_VALUES_MAX {
                    a.pop_last();
                }
            }
            _ => {}
        }
    }

    pub(crate) fn result(&self) -> Value {
        match self {
            Accumulator::Count(n) => Value::Int(*n),
            Accumulator::Sum(v) | Accumulator::Min(v) | Accumulator::Max(v) => v.clone(),
            Accumulator::TableSum { values: 0, .. } | Accumulator::TableAvg { values: 0, .. } => Value::Null,
            Accumulator::TableSum { sum, .. } => sum.sum(),
            Accumulator::TableAvg { sum, values } => Value::Double(sum.double() / *values as f64),
            Accumulator::Avg { count: 0, .. } => Value::Null,
            Accumulator::Avg { sum, count } => Value::Double(sum / *count as f64),
            Accumulator::Distinct(seen) => Value::Int(seen.len() as i64),
        }
    }
}

fn add(sum: &Value, v: &Value) -> Value {
    match (sum, v) {
        (Value::Null, v) => v.clone(),
        (Value::Int(a), Value::Int(b)) => Value::Int(a.wrapping_add(*b)),
        (a, b) => match (a, b) {
            (Value::Int(x), Value::Double(y)) | (Value::Double(y), Value::Int(x)) => Value::Double(*x as f64 + y),
            (Value::Double(x), Value::Double(y)) => Value::Double(x + y),
            _ => a.clone(),
        },
    }
}

/// What every task of an aggregate stage shares.
pub(crate) struct AggregateStage {
    pub(crate) keys: usize,
    pub(crate) calls: Vec<AggregateCall>,
    windowed: bool,
    ops: Vec<Operator>,
    pub(crate) sink: runnel_client::plan::Sink,
}

impl AggregateStage {
    fn init(&self) -> Vec<Accumulator> {
        self.calls.iter().map(Accumulator::new).collect()
    }

    fn fold(&self, state: &mut [Accumulator], carried: &[Value]) {
        for (accumulator, call) in state.iter_mut().zip(&self.calls) {
            accumulator.fold(call.argument.map(|i| carried.get(i).unwrap_or(&Value::Null)));
        }
    }

    fn merge(state: &mut [Accumulator], other: Vec<Accumulator>) {
        for (a, b) in state.iter_mut().zip(other) {
            a.merge(b);
        }
    }

    /// The aggregate's row for one key and window, after its operators;
    /// `None` when a filter (`HAVING`) drops it.
    pub(crate) fn row(
        &self,
        key: &[u8],
        window: &WindowBounds,
        state: &[Accumulator],
    ) -> Result<Option<Vec<Value>>, StageError> {
        let mut row = self.unprojected(key, window, state)?;
        Ok(run_ops(&self.ops, &[], &mut row, &mut Vec::new()).then_some(row))
    }

    /// The key's row after the projections alone (HAVING not asked): what
    /// the key of its deletion is taken from.
    pub(crate) fn projected(&self, key: &[u8], state: &[Accumulator]) -> Result<Vec<Value>, StageError> {
        let window = WindowBounds { start_ms: 0, end_ms: 0 };
        let mut row = self.unprojected(key, &window, state)?;
        let projections: Vec<Operator> = self
            .ops
            .iter()
            .filter(|op| matches!(op, Operator::Project(_)))
            .cloned()
            .collect();
        run_ops(&projections, &[], &mut row, &mut Vec::new());
        Ok(row)
    }

    /// The key values, the aggregates' results and the window bounds.
    fn unprojected(&self, key: &[u8], window: &WindowBounds, state: &[Accumulator]) -> Result<Vec<Value>, StageError> {
        let mut row: Vec<Value> = postcard::from_bytes(key).map_err(|e| StageError::Corrupt(format!("key: {e}")))?;
        if row.len() != self.keys {
            return Err(StageError::Corrupt(format!(
                "{} key values, not {}",
                row.len(),
                self.keys
            )));
        }
        row.extend(state.iter().map(Accumulator::result));
        if self.windowed {
            row.push(Value::Int(window.start_ms));
            row.push(Value::Int(window.end_ms));
        }
        Ok(row)
    }
}

struct SqlWindowStage {
    operator: WindowOperator<EncodedKey, Vec<Accumulator>>,
    stage: Arc<AggregateStage>,
    /// Reused between calls.
    results: Vec<WindowResult<EncodedKey, Vec<Accumulator>>>,
    row: Vec<Value>,
}

impl SqlWindowStage {
    fn drain(&mut self, out: &mut Emitted) -> Result<(), StageError> {
        let mut results = std::mem::take(&mut self.results);
        let encoded = self.encode(&results, out);
        results.clear();
        self.results = results;
        encoded
    }

    /// Results as the sink's records (after `HAVING` and the projection).
    fn encode(
        &self,
        results: &[WindowResult<EncodedKey, Vec<Accumulator>>],
        out: &mut Emitted,
    ) -> Result<(), StageError> {
        for result in results {
            let (key, window, state, retract) = match result {
                WindowResult::Update { key, window, value } => (key, window, value, false),
                WindowResult::Retract { key, window, value } => (key, window, value, true),
            };
            let Some(row) = self.stage.row(key.as_bytes(), window, state)? else {
                continue;
            };
            let bounds = [("WINDOWSTART", window.start_ms), ("WINDOWEND", window.end_ms)];
            let bounds: &[(&str, i64)] = if self.stage.windowed { &bounds } else { &[] };
            if retract {
                emit_deletion(out, &self.stage.sink, &row, window.start_ms, bounds)?;
            } else {
                emit_row(out, &self.stage.sink, &row, window.start_ms, bounds).map_err(StageError::Unencodable)?;
            }
        }
        Ok(())
    }
}

impl WindowStage for SqlWindowStage {
    fn add(&mut self, key: &[u8], value: &[u8], t_ms: i64, out: &mut Emitted) -> Result<(), StageError> {
        let key = EncodedKey::new(key);
        self.row.clear();
        if !value.is_empty() {
            self.row = postcard::from_bytes(value).map_err(|e| StageError::Corrupt(format!("value: {e}")))?;
        }
        let keys = self.stage.keys;
        let admit = |key: &EncodedKey| match postcard::from_bytes::<Vec<Value>>(key.as_bytes()) {
            Ok(values) if values.len() == keys => Ok(()),
            Ok(values) => Err(format!("{} key values, not {keys}", values.len())),
            Err(e) => Err(e.to_string()),
        };
        let stage = &self.stage;
        let fold = |state: &mut Vec<Accumulator>, carried: &Vec<Value>| stage.fold(state, carried);
        let mut results = std::mem::take(&mut self.results);
        let outcome = self.operator.add(
            key,
            t_ms,
            &self.row,
            &|| stage.init(),
            &fold,
            &|state: &mut Vec<Accumulator>, other| AggregateStage::merge(state, other),
            &admit,
            &mut results,
        );
        self.results = results;
        self.drain(out)?;
        Ok(outcome?)
    }

    fn advance(&mut self, watermark_ms: i64, out: &mut Emitted) -> Result<(), StageError> {
        let mut results = std::mem::take(&mut self.results);
        self.operator.advance(watermark_ms, &|_, _, _| true, &mut results);
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
