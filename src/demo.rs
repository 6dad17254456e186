//! `runnel demo`: the fraud query as a distributed dataflow, with a node
//! killed mid-way, on this machine.
//!
//! An embedded cluster of three nodes (in this process, talking over QUIC
//! with mutual TLS on loopback) replicates the topic
//! `authorization_attempts` (3 partitions, replication 3) and runs the
//! dataflow `possible_fraud`: KSQL's `SELECT card_number, count(*) FROM
//! authorization_attempts WINDOW TUMBLING (SIZE 5 MINUTE) GROUP BY
//! card_number HAVING count(*) > 3`, as six operator tasks (a source task
//! and a window task per partition) placed on the nodes. Generated attempts
//! are produced with acks=all; half-way through, the node leading partition
//! 0 is killed: its partitions fail over, its tasks are re-placed on the
//! survivors and resume from their checkpoints. The sink `possible_fraud` is
//! then read and compared with a reference count computed directly from the
//! input topic: every (card, window) result must be there exactly once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use runnel::client::protocol::{NodeId, TopicConfig};
use runnel::client::Client;
use runnel::dataflow::fraud::{self, Attempt, Generator};
use runnel_verify::fixtures::embedded::{start_cluster, Member};

const ATTEMPTS: usize = 40_000;
const CARDS: u64 = 1_000;
/// Event time between attempts: 40,000 attempts span about 33 minutes.
const STEP_MS: i64 = 50;
/// 2026-01-01T00:00:00Z.
const START_MS: i64 = 1_767_225_600_000;
const PARTITIONS: u32 = 3;
const TIMEOUT: Duration = Duration::from_secs(120);

pub fn run(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let scratch = tempfile::Builder::new().prefix("runnel-demo-").tempdir()?;
    let dir = dir.unwrap_or_else(|| scratch.path().join("cluster"));
    anyhow::ensure!(!dir.exists(), "{} already exists; give a fresh --dir", dir.display());
    let runtime = crate::node_runtime()?;
    runtime.block_on(run_cluster(dir))
}

/// Where each task runs, as "task@node" pairs.
async fn placement(client: &Client) -> anyhow::Result<String> {
    // The answering node may not have applied the start yet.
    let deadline = Instant::now() + TIMEOUT;
    let dataflow = loop {
        let dataflows = client.dataflows().await?;
        if let Some(dataflow) = dataflows.into_iter().find(|d| d.name == fraud::NAME) {
            break dataflow;
        }
        ensure!(Instant::now() < deadline, "the dataflow is not running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let pairs: Vec<String> = dataflow
        .placement
        .iter()
        .enumerate()
        .map(|(task, node)| format!("{task}@{node}"))
        .collect();
    Ok(pairs.join(" "))
}

/// Window results by (card, window start): the sink's and the reference's.
type Counts = BTreeMap<(String, i64), u64>;

async fn run_cluster(dir: PathBuf) -> anyhow::Result<()> {
    let mut generator = Generator::new(42, CARDS, START_MS, STEP_MS);
    let attempts: Vec<Attempt> = generator.by_ref().take(ATTEMPTS).collect();
    tracing::info!("phase 1: start an embedded 3-node cluster (QUIC, mutual TLS)");
    let (mut members, addrs) = start_cluster(&dir, 3).await?;
    let client = Arc::new(Client::connect(addrs.clone(), &dir.join("certs")).await?);
    create_and_start(&client).await?;
    let before = placement(&client).await?;

    tracing::info!("phase 3: produce {ATTEMPTS} attempts keyed by card (acks=all); kill a node half-way");
    let half = attempts.len() / 2;
    fraud::produce(&client, attempts[..half].iter().cloned(), None).await?;
    let (victim, client) = kill_leader(&client, &mut members, &addrs, &dir).await?;
    let closing = generator.closing_attempt();
    fraud::produce(&client, attempts[half..].iter().cloned(), Some(&closing)).await?;

    tracing::info!("phase 4: wait for the sink to hold every window result; compare with the reference");
    let input = fraud::read_attempts(&client).await.map_err(anyhow::Error::msg)?;
    let reference = fraud::reference(&input);
    let (results, duplicates) = wait_for_results(&client, reference.len()).await?;
    let after = placement(&client).await?;

    println!(
        "Runnel demo: a 3-node cluster replicating {} (3 partitions, replication 3) in {}",
        fraud::SOURCE,
        dir.display()
    );
    println!("  dataflow {}: source task + window task per partition", fraud::NAME);
    println!("    tasks before the kill: {before}");
    println!("    tasks after the kill:  {after}");
    println!(
        "  produced {} attempts with acks=all (read back: {}); node {victim} was killed half-way",
        attempts.len() + PARTITIONS as usize,
        input.len()
    );
    let matches = print_results(&results, duplicates, &reference);
    for member in members.into_values() {
        member.stop().await;
    }
    ensure!(matches, "the dataflow's results differ from the reference");
    Ok(())
}

/// Creates the source topic and starts the dataflow, retrying while the
/// new cluster settles.
async fn create_and_start(client: &Client) -> anyhow::Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    while let Err(e) = client
        .create_topic(fraud::SOURCE, TopicConfig::new(PARTITIONS, 3))
        .await
    {
        ensure!(Instant::now() < deadline, "could not create {}: {e}", fraud::SOURCE);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::info!("phase 2: start the dataflow {}", fraud::NAME);
    // The node answering may not have applied the new topic yet.
    while let Err(e) = client.start_dataflow(fraud::NAME).await {
        ensure!(Instant::now() < deadline, "could not start {}: {e}", fraud::NAME);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Stops the node leading partition 0; returns its id and a client of the
/// survivors.
async fn kill_leader(
    client: &Client,
    members: &mut BTreeMap<NodeId, Member>,
    addrs: &[SocketAddr],
    dir: &Path,
) -> anyhow::Result<(NodeId, Arc<Client>)> {
    let victim = client.describe_topic(fraud::SOURCE).await?.partitions[0]
        .leader
        .context("partition 0 has no leader")?;
    tracing::info!("killing node {victim}, the leader of partition 0 and host of dataflow tasks");
    if let Some(member) = members.remove(&victim) {
        member.stop().await;
    }
    let survivors: Vec<SocketAddr> = (1..=3u32)
        .filter(|id| *id != victim.0)
        .map(|id| addrs[id as usize - 1])
        .collect();
    let client = Arc::new(Client::connect(survivors, &dir.join("certs")).await?);
    Ok((victim, client))
}

/// The sink's results and duplicates once it holds `expected` results, or
/// what it holds at the deadline.
async fn wait_for_results(client: &Arc<Client>, expected: usize) -> anyhow::Result<(Counts, usize)> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (results, duplicates) = fraud::read_results(client).await.map_err(anyhow::Error::msg)?;
        if results.len() + duplicates >= expected || Instant::now() > deadline {
            return Ok((results, duplicates));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Prints the sink's results against the reference; whether they match.
fn print_results(results: &Counts, duplicates: usize, reference: &Counts) -> bool {
    println!(
        "  possible fraud (more than {} attempts per card in a 5-minute window): {} results in {}",
        fraud::THRESHOLD,
        results.len(),
        fraud::SINK
    );
    for ((card, window_start), count) in results.iter().take(10) {
        println!("    card {card}  window start {window_start}  count {count}");
    }
    let matches = results == reference && duplicates == 0;
    println!(
        "  sink equals the reference computed from the input ({} results, {duplicates} duplicated): {}",
        reference.len(),
        if matches { "yes" } else { "NO" }
    );
    matches
}
