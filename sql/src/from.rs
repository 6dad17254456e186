//! The FROM clause: the stream a query reads and the tables it joins with,
//! resolved against the catalog.
//!
//! A join is a stream–table join (`FROM s [AS a] [LEFT] JOIN t [AS b] ON
//! a.x = b.id`), inner or left, on the table's PRIMARY KEY: every task that
//! reads the stream holds the whole table (see `runnel_dataflow::table`),
//! so neither side is repartitioned and partition counts need not match.
//! Or it is a stream–stream join (`FROM s [AS a] [LEFT|FULL OUTER] JOIN r
//! [AS b] WITHIN 10 MINUTES ON a.x = b.y`), alone in its query: both sides
//! are repartitioned by their side of the condition (see
//! `runnel_dataflow::join`), and must have as many partitions (the cluster
//! refuses the query otherwise). Or it is a table–table join (`FROM t
//! [LEFT|FULL OUTER] JOIN u ON t.id = u.id`) on both primary keys, alone in
//! its query (see `runnel_dataflow::table_join`).

use runnel_client::plan::{JoinKind, ObjectKind, SqlObject};
use runnel_client::protocol::Catalog;
use sqlparser::ast;

use crate::error::{SqlError, SqlResult};
use crate::parse::{AsOfClause, Query, Within};
use crate::planner::ident;

/// Tables one query joins with, at most.
pub const JOINS_MAX: usize = 4;

/// What a query reads.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    pub source: &'a SqlObject,
    /// What its columns are qualified by: the alias, else the name.
    pub alias: String,
    pub joins: Vec<JoinInput<'a>>,
    /// A stream–stream join (the query's only join).
    pub stream_join: Option<StreamJoinInput<'a>>,
    /// A table–table join (the query's only join).
    pub tables_join: Option<TablesJoinInput<'a>>,
}

/// The table joined with the source table on both primary keys.
#[derive(Clone, Debug)]
pub struct TablesJoinInput<'a> {
    pub table: &'a SqlObject,
    pub alias: String,
    pub kind: JoinKind,
    pub on: &'a ast::Expr,
}

/// The stream joined with the source within a time window.
#[derive(Clone, Debug)]
pub struct StreamJoinInput<'a> {
    pub stream: &'a SqlObject,
    pub alias: String,
    pub kind: JoinKind,
    pub on: &'a ast::Expr,
    pub within: Within,
}

/// One table joined with the stream.
#[derive(Clone, Debug)]
pub struct JoinInput<'a> {
    pub table: &'a SqlObject,
    pub alias: String,
    pub kind: JoinKind,
    pub on: &'a ast::Expr,
    /// The table topic's partitions (filled in by the session, which asks
    /// the cluster).
    pub partitions: u32,
    /// A join by event time: the table's row as it was at the stream
    /// row's time.
    pub as_of: Option<&'a AsOfClause>,
}

impl<'a> Input<'a> {
    /// A query of `source` alone.
    pub fn stream(source: &'a SqlObject) -> Input<'a> {
        Input {
            source,
            alias: source.name.clone(),
            joins: Vec::new(),
            stream_join: None,
            tables_join: None,
        }
    }
}

/// The FROM clause of `query`, resolved in `catalog`.
pub fn input_of<'a>(catalog: &'a Catalog, query: &'a Query) -> SqlResult<Input<'a>> {
    let [from] = &query.select.from[..] else {
        return Err(SqlError::new(
            "FROM takes one stream, optionally joined with tables (FROM s JOIN t ON …), not a list",
        ));
    };
    let (source, alias) = relation(catalog, &from.relation)?;
    if from.joins.len() > JOINS_MAX {
        return Err(SqlError::new(format!("at most {JOINS_MAX} joins in one query")));
    }
    let mut input = Input {
        source,
        alias,
        joins: Vec::new(),
        stream_join: None,
        tables_join: None,
    };
    for join in &from.joins {
        let (table, alias) = relation(catalog, &join.relation)?;
        let (kind, on) = join_kind(&join.join_operator)?;
        if input.alias == alias || input.joins.iter().any(|j| j.alias == alias) {
            return Err(SqlError::new(format!(
                "{alias} names two relations of the FROM clause; give one an alias (FROM s a JOIN t b …)"
            )));
        }
        if source.kind == ObjectKind::Stream && table.kind == ObjectKind::Stream {
            input.stream_join = Some(stream_join(query, from.joins.len(), table, alias, kind, on)?);
            continue;
        }
        if source.kind == ObjectKind::Table && table.kind == ObjectKind::Table {
            input.tables_join = Some(tables_join(query, from.joins.len(), source, table, alias, kind, on)?);
            continue;
        }
        check_sides(source, table)?;
        if kind == JoinKind::Outer {
            return Err(SqlError::new(format!(
                "a stream–table join is [INNER] JOIN or LEFT JOIN, not FULL OUTER JOIN ({} is a table)",
                table.name
            )));
        }
        // After the table's name, or its alias (`JOIN t a FOR …`).
        let as_of = query
            .as_of
            .iter()
            .find(|clause| clause.table == table.name || clause.table == alias);
        input.joins.push(JoinInput {
            table,
            alias,
            kind,
            on,
            partitions: 0,
            as_of,
        });
    }
    check_as_of(query, &input)?;
    if query.within.is_some() && input.stream_join.is_none() {
        return Err(SqlError::new(
            "WITHIN belongs to a join of two streams; a stream–table join joins the table's current row, or its row at a time given by FOR SYSTEM_TIME AS OF",
        ));
    }
    Ok(input)
}

/// Each `FOR SYSTEM_TIME AS OF` follows a table a stream joins with,
/// once.
fn check_as_of(query: &Query, input: &Input<'_>) -> SqlResult<()> {
    for clause in &query.as_of {
        let uses = input
            .joins
            .iter()
            .filter(|join| join.as_of.is_some_and(|c| std::ptr::eq(c, clause)))
            .count();
        if uses != 1 {
            return Err(SqlError::at(
                format!(
                    "FOR SYSTEM_TIME AS OF follows a table a stream joins with, once per table; {} is not one",
                    clause.table
                ),
                clause.line,
                clause.column,
            ));
        }
    }
    Ok(())
}

/// A join of the source table with `table` on both primary keys, the
/// query's only join.
fn tables_join<'a>(
    query: &Query,
    joins: usize,
    source: &SqlObject,
    table: &'a SqlObject,
    alias: String,
    kind: JoinKind,
    on: &'a ast::Expr,
) -> SqlResult<TablesJoinInput<'a>> {
    if joins != 1 || query.within.is_some() {
        return Err(SqlError::new(format!(
            "a table–table join (of {} with {}) is the only join of its query, without WITHIN",
            source.name, table.name
        )));
    }
    for t in [source, table] {
        joinable_table(t)?;
    }
    Ok(TablesJoinInput { table, alias, kind, on })
}

/// A table a join can read: declared with one PRIMARY KEY column, its
/// records keyed by it as text.
fn joinable_table(table: &SqlObject) -> SqlResult<()> {
    if table.key.len() != 1 || table.windowed || table.query.is_some() {
        return Err(SqlError::new(format!(
            "{} cannot be joined with: join a table declared with one PRIMARY KEY column (CREATE TABLE t (id STRING PRIMARY KEY, …) WITH (…)), not an aggregate's table",
            table.name
        )));
    }
    Ok(())
}

/// A join of the source stream with `stream`, which must be the query's
/// only join and say WITHIN how much time its sides' records meet.
fn stream_join<'a>(
    query: &Query,
    joins: usize,
    stream: &'a SqlObject,
    alias: String,
    kind: JoinKind,
    on: &'a ast::Expr,
) -> SqlResult<StreamJoinInput<'a>> {
    if joins != 1 {
        return Err(SqlError::new(format!(
            "a stream–stream join (with {}) is the only join of its query; join its result with more in a second query",
            stream.name
        )));
    }
    let within = query.within.ok_or_else(|| {
        SqlError::new(format!(
            "a join of two streams needs WITHIN, the time their records may be apart: … JOIN {} WITHIN 10 MINUTES ON …",
            stream.name
        ))
    })?;
    Ok(StreamJoinInput {
        stream,
        alias,
        kind,
        on,
        within,
    })
}

/// A named stream or table and what qualifies its columns.
fn relation<'a>(catalog: &'a Catalog, factor: &ast::TableFactor) -> SqlResult<(&'a SqlObject, String)> {
    let ast::TableFactor::Table { name, alias, .. } = factor else {
        return Err(SqlError::new("FROM takes stream and table names"));
    };
    let [ast::ObjectNamePart::Identifier(id)] = &name.0[..] else {
        return Err(SqlError::new(format!("{name} is not a plain name")));
    };
    let object = object_named(catalog, &ident(id))
        .map_err(|e| SqlError::at(e.message, id.span.start.line, id.span.start.column))?;
    let alias = alias.as_ref().map_or_else(|| object.name.clone(), |a| ident(&a.name));
    Ok((object, alias))
}

fn join_kind(operator: &ast::JoinOperator) -> SqlResult<(JoinKind, &ast::Expr)> {
    use ast::JoinOperator as J;
    let (kind, constraint) = match operator {
        J::Join(c) | J::Inner(c) => (JoinKind::Inner, c),
        J::Left(c) | J::LeftOuter(c) => (JoinKind::Left, c),
        J::FullOuter(c) => (JoinKind::Outer, c),
        other => {
            return Err(SqlError::new(format!(
                "only [INNER] JOIN, LEFT [OUTER] JOIN and (of two streams) FULL OUTER JOIN are supported, not {other:?}"
            )))
        }
    };
    match constraint {
        ast::JoinConstraint::On(on) => Ok((kind, on)),
        _ => Err(SqlError::new("a join needs ON left_expression = right_expression")),
    }
}

/// The left side reads as a stream; the right side must be a table with
/// one PRIMARY KEY column whose records are keyed by it as text.
fn check_sides(source: &SqlObject, table: &SqlObject) -> SqlResult<()> {
    if source.kind == ObjectKind::Table {
        return Err(SqlError::new(format!(
            "{} is a table and {} a stream: put the stream on the left (FROM stream JOIN table)",
            source.name, table.name
        )));
    }
    joinable_table(table)
}

pub fn object_named<'a>(catalog: &'a Catalog, name: &str) -> SqlResult<&'a SqlObject> {
    catalog
        .objects
        .iter()
        .find(|o| o.name == name)
        .ok_or_else(|| unknown_object(catalog, name))
}

pub fn unknown_object(catalog: &Catalog, name: &str) -> SqlError {
    let known: Vec<&str> = catalog.objects.iter().map(|o| o.name.as_str()).collect();
    SqlError::new(format!(
        "unknown stream or table {name}; known: {}",
        if known.is_empty() {
            "none (CREATE STREAM declares one)".to_string()
        } else {
            known.join(", ")
        }
    ))
}
