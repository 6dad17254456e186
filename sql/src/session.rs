//! Statements executed against a cluster.
//!
//! The catalog (streams and tables) and persistent queries are committed
//! to the controller's metadata, so they are the cluster's, not this
//! session's: every node sees them and they survive restarts. A statement
//! is checked whole (names, types, limits) before anything is sent, so a
//! refused statement changes nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use runnel_client::plan::{Column, ObjectKind, Plan, SqlObject, SqlType};
use runnel_client::protocol::{Catalog, CleanupPolicy, MetadataError, TopicConfig};
use runnel_client::tasks::{checkpoint_topic, repartition_topic};
use runnel_client::{Acks, Client, ClientError, Producer};
use runnel_storage::Record;
use sqlparser::ast;

use crate::error::{SqlError, SqlResult};
use crate::from::{input_of, object_named, unknown_object, Input};
use crate::parse::{self, Listing, Parsed, Query, Statement, With};
use crate::planner::{ident, literal, plan_query, sql_type};
use crate::pull::PullQuery;

/// What a statement produced.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// A confirmation (`Stream POSSIBLE_FRAUD created and running`).
    Message(String),
    /// Rows to print.
    Table {
        columns: Vec<String>,
        rows: Vec<Vec<String>>,
    },
    /// A push query: planned here, run by the caller (see `PushQuery`).
    Push { plan: Plan, limit: Option<u64> },
}

/// A SQL session on a cluster.
pub struct Session {
    client: Arc<Client>,
    /// `SET` properties, for this session only.
    properties: Mutex<BTreeMap<String, String>>,
}

impl Session {
    pub fn new(client: Arc<Client>) -> Session {
        Session {
            client,
            properties: Mutex::default(),
        }
    }

    /// Whether push queries start at the beginning of their source
    /// (`SET 'auto.offset.reset' = 'earliest'`) rather than its end.
    pub fn from_earliest(&self) -> bool {
        let properties = self.properties.lock().unwrap_or_else(|p| p.into_inner());
        properties
            .get("auto.offset.reset")
            .is_some_and(|v| v.eq_ignore_ascii_case("earliest"))
    }

    /// `auto.offset.reset` as set, else its default.
    fn offset_reset_name(&self) -> String {
        let earliest = self.from_earliest();
        if earliest { "earliest" } else { "latest" }.to_string()
    }

    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    /// Runs a script's statements in order, stopping at the first refused
    /// one: each statement with its outcome.
    pub async fn execute_script(&self, script: &str) -> Vec<(String, SqlResult<Outcome>)> {
        let mut done = Vec::new();
        for (text, parsed) in parse::parse_script(script) {
            let outcome = match parsed {
                Ok(parsed) => self.execute(&parsed).await,
                Err(e) => Err(e),
            };
            let failed = outcome.is_err();
            done.push((text, outcome));
            if failed {
                break;
            }
        }
        done
    }

    /// Runs one parsed statement.
    pub async fn execute(&self, parsed: &Parsed) -> SqlResult<Outcome> {
        let text = parsed.text.as_str();
        match &parsed.statement {
            Statement::CreateSource {
                kind,
                name,
                columns,
                with,
            } => self.create_source(text, *kind, name, columns, with).await,
            Statement::CreateAs {
                kind,
                name,
                with,
                query,
            } => self.create_as(text, *kind, name, with, query).await,
            Statement::InsertValues { target, columns, rows } => self.insert_values(target, columns, rows).await,
            Statement::InsertSelect { target, query } => self.insert_select(text, target, query).await,
            Statement::Select(query) if query.emit.is_none() => {
                let catalog = self.catalog().await?;
                let input = input_of(&catalog, query)?;
                if !input.joins.is_empty() || input.stream_join.is_some() || input.tables_join.is_some() {
                    return Err(SqlError::new(
                        "a pull query reads one table's state; a join needs EMIT CHANGES (a push query) or CREATE STREAM … AS",
                    ));
                }
                PullQuery::plan(&catalog, input.source, query)?.run(&self.client).await
            }
            Statement::Select(query) => {
                let catalog = self.catalog().await?;
                let input = self.input_of(&catalog, query).await?;
                let planned = plan_query(text, query, &input, "")?;
                Ok(Outcome::Push {
                    plan: planned.plan,
                    limit: query.limit,
                })
            }
            Statement::Show(listing) => self.show(*listing).await,
            Statement::Describe { name, extended } => self.describe(name, *extended).await,
            Statement::Explain(id) => self.explain(id).await,
            Statement::ExplainQuery(query) => {
                let catalog = self.catalog().await?;
                let input = self.input_of(&catalog, query).await?;
                let planned = plan_query(text, query, &input, "(push query)")?;
                Ok(Outcome::Message(planned.plan.explain("(push query)")))
            }
            Statement::Drop {
                kind,
                name,
                if_exists,
                delete_topic,
            } => self.drop(*kind, name, *if_exists, *delete_topic).await,
            Statement::Set { property, value } => {
                if property != "auto.offset.reset"
                    || !["earliest", "latest"].contains(&value.to_ascii_lowercase().as_str())
                {
                    return Err(SqlError::new(format!(
                        "unsupported property {property}={value}; 'auto.offset.reset' takes 'earliest' or 'latest'"
                    )));
                }
                let mut properties = self.properties.lock().unwrap_or_else(|p| p.into_inner());
                properties.insert(property.clone(), value.clone());
                Ok(Outcome::Message(format!("Property {property} set to {value}")))
            }
            Statement::Terminate(id) => self.terminate(id).await,
            Statement::TerminateAll => self.terminate_all().await,
        }
    }

    pub async fn catalog(&self) -> SqlResult<Catalog> {
        self.client.catalog().await.map_err(cluster)
    }

    /// `{prefix}_{n}` for the least `n` no query ever used: neither a
    /// running query nor the checkpoints a terminated one may have left
    /// (a new query must never restore another's state).
    /// The FROM clause of `query`, with the partitions of the tables it joins.
    async fn input_of<'a>(&self, catalog: &'a Catalog, query: &'a Query) -> SqlResult<Input<'a>> {
        let mut input = input_of(catalog, query)?;
        if input.joins.is_empty() {
            return Ok(input);
        }
        let topics = self.client.topics().await.map_err(cluster)?;
        for join in &mut input.joins {
            let topic = topics.iter().find(|t| t.name == join.table.topic).ok_or_else(|| {
                SqlError::new(format!(
                    "table {}'s topic {} does not exist",
                    join.table.name, join.table.topic
                ))
            })?;
            join.partitions = topic.config.partitions;
        }
        Ok(input)
    }

    async fn fresh_query_id(&self, catalog: &Catalog, prefix: &str) -> SqlResult<String> {
        let topics = self.client.topics().await.map_err(cluster)?;
        let used = |id: &str| {
            catalog.queries.iter().any(|(d, _)| d.name == id)
                || topics
                    .iter()
                    .any(|t| t.name == checkpoint_topic(id) || t.name == repartition_topic(id))
        };
        (0..QUERY_IDS_MAX)
            .map(|n| format!("{prefix}_{n}"))
            .find(|id| !used(id))
            .ok_or_else(|| SqlError::new(format!("{QUERY_IDS_MAX} query ids {prefix}_n are taken")))
    }

    /// Waits (bounded) until the catalog this session reads no longer lists
    /// query `id`: the controller leader committed the stop, and the node
    /// answering may apply it a moment later. The next statement then sees
    /// its own TERMINATE.
    async fn await_stopped(&self, id: &str) -> SqlResult<()> {
        let deadline = tokio::time::Instant::now() + STOP_VISIBLE_WAIT;
        while tokio::time::Instant::now() < deadline {
            let catalog = self.catalog().await?;
            if !catalog.queries.iter().any(|(d, _)| d.name == id) {
                return Ok(());
            }
            tokio::time::sleep(STOP_VISIBLE_POLL).await;
        }
        Ok(())
    }

    /// Every running query terminated, one by one (`TERMINATE ALL`).
    async fn terminate_all(&self) -> SqlResult<Outcome> {
        let catalog = self.catalog().await?;
        let mut said = Vec::new();
        for (dataflow, _) in &catalog.queries {
            match self.terminate(&dataflow.name).await? {
                Outcome::Message(line) => said.push(line),
                _ => unreachable!("terminate answers with a message"),
            }
        }
        if said.is_empty() {
            said.push("No query is running".to_string());
        }
        Ok(Outcome::Message(said.join("\n")))
    }

    /// Stops a SQL query and deletes its internal state (checkpoints and
    /// repartition topic): its id is never used again, so nothing could
    /// resume from them. Its dead letters stay for inspection. A Rust
    /// dataflow is only stopped: its state stays for `runnel dataflow start`.
    async fn terminate(&self, id: &str) -> SqlResult<Outcome> {
        let catalog = self.catalog().await?;
        let Some((_, plan)) = catalog.queries.iter().find(|(d, _)| d.name == id) else {
            return Err(unknown_query(&catalog, id));
        };
        // Unknown now, running a moment ago: stopped, by this request
        // (its first answer lost and the request sent again) or another.
        match self.client.stop_dataflow(id).await {
            Ok(()) | Err(ClientError::Refused(MetadataError::UnknownDataflow(_))) => {}
            Err(e) => return Err(cluster(e)),
        }
        self.await_stopped(id).await?;
        if plan.registered().is_some() {
            return Ok(Outcome::Message(format!(
                "Rust dataflow {id} stopped; its checkpoints stay (`runnel dataflow start {id}` resumes it, `runnel dataflow delete {id}` removes them)"
            )));
        }
        for topic in [checkpoint_topic(id), repartition_topic(id)] {
            match self.client.delete_topic(&topic).await {
                Ok(()) | Err(ClientError::UnknownTopic(_)) => {}
                Err(ClientError::Refused(MetadataError::UnknownTopic(_))) => {}
                Err(e) => {
                    return Err(SqlError::new(format!(
                        "query {id} terminated, but deleting {topic}: {e}"
                    )))
                }
            }
        }
        Ok(Outcome::Message(format!("Query {id} terminated")))
    }

    async fn create_source(
        &self,
        text: &str,
        kind: ObjectKind,
        name: &ast::Ident,
        columns: &[ast::ColumnDef],
        with: &With,
    ) -> SqlResult<Outcome> {
        with.only(&[
            "KAFKA_TOPIC",
            "VALUE_FORMAT",
            "PARTITIONS",
            "REPLICAS",
            "TIMESTAMP",
            "KEY",
        ])?;
        check_format(with)?;
        let name = ident(name);
        let topic = with.text("KAFKA_TOPIC")?.unwrap_or_else(|| name.clone());
        let (columns, key) = source_columns(columns, with)?;
        let timestamp = match with.text("TIMESTAMP")? {
            None => None,
            Some(column) => Some(timestamp_column(&columns, &column)?),
        };
        let catalog = self.catalog().await?;
        if catalog.objects.iter().any(|o| o.name == name) {
            return Err(SqlError::new(format!("a stream or table named {name} already exists")));
        }
        self.ensure_topic(&topic, kind, with).await?;
        let object = SqlObject {
            name: name.clone(),
            kind,
            topic: topic.clone(),
            columns,
            timestamp,
            key,
            windowed: false,
            query: None,
            statement: text.to_string(),
        };
        self.client.create_object(object).await.map_err(cluster)?;
        Ok(Outcome::Message(format!(
            "{} {name} created over topic {topic}",
            title(kind)
        )))
    }

    /// Makes `topic` when PARTITIONS says so (compacted for a table, whose
    /// records are the latest row of each key, as ksqlDB makes it); else it
    /// must exist.
    async fn ensure_topic(&self, topic: &str, kind: ObjectKind, with: &With) -> SqlResult<()> {
        let exists = self
            .client
            .topics()
            .await
            .map_err(cluster)?
            .iter()
            .any(|t| t.name == topic);
        match (exists, with.number("PARTITIONS")?) {
            (true, _) => Ok(()),
            (false, None) => Err(SqlError::new(format!(
                "topic {topic} does not exist; give PARTITIONS=n in WITH (…) to create it, or create it first"
            ))),
            (false, Some(partitions)) => {
                let nodes = self.client.alive_nodes().len().max(1);
                let replicas = with.number("REPLICAS")?.unwrap_or(nodes.min(3) as u64);
                let mut config = TopicConfig::new(
                    u32::try_from(partitions).map_err(|_| SqlError::new("PARTITIONS is too large"))?,
                    u16::try_from(replicas).map_err(|_| SqlError::new("REPLICAS is too large"))?,
                );
                if kind == ObjectKind::Table {
                    config.cleanup = CleanupPolicy::Compact;
                }
                match self.client.create_topic(topic, config).await {
                    Ok(()) | Err(ClientError::Refused(MetadataError::TopicExists(_))) => Ok(()),
                    Err(e) => Err(cluster(e)),
                }
            }
        }
    }

    async fn create_as(
        &self,
        text: &str,
        kind: ObjectKind,
        name: &ast::Ident,
        with: &With,
        query: &Query,
    ) -> SqlResult<Outcome> {
        with.only(&["KAFKA_TOPIC", "VALUE_FORMAT", "PARTITIONS", "REPLICAS"])?;
        check_format(with)?;
        let name = ident(name);
        let topic = with.text("KAFKA_TOPIC")?.unwrap_or_else(|| name.clone());
        let catalog = self.catalog().await?;
        if catalog.objects.iter().any(|o| o.name == name) {
            return Err(SqlError::new(format!("a stream or table named {name} already exists")));
        }
        let input = self.input_of(&catalog, query).await?;
        let planned = plan_query(text, query, &input, &topic)?;
        if kind == ObjectKind::Table && planned.kind == ObjectKind::Stream {
            return Err(SqlError::new(
                "CREATE TABLE … AS SELECT needs a GROUP BY; use CREATE STREAM",
            ));
        }
        let prefix = format!("{}_{name}", if kind == ObjectKind::Table { "CTAS" } else { "CSAS" });
        let id = self.fresh_query_id(&catalog, &prefix).await?;
        let object = SqlObject {
            name: name.clone(),
            kind,
            topic: topic.clone(),
            columns: planned.plan.sink.columns.clone(),
            timestamp: None,
            key: planned.plan.sink.key.clone(),
            windowed: planned.windowed,
            query: Some(id.clone()),
            statement: text.to_string(),
        };
        self.client
            .start_query(&id, planned.plan, Some(object))
            .await
            .map_err(cluster)?;
        Ok(Outcome::Message(format!(
            "{} {name} created and running: query {id} writes topic {topic}",
            title(kind)
        )))
    }

    async fn insert_select(&self, text: &str, target: &ast::Ident, query: &Query) -> SqlResult<Outcome> {
        let catalog = self.catalog().await?;
        let target = object_named(&catalog, &ident(target))?;
        let input = self.input_of(&catalog, query).await?;
        let planned = plan_query(text, query, &input, &target.topic)?;
        if planned.plan.sink.columns != target.columns {
            return Err(SqlError::new(format!(
                "the SELECT's columns ({}) are not {}'s ({})",
                describe_columns(&planned.plan.sink.columns),
                target.name,
                describe_columns(&target.columns)
            )));
        }
        let id = self.fresh_query_id(&catalog, "INSERTQUERY").await?;
        self.client
            .start_query(&id, planned.plan, None)
            .await
            .map_err(cluster)?;
        Ok(Outcome::Message(format!("Query {id} inserts into {}", target.name)))
    }

    async fn insert_values(
        &self,
        target: &ast::Ident,
        names: &[ast::Ident],
        rows: &[Vec<ast::Expr>],
    ) -> SqlResult<Outcome> {
        let catalog = self.catalog().await?;
        let target = object_named(&catalog, &ident(target))?;
        let names: Vec<String> = if names.is_empty() {
            target.columns.iter().map(|c| c.name.clone()).collect()
        } else {
            names.iter().map(ident).collect()
        };
        let mut records = Vec::with_capacity(rows.len());
        for row in rows {
            records.push(value_record(target, &names, row)?);
        }
        let mut producer = Producer::new(self.client.clone(), &target.topic, Acks::All)
            .await
            .map_err(cluster)?;
        for record in records {
            producer.send(None, record).await.map_err(cluster)?;
        }
        producer.flush().await.map_err(cluster)?;
        Ok(Outcome::Message(format!(
            "{} row(s) inserted into {}",
            rows.len(),
            target.name
        )))
    }

    async fn show(&self, listing: Listing) -> SqlResult<Outcome> {
        let catalog = self.catalog().await?;
        let columns = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
        let (columns, rows) = match listing {
            Listing::Streams | Listing::Tables => {
                let kind = if listing == Listing::Streams {
                    ObjectKind::Stream
                } else {
                    ObjectKind::Table
                };
                let rows = catalog
                    .objects
                    .iter()
                    .filter(|o| o.kind == kind)
                    .map(|o| {
                        vec![
                            o.name.clone(),
                            o.topic.clone(),
                            "JSON".to_string(),
                            o.windowed.to_string(),
                        ]
                    })
                    .collect();
                (columns(&["Name", "Kafka Topic", "Value Format", "Windowed"]), rows)
            }
            Listing::Queries => {
                let rows = catalog
                    .queries
                    .iter()
                    .map(|(d, plan)| {
                        vec![
                            d.name.clone(),
                            d.sink.clone(),
                            format!("{} tasks", d.placement.len()),
                            plan.statement.clone(),
                        ]
                    })
                    .collect();
                (columns(&["Query ID", "Sink Topic", "Tasks", "Statement"]), rows)
            }
            Listing::Topics => {
                let topics = self.client.topics().await.map_err(cluster)?;
                let rows = topics
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            t.config.partitions.to_string(),
                            t.config.replication.to_string(),
                        ]
                    })
                    .collect();
                (columns(&["Kafka Topic", "Partitions", "Replicas"]), rows)
            }
            Listing::Properties => {
                let reset = self.offset_reset_name();
                let rows = vec![vec!["auto.offset.reset".to_string(), "SESSION".to_string(), reset]];
                (columns(&["Property", "Scope", "Value"]), rows)
            }
        };
        Ok(Outcome::Table { columns, rows })
    }

    async fn describe(&self, name: &str, extended: bool) -> SqlResult<Outcome> {
        let catalog = self.catalog().await?;
        let object = object_named(&catalog, name)?;
        let mut rows: Vec<Vec<String>> = object
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let role = if object.key.contains(&i) { "(key)" } else { "" };
                vec![c.name.clone(), format!("{}{}", c.ty, role)]
            })
            .collect();
        if extended {
            let partitions = self
                .client
                .describe_topic(&object.topic)
                .await
                .map(|t| t.config.partitions.to_string())
                .unwrap_or_else(|e| format!("unknown ({e})"));
            rows.push(vec!["-- type".into(), object.kind.to_string()]);
            rows.push(vec![
                "-- topic".into(),
                format!("{} ({partitions} partitions)", object.topic),
            ]);
            rows.push(vec![
                "-- written by".into(),
                object.query.clone().unwrap_or_else(|| "-".into()),
            ]);
            rows.push(vec!["-- statement".into(), object.statement.clone()]);
        }
        Ok(Outcome::Table {
            columns: vec!["Field".into(), "Type".into()],
            rows,
        })
    }

    async fn explain(&self, id: &str) -> SqlResult<Outcome> {
        let catalog = self.catalog().await?;
        let (dataflow, plan) = catalog
            .queries
            .iter()
            .find(|(d, _)| d.name == id)
            .ok_or_else(|| unknown_query(&catalog, id))?;
        let mut text = plan.explain(id);
        let placement: Vec<String> = dataflow
            .placement
            .iter()
            .enumerate()
            .map(|(task, node)| {
                let stage = task as u32 / dataflow.partitions.max(1);
                let partition = task as u32 % dataflow.partitions.max(1);
                format!("stage {stage} partition {partition} on node {node}")
            })
            .collect();
        text.push_str(&format!(
            "tasks: {}\nstatement: {}",
            placement.join("; "),
            plan.statement
        ));
        Ok(Outcome::Message(text))
    }

    async fn drop(&self, kind: ObjectKind, name: &str, if_exists: bool, delete_topic: bool) -> SqlResult<Outcome> {
        let catalog = self.catalog().await?;
        let Some(object) = catalog.objects.iter().find(|o| o.name == name) else {
            return if if_exists {
                Ok(Outcome::Message(format!("{name} does not exist; nothing dropped")))
            } else {
                Err(unknown_object(&catalog, name))
            };
        };
        if object.kind != kind {
            return Err(SqlError::new(format!("{name} is a {}, not a {kind}", object.kind)));
        }
        // As TERMINATE: gone now, there a moment ago, is dropped (by this
        // request sent again, or by another whose topic may since back a
        // new object: then the topic stays).
        let gone_before = match self.client.drop_object(name).await {
            Ok(()) => false,
            Err(ClientError::Refused(MetadataError::UnknownObject(_))) => true,
            Err(e) => return Err(cluster(e)),
        };
        let topic_in_use = gone_before && self.catalog().await?.objects.iter().any(|o| o.topic == object.topic);
        if delete_topic && !topic_in_use {
            match self.client.delete_topic(&object.topic).await {
                Ok(()) | Err(ClientError::UnknownTopic(_)) => {}
                Err(ClientError::Refused(MetadataError::UnknownTopic(_))) => {}
                Err(e) => return Err(cluster(e)),
            }
        }
        Ok(Outcome::Message(format!(
            "{} {name} dropped{}",
            title(kind),
            match (delete_topic, topic_in_use) {
                (true, false) => format!(" and topic {} deleted", object.topic),
                (true, true) => format!(" (topic {} kept: a stream or table uses it now)", object.topic),
                (false, _) => String::new(),
            }
        )))
    }
}

/// Ids tried per query kind.
const QUERY_IDS_MAX: usize = 10_000;
/// How long TERMINATE waits for its stop to show in this node's catalog,
/// and how often it looks.
const STOP_VISIBLE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
const STOP_VISIBLE_POLL: std::time::Duration = std::time::Duration::from_millis(50);

fn title(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::Stream => "Stream",
        ObjectKind::Table => "Table",
    }
}

fn cluster(e: ClientError) -> SqlError {
    SqlError::new(e.to_string())
}

fn check_format(with: &With) -> SqlResult<()> {
    match with.text("VALUE_FORMAT")? {
        None => Ok(()),
        Some(f) if f.eq_ignore_ascii_case("JSON") => Ok(()),
        Some(f) => Err(SqlError::new(format!("VALUE_FORMAT {f} is not supported; JSON is"))),
    }
}

/// Declared columns and the key columns (`PRIMARY KEY`, `KEY`, or `WITH (KEY=…)`).
fn source_columns(defs: &[ast::ColumnDef], with: &With) -> SqlResult<(Vec<Column>, Vec<usize>)> {
    if defs.is_empty() {
        return Err(SqlError::new(
            "declare the columns: CREATE STREAM s (col TYPE, …) WITH (…)",
        ));
    }
    if defs.len() > runnel_client::plan::COLUMNS_MAX {
        return Err(SqlError::new(format!(
            "at most {} columns",
            runnel_client::plan::COLUMNS_MAX
        )));
    }
    let mut columns: Vec<Column> = Vec::with_capacity(defs.len());
    let mut key = Vec::new();
    for (i, def) in defs.iter().enumerate() {
        let name = ident(&def.name);
        if columns.iter().any(|c| c.name == name) {
            return Err(SqlError::new(format!("column {name} is declared twice")));
        }
        let keyed = def.options.iter().any(|o| {
            matches!(o.option, ast::ColumnOption::Unique { .. }) || o.to_string().to_ascii_uppercase().contains("KEY")
        });
        if keyed {
            key.push(i);
        }
        columns.push(Column {
            name,
            ty: sql_type(&def.data_type)?,
        });
    }
    if let Some(named) = with.text("KEY")? {
        let found = columns
            .iter()
            .position(|c| c.name.eq_ignore_ascii_case(&named))
            .ok_or_else(|| SqlError::new(format!("KEY names {named}, which is not a declared column")))?;
        key = vec![found];
    }
    Ok((columns, key))
}

fn timestamp_column(columns: &[Column], named: &str) -> SqlResult<usize> {
    let i = columns
        .iter()
        .position(|c| c.name.eq_ignore_ascii_case(named))
        .ok_or_else(|| SqlError::new(format!("TIMESTAMP names {named}, which is not a declared column")))?;
    match columns[i].ty {
        SqlType::BigInt | SqlType::Int => Ok(i),
        other => Err(SqlError::new(format!(
            "TIMESTAMP column {named} is {other}; it must be a BIGINT of ms since the epoch"
        ))),
    }
}

fn unknown_query(catalog: &Catalog, id: &str) -> SqlError {
    let known: Vec<&str> = catalog.queries.iter().map(|(d, _)| d.name.as_str()).collect();
    SqlError::new(format!(
        "unknown query {id}; running: {}",
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    ))
}

fn describe_columns(columns: &[Column]) -> String {
    columns
        .iter()
        .map(|c| format!("{} {}", c.name, c.ty))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One VALUES row as a record of `target`: a JSON object, keyed by the key
/// column's value when the target has one.
fn value_record(target: &SqlObject, names: &[String], row: &[ast::Expr]) -> SqlResult<Record> {
    if names.len() != row.len() {
        return Err(SqlError::new(format!(
            "{} columns but {} values",
            names.len(),
            row.len()
        )));
    }
    let mut object = serde_json::Map::new();
    let mut key = None;
    for (name, expr) in names.iter().zip(row) {
        let i = target
            .columns
            .iter()
            .position(|c| c.name == *name)
            .ok_or_else(|| SqlError::new(format!("{} has no column {name}", target.name)))?;
        let value = json_literal(expr, target.columns[i].ty)?;
        if target.key.first() == Some(&i) {
            key = Some(match &value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            });
        }
        object.insert(name.clone(), value);
    }
    let value = serde_json::to_vec(&object).map_err(|e| SqlError::new(e.to_string()))?;
    let timestamp_ms = match target.timestamp.map(|i| object.get(&target.columns[i].name)) {
        Some(Some(serde_json::Value::Number(n))) => n.as_i64().unwrap_or_else(runnel_client::unix_now_ms),
        _ => runnel_client::unix_now_ms(),
    };
    Ok(Record {
        timestamp_ms,
        key: key.map(Bytes::from),
        value: Some(Bytes::from(value)),
        headers: Vec::new(),
    })
}

/// A VALUES literal as JSON of the column's type.
fn json_literal(expr: &ast::Expr, ty: SqlType) -> SqlResult<serde_json::Value> {
    let (negate, inner) = match expr {
        ast::Expr::UnaryOp {
            op: ast::UnaryOperator::Minus,
            expr,
        } => (true, &**expr),
        other => (false, other),
    };
    let ast::Expr::Value(v) = inner else {
        return Err(SqlError::new(format!("VALUES takes literals, not {expr}")));
    };
    let (planned, found) = literal(&v.value).map_err(SqlError::new)?;
    let runnel_client::plan::Expr::Literal(literal) = planned else {
        return Err(SqlError::new(format!("VALUES takes literals, not {expr}")));
    };
    use runnel_client::plan::Literal as L;
    let value = match (literal, ty) {
        (L::Null, _) => serde_json::Value::Null,
        (L::Int(i), SqlType::Int | SqlType::BigInt) => serde_json::json!(if negate { -i } else { i }),
        (L::Int(i), SqlType::Double) => serde_json::json!(if negate { -(i as f64) } else { i as f64 }),
        (L::Double(d), SqlType::Double) => serde_json::json!(if negate { -d } else { d }),
        (L::String(s), SqlType::String) => serde_json::Value::String(s),
        (L::String(s), SqlType::Json) => {
            serde_json::from_str(&s).map_err(|e| SqlError::new(format!("'{s}' is not JSON: {e}")))?
        }
        (L::Boolean(b), SqlType::Boolean) => serde_json::Value::Bool(b),
        _ => return Err(SqlError::new(format!("{expr} is {found}, the column is {ty}"))),
    };
    Ok(value)
}
