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

/// The plan format this build writes and reads.
pub const PLAN_FORMAT_VERSION: u16 = 1;
/// Operators in one plan.
pub const OPERATORS_MAX: usize = 64;
/// Nesting of one expression.
pub const EXPRESSION_DEPTH_MAX: usize = 64;
/// Columns of a schema or a projection.
pub const COLUMNS_MAX: usize = 256;

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

    /// The highest column index the expression reads.
    pub fn columns_max(&self) -> Option<usize> {
        match self {
            Expr::Column(i) => Some(*i),
            _ => self.children().filter_map(Expr::columns_max).max(),
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
}

impl Plan {
    /// Stages, and so tasks per source partition: one, plus one per repartition.
    pub fn stages(&self) -> u32 {
        1 + self
            .operators
            .iter()
            .filter(|op| matches!(op, Operator::Repartition { .. }))
            .count() as u32
    }

    /// Checks the limits; the dataflow runtime checks the shape it can run.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.version != PLAN_FORMAT_VERSION {
            return Err(PlanError::UnknownVersion(self.version));
        }
        let invalid = |why: String| Err(PlanError::Invalid(why));
        if self.operators.len() > OPERATORS_MAX {
            return invalid(format!("{} operators (at most {OPERATORS_MAX})", self.operators.len()));
        }
        if self.source.columns.len() > COLUMNS_MAX || self.sink.columns.len() > COLUMNS_MAX {
            return invalid(format!("more than {COLUMNS_MAX} columns"));
        }
        for expr in self.expressions() {
            if expr.depth() > EXPRESSION_DEPTH_MAX {
                return invalid(format!("an expression nests deeper than {EXPRESSION_DEPTH_MAX}"));
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
                Operator::Aggregate { .. } => Box::new(std::iter::empty()),
            }
        })
    }

    /// The plan as a tree, sink first (like ksqlDB's `EXPLAIN`).
    pub fn explain(&self, name: &str) -> String {
        let mut lines = vec![format!(
            "SINK {} ({})",
            self.sink.topic,
            column_list(&self.sink.columns)
        )];
        let mut stage = self.stages();
        for op in self.operators.iter().rev() {
            lines.push(match op {
                Operator::Filter(e) => format!("FILTER {e:?}"),
                Operator::Project(cs) => format!(
                    "PROJECT {}",
                    column_list(&cs.iter().map(|(c, _)| c.clone()).collect::<Vec<_>>())
                ),
                Operator::Repartition { key, .. } => {
                    stage -= 1;
                    format!(
                        "REPARTITION BY {} keys through {name}.repartition (stage {} -> {})",
                        key.len(),
                        stage - 1,
                        stage
                    )
                }
                Operator::Aggregate {
                    calls, window, emit, ..
                } => {
                    format!("AGGREGATE {} calls, window {window:?}, emit {emit:?}", calls.len())
                }
            });
        }
        lines.push(format!(
            "SOURCE {} ({}, ROWTIME)",
            self.source.topic,
            column_list(&self.source.columns)
        ));
        let mut text = format!("{name}: {} stage(s)\n", self.stages());
        for (depth, line) in lines.iter().enumerate() {
            let _ = writeln!(text, "{}{}", "  ".repeat(depth), line);
        }
        text
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
