//! `runnel dataflow start|list|describe|stop|delete|reset`.

use std::collections::BTreeSet;

use anyhow::Context;
use runnel::client::protocol::{DataflowMeta, NodeId};
use runnel::client::tasks::TaskStatus;
use runnel::client::Client;

use crate::broker_cli::ConnectArgs;

#[derive(clap::Subcommand)]
pub enum DataflowCommand {
    /// Start a dataflow the nodes' binary registered (e.g. possible_fraud).
    Start {
        /// The dataflow's name.
        name: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Running dataflows and where their tasks run.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Every task of a dataflow: node, input lag, watermark, records in and
    /// out, late drops, dead letters, restarts; a SQL query's plan as a tree
    /// first.
    Describe {
        /// The dataflow's (or SQL query's) name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Stop a dataflow's tasks (its checkpoints stay: a later start resumes).
    Stop {
        /// The dataflow's name.
        name: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Delete a stopped dataflow's internal topics: its checkpoints, its
    /// repartitioned records and its dead letters (its sink stays).
    Delete {
        /// The dataflow's name.
        name: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Start a dataflow (or SQL query) over from the beginning of its
    /// source: stop it, delete its internal topics, start it again. Its
    /// sink keeps what it held; its results are written again.
    Reset {
        /// The dataflow's (or SQL query's) name.
        name: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

pub fn dataflow(command: DataflowCommand) -> anyhow::Result<()> {
    crate::broker_cli::runtime()?.block_on(async move {
        match command {
            DataflowCommand::Start { name, connect } => {
                connect
                    .connect()
                    .await?
                    .start_dataflow(&name)
                    .await
                    .map_err(|e| start_hint(e, &name))?;
                println!("dataflow {name:?} started");
            }
            DataflowCommand::Stop { name, connect } => {
                let client = connect.connect().await?;
                if let Err(e) = client.stop_dataflow(&name).await {
                    let running = running_names(&client).await;
                    return Err(anyhow::Error::new(e).context(format!("stopping {name:?} (running: {running})")));
                }
                println!("dataflow {name:?} stopped");
            }
            DataflowCommand::Delete { name, connect } => {
                let client = connect.connect().await?;
                if client.dataflows().await?.iter().any(|d| d.name == name) {
                    anyhow::bail!("dataflow {name:?} is running; stop it first (`runnel dataflow stop {name}`)");
                }
                let deleted = delete_internal_topics(&client, &name).await?;
                println!(
                    "deleted {}",
                    names_or_none(&deleted.iter().map(String::as_str).collect::<Vec<_>>())
                );
            }
            DataflowCommand::Reset { name, connect } => {
                let client = connect.connect().await?;
                let reset = crate::dataflow_reset::reset(&client, &name).await?;
                let deleted: Vec<&str> = reset.deleted.iter().map(String::as_str).collect();
                println!(
                    "{} {name:?}{}; deleted {}; started again from the beginning (its sink keeps its earlier results)",
                    if reset.query { "query" } else { "dataflow" },
                    if reset.stopped { " stopped" } else { " was not running" },
                    names_or_none(&deleted)
                );
            }
            DataflowCommand::List { json, connect } => {
                let dataflows = connect.connect().await?.dataflows().await?;
                print_list(&dataflows, json)?;
            }
            DataflowCommand::Describe { name, json, connect } => {
                let client = connect.connect().await?;
                let tasks = describe(&client, &name).await?;
                if !json {
                    // A SQL query's plan, as a tree (ksqlDB's EXPLAIN).
                    let catalog = client.catalog().await?;
                    if let Some((_, plan)) = catalog.queries.iter().find(|(d, _)| d.name == name) {
                        println!("{}", plan.explain(&name));
                    }
                }
                print_tasks(&tasks, json)?;
            }
        }
        Ok(())
    })
}

fn print_list(dataflows: &[DataflowMeta], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(dataflows)?);
        return Ok(());
    }
    if dataflows.is_empty() {
        println!("no dataflow is running");
    }
    for d in dataflows {
        let nodes: BTreeSet<NodeId> = d.placement.iter().copied().collect();
        println!(
            "{}  {} -> {}  {} stage(s) x {} partition(s) = {} tasks on nodes {:?}",
            d.name,
            d.source,
            d.sink,
            d.stages,
            d.partitions,
            d.placement.len(),
            nodes
        );
    }
    Ok(())
}

/// Every task of `name`, as the node it is placed on reports it (or marked
/// unreachable when that node does not answer).
pub async fn describe(client: &Client, name: &str) -> anyhow::Result<Vec<TaskStatus>> {
    let dataflows = client.dataflows().await?;
    let dataflow = dataflows.iter().find(|d| d.name == name).with_context(|| {
        let running: Vec<&str> = dataflows.iter().map(|d| d.name.as_str()).collect();
        format!(
            "dataflow {name:?} is not running (running: {})",
            names_or_none(&running)
        )
    })?;
    let mut tasks = Vec::with_capacity(dataflow.placement.len());
    let nodes: BTreeSet<NodeId> = dataflow.placement.iter().copied().collect();
    let mut reports = Vec::new();
    for node in nodes {
        match client.dataflow_tasks(node).await {
            Ok(report) => reports.extend(report.into_iter().filter(|t| t.dataflow == name)),
            Err(e) => tracing::debug!(node = %node, error = %e, "node did not report its tasks"),
        }
    }
    for (task, &node) in dataflow.placement.iter().enumerate() {
        let task = task as u32;
        let report = reports.iter().find(|t| t.task == task && t.node == node).cloned();
        tasks.push(report.unwrap_or_else(|| TaskStatus {
            dataflow: name.to_string(),
            task,
            stage: task / dataflow.partitions.max(1),
            partition: task % dataflow.partitions.max(1),
            node,
            state: "not reported (node unreachable or starting)".to_string(),
            ..TaskStatus::default()
        }));
    }
    Ok(tasks)
}

fn print_tasks(tasks: &[TaskStatus], json: bool) -> anyhow::Result<()> {
    if json {
        let mut list = Vec::with_capacity(tasks.len());
        for task in tasks {
            let mut entry = serde_json::to_value(task)?;
            entry["lag"] = task.input_end.saturating_sub(task.input_offset).into();
            list.push(entry);
        }
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:>4} {:>5} {:>4} {:>4}  {:<28} {:>9} {:>7} {:>15} {:>9} {:>9} {:>6} {:>5} {:>8}  state",
        "task",
        "stage",
        "part",
        "node",
        "input",
        "offset",
        "lag",
        "watermark_ms",
        "in",
        "out",
        "late",
        "dlq",
        "restarts"
    );
    for t in tasks {
        let watermark = t.watermark_ms.map_or("-".to_string(), |w| w.to_string());
        println!(
            "{:>4} {:>5} {:>4} {:>4}  {:<28} {:>9} {:>7} {:>15} {:>9} {:>9} {:>6} {:>5} {:>8}  {}",
            t.task,
            t.stage,
            t.partition,
            t.node,
            t.input_topic,
            t.input_offset,
            t.input_end.saturating_sub(t.input_offset),
            watermark,
            t.records_in,
            t.records_out,
            t.late_records,
            t.dead_letters,
            t.restarts,
            t.state
        );
    }
    Ok(())
}

/// `dataflow start`'s error with what to do: a missing source topic is
/// named with the command that makes it; an unknown dataflow, with those
/// this binary knows.
pub(crate) fn start_hint(error: runnel::client::ClientError, name: &str) -> anyhow::Error {
    use runnel::client::ClientError;
    let hint = match &error {
        ClientError::UnknownTopic(topic) => format!(
            "dataflow {name:?} reads topic {topic:?}, which does not exist: create it first, such as \
             `runnel topic create {topic} -p 3 -r 3`"
        ),
        ClientError::Refused(runnel::client::protocol::MetadataError::UnregisteredDataflow(_)) => {
            let known = runnel::dataflow::builtin().names();
            let known: Vec<&str> = known.iter().map(String::as_str).collect();
            format!(
                "this binary has dataflows {}; SQL queries start with `runnel sql`",
                names_or_none(&known)
            )
        }
        _ => return anyhow::Error::new(error),
    };
    anyhow::Error::new(error).context(hint)
}

/// The names of the running dataflows, for an error message.
async fn running_names(client: &runnel::client::Client) -> String {
    match client.dataflows().await {
        Ok(dataflows) => {
            let names: Vec<&str> = dataflows.iter().map(|d| d.name.as_str()).collect();
            names_or_none(&names)
        }
        Err(_) => "unknown".to_string(),
    }
}

fn names_or_none(names: &[&str]) -> String {
    match names.is_empty() {
        true => "none".to_string(),
        false => names.join(", "),
    }
}

/// Deletes a dataflow's checkpoint, repartition and dead-letter topics;
/// the names of those that existed.
pub(crate) async fn delete_internal_topics(client: &Client, name: &str) -> anyhow::Result<Vec<String>> {
    use runnel::client::protocol::MetadataError;
    use runnel::client::tasks::{checkpoint_topic, dead_letter_topic, repartition_topic};
    use runnel::client::ClientError;
    let topics = [checkpoint_topic(name), repartition_topic(name), dead_letter_topic(name)];
    let existing: BTreeSet<String> = client.topics().await?.into_iter().map(|t| t.name).collect();
    let mut deleted = Vec::new();
    for topic in topics.into_iter().filter(|t| existing.contains(t)) {
        // Unknown now, there a moment ago: deleted (a request sent again
        // after its first answer was lost finds it gone).
        match client.delete_topic(&topic).await {
            Ok(()) | Err(ClientError::UnknownTopic(_)) => {}
            Err(ClientError::Refused(MetadataError::UnknownTopic(_))) => {}
            Err(e) => return Err(anyhow::Error::new(e).context(format!("deleting {topic}"))),
        }
        deleted.push(topic);
    }
    Ok(deleted)
}
