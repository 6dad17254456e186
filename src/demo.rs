//! `runnel demo`: the fraud query typed as KSQL and run as a distributed
//! dataflow on three `runnel node` processes, one of them SIGKILLed mid-way.
//!
//! Three child processes of this binary form a cluster over QUIC with mutual
//! TLS on loopback, with the normal failure detection (a node is dead after
//! about 1.5 s) and `--replace-after 3` (tasks move off a node dead for 3 s).
//! The cluster is given two SQL statements, as a user would type them in
//! `runnel sql`: a declaration of the stream `authorization_attempts`
//! (which makes its topic, 3 partitions, replication 3) and the seed's
//! `CREATE STREAM possible_fraud AS SELECT card_number, count(*) FROM
//! authorization_attempts WINDOW TUMBLING (SIZE 5 MINUTE) GROUP BY
//! card_number HAVING count(*) > 3`. The statement's plan is committed to
//! the cluster and runs as six operator tasks (a source task and a window
//! task per partition) placed on the nodes. Generated card traffic (most
//! cards a few attempts, 1% of them bursting) is produced with acks=all;
//! half-way through, the node leading partition 0 is SIGKILLed: its
//! partitions fail over (the demo prints when the first write to partition
//! 0 was acknowledged again, and the new leaders), its tasks are re-placed
//! on the survivors and resume from their checkpoints (and when). The
//! query's output (every change of a count above 3) is then read and
//! compared with a reference computed directly from the input topic: every
//! (card, window) must end at its exact count, each change written once.
//! Before the last windows close, a pull query (`SELECT * FROM
//! possible_fraud WHERE card_number = …`) reads the busiest card's counts
//! from the state of the task that owns it, after the kill.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use runnel::client::partition_for_key;
use runnel::client::protocol::NodeId;
use runnel::client::Client;
use runnel::dataflow::fraud::{self, Attempt, Generator};
use runnel_sql::Session;
use runnel_verify::fixtures::client::connect;
use runnel_verify::fixtures::{free_addr, init_certs, NodeCommand, ProcessCluster};

const ATTEMPTS: usize = 40_000;
/// Most of 10,000 cards make a few attempts per window; one attempt in 8
/// goes to the busiest 1% of them, which burst.
const CARDS: u64 = 10_000;
const HOT_ONE_IN: u64 = 8;
/// Event time between attempts: 40,000 attempts span about 33 minutes.
const STEP_MS: i64 = 50;
/// 2026-01-01T00:00:00Z.
const START_MS: i64 = 1_767_225_600_000;
const PARTITIONS: u32 = 3;
const TIMEOUT: Duration = Duration::from_secs(120);
/// Seconds a node must be dead before its tasks move (`--replace-after`).
const REPLACE_AFTER_S: u64 = 3;
/// Window results printed; the count of the rest follows them.
const RESULTS_SHOWN: usize = 10;

pub fn run(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let scratch = tempfile::Builder::new().prefix("runnel-demo-").tempdir()?;
    // A directory given is kept and named; the default one is deleted at exit.
    let kept = dir.is_some();
    let dir = dir.unwrap_or_else(|| scratch.path().join("cluster"));
    anyhow::ensure!(!dir.exists(), "{} already exists; give a fresh --dir", dir.display());
    let runtime = crate::node_runtime()?;
    runtime.block_on(run_cluster(dir, kept))
}

/// Where each task runs, in words: per partition, the node of its source
/// task and of its window task (task = stage * partitions + partition).
async fn placement(client: &Client) -> anyhow::Result<String> {
    // The answering node may not have applied the start yet.
    let deadline = Instant::now() + TIMEOUT;
    let dataflow = loop {
        let dataflows = client.dataflows().await?;
        if let Some(dataflow) = dataflows.into_iter().find(|d| d.name == fraud::SQL_QUERY) {
            break dataflow;
        }
        ensure!(Instant::now() < deadline, "the dataflow is not running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let partitions = dataflow.partitions as usize;
    let node_of = |stage: usize, partition: usize| {
        dataflow
            .placement
            .get(stage * partitions + partition)
            .map_or("?".to_string(), |n| n.to_string())
    };
    let words: Vec<String> = (0..partitions)
        .map(|p| {
            format!(
                "partition {p}: source on node {}, window on node {}",
                node_of(0, p),
                node_of(1, p)
            )
        })
        .collect();
    Ok(words.join("; "))
}

/// A time in UTC, as RFC 3339 (`2026-01-01T00:05:00Z`).
fn utc(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{ms} ms after 1970"))
}

/// Window results by (card, window start): the sink's and the reference's.
type Counts = BTreeMap<(String, i64), u64>;

async fn run_cluster(dir: PathBuf, kept: bool) -> anyhow::Result<()> {
    let mut generator = Generator::new(42, CARDS, START_MS, STEP_MS).bursting_one_in(HOT_ONE_IN);
    let attempts: Vec<Attempt> = generator.by_ref().take(ATTEMPTS).collect();
    tracing::info!("phase 1: start 3 `runnel node` processes (QUIC, mutual TLS on loopback)");
    let (mut cluster, addrs, certs) = start_nodes(&dir)?;
    let client = Arc::new(connect(&addrs, &certs, TIMEOUT).await?);
    create_and_start(&client).await?;
    let before = placement(&client).await?;

    tracing::info!("phase 3: produce {ATTEMPTS} attempts keyed by card (acks=all); SIGKILL a node half-way");
    let half = attempts.len() / 2;
    fraud::produce(&client, attempts[..half].iter().cloned(), None).await?;
    let (victim, client) = kill_leader(&client, &mut cluster, &addrs, &certs).await?;
    let failover = Failover::watch(&client, victim);
    // The first attempts after the kill, up to the first for partition 0
    // (which the killed node led): acknowledged once a new leader took over.
    let first_on_0 = (half..attempts.len())
        .find(|&i| partition_for_key(attempts[i].card_number.as_bytes(), PARTITIONS) == 0)
        .unwrap_or(half);
    fraud::produce(&client, attempts[half..=first_on_0].iter().cloned(), None).await?;
    let acked_after = failover.killed_at.elapsed();
    fraud::produce(&client, attempts[first_on_0 + 1..].iter().cloned(), None).await?;
    tracing::info!("phase 4: a pull query reads the busiest card's counts from the state of the task owning it");
    let pulled = pull_busiest_card(&client, &attempts).await?;
    let closing = generator.closing_attempt();
    fraud::produce(&client, std::iter::empty(), Some(&closing)).await?;

    tracing::info!("phase 5: wait for the sink to hold every window result; compare with the reference");
    let input = fraud::read_attempts(&client).await.map_err(anyhow::Error::msg)?;
    let reference = fraud::reference(&input);
    let (results, irregular) = wait_for_results(&client, &reference).await?;
    let moved_after = failover.tasks_moved().await;
    let after = placement(&client).await?;
    let leaders = leaders(&client).await?;
    let cards: std::collections::BTreeSet<&str> = input.iter().map(|a| a.card_number.as_str()).collect();
    let flagged: std::collections::BTreeSet<&str> = results.keys().map(|(card, _)| card.as_str()).collect();

    let place = if kept {
        format!(" in {}", dir.display())
    } else {
        String::new()
    };
    println!(
        "Runnel demo: 3 `runnel node` processes replicating {} (3 partitions, replication 3){place}",
        fraud::SOURCE
    );
    println!("  statements submitted (as to `runnel sql`):");
    for line in fraud::DECLARATION.lines().chain(fraud::STATEMENT.lines()) {
        println!("    {line}");
    }
    println!("  query {}: source task + window task per partition", fraud::SQL_QUERY);
    println!("    tasks before the kill: {before}");
    println!("    tasks after the kill:  {after}");
    println!(
        "  produced {} attempts with acks=all, then one closing attempt per partition (timed past every window, \
         to close the last ones); {} read back; node {victim} was killed half-way (SIGKILL)",
        attempts.len(),
        input.len()
    );
    println!(
        "  failover: node {victim} led partition 0; the first write to partition 0 after the kill was acknowledged \
         {:.1} s later; leaders now {leaders}",
        acked_after.as_secs_f64()
    );
    match moved_after {
        Some(moved) => println!(
            "  the killed node's tasks were placed on the survivors {:.1} s after the kill (its death is detected in \
             about 1.5 s; tasks move off a node dead for {REPLACE_AFTER_S} s) and resumed from their checkpoints",
            moved.as_secs_f64()
        ),
        None => println!("  the killed node's tasks had not moved by the end"),
    }
    ensure!(
        input.len() == attempts.len() + PARTITIONS as usize,
        "read back {} records, not the {} produced",
        input.len(),
        attempts.len() + PARTITIONS as usize
    );
    println!(
        "  {} of {} cards flagged as possible fraud in at least one window",
        flagged.len(),
        cards.len()
    );
    pulled.print();
    let matches = print_results(&results, irregular, &reference) && pulled.exact;
    drop(cluster);
    ensure!(matches, "the dataflow's results differ from the reference");
    Ok(())
}

/// Three `runnel node` processes of this binary in `dir`, with the normal
/// failure detection; their addresses and certificate directory.
fn start_nodes(dir: &Path) -> anyhow::Result<(ProcessCluster, Vec<SocketAddr>, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let certs = init_certs(dir, 3)?;
    let addrs = (0..3).map(|_| free_addr()).collect::<Result<Vec<_>, _>>()?;
    let command = NodeCommand::new(crate::this_binary()?, dir, &certs, &addrs)
        .flags(["--replace-after", &REPLACE_AFTER_S.to_string()])
        .env("RUST_LOG", "warn");
    Ok((ProcessCluster::start(command, addrs.clone())?, addrs, certs))
}

/// Each partition's leader, as "partition 0: node 3; …".
async fn leaders(client: &Client) -> anyhow::Result<String> {
    let topic = client.describe_topic(fraud::SOURCE).await?;
    let words: Vec<String> = topic
        .partitions
        .iter()
        .map(|p| {
            let leader = p.leader.map_or("none".to_string(), |l| format!("node {l}"));
            format!("partition {}: {leader}", p.partition)
        })
        .collect();
    Ok(words.join(", "))
}

/// When the killed node's tasks were placed elsewhere, watched from the kill.
struct Failover {
    killed_at: Instant,
    moved: tokio::task::JoinHandle<Option<Duration>>,
}

impl Failover {
    fn watch(client: &Arc<Client>, victim: NodeId) -> Failover {
        let killed_at = Instant::now();
        let client = client.clone();
        let moved = tokio::spawn(async move {
            while killed_at.elapsed() < TIMEOUT {
                let dataflows = client.dataflows().await.unwrap_or_default();
                let query = dataflows.iter().find(|d| d.name == fraud::SQL_QUERY);
                if query.is_some_and(|q| !q.placement.contains(&victim)) {
                    return Some(killed_at.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            None
        });
        Failover { killed_at, moved }
    }

    async fn tasks_moved(self) -> Option<Duration> {
        self.moved.await.ok().flatten()
    }
}

/// Submits the declaration and the seed's statement, each retried while
/// the new cluster settles (a refused statement changed nothing).
async fn create_and_start(client: &Arc<Client>) -> anyhow::Result<()> {
    let session = Session::new(client.clone());
    tracing::info!("phase 2: submit the SQL statements");
    for statement in [fraud::DECLARATION, fraud::STATEMENT] {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let outcome = session.execute_script(statement).await.pop();
            match outcome {
                Some((_, Ok(outcome))) => {
                    tracing::info!(?outcome, "statement done");
                    break;
                }
                Some((text, Err(e))) if Instant::now() >= deadline => {
                    anyhow::bail!("{}", e.render(&text))
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    Ok(())
}

/// A pull query's statement, its rows as printed, and whether they equal
/// the counts computed from the input.
struct Pulled {
    statement: String,
    rows: Vec<String>,
    exact: bool,
    /// p50 and p99 of the statement run again and again, in ms.
    latency_ms: (f64, f64),
}

impl Pulled {
    fn print(&self) {
        println!("  pull query, after the kill: {}", self.statement);
        for line in &self.rows {
            println!("    {line}");
        }
        println!(
            "    answered from the state of the window task owning the card (restored on a survivor if it moved), \
             equal to the counts computed from the input: {}",
            if self.exact { "yes" } else { "NO" }
        );
        println!(
            "    the same pull query {PULLS_TIMED} times in a row: p50 {:.1} ms, p99 {:.1} ms",
            self.latency_ms.0, self.latency_ms.1
        );
    }
}

/// Queries timed for the pull query's latency.
const PULLS_TIMED: usize = 100;

/// p50 and p99 (ms) of `statement` run [`PULLS_TIMED`] times in a row
/// through the SQL session: parse, catalog, routing and the state read.
async fn pull_latency(session: &Session, statement: &str) -> (f64, f64) {
    let mut took: Vec<f64> = Vec::with_capacity(PULLS_TIMED);
    for _ in 0..PULLS_TIMED {
        let started = Instant::now();
        let _ = session.execute_script(statement).await;
        took.push(started.elapsed().as_secs_f64() * 1e3);
    }
    took.sort_by(f64::total_cmp);
    (runnel_bench::quantile(&took, 0.5), runnel_bench::quantile(&took, 0.99))
}

/// `SELECT * FROM possible_fraud WHERE card_number = …` for the card with
/// the most attempts, asked until its rows equal the counts above the
/// threshold computed from `attempts` (the tasks may still be catching up)
/// or the time is up. Every window is still open (SQL's 24-hour grace).
async fn pull_busiest_card(client: &Arc<Client>, attempts: &[Attempt]) -> anyhow::Result<Pulled> {
    let counts = fraud::open_reference(attempts);
    let mut per_card: BTreeMap<&str, u64> = BTreeMap::new();
    for ((card, _), count) in &counts {
        *per_card.entry(card.as_str()).or_default() += count;
    }
    let card = per_card
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(c, _)| c.to_string())
        .context("no fraud generated")?;
    let expected: Vec<String> = counts
        .iter()
        .filter(|((c, _), _)| *c == card)
        .map(|((c, start), n)| format!("{c} | {n} | {start} | {}", start + fraud::WINDOW_MS))
        .collect();
    let statement = format!("SELECT * FROM possible_fraud WHERE card_number = '{card}';");
    let session = Session::new(client.clone());
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let rows = match session.execute_script(&statement).await.pop() {
            Some((_, Ok(runnel_sql::Outcome::Table { rows, .. }))) => rows.iter().map(|r| r.join(" | ")).collect(),
            Some((_, Err(e))) => vec![format!("error: {}", e.message)],
            _ => Vec::new(),
        };
        if rows == expected || Instant::now() > deadline {
            let exact = rows == expected;
            let latency_ms = pull_latency(&session, &statement).await;
            return Ok(Pulled {
                statement,
                rows,
                exact,
                latency_ms,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGKILLs the node leading partition 0; returns its id and a client of
/// the survivors.
async fn kill_leader(
    client: &Client,
    cluster: &mut ProcessCluster,
    addrs: &[SocketAddr],
    certs: &Path,
) -> anyhow::Result<(NodeId, Arc<Client>)> {
    let victim = client.describe_topic(fraud::SOURCE).await?.partitions[0]
        .leader
        .context("partition 0 has no leader")?;
    tracing::info!("killing node {victim} (SIGKILL), the leader of partition 0 and host of dataflow tasks");
    cluster.kill(victim)?;
    let survivors: Vec<SocketAddr> = (1..=3u32)
        .filter(|id| *id != victim.0)
        .map(|id| addrs[id as usize - 1])
        .collect();
    let client = Arc::new(Client::connect(survivors, certs).await?);
    Ok((victim, client))
}

/// The query's final counts and irregular changes once its output reached
/// the reference, or what it holds at the deadline.
async fn wait_for_results(client: &Arc<Client>, expected: &Counts) -> anyhow::Result<(Counts, usize)> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let changes = fraud::read_changes(client, fraud::SQL_SINK)
            .await
            .map_err(anyhow::Error::msg)?;
        let (results, irregular) = fraud::final_counts(&changes);
        if results == *expected || Instant::now() > deadline {
            return Ok((results, irregular));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Prints the sink's results against the reference; whether they match.
fn print_results(results: &Counts, irregular: usize, reference: &Counts) -> bool {
    println!(
        "  possible fraud (more than {} attempts per card in a 5-minute window): {} results in {}",
        fraud::THRESHOLD,
        results.len(),
        fraud::SQL_SINK
    );
    for ((card, window_start), count) in results.iter().take(RESULTS_SHOWN) {
        let end = window_start + fraud::WINDOW_MS;
        println!(
            "    card {card}  window {} to {}  count {count}",
            utc(*window_start),
            utc(end)
        );
    }
    if results.len() > RESULTS_SHOWN {
        println!("    …and {} more", results.len() - RESULTS_SHOWN);
    }
    let matches = results == reference && irregular == 0;
    println!(
        "  sink equals the reference computed from the input ({} results, {irregular} with a change lost or repeated): {}",
        reference.len(),
        if matches { "yes" } else { "NO" }
    );
    matches
}
