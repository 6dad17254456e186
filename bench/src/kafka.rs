//! `runnel bench kafka`: the Kafka path against Runnel's own client, on the
//! same cluster in the same run — a 3-node RF=3 cluster, then a 1-node RF=1
//! one, each node serving Kafka on loopback.
//!
//! The Kafka side is confluent-kafka (librdkafka) in a Python interpreter
//! given by `--python` (`RUNNEL_KAFKA_PYTHON`; `.ci/test` makes one at
//! `target/kafka-venv/bin/python`), running `kafka_bench.py`, which is built
//! into this binary. Both sides produce 1 KiB records idempotently with
//! acks=all into 4 partitions for the same time, then read everything back.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use runnel_actors::client::Client;
use runnel_actors::metadata::{NodeId, TopicConfig};
use serde_json::{json, Value};

use crate::cluster::{percentile, process_usage, produce_for, read_back};
use runnel_verify::fixtures::client::{connect, create_topic};
use runnel_verify::fixtures::procs::NodeLog;
use runnel_verify::fixtures::{free_addr, init_certs, scratch_dir, NodeCommand, NodeProcess};

const SCRIPT: &str = include_str!("kafka_bench.py");
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
const PARTITIONS: u32 = 4;
/// Bytes per batch of Runnel's own producers (as `bench produce`).
const NATIVE_BATCH_BYTES: usize = 512 << 10;

#[derive(clap::Args)]
pub struct Args {
    /// Seconds each side produces.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Bytes of each record's value.
    #[arg(long, default_value_t = 1024)]
    record_bytes: usize,
    /// A Python with confluent-kafka installed.
    #[arg(long, env = "RUNNEL_KAFKA_PYTHON")]
    python: PathBuf,
    /// Directory for the nodes' data (a temporary one under it).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// One side's figures on one cluster.
struct Side {
    produce_records_per_s: f64,
    produce_mb_per_s: f64,
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    consume_records_per_s: f64,
    consume_mb_per_s: f64,
    /// CPU seconds per wall second while producing: the nodes, the client.
    nodes_cores: f64,
    client_cores: f64,
}

pub fn run(args: Args, exe: &Path) -> anyhow::Result<()> {
    check_python(&args.python)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let mut summary = Vec::new();
    for (nodes, replication) in [(3u32, 3u16), (1, 1)] {
        let (native, kafka) = runtime.block_on(one_cluster(&args, exe, nodes, replication))?;
        for (path, side) in [("native", &native), ("kafka", &kafka)] {
            println!(
                "{}",
                json!({"bench": "kafka", "path": path, "nodes": nodes, "replication": replication,
                    "record_bytes": args.record_bytes, "acks": "all",
                    "produce_records_per_s": side.produce_records_per_s, "produce_mb_per_s": side.produce_mb_per_s,
                    "ack_p50_ms": side.ack_p50_ms, "ack_p99_ms": side.ack_p99_ms,
                    "consume_records_per_s": side.consume_records_per_s, "consume_mb_per_s": side.consume_mb_per_s,
                    "produce_nodes_cores_busy": side.nodes_cores, "produce_client_cores_busy": side.client_cores})
            );
        }
        summary.push(summary_lines(nodes, replication, &native, &kafka));
    }
    println!(
        "\nkafka benchmark: confluent-kafka (librdkafka) vs Runnel's client, {} B records, acks=all, idempotent, \
         {PARTITIONS} partitions, {} s of producing per side",
        args.record_bytes, args.seconds
    );
    println!("  (Runnel's ack latency is per 512 KiB batch; librdkafka's per record, from produce() to delivery)");
    for lines in summary {
        println!("{lines}");
    }
    Ok(())
}

fn summary_lines(nodes: u32, replication: u16, native: &Side, kafka: &Side) -> String {
    let line = |path: &str, s: &Side| {
        format!(
            "    {path:<6} produce {:>9.0} records/s {:>6.1} MB/s (ack p50 {:.1} ms, p99 {:.1} ms; cores busy: nodes {:.2}, client {:.2}) | consume {:>9.0} records/s {:>6.1} MB/s",
            s.produce_records_per_s, s.produce_mb_per_s, s.ack_p50_ms, s.ack_p99_ms, s.nodes_cores, s.client_cores, s.consume_records_per_s, s.consume_mb_per_s
        )
    };
    format!(
        "  {nodes} node(s), RF={replication}:\n{}\n{}\n    kafka/native: produce {:.0}%, consume {:.0}%",
        line("native", native),
        line("kafka", kafka),
        100.0 * kafka.produce_mb_per_s / native.produce_mb_per_s,
        100.0 * kafka.consume_mb_per_s / native.consume_mb_per_s
    )
}

fn check_python(python: &Path) -> anyhow::Result<()> {
    let found = Command::new(python).args(["-c", "import confluent_kafka"]).output();
    match found {
        Ok(output) if output.status.success() => Ok(()),
        _ => bail!(
            "{} cannot import confluent_kafka: give --python (or RUNNEL_KAFKA_PYTHON) a Python with it, such as \
             the one `.ci/test` makes at target/kafka-venv/bin/python",
            python.display()
        ),
    }
}

/// Native then Kafka on one fresh cluster.
async fn one_cluster(args: &Args, exe: &Path, count: u32, replication: u16) -> anyhow::Result<(Side, Side)> {
    let scratch = scratch_dir("runnel-bench-kafka-", args.dir.as_deref())?;
    let (nodes, addrs, bootstrap) = start_nodes(exe, scratch.path(), count)?;
    let certs = scratch.path().join("certs");
    let client = Arc::new(connect(&addrs, &certs, SETUP_TIMEOUT).await?);
    for topic in ["bench", "kafka", "warmup"] {
        create_topic(&client, topic, TopicConfig::new(PARTITIONS, replication), SETUP_TIMEOUT).await?;
    }
    let pids: Vec<u32> = nodes.iter().filter_map(NodeProcess::pid).collect();
    let native = native_side(args, &client, &pids).await?;
    python(args, &["produce", &bootstrap, "warmup", "1", "100", "0.5"])?;
    let kafka = kafka_side(args, &bootstrap, &pids)?;
    drop(nodes);
    Ok((native, kafka))
}

fn start_nodes(exe: &Path, dir: &Path, count: u32) -> anyhow::Result<(Vec<NodeProcess>, Vec<SocketAddr>, String)> {
    let certs = init_certs(dir, count)?; // at <dir>/certs
    let addrs = (0..count).map(|_| free_addr()).collect::<Result<Vec<_>, _>>()?;
    let command = NodeCommand::new(exe, dir, &certs, &addrs)
        .env("RUST_LOG", "warn")
        .log(NodeLog::Null);
    let mut nodes = Vec::new();
    let mut kafka = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let flags = ["--kafka-listen".to_string(), port.to_string()];
        nodes.push(command.clone().flags(flags).spawn(NodeId(i as u32 + 1), *addr)?);
        kafka.push(port.to_string());
    }
    Ok((nodes, addrs, kafka.join(",")))
}

/// CPU seconds used so far by the processes `pids` together.
fn cpu_seconds(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|&pid| Ok(process_usage(pid)?.0)).sum()
}

async fn native_side(args: &Args, client: &Arc<Client>, pids: &[u32]) -> anyhow::Result<Side> {
    let cpu_before = (cpu_seconds(pids)?, cpu_seconds(&[std::process::id()])?);
    let started = Instant::now();
    let until = started + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for partition in 0..PARTITIONS {
        let producer_id = 5_000 + i64::from(partition);
        let run = produce_for(
            client.clone(),
            partition,
            producer_id,
            args.record_bytes,
            NATIVE_BATCH_BYTES,
            until,
        );
        tasks.push(tokio::spawn(run));
    }
    let (mut records, mut latencies) = (0u64, Vec::new());
    for task in tasks {
        let run = task.await??;
        records += run.records;
        latencies.extend(run.latencies_ms);
    }
    let produce_seconds = started.elapsed().as_secs_f64();
    let nodes_cores = (cpu_seconds(pids)? - cpu_before.0) / produce_seconds;
    let client_cores = (cpu_seconds(&[std::process::id()])? - cpu_before.1) / produce_seconds;
    latencies.sort_by(f64::total_cmp);
    let consume_seconds = read_back(client, "bench", PARTITIONS, records).await?;
    let mb = records as f64 * args.record_bytes as f64 / 1e6;
    Ok(Side {
        produce_records_per_s: records as f64 / produce_seconds,
        produce_mb_per_s: mb / produce_seconds,
        ack_p50_ms: percentile(&latencies, 0.5),
        ack_p99_ms: percentile(&latencies, 0.99),
        consume_records_per_s: records as f64 / consume_seconds,
        consume_mb_per_s: mb / consume_seconds,
        nodes_cores,
        client_cores,
    })
}

fn kafka_side(args: &Args, bootstrap: &str, pids: &[u32]) -> anyhow::Result<Side> {
    let (record_bytes, seconds) = (args.record_bytes.to_string(), args.seconds.to_string());
    let partitions = PARTITIONS.to_string();
    let nodes_before = cpu_seconds(pids)?;
    let produced = python(
        args,
        &["produce", bootstrap, "kafka", &partitions, &record_bytes, &seconds],
    )?;
    let nodes_cpu = cpu_seconds(pids)? - nodes_before;
    let records = produced["records"].as_u64().context("produced records")?;
    if produced["failed"] != 0 || produced["unflushed"] != 0 {
        bail!("librdkafka's producer did not get every record acknowledged: {produced}");
    }
    let consumed = python(
        args,
        &["consume", bootstrap, "kafka", &partitions, &records.to_string()],
    )?;
    if consumed["records"].as_u64() != Some(records) {
        bail!(
            "librdkafka's consumer read {} of {records} records",
            consumed["records"]
        );
    }
    let mb = records as f64 * args.record_bytes as f64 / 1e6;
    let seconds = |v: &Value| v["seconds"].as_f64().unwrap_or(f64::NAN);
    Ok(Side {
        produce_records_per_s: records as f64 / seconds(&produced),
        produce_mb_per_s: mb / seconds(&produced),
        ack_p50_ms: produced["ack_p50_ms"].as_f64().unwrap_or(f64::NAN),
        ack_p99_ms: produced["ack_p99_ms"].as_f64().unwrap_or(f64::NAN),
        consume_records_per_s: records as f64 / seconds(&consumed),
        consume_mb_per_s: mb / seconds(&consumed),
        nodes_cores: nodes_cpu / seconds(&produced),
        client_cores: produced["cpu_seconds"].as_f64().unwrap_or(f64::NAN) / seconds(&produced),
    })
}

/// Runs the embedded script with `args`; its JSON line.
fn python(args: &Args, script_args: &[&str]) -> anyhow::Result<Value> {
    let mut command = Command::new(&args.python);
    command.args(["-c", SCRIPT]).args(script_args);
    let output = command.output().context("running the Kafka side's Python")?;
    if !output.status.success() {
        bail!(
            "the Kafka side ({}) failed: {}",
            script_args[0],
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().last().context("the Kafka side printed nothing")?;
    Ok(serde_json::from_str(line)?)
}
