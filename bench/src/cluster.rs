//! `runnel bench produce` and `runnel bench idle`: a 3-node cluster of
//! `runnel node` processes on loopback, measured through the Rust client.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use runnel_actors::client::Client;
use runnel_actors::metadata::{NodeId, TopicConfig};
use runnel_actors::Acks;
use runnel_storage::sequence::sequence_add;
use runnel_storage::{BatchBuilder, ProducerInfo, Record, RecordBatch};
use serde_json::json;

use super::median;
use runnel_verify::fixtures::client::{connect, create_topic};
use runnel_verify::fixtures::procs::NodeLog;
use runnel_verify::fixtures::{free_addr, init_certs, scratch_dir, NodeCommand, ProcessCluster};

/// How long the benchmark cluster may take to form and create its topics.
pub(crate) const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The node processes (killed however the benchmark ends) and their scratch
/// directory, removed after them.
pub(crate) struct Nodes {
    pub(crate) cluster: ProcessCluster,
    _scratch: tempfile::TempDir,
}

impl Nodes {
    pub(crate) fn start(exe: &Path, count: u32, dir: Option<&Path>) -> anyhow::Result<Nodes> {
        Nodes::start_with(exe, count, dir, &[])
    }

    /// As [`Nodes::start`], with extra `runnel node` flags.
    fn start_with(exe: &Path, count: u32, dir: Option<&Path>, flags: &[&str]) -> anyhow::Result<Nodes> {
        let scratch = scratch_dir("runnel-bench-cluster-", dir)?;
        let certs = init_certs(scratch.path(), count)?;
        let addrs = (0..count).map(|_| free_addr()).collect::<Result<Vec<_>, _>>()?;
        let command = NodeCommand::new(exe, scratch.path(), &certs, &addrs)
            .flags(flags.iter().copied())
            .env("RUST_LOG", "warn")
            .log(NodeLog::Null);
        let cluster = ProcessCluster::start(command, addrs)?;
        Ok(Nodes {
            cluster,
            _scratch: scratch,
        })
    }

    pub(crate) async fn connect(&self) -> anyhow::Result<Client> {
        Ok(connect(&self.cluster.addrs, self.cluster.certs(), SETUP_TIMEOUT).await?)
    }

    fn pid(&self, node: NodeId) -> Option<u32> {
        self.cluster.pid(node)
    }

    /// CPU seconds used so far by the live node processes together, and by this process.
    fn cpu_seconds(&self) -> anyhow::Result<(f64, f64)> {
        let mut nodes = 0.0;
        for pid in self.cluster.pids() {
            nodes += process_usage(pid)?.0;
        }
        Ok((nodes, process_usage(std::process::id())?.0))
    }

    fn kill(&mut self, node: NodeId) -> anyhow::Result<()> {
        Ok(self.cluster.kill(node)?)
    }
}

/// `runnel node --fsync`, as the flag spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FsyncMode {
    EveryBatch,
    Never,
}

impl FsyncMode {
    fn name(self) -> &'static str {
        match self {
            FsyncMode::EveryBatch => "every-batch",
            FsyncMode::Never => "never",
        }
    }
}

#[derive(clap::Args)]
pub struct ProduceArgs {
    /// Seconds each case runs.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Bytes of records per batch (512 KiB keeps the ack p99 of 4
    /// producers under 50 ms here; 1 MiB gives more throughput, not that).
    #[arg(long, default_value_t = 512 << 10)]
    batch_bytes: usize,
    /// Record sizes measured, in bytes, in this order.
    #[arg(long, value_delimiter = ',', default_value = "100,1024")]
    record_bytes: Vec<usize>,
    /// Producer counts measured for each record size.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    producers: Vec<u32>,
    /// Skip the second cluster, whose nodes run with `--fsync never`.
    #[arg(long)]
    skip_fsync_never: bool,
    /// Directory for the nodes' data (a temporary one under it).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// One case's figures.
struct Row {
    fsync: FsyncMode,
    record_bytes: usize,
    producers: u32,
    records_per_s: f64,
    mb_per_s: f64,
    p50: f64,
    p99: f64,
    max: f64,
    batches: usize,
    /// CPU seconds per wall second while the case ran: the node processes, and the benchmark's client.
    nodes_cores: f64,
    client_cores: f64,
    /// The disk's MB/s just before the case, sorted (see [`fdatasync_ceiling`]).
    ceiling_runs: Vec<f64>,
}

impl Row {
    /// The disk's MB/s just before the case: the median of its runs.
    fn ceiling(&self) -> f64 {
        median(&mut self.ceiling_runs.clone())
    }
}

/// One producer's results: acknowledged records and each batch's ack latency.
pub(crate) struct ProducerRun {
    pub(crate) records: u64,
    pub(crate) latencies_ms: Vec<f64>,
}

/// Produces idempotent batches of `batch_bytes` to partition `partition` of
/// topic `bench` with acks=all until `until`.
pub(crate) async fn produce_for(
    client: Arc<Client>,
    partition: u32,
    producer_id: i64,
    record_bytes: usize,
    batch_bytes: usize,
    until: Instant,
) -> anyhow::Result<ProducerRun> {
    let value = Bytes::from(vec![b'r'; record_bytes]);
    let per_batch = (batch_bytes / (record_bytes + 8)).max(1);
    let mut run = ProducerRun {
        records: 0,
        latencies_ms: Vec::new(),
    };
    let mut sequence = 0i32;
    while Instant::now() < until {
        let batch = idempotent_batch(producer_id, sequence, &value, per_batch)?;
        let count = batch.record_count();
        let started = Instant::now();
        client.produce("bench", partition, batch, Acks::All).await?;
        run.latencies_ms.push(started.elapsed().as_secs_f64() * 1e3);
        run.records += u64::from(count);
        sequence = sequence_add(sequence, i64::from(count));
    }
    Ok(run)
}

/// `records` copies of `value` as one batch of an idempotent producer.
pub(crate) fn idempotent_batch(
    producer_id: i64,
    base_sequence: i32,
    value: &Bytes,
    records: usize,
) -> anyhow::Result<RecordBatch> {
    let producer = ProducerInfo {
        producer_id,
        producer_epoch: 0,
        base_sequence,
    };
    let mut builder = BatchBuilder::with_capacity(records * (value.len() + 16) + 1024).producer(producer);
    // Stamped now: a record of 1970 would make every closed segment older
    // than the topic's retention, and retention would delete what the
    // bench is about to read back (a gigabyte a partition rolls a segment).
    let now_ms = runnel_actors::client::unix_now_ms();
    for _ in 0..records {
        builder.push(&Record {
            timestamp_ms: now_ms,
            value: Some(value.clone()),
            ..Record::default()
        })?;
    }
    Ok(builder.build()?)
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// MB/s of 1 MiB writes each followed by fdatasync, on the nodes' disk.
fn fdatasync_ceiling(dir: &Path) -> anyhow::Result<f64> {
    use std::io::Write;
    let path = dir.join("runnel-bench-fdatasync");
    let mut file = std::fs::File::create(&path)?;
    let chunk = vec![b'f'; 1 << 20];
    let started = Instant::now();
    for _ in 0..128 {
        file.write_all(&chunk)?;
        file.sync_data()?;
    }
    let mb_per_s = 128.0 * (1 << 20) as f64 / 1e6 / started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(mb_per_s)
}

pub fn produce(args: ProduceArgs, exe: &Path) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let (mut nodes, client) = produce_cluster(&args, exe, FsyncMode::EveryBatch).await?;
        let mut rows = produce_cases(&args, &nodes, &client, FsyncMode::EveryBatch).await?;
        let gap = failover_gap(&client, &mut nodes, args.batch_bytes).await?;
        drop(client);
        drop(nodes);
        if !args.skip_fsync_never {
            let (nodes, client) = produce_cluster(&args, exe, FsyncMode::Never).await?;
            rows.extend(produce_cases(&args, &nodes, &client, FsyncMode::Never).await?);
        }
        let mut all_ceilings: Vec<f64> = rows.iter().flat_map(|r| r.ceiling_runs.iter().copied()).collect();
        let ceiling = median(&mut all_ceilings);
        let mut summary = Vec::new();
        for row in &rows {
            let ratio = row.mb_per_s / (row.ceiling() / 3.0);
            println!(
                "{}",
                json!({"bench": "produce", "record_bytes": row.record_bytes, "producers": row.producers, "replication": 3,
                    "acks": "all", "fsync": row.fsync.name(), "batch_bytes": args.batch_bytes,
                    "records_per_s": row.records_per_s, "mb_per_s": row.mb_per_s,
                    "ack_p50_ms": row.p50, "ack_p99_ms": row.p99, "ack_max_ms": row.max, "batches": row.batches,
                    "ceiling_mb_per_s": row.ceiling() / 3.0, "ceiling_runs_fdatasync_mb_per_s": row.ceiling_runs, "ratio_to_ceiling": ratio,
                    "nodes_cores_busy": row.nodes_cores, "client_cores_busy": row.client_cores})
            );
            summary.push(format!(
                "  fsync {:<11} {:>5} B records, {} producer(s): {:>10.0} records/s {:>7.1} MB/s = {:>5.1}% of {:>5.1} | ack p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms | cores busy: nodes {:.2}, client {:.2}",
                row.fsync.name(), row.record_bytes, row.producers, row.records_per_s, row.mb_per_s, ratio * 100.0, row.ceiling() / 3.0, row.p50, row.p99, row.max, row.nodes_cores, row.client_cores
            ));
        }
        println!("{}", json!({"bench": "produce", "case": "failover", "fsync": FsyncMode::EveryBatch.name(), "longest_gap_without_ack_ms": gap}));
        println!(
            "\nproduce benchmark: 3 node processes on loopback, RF=3, acks=all, {} KiB batches, {} s per case",
            args.batch_bytes >> 10,
            args.seconds
        );
        println!(
            "  ceiling: a 1 MiB write + fdatasync loop, / RF 3, the median of three just before each case (all cases: {:.1} MB/s)",
            ceiling / 3.0
        );
        for line in summary {
            println!("{line}");
        }
        println!("  failover (fsync every batch): longest time without a successful ack after killing the leader: {gap:.0} ms");
        Ok(())
    })
}

/// Three nodes with `--fsync fsync`, a client, and the 4-partition RF=3 topic `bench`.
async fn produce_cluster(args: &ProduceArgs, exe: &Path, fsync: FsyncMode) -> anyhow::Result<(Nodes, Arc<Client>)> {
    let nodes = Nodes::start_with(exe, 3, args.dir.as_deref(), &["--fsync", fsync.name()])?;
    let client = Arc::new(nodes.connect().await?);
    create_topic(&client, "bench", TopicConfig::new(4, 3), SETUP_TIMEOUT).await?;
    Ok((nodes, client))
}

/// Every record size × producer count of `args` against one cluster.
async fn produce_cases(
    args: &ProduceArgs,
    nodes: &Nodes,
    client: &Arc<Client>,
    fsync: FsyncMode,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    // Producer ids differ between cases, so every case starts its sequences afresh.
    let mut producer_id = 1_000i64;
    for &record_bytes in &args.record_bytes {
        for &producers in &args.producers {
            // The disk here is shared, and slows down after gigabytes of
            // writes: each case is compared with the disk as it is just then.
            let disk = args.dir.clone().unwrap_or_else(std::env::temp_dir);
            let mut ceiling_runs: Vec<f64> = (0..3)
                .map(|_| fdatasync_ceiling(&disk))
                .collect::<anyhow::Result<_>>()?;
            ceiling_runs.sort_by(f64::total_cmp);
            let until = Instant::now() + Duration::from_secs(args.seconds);
            let started = Instant::now();
            let cpu_before = nodes.cpu_seconds()?;
            let mut tasks = Vec::new();
            for p in 0..producers {
                producer_id += 1;
                tasks.push(tokio::spawn(produce_for(
                    client.clone(),
                    p % 4,
                    producer_id,
                    record_bytes,
                    args.batch_bytes,
                    until,
                )));
            }
            let (mut records, mut latencies) = (0u64, Vec::new());
            for task in tasks {
                let run = task.await??;
                records += run.records;
                latencies.extend(run.latencies_ms);
            }
            let seconds = started.elapsed().as_secs_f64();
            let cpu_after = nodes.cpu_seconds()?;
            let (nodes_cores, client_cores) = (
                (cpu_after.0 - cpu_before.0) / seconds,
                (cpu_after.1 - cpu_before.1) / seconds,
            );
            latencies.sort_by(f64::total_cmp);
            let (p50, p99, max) = (
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.99),
                latencies.last().copied().unwrap_or(f64::NAN),
            );
            let mb_per_s = records as f64 * record_bytes as f64 / 1e6 / seconds;
            rows.push(Row {
                fsync,
                record_bytes,
                producers,
                records_per_s: records as f64 / seconds,
                mb_per_s,
                p50,
                p99,
                max,
                batches: latencies.len(),
                nodes_cores,
                client_cores,
                ceiling_runs,
            });
        }
    }
    Ok(rows)
}

/// Produces continuously, kills partition 0's leader, and returns the longest
/// time between two successful acks.
pub(crate) async fn failover_gap(client: &Arc<Client>, nodes: &mut Nodes, batch_bytes: usize) -> anyhow::Result<f64> {
    let leader = leader_of_partition_0(client).await?;
    let value = Bytes::from(vec![b'g'; 100]);
    let mut last_ack = Instant::now();
    let mut longest = 0f64;
    let started = Instant::now();
    let mut killed = false;
    let mut sequence = 0i32;
    while started.elapsed() < Duration::from_secs(8) {
        if !killed && started.elapsed() > Duration::from_secs(2) {
            nodes.kill(leader)?;
            killed = true;
        }
        let batch = idempotent_batch(77, sequence, &value, (batch_bytes / 1024).max(1))?;
        let count = batch.record_count() as i32;
        if client.produce("bench", 0, batch, Acks::All).await.is_ok() {
            longest = longest.max(last_ack.elapsed().as_secs_f64() * 1e3);
            last_ack = Instant::now();
            sequence = sequence_add(sequence, i64::from(count));
        }
    }
    if !killed {
        bail!("the leader was never killed");
    }
    Ok(longest)
}

/// The leader of partition 0 of topic `bench`, once it has one (a topic
/// just created may not yet).
async fn leader_of_partition_0(client: &Client) -> anyhow::Result<NodeId> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    loop {
        let info = client.describe_topic("bench").await?;
        if let Some(leader) = info.partitions.first().and_then(|p| p.leader) {
            return Ok(leader);
        }
        if Instant::now() >= deadline {
            bail!("partition 0 of bench has no leader after {SETUP_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(clap::Args)]
pub struct IdleArgs {
    /// Partitions created (replication 3).
    #[arg(long, default_value_t = 1000)]
    partitions: u32,
    /// Seconds of idleness measured.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Directory for the nodes' data (a temporary one under it).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Seconds one Runnel consumer takes to read `records` records from offset 0
/// of partitions `0..partitions` of `topic` (at most 300 s).
pub(crate) async fn read_back(client: &Arc<Client>, topic: &str, partitions: u32, records: u64) -> anyhow::Result<f64> {
    let mut consumer = runnel_actors::client::Consumer::new(client.clone(), topic);
    consumer.fetch_bytes_max = 4 << 20;
    for partition in 0..partitions {
        consumer.assign(partition, 0);
    }
    let started = Instant::now();
    let mut consumed = 0u64;
    while consumed < records {
        consumed += consumer.poll().await?.len() as u64;
        if started.elapsed() > Duration::from_secs(300) {
            bail!("consumed only {consumed} of {records} records of {topic} in 300 s");
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

/// (CPU seconds used so far, resident bytes) of a process, from /proc.
pub fn process_usage(pid: u32) -> anyhow::Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 =
        fields.get(11).context("utime")?.parse::<u64>()? + fields.get(12).context("stime")?.parse::<u64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmRSS")?
        .parse()?;
    // Linux reports CPU time in clock ticks of 1/100 s on every common build.
    Ok((ticks as f64 / 100.0, rss_kib * 1024))
}

pub fn idle(args: IdleArgs, exe: &Path) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let nodes = Nodes::start(exe, 3, args.dir.as_deref())?;
        let client = Arc::new(nodes.connect().await?);
        create_topic(&client, "idle", TopicConfig::new(args.partitions, 3), SETUP_TIMEOUT).await?;
        // Let elections settle before measuring idleness.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let info = client.describe_topic("idle").await?;
            if info.partitions.iter().all(|p| p.leader.is_some()) {
                break;
            }
            if Instant::now() > deadline {
                bail!("not every partition elected a leader within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before: Vec<(f64, u64)> = (1..=3u32)
            .map(|n| process_usage(nodes.pid(NodeId(n)).unwrap_or(0)))
            .collect::<Result<_, _>>()?;
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        let after: Vec<(f64, u64)> = (1..=3u32)
            .map(|n| process_usage(nodes.pid(NodeId(n)).unwrap_or(0)))
            .collect::<Result<_, _>>()?;
        let mut cores = Vec::new();
        println!();
        for (n, (b, a)) in before.iter().zip(&after).enumerate() {
            let core_share = (a.0 - b.0) / args.seconds as f64;
            cores.push(core_share);
            println!(
                "{}",
                json!({"bench": "idle", "node": n + 1, "partitions": args.partitions, "replication": 3,
                    "cpu_core_fraction": core_share, "rss_bytes": a.1})
            );
        }
        println!(
            "\nidle benchmark: {} partitions, RF=3, 3 node processes, {} s idle",
            args.partitions, args.seconds
        );
        for (n, (share, (_, rss))) in cores.iter().zip(&after).enumerate() {
            println!(
                "  node {}: {:>5.1}% of a core, {:>6.1} MB resident",
                n + 1,
                share * 100.0,
                *rss as f64 / 1e6
            );
        }
        Ok(())
    })
}

#[derive(clap::Args)]
pub struct ConsumeArgs {
    /// Megabytes produced, then consumed.
    #[arg(long, default_value_t = 256)]
    megabytes: u64,
    /// Directory for the nodes' data (a temporary one under it).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Produces `--megabytes` of 1 KiB and 100 B records to a 4-partition RF=3
/// topic, then times a consumer reading all of it back (committed reads
/// from the leaders).
pub fn consume(args: ConsumeArgs, exe: &Path) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let nodes = Nodes::start(exe, 3, args.dir.as_deref())?;
        let client = Arc::new(nodes.connect().await?);
        let mut summary = Vec::new();
        for record_bytes in [1024usize, 100] {
            let topic = format!("consume-{record_bytes}");
            create_topic(&client, &topic, TopicConfig::new(4, 3), SETUP_TIMEOUT).await?;
            let total_bytes = args.megabytes << 20;
            let value = Bytes::from(vec![b'c'; record_bytes]);
            let per_batch = (256 << 10) / (record_bytes + 8);
            let mut produced = 0u64;
            let mut sequence = [0i32; 4];
            let mut partition = 0usize;
            while produced * record_bytes as u64 <= total_bytes {
                let batch = idempotent_batch(9_000 + partition as i64, sequence[partition], &value, per_batch)?;
                let count = batch.record_count();
                client.produce(&topic, partition as u32, batch, Acks::All).await?;
                sequence[partition] = sequence_add(sequence[partition], i64::from(count));
                produced += u64::from(count);
                partition = (partition + 1) % 4;
            }
            let seconds = read_back(&client, &topic, 4, produced).await?;
            let consumed = produced;
            let mb_per_s = consumed as f64 * record_bytes as f64 / 1e6 / seconds;
            println!(
                "{}",
                json!({"bench": "consume", "record_bytes": record_bytes, "records": consumed, "replication": 3,
                    "records_per_s": consumed as f64 / seconds, "mb_per_s": mb_per_s})
            );
            summary.push(format!(
                "  {record_bytes:>5} B records: {consumed} consumed in {seconds:.2} s = {:>10.0} records/s {mb_per_s:>7.1} MB/s",
                consumed as f64 / seconds
            ));
        }
        println!("\nconsume benchmark: one consumer reading 4 partitions (RF=3) from 3 node processes on loopback");
        for line in summary {
            println!("{line}");
        }
        Ok(())
    })
}
