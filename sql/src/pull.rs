//! Pull queries: `SELECT … FROM x WHERE key = … ;` without `EMIT CHANGES`
//! reads the current state of the aggregate that writes `x`, as ksqlDB's
//! pull queries do, and ends.
//!
//! The rows come from the state store of the task that owns the key (the
//! aggregate stage's task for the key's repartition partition), on
//! whichever node runs it ([`Client::read_dataflow_state`]): one task for a
//! key given by `=`, every task for a range (or no `WHERE`). A task that
//! moves or restores is asked again, so an answer never comes from a partly
//! restored state. Windowed results carry `WINDOWSTART` and `WINDOWEND`;
//! only open windows are held (a closed window's final row is in the sink).
//!
//! What a pull query may say: columns or `*` (with aliases); a `WHERE` of
//! comparisons of a column with a literal joined by `AND`, naming a key
//! column; `LIMIT`. A stream without state, a `WHERE` on other columns
//! only, or anything else is refused by name before anything is read.

use std::cmp::Ordering;
use std::time::Duration;

use runnel_client::plan::{Expr, Operator, Plan, SqlObject, SqlType};
use runnel_client::protocol::Catalog;
use runnel_client::tasks::StateRow;
use runnel_client::Client;
use runnel_dataflow::compile::group_key;
use runnel_dataflow::row::Value;
use sqlparser::ast;

use crate::error::{SqlError, SqlResult};
use crate::parse::Query;
use crate::planner::ident;
use crate::session::Outcome;

/// How long a pull query waits for a task that moves or restores.
const STATE_WAIT: Duration = Duration::from_secs(10);
/// The window bounds of a windowed aggregate's rows.
const BOUNDS: [&str; 2] = ["WINDOWSTART", "WINDOWEND"];

/// A pull query, checked against the catalog.
#[derive(Debug)]
pub struct PullQuery {
    dataflow: String,
    /// The postcard key of the one task to ask, or every task.
    key: Option<Vec<u8>>,
    filters: Vec<Filter>,
    /// Output names and the row columns they show.
    output: Vec<(String, String)>,
    limit: Option<u64>,
}

/// `column op literal`.
#[derive(Debug)]
struct Filter {
    column: String,
    op: ast::BinaryOperator,
    value: Value,
}

/// A row's columns and their JSON values.
type Row = serde_json::Map<String, serde_json::Value>;

impl PullQuery {
    /// Checks `query` as a pull query on `object`.
    pub fn plan(catalog: &Catalog, object: &SqlObject, query: &Query) -> SqlResult<PullQuery> {
        check_shape(query)?;
        let (dataflow, plan) = state_query(catalog, object)?;
        let keys = group_key_columns(plan, object)?;
        let mut columns: Vec<(String, SqlType)> = plan.sink.columns.iter().map(|c| (c.name.clone(), c.ty)).collect();
        if is_windowed(plan) {
            for bound in BOUNDS {
                if !columns.iter().any(|(name, _)| name == bound) {
                    columns.push((bound.to_string(), SqlType::BigInt));
                }
            }
        }
        let filters = match &query.select.selection {
            Some(condition) => filters(condition, &columns)?,
            None => Vec::new(),
        };
        let key = key_of(&keys, &columns, &filters, &object.name)?;
        Ok(PullQuery {
            dataflow: dataflow.to_string(),
            key,
            filters,
            output: output(&query.select.projection, &columns)?,
            limit: query.limit,
        })
    }

    /// Reads the state and shapes the rows.
    pub async fn run(&self, client: &Client) -> SqlResult<Outcome> {
        let read = client
            .read_dataflow_state(&self.dataflow, self.key.as_deref(), STATE_WAIT)
            .await
            .map_err(|e| SqlError::new(e.to_string()))?;
        self.rows(&read)
    }

    /// The key the state is read by (every key when `None`).
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// The answer from the state rows read: filtered, ordered by key and
    /// window, limited and projected.
    pub fn rows(&self, read: &[StateRow]) -> SqlResult<Outcome> {
        let mut rows = Vec::with_capacity(read.len());
        for state in read {
            let row = row_of(state)?;
            if self.filters.iter().all(|f| f.holds(&row)) {
                rows.push((String::from_utf8_lossy(&state.key).into_owned(), row));
            }
        }
        rows.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| window_start(&a.1).cmp(&window_start(&b.1))));
        let limit = self
            .limit
            .map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
        let rows = rows
            .iter()
            .take(limit)
            .map(|(_, row)| self.output.iter().map(|(_, column)| text(row.get(column))).collect())
            .collect();
        Ok(Outcome::Table {
            columns: self.output.iter().map(|(name, _)| name.clone()).collect(),
            rows,
        })
    }
}

fn check_shape(query: &Query) -> SqlResult<()> {
    let select = &query.select;
    let grouped = !matches!(&select.group_by, ast::GroupByExpr::Expressions(e, _) if e.is_empty());
    if query.window.is_some() || grouped || select.having.is_some() || !query.partition_by.is_empty() {
        return Err(SqlError::new(
            "a pull query (a SELECT without EMIT CHANGES) reads a table's current rows: no WINDOW, GROUP BY, HAVING or PARTITION BY; add EMIT CHANGES for a push query",
        ));
    }
    if select.distinct.is_some() {
        return Err(SqlError::new("a pull query takes no DISTINCT"));
    }
    Ok(())
}

/// The query whose aggregate holds `object`'s rows.
fn state_query<'a>(catalog: &'a Catalog, object: &SqlObject) -> SqlResult<(&'a str, &'a Plan)> {
    let no_state = || {
        SqlError::new(format!(
            "{} holds no state to look up: a pull query reads rows an aggregate or a join of two tables keeps (CREATE TABLE … AS SELECT …); read {} with SELECT … EMIT CHANGES",
            object.name, object.name
        ))
    };
    let id = object.query.as_deref().ok_or_else(no_state)?;
    let (meta, plan) = catalog
        .queries
        .iter()
        .find(|(meta, _)| meta.name == id)
        .ok_or_else(|| SqlError::new(format!("the query {id} writing {} is not running", object.name)))?;
    let stateful = |op: &Operator| matches!(op, Operator::Aggregate { .. } | Operator::JoinTables(_));
    if !plan.operators.iter().any(stateful) {
        return Err(no_state());
    }
    Ok((meta.name.as_str(), plan))
}

fn is_windowed(plan: &Plan) -> bool {
    plan.operators
        .iter()
        .any(|op| matches!(op, Operator::Aggregate { window: Some(_), .. }))
}

/// The sink column holding each GROUP BY key, in GROUP BY order.
fn group_key_columns(plan: &Plan, object: &SqlObject) -> SqlResult<Vec<String>> {
    if plan.tables_join().is_some() {
        // A join of two tables is keyed by the key column it projects.
        return Ok(plan
            .sink
            .key
            .iter()
            .map(|&k| plan.sink.columns[k].name.clone())
            .collect());
    }
    let keys = plan
        .operators
        .iter()
        .find_map(|op| match op {
            Operator::Aggregate { keys, .. } => Some(*keys),
            _ => None,
        })
        .unwrap_or(0);
    let Some(Operator::Project(projection)) = plan.operators.last() else {
        return Err(SqlError::new(format!(
            "the plan writing {} ends without a projection",
            object.name
        )));
    };
    (0..keys as usize)
        .map(|k| {
            projection
                .iter()
                .find(|(_, expr)| *expr == Expr::Column(k))
                .map(|(column, _)| column.name.clone())
                .ok_or_else(|| {
                    SqlError::new(format!(
                        "{} does not show its GROUP BY key {} as a column, so a pull query cannot name it",
                        object.name,
                        k + 1
                    ))
                })
        })
        .collect()
}

/// The comparisons of a `WHERE` joined by `AND`.
fn filters(condition: &ast::Expr, columns: &[(String, SqlType)]) -> SqlResult<Vec<Filter>> {
    use ast::BinaryOperator as B;
    match condition {
        ast::Expr::Nested(inner) => filters(inner, columns),
        ast::Expr::BinaryOp {
            left,
            op: B::And,
            right,
        } => {
            let mut all = filters(left, columns)?;
            all.extend(filters(right, columns)?);
            Ok(all)
        }
        ast::Expr::BinaryOp { left, op, right }
            if matches!(op, B::Eq | B::NotEq | B::Lt | B::LtEq | B::Gt | B::GtEq) =>
        {
            let (ast::Expr::Identifier(id), ast::Expr::Value(literal)) = (left.as_ref(), right.as_ref()) else {
                return Err(SqlError::new(format!(
                    "a pull query's WHERE compares a column with a literal (column {op} value), not {condition}"
                )));
            };
            let column = ident(id);
            let Some((_, ty)) = columns.iter().find(|(name, _)| *name == column) else {
                return Err(SqlError::new(format!("unknown column {column}")));
            };
            Ok(vec![Filter {
                value: typed_literal(&column, *ty, &literal.value)?,
                column,
                op: op.clone(),
            }])
        }
        other => Err(SqlError::new(format!(
            "a pull query's WHERE takes comparisons of columns with literals joined by AND, not {other}"
        ))),
    }
}

/// A literal as the value a column of type `ty` holds.
fn typed_literal(column: &str, ty: SqlType, literal: &ast::Value) -> SqlResult<Value> {
    let mismatch = || SqlError::new(format!("{column} is {ty}; compare it with a {ty} value, not {literal}"));
    Ok(match (ty, literal) {
        (SqlType::String, ast::Value::SingleQuotedString(s)) => Value::String(s.clone()),
        (SqlType::Int | SqlType::BigInt, ast::Value::Number(n, _)) => Value::Int(n.parse().map_err(|_| mismatch())?),
        (SqlType::Double, ast::Value::Number(n, _)) => Value::Double(n.parse().map_err(|_| mismatch())?),
        (SqlType::Boolean, ast::Value::Boolean(b)) => Value::Boolean(*b),
        _ => return Err(mismatch()),
    })
}

/// The postcard key when every key column is given by `=`; `None` (every
/// task) for a range on a key column or no `WHERE`; refused when the
/// `WHERE` names no key column.
fn key_of(
    keys: &[String],
    columns: &[(String, SqlType)],
    filters: &[Filter],
    name: &str,
) -> SqlResult<Option<Vec<u8>>> {
    let equal = |key: &String| {
        filters
            .iter()
            .find(|f| &f.column == key && f.op == ast::BinaryOperator::Eq)
            .map(|f| f.value.clone())
    };
    let values: Option<Vec<Value>> = keys.iter().map(equal).collect();
    if let Some(values) = values {
        let key = group_key(&values).map_err(|e| SqlError::new(format!("encoding the key: {e}")))?;
        return Ok(Some(key));
    }
    if filters.is_empty() || filters.iter().any(|f| keys.contains(&f.column)) {
        return Ok(None);
    }
    let others: Vec<&str> = columns
        .iter()
        .map(|(c, _)| c.as_str())
        .filter(|c| !keys.iter().any(|k| k == c))
        .collect();
    Err(SqlError::new(format!(
        "a pull query on {name} looks rows up by its key {}: name it in WHERE (= a value, or a range); {} are not keys and have no index",
        keys.join(", "),
        others.join(", ")
    )))
}

/// What the SELECT shows: (output name, row column).
fn output(projection: &[ast::SelectItem], columns: &[(String, SqlType)]) -> SqlResult<Vec<(String, String)>> {
    let known = |column: String| -> SqlResult<String> {
        if columns.iter().any(|(name, _)| *name == column) {
            Ok(column)
        } else {
            Err(SqlError::new(format!("unknown column {column}")))
        }
    };
    let mut out = Vec::new();
    for item in projection {
        match item {
            ast::SelectItem::Wildcard(_) => out.extend(columns.iter().map(|(c, _)| (c.clone(), c.clone()))),
            ast::SelectItem::UnnamedExpr(ast::Expr::Identifier(id)) => {
                let column = known(ident(id))?;
                out.push((column.clone(), column));
            }
            ast::SelectItem::ExprWithAlias {
                expr: ast::Expr::Identifier(id),
                alias,
            } => out.push((ident(alias), known(ident(id))?)),
            other => {
                return Err(SqlError::new(format!(
                    "a pull query selects columns (or *), not {other}"
                )))
            }
        }
    }
    Ok(out)
}

/// A state row's columns: its value's fields, and the window bounds its
/// key carries.
fn row_of(state: &StateRow) -> SqlResult<Row> {
    let corrupt = |e: serde_json::Error| SqlError::new(format!("a state row does not decode: {e}"));
    let serde_json::Value::Object(mut row) = serde_json::from_slice(&state.value).map_err(corrupt)? else {
        return Err(SqlError::new("a state row's value is not a JSON object"));
    };
    if let Ok(serde_json::Value::Object(key)) = serde_json::from_slice::<serde_json::Value>(&state.key) {
        for bound in BOUNDS {
            if let Some(value) = key.get(bound) {
                row.entry(bound.to_string()).or_insert_with(|| value.clone());
            }
        }
    }
    Ok(row)
}

fn window_start(row: &Row) -> i64 {
    row.get(BOUNDS[0]).and_then(serde_json::Value::as_i64).unwrap_or(0)
}

impl Filter {
    fn holds(&self, row: &Row) -> bool {
        use ast::BinaryOperator as B;
        let Some(ordering) = row.get(&self.column).map(value_of).and_then(|v| v.compare(&self.value)) else {
            return false;
        };
        match self.op {
            B::Eq => ordering == Ordering::Equal,
            B::NotEq => ordering != Ordering::Equal,
            B::Lt => ordering == Ordering::Less,
            B::LtEq => ordering != Ordering::Greater,
            B::Gt => ordering == Ordering::Greater,
            B::GtEq => ordering != Ordering::Less,
            _ => false,
        }
    }
}

fn value_of(json: &serde_json::Value) -> Value {
    match json {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Boolean(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Double(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::String(s.clone()),
        other => Value::Json(other.to_string()),
    }
}

fn text(value: Option<&serde_json::Value>) -> String {
    match value {
        None | Some(serde_json::Value::Null) => "null".to_string(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}
