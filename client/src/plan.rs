//! A dataflow as data: the logical plan a SQL statement compiles to, and
//! that the controller commits with the dataflow so that every node can
//! compile it into tasks without anything in its binary.
//!
//! A plan is a source (a topic and the schema of its JSON values), a
//! pipeline of [`Operator`]s and a sink. Each operator turns rows into rows;
//! a column reference ([`Expr::Column`]) is an index into the row the
//! operator before it produced (the source's columns, then `ROWTIME`).
//! [`Operator::Repartition`] is a stage boundary: the rows travel through
//! the dataflow's repartition topic keyed by its key, so that every key
//! meets in one task of the next stage.
//!
//! The plan travels inside a versioned metadata command and a versioned
//! client message; [`Plan::version`] lets a node refuse a plan of a later
//! format by name instead of misreading it ([`PLAN_FORMAT_VERSION`]). Tags
//! of every enum here are pinned by tests: variants are only ever added at
//! the end.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The plan format this build writes (and the newest it reads).
pub const PLAN_FORMAT_VERSION: u16 = 6;
/// Version 1, before [`Operator::Registered`], version 2, before
/// [`Operator::JoinTable`], version 3, before [`Operator::JoinStream`], and
/// version 4, before [`Operator::JoinTableAsOf`], and version 5, before
/// [`Operator::TableChanges`], read unchanged.
pub const PLAN_FORMAT_V1: u16 = 1;
/// Characters of a registered step's description at most.
pub const STEP_CHARS_MAX: usize = 256;
/// Operators in one plan.
pub const OPERATORS_MAX: usize = 64;
/// Nesting of one expression.
pub const EXPRESSION_DEPTH_MAX: usize = 64;
/// Columns of a schema or a projection.
pub const COLUMNS_MAX: usize = 256;
/// A stream–stream join's window and grace, each at most (a year, as a
/// window's duration in SQL).
pub const JOIN_WINDOW_MS_MAX: i64 = 365 * 86_400_000;
/// How far back an event-time table join looks up a table's past rows
/// ([`AsOf::history_ms`]) by default: a day.
pub const TABLE_HISTORY_MS_DEFAULT: i64 = 86_400_000;

/// A column type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SqlType {
    Boolean,
    /// 32-bit in ksqlDB; held as 64-bit, range-checked on cast.
    Int,
    BigInt,
    Double,
    String,
    /// Nested JSON (ksqlDB's `STRUCT`, `MAP`, `ARRAY`): fields are read with `->`.
    Json,
}

impl std::fmt::Display for SqlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SqlType::Boolean => "BOOLEAN",
            SqlType::Int => "INT",
            SqlType::BigInt => "BIGINT",
            SqlType::Double => "DOUBLE",
            SqlType::String => "STRING",
            SqlType::Json => "STRUCT",
        })
    }
}

/// A literal in a plan.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Literal {
    Null,
    Boolean(bool),
    Int(i64),
    Double(f64),
    String(String),
}

// Plans live in metadata, which is compared whole; doubles compare by bits.
impl PartialEq for Literal {
    fn eq(&self, other: &Literal) -> bool {
        match (self, other) {
            (Literal::Null, Literal::Null) => true,
            (Literal::Boolean(a), Literal::Boolean(b)) => a == b,
            (Literal::Int(a), Literal::Int(b)) => a == b,
            (Literal::Double(a), Literal::Double(b)) => a.to_bits() == b.to_bits(),
            (Literal::String(a), Literal::String(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Literal {}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnaryOp {
    Not,
    Negate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BinaryOp {
    Add,
    Subtract,
    Multiply,
    Divide,
    Modulo,
    Equal,
    NotEqual,
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
    And,
    Or,
    /// `||`
    Concat,
}

/// Scalar functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Function {
    Upper,
    Lower,
    Trim,
    Len,
    Substring,
    Concat,
    Abs,
    Round,
    Floor,
    Ceil,
    Coalesce,
    IfNull,
}

impl Function {
    /// The SQL name of each function, for the planner and for errors.
    pub const ALL: [(&'static str, Function); 13] = [
        ("UPPER", Function::Upper),
        ("UCASE", Function::Upper),
        ("LOWER", Function::Lower),
        ("TRIM", Function::Trim),
        ("LEN", Function::Len),
        ("SUBSTRING", Function::Substring),
        ("CONCAT", Function::Concat),
        ("ABS", Function::Abs),
        ("ROUND", Function::Round),
        ("FLOOR", Function::Floor),
        ("CEIL", Function::Ceil),
        ("COALESCE", Function::Coalesce),
        ("IFNULL", Function::IfNull),
    ];

    pub fn name(self) -> &'static str {
        Function::ALL
            .iter()
            .find(|(_, f)| *f == self)
            .map_or("?", |(name, _)| name)
    }
}

/// An expression over one row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expr {
    Column(usize),
    Literal(Literal),
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    IsNull {
        expr: Box<Expr>,
        negated: bool,
    },
    Like {
        expr: Box<Expr>,
        pattern: String,
        negated: bool,
    },
    /// `CASE WHEN c THEN v … ELSE e END` (a `CASE x WHEN …` is planned as
    /// comparisons with `x`).
    Case {
        branches: Vec<(Expr, Expr)>,
        otherwise: Option<Box<Expr>>,
    },
    Cast(Box<Expr>, SqlType),
    Call(Function, Vec<Expr>),
    /// `expr->name` on nested JSON.
    Field(Box<Expr>, String),
}

impl Expr {
    pub fn depth(&self) -> usize {
        1 + self.children().map(Expr::depth).max().unwrap_or(0)
    }

    fn children(&self) -> Box<dyn Iterator<Item = &Expr> + '_> {
        match self {
            Expr::Column(_) | Expr::Literal(_) => Box::new(std::iter::empty()),
            Expr::Unary(_, e) | Expr::Cast(e, _) | Expr::Field(e, _) => Box::new(std::iter::once(&**e)),
            Expr::IsNull { expr, .. } | Expr::Like { expr, .. } => Box::new(std::iter::once(&**expr)),
            Expr::Binary(_, a, b) => Box::new([&**a, &**b].into_iter()),
            Expr::Case { branches, otherwise } => {
                Box::new(branches.iter().flat_map(|(c, v)| [c, v]).chain(otherwise.as_deref()))
            }
            Expr::Call(_, args) => Box::new(args.iter()),
        }
    }
}

/// Aggregate functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AggregateFunction {
    /// `COUNT(*)`: rows.
    CountRows,
    /// `COUNT(x)`: rows where `x` is not null.
    Count,
    Sum,
    Min,
    Max,
    Avg,
    CountDistinct,
}

impl AggregateFunction {
    /// Whether the function can take a value back out, and so aggregate a
    /// table: COUNT, SUM and AVG can; MIN, MAX and COUNT_DISTINCT cannot.
    pub fn subtracts(self) -> bool {
        matches!(
            self,
            AggregateFunction::CountRows | AggregateFunction::Count | AggregateFunction::Sum | AggregateFunction::Avg
        )
    }
}

/// One aggregate call: a function of one carried column (none for `COUNT(*)`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AggregateCall {
    pub function: AggregateFunction,
    /// Index into the repartitioned row's carried values.
    pub argument: Option<usize>,
    /// The argument's type, which decides the result's (`SUM` of `INT` is `BIGINT`).
    pub argument_type: Option<SqlType>,
}

impl AggregateCall {
    /// The type the call yields.
    pub fn result_type(&self) -> SqlType {
        match (self.function, self.argument_type) {
            (AggregateFunction::CountRows | AggregateFunction::Count | AggregateFunction::CountDistinct, _) => {
                SqlType::BigInt
            }
            (AggregateFunction::Avg, _) => SqlType::Double,
            (AggregateFunction::Sum, Some(SqlType::Int)) => SqlType::BigInt,
            (_, Some(ty)) => ty,
            (_, None) => SqlType::BigInt,
        }
    }
}

/// A window, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WindowSpec {
    Tumbling {
        size_ms: i64,
        grace_ms: i64,
    },
    Hopping {
        size_ms: i64,
        advance_ms: i64,
        grace_ms: i64,
    },
    Session {
        gap_ms: i64,
        grace_ms: i64,
    },
}

/// When an aggregate's results leave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EmitMode {
    /// Every change, as it happens.
    Changes,
    /// Once per window, when it closes.
    Final,
}

/// A named output column.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    pub ty: SqlType,
}

/// One step of the pipeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    /// Keeps rows for which the condition is true.
    Filter(Expr),
    /// Computes a new row.
    Project(Vec<(Column, Expr)>),
    /// Re-keys rows and sends them through the repartition topic (a stage
    /// boundary). The next stage's rows are the key columns, then `carry`.
    Repartition { key: Vec<Expr>, carry: Vec<Expr> },
    /// Groups the repartitioned rows by their key, per window if any. Its
    /// rows are the key columns, one column per call, then `WINDOWSTART`
    /// and `WINDOWEND` when windowed.
    Aggregate {
        keys: u32,
        calls: Vec<AggregateCall>,
        window: Option<WindowSpec>,
        emit: EmitMode,
    },
    /// One step of a dataflow written with the Rust builders (format
    /// version 2 on): a closure compiled into the node binary, registered
    /// under `dataflow`, and described by `step`. A plan of such steps runs
    /// only on nodes whose binary registered `dataflow` with the same steps;
    /// it cannot be mixed with the operators above.
    Registered { dataflow: String, step: String },
    /// Joins each row with the row of a table whose key equals `on` (format
    /// version 3 on). The rows that follow are the row, then the table's
    /// columns (NULLs for a left join without a match).
    JoinTable(TableJoin),
    /// Joins the rows with those of another stream within a time window
    /// (format version 4 on): a stage boundary, as both sides travel
    /// through the repartition topic keyed by their side of the join
    /// condition. The rows that follow are the row, then the other
    /// stream's row (NULLs for an unmatched row of a left or outer join).
    JoinStream(StreamJoin),
    /// Joins two tables on their primary keys (format version 4 on): the
    /// plan's source is the left table, read as a table (the record key is
    /// the primary key, a null value deletes). A stage boundary like
    /// [`Operator::JoinStream`]; the join stage holds both tables' latest
    /// rows and emits the joined row's upserts and deletions. The rows that
    /// follow are the left row, then the right row.
    JoinTables(TablesJoin),
    /// A flat-map (format version 4 on; ksqlDB's `EXPLODE`): one row per
    /// element of the JSON array the expression yields, the element
    /// appended to the row (none for NULL, an empty array or a non-array).
    Explode(Expr),
    /// [`Operator::JoinTable`] by event time (format version 5 on; SQL's
    /// `FOR SYSTEM_TIME AS OF`): each row joins the table's row as it was
    /// at the row's time, not its latest row.
    JoinTableAsOf(TableJoin, AsOf),
    /// Reads the plan's source as a table (format version 6 on): a null
    /// value deletes the record key's row. With `key`, the record key is
    /// that primary key column's value as text (a declared table); without,
    /// the record key as it is names the row and the value holds every
    /// column (a table a query writes, keyed by a JSON object). A stage boundary: the rows travel by primary key to a
    /// stage holding each key's latest row, and each change goes on as the
    /// old row taken back out and the new row added. Only first, and only
    /// before an aggregate's operators (a `WHERE`, the repartition by the
    /// `GROUP BY` key, the aggregate), which then subtracts what is taken
    /// out: Kafka Streams' `KGroupedTable.aggregate(adder, subtractor)`.
    TableChanges { key: Option<usize> },
}

/// When an event-time table join looks a key up, and how the table keeps
/// its past: Kafka Streams' versioned table (KIP-914). Each key keeps its
/// rows (and deletions) of the last `history_ms` of table time, plus the
/// one in force before them; a row is looked up as of `at`, evaluated
/// over the stream's row (ms since the epoch). A lookup older than the
/// history (before the table's newest time less `history_ms`) finds
/// nothing, as does one before the key's first row; a table record older
/// than the history is dropped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsOf {
    pub at: Expr,
    /// The table's column holding its rows' times (BIGINT ms), if not the
    /// records' timestamps.
    pub table_time: Option<usize>,
    pub history_ms: i64,
    /// How long the stream's rows wait, in stream time, before they are
    /// joined (Kafka Streams' stream–table join grace, KIP-923): a table
    /// row dated before a stream row but read after it is still joined if
    /// it comes within the grace. 0 joins each row when it is read.
    pub grace_ms: i64,
}

/// A table–table join on both primary keys, as ksqlDB's: inner, left or
/// outer, its result a table keyed by the key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TablesJoin {
    /// The left table (the plan's source) and its primary key column.
    pub left_table: String,
    pub left_key: usize,
    /// The right table, its topic and schema, and its primary key column.
    pub right_table: String,
    pub source: Source,
    pub right_key: usize,
    pub kind: JoinKind,
}

/// A stream–stream join, as Kafka Streams' `KStream#join` with a
/// `JoinWindows`: a record of one side joins each record of the other side
/// with the same key whose time is at most `before_ms` earlier and
/// `after_ms` later (from the left side's view), and a left (or outer)
/// join's unmatched record leaves with NULLs once its window has closed
/// (past `grace_ms`). The right side has its own source stage: a plan with
/// one runs a stage per source, then the join stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamJoin {
    /// The right stream's name, for errors and `EXPLAIN`.
    pub stream: String,
    pub source: Source,
    /// The left side of the condition, over the row before the join.
    pub left_key: Expr,
    /// The right side, over the right stream's row (its columns, then ROWTIME).
    pub right_key: Expr,
    pub before_ms: i64,
    pub after_ms: i64,
    pub grace_ms: i64,
    pub kind: JoinKind,
}

/// A stream–table join: every task reading the stream holds the whole
/// table, read from its topic (Kafka Streams' global table), so neither
/// side needs to be partitioned by the join key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableJoin {
    /// The table's name, for errors and `EXPLAIN`.
    pub table: String,
    pub topic: String,
    /// The topic's partitions when the query was planned: those are read.
    pub partitions: u32,
    /// The JSON fields of each value.
    pub columns: Vec<Column>,
    /// The primary key column: its value is the record key, as text.
    pub key: usize,
    /// The stream's side of the join condition, compared with the key.
    pub on: Expr,
    pub kind: JoinKind,
}

/// Which rows a join keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinKind {
    /// Rows with a match.
    Inner,
    /// Every row, with NULLs where nothing matches.
    Left,
    /// Every row of either side (stream–stream joins only).
    Outer,
}

/// Where a plan reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub topic: String,
    /// The JSON fields of each value; `ROWTIME` (the record's timestamp)
    /// follows them in every row.
    pub columns: Vec<Column>,
    /// The column holding event time (ms since the epoch), else the
    /// record's timestamp.
    pub timestamp: Option<usize>,
}

/// Where a plan writes: JSON objects of the last operator's columns, keyed
/// by the JSON object of `key` columns (with the window bounds, for a
/// windowed aggregate).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sink {
    pub topic: String,
    pub columns: Vec<Column>,
    pub key: Vec<usize>,
}

/// A dataflow as data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub version: u16,
    /// The statement it was planned from.
    pub statement: String,
    pub source: Source,
    pub operators: Vec<Operator>,
    pub sink: Sink,
}

/// Why a plan cannot run on this node.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "plan format version {0} is unknown to this node (it reads version {PLAN_FORMAT_VERSION}); upgrade this node"
    )]
    UnknownVersion(u16),
    #[error("invalid plan: {0}")]
    Invalid(String),
    #[error("dataflow {dataflow:?} runs Rust code compiled into the node binary, and this node's binary does not register it (it registers: {known}); run the same runnel build on every node")]
    Unregistered { dataflow: String, known: String },
    #[error("dataflow {dataflow:?} was planned by a node whose binary has other steps than this one's ({differs}); run the same runnel build on every node")]
    RegisteredDiffers { dataflow: String, differs: String },
}

impl Plan {
    /// Stages, and so tasks per source partition: one per source (the
    /// plan's and each stream join's), then one per repartition or stream
    /// join.
    pub fn stages(&self) -> u32 {
        let boundaries = self
            .operators
            .iter()
            .filter(|op| {
                matches!(
                    op,
                    Operator::Repartition { .. }
                        | Operator::JoinStream(_)
                        | Operator::JoinTables(_)
                        | Operator::TableChanges { .. }
                )
            })
            .count();
        (self.sources().count() + boundaries) as u32
    }

    /// The sources, in stage order: the plan's, then each stream join's
    /// and table–table join's.
    pub fn sources(&self) -> impl Iterator<Item = &Source> {
        let joined = self.operators.iter().filter_map(|op| match op {
            Operator::JoinStream(join) => Some(&join.source),
            Operator::JoinTables(join) => Some(&join.source),
            _ => None,
        });
        std::iter::once(&self.source).chain(joined)
    }

    /// The table–table join, if the plan is one.
    pub fn tables_join(&self) -> Option<&TablesJoin> {
        self.operators.iter().find_map(|op| match op {
            Operator::JoinTables(join) => Some(join),
            _ => None,
        })
    }

    /// The stream–stream joins, in order.
    pub fn stream_joins(&self) -> impl Iterator<Item = &StreamJoin> {
        self.operators.iter().filter_map(|op| match op {
            Operator::JoinStream(join) => Some(join),
            _ => None,
        })
    }

    /// Whether the plan reads `topic`: a source, or a table it joins with
    /// (which must then keep its partitions, and not be deleted, while the
    /// query runs).
    pub fn reads(&self, topic: &str) -> bool {
        self.sources().any(|s| s.topic == topic) || self.joins().any(|join| join.topic == topic)
    }

    /// Checks the limits; the dataflow runtime checks the shape it can run.
    pub fn validate(&self) -> Result<(), PlanError> {
        if !(PLAN_FORMAT_V1..=PLAN_FORMAT_VERSION).contains(&self.version) {
            return Err(PlanError::UnknownVersion(self.version));
        }
        let invalid = |why: String| Err(PlanError::Invalid(why));
        self.validate_registered()?;
        if self.operators.len() > OPERATORS_MAX {
            return invalid(format!("{} operators (at most {OPERATORS_MAX})", self.operators.len()));
        }
        if self.source.columns.len() > COLUMNS_MAX || self.sink.columns.len() > COLUMNS_MAX {
            return invalid(format!("more than {COLUMNS_MAX} columns"));
        }
        self.validate_stream_joins()?;
        self.validate_as_of()?;
        self.validate_table_changes()?;
        for join in self.joins() {
            if join.kind == JoinKind::Outer {
                return invalid(format!(
                    "an outer join with the table {} (a stream–table join is inner or left)",
                    join.table
                ));
            }
            if join.columns.len() > COLUMNS_MAX || join.key >= join.columns.len() || join.partitions == 0 {
                return invalid(format!(
                    "the join with {} names {} columns, key column {} and {} partitions",
                    join.table,
                    join.columns.len(),
                    join.key,
                    join.partitions
                ));
            }
        }
        for expr in self.expressions() {
            if expr.depth() > EXPRESSION_DEPTH_MAX {
                return invalid(format!("an expression nests deeper than {EXPRESSION_DEPTH_MAX}"));
            }
        }
        Ok(())
    }

    /// A table's changes are read first (once), by a primary key the
    /// source has, and aggregated without a window by functions that can
    /// take a value back out.
    fn validate_table_changes(&self) -> Result<(), PlanError> {
        let changes = |op: &Operator| matches!(op, Operator::TableChanges { .. });
        if !self.operators.iter().any(changes) {
            return Ok(());
        }
        let invalid = |why: String| Err(PlanError::Invalid(format!("a table's changes {why}")));
        match self.operators.first() {
            Some(Operator::TableChanges { key: Some(key) }) if *key >= self.source.columns.len() => {
                return invalid(format!("by column {key} of {}", self.source.columns.len()));
            }
            Some(Operator::TableChanges { .. }) => {}
            _ => return invalid("read after another operator".to_string()),
        }
        if self.operators.iter().filter(|op| changes(op)).count() > 1 {
            return invalid("read twice".to_string());
        }
        let aggregates: Vec<(&Vec<AggregateCall>, &Option<WindowSpec>)> = self
            .operators
            .iter()
            .filter_map(|op| match op {
                Operator::Aggregate { calls, window, .. } => Some((calls, window)),
                _ => None,
            })
            .collect();
        match aggregates[..] {
            [(calls, None)] if calls.iter().all(|call| call.function.subtracts()) => Ok(()),
            [(calls, None)] => invalid(format!(
                "aggregated by {calls:?}, which cannot all take a value back out"
            )),
            _ => invalid("not aggregated once without a window".to_string()),
        }
    }

    fn validate_as_of(&self) -> Result<(), PlanError> {
        for op in &self.operators {
            let Operator::JoinTableAsOf(join, as_of) = op else {
                continue;
            };
            let time_fits = as_of.table_time.is_none_or(|i| i < join.columns.len());
            let spans_fit = [as_of.history_ms, as_of.grace_ms]
                .iter()
                .all(|ms| (0..=JOIN_WINDOW_MS_MAX).contains(ms));
            if !spans_fit || !time_fits {
                return Err(PlanError::Invalid(format!(
                    "the join with {} keeps {} ms of history and {} ms of grace (each within 0..={JOIN_WINDOW_MS_MAX}) with time column {:?} of {} columns",
                    join.table,
                    as_of.history_ms,
                    as_of.grace_ms,
                    as_of.table_time,
                    join.columns.len()
                )));
            }
        }
        Ok(())
    }

    fn validate_stream_joins(&self) -> Result<(), PlanError> {
        for join in self.stream_joins() {
            let spans = [join.before_ms, join.after_ms, join.grace_ms];
            if spans.iter().any(|ms| !(0..=JOIN_WINDOW_MS_MAX).contains(ms)) {
                return Err(PlanError::Invalid(format!(
                    "the join with {} spans {spans:?} ms (each of before, after and grace within 0..={JOIN_WINDOW_MS_MAX})",
                    join.stream
                )));
            }
            if join.source.columns.len() > COLUMNS_MAX {
                return Err(PlanError::Invalid(format!(
                    "{} has more than {COLUMNS_MAX} columns",
                    join.stream
                )));
            }
        }
        if let Some(join) = self.tables_join() {
            let fits = join.left_key < self.source.columns.len()
                && join.right_key < join.source.columns.len()
                && join.source.columns.len() <= COLUMNS_MAX;
            if !fits {
                return Err(PlanError::Invalid(format!(
                    "the join of {} and {} names key columns {} and {} of {} and {} columns",
                    join.left_table,
                    join.right_table,
                    join.left_key,
                    join.right_key,
                    self.source.columns.len(),
                    join.source.columns.len()
                )));
            }
        }
        Ok(())
    }

    /// The tables its operators join with, in order.
    pub fn joins(&self) -> impl Iterator<Item = &TableJoin> {
        self.operators.iter().filter_map(|op| match op {
            Operator::JoinTable(join) | Operator::JoinTableAsOf(join, _) => Some(join),
            _ => None,
        })
    }

    /// The Rust dataflow whose registered steps this plan runs, if any.
    pub fn registered(&self) -> Option<&str> {
        self.operators.iter().find_map(|op| match op {
            Operator::Registered { dataflow, .. } => Some(dataflow.as_str()),
            _ => None,
        })
    }

    /// A registered plan holds steps of one dataflow, and repartitions
    /// between them, and nothing else.
    fn validate_registered(&self) -> Result<(), PlanError> {
        let Some(name) = self.registered() else { return Ok(()) };
        for op in &self.operators {
            match op {
                Operator::Registered { dataflow, step } if dataflow == name => {
                    if step.chars().count() > STEP_CHARS_MAX {
                        return Err(PlanError::Invalid(format!(
                            "a step of {name:?} is described in more than {STEP_CHARS_MAX} characters"
                        )));
                    }
                }
                Operator::Registered { dataflow, .. } => {
                    return Err(PlanError::Invalid(format!(
                        "steps of two Rust dataflows, {name:?} and {dataflow:?}, in one plan"
                    )))
                }
                Operator::Repartition { key, carry } if key.is_empty() && carry.is_empty() => {}
                other => {
                    return Err(PlanError::Invalid(format!(
                        "the Rust dataflow {name:?} mixed with a SQL operator ({other:?})"
                    )))
                }
            }
        }
        Ok(())
    }

    fn expressions(&self) -> impl Iterator<Item = &Expr> {
        self.operators.iter().flat_map(|op| -> Box<dyn Iterator<Item = &Expr>> {
            match op {
                Operator::Filter(e) => Box::new(std::iter::once(e)),
                Operator::Project(columns) => Box::new(columns.iter().map(|(_, e)| e)),
                Operator::Repartition { key, carry } => Box::new(key.iter().chain(carry)),
                Operator::JoinTable(join) => Box::new(std::iter::once(&join.on)),
                Operator::JoinTableAsOf(join, as_of) => Box::new([&join.on, &as_of.at].into_iter()),
                Operator::JoinStream(join) => Box::new([&join.left_key, &join.right_key].into_iter()),
                Operator::JoinTables(_) | Operator::TableChanges { .. } => Box::new(std::iter::empty()),
                Operator::Explode(e) => Box::new(std::iter::once(e)),
                Operator::Aggregate { .. } | Operator::Registered { .. } => Box::new(std::iter::empty()),
            }
        })
    }

    /// The plan as a tree, sink first (like ksqlDB's `EXPLAIN`), with
    /// expressions written over the names of the row they read.
    pub fn explain(&self, name: &str) -> String {
        let mut names: Vec<String> = self.source.columns.iter().map(|c| c.name.clone()).collect();
        names.push("ROWTIME".to_string());
        let mut lines = vec![match self.registered() {
            Some(dataflow) => format!(
                "SOURCE {} (decoded by the Rust dataflow {dataflow}, registered in the node binary)",
                self.source.topic
            ),
            None => format!(
                "SOURCE {} ({}, ROWTIME)",
                self.source.topic,
                column_list(&self.source.columns)
            ),
        }];
        let mut stage = 0;
        for op in &self.operators {
            lines.push(explain_op(op, name, &mut names, &mut stage));
        }
        lines.push(match self.registered() {
            Some(_) => format!("SINK {} (JSON from the Rust dataflow)", self.sink.topic),
            None => format!("SINK {} ({})", self.sink.topic, column_list(&self.sink.columns)),
        });
        let mut text = format!("{name}: {} stage(s)\n", self.stages());
        for (depth, line) in lines.iter().rev().enumerate() {
            let _ = writeln!(text, "{}{}", "  ".repeat(depth), line);
        }
        text
    }
}

/// One operator's line of [`Plan::explain`]; `names` (the row's column
/// names) and `stage` move on past it.
fn explain_op(op: &Operator, name: &str, names: &mut Vec<String>, stage: &mut u32) -> String {
    match op {
        Operator::Filter(e) => format!("FILTER {}", render(e, names)),
        Operator::Project(columns) => {
            let shown: Vec<String> = columns
                .iter()
                .map(|(c, e)| format!("{} AS {}", render(e, names), c.name))
                .collect();
            *names = columns.iter().map(|(c, _)| c.name.clone()).collect();
            format!("PROJECT {}", shown.join(", "))
        }
        Operator::Repartition { key, .. } if key.is_empty() => {
            *stage += 1;
            format!("REPARTITION BY the key above through {name}.repartition: stage {stage} starts")
        }
        Operator::Repartition { key, carry } => {
            *stage += 1;
            let keys: Vec<String> = key.iter().map(|e| render(e, names)).collect();
            let carried: Vec<String> = carry.iter().map(|e| render(e, names)).collect();
            *names = keys.iter().chain(&carried).cloned().collect();
            format!(
                "REPARTITION BY {} (carrying [{}]) through {name}.repartition: stage {stage} starts",
                keys.join(", "),
                carried.join(", ")
            )
        }
        Operator::Aggregate {
            keys,
            calls,
            window,
            emit,
        } => explain_aggregate(*keys as usize, calls, *window, *emit, names),
        Operator::Registered { step, .. } => format!("RUST {step}"),
        Operator::JoinTable(join) => explain_table_join(join, names),
        Operator::JoinTableAsOf(join, as_of) => {
            let at = render(&as_of.at, names);
            let time = as_of
                .table_time
                .and_then(|i| join.columns.get(i))
                .map_or("its records' timestamps".to_string(), |c| {
                    format!("{}.{}", join.table, c.name)
                });
            format!(
                "{} AS OF {at} (the table's rows by {time}, {} ms of history kept, {} ms of grace)",
                explain_table_join(join, names),
                as_of.history_ms,
                as_of.grace_ms
            )
        }
        Operator::JoinStream(join) => explain_stream_join(join, name, names, stage),
        Operator::Explode(e) => {
            let shown = format!("EXPLODE {} (a row per element, appended)", render(e, names));
            names.push(format!("EXPLODE({})", render(e, names)));
            shown
        }
        Operator::TableChanges { key } => {
            *stage += 1;
            let key = match key {
                Some(key) => format!("the primary key {}", names.get(*key).map_or("?", String::as_str)),
                None => "the record key".to_string(),
            };
            format!(
                "TABLE CHANGES by {key} through {name}.repartition: stage {stage} starts, holding each key's latest row; each change goes on as the old row taken out and the new row added (or as one replacement within a group)"
            )
        }
        Operator::JoinTables(join) => explain_tables_join(join, name, names, stage),
    }
}

/// [`explain_op`] of an aggregate over `keys` key values and the values
/// carried after them.
fn explain_aggregate(
    keys: usize,
    calls: &[AggregateCall],
    window: Option<WindowSpec>,
    emit: EmitMode,
    names: &mut Vec<String>,
) -> String {
    let carried = names.split_off(keys.min(names.len()));
    let mut shown = Vec::new();
    for (i, call) in calls.iter().enumerate() {
        let argument = call.argument.and_then(|a| carried.get(a)).map_or("*", String::as_str);
        shown.push(format!("{:?}({argument}) AS KSQL_AGG_{i}", call.function));
        names.push(format!("KSQL_AGG_{i}"));
    }
    if window.is_some() {
        names.extend(["WINDOWSTART".to_string(), "WINDOWEND".to_string()]);
    }
    let window = window.map_or("none".to_string(), |w| format!("{w:?}"));
    format!("AGGREGATE {} per key, window {window}, emit {emit:?}", shown.join(", "))
}

/// [`explain_op`] of a table–table join: the right table's source stage
/// and the join stage.
fn explain_tables_join(join: &TablesJoin, name: &str, names: &mut Vec<String>, stage: &mut u32) -> String {
    let right: Vec<String> = join
        .source
        .columns
        .iter()
        .map(|c| format!("{}.{}", join.right_table, c.name))
        .collect();
    let on = format!(
        "{} = {}",
        names.get(join.left_key).map_or("?", String::as_str),
        right.get(join.right_key).map_or("?", String::as_str)
    );
    names.extend(right);
    names.push(format!("{}.ROWTIME", join.right_table));
    *stage += 2;
    format!(
        "{:?} JOIN TABLE {} ({}, ROWTIME) from {} (stage {}) ON {on}, both tables by key through {name}.repartition: stage {stage} starts, holding both tables' latest rows",
        join.kind,
        join.right_table,
        column_list(&join.source.columns),
        join.source.topic,
        *stage - 1,
    )
}

/// [`explain_op`] of a stream–table join: the table, read whole by every task.
fn explain_table_join(join: &TableJoin, names: &mut Vec<String>) -> String {
    let on = render(&join.on, names);
    names.extend(join.columns.iter().map(|c| format!("{}.{}", join.table, c.name)));
    format!(
        "{:?} JOIN TABLE {} ({}) read whole by every task from {} ({} partitions) ON {on} = {}.{}",
        join.kind,
        join.table,
        column_list(&join.columns),
        join.topic,
        join.partitions,
        join.table,
        join.columns.get(join.key).map_or("?", |c| c.name.as_str())
    )
}

fn explain_stream_join(join: &StreamJoin, name: &str, names: &mut Vec<String>, stage: &mut u32) -> String {
    let mut right: Vec<String> = join
        .source
        .columns
        .iter()
        .map(|c| format!("{}.{}", join.stream, c.name))
        .collect();
    right.push(format!("{}.ROWTIME", join.stream));
    let (left_key, right_key) = (render(&join.left_key, names), render(&join.right_key, &right));
    // The right source's stage comes before the join's.
    *stage += 2;
    names.extend(right);
    format!(
        "{:?} JOIN STREAM {} ({}, ROWTIME) from {} (stage {}) WITHIN {} ms before, {} ms after, GRACE {} ms ON {left_key} = {right_key}, both sides through {name}.repartition: stage {stage} starts",
        join.kind,
        join.stream,
        column_list(&join.source.columns),
        join.source.topic,
        *stage - 1,
        join.before_ms,
        join.after_ms,
        join.grace_ms,
    )
}

/// An expression as SQL, over the names of the row it reads.
pub fn render(expr: &Expr, names: &[String]) -> String {
    let r = |e: &Expr| render(e, names);
    match expr {
        Expr::Column(i) => names.get(*i).cloned().unwrap_or_else(|| format!("${i}")),
        Expr::Literal(Literal::Null) => "NULL".to_string(),
        Expr::Literal(Literal::Boolean(b)) => b.to_string().to_uppercase(),
        Expr::Literal(Literal::Int(i)) => i.to_string(),
        Expr::Literal(Literal::Double(d)) => format!("{d:?}"),
        Expr::Literal(Literal::String(s)) => format!("'{}'", s.replace('\'', "''")),
        Expr::Unary(UnaryOp::Not, e) => format!("(NOT {})", r(e)),
        Expr::Unary(UnaryOp::Negate, e) => format!("(-{})", r(e)),
        Expr::Binary(op, a, b) => format!("({} {} {})", r(a), binary_symbol(*op), r(b)),
        Expr::IsNull { expr, negated } => format!("({} IS {}NULL)", r(expr), if *negated { "NOT " } else { "" }),
        Expr::Like { expr, pattern, negated } => {
            format!("({} {}LIKE '{pattern}')", r(expr), if *negated { "NOT " } else { "" })
        }
        Expr::Case { branches, otherwise } => {
            let mut text = "CASE".to_string();
            for (condition, value) in branches {
                let _ = write!(text, " WHEN {} THEN {}", r(condition), r(value));
            }
            if let Some(e) = otherwise {
                let _ = write!(text, " ELSE {}", r(e));
            }
            text + " END"
        }
        Expr::Cast(e, ty) => format!("CAST({} AS {ty})", r(e)),
        Expr::Call(f, args) => format!("{}({})", f.name(), args.iter().map(r).collect::<Vec<_>>().join(", ")),
        Expr::Field(e, name) => format!("{}->{name}", r(e)),
    }
}

fn binary_symbol(op: BinaryOp) -> &'static str {
    match op {
        BinaryOp::Add => "+",
        BinaryOp::Subtract => "-",
        BinaryOp::Multiply => "*",
        BinaryOp::Divide => "/",
        BinaryOp::Modulo => "%",
        BinaryOp::Equal => "=",
        BinaryOp::NotEqual => "<>",
        BinaryOp::Less => "<",
        BinaryOp::LessOrEqual => "<=",
        BinaryOp::Greater => ">",
        BinaryOp::GreaterOrEqual => ">=",
        BinaryOp::And => "AND",
        BinaryOp::Or => "OR",
        BinaryOp::Concat => "||",
    }
}

fn column_list(columns: &[Column]) -> String {
    columns
        .iter()
        .map(|c| format!("{} {}", c.name, c.ty))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A stream or a table of the SQL catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectKind {
    Stream,
    Table,
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ObjectKind::Stream => "STREAM",
            ObjectKind::Table => "TABLE",
        })
    }
}

/// A named stream or table: a schema over a topic, committed to the
/// controller's metadata by `CREATE STREAM` / `CREATE TABLE`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SqlObject {
    /// Upper case unless it was quoted (ksqlDB's rule).
    pub name: String,
    pub kind: ObjectKind,
    pub topic: String,
    pub columns: Vec<Column>,
    /// The column holding event time, else the record's timestamp.
    pub timestamp: Option<usize>,
    /// The columns its records are keyed by (a query's GROUP BY or PARTITION BY).
    pub key: Vec<usize>,
    /// Its records' keys carry window bounds.
    pub windowed: bool,
    /// The persistent query writing it, if a query made it.
    pub query: Option<String>,
    /// The statement that made it.
    pub statement: String,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn tag<T: Serialize>(value: &T) -> u8 {
        postcard::to_allocvec(value).expect("encodes")[0]
    }

    fn assert_tags<T: Serialize + std::fmt::Debug>(values: &[T]) {
        for (expected, value) in values.iter().enumerate() {
            assert_eq!(usize::from(tag(value)), expected, "tag of {value:?}");
        }
    }

    /// The seed's query as a plan.
    pub(crate) fn sample_plan() -> Plan {
        let column = |name: &str, ty| Column { name: name.into(), ty };
        Plan {
            version: PLAN_FORMAT_VERSION,
            statement: "CREATE STREAM …".into(),
            source: Source {
                topic: "authorization_attempts".into(),
                columns: vec![column("CARD_NUMBER", SqlType::String)],
                timestamp: None,
            },
            operators: vec![
                Operator::Repartition {
                    key: vec![Expr::Column(0)],
                    carry: Vec::new(),
                },
                Operator::Aggregate {
                    keys: 1,
                    calls: vec![AggregateCall {
                        function: AggregateFunction::CountRows,
                        argument: None,
                        argument_type: None,
                    }],
                    window: Some(WindowSpec::Tumbling {
                        size_ms: 300_000,
                        grace_ms: 0,
                    }),
                    emit: EmitMode::Changes,
                },
                Operator::Filter(Expr::Binary(
                    BinaryOp::Greater,
                    Box::new(Expr::Column(1)),
                    Box::new(Expr::Literal(Literal::Int(3))),
                )),
                Operator::Project(vec![
                    (column("CARD_NUMBER", SqlType::String), Expr::Column(0)),
                    (column("KSQL_COL_0", SqlType::BigInt), Expr::Column(1)),
                ]),
            ],
            sink: Sink {
                topic: "POSSIBLE_FRAUD".into(),
                columns: vec![
                    column("CARD_NUMBER", SqlType::String),
                    column("KSQL_COL_0", SqlType::BigInt),
                ],
                key: vec![0],
            },
        }
    }

    pub(crate) fn sample_object() -> SqlObject {
        SqlObject {
            name: "S".into(),
            kind: ObjectKind::Stream,
            topic: "s".into(),
            columns: Vec::new(),
            timestamp: None,
            key: Vec::new(),
            windowed: false,
            query: None,
            statement: String::new(),
        }
    }

    /// Plans live in the controller log: a reordered variant would make
    /// every node read old plans as other ones.
    #[test]
    fn plan_tags_are_pinned() {
        use SqlType::*;
        assert_tags(&[Boolean, Int, BigInt, Double, String, Json]);
        let literals = [
            Literal::Null,
            Literal::Boolean(true),
            Literal::Int(1),
            Literal::Double(1.0),
            Literal::String("s".into()),
        ];
        assert_tags(&literals);
        assert_tags(&[UnaryOp::Not, UnaryOp::Negate]);
        let ops = [
            BinaryOp::Add,
            BinaryOp::Subtract,
            BinaryOp::Multiply,
            BinaryOp::Divide,
            BinaryOp::Modulo,
            BinaryOp::Equal,
            BinaryOp::NotEqual,
            BinaryOp::Less,
            BinaryOp::LessOrEqual,
            BinaryOp::Greater,
            BinaryOp::GreaterOrEqual,
            BinaryOp::And,
            BinaryOp::Or,
            BinaryOp::Concat,
        ];
        assert_tags(&ops);
        let functions: Vec<Function> = Function::ALL
            .iter()
            .map(|(_, f)| *f)
            .filter(|f| *f != Function::Upper)
            .collect();
        assert_eq!(tag(&Function::Upper), 0);
        for (i, f) in functions.iter().enumerate() {
            assert_eq!(usize::from(tag(f)), i + 1, "{f:?}");
        }
        let c = || Box::new(Expr::Column(0));
        let exprs = [
            Expr::Column(0),
            Expr::Literal(Literal::Null),
            Expr::Unary(UnaryOp::Not, c()),
            Expr::Binary(BinaryOp::Add, c(), c()),
            Expr::IsNull {
                expr: c(),
                negated: false,
            },
            Expr::Like {
                expr: c(),
                pattern: "%".into(),
                negated: false,
            },
            Expr::Case {
                branches: Vec::new(),
                otherwise: None,
            },
            Expr::Cast(c(), SqlType::Int),
            Expr::Call(Function::Abs, Vec::new()),
            Expr::Field(c(), "f".into()),
        ];
        assert_tags(&exprs);
        use AggregateFunction as A;
        assert_tags(&[A::CountRows, A::Count, A::Sum, A::Min, A::Max, A::Avg, A::CountDistinct]);
        let windows = [
            WindowSpec::Tumbling {
                size_ms: 1,
                grace_ms: 0,
            },
            WindowSpec::Hopping {
                size_ms: 1,
                advance_ms: 1,
                grace_ms: 0,
            },
            WindowSpec::Session { gap_ms: 1, grace_ms: 0 },
        ];
        assert_tags(&windows);
        assert_tags(&[EmitMode::Changes, EmitMode::Final]);
        let mut operators = sample_plan().operators;
        operators.rotate_right(2);
        operators.push(Operator::Registered {
            dataflow: "d".into(),
            step: "MAP".into(),
        });
        operators.push(Operator::JoinTable(sample_join()));
        operators.push(Operator::JoinStream(sample_stream_join()));
        operators.push(Operator::JoinTables(TablesJoin {
            left_table: "A".into(),
            left_key: 0,
            right_table: "B".into(),
            source: sample_stream_join().source,
            right_key: 0,
            kind: JoinKind::Inner,
        }));
        operators.push(Operator::Explode(Expr::Column(0)));
        operators.push(Operator::JoinTableAsOf(sample_join(), sample_as_of()));
        operators.push(Operator::TableChanges { key: Some(0) });
        assert_tags(&operators);
        assert_tags(&[ObjectKind::Stream, ObjectKind::Table]);
        assert_tags(&[JoinKind::Inner, JoinKind::Left, JoinKind::Outer]);
    }

    fn sample_as_of() -> AsOf {
        AsOf {
            at: Expr::Column(1),
            table_time: None,
            history_ms: TABLE_HISTORY_MS_DEFAULT,
            grace_ms: 0,
        }
    }

    fn sample_stream_join() -> StreamJoin {
        StreamJoin {
            stream: "PAYMENTS".into(),
            source: Source {
                topic: "payments".into(),
                columns: vec![Column {
                    name: "CARD_NUMBER".into(),
                    ty: SqlType::String,
                }],
                timestamp: None,
            },
            left_key: Expr::Column(0),
            right_key: Expr::Column(0),
            before_ms: 1_000,
            after_ms: 2_000,
            grace_ms: 0,
            kind: JoinKind::Outer,
        }
    }

    #[test]
    fn a_stream_join_adds_a_source_and_a_stage_and_refuses_what_it_cannot_be() {
        let mut plan = sample_plan();
        plan.operators = vec![Operator::JoinStream(sample_stream_join())];
        assert_eq!((plan.stages(), plan.validate()), (3, Ok(())));
        assert!(plan.reads("payments") && plan.reads("authorization_attempts") && !plan.reads("cards"));
        let mut negative = sample_stream_join();
        negative.before_ms = -1;
        plan.operators = vec![Operator::JoinStream(negative)];
        let refused = plan.validate().expect_err("a negative span");
        assert!(
            refused.to_string().contains("the join with PAYMENTS spans"),
            "{refused}"
        );
        let mut outer = sample_join();
        outer.kind = JoinKind::Outer;
        plan.operators = vec![Operator::JoinTable(outer)];
        let refused = plan.validate().expect_err("an outer table join");
        assert!(refused.to_string().contains("inner or left"), "{refused}");
    }

    fn sample_join() -> TableJoin {
        TableJoin {
            table: "CARDS".into(),
            topic: "cards".into(),
            partitions: 2,
            columns: vec![
                Column {
                    name: "CARD_NUMBER".into(),
                    ty: SqlType::String,
                },
                Column {
                    name: "COUNTRY".into(),
                    ty: SqlType::String,
                },
            ],
            key: 0,
            on: Expr::Column(0),
            kind: JoinKind::Left,
        }
    }

    #[test]
    fn a_join_explains_its_table_and_refuses_a_key_outside_its_columns() {
        let mut plan = sample_plan();
        plan.operators.insert(0, Operator::JoinTable(sample_join()));
        assert_eq!(plan.validate(), Ok(()));
        let explained = plan.explain("Q");
        assert!(
            explained.contains("Left JOIN TABLE CARDS (CARD_NUMBER STRING, COUNTRY STRING) read whole by every task from cards (2 partitions) ON CARD_NUMBER = CARDS.CARD_NUMBER"),
            "{explained}"
        );
        let mut outside = sample_join();
        outside.key = 2;
        plan.operators[0] = Operator::JoinTable(outside);
        let refused = plan.validate().expect_err("key outside the columns");
        assert!(refused.to_string().contains("join with CARDS"), "{refused}");
    }

    #[test]
    fn an_event_time_join_explains_its_lookup_time_and_refuses_bad_history() {
        let mut plan = sample_plan();
        plan.operators
            .insert(0, Operator::JoinTableAsOf(sample_join(), sample_as_of()));
        assert_eq!((plan.validate(), plan.stages()), (Ok(()), 2));
        assert!(plan.reads("cards"));
        let explained = plan.explain("Q");
        assert!(
            explained.contains("ON CARD_NUMBER = CARDS.CARD_NUMBER AS OF ROWTIME (the table's rows by its records' timestamps, 86400000 ms of history kept, 0 ms of grace)"),
            "{explained}"
        );
        for as_of in [
            AsOf {
                history_ms: -1,
                ..sample_as_of()
            },
            AsOf {
                table_time: Some(2),
                ..sample_as_of()
            },
            AsOf {
                grace_ms: -1,
                ..sample_as_of()
            },
        ] {
            plan.operators[0] = Operator::JoinTableAsOf(sample_join(), as_of);
            let refused = plan.validate().expect_err("out of bounds");
            assert!(refused.to_string().contains("the join with CARDS keeps"), "{refused}");
        }
    }

    #[test]
    fn a_plan_counts_its_stages_explains_itself_and_refuses_what_it_cannot_be() {
        let plan = sample_plan();
        assert_eq!(plan.stages(), 2);
        assert_eq!(plan.validate(), Ok(()));
        let explained = plan.explain("CSAS_POSSIBLE_FRAUD");
        let lines: Vec<&str> = explained.lines().collect();
        assert!(lines[1].starts_with("SINK POSSIBLE_FRAUD"), "{explained}");
        assert!(
            explained.contains("REPARTITION BY") && explained.contains("CSAS_POSSIBLE_FRAUD.repartition"),
            "{explained}"
        );
        assert!(
            lines
                .last()
                .is_some_and(|l| l.trim_start().starts_with("SOURCE authorization_attempts")),
            "{explained}"
        );
        assert!(explained.contains("FILTER (KSQL_AGG_0 > 3)"), "{explained}");
        assert!(explained.contains("CountRows(*) AS KSQL_AGG_0"), "{explained}");

        let mut future = sample_plan();
        future.version = PLAN_FORMAT_VERSION + 1;
        let refused = future.validate().expect_err("a later format");
        assert!(refused.to_string().contains("upgrade this node"), "{refused}");
        let mut deep = sample_plan();
        let mut expr = Expr::Column(0);
        for _ in 0..EXPRESSION_DEPTH_MAX {
            expr = Expr::Unary(UnaryOp::Not, Box::new(expr));
        }
        deep.operators.push(Operator::Filter(expr));
        assert!(matches!(deep.validate(), Err(PlanError::Invalid(why)) if why.contains("nests deeper")));
    }

    #[test]
    fn a_tables_changes_validate_only_first_once_and_before_an_aggregate_that_subtracts() {
        let mut plan = sample_plan();
        if let Operator::Aggregate { window, .. } = &mut plan.operators[1] {
            *window = None;
        }
        plan.operators.insert(0, Operator::TableChanges { key: Some(0) });
        assert_eq!((plan.validate(), plan.stages()), (Ok(()), 3));
        assert!(plan
            .explain("Q")
            .contains("TABLE CHANGES by the primary key CARD_NUMBER"));
        let refused = |plan: &Plan| plan.validate().expect_err("refused").to_string();
        let mut outside = plan.clone();
        outside.operators[0] = Operator::TableChanges { key: Some(1) };
        assert!(refused(&outside).contains("by column 1 of 1"));
        let mut twice = plan.clone();
        twice.operators.insert(1, Operator::TableChanges { key: None });
        assert!(refused(&twice).contains("read twice"));
        let mut later = plan.clone();
        later.operators.swap(0, 1);
        assert!(refused(&later).contains("read after another operator"));
        let mut windowed = plan.clone();
        let mut minimum = plan.clone();
        if let Operator::Aggregate { window, .. } = &mut windowed.operators[2] {
            *window = Some(WindowSpec::Session { gap_ms: 1, grace_ms: 0 });
        }
        if let Operator::Aggregate { calls, .. } = &mut minimum.operators[2] {
            calls[0].function = AggregateFunction::Min;
        }
        assert!(refused(&windowed).contains("not aggregated once without a window"));
        assert!(refused(&minimum).contains("cannot all take a value back out"));
    }
}
