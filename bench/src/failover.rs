//! `runnel bench failover`: how long a producer goes without an
//! acknowledgement when a partition's leader is killed (SIGKILL), and how
//! long a whole 3-node cluster, stopped cleanly and started again, takes to
//! acknowledge its first write. Each run uses a fresh cluster; the summary
//! quotes medians.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;
use runnel_actors::client::Client;
use runnel_actors::metadata::{NodeId, TopicConfig};
use runnel_actors::Acks;
use serde_json::json;

use super::cluster::{failover_gap, idempotent_batch, Nodes, SETUP_TIMEOUT};
use super::median;
use runnel_verify::fixtures::client::{connect, create_topic};

/// Bytes of records per batch: small, so acknowledgements are frequent and
/// the gap is measured finely.
const BATCH_BYTES: usize = 16 << 10;
/// How long a node may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the restarted cluster may take to acknowledge a write.
const FIRST_ACK_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(clap::Args)]
pub struct Args {
    /// Fresh clusters measured (one leader kill and one restart each).
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// Directory for the nodes' data (a temporary one under it).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// One run's figures, in milliseconds.
struct Run {
    gap_ms: f64,
    first_ack_ms: f64,
    clean_stops: usize,
}

pub fn run(args: Args, exe: &Path) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let mut runs = Vec::new();
    for index in 0..args.runs {
        let run = runtime.block_on(one_run(exe, args.dir.as_deref()))?;
        println!(
            "{}",
            json!({"bench": "failover", "run": index, "longest_gap_without_ack_ms": run.gap_ms,
                "restart_first_ack_ms": run.first_ack_ms, "clean_stops": run.clean_stops})
        );
        runs.push(run);
    }
    let gap = median(&mut runs.iter().map(|r| r.gap_ms).collect::<Vec<_>>());
    let first = median(&mut runs.iter().map(|r| r.first_ack_ms).collect::<Vec<_>>());
    let gaps: Vec<String> = runs.iter().map(|r| format!("{:.0}", r.gap_ms)).collect();
    let firsts: Vec<String> = runs.iter().map(|r| format!("{:.0}", r.first_ack_ms)).collect();
    println!(
        "{}",
        json!({"bench": "failover", "summary": true, "runs": args.runs,
            "median_gap_ms": gap, "median_restart_first_ack_ms": first})
    );
    println!("failover on 3 node processes, RF=3, acks=all, {} runs:", args.runs);
    println!(
        "  leader SIGKILLed while producing: longest time without an ack, median {gap:.0} ms (runs: {})",
        gaps.join(", ")
    );
    println!(
        "  whole cluster stopped (SIGTERM) and started again: first ack after {first:.0} ms median (runs: {})",
        firsts.join(", ")
    );
    Ok(())
}

async fn one_run(exe: &Path, dir: Option<&Path>) -> anyhow::Result<Run> {
    let mut nodes = Nodes::start(exe, 3, dir)?;
    let client = Arc::new(nodes.connect().await?);
    create_topic(&client, "bench", TopicConfig::new(1, 3), SETUP_TIMEOUT).await?;
    let gap_ms = failover_gap(&client, &mut nodes, BATCH_BYTES).await?;
    drop(client);
    let ids: Vec<NodeId> = nodes.cluster.ids().collect();
    let mut clean_stops = 0;
    for &id in &ids {
        if nodes.cluster.stop(id, STOP_TIMEOUT)? {
            clean_stops += 1;
        }
    }
    let restarted = Instant::now();
    for &id in &ids {
        nodes.cluster.restart(id)?;
    }
    first_ack(&nodes).await?;
    Ok(Run {
        gap_ms,
        first_ack_ms: restarted.elapsed().as_secs_f64() * 1e3,
        clean_stops,
    })
}

/// Connects to the restarted cluster and produces until a write is
/// acknowledged (a new producer id: the old one's sequences are not needed).
async fn first_ack(nodes: &Nodes) -> anyhow::Result<()> {
    let deadline = Instant::now() + FIRST_ACK_TIMEOUT;
    let client: Client = connect(&nodes.cluster.addrs, nodes.cluster.certs(), FIRST_ACK_TIMEOUT).await?;
    let value = Bytes::from(vec![b'f'; 100]);
    loop {
        let batch = idempotent_batch(78, 0, &value, 1)?;
        match client.produce("bench", 0, batch, Acks::All).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                bail!("no acknowledged write {FIRST_ACK_TIMEOUT:?} after the restart: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}
