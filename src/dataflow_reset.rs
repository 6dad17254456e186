//! `runnel dataflow reset NAME`: a dataflow started over from the beginning
//! of its source, as Kafka Streams' application reset tool does. Its tasks
//! are stopped (and awaited), its internal topics (checkpoints, repartitioned
//! records, dead letters) deleted, its generation advanced (its tasks write
//! with the next producer epoch, so the sink takes the new output as new and
//! not as retries of the old), and it is started again: a registered
//! dataflow by name, a SQL query from the plan it was running, still writing
//! the stream or table it wrote. Its sink keeps what it held; the results
//! are written again from the beginning.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use runnel::client::plan::{Plan, SqlObject};
use runnel::client::protocol::{DataflowMeta, NodeId};
use runnel::client::Client;

/// How long the stopped tasks may take to end.
const STOP_WAIT: Duration = Duration::from_secs(30);
const STOP_POLL: Duration = Duration::from_millis(100);

/// What a reset did.
pub struct Reset {
    pub stopped: bool,
    pub deleted: Vec<String>,
    /// Whether it was restarted as a SQL query (from its plan).
    pub query: bool,
}

/// Starts `name` over; see the module's text.
pub async fn reset(client: &Client, name: &str) -> anyhow::Result<Reset> {
    let running = client.dataflows().await?.into_iter().find(|d| d.name == name);
    let query = sql_query(client, name).await?;
    if let Some((_, Some(object))) = &query {
        refuse_if_read_by_another_query(client, name, object).await?;
    }
    if let Some(dataflow) = &running {
        client.stop_dataflow(name).await?;
        wait_until_stopped(client, dataflow).await?;
    }
    let deleted = crate::dataflow_cli::delete_internal_topics(client, name).await?;
    client.reset_dataflow(name).await?;
    let is_query = query.is_some();
    match query {
        Some((plan, object)) => restart_query(client, name, plan, object).await?,
        None => client
            .start_dataflow(name)
            .await
            .map_err(|e| crate::dataflow_cli::start_hint(e, name))?,
    }
    Ok(Reset {
        stopped: running.is_some(),
        deleted,
        query: is_query,
    })
}

/// A running SQL query's plan and the stream or table it writes; none for
/// a registered dataflow (its plan names its registered steps).
async fn sql_query(client: &Client, name: &str) -> anyhow::Result<Option<(Plan, Option<SqlObject>)>> {
    let catalog = client.catalog().await?;
    let Some((_, plan)) = catalog.queries.into_iter().find(|(d, _)| d.name == name) else {
        return Ok(None);
    };
    if plan.registered().is_some() {
        return Ok(None);
    }
    let object = catalog.objects.into_iter().find(|o| o.query.as_deref() == Some(name));
    Ok(Some((plan, object)))
}

/// A query's stream or table is named again by dropping and re-creating
/// it, which another query reading it forbids: refused before anything stops.
async fn refuse_if_read_by_another_query(client: &Client, name: &str, object: &SqlObject) -> anyhow::Result<()> {
    let readers: Vec<String> = client
        .catalog()
        .await?
        .queries
        .into_iter()
        .filter(|(d, plan)| d.name != name && plan.source.topic == object.topic)
        .map(|(d, _)| d.name)
        .collect();
    if !readers.is_empty() {
        bail!(
            "{} is read by running queries {readers:?}; terminate them before resetting {name}",
            object.name
        );
    }
    Ok(())
}

/// Polls the nodes that ran `dataflow`'s tasks until none reports one (a
/// node that does not answer runs none).
async fn wait_until_stopped(client: &Client, dataflow: &DataflowMeta) -> anyhow::Result<()> {
    let nodes: BTreeSet<NodeId> = dataflow.placement.iter().copied().collect();
    let deadline = Instant::now() + STOP_WAIT;
    loop {
        let mut running = 0usize;
        for &node in &nodes {
            if let Ok(tasks) = client.dataflow_tasks(node).await {
                running += tasks.iter().filter(|t| t.dataflow == dataflow.name).count();
            }
        }
        if running == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "dataflow {:?} was stopped but {running} of its tasks still run after {} s; it stays stopped \
                 (run the reset again)",
                dataflow.name,
                STOP_WAIT.as_secs()
            );
        }
        tokio::time::sleep(STOP_POLL).await;
    }
}

/// Starts a SQL query again from its plan, naming its stream or table again.
async fn restart_query(client: &Client, name: &str, plan: Plan, object: Option<SqlObject>) -> anyhow::Result<()> {
    if let Some(object) = &object {
        client
            .drop_object(&object.name)
            .await
            .with_context(|| format!("naming {} again for the restarted query", object.name))?;
    }
    client
        .start_query(name, plan, object)
        .await
        .with_context(|| format!("starting query {name} again"))
}
