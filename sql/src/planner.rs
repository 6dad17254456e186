//! SELECTs into plans: names resolved against the catalog, types checked,
//! aggregates gathered, in ksqlDB's terms.
//!
//! A SELECT without aggregates is one stage: `WHERE` (a filter), then the
//! projection. With `GROUP BY` or an aggregate it is two: `WHERE`, a
//! repartition by the grouping expressions carrying the aggregates'
//! arguments, the aggregate (per window if any), `HAVING` and the
//! projection over the aggregate's row.

use runnel_client::plan::{
    AggregateCall, AggregateFunction, AsOf, BinaryOp, Column, EmitMode, Expr, Function, Literal, ObjectKind, Operator,
    Plan, Sink, Source, SqlType, StreamJoin, TableJoin, TablesJoin, UnaryOp, EXPRESSION_DEPTH_MAX, PLAN_FORMAT_VERSION,
    TABLE_HISTORY_MS_DEFAULT,
};
use sqlparser::ast;

use crate::error::{SqlError, SqlResult};
use crate::from::{Input, JoinInput, StreamJoinInput, TablesJoinInput};
use crate::parse::{AsOfClause, Query};

/// A planned SELECT and what its output looks like.
#[derive(Clone, Debug)]
pub struct Planned {
    pub plan: Plan,
    /// The kind of what it produces: a table when it aggregates.
    pub kind: ObjectKind,
    pub windowed: bool,
}

/// The columns in scope, each at its index in the row.
#[derive(Clone, Debug)]
struct Scope {
    columns: Vec<Column>,
    /// In a join, what qualifies each column (its relation's alias), in
    /// step with `columns`; empty otherwise.
    qualifiers: Vec<String>,
}

impl Scope {
    fn of(columns: Vec<Column>) -> Scope {
        Scope {
            columns,
            qualifiers: Vec::new(),
        }
    }

    fn find(&self, name: &str) -> Option<(usize, SqlType)> {
        self.columns
            .iter()
            .position(|c| c.name == name)
            .map(|i| (i, self.columns[i].ty))
    }

    /// The column `name` (of the relation `qualifier`, in a join): exactly one.
    fn resolve(&self, qualifier: Option<&str>, name: &str) -> Result<(usize, SqlType), String> {
        let qualified = |i: usize| match (qualifier, self.qualifiers.get(i)) {
            (Some(q), Some(has)) => q == has,
            _ => true,
        };
        let mut found = (0..self.columns.len()).filter(|&i| self.columns[i].name == name && qualified(i));
        match (found.next(), found.next()) {
            (Some(i), None) => Ok((i, self.columns[i].ty)),
            (Some(_), Some(_)) => Err(format!(
                "column {name} is ambiguous: qualify it with its stream or table ({})",
                self.names()
            )),
            (None, _) => Err(format!("unknown column {name}; known: {}", self.names())),
        }
    }

    fn name_of(&self, i: usize) -> String {
        match self.qualifiers.get(i) {
            Some(q) => format!("{q}.{}", self.columns[i].name),
            None => self.columns[i].name.clone(),
        }
    }

    fn names(&self) -> String {
        (0..self.columns.len())
            .filter(|&i| self.columns[i].name != EXPLODED)
            .map(|i| self.name_of(i))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Adds `columns`, qualified by `qualifier` in a join.
    fn extend(&mut self, columns: &[Column], qualifier: &str) {
        self.columns.extend_from_slice(columns);
        self.qualifiers.resize(self.columns.len(), qualifier.to_string());
    }
}

/// A name as ksqlDB reads it: upper case unless quoted.
pub fn ident(ident: &ast::Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_ascii_uppercase(),
    }
}

fn at(message: String, span: sqlparser::tokenizer::Span) -> SqlError {
    SqlError::at(message, span.start.line, span.start.column)
}

/// Plans `query` reading `from` and writing `sink_topic`.
pub fn plan_query(statement: &str, query: &Query, from: &Input<'_>, sink_topic: &str) -> SqlResult<Planned> {
    let select = &query.select;
    if select.distinct.is_some() || !select.named_window.is_empty() || select.qualify.is_some() {
        return Err(SqlError::new("DISTINCT, named windows and QUALIFY are not supported"));
    }
    let source = from.source;
    let (input, mut operators) = plan_from(from)?;
    if let Some(condition) = &select.selection {
        let (condition, ty) = Converter::plain(&input).convert(condition)?;
        expect_boolean(ty, "WHERE")?;
        operators.push(Operator::Filter(condition));
    }
    let group_by = match &select.group_by {
        ast::GroupByExpr::Expressions(exprs, modifiers) if modifiers.is_empty() => exprs.clone(),
        _ => return Err(SqlError::new("GROUP BY ALL and grouping modifiers are not supported")),
    };
    let aggregates = has_aggregate(select);
    if query.window.is_some() && group_by.is_empty() {
        return Err(SqlError::new("a WINDOW needs a GROUP BY"));
    }
    if query.emit == Some(EmitMode::Final) && query.window.is_none() {
        return Err(SqlError::new("EMIT FINAL needs a windowed aggregate"));
    }
    let several_stages = !group_by.is_empty() || aggregates || from.stream_join.is_some() || from.tables_join.is_some();
    if several_stages && explode_item(select)?.is_some() {
        return Err(SqlError::new(
            "EXPLODE works in a query without GROUP BY and without a join of two streams or two tables",
        ));
    }
    let planned = if group_by.is_empty() && !aggregates {
        stateless(select, query, &input, &mut operators)?
    } else if from.tables_join.is_some() {
        return Err(SqlError::new(
            "an aggregate over a join of two tables in one query is not supported: write the join to a table (CREATE TABLE j AS SELECT …) first, then aggregate that table",
        ));
    } else if from.source.kind == ObjectKind::Table && from.stream_join.is_none() {
        table_aggregate(select, query, from, &input, &group_by, &mut operators)?
    } else {
        aggregate(select, query, &input, &group_by, &mut operators)?
    };
    let (columns, key, kind) = join_keyed(planned, from, &operators)?;
    let plan = Plan {
        version: PLAN_FORMAT_VERSION,
        statement: statement.to_string(),
        source: Source {
            topic: source.topic.clone(),
            columns: source.columns.clone(),
            timestamp: source.timestamp,
        },
        operators,
        sink: Sink {
            topic: sink_topic.to_string(),
            columns,
            key,
        },
    };
    plan.validate().map_err(|e| SqlError::new(e.to_string()))?;
    Ok(Planned {
        plan,
        kind,
        windowed: query.window.is_some(),
    })
}

type Shape = (Vec<Column>, Vec<usize>, ObjectKind);

/// The FROM clause: the scope of the rows it yields (the source's columns
/// and ROWTIME, then each joined relation's, qualified in a join) and the
/// join operators that make them.
fn plan_from(from: &Input<'_>) -> SqlResult<(Scope, Vec<Operator>)> {
    let mut input = Scope::of(with_rowtime(&from.source.columns));
    let mut operators = Vec::new();
    let joined = !from.joins.is_empty() || from.stream_join.is_some() || from.tables_join.is_some();
    if joined {
        input.qualifiers = vec![from.alias.clone(); input.columns.len()];
    }
    for join in &from.joins {
        let table_join = join_table(join, &input)?;
        operators.push(match join.as_of {
            None => Operator::JoinTable(table_join),
            Some(clause) => Operator::JoinTableAsOf(table_join, as_of(clause, join.table, from.source, &input)?),
        });
        input.extend(&join.table.columns, &join.alias);
    }
    if let Some(join) = &from.stream_join {
        operators.push(Operator::JoinStream(join_stream(join, &input)?));
        input.extend(&with_rowtime(&join.stream.columns), &join.alias);
    }
    if let Some(join) = &from.tables_join {
        operators.push(Operator::JoinTables(join_tables(join, from, &input)?));
        input.extend(&with_rowtime(&join.table.columns), &join.alias);
    }
    Ok((input, operators))
}

/// A join's output keyed as ksqlDB keys it: a stream's rows by the join
/// key column the SELECT shows (not an aggregate's, whose columns count
/// otherwise); a join of two tables is a table and must show its key.
fn join_keyed(planned: Shape, from: &Input<'_>, operators: &[Operator]) -> SqlResult<Shape> {
    let (columns, mut key, mut kind) = planned;
    if key.is_empty() && kind == ObjectKind::Stream {
        key = join_key_columns(operators, from.source.columns.len() + 1);
    }
    if let Some(join) = &from.tables_join {
        if key.is_empty() {
            let source = from.source;
            return Err(SqlError::new(format!(
                "the SELECT of a join of two tables must include the key ({}.{} or {}.{}): it keys the result",
                from.alias, source.columns[source.key[0]].name, join.alias, join.table.columns[join.table.key[0]].name
            )));
        }
        kind = ObjectKind::Table;
    }
    Ok((columns, key, kind))
}

fn stateless(select: &ast::Select, query: &Query, input: &Scope, operators: &mut Vec<Operator>) -> SqlResult<Shape> {
    if select.having.is_some() {
        return Err(SqlError::new("HAVING needs a GROUP BY"));
    }
    let mut scope = input.clone();
    let exploded = match explode_item(select)? {
        None => None,
        Some((item, argument)) => {
            let (argument, ty) = Converter::plain(input).convert(argument)?;
            if ty != SqlType::Json {
                return Err(SqlError::new(format!(
                    "EXPLODE takes an array (a column declared ARRAY, held as JSON), not {ty}"
                )));
            }
            operators.push(Operator::Explode(argument));
            scope.columns.push(Column {
                name: EXPLODED.to_string(),
                ty: SqlType::Json,
            });
            if !scope.qualifiers.is_empty() {
                // In a join, the element belongs to no relation.
                scope.qualifiers.push(String::new());
            }
            Some((item, scope.columns.len() - 1))
        }
    };
    let converter = Converter::plain(&scope);
    let projection = project(select, &scope, &converter, exploded)?;
    let mut key = Vec::new();
    for expr in &query.partition_by {
        let (planned, _) = converter.convert(expr)?;
        let found = projection
            .iter()
            .position(|(_, e)| *e == planned)
            .ok_or_else(|| SqlError::new(format!("PARTITION BY {expr}: the projection must include it")))?;
        key.push(found);
    }
    let columns = projection.iter().map(|(c, _)| c.clone()).collect();
    operators.push(Operator::Project(projection));
    Ok((columns, key, ObjectKind::Stream))
}

fn aggregate(
    select: &ast::Select,
    query: &Query,
    input: &Scope,
    group_by: &[ast::Expr],
    operators: &mut Vec<Operator>,
) -> SqlResult<Shape> {
    if group_by.is_empty() {
        return Err(SqlError::new(
            "an aggregate needs a GROUP BY (ksqlDB has no global aggregates)",
        ));
    }
    if !query.partition_by.is_empty() {
        return Err(SqlError::new("PARTITION BY cannot be combined with GROUP BY"));
    }
    let plain = Converter::plain(input);
    let mut keys = Vec::new();
    let mut output = Scope::of(Vec::new());
    for (i, expr) in group_by.iter().enumerate() {
        let (planned, ty) = plain.convert(expr)?;
        let name = match expr {
            ast::Expr::Identifier(id) => ident(id),
            ast::Expr::CompoundIdentifier(ids) if !ids.is_empty() => ident(&ids[ids.len() - 1]),
            _ => format!("KSQL_GROUP_{i}"),
        };
        output.columns.push(Column { name, ty });
        keys.push((expr.clone(), planned));
    }
    let mut gathered = Gathered::default();
    for item in &select.projection {
        if let ast::SelectItem::UnnamedExpr(e) | ast::SelectItem::ExprWithAlias { expr: e, .. } = item {
            gathered.walk(e, &plain)?;
        }
    }
    if let Some(having) = &select.having {
        gathered.walk(having, &plain)?;
    }
    for (i, call) in gathered.calls.iter().enumerate() {
        output.columns.push(Column {
            name: format!("KSQL_AGG_{i}"),
            ty: call.result_type(),
        });
    }
    if query.window.is_some() {
        for name in ["WINDOWSTART", "WINDOWEND"] {
            output.columns.push(Column {
                name: name.to_string(),
                ty: SqlType::BigInt,
            });
        }
    }
    operators.push(Operator::Repartition {
        key: keys.iter().map(|(_, e)| e.clone()).collect(),
        carry: gathered.carry.clone(),
    });
    operators.push(Operator::Aggregate {
        keys: keys.len() as u32,
        calls: gathered.calls.clone(),
        window: query.window,
        emit: query.emit.unwrap_or(EmitMode::Changes),
    });
    let converter = Converter {
        scope: &output,
        grouped: Some(Grouped {
            keys: &keys,
            gathered: &gathered,
            input,
        }),
    };
    if let Some(having) = &select.having {
        let (condition, ty) = converter.convert(having)?;
        expect_boolean(ty, "HAVING")?;
        operators.push(Operator::Filter(condition));
    }
    let projection = project(select, &output, &converter, None)?;
    let key = projection
        .iter()
        .enumerate()
        .filter(|(_, (_, e))| matches!(e, Expr::Column(i) if *i < keys.len()))
        .map(|(i, _)| i)
        .collect();
    let columns = projection.iter().map(|(c, _)| c.clone()).collect();
    operators.push(Operator::Project(projection));
    Ok((columns, key, ObjectKind::Table))
}

/// An aggregate over a table: its rows' changes, each taken out of its old
/// group and added to its new one, so only functions that can take a
/// value back out (COUNT, SUM, AVG), and no window (as ksqlDB).
fn table_aggregate(
    select: &ast::Select,
    query: &Query,
    from: &Input<'_>,
    input: &Scope,
    group_by: &[ast::Expr],
    operators: &mut Vec<Operator>,
) -> SqlResult<Shape> {
    let table = from.source;
    let as_stream = format!(
        "to aggregate its changes as events, declare a stream over its topic (CREATE STREAM … WITH (KAFKA_TOPIC='{}', …)) and aggregate that",
        table.topic
    );
    if query.window.is_some() {
        return Err(SqlError::new(format!(
            "a WINDOW over a table ({}): a table's rows have no windows; {as_stream}",
            table.name
        )));
    }
    if !from.joins.is_empty() {
        return Err(SqlError::new(format!(
            "an aggregate over a table ({}) joined with another: write the join to a table (CREATE TABLE j AS SELECT …) first",
            table.name
        )));
    }
    if table.windowed {
        return Err(SqlError::new(format!(
            "an aggregate over a windowed table ({}): its rows are per window; {as_stream}",
            table.name
        )));
    }
    // A table a query writes is keyed by a JSON object, its value holding
    // every column; a declared one by its primary key as text.
    let key = match (&table.query, &table.key[..]) {
        (Some(_), []) => {
            return Err(SqlError::new(format!(
                "an aggregate over {}, a table whose rows have no key (its query shows no GROUP BY column)",
                table.name
            )))
        }
        (Some(_), _) => None,
        (None, [key]) => Some(*key),
        (None, _) => {
            return Err(SqlError::new(format!(
                "an aggregate over a table ({}) needs one PRIMARY KEY column",
                table.name
            )))
        }
    };
    operators.insert(0, Operator::TableChanges { key });
    let shape = aggregate(select, query, input, group_by, operators)?;
    shows_every_group_key(operators, group_by)?;
    let calls = operators.iter().find_map(|op| match op {
        Operator::Aggregate { calls, .. } => Some(calls),
        _ => None,
    });
    if let Some(call) = calls.into_iter().flatten().find(|call| !call.function.subtracts()) {
        return Err(SqlError::new(format!(
            "{} over a table ({}) cannot take a changed or deleted row's value back out; over a table use COUNT, SUM or AVG, or {as_stream}",
            sql_name(call.function),
            table.name
        )));
    }
    Ok(shape)
}

/// Whether the aggregate's projection (the last operator) shows every
/// `GROUP BY` column, as a table's rows must be keyed by them all.
fn shows_every_group_key(operators: &[Operator], group_by: &[ast::Expr]) -> SqlResult<()> {
    let Some(Operator::Project(projection)) = operators.last() else {
        return Err(SqlError::new("an aggregate's plan ends without a projection"));
    };
    let shown: std::collections::BTreeSet<usize> = projection
        .iter()
        .filter_map(|(_, e)| match e {
            Expr::Column(i) if *i < group_by.len() => Some(*i),
            _ => None,
        })
        .collect();
    if shown.len() < group_by.len() {
        let keys: Vec<String> = group_by.iter().map(ToString::to_string).collect();
        return Err(SqlError::new(format!(
            "the SELECT of an aggregate over a table must show every GROUP BY column ({}): they key its rows",
            keys.join(", ")
        )));
    }
    Ok(())
}

/// An aggregate function as SQL names it.
fn sql_name(function: AggregateFunction) -> &'static str {
    match function {
        AggregateFunction::CountRows => "COUNT(*)",
        AggregateFunction::Count => "COUNT",
        AggregateFunction::Sum => "SUM",
        AggregateFunction::Min => "MIN",
        AggregateFunction::Max => "MAX",
        AggregateFunction::Avg => "AVG",
        AggregateFunction::CountDistinct => "COUNT_DISTINCT",
    }
}

fn expect_boolean(ty: SqlType, clause: &str) -> SqlResult<()> {
    match ty {
        SqlType::Boolean => Ok(()),
        other => Err(SqlError::new(format!(
            "{clause} needs a BOOLEAN condition, not {other}"
        ))),
    }
}

/// The projection's columns: `*` expands to the scope's (without ROWTIME
/// and the aggregate's internals), unnamed expressions are `KSQL_COL_n`.
/// The column an EXPLODE appends to the row (never shown by `*`).
const EXPLODED: &str = "KSQL_EXPLODED";

/// The SELECT's `EXPLODE(x)` item, if any, and its argument `x`.
fn explode_item(select: &ast::Select) -> SqlResult<Option<(&ast::Expr, &ast::Expr)>> {
    let mut found = None;
    for item in &select.projection {
        let (ast::SelectItem::UnnamedExpr(e) | ast::SelectItem::ExprWithAlias { expr: e, .. }) = item else {
            continue;
        };
        let ast::Expr::Function(f) = e else { continue };
        if !f.name.to_string().eq_ignore_ascii_case("EXPLODE") {
            continue;
        }
        let [Some(argument)] = function_args(f)?[..] else {
            return Err(SqlError::new(format!("EXPLODE takes one array, not {e}")));
        };
        if found.replace((e, argument)).is_some() {
            return Err(SqlError::new("one EXPLODE per query"));
        }
    }
    Ok(found)
}

/// `exploded`: the EXPLODE item (by identity) and the column holding its
/// element.
fn project(
    select: &ast::Select,
    scope: &Scope,
    converter: &Converter<'_>,
    exploded: Option<(&ast::Expr, usize)>,
) -> SqlResult<Vec<(Column, Expr)>> {
    let mut projection: Vec<(Column, Expr)> = Vec::new();
    let mut generated = 0;
    for item in &select.projection {
        match item {
            ast::SelectItem::Wildcard(_) => wildcard(scope, None, &mut projection)?,
            ast::SelectItem::QualifiedWildcard(ast::SelectItemQualifiedWildcardKind::ObjectName(name), _) => {
                let qualifier = match name.0.last() {
                    Some(ast::ObjectNamePart::Identifier(id)) => ident(id),
                    _ => return Err(SqlError::new(format!("{name}.* names no stream or table"))),
                };
                wildcard(scope, Some(&qualifier), &mut projection)?
            }
            ast::SelectItem::UnnamedExpr(e) | ast::SelectItem::ExprWithAlias { expr: e, .. } => {
                let (planned, ty) = match exploded {
                    Some((item, column)) if std::ptr::eq(item, e) => (Expr::Column(column), SqlType::Json),
                    _ => converter.convert(e)?,
                };
                let name = match (item, e) {
                    (ast::SelectItem::ExprWithAlias { alias, .. }, _) => ident(alias),
                    (_, ast::Expr::Identifier(id)) => ident(id),
                    (_, ast::Expr::CompoundIdentifier(ids)) if !ids.is_empty() => ident(&ids[ids.len() - 1]),
                    _ => {
                        generated += 1;
                        format!("KSQL_COL_{}", generated - 1)
                    }
                };
                if projection.iter().any(|(c, _)| c.name == name) {
                    return Err(SqlError::new(format!(
                        "two columns named {name}; give one an alias with AS"
                    )));
                }
                projection.push((Column { name, ty }, planned));
            }
            other => return Err(SqlError::new(format!("unsupported select item {other}"))),
        }
    }
    Ok(projection)
}

/// `*` (or `q.*`): the scope's columns (of `q`) but ROWTIME and the
/// aggregates'; in a join named `Q_NAME`, as ksqlDB names them.
fn wildcard(scope: &Scope, qualifier: Option<&str>, projection: &mut Vec<(Column, Expr)>) -> SqlResult<()> {
    let before = projection.len();
    for (i, column) in scope.columns.iter().enumerate() {
        let of = scope.qualifiers.get(i);
        if column.name == "ROWTIME" || column.name == EXPLODED || column.name.starts_with("KSQL_AGG_") {
            continue;
        }
        if qualifier.is_some_and(|q| of.is_some_and(|of| of != q)) {
            continue;
        }
        let name = match of {
            Some(of) => format!("{of}_{}", column.name),
            None => column.name.clone(),
        };
        if projection.iter().any(|(c, _)| c.name == name) {
            return Err(SqlError::new(format!(
                "two columns named {name}; give one an alias with AS"
            )));
        }
        projection.push((Column { name, ty: column.ty }, Expr::Column(i)));
    }
    if projection.len() == before && qualifier.is_some() && !scope.qualifiers.is_empty() {
        return Err(SqlError::new(format!(
            "{}.* names no stream or table of the FROM clause",
            qualifier.unwrap_or_default()
        )));
    }
    Ok(())
}

/// A join's ON clause: `stream_expression = table.primary_key` (either way
/// round), over `scope` (the stream and the tables joined before).
fn join_table(join: &JoinInput<'_>, scope: &Scope) -> SqlResult<TableJoin> {
    let table = join.table;
    let key = table.key[0];
    let ast::Expr::BinaryOp {
        left,
        op: ast::BinaryOperator::Eq,
        right,
    } = join.on
    else {
        return Err(SqlError::new(format!(
            "a join's ON must be stream_expression = {}.{} (the table's PRIMARY KEY), not {}",
            join.alias, table.columns[key].name, join.on
        )));
    };
    let side = |e: &ast::Expr| table_column(e, join, scope);
    let (named, other) = match (side(left)?, side(right)?) {
        (Some(named), None) => (named, &**right),
        (None, Some(named)) => (named, &**left),
        _ => {
            return Err(SqlError::new(format!(
                "a join's ON compares one expression of the stream with one column of {}: {}",
                join.alias, join.on
            )))
        }
    };
    if named != key {
        return Err(SqlError::new(format!(
            "{} joins on its PRIMARY KEY {}, not on {}",
            table.name, table.columns[key].name, table.columns[named].name
        )));
    }
    let (on, ty) = Converter::plain(scope).convert(other)?;
    let key_ty = table.columns[key].ty;
    let integers = |t: SqlType| matches!(t, SqlType::Int | SqlType::BigInt);
    if ty != key_ty && !(integers(ty) && integers(key_ty)) {
        return Err(SqlError::new(format!(
            "a join on values of different types: {other} is {ty}, {}.{} is {key_ty}",
            join.alias, table.columns[key].name
        )));
    }
    Ok(TableJoin {
        table: table.name.clone(),
        topic: table.topic.clone(),
        partitions: join.partitions,
        columns: table.columns.clone(),
        key,
        on,
        kind: join.kind,
    })
}

/// A join by event time: the stream's time column the clause names (a
/// BIGINT of ms), the table's time column (its TIMESTAMP, else its
/// records' timestamps) and the history it keeps.
fn as_of(
    clause: &AsOfClause,
    table: &runnel_client::plan::SqlObject,
    source: &runnel_client::plan::SqlObject,
    stream: &Scope,
) -> SqlResult<AsOf> {
    let named = match &clause.at[..] {
        [column] => ast::Expr::Identifier(column.clone()),
        parts => ast::Expr::CompoundIdentifier(parts.to_vec()),
    };
    let (at, ty) = Converter::plain(stream).convert(&named)?;
    if !matches!(ty, SqlType::BigInt | SqlType::Int) {
        return Err(SqlError::at(
            format!(
                "FOR SYSTEM_TIME AS OF {named}: {named} is {ty}; it must be a BIGINT time in ms of the stream's row"
            ),
            clause.line,
            clause.column,
        ));
    }
    // The grace holds rows by the stream's event time: it protects a
    // lookup at that time only.
    let event_time = source.timestamp.unwrap_or(source.columns.len());
    if clause.grace_ms > 0 && at != Expr::Column(event_time) {
        let name = source.columns.get(event_time).map_or("ROWTIME", |c| c.name.as_str());
        return Err(SqlError::at(
            format!(
                "a GRACE PERIOD holds rows by {}'s event time, {name}: FOR SYSTEM_TIME AS OF must name it, not {named}",
                source.name
            ),
            clause.line,
            clause.column,
        ));
    }
    Ok(AsOf {
        at,
        table_time: table.timestamp,
        history_ms: clause.history_ms.unwrap_or(TABLE_HISTORY_MS_DEFAULT),
        grace_ms: clause.grace_ms,
    })
}

/// A stream–stream join's ON clause: an expression of the left stream
/// (`left`: its columns and ROWTIME) equal to one of the right stream,
/// either way round, of the same type.
fn join_stream(join: &StreamJoinInput<'_>, left: &Scope) -> SqlResult<StreamJoin> {
    let ast::Expr::BinaryOp {
        left: a,
        op: ast::BinaryOperator::Eq,
        right: b,
    } = join.on
    else {
        return Err(SqlError::new(format!(
            "a join of two streams needs ON left_expression = {}.column, not {}",
            join.alias, join.on
        )));
    };
    let mut right = Scope::of(with_rowtime(&join.stream.columns));
    right.qualifiers = vec![join.alias.clone(); right.columns.len()];
    let sides = |l: &ast::Expr, r: &ast::Expr| -> SqlResult<((Expr, SqlType), (Expr, SqlType))> {
        Ok((Converter::plain(left).convert(l)?, Converter::plain(&right).convert(r)?))
    };
    let ((left_key, left_ty), (right_key, right_ty)) = sides(a, b).or_else(|first| {
        sides(b, a).map_err(|_| {
            SqlError::new(format!(
                "a join's ON compares an expression of one stream with one of the other: {} ({})",
                join.on, first.message
            ))
        })
    })?;
    let integers = |t: SqlType| matches!(t, SqlType::Int | SqlType::BigInt);
    if left_ty != right_ty && !(integers(left_ty) && integers(right_ty)) {
        return Err(SqlError::new(format!(
            "a join on values of different types: {} is {left_ty}, {} is {right_ty}",
            a, b
        )));
    }
    Ok(StreamJoin {
        stream: join.stream.name.clone(),
        source: Source {
            topic: join.stream.topic.clone(),
            columns: join.stream.columns.clone(),
            timestamp: join.stream.timestamp,
        },
        left_key,
        right_key,
        before_ms: join.within.before_ms,
        after_ms: join.within.after_ms,
        grace_ms: join.within.grace_ms,
        kind: join.kind,
    })
}

/// A table–table join's ON clause: the left table's PRIMARY KEY equal to
/// the right one's.
fn join_tables(join: &TablesJoinInput<'_>, from: &Input<'_>, left: &Scope) -> SqlResult<TablesJoin> {
    let right = {
        let mut scope = Scope::of(with_rowtime(&join.table.columns));
        scope.qualifiers = vec![join.alias.clone(); scope.columns.len()];
        scope
    };
    let (left_key, right_key) = (from.source.key[0], join.table.key[0]);
    let column = |scope: &Scope, e: &ast::Expr| match Converter::plain(scope).convert(e) {
        Ok((Expr::Column(i), _)) => Some(i),
        _ => None,
    };
    let on_keys =
        |a: &ast::Expr, b: &ast::Expr| column(left, a) == Some(left_key) && column(&right, b) == Some(right_key);
    let keyed = match join.on {
        ast::Expr::BinaryOp {
            left: a,
            op: ast::BinaryOperator::Eq,
            right: b,
        } => on_keys(a, b) || on_keys(b, a),
        _ => false,
    };
    let (left_column, right_column) = (&from.source.columns[left_key], &join.table.columns[right_key]);
    if !keyed {
        return Err(SqlError::new(format!(
            "a join of two tables is on both PRIMARY KEYs: ON {}.{} = {}.{}, not {} (foreign-key joins are not supported)",
            from.alias, left_column.name, join.alias, right_column.name, join.on
        )));
    }
    let integers = |t: SqlType| matches!(t, SqlType::Int | SqlType::BigInt);
    if left_column.ty != right_column.ty && !(integers(left_column.ty) && integers(right_column.ty)) {
        return Err(SqlError::new(format!(
            "a join on values of different types: {}.{} is {}, {}.{} is {}",
            from.alias, left_column.name, left_column.ty, join.alias, right_column.name, right_column.ty
        )));
    }
    Ok(TablesJoin {
        left_table: from.source.name.clone(),
        left_key,
        right_table: join.table.name.clone(),
        source: Source {
            topic: join.table.topic.clone(),
            columns: join.table.columns.clone(),
            timestamp: None,
        },
        right_key,
        kind: join.kind,
    })
}

fn with_rowtime(columns: &[Column]) -> Vec<Column> {
    let mut columns = columns.to_vec();
    columns.push(Column {
        name: "ROWTIME".to_string(),
        ty: SqlType::BigInt,
    });
    columns
}

/// After a join of two streams or two tables, the projected columns that
/// are its key (a column of either side's condition), which key the sink's
/// records as ksqlDB keys a join's result; none when neither is projected.
fn join_key_columns(operators: &[Operator], left_width: usize) -> Vec<usize> {
    let keys = operators.iter().find_map(|op| match op {
        Operator::JoinStream(join) => Some((join.left_key.clone(), join.right_key.clone())),
        Operator::JoinTables(join) => Some((Expr::Column(join.left_key), Expr::Column(join.right_key))),
        _ => None,
    });
    let Some((left_key, right_key)) = keys else {
        return Vec::new();
    };
    let right_key = match right_key {
        Expr::Column(i) => Some(Expr::Column(left_width + i)),
        _ => None,
    };
    let Some(Operator::Project(projection)) = operators.last() else {
        return Vec::new();
    };
    projection
        .iter()
        .position(|(_, e)| *e == left_key || Some(e) == right_key.as_ref())
        .into_iter()
        .collect()
}

/// The column of the joined table `expr` names, if it names one.
fn table_column(expr: &ast::Expr, join: &JoinInput<'_>, scope: &Scope) -> SqlResult<Option<usize>> {
    let find = |name: &str| join.table.columns.iter().position(|c| c.name == name);
    match expr {
        ast::Expr::CompoundIdentifier(ids) if ids.len() == 2 => {
            if ident(&ids[0]) != join.alias {
                return Ok(None);
            }
            let name = ident(&ids[1]);
            find(&name)
                .map(Some)
                .ok_or_else(|| at(format!("{} has no column {name}", join.table.name), ids[1].span))
        }
        ast::Expr::Identifier(id) => {
            let name = ident(id);
            match (find(&name), scope.find(&name)) {
                (Some(_), Some(_)) => Err(at(
                    format!("column {name} is ambiguous: qualify it ({}.{name})", join.alias),
                    id.span,
                )),
                (found, _) => Ok(found),
            }
        }
        _ => Ok(None),
    }
}

/// The aggregate calls of a grouped SELECT and the values they need.
#[derive(Default)]
struct Gathered {
    calls: Vec<AggregateCall>,
    /// The call each aggregate expression (as written) maps to.
    written: Vec<(ast::Expr, usize)>,
    carry: Vec<Expr>,
}

impl Gathered {
    /// Finds aggregate calls in `expr`, planning their arguments over the input.
    fn walk(&mut self, expr: &ast::Expr, input: &Converter<'_>) -> SqlResult<()> {
        if let ast::Expr::Function(f) = expr {
            if let Some(function) = aggregate_function(f)? {
                return self.add(expr, f, function, input);
            }
        }
        for child in children(expr) {
            self.walk(child, input)?;
        }
        Ok(())
    }

    fn add(
        &mut self,
        expr: &ast::Expr,
        f: &ast::Function,
        function: AggregateFunction,
        input: &Converter<'_>,
    ) -> SqlResult<()> {
        if self.written.iter().any(|(e, _)| e == expr) {
            return Ok(());
        }
        let args = function_args(f)?;
        let (argument, argument_type) = match (function, &args[..]) {
            (AggregateFunction::CountRows, _) => (None, None),
            (_, [Some(arg)]) => {
                if contains_aggregate(arg)? {
                    return Err(SqlError::new(format!("{expr}: aggregates cannot nest")));
                }
                let (planned, ty) = input.convert(arg)?;
                check_aggregate_type(function, ty, expr)?;
                let index = match self.carry.iter().position(|c| *c == planned) {
                    Some(i) => i,
                    None => {
                        self.carry.push(planned);
                        self.carry.len() - 1
                    }
                };
                (Some(index), Some(ty))
            }
            _ => return Err(SqlError::new(format!("{expr}: takes exactly one argument"))),
        };
        self.calls.push(AggregateCall {
            function,
            argument,
            argument_type,
        });
        self.written.push((expr.clone(), self.calls.len() - 1));
        Ok(())
    }
}

fn check_aggregate_type(function: AggregateFunction, ty: SqlType, expr: &ast::Expr) -> SqlResult<()> {
    let numeric = matches!(ty, SqlType::Int | SqlType::BigInt | SqlType::Double);
    let ordered = numeric || ty == SqlType::String;
    let ok = match function {
        AggregateFunction::Sum | AggregateFunction::Avg => numeric,
        AggregateFunction::Min | AggregateFunction::Max => ordered,
        _ => true,
    };
    if ok {
        return Ok(());
    }
    Err(SqlError::new(format!(
        "{expr}: {function:?} takes a number{}, not {ty}",
        if ordered { "" } else { " or a string" }
    )))
}

/// The aggregate a function call names, if it is one.
fn aggregate_function(f: &ast::Function) -> SqlResult<Option<AggregateFunction>> {
    let name = f.name.to_string().to_ascii_uppercase();
    let star = matches!(&f.args, ast::FunctionArguments::List(list)
        if matches!(&list.args[..], [ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Wildcard)]));
    let distinct = matches!(&f.args, ast::FunctionArguments::List(list)
        if list.duplicate_treatment == Some(ast::DuplicateTreatment::Distinct));
    Ok(Some(match name.as_str() {
        "COUNT" if star => AggregateFunction::CountRows,
        "COUNT" if distinct => AggregateFunction::CountDistinct,
        "COUNT" => AggregateFunction::Count,
        "COUNT_DISTINCT" => AggregateFunction::CountDistinct,
        "SUM" => AggregateFunction::Sum,
        "MIN" => AggregateFunction::Min,
        "MAX" => AggregateFunction::Max,
        "AVG" => AggregateFunction::Avg,
        _ => return Ok(None),
    }))
}

fn has_aggregate(select: &ast::Select) -> bool {
    let items = select.projection.iter().filter_map(|item| match item {
        ast::SelectItem::UnnamedExpr(e) | ast::SelectItem::ExprWithAlias { expr: e, .. } => Some(e),
        _ => None,
    });
    items
        .chain(select.having.as_ref())
        .any(|e| contains_aggregate(e).unwrap_or(false))
}

fn contains_aggregate(expr: &ast::Expr) -> SqlResult<bool> {
    if let ast::Expr::Function(f) = expr {
        if aggregate_function(f)?.is_some() {
            return Ok(true);
        }
    }
    for child in children(expr) {
        if contains_aggregate(child)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Sub-expressions, for walks.
fn children(expr: &ast::Expr) -> Vec<&ast::Expr> {
    match expr {
        ast::Expr::BinaryOp { left, right, .. } => vec![left, right],
        ast::Expr::UnaryOp { expr, .. }
        | ast::Expr::Nested(expr)
        | ast::Expr::IsNull(expr)
        | ast::Expr::IsNotNull(expr)
        | ast::Expr::Cast { expr, .. } => vec![expr],
        ast::Expr::Like { expr, pattern, .. } => vec![expr, pattern],
        ast::Expr::Case {
            operand,
            conditions,
            else_result,
            ..
        } => {
            let mut all: Vec<&ast::Expr> = operand.iter().map(|e| &**e).collect();
            for when in conditions {
                all.push(&when.condition);
                all.push(&when.result);
            }
            all.extend(else_result.iter().map(|e| &**e));
            all
        }
        ast::Expr::Function(f) => function_args(f).unwrap_or_default().into_iter().flatten().collect(),
        _ => Vec::new(),
    }
}

/// A function's arguments; `None` for `*`.
fn function_args(f: &ast::Function) -> SqlResult<Vec<Option<&ast::Expr>>> {
    match &f.args {
        ast::FunctionArguments::None => Ok(Vec::new()),
        ast::FunctionArguments::List(list) => list
            .args
            .iter()
            .map(|arg| match arg {
                ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Expr(e)) => Ok(Some(e)),
                ast::FunctionArg::Unnamed(ast::FunctionArgExpr::Wildcard) => Ok(None),
                other => Err(SqlError::new(format!("unsupported argument {other}"))),
            })
            .collect(),
        ast::FunctionArguments::Subquery(_) => Err(SqlError::new("subqueries are not supported")),
    }
}

/// How a grouped SELECT's expressions map onto the aggregate's row.
struct Grouped<'a> {
    keys: &'a [(ast::Expr, Expr)],
    gathered: &'a Gathered,
    input: &'a Scope,
}

/// sqlparser expressions into plan expressions over one scope.
struct Converter<'a> {
    scope: &'a Scope,
    grouped: Option<Grouped<'a>>,
}

impl<'a> Converter<'a> {
    fn plain(scope: &'a Scope) -> Converter<'a> {
        Converter { scope, grouped: None }
    }

    fn convert(&self, expr: &ast::Expr) -> SqlResult<(Expr, SqlType)> {
        let converted = self.convert_at(expr, 0)?;
        Ok(converted)
    }

    fn convert_at(&self, expr: &ast::Expr, depth: usize) -> SqlResult<(Expr, SqlType)> {
        if depth > EXPRESSION_DEPTH_MAX {
            return Err(SqlError::new(format!(
                "expression nests deeper than {EXPRESSION_DEPTH_MAX}"
            )));
        }
        if let Some(grouped) = &self.grouped {
            if let Some(found) = self.grouped_term(grouped, expr)? {
                return Ok(found);
            }
        }
        let next = |e: &ast::Expr| self.convert_at(e, depth + 1);
        match expr {
            ast::Expr::Identifier(id) => self.column(None, id),
            ast::Expr::CompoundIdentifier(ids) => match &ids[..] {
                [.., qualifier, id] => self.column(Some(qualifier), id),
                [id] => self.column(None, id),
                [] => Err(SqlError::new("empty name")),
            },
            ast::Expr::Value(v) => literal(&v.value).map_err(|m| at(m, v.span)),
            ast::Expr::Nested(e) => next(e),
            ast::Expr::IsNull(e) | ast::Expr::IsNotNull(e) => Ok((
                Expr::IsNull {
                    expr: Box::new(next(e)?.0),
                    negated: matches!(expr, ast::Expr::IsNotNull(_)),
                },
                SqlType::Boolean,
            )),
            ast::Expr::UnaryOp { op, expr: e } => unary(*op, next(e)?),
            ast::Expr::BinaryOp { left, op, right } => self.binary(left, op, right, depth),
            ast::Expr::Like {
                negated,
                expr: e,
                pattern,
                escape_char: None,
                any: false,
            } => {
                let pattern = match &**pattern {
                    ast::Expr::Value(v) => match &v.value {
                        ast::Value::SingleQuotedString(s) => s.clone(),
                        other => return Err(at(format!("LIKE takes a quoted pattern, not {other}"), v.span)),
                    },
                    other => return Err(SqlError::new(format!("LIKE takes a quoted pattern, not {other}"))),
                };
                let (e, ty) = next(e)?;
                expect(ty, SqlType::String, "LIKE")?;
                Ok((
                    Expr::Like {
                        expr: Box::new(e),
                        pattern,
                        negated: *negated,
                    },
                    SqlType::Boolean,
                ))
            }
            ast::Expr::Cast { expr: e, data_type, .. } => {
                let to = sql_type(data_type)?;
                Ok((Expr::Cast(Box::new(next(e)?.0), to), to))
            }
            ast::Expr::Case {
                operand,
                conditions,
                else_result,
                ..
            } => self.case(operand.as_deref(), conditions, else_result.as_deref(), depth),
            ast::Expr::Function(f) => self.function(f, depth),
            ast::Expr::Substring {
                expr: e,
                substring_from: Some(from),
                substring_for,
                ..
            } => {
                let mut args = vec![next(e)?, next(from)?];
                if let Some(length) = substring_for {
                    args.push(next(length)?);
                }
                self.call(Function::Substring, args)
            }
            ast::Expr::Trim {
                expr: e,
                trim_where: None,
                trim_what: None,
                trim_characters: None,
            } => self.call(Function::Trim, vec![next(e)?]),
            other => Err(SqlError::new(format!("unsupported expression: {other}"))),
        }
    }

    /// In a grouped SELECT: a GROUP BY expression or an aggregate call.
    fn grouped_term(&self, grouped: &Grouped<'_>, expr: &ast::Expr) -> SqlResult<Option<(Expr, SqlType)>> {
        if let Some(i) = grouped.keys.iter().position(|(written, _)| written == expr) {
            return Ok(Some((Expr::Column(i), self.scope.columns[i].ty)));
        }
        if let Some((_, call)) = grouped.gathered.written.iter().find(|(e, _)| e == expr) {
            let i = grouped.keys.len() + call;
            return Ok(Some((Expr::Column(i), self.scope.columns[i].ty)));
        }
        if let ast::Expr::Identifier(id) = expr {
            let name = ident(id);
            let windowed = matches!(name.as_str(), "WINDOWSTART" | "WINDOWEND");
            if !windowed && grouped.input.find(&name).is_some() {
                return Err(at(
                    format!("column {name} must be in the GROUP BY or inside an aggregate"),
                    id.span,
                ));
            }
        }
        Ok(None)
    }

    fn column(&self, qualifier: Option<&ast::Ident>, id: &ast::Ident) -> SqlResult<(Expr, SqlType)> {
        let qualifier = qualifier.map(ident);
        match self.scope.resolve(qualifier.as_deref(), &ident(id)) {
            Ok((i, ty)) => Ok((Expr::Column(i), ty)),
            Err(message) => Err(at(message, id.span)),
        }
    }

    fn binary(
        &self,
        left: &ast::Expr,
        op: &ast::BinaryOperator,
        right: &ast::Expr,
        depth: usize,
    ) -> SqlResult<(Expr, SqlType)> {
        let (l, lt) = self.convert_at(left, depth + 1)?;
        if *op == ast::BinaryOperator::Arrow {
            let field = match right {
                ast::Expr::Identifier(id) => id.value.clone(),
                ast::Expr::Value(v) => match &v.value {
                    ast::Value::SingleQuotedString(s) => s.clone(),
                    other => return Err(SqlError::new(format!("-> takes a field name, not {other}"))),
                },
                other => return Err(SqlError::new(format!("-> takes a field name, not {other}"))),
            };
            expect(lt, SqlType::Json, "->")?;
            return Ok((Expr::Field(Box::new(l), field), SqlType::Json));
        }
        let (r, rt) = self.convert_at(right, depth + 1)?;
        let numeric = |t: SqlType| matches!(t, SqlType::Int | SqlType::BigInt | SqlType::Double | SqlType::Json);
        let (op, ty) = match op {
            ast::BinaryOperator::Plus => (BinaryOp::Add, arithmetic_type(lt, rt, "+")?),
            ast::BinaryOperator::Minus => (BinaryOp::Subtract, arithmetic_type(lt, rt, "-")?),
            ast::BinaryOperator::Multiply => (BinaryOp::Multiply, arithmetic_type(lt, rt, "*")?),
            ast::BinaryOperator::Divide => (BinaryOp::Divide, arithmetic_type(lt, rt, "/")?),
            ast::BinaryOperator::Modulo => (BinaryOp::Modulo, arithmetic_type(lt, rt, "%")?),
            ast::BinaryOperator::StringConcat => (BinaryOp::Concat, SqlType::String),
            ast::BinaryOperator::And | ast::BinaryOperator::Or => {
                expect(lt, SqlType::Boolean, "AND/OR")?;
                expect(rt, SqlType::Boolean, "AND/OR")?;
                let op = if *op == ast::BinaryOperator::And {
                    BinaryOp::And
                } else {
                    BinaryOp::Or
                };
                (op, SqlType::Boolean)
            }
            comparison => {
                let op = match comparison {
                    ast::BinaryOperator::Eq => BinaryOp::Equal,
                    ast::BinaryOperator::NotEq => BinaryOp::NotEqual,
                    ast::BinaryOperator::Lt => BinaryOp::Less,
                    ast::BinaryOperator::LtEq => BinaryOp::LessOrEqual,
                    ast::BinaryOperator::Gt => BinaryOp::Greater,
                    ast::BinaryOperator::GtEq => BinaryOp::GreaterOrEqual,
                    other => return Err(SqlError::new(format!("unsupported operator {other}"))),
                };
                let comparable = lt == rt || (numeric(lt) && numeric(rt)) || lt == SqlType::Json || rt == SqlType::Json;
                if !comparable {
                    return Err(SqlError::new(format!(
                        "cannot compare {lt} with {rt} ({left} {comparison} {right})"
                    )));
                }
                (op, SqlType::Boolean)
            }
        };
        Ok((Expr::Binary(op, Box::new(l), Box::new(r)), ty))
    }

    fn case(
        &self,
        operand: Option<&ast::Expr>,
        conditions: &[ast::CaseWhen],
        otherwise: Option<&ast::Expr>,
        depth: usize,
    ) -> SqlResult<(Expr, SqlType)> {
        let operand = operand.map(|e| self.convert_at(e, depth + 1)).transpose()?;
        let mut branches = Vec::new();
        let mut ty = None;
        for when in conditions {
            let (condition, ct) = self.convert_at(&when.condition, depth + 1)?;
            let condition = match &operand {
                Some((o, _)) => Expr::Binary(BinaryOp::Equal, Box::new(o.clone()), Box::new(condition)),
                None => {
                    expect(ct, SqlType::Boolean, "CASE WHEN")?;
                    condition
                }
            };
            let (result, rt) = self.convert_at(&when.result, depth + 1)?;
            ty.get_or_insert(rt);
            branches.push((condition, result));
        }
        let otherwise = otherwise.map(|e| self.convert_at(e, depth + 1)).transpose()?;
        let ty = ty.or(otherwise.as_ref().map(|(_, t)| *t)).unwrap_or(SqlType::String);
        Ok((
            Expr::Case {
                branches,
                otherwise: otherwise.map(|(e, _)| Box::new(e)),
            },
            ty,
        ))
    }

    fn function(&self, f: &ast::Function, depth: usize) -> SqlResult<(Expr, SqlType)> {
        let name = f.name.to_string().to_ascii_uppercase();
        if aggregate_function(f)?.is_some() {
            return Err(SqlError::new(format!("{name} is an aggregate: it needs a GROUP BY")));
        }
        if name == "EXPLODE" {
            return Err(SqlError::new(
                "EXPLODE is a table function: use it as a SELECT item of its own (SELECT EXPLODE(x) AS e …), not inside an expression or another clause",
            ));
        }
        let function = Function::ALL
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| *f)
            .ok_or_else(|| {
                let known: Vec<&str> = Function::ALL.iter().map(|(n, _)| *n).collect();
                SqlError::new(format!(
                    "unknown function {name}; known: {}, and the aggregates COUNT, SUM, MIN, MAX, AVG, COUNT_DISTINCT",
                    known.join(", ")
                ))
            })?;
        let mut args = Vec::new();
        for arg in function_args(f)? {
            let arg = arg.ok_or_else(|| SqlError::new(format!("{name}(*) is not a thing")))?;
            args.push(self.convert_at(arg, depth + 1)?);
        }
        self.call(function, args)
    }

    fn call(&self, function: Function, args: Vec<(Expr, SqlType)>) -> SqlResult<(Expr, SqlType)> {
        let types: Vec<SqlType> = args.iter().map(|(_, t)| *t).collect();
        let ty = function_type(function, &types)?;
        Ok((Expr::Call(function, args.into_iter().map(|(e, _)| e).collect()), ty))
    }
}

fn function_type(function: Function, types: &[SqlType]) -> SqlResult<SqlType> {
    let arity = |range: std::ops::RangeInclusive<usize>| {
        if range.contains(&types.len()) {
            Ok(())
        } else {
            Err(SqlError::new(format!(
                "{} takes {} to {} arguments, not {}",
                function.name(),
                range.start(),
                range.end(),
                types.len()
            )))
        }
    };
    match function {
        Function::Upper | Function::Lower | Function::Trim => {
            arity(1..=1)?;
            expect(types[0], SqlType::String, function.name())?;
            Ok(SqlType::String)
        }
        Function::Len => {
            arity(1..=1)?;
            expect(types[0], SqlType::String, "LEN")?;
            Ok(SqlType::Int)
        }
        Function::Substring => {
            arity(2..=3)?;
            expect(types[0], SqlType::String, "SUBSTRING")?;
            Ok(SqlType::String)
        }
        Function::Concat => Ok(SqlType::String),
        Function::Abs | Function::Floor | Function::Ceil => {
            arity(1..=1)?;
            arithmetic_type(types[0], types[0], function.name())
        }
        Function::Round => {
            arity(1..=2)?;
            arithmetic_type(types[0], types[0], "ROUND")?;
            Ok(if types.len() == 2 {
                SqlType::Double
            } else {
                SqlType::BigInt
            })
        }
        Function::Coalesce | Function::IfNull => {
            arity(1..=64)?;
            Ok(types[0])
        }
    }
}

fn expect(found: SqlType, wanted: SqlType, what: &str) -> SqlResult<()> {
    if found == wanted || found == SqlType::Json {
        return Ok(());
    }
    Err(SqlError::new(format!("{what} takes {wanted}, not {found}")))
}

fn arithmetic_type(a: SqlType, b: SqlType, what: &str) -> SqlResult<SqlType> {
    use SqlType::{BigInt, Double, Int, Json};
    match (a, b) {
        (Int, Int) => Ok(Int),
        (Int | BigInt, Int | BigInt) => Ok(BigInt),
        (Int | BigInt | Double | Json, Int | BigInt | Double | Json) => {
            Ok(if a == Double || b == Double { Double } else { BigInt })
        }
        _ => Err(SqlError::new(format!("{what} takes numbers, not {a} and {b}"))),
    }
}

fn unary(op: ast::UnaryOperator, (e, ty): (Expr, SqlType)) -> SqlResult<(Expr, SqlType)> {
    match op {
        ast::UnaryOperator::Not => {
            expect(ty, SqlType::Boolean, "NOT")?;
            Ok((Expr::Unary(UnaryOp::Not, Box::new(e)), SqlType::Boolean))
        }
        ast::UnaryOperator::Minus => Ok((Expr::Unary(UnaryOp::Negate, Box::new(e)), arithmetic_type(ty, ty, "-")?)),
        ast::UnaryOperator::Plus => Ok((e, ty)),
        other => Err(SqlError::new(format!("unsupported operator {other}"))),
    }
}

/// A literal and its type.
pub fn literal(value: &ast::Value) -> Result<(Expr, SqlType), String> {
    let (literal, ty) = match value {
        ast::Value::Number(n, _) => match n.parse::<i64>() {
            Ok(i) => (Literal::Int(i), SqlType::BigInt),
            Err(_) => (
                Literal::Double(n.parse().map_err(|_| format!("{n} is not a number"))?),
                SqlType::Double,
            ),
        },
        ast::Value::SingleQuotedString(s) => (Literal::String(s.clone()), SqlType::String),
        ast::Value::Boolean(b) => (Literal::Boolean(*b), SqlType::Boolean),
        ast::Value::Null => (Literal::Null, SqlType::String),
        other => return Err(format!("unsupported literal {other}")),
    };
    Ok((Expr::Literal(literal), ty))
}

/// A column type as ksqlDB writes it.
pub fn sql_type(data_type: &ast::DataType) -> SqlResult<SqlType> {
    use ast::DataType as D;
    Ok(match data_type {
        D::Boolean | D::Bool => SqlType::Boolean,
        D::Int(_) | D::Integer(_) | D::SmallInt(_) | D::TinyInt(_) => SqlType::Int,
        D::BigInt(_) => SqlType::BigInt,
        D::Double(_) | D::DoublePrecision | D::Float(_) | D::Real | D::Decimal(_) => SqlType::Double,
        D::String(_) | D::Varchar(_) | D::Text | D::Char(_) => SqlType::String,
        D::Struct(..) | D::Map(..) | D::Array(_) | D::JSON => SqlType::Json,
        D::Custom(name, _) if name.to_string().eq_ignore_ascii_case("STRUCT") => SqlType::Json,
        other => {
            return Err(SqlError::new(format!(
                "unsupported type {other}; use BOOLEAN, INT, BIGINT, DOUBLE, STRING, or STRUCT/MAP/ARRAY (nested JSON)"
            )))
        }
    })
}
