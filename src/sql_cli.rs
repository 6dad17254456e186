//! `runnel sql`: KSQL statements against a running cluster, from a shell
//! (line editing and history), `-e` or `-f`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use runnel_sql::push::PushQuery;
use runnel_sql::{Outcome, Session};

use crate::broker_cli::ConnectArgs;

#[derive(clap::Args)]
pub struct SqlArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Run these statements (separated by ';') and exit.
    #[arg(short = 'e', long = "execute", conflicts_with = "file")]
    execute: Option<String>,
    /// Run the statements in this file and exit.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// How to print results.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

pub fn sql(args: SqlArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let session = Session::new(args.connect.connect().await?);
        let script = match (&args.execute, &args.file) {
            (Some(text), _) => Some(text.clone()),
            (None, Some(path)) => {
                Some(std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?)
            }
            (None, None) => None,
        };
        match script {
            Some(script) => run_script(&session, &script, args.format).await,
            None => shell(&session, args.format).await,
        }
    })
}

/// Runs a script; an error names the statement and fails the command.
async fn run_script(session: &Session, script: &str, format: Format) -> anyhow::Result<()> {
    for (text, outcome) in session.execute_script(script).await {
        match outcome {
            Ok(outcome) => print_outcome(session, outcome, format).await?,
            Err(e) => anyhow::bail!("{}", e.render(&text)),
        }
    }
    Ok(())
}

/// The interactive shell: statements end with ';' and may span lines.
async fn shell(session: &Session, format: Format) -> anyhow::Result<()> {
    let mut editor = rustyline::DefaultEditor::new().context("starting the line editor")?;
    let history = std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".runnel_sql_history"));
    if let Some(path) = &history {
        let _ = editor.load_history(path);
    }
    println!("Runnel SQL shell. Statements end with ';'. SHOW STREAMS; lists streams. Ctrl-D exits.");
    let mut pending = String::new();
    loop {
        let prompt = if pending.is_empty() { "runnel> " } else { "     -> " };
        let line = match editor.readline(prompt) {
            Ok(line) => line,
            Err(rustyline::error::ReadlineError::Interrupted) => {
                pending.clear();
                continue;
            }
            Err(rustyline::error::ReadlineError::Eof) => break,
            Err(e) => return Err(e).context("reading a line"),
        };
        pending.push_str(&line);
        pending.push('\n');
        if !line.trim_end().ends_with(';') {
            continue;
        }
        let _ = editor.add_history_entry(pending.trim());
        let script = std::mem::take(&mut pending);
        for (text, outcome) in session.execute_script(&script).await {
            match outcome {
                Ok(outcome) => {
                    if let Err(e) = print_outcome(session, outcome, format).await {
                        eprintln!("error: {e:#}");
                    }
                }
                Err(e) => eprintln!("error: {}", e.render(&text)),
            }
        }
    }
    if let Some(path) = &history {
        let _ = editor.save_history(path);
    }
    Ok(())
}

async fn print_outcome(session: &Session, outcome: Outcome, format: Format) -> anyhow::Result<()> {
    match (outcome, format) {
        (Outcome::Message(text), Format::Table) => println!("{text}"),
        (Outcome::Message(text), Format::Json) => println!("{}", serde_json::json!({ "message": text })),
        (Outcome::Table { columns, rows }, Format::Table) => print_table(&columns, &rows),
        (Outcome::Table { columns, rows }, Format::Json) => {
            for row in rows {
                let object: serde_json::Map<String, serde_json::Value> = columns
                    .iter()
                    .cloned()
                    .zip(row.into_iter().map(serde_json::Value::String))
                    .collect();
                println!("{}", serde_json::Value::Object(object));
            }
        }
        (Outcome::Push { plan, limit }, format) => push(session, &plan, limit, format).await?,
    }
    Ok(())
}

/// Prints a push query's rows as they come, until its LIMIT or Ctrl-C.
async fn push(
    session: &Session,
    plan: &runnel::client::plan::Plan,
    limit: Option<u64>,
    format: Format,
) -> anyhow::Result<()> {
    let mut query = PushQuery::start(session.client().clone(), plan, limit, session.from_earliest()).await?;
    if format == Format::Table {
        println!("{}", query.columns.join(" | "));
    }
    let mut stdout = std::io::stdout();
    while !query.done() {
        let rows = tokio::select! {
            rows = query.poll() => rows?,
            _ = tokio::signal::ctrl_c() => break,
        };
        for row in rows {
            let line = match format {
                Format::Json => row.to_string(),
                Format::Table => query
                    .columns
                    .iter()
                    .map(|c| row.get(c).map_or("null".to_string(), cell))
                    .collect::<Vec<_>>()
                    .join(" | "),
            };
            if writeln!(stdout, "{line}").is_err() {
                return Ok(());
            }
        }
        if stdout.flush().is_err() {
            return Ok(());
        }
    }
    Ok(())
}

fn cell(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_table(columns: &[String], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = columns.iter().map(|c| c.chars().count()).collect();
    for row in rows {
        for (width, value) in widths.iter_mut().zip(row) {
            *width = (*width).max(value.chars().count().min(80));
        }
    }
    let line = |values: &[String]| {
        values
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    println!("{}", line(columns));
    println!(
        "{}",
        widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("-+-")
    );
    for row in rows {
        println!("{}", line(row));
    }
    println!("({} row{})", rows.len(), if rows.len() == 1 { "" } else { "s" });
}
