//! The SQL front end (sql/src/parse.rs, planner.rs): any text a user types
//! into `runnel sql`, split into statements, parsed, planned against a
//! stream and a table it may join, and the plan validated, explained and compiled as a node would
//! (dataflow/src/compile.rs). A statement is refused with an error or
//! planned; a plan the planner made always validates and compiles.

use runnel_client::plan::{Column, ObjectKind, Plan, SqlObject, SqlType};
use runnel_client::protocol::Catalog;
use runnel_dataflow::builder::Emitted;
use runnel_dataflow::table::TableState;
use runnel_dataflow::DataflowDef;
use runnel_sql::from::input_of;
use runnel_sql::parse::{parse_script, Statement};
use runnel_sql::planner::plan_query;

/// Bytes of SQL one input holds at most (a statement's own limit is larger;
/// this keeps each run short).
const SCRIPT_BYTES_MAX: usize = 4096;

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(&data[..data.len().min(SCRIPT_BYTES_MAX)]);
    for (statement, parsed) in parse_script(&text) {
        let parsed = match parsed {
            Ok(parsed) => parsed,
            Err(e) => {
                assert!(!e.to_string().is_empty(), "an error says something");
                continue;
            }
        };
        if let Some(plan) = plan(&statement, parsed.statement) {
            check_plan(&plan);
        }
    }
}

/// `ATTEMPTS (CARD STRING, AMOUNT BIGINT, AT_MS BIGINT, NOTE STRING,
/// META STRUCT)` over topic `attempts`, event time `AT_MS`.
pub fn attempts() -> SqlObject {
    let column = |name: &str, ty| Column { name: name.into(), ty };
    SqlObject {
        name: "ATTEMPTS".into(),
        kind: ObjectKind::Stream,
        topic: "attempts".into(),
        columns: vec![
            column("CARD", SqlType::String),
            column("AMOUNT", SqlType::BigInt),
            column("AT_MS", SqlType::BigInt),
            column("NOTE", SqlType::String),
            column("META", SqlType::Json),
        ],
        timestamp: Some(2),
        key: Vec::new(),
        windowed: false,
        query: None,
        statement: String::new(),
    }
}

/// `CARDS (CARD STRING PRIMARY KEY, COUNTRY STRING)` over topic `cards`.
fn cards() -> SqlObject {
    let column = |name: &str, ty| Column { name: name.into(), ty };
    SqlObject {
        name: "CARDS".into(),
        kind: ObjectKind::Table,
        topic: "cards".into(),
        columns: vec![column("CARD", SqlType::String), column("COUNTRY", SqlType::String)],
        timestamp: None,
        key: vec![0],
        windowed: false,
        query: None,
        statement: String::new(),
    }
}

/// The plan of a query statement over [`attempts`] (and [`cards`]), if it plans.
fn plan(text: &str, statement: Statement) -> Option<Plan> {
    let query = match statement {
        Statement::Select(query)
        | Statement::CreateAs { query, .. }
        | Statement::InsertSelect { query, .. }
        | Statement::ExplainQuery(query) => query,
        _ => return None,
    };
    let catalog = Catalog {
        objects: vec![attempts(), cards()],
        queries: Vec::new(),
    };
    let mut input = match input_of(&catalog, &query) {
        Ok(input) => input,
        Err(e) => {
            assert!(!e.to_string().is_empty(), "an error says something");
            return None;
        }
    };
    for join in &mut input.joins {
        join.partitions = 2;
    }
    match plan_query(text, &query, &input, "out") {
        Ok(planned) => Some(planned.plan),
        Err(e) => {
            assert!(!e.to_string().is_empty(), "an error says something");
            None
        }
    }
}

/// A statement known to plan, compiled: the stages a node runs.
pub fn compiled(statement: &str) -> DataflowDef {
    let parsed = runnel_sql::parse::parse_statement(statement).expect("a known statement parses");
    let plan = plan(statement, parsed.statement).expect("a known statement plans");
    runnel_dataflow::compile::compile("q", &plan).expect("a known statement compiles")
}

fn check_plan(plan: &Plan) {
    plan.validate().expect("a plan the planner made validates");
    let _ = plan.explain("q");
    // Some shapes are refused by the task runtime with a clear error.
    let Ok(def) = runnel_dataflow::compile::compile("q", plan) else {
        return;
    };
    let record = br#"{"card":"c-1","amount":5,"at_ms":1700000000000,"note":"x","meta":{"a":{"b":1}}}"#;
    let mut out = Emitted::default();
    let tables: Vec<TableState> = def.source_stage.table_states();
    let _ = def.source_stage.process_joined(record, 0, &tables, &mut out);
    if let Some(make) = &def.window_stage {
        let mut window = make();
        for r in out.iter() {
            let _ = window.add(
                r.key.unwrap_or_default(),
                r.value.unwrap_or_default(),
                r.timestamp_ms,
                &mut Emitted::default(),
            );
        }
        let _ = window.advance(i64::MAX, &mut Emitted::default());
    }
}
