//! `runnel topic …`, `runnel produce` and `runnel consume`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::Bytes;
use runnel::client::protocol::{
    CleanupPolicy, FailedReplica, NodeId, PartitionInfo, TopicConfig, TopicInfo, TopicSetting,
};
use runnel::client::{Acks, Client, Consumer, Producer};
use runnel::storage::Record;

/// Where the cluster is and how to prove who we are: flags, else the
/// environment, else a client config file.
#[derive(clap::Args, Clone)]
pub struct ConnectArgs {
    /// Comma-separated node addresses (`host:port`, a name such as
    /// `localhost:7101` or an IP); any one reachable node is enough.
    #[arg(long, env = "RUNNEL_SEEDS", value_delimiter = ',', value_parser = seed_addr)]
    seeds: Vec<SocketAddr>,
    /// The cluster's certificate directory (`runnel certs init` made it).
    #[arg(long, env = "RUNNEL_CERTS")]
    certs: Option<PathBuf>,
    /// A TOML file with `seeds = ["host:port", …]` and `certs = "dir"` (a
    /// relative `certs` is taken from the file's directory), used for what
    /// --seeds and --certs do not give.
    #[arg(long, env = "RUNNEL_CLIENT_CONFIG", value_name = "FILE")]
    client_config: Option<PathBuf>,
}

/// The client config file (`--client-config`).
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ClientConfigFile {
    #[serde(default)]
    seeds: Vec<String>,
    certs: Option<PathBuf>,
}

/// A client config file's bytes at most: a few lines are expected.
const CLIENT_CONFIG_BYTES_MAX: u64 = 64 * 1024;

/// A node address from the command line: `host:port`, where the host is an
/// IP address or a name resolved here (an IPv4 address preferred).
pub fn seed_addr(text: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let resolved: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| format!("{text:?} is not a node address (host:port, such as localhost:7101): {e}"))?
        .collect();
    resolved
        .iter()
        .find(|a| a.is_ipv4())
        .or(resolved.first())
        .copied()
        .ok_or_else(|| format!("{text:?} resolves to no address"))
}

impl ConnectArgs {
    pub async fn connect(&self) -> anyhow::Result<Arc<Client>> {
        let (seeds, certs) = self.resolve()?;
        let client = Client::connect(seeds, &certs)
            .await
            .context("connecting to the cluster")?;
        Ok(Arc::new(client))
    }

    /// The seeds and certificate directory: flags and environment first,
    /// then the client config file for what they leave out.
    pub fn resolve(&self) -> anyhow::Result<(Vec<SocketAddr>, PathBuf)> {
        let (file_seeds, file_certs) = match &self.client_config {
            Some(path) => read_client_config(path)?,
            None => (Vec::new(), None),
        };
        let seeds = if self.seeds.is_empty() {
            file_seeds
        } else {
            self.seeds.clone()
        };
        let missing = |what: &str| {
            let variable = what.to_uppercase();
            format!("no {what}: give --{what}, set RUNNEL_{variable}, or name a --client-config file that has them")
        };
        anyhow::ensure!(!seeds.is_empty(), missing("seeds"));
        let certs = self
            .certs
            .clone()
            .or(file_certs)
            .ok_or_else(|| anyhow::anyhow!(missing("certs")))?;
        Ok((seeds, certs))
    }
}

/// A client config file's seeds and certificate directory (relative to the
/// file's directory).
fn read_client_config(path: &std::path::Path) -> anyhow::Result<(Vec<SocketAddr>, Option<PathBuf>)> {
    let context = || format!("client config {}", path.display());
    let size = std::fs::metadata(path).with_context(context)?.len();
    anyhow::ensure!(
        size <= CLIENT_CONFIG_BYTES_MAX,
        "client config {} is {size} bytes, more than {CLIENT_CONFIG_BYTES_MAX}",
        path.display()
    );
    let text = std::fs::read_to_string(path).with_context(context)?;
    let file: ClientConfigFile = toml::from_str(&text).with_context(context)?;
    let seeds = file
        .seeds
        .iter()
        .map(|s| seed_addr(s).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()
        .with_context(context)?;
    let base = path.parent().unwrap_or(std::path::Path::new("."));
    Ok((seeds, file.certs.map(|certs| base.join(certs))))
}

#[derive(clap::Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        /// The topic's name.
        name: String,
        /// Partitions of the topic.
        #[arg(short, long)]
        partitions: u32,
        /// Copies of each partition, on distinct nodes.
        #[arg(short, long)]
        replication: u16,
        /// Replicas that must hold a record before it is acknowledged.
        #[arg(long)]
        min_insync: Option<u16>,
        /// Delete closed log segments older than this (milliseconds).
        #[arg(long)]
        retention_ms: Option<u64>,
        /// What happens to old records: delete (by retention.ms), compact
        /// (the latest record of each key stays), or compact,delete.
        #[arg(long, value_name = "POLICY")]
        cleanup: Option<String>,
        /// A topic setting as Kafka names it (repeatable):
        /// `retention.ms=N`, `min.insync.replicas=N`,
        /// `cleanup.policy=compact`, `delete.retention.ms=N`,
        /// `min.compaction.lag.ms=N`.
        #[arg(short = 'c', long = "config", value_name = "KEY=VALUE")]
        configs: Vec<String>,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// List topics (internal ones too with --all).
    List {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
        /// Also list internal topics: `__consumer_offsets` and dataflows'
        /// `*.repartition`, `*.checkpoints` and `*.dlq` topics.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Show a topic's settings and partitions: leader, replicas, offsets.
    Describe {
        /// The topic's name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Delete a topic.
    Delete {
        /// The topic's name.
        name: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Change settings of a topic (all or none): `-c retention.ms=N`
    /// (-1: forever), `-c min.insync.replicas=N`.
    Alter {
        /// The topic's name.
        name: String,
        /// A topic setting as Kafka names it (repeatable).
        #[arg(short = 'c', long = "config", value_name = "KEY=VALUE", required = true)]
        configs: Vec<String>,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Grow a topic to more partitions (records already written stay
    /// where they are; keys may hash to other partitions from now on).
    AddPartitions {
        /// The topic's name.
        name: String,
        /// Partitions in all after the change.
        #[arg(short, long)]
        partitions: u32,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Delete a partition's records below an offset, as Kafka's
    /// kafka-delete-records: readers start there from now on, and the
    /// whole segments below go from every replica's disk.
    DeleteRecords {
        /// The topic's name.
        name: String,
        /// The partition.
        #[arg(short, long)]
        partition: u32,
        /// Delete the records below this offset (default: every committed
        /// record, up to the high watermark).
        #[arg(long, value_name = "OFFSET")]
        before: Option<u64>,
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
            TopicCommand::Create { name, partitions, replication, min_insync, retention_ms, cleanup, configs, connect } => {
                let mut config = TopicConfig::new(partitions, replication);
                if let Some(cleanup) = cleanup {
                    apply_setting(&mut config, &format!("cleanup.policy={cleanup}"))?;
                }
                if let Some(min_insync) = min_insync {
                    config.min_insync = min_insync;
                }
                if retention_ms.is_some() {
                    config.retention_ms = retention_ms;
                }
                for setting in &configs {
                    apply_setting(&mut config, setting)?;
                }
                connect.connect().await?.create_topic(&name, config).await?;
                println!("created topic {name} with {partitions} partitions, replication {replication}");
            }
            TopicCommand::List { json, all, connect } => {
                let mut topics = connect.connect().await?.topics().await?;
                topics.retain(|t| all || !is_internal(&t.name));
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
            TopicCommand::Alter { name, configs, connect } => {
                let settings: Vec<TopicSetting> = configs
                    .iter()
                    .map(|c| parse_setting(c))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                connect.connect().await?.alter_topic(&name, settings).await?;
                println!("altered topic {name}: {}", configs.join(", "));
            }
            TopicCommand::AddPartitions { name, partitions, connect } => {
                connect.connect().await?.add_partitions(&name, partitions).await?;
                println!("topic {name} now has {partitions} partitions");
            }
            TopicCommand::DeleteRecords { name, partition, before, connect } => {
                let start = connect.connect().await?.delete_records(&name, partition, before).await?;
                println!("{name}/{partition} now starts at offset {start}");
            }
        }
        Ok(())
    })
}

/// Whether a topic is one Runnel keeps for itself: consumer groups'
/// offsets, and dataflows' repartition, checkpoint and dead-letter topics.
pub fn is_internal(topic: &str) -> bool {
    topic.starts_with("__")
        || [".repartition", ".checkpoints", ".dlq"]
            .iter()
            .any(|s| topic.ends_with(s))
}

/// One `-c KEY=VALUE` topic setting, by its Kafka name (or Runnel's).
fn apply_setting(config: &mut TopicConfig, setting: &str) -> anyhow::Result<()> {
    parse_setting(setting)?.apply_to(config);
    Ok(())
}

/// A `-c KEY=VALUE` topic setting as Kafka names it: `retention.ms=N` (-1
/// keeps records forever), `min.insync.replicas=N`,
/// `cleanup.policy=delete|compact|compact,delete`, `delete.retention.ms=N`,
/// `min.compaction.lag.ms=N`.
fn parse_setting(setting: &str) -> anyhow::Result<TopicSetting> {
    let (key, value) = setting
        .split_once('=')
        .with_context(|| format!("-c {setting:?}: write a setting as KEY=VALUE, such as retention.ms=86400000"))?;
    let number = |what: &str| -> anyhow::Result<u64> {
        value
            .trim()
            .parse()
            .with_context(|| format!("-c {key}={value}: {what} must be a whole number"))
    };
    Ok(match key.trim() {
        "cleanup.policy" => {
            TopicSetting::Cleanup(CleanupPolicy::parse(value).map_err(|e| anyhow::anyhow!("-c {key}={value}: {e}"))?)
        }
        "delete.retention.ms" => TopicSetting::DeleteRetentionMs(number("delete.retention.ms")?),
        "min.compaction.lag.ms" => TopicSetting::MinCompactionLagMs(number("min.compaction.lag.ms")?),
        "retention.ms" | "retention_ms" if value.trim() == "-1" => TopicSetting::RetentionMs(None),
        "retention.ms" | "retention_ms" => TopicSetting::RetentionMs(Some(number("retention.ms (or -1, forever)")?)),
        "min.insync.replicas" | "min_insync" => TopicSetting::MinInsync(
            u16::try_from(number("min.insync.replicas")?).context("min.insync.replicas is too large")?,
        ),
        other => bail!(
            "-c {other}: not a topic setting Runnel has; it knows retention.ms, min.insync.replicas, cleanup.policy, delete.retention.ms and min.compaction.lag.ms"
        ),
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
                    "voters": p.voters, "learners": p.learners, "start_offset": p.start_offset,
                    "committed_offset": p.committed_offset,
                    "end_offset": p.end_offset, "under_replicated": under_replicated(p),
                    "problems": problems(p)})
            })
            .collect();
        let c = &topic.config;
        let settings = serde_json::json!({"partitions": c.partitions, "replication": c.replication,
            "min_insync": c.min_insync, "retention_ms": c.retention_ms, "cleanup_policy": c.cleanup.as_str(),
            "delete_retention_ms": c.delete_retention_ms, "min_compaction_lag_ms": c.min_compaction_lag_ms});
        println!(
            "{}",
            serde_json::json!({"name": topic.name, "config": settings, "partitions": partitions})
        );
        return;
    }
    let c = &topic.config;
    let retention = c.retention_ms.map_or("forever".to_string(), |ms| format!("{ms} ms"));
    println!(
        "topic {}: {} partitions, replication {}, min.insync.replicas {}, retention.ms {retention}, cleanup.policy {}",
        topic.name,
        c.partitions,
        c.replication,
        c.min_insync,
        c.cleanup.as_str()
    );
    for p in &topic.partitions {
        let leader = p.leader.map_or("none".to_string(), |l| l.to_string());
        let committed = p.committed_offset.map_or("?".to_string(), |c| c.to_string());
        let start = p.start_offset.map_or("?".to_string(), |s| s.to_string());
        let problems = problems(p);
        let mark = if problems.is_empty() {
            String::new()
        } else {
            format!("  UNDER-REPLICATED: {}", problems.join("; "))
        };
        println!(
            "  partition {:>4}  leader {leader:>4}  replicas {:?}  offsets {start}..{committed}{mark}",
            p.partition, p.replicas
        );
    }
}

#[derive(clap::Args)]
pub struct ProduceArgs {
    /// The topic to write to.
    topic: String,
    /// Use field N (0-based) of each line as the record key.
    #[arg(long, conflicts_with_all = ["key", "key_json"])]
    key_field: Option<usize>,
    /// Every record's key (kcat's -k).
    #[arg(short, long, conflicts_with = "key_json")]
    key: Option<String>,
    /// Take each record's key from this field of its JSON value (`a.b` for a
    /// nested one): a string as it is, anything else as JSON text.
    #[arg(long, value_name = "FIELD")]
    key_json: Option<String>,
    /// A header on every record, `NAME=VALUE` (repeatable; kcat's -H).
    #[arg(short = 'H', long = "header", value_name = "NAME=VALUE", value_parser = header_arg)]
    headers: Vec<(String, String)>,
    /// Field separator for --key-field.
    #[arg(long, default_value = ",")]
    sep: String,
    /// When a record counts as written: `all` (committed on a majority), `leader`, or `none`.
    #[arg(long, value_enum, default_value = "all")]
    acks: AcksArg,
    /// Send every record to this partition (default: by key, else round-robin).
    #[arg(short, long)]
    partition: Option<u32>,
    /// How each line encodes its value: `text` (UTF-8), `raw` (the line's
    /// bytes as they are), `hex` or `base64`.
    #[arg(long, value_enum, default_value = "text")]
    value_format: ValueFormat,
    /// Print where each record was written, a line each: `partition P
    /// offset O` (each record is then sent on its own, which is slower).
    #[arg(long)]
    print_offsets: bool,
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
            let mut batches = producer.send(args.partition, record).await?;
            if args.print_offsets {
                batches.extend(producer.flush().await?);
                for (partition, offset, _) in &batches {
                    println!("partition {partition} offset {offset}");
                }
            }
            sent += batches.iter().map(|s| u64::from(s.2)).sum::<u64>();
        }
        sent += producer.flush().await?.iter().map(|s| u64::from(s.2)).sum::<u64>();
        eprintln!("produced {sent} records to {}", args.topic);
        match bad_line {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })
}

/// A `--header NAME=VALUE`.
fn header_arg(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))?;
    if name.is_empty() {
        return Err(format!("{text:?} has no header name before '='"));
    }
    Ok((name.to_string(), value.to_string()))
}

/// Line `number` of standard input as a record, stamped as it is read.
fn line_record(line: &[u8], number: usize, args: &ProduceArgs) -> anyhow::Result<Record> {
    let value = decode_value(line, args.value_format)
        .map_err(|why| anyhow::anyhow!("line {number} was not produced: {why}"))?;
    let key = line_key(line, &value, args).map_err(|why| anyhow::anyhow!("line {number} was not produced: {why}"))?;
    let headers = args
        .headers
        .iter()
        .map(|(name, value)| runnel::storage::Header {
            key: name.clone(),
            value: Some(Bytes::from(value.clone())),
        })
        .collect();
    Ok(Record {
        timestamp_ms: runnel::client::unix_now_ms(),
        key,
        value: Some(Bytes::from(value)),
        headers,
    })
}

/// The key of a line (`--key-field`, `--key` or `--key-json`), if any.
fn line_key(line: &[u8], value: &[u8], args: &ProduceArgs) -> Result<Option<Bytes>, String> {
    if let Some(field) = args.key_field {
        let text = String::from_utf8_lossy(line);
        let key = text
            .split(args.sep.as_str())
            .nth(field)
            .ok_or_else(|| format!("it has no field {field}"))?;
        return Ok(Some(Bytes::from(key.to_string())));
    }
    if let Some(key) = &args.key {
        return Ok(Some(Bytes::from(key.clone())));
    }
    let Some(path) = &args.key_json else { return Ok(None) };
    let json: serde_json::Value =
        serde_json::from_slice(value).map_err(|e| format!("--key-json needs a JSON value: {e}"))?;
    let found = path
        .split('.')
        .try_fold(&json, |at, name| at.get(name))
        .ok_or_else(|| format!("its JSON value has no field {path:?}"))?;
    Ok(Some(Bytes::from(match found {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    })))
}

#[derive(clap::Args)]
pub struct ConsumeArgs {
    /// The topic to read.
    topic: String,
    /// Where to start in each partition: `earliest` (or `beginning`),
    /// `latest` (or `end`), an offset `N`, `-N` (N records before the end)
    /// or `@MS` (the first record at or after Unix time MS milliseconds).
    #[arg(
        short = 'o',
        long,
        visible_alias = "offset",
        default_value = "earliest",
        allow_hyphen_values = true
    )]
    from: String,
    /// Start at the first record at or after this time (Unix milliseconds;
    /// the same as `-o @MS`).
    #[arg(long, conflicts_with = "from")]
    from_time: Option<i64>,
    /// Consumer group: join it and read the partitions it assigns to this
    /// member (with --partition: read that partition outside group
    /// management), from the group's committed offsets, committing what is
    /// printed. Kafka consumers can be members of the same group.
    #[arg(long)]
    group: Option<String>,
    /// Read only this partition (default: all).
    #[arg(short, long)]
    partition: Option<u32>,
    /// Stop after this many records.
    #[arg(short = 'c', long)]
    max: Option<u64>,
    /// Keep waiting for new records instead of stopping at the end.
    #[arg(long)]
    follow: bool,
    /// Stop at the end offsets as they were when reading began (kcat's
    /// `-e`); this is the default without --follow.
    #[arg(short = 'e', long, conflicts_with = "follow")]
    exit_at_end: bool,
    /// `text` prints each value, after its key and a tab when it has one;
    /// `json` adds partition, offset, timestamp and headers.
    #[arg(short, long, default_value = "text")]
    format: String,
    #[command(flatten)]
    connect: ConnectArgs,
}

impl ConsumeArgs {
    /// Whether to keep reading past the end (`--follow`, never with `-e`).
    fn follows(&self) -> bool {
        self.follow && !self.exit_at_end
    }
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
    let from = Start::of(args)?;
    if let Start::Time(_) = from {
        bail!("a start time cannot be used with --group: a group resumes from its committed offsets (move them with `runnel group reset-offsets`)");
    }
    let mut probe = Consumer::new(client.clone(), &args.topic);
    for &p in partitions {
        probe.assign(p, 0);
    }
    let ends = probe.end_offsets().await?;
    let start = |p: u32| from.offset(ends.get(&p).copied().unwrap_or(0)).unwrap_or(0);
    let format = args.format.clone();
    let print = move |out: &mut std::io::StdoutLock<'_>, partition: u32, record: &runnel::storage::StoredRecord| {
        print_record(out, &format, partition, record)
    };
    crate::group_cli::consume_in_group(client, &args.topic, group, start, args.max, args.follows(), print).await
}

/// Where `-o`/`--from` (or `--from-time`) starts reading a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    Earliest,
    Latest,
    At(u64),
    BeforeEnd(u64),
    Time(i64),
}

impl Start {
    fn of(args: &ConsumeArgs) -> anyhow::Result<Start> {
        if let Some(ms) = args.from_time {
            return Ok(Start::Time(ms));
        }
        let text = args.from.trim();
        let bad = || format!("-o {text:?}: use earliest, latest, an offset N, -N (N before the end) or @MS (a time)");
        Ok(match text {
            "earliest" | "beginning" => Start::Earliest,
            "latest" | "end" => Start::Latest,
            _ if text.starts_with('@') => Start::Time(text[1..].parse().with_context(bad)?),
            _ if text.starts_with('-') => Start::BeforeEnd(text[1..].parse().with_context(bad)?),
            _ => Start::At(text.parse().with_context(bad)?),
        })
    }

    /// The offset to start at in a partition whose end offset is `end`
    /// (none for a time, which is looked up).
    fn offset(self, end: u64) -> Option<u64> {
        match self {
            Start::Earliest => Some(0),
            Start::Latest => Some(end),
            Start::At(offset) => Some(offset),
            Start::BeforeEnd(n) => Some(end.saturating_sub(n)),
            Start::Time(_) => None,
        }
    }
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
    let from = Start::of(args)?;
    for &p in partitions {
        consumer.assign(p, from.offset(0).unwrap_or(0));
    }
    let ends = consumer.end_offsets().await?;
    for (&p, &end) in &ends {
        if let Some(offset) = from.offset(end) {
            consumer.assign(p, offset);
        }
    }
    if let Start::Time(timestamp_ms) = from {
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
        if !args.follows() && at_end {
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
    let key = record
        .record
        .key
        .as_deref()
        .map(|k| String::from_utf8_lossy(k).to_string());
    if format == "json" {
        let headers: serde_json::Map<String, serde_json::Value> = record
            .record
            .headers
            .iter()
            .map(|h| {
                (
                    h.key.clone(),
                    h.value
                        .as_deref()
                        .map(|v| String::from_utf8_lossy(v).to_string())
                        .into(),
                )
            })
            .collect();
        let line = serde_json::json!({"partition": partition, "offset": record.offset, "timestamp_ms": record.record.timestamp_ms,
            "key": key, "value": value, "headers": headers});
        writeln!(out, "{line}")?;
    } else {
        match key {
            Some(key) => writeln!(out, "{key}\t{value}")?,
            None => writeln!(out, "{value}")?,
        }
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
            start_offset: None,
            committed_offset: None,
            end_offset: None,
            voters: ids(voters),
            learners: ids(learners),
        }
    }

    #[test]
    fn topic_settings_by_kafka_name_and_internal_topics() {
        let mut config = TopicConfig::new(3, 3);
        apply_setting(&mut config, "retention.ms=60000").expect("retention");
        apply_setting(&mut config, "min.insync.replicas=3").expect("min insync");
        assert_eq!((config.retention_ms, config.min_insync), (Some(60_000), 3));
        apply_setting(&mut config, "cleanup.policy=compact").expect("compact");
        assert_eq!(config.cleanup, CleanupPolicy::Compact);
        apply_setting(&mut config, "cleanup.policy=delete, compact").expect("both");
        assert_eq!(config.cleanup, CleanupPolicy::CompactDelete);
        apply_setting(&mut config, "delete.retention.ms=5").expect("tombstones");
        assert_eq!(config.delete_retention_ms, 5);
        apply_setting(&mut config, "min.compaction.lag.ms=86400000").expect("a lag");
        assert_eq!(config.min_compaction_lag_ms, 86_400_000);
        let wrong = apply_setting(&mut config, "cleanup.policy=shred").expect_err("no such policy");
        assert!(wrong.to_string().contains("not one of delete, compact"), "{wrong}");
        let unknown = apply_setting(&mut config, "segment.bytes=1024").expect_err("unknown");
        assert!(
            unknown
                .to_string()
                .contains("knows retention.ms, min.insync.replicas, cleanup.policy, delete.retention.ms and min.compaction.lag.ms"),
            "{unknown}"
        );
        assert!(apply_setting(&mut config, "retention.ms").is_err(), "no value");
        assert!(apply_setting(&mut config, "retention.ms=soon").is_err(), "not a number");
        for internal in ["__consumer_offsets", "q.repartition", "q.checkpoints", "CSAS_X_0.dlq"] {
            assert!(is_internal(internal), "{internal}");
        }
        assert!(!is_internal("orders") && !is_internal("dlq-archive"));
    }

    #[test]
    fn seeds_may_be_host_names() {
        assert_eq!(seed_addr("127.0.0.1:7101"), Ok("127.0.0.1:7101".parse().expect("addr")));
        assert_eq!(seed_addr("localhost:7101"), Ok("127.0.0.1:7101".parse().expect("addr")));
        let no_port = seed_addr("localhost").expect_err("no port");
        assert!(no_port.contains("not a node address (host:port"), "{no_port}");
    }

    #[test]
    fn consume_start_positions_as_kafka_tools_write_them() {
        #[derive(clap::Parser)]
        struct Consume {
            #[command(flatten)]
            args: ConsumeArgs,
        }
        let start = |from: &str| {
            let argv = ["consume", "t", "-o", from, "--seeds", "127.0.0.1:1", "--certs", "c"];
            let parsed = <Consume as clap::Parser>::try_parse_from(argv).map_err(|e| e.to_string())?;
            Start::of(&parsed.args).map_err(|e| e.to_string())
        };
        assert_eq!(start("beginning"), Ok(Start::Earliest));
        assert_eq!(start("end"), Ok(Start::Latest));
        assert_eq!(start("42"), Ok(Start::At(42)));
        assert_eq!(start("-5"), Ok(Start::BeforeEnd(5)));
        assert_eq!(start("@1700000000000"), Ok(Start::Time(1_700_000_000_000)));
        assert!(start("soon").is_err_and(|e| e.contains("use earliest, latest")));
        assert_eq!(Start::BeforeEnd(5).offset(3), Some(0), "not before the start");
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
