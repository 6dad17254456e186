//! `runnel group …` (list, describe with lag, reset-offsets, delete) and
//! `runnel consume --group G` as a member of the group.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use anyhow::{bail, Context};
use runnel::client::groups::{decode_assignment, GroupMember};
use runnel::client::{BrokerError, Client, ClientError, Consumer};

use crate::broker_cli::{runtime, ConnectArgs};

#[derive(clap::Subcommand)]
pub enum GroupCommand {
    /// Every consumer group, with its state and coordinator node.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// A group's members and assignment, and per partition its committed
    /// offset, the partition's end and the lag.
    Describe {
        /// The group's id (Kafka's group.id).
        group: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Move a group's committed offsets of a topic (the group must have no
    /// members: stop its consumers first).
    ResetOffsets {
        /// The group's id.
        group: String,
        /// The topic whose committed offsets move.
        #[arg(long)]
        topic: String,
        /// earliest, latest, an offset, or @UNIX_MS (the first record at or
        /// after that time).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Forget a group with no members and its committed offsets.
    Delete {
        /// The group's id.
        group: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

pub fn group(command: GroupCommand) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        match command {
            GroupCommand::List { json, connect } => list(&*connect.connect().await?, json).await,
            GroupCommand::Describe { group, json, connect } => describe(&*connect.connect().await?, &group, json).await,
            GroupCommand::ResetOffsets {
                group,
                topic,
                to,
                connect,
            } => reset(&connect.connect().await?, &group, &topic, &to).await,
            GroupCommand::Delete { group, connect } => {
                connect.connect().await?.delete_group(&group).await?;
                println!("deleted group {group} and its committed offsets");
                Ok(())
            }
        }
    })
}

async fn list(client: &Client, json: bool) -> anyhow::Result<()> {
    let groups = client.list_groups().await?;
    if json {
        let rows: Vec<_> = groups
            .iter()
            .map(|g| serde_json::json!({"group": g.group, "state": g.state, "protocol_type": g.protocol_type, "coordinator": g.coordinator.0}))
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    if groups.is_empty() {
        println!("no consumer groups with members (a group with only committed offsets is shown by `group describe`)");
    }
    for g in groups {
        println!("{:<30} {:<20} coordinator node {}", g.group, g.state, g.coordinator);
    }
    Ok(())
}

/// Per (topic, partition): committed offset, end, lag.
type Lags = Vec<(String, u32, u64, u64, u64)>;

async fn lags(client: &Client, group: &str) -> anyhow::Result<Lags> {
    let committed = client.group_offsets(group, None).await?;
    let topics = client.topics().await?;
    let mut rows = Vec::new();
    for ((topic, partition), offset) in committed {
        let end = match topics.iter().any(|t| t.name == topic) {
            true => client
                .fetch(&topic, partition, offset, 1)
                .await
                .map_or(offset, |f| f.committed_offset),
            false => offset,
        };
        rows.push((topic, partition, offset, end, end.saturating_sub(offset)));
    }
    Ok(rows)
}

async fn describe(client: &Client, group: &str, json: bool) -> anyhow::Result<()> {
    let info = client.describe_group(group).await?;
    let lags = lags(client, group).await?;
    let members: Vec<(String, String, BTreeMap<String, Vec<u32>>)> = info
        .members
        .iter()
        .map(|m| {
            (
                m.member_id.clone(),
                m.client_id.clone(),
                decode_assignment(&m.assignment).unwrap_or_default(),
            )
        })
        .collect();
    if json {
        let members: Vec<_> = members
            .iter()
            .map(|(id, client_id, assigned)| serde_json::json!({"member_id": id, "client_id": client_id, "assignment": assigned}))
            .collect();
        let offsets: Vec<_> = lags
            .iter()
            .map(|(t, p, o, e, l)| serde_json::json!({"topic": t, "partition": p, "committed": o, "end": e, "lag": l}))
            .collect();
        let line = serde_json::json!({"group": group, "state": info.state, "protocol": info.protocol,
            "generation": info.generation, "members": members, "offsets": offsets});
        println!("{line}");
        return Ok(());
    }
    println!(
        "group {group}: {} (generation {}, protocol {:?})",
        info.state, info.generation, info.protocol
    );
    for (id, client_id, assigned) in &members {
        println!("  member {id} ({client_id}): {assigned:?}");
    }
    println!(
        "  {:<24} {:>9} {:>12} {:>12} {:>10}",
        "topic", "partition", "committed", "end", "lag"
    );
    for (t, p, o, e, l) in &lags {
        println!("  {t:<24} {p:>9} {o:>12} {e:>12} {l:>10}");
    }
    Ok(())
}

async fn reset(client: &Arc<Client>, group: &str, topic: &str, to: &str) -> anyhow::Result<()> {
    let info = client.topics().await?;
    let partitions = info
        .iter()
        .find(|t| t.name == topic)
        .with_context(|| format!("topic {topic:?} does not exist"))?
        .config
        .partitions;
    let mut consumer = Consumer::new(client.clone(), topic);
    for p in 0..partitions {
        consumer.assign(p, 0);
    }
    let ends = consumer.end_offsets().await?;
    match to {
        "earliest" => {
            for p in 0..partitions {
                consumer.assign(p, start_offset(client, topic, p).await?);
            }
        }
        "latest" => ends.iter().for_each(|(p, e)| consumer.assign(*p, *e)),
        at if at.starts_with('@') => {
            let ms: i64 = at[1..]
                .parse()
                .with_context(|| format!("--to {at}: @ is followed by Unix milliseconds"))?;
            consumer.seek_to_timestamp(ms).await?;
        }
        offset => {
            let offset: u64 = offset
                .parse()
                .with_context(|| format!("--to must be earliest, latest, an offset or @UNIX_MS, not {offset:?}"))?;
            (0..partitions).for_each(|p| consumer.assign(p, offset.min(ends.get(&p).copied().unwrap_or(offset))));
        }
    }
    client.commit_offsets(group, topic, consumer.positions()).await?;
    println!("group {group}: offsets of {topic} set to {:?}", consumer.positions());
    Ok(())
}

/// A partition's first offset (retention may have removed the first ones).
async fn start_offset(client: &Client, topic: &str, partition: u32) -> anyhow::Result<u64> {
    match client.fetch(topic, partition, 0, 1).await {
        Ok(_) => Ok(0),
        Err(ClientError::Broker(BrokerError::OffsetOutOfRange { start, .. })) => Ok(start),
        Err(e) => Err(e.into()),
    }
}

/// `runnel consume TOPIC --group G` (all partitions): joins the group and
/// reads the partitions it is given, from the committed offsets (else
/// `start`), committing what it prints; follows rebalances; leaves at the end.
pub async fn consume_in_group(
    client: Arc<Client>,
    topic: &str,
    group: &str,
    start: impl Fn(u32) -> u64,
    max: Option<u64>,
    follow: bool,
    print: impl Fn(&mut std::io::StdoutLock<'_>, u32, &runnel::storage::StoredRecord) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut member = GroupMember::join(&client, group, topic).await?;
    let mut consumer = Consumer::new(client.clone(), topic);
    let mut ends = position(&client, &member, &mut consumer, group, topic, &start).await?;
    let limit = max.unwrap_or(u64::MAX);
    let mut printed = 0u64;
    while printed < limit {
        if member.keep_alive(&client).await? {
            ends = position(&client, &member, &mut consumer, group, topic, &start).await?;
        }
        let records = consumer.poll().await?;
        let deliver = records
            .len()
            .min(usize::try_from(limit - printed).unwrap_or(usize::MAX));
        let mut out = std::io::stdout().lock();
        for (partition, record) in &records[..deliver] {
            print(&mut out, *partition, record)?;
        }
        out.flush()?;
        drop(out);
        printed += deliver as u64;
        crate::broker_cli::rewind_undelivered(&mut consumer, &records[deliver..]);
        if deliver > 0 && !member.commit(&client, consumer.positions()).await? {
            ends = position(&client, &member, &mut consumer, group, topic, &start).await?;
        }
        let at_end = consumer
            .positions()
            .iter()
            .all(|(p, o)| *o >= ends.get(p).copied().unwrap_or(0));
        if !follow && at_end {
            break;
        }
        if records.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    member.leave(&client).await?;
    Ok(())
}

/// Points the consumer at the member's partitions: committed offsets, else
/// `start`. Returns their ends now.
async fn position(
    client: &Client,
    member: &GroupMember,
    consumer: &mut Consumer,
    group: &str,
    topic: &str,
    start: &impl Fn(u32) -> u64,
) -> anyhow::Result<BTreeMap<u32, u64>> {
    let held: Vec<u32> = consumer.positions().keys().copied().collect();
    for p in held {
        consumer.unassign(p);
    }
    let committed = client.committed_offsets(group, topic).await?;
    for &p in &member.assigned {
        consumer.assign(p, committed.get(&p).copied().unwrap_or_else(|| start(p)));
    }
    if member.assigned.is_empty() {
        tracing::info!(
            group,
            "no partition assigned to this member (more members than partitions)"
        );
    }
    let ends = consumer.end_offsets().await?;
    if ends.len() != member.assigned.len() {
        bail!("could not read the end of every assigned partition");
    }
    Ok(ends)
}
