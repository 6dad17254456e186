//! `runnel topic …`, `runnel produce` and `runnel consume`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::Bytes;
use runnel::client::protocol::{FailedReplica, NodeId, PartitionInfo, TopicConfig, TopicInfo};
use runnel::client::{Acks, Client, Consumer, Producer};
use runnel::storage::Record;

/// Where the cluster is and how to prove who we are.
#[derive(clap::Args, Clone)]
pub struct ConnectArgs {
    /// Comma-separated node addresses; any one reachable node is enough.
    #[arg(long, env = "RUNNEL_SEEDS", value_delimiter = ',', required = true)]
    seeds: Vec<SocketAddr>,
    #[arg(long, env = "RUNNEL_CERTS")]
    certs: PathBuf,
}

impl ConnectArgs {
    pub async fn connect(&self) -> anyhow::Result<Arc<Client>> {
        let client = Client::connect(self.seeds.clone(), &self.certs)
            .await
            .context("connecting to the cluster")?;
        Ok(Arc::new(client))
    }
}

#[derive(clap::Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        #[arg(long)]
        partitions: u32,
        #[arg(long)]
        replication: u16,
        /// Replicas that must hold a record before it is acknowledged.
        #[arg(long)]
        min_insync: Option<u16>,
        #[arg(long)]
        retention_ms: Option<u64>,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// List topics.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Show a topic's partitions: leader, replicas, offsets.
    Describe {
        name: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Delete a topic.
    Delete {
        name: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the async runtime")
}

pub fn topic(command: TopicCommand) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        match command {
            TopicCommand::Create { name, partitions, replication, min_insync, retention_ms, connect } => {
                let mut config = TopicConfig::new(partitions, replication);
                if let Some(min_insync) = min_insync {
                    config.min_insync = min_insync;
                }
                if retention_ms.is_some() {
                    config.retention_ms = retention_ms;
                }
                connect.connect().await?.create_topic(&name, config).await?;
                println!("created topic {name} with {partitions} partitions, replication {replication}");
            }
            TopicCommand::List { json, connect } => {
                let topics = connect.connect().await?.topics().await?;
                if json {
                    let list: Vec<serde_json::Value> = topics
                        .iter()
                        .map(|t| serde_json::json!({"name": t.name, "partitions": t.config.partitions, "replication": t.config.replication}))
                        .collect();
                    println!("{}", serde_json::Value::Array(list));
                } else {
                    for t in topics {
                        println!("{}\tpartitions={}\treplication={}", t.name, t.config.partitions, t.config.replication);
                    }
                }
            }
            TopicCommand::Describe { name, json, connect } => {
                let client = connect.connect().await?;
                let topic = client.describe_topic(&name).await?;
                let alive: BTreeSet<NodeId> = client.alive_nodes().into_iter().collect();
                let failed = failed_replicas(&client, &alive).await;
                print_topic(&topic, &alive, &failed, json);
            }
            TopicCommand::Delete { name, connect } => {
                connect.connect().await?.delete_topic(&name).await?;
                println!("deleted topic {name}");
            }
        }
        Ok(())
    })
}

/// Why a partition is under-replicated or not settled, if it is: no leader,
/// a replica's node down, voters other than its assignment (a
/// reconfiguration not finished), learners still catching up.
pub fn partition_problems(
    topic: &str,
    p: &PartitionInfo,
    alive: &BTreeSet<NodeId>,
    failed: &[FailedReplica],
) -> Vec<String> {
    let mut problems = Vec::new();
    for f in failed.iter().filter(|f| f.topic == topic && f.partition == p.partition) {
        let what = if f.damaged { "damaged" } else { "failed" };
        problems.push(format!("replica on node {} is {what}: {}", f.node, f.reason));
    }
    if p.leader.is_none() {
        problems.push("no leader".to_string());
    }
    for replica in p.replicas.iter().filter(|r| !alive.contains(r)) {
        problems.push(format!("replica on node {replica} is not alive"));
    }
    let assigned: BTreeSet<NodeId> = p.replicas.iter().copied().collect();
    let voters: BTreeSet<NodeId> = p.voters.iter().copied().collect();
    // An answering node without a replica knows no voters: nothing to compare.
    if !voters.is_empty() && voters != assigned {
        problems.push(format!(
            "not settled: voters {:?} differ from the assignment {:?}",
            p.voters, p.replicas
        ));
    }
    if !p.learners.is_empty() {
        problems.push(format!("learners {:?} still catching up", p.learners));
    }
    problems
}

/// The replicas the `alive` nodes no longer run (a node that does not
/// answer is left out: its replicas count as not alive already).
pub async fn failed_replicas(client: &Client, alive: &BTreeSet<NodeId>) -> Vec<FailedReplica> {
    let mut failed = Vec::new();
    for &node in alive {
        match client.failed_replicas(node).await {
            Ok(list) => failed.extend(list),
            Err(e) => tracing::debug!(node = %node, error = %e, "node did not report its failed replicas"),
        }
    }
    failed
}

fn print_topic(topic: &TopicInfo, alive: &BTreeSet<NodeId>, failed: &[FailedReplica], json: bool) {
    let problems = |p: &PartitionInfo| partition_problems(&topic.name, p, alive, failed);
    let under_replicated = |p: &PartitionInfo| !problems(p).is_empty();
    if json {
        let partitions: Vec<serde_json::Value> = topic
            .partitions
            .iter()
            .map(|p| {
                serde_json::json!({"partition": p.partition, "leader": p.leader, "replicas": p.replicas,
                    "voters": p.voters, "learners": p.learners, "committed_offset": p.committed_offset,
                    "end_offset": p.end_offset, "under_replicated": under_replicated(p),
                    "problems": problems(p)})
            })
            .collect();
        println!("{}", serde_json::json!({"name": topic.name, "partitions": partitions}));
        return;
    }
    println!(
        "topic {}: {} partitions, replication {}",
        topic.name, topic.config.partitions, topic.config.replication
    );
    for p in &topic.partitions {
        let leader = p.leader.map_or("none".to_string(), |l| l.to_string());
        let committed = p.committed_offset.map_or("?".to_string(), |c| c.to_string());
        let problems = problems(p);
        let mark = if problems.is_empty() {
            String::new()
        } else {
            format!("  UNDER-REPLICATED: {}", problems.join("; "))
        };
        println!(
            "  partition {:>4}  leader {leader:>4}  replicas {:?}  committed {committed}{mark}",
            p.partition, p.replicas
        );
    }
}

#[derive(clap::Args)]
pub struct ProduceArgs {
    topic: String,
    /// Use field N (0-based) of each line as the record key.
    #[arg(long)]
    key_field: Option<usize>,
    /// Field separator for --key-field.
    #[arg(long, default_value = ",")]
    sep: String,
    #[arg(long, value_enum, default_value = "all")]
    acks: AcksArg,
    /// Send every record to this partition (default: by key, else round-robin).
    #[arg(long)]
    partition: Option<u32>,
    /// How each line encodes its value: `text` (UTF-8), `raw` (the line's
    /// bytes as they are), `hex` or `base64`.
    #[arg(long, value_enum, default_value = "text")]
    value_format: ValueFormat,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueFormat {
    Text,
    Raw,
    Hex,
    Base64,
}

/// A line's value in `format`; the error says what is wrong with it.
fn decode_value(line: &[u8], format: ValueFormat) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    match format {
        ValueFormat::Text => std::str::from_utf8(line)
            .map(|text| text.as_bytes().to_vec())
            .map_err(|e| format!("it is not UTF-8 ({e}); use --value-format raw, hex or base64 for binary values")),
        ValueFormat::Raw => Ok(line.to_vec()),
        ValueFormat::Hex => hex::decode(line.trim_ascii()).map_err(|e| format!("it is not hex: {e}")),
        ValueFormat::Base64 => base64::engine::general_purpose::STANDARD
            .decode(line.trim_ascii())
            .map_err(|e| format!("it is not base64: {e}")),
    }
}

#[derive(clap::ValueEnum, Clone, Copy)]
pub enum AcksArg {
    All,
    Leader,
    None,
}

/// Sends one record per line of standard input.
pub fn produce(args: ProduceArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let acks = match args.acks {
            AcksArg::All => Acks::All,
            AcksArg::Leader => Acks::Leader,
            AcksArg::None => Acks::None,
        };
        let client = args.connect.connect().await?;
        let mut producer = Producer::new(client, &args.topic, acks).await?;
        let mut sent = 0u64;
        let mut bad_line = None;
        for (number, line) in std::io::stdin().lock().split(b'\n').enumerate() {
            let mut line = line.context("reading standard input")?;
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let record = match line_record(&line, number + 1, &args) {
                Ok(record) => record,
                // The lines before it are sent all the same.
                Err(e) => {
                    bad_line = Some(e);
                    break;
                }
            };
            sent += producer
                .send(args.partition, record)
                .await?
                .iter()
                .map(|s| u64::from(s.2))
                .sum::<u64>();
        }
        sent += producer.flush().await?.iter().map(|s| u64::from(s.2)).sum::<u64>();
        eprintln!("produced {sent} records to {}", args.topic);
        match bad_line {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })
}

/// Line `number` of standard input as a record, stamped as it is read.
fn line_record(line: &[u8], number: usize, args: &ProduceArgs) -> anyhow::Result<Record> {
    let key = match args.key_field {
        Some(field) => {
            let text = String::from_utf8_lossy(line);
            let key = text
                .split(args.sep.as_str())
                .nth(field)
                .with_context(|| format!("line {number} has no field {field}"))?;
            Some(Bytes::from(key.to_string()))
        }
        None => None,
    };
    let value = decode_value(line, args.value_format)
        .map_err(|why| anyhow::anyhow!("line {number} was not produced: {why}"))?;
    Ok(Record {
        timestamp_ms: runnel::client::unix_now_ms(),
        key,
        value: Some(Bytes::from(value)),
        headers: Vec::new(),
    })
}

#[derive(clap::Args)]
pub struct ConsumeArgs {
    topic: String,
    /// earliest, latest, or an offset.
    #[arg(long, default_value = "earliest")]
    from: String,
    /// Start at the first record at or after this time (Unix milliseconds).
    #[arg(long, conflicts_with = "from")]
    from_time: Option<i64>,
    /// Consumer group: join it and read the partitions it assigns to this
    /// member (with --partition: read that partition outside group
    /// management), from the group's committed offsets, committing what is
    /// printed. Kafka consumers can be members of the same group.
    #[arg(long)]
    group: Option<String>,
    /// Read only this partition (default: all).
    #[arg(long)]
    partition: Option<u32>,
    /// Stop after this many records.
    #[arg(long)]
    max: Option<u64>,
    /// Keep waiting for new records instead of stopping at the end.
    #[arg(long)]
    follow: bool,
    /// `text` prints values; `json` adds key, partition, offset and timestamp.
    #[arg(long, default_value = "text")]
    format: String,
    #[command(flatten)]
    connect: ConnectArgs,
}

pub fn consume(args: ConsumeArgs) -> anyhow::Result<()> {
    if args.format != "text" && args.format != "json" {
        bail!("--format must be text or json, not {:?}", args.format);
    }
    runtime()?.block_on(async move {
        let client = args.connect.connect().await?;
        let topics = client.topics().await?;
        let partitions = partitions_to_read(&args, &topics)?;
        if let (Some(group), None) = (&args.group, args.partition) {
            return consume_as_member(&args, client, group, &partitions).await;
        }
        let mut consumer = Consumer::new(client.clone(), &args.topic);
        let ends = position_consumer(&args, &mut consumer, &partitions).await?;
        print_records(&args, &mut consumer, &partitions, &ends).await
    })
}

/// `consume --group G` over all partitions: as a member of the group, which
/// shares the topic's partitions among its members.
async fn consume_as_member(
    args: &ConsumeArgs,
    client: Arc<Client>,
    group: &str,
    partitions: &[u32],
) -> anyhow::Result<()> {
    if args.from_time.is_some() {
        bail!("--from-time cannot be used with --group: a group resumes from its committed offsets (move them with `runnel group reset-offsets`)");
    }
    let mut probe = Consumer::new(client.clone(), &args.topic);
    for &p in partitions {
        probe.assign(p, 0);
    }
    let ends = probe.end_offsets().await?;
    let fixed: Option<u64> = match args.from.as_str() {
        "earliest" => Some(0),
        "latest" => None,
        offset => Some(
            offset
                .parse()
                .with_context(|| format!("--from must be earliest, latest or an offset, not {offset:?}"))?,
        ),
    };
    let start = |p: u32| fixed.unwrap_or_else(|| ends.get(&p).copied().unwrap_or(0));
    let format = args.format.clone();
    let print = move |out: &mut std::io::StdoutLock<'_>, partition: u32, record: &runnel::storage::StoredRecord| {
        print_record(out, &format, partition, record)
    };
    crate::group_cli::consume_in_group(client, &args.topic, group, start, args.max, args.follow, print).await
}

/// The partitions `--partition` names (all of the topic's by default).
fn partitions_to_read(args: &ConsumeArgs, topics: &[TopicInfo]) -> anyhow::Result<Vec<u32>> {
    let topic = topics
        .iter()
        .find(|t| t.name == args.topic)
        .with_context(|| format!("topic {:?} does not exist", args.topic))?;
    Ok(match args.partition {
        Some(p) if p >= topic.config.partitions => {
            bail!(
                "partition {p} of topic {:?} does not exist (it has {})",
                args.topic,
                topic.config.partitions
            )
        }
        Some(p) => vec![p],
        None => (0..topic.config.partitions).collect(),
    })
}

/// Moves the consumer to where `--from`, `--from-time` and `--group` say;
/// returns each partition's end offset when reading began.
async fn position_consumer(
    args: &ConsumeArgs,
    consumer: &mut Consumer,
    partitions: &[u32],
) -> anyhow::Result<BTreeMap<u32, u64>> {
    let start = match args.from.as_str() {
        "earliest" | "latest" => 0,
        offset => offset
            .parse()
            .with_context(|| format!("--from must be earliest, latest or an offset, not {offset:?}"))?,
    };
    for &p in partitions {
        consumer.assign(p, start);
    }
    let ends = consumer.end_offsets().await?;
    if args.from == "latest" {
        for (&p, &end) in &ends {
            consumer.assign(p, end);
        }
    }
    if let Some(timestamp_ms) = args.from_time {
        consumer.seek_to_timestamp(timestamp_ms).await?;
    }
    if let Some(group) = &args.group {
        let resumed = consumer.resume(group).await?;
        tracing::debug!(group, resumed, "resumed from committed offsets");
    }
    Ok(ends)
}

/// Polls and prints records until `--max` records, or the `ends` without
/// `--follow`. Under `--group` only what was printed is committed: records
/// a poll brought beyond `--max` are left for the group's next reader.
async fn print_records(
    args: &ConsumeArgs,
    consumer: &mut Consumer,
    partitions: &[u32],
    ends: &BTreeMap<u32, u64>,
) -> anyhow::Result<()> {
    let limit = args.max.unwrap_or(u64::MAX);
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    while printed < limit {
        let records = consumer.poll().await?;
        let deliver = records
            .len()
            .min(usize::try_from(limit - printed).unwrap_or(usize::MAX));
        let mut out = stdout.lock();
        for (partition, record) in &records[..deliver] {
            print_record(&mut out, &args.format, *partition, record)?;
        }
        drop(out);
        printed += deliver as u64;
        rewind_undelivered(consumer, &records[deliver..]);
        if let Some(group) = &args.group {
            if deliver > 0 {
                consumer.commit(group).await?;
            }
        }
        let at_end = partitions
            .iter()
            .all(|p| consumer.position(*p).unwrap_or(0) >= ends.get(p).copied().unwrap_or(0));
        if !args.follow && at_end {
            return Ok(());
        }
        if records.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Moves each partition's position back to its first record that was
/// polled but not printed.
pub(crate) fn rewind_undelivered(consumer: &mut Consumer, undelivered: &[(u32, runnel::storage::StoredRecord)]) {
    let mut first: BTreeMap<u32, u64> = BTreeMap::new();
    for (partition, record) in undelivered {
        first.entry(*partition).or_insert(record.offset);
    }
    for (partition, offset) in first {
        consumer.assign(partition, offset);
    }
}

fn print_record(
    out: &mut impl Write,
    format: &str,
    partition: u32,
    record: &runnel::storage::StoredRecord,
) -> anyhow::Result<()> {
    let value = record
        .record
        .value
        .as_deref()
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    if format == "json" {
        let key = record
            .record
            .key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).to_string());
        let line = serde_json::json!({"partition": partition, "offset": record.offset, "timestamp_ms": record.record.timestamp_ms,
            "key": key, "value": value});
        writeln!(out, "{line}")?;
    } else {
        writeln!(out, "{value}")?;
    }
    Ok(())
}

/// `runnel rebalance`: spread replicas evenly over the live nodes.
pub fn rebalance(connect: ConnectArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        connect.connect().await?.rebalance().await?;
        println!("rebalance committed; replicas move through learner -> voter -> removal (watch with `runnel status --watch`)");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(leader: Option<u32>, replicas: &[u32], voters: &[u32], learners: &[u32]) -> PartitionInfo {
        let ids = |ns: &[u32]| ns.iter().map(|&n| NodeId(n)).collect();
        PartitionInfo {
            partition: 0,
            replicas: ids(replicas),
            leader: leader.map(NodeId),
            committed_offset: None,
            end_offset: None,
            voters: ids(voters),
            learners: ids(learners),
        }
    }

    #[test]
    fn a_partition_names_every_reason_it_is_under_replicated() {
        let alive: BTreeSet<NodeId> = [1, 2, 3].into_iter().map(NodeId).collect();
        let healthy = partition(Some(1), &[1, 2, 3], &[1, 2, 3], &[]);
        assert!(partition_problems("t", &healthy, &alive, &[]).is_empty());
        let unsettled = partition(Some(1), &[1, 2, 3], &[5, 2, 1, 3], &[]);
        let problems = partition_problems("t", &unsettled, &alive, &[]);
        assert!(problems[0].starts_with("not settled: voters"), "{problems:?}");
        let catching_up = partition(Some(1), &[1, 2, 3], &[1, 3], &[2]);
        assert_eq!(
            partition_problems("t", &catching_up, &alive, &[]).len(),
            2,
            "not settled, and a learner"
        );
        let damaged = FailedReplica {
            topic: "t".into(),
            partition: 0,
            node: NodeId(2),
            damaged: true,
            reason: "corrupt data in raft.meta".into(),
        };
        let problems = partition_problems("t", &healthy, &alive, std::slice::from_ref(&damaged));
        assert_eq!(
            problems,
            vec!["replica on node 2 is damaged: corrupt data in raft.meta".to_string()]
        );
        assert!(
            partition_problems("other", &healthy, &alive, &[damaged]).is_empty(),
            "another topic's"
        );
        let orphaned = partition(None, &[1, 2, 4], &[], &[]);
        let problems = partition_problems("t", &orphaned, &alive, &[]);
        assert_eq!(
            problems,
            vec!["no leader".to_string(), "replica on node 4 is not alive".to_string()]
        );
    }
}
