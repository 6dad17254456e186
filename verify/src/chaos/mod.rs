//! `runnel chaos`: real `runnel node` processes, a nemesis that kills,
//! pauses, restarts and cuts them off on a schedule drawn from a seed, a
//! workload of idempotent `acks=all` producers and live consumers (and
//! optionally the fraud dataflow), then a heal, a final read, and a checker
//! that names every anomaly.
//!
//! - [`crate::fixtures::procs`]: the node processes and the faults done to them.
//! - [`nemesis`]: the schedule, a pure function of the seed.
//! - [`workload`]: producers, consumers and the recorder.
//! - [`checker`]: the verdict, a pure function of the history.

pub use crate::check as checker;
mod nemesis;
mod overlapping;
mod workload;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use runnel_actors::client::Client;
use runnel_actors::metadata::{NodeId, TopicConfig};
use runnel_dataflow::fraud;
use runnel_storage::StoredRecord;
use serde_json::json;

use crate::fixtures::client::{connect, create_topic};
use crate::fixtures::{free_addrs_from, init_certs, NodeCommand, ProcessCluster};
use checker::{History, PartitionKey, Verdict};
use nemesis::{Fault, FaultKind, Intensity, KillTarget, Step};
use workload::{seen_of, Recorder, Workload};

/// The topic the producers and consumers work on.
const TOPIC: &str = "chaos";
/// How long the cluster may take to form, create topics and elect leaders.
const SETUP_TIMEOUT: Duration = Duration::from_secs(90);
/// How long replicas may take to become identical after the heal.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the dataflow may take to catch up after the heal.
const DATAFLOW_TIMEOUT: Duration = Duration::from_secs(180);
/// Segment size under `--intensity high`, so that logs have closed
/// segments for the disk damage to hit.
const HIGH_SEGMENT_BYTES: &str = "65536";
/// Partitions of the fraud dataflow's source topic.
const FRAUD_PARTITIONS: u32 = 4;
/// A client call's time limit during the run (a paused node must not stall
/// the workload for long).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(clap::Args)]
pub struct Args {
    /// Node processes in the cluster.
    #[arg(long, default_value_t = 5)]
    nodes: u32,
    /// How long faults are injected, e.g. 120s, 2m.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    duration: Duration,
    /// The nemesis's seed (a fresh one by default; printed to replay the schedule).
    #[arg(long)]
    seed: Option<u64>,
    /// Fault kinds: kill, pause, partition, restart.
    #[arg(long, value_delimiter = ',', default_value = "kill,pause,partition,restart")]
    faults: Vec<FaultKind>,
    /// `normal`: one fault at a time. `high`: overlapping faults up to a
    /// minority of the nodes, bursts of leader kills, pause-then-kill, kills
    /// while replicas move, and damaged files on killed nodes (which then
    /// restart; nodes run with 64 KiB segments so that some are closed).
    #[arg(long, value_enum, default_value_t = Intensity::Normal)]
    intensity: Intensity,
    /// Partitions of the topic the producers write.
    #[arg(long, default_value_t = 12)]
    topic_partitions: u32,
    /// Replicas of each partition.
    #[arg(long, default_value_t = 3)]
    replication: u16,
    /// Also run a dataflow and compare its results with a reference (only `fraud`).
    #[arg(long)]
    dataflow: Option<String>,
    /// Print the timeline and the report as JSON lines.
    #[arg(long)]
    json: bool,
    /// Records per second the producers aim at, in all.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Concurrent idempotent producers.
    #[arg(long, default_value_t = 4)]
    producers: u32,
    /// The first node's address; the others follow it (127.0.3.1, 127.0.3.2, ...).
    #[arg(long, default_value = "127.0.3.1")]
    first_host: Ipv4Addr,
    /// Where the nodes' data and logs go (a fresh temporary directory by default).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the data and logs even when the run passes.
    #[arg(long)]
    keep: bool,
    /// Seconds a node stays dead before its replicas are re-created elsewhere.
    #[arg(long, default_value_t = 6)]
    replace_after: u64,
    /// Test-only: run the nodes with an injected bug (acks=all answered
    /// before the commit), to prove the checker catches it.
    #[arg(long, hide = true)]
    test_ack_before_commit: bool,
}

/// `90s`, `2m`, `500ms`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration (examples: 90s, 2m, 500ms)");
    let (number, unit_ms) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1_000)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60_000)
    } else {
        (text, 1_000)
    };
    let number: u64 = number.trim().parse().map_err(|_| bad())?;
    Ok(Duration::from_millis(number.checked_mul(unit_ms).ok_or_else(bad)?))
}

/// Prints what happens, for a person (default) or as JSON lines.
struct Timeline {
    start: Instant,
    json: bool,
}

impl Timeline {
    fn event(&self, kind: &str, text: impl AsRef<str>) {
        let seconds = self.start.elapsed().as_secs_f64();
        if self.json {
            println!(
                "{}",
                json!({"t_s": (seconds * 10.0).round() / 10.0, "event": kind, "text": text.as_ref()})
            );
        } else {
            println!("[{seconds:6.1}s] {kind:<9} {}", text.as_ref());
        }
    }
}

/// Runs the harness with node processes of the `runnel` binary `exe`;
/// ends early (every node killed) when `interrupted` completes, e.g. on
/// SIGINT or SIGTERM.
pub fn run(args: Args, exe: &Path, interrupted: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    if args.nodes < 3 {
        bail!("--nodes must be at least 3 (a majority must survive a fault)");
    }
    if usize::from(args.replication) > args.nodes as usize || args.replication == 0 {
        bail!("--replication must be between 1 and --nodes ({})", args.nodes);
    }
    if args.topic_partitions == 0 {
        bail!("--topic-partitions must be at least 1");
    }
    if let Some(name) = args.dataflow.as_deref().filter(|n| *n != "fraud") {
        bail!("unknown dataflow {name:?} (the harness knows `fraud`)");
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % 1_000_000_007)
    });
    let scratch = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            None
        }
        None => Some(crate::fixtures::scratch_dir("runnel-chaos-", None)?),
    };
    let dir = args
        .dir
        .clone()
        .or_else(|| scratch.as_ref().map(|s| s.path().to_path_buf()))
        .context("no directory for the run")?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    // On SIGINT or SIGTERM the run is dropped, and with it the cluster: every
    // node process is killed.
    let verdict = runtime.block_on(async {
        tokio::select! {
            report = run_async(&args, exe, seed, &dir) => report,
            signal = interrupted => {
                signal?;
                bail!("interrupted; every node process was killed (seed {seed})")
            }
        }
    })?;
    let keep = args.keep || !verdict.ok();
    if let (Some(scratch), true) = (scratch, keep) {
        let kept = scratch.keep();
        eprintln!("data and node logs kept in {}", kept.display());
    }
    if verdict.ok() {
        Ok(())
    } else {
        bail!(
            "the checker found {} anomalies; replay the schedule with --seed {seed}",
            verdict.anomaly_total()
        )
    }
}

/// The run itself: set up, workload and nemesis, heal, convergence, final
/// read, verdict, report.
async fn run_async(args: &Args, exe: &Path, seed: u64, dir: &Path) -> anyhow::Result<Verdict> {
    let timeline = Arc::new(Timeline {
        start: Instant::now(),
        json: args.json,
    });
    announce(&timeline, args, seed, dir);
    let (mut cluster, client) = set_up(args, exe, dir, &timeline).await?;
    let mut running = start_workload(args, seed, &client, &timeline);
    let duration_ms = args.duration.as_millis() as u64;
    let injected = match args.intensity {
        Intensity::Normal => {
            let plan = nemesis::plan(seed, duration_ms, &args.faults, args.nodes, args.topic_partitions);
            let restart = args.faults.contains(&FaultKind::Restart);
            run_nemesis(&mut cluster, &client, &plan, restart, &timeline, seed).await?
        }
        Intensity::High => {
            let plan = nemesis::plan_high(seed, duration_ms, &args.faults, args.nodes, args.topic_partitions);
            overlapping::run(&mut cluster, &client, &plan, &timeline, seed).await?
        }
    };

    cluster.heal()?;
    timeline.event("heal", "every node running, network whole; stopping the producers");
    running.stop_producers().await?;
    timeline.event("converge", "producers stopped; waiting for replicas to agree");
    let topics = checked_topics(args);
    let (replica_reads, converged) = converge(&client, &topics, usize::from(args.replication)).await;
    running.stop_consumers().await?;
    let history = History {
        writes: running.workload.recorder.take_writes(),
        consumer_reads: running.workload.recorder.take_reads(),
        replica_reads,
        ..History::default()
    };
    let mut verdict_extra: BTreeMap<String, u64> = BTreeMap::new();
    let convergence_text = describe_convergence(converged, &mut verdict_extra);
    let (verdict, dataflow_text) = judge(args, &client, &timeline, &topics, history, verdict_extra).await?;
    print_report(
        args,
        seed,
        &injected,
        &convergence_text,
        dataflow_text.as_deref(),
        &verdict,
    );
    drop(cluster);
    Ok(verdict)
}

/// The run's first line: the seed and the shape of the run.
fn announce(timeline: &Timeline, args: &Args, seed: u64, dir: &Path) {
    let faults: Vec<String> = args.faults.iter().map(|f| format!("{f:?}").to_lowercase()).collect();
    timeline.event(
        "start",
        format!(
            "seed {seed}: {} nodes, {} s of faults ({}, intensity {:?}), topic {TOPIC:?} with {} partitions RF {}{}; data in {}",
            args.nodes,
            args.duration.as_secs(),
            faults.join(","),
            args.intensity,
            args.topic_partitions,
            args.replication,
            args.dataflow
                .as_ref()
                .map_or(String::new(), |d| format!(", dataflow {d}")),
            dir.display()
        ),
    );
}

/// The cluster started and formed, the topics created (and the dataflow
/// started), every partition of the workload's topic led; with a client
/// whose calls time out quickly.
async fn set_up(
    args: &Args,
    exe: &Path,
    dir: &Path,
    timeline: &Timeline,
) -> anyhow::Result<(ProcessCluster, Arc<Client>)> {
    let cluster = start_cluster(args, exe, dir)?;
    let mut client = connect(&cluster.addrs, cluster.certs(), SETUP_TIMEOUT).await?;
    client.timeout = CLIENT_TIMEOUT;
    let client = Arc::new(client);
    // The checker reads every record back at the end: retention keeps them
    // all (the attempts and results carry event times in 2023).
    let forever = |partitions| TopicConfig {
        retention_ms: None,
        ..TopicConfig::new(partitions, args.replication)
    };
    create_topic(&client, TOPIC, forever(args.topic_partitions), SETUP_TIMEOUT).await?;
    if args.dataflow.is_some() {
        create_topic(&client, fraud::SOURCE, forever(FRAUD_PARTITIONS), SETUP_TIMEOUT).await?;
        create_topic(&client, fraud::SINK, forever(FRAUD_PARTITIONS), SETUP_TIMEOUT).await?;
        start_dataflow(&client).await?;
    }
    wait_for_leaders(&client, TOPIC).await?;
    timeline.event("ready", "cluster formed, topics created, every partition has a leader");
    Ok((cluster, client))
}

/// The workload's tasks while the faults run.
struct Running {
    workload: Workload,
    producers: Vec<tokio::task::JoinHandle<()>>,
    consumers_stop: Arc<AtomicBool>,
    consumers: Vec<tokio::task::JoinHandle<()>>,
    monitor: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops the producers and waits for them.
    async fn stop_producers(&mut self) -> anyhow::Result<()> {
        self.workload.stop.store(true, Ordering::Relaxed);
        for producer in std::mem::take(&mut self.producers) {
            producer.await.context("a producer task failed")?;
        }
        Ok(())
    }

    /// Stops the consumers, waits for them, and ends the monitor.
    async fn stop_consumers(&mut self) -> anyhow::Result<()> {
        self.consumers_stop.store(true, Ordering::Relaxed);
        for consumer in std::mem::take(&mut self.consumers) {
            consumer.await.context("a consumer task failed")?;
        }
        self.monitor.abort();
        Ok(())
    }
}

/// Spawns the producers (and, with the dataflow, the attempts' producer),
/// two consumers and the monitor.
fn start_workload(args: &Args, seed: u64, client: &Arc<Client>, timeline: &Arc<Timeline>) -> Running {
    let workload = Workload {
        client: client.clone(),
        recorder: Arc::new(Recorder::default()),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let mut producers = Vec::new();
    let share = args.rate / u64::from(args.producers.max(1));
    for worker in 0..args.producers.max(1) {
        producers.push(tokio::spawn(workload.clone().produce(
            worker,
            TOPIC.to_string(),
            args.topic_partitions,
            share,
        )));
    }
    if args.dataflow.is_some() {
        let worker = args.producers.max(1);
        producers.push(tokio::spawn(workload.clone().produce_attempts(
            worker,
            seed,
            FRAUD_PARTITIONS,
            share,
        )));
    }
    let consumers_stop = Arc::new(AtomicBool::new(false));
    let reading = Workload {
        stop: consumers_stop.clone(),
        ..workload.clone()
    };
    let consumers: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(
                reading
                    .clone()
                    .consume(format!("consumer-{i}"), TOPIC.to_string(), args.topic_partitions),
            )
        })
        .collect();
    let monitor = tokio::spawn(monitor(client.clone(), workload.recorder.clone(), timeline.clone()));
    Running {
        workload,
        producers,
        consumers_stop,
        consumers,
        monitor,
    }
}

/// The topics whose replicas must converge and whose final read the
/// checker gets: the workload's, and the dataflow's source.
fn checked_topics(args: &Args) -> Vec<String> {
    let mut topics = vec![TOPIC.to_string()];
    if args.dataflow.is_some() {
        topics.push(fraud::SOURCE.to_string());
    }
    topics
}

/// The final read, the dataflow's check (when it runs) and the checker's
/// verdict on the history, with the anomalies found outside the history
/// (`verdict_extra`) counted in; and the dataflow's line of the report.
async fn judge(
    args: &Args,
    client: &Arc<Client>,
    timeline: &Timeline,
    topics: &[String],
    mut history: History,
    mut verdict_extra: BTreeMap<String, u64>,
) -> anyhow::Result<(Verdict, Option<String>)> {
    timeline.event("read", "final read of every partition from its leader");
    final_read(client, topics, &mut history).await?;
    let dataflow_text = match &args.dataflow {
        Some(_) => Some(check_dataflow(client, timeline, &mut verdict_extra).await?),
        None => None,
    };
    let mut verdict = checker::check(&history);
    for (kind, count) in verdict_extra {
        verdict.anomaly_counts.insert(kind, count);
    }
    Ok((verdict, dataflow_text))
}

/// The convergence line of the report; not converging is an anomaly.
fn describe_convergence(converged: Result<Duration, String>, verdict_extra: &mut BTreeMap<String, u64>) -> String {
    match converged {
        Ok(took) => {
            format!("replicas identical {:.1} s after the heal", took.as_secs_f64())
        }
        Err(why) => {
            verdict_extra.insert("not_converged".to_string(), 1);
            format!(
                "replicas did NOT converge within {} s: {why}",
                CONVERGE_TIMEOUT.as_secs()
            )
        }
    }
}

/// Every partition of `topics` read from its leader into the history's
/// final read.
async fn final_read(client: &Client, topics: &[String], history: &mut History) -> anyhow::Result<()> {
    for topic in topics {
        let partitions = client.describe_topic(topic).await?.config.partitions;
        for partition in 0..partitions {
            let records = read_partition(client, None, topic, partition)
                .await
                .with_context(|| format!("final read of {topic}/{partition}"))?;
            history
                .final_read
                .insert((topic.clone(), partition), records.iter().map(seen_of).collect());
        }
    }
    Ok(())
}

/// The run's nodes, on consecutive addresses from `--first-host` (so a
/// partition cuts whole addresses), with quick failure detection and
/// fault-control files for the partitions.
fn start_cluster(args: &Args, exe: &Path, dir: &Path) -> anyhow::Result<ProcessCluster> {
    let certs = init_certs(dir, args.nodes)?;
    let addrs = free_addrs_from(args.first_host, args.nodes)?;
    let log = std::env::var("RUNNEL_CHAOS_NODE_LOG").unwrap_or_else(|_| "info".into());
    let mut command = NodeCommand::new(exe, dir, &certs, &addrs)
        .flags(["--heartbeat-ms", "100", "--suspect-ms", "500", "--dead-ms", "2000"])
        .flags(["--replace-after".to_string(), args.replace_after.to_string()])
        .env("RUST_LOG", log)
        .with_fault_control();
    if args.test_ack_before_commit {
        command = command.flags(["--test-ack-before-commit"]);
    }
    if args.intensity == Intensity::High {
        command = command.flags(["--segment-bytes", HIGH_SEGMENT_BYTES]);
    }
    Ok(ProcessCluster::start(command, addrs)?)
}

async fn start_dataflow(client: &Client) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    loop {
        match client.start_dataflow(fraud::NAME).await {
            Ok(()) => return Ok(()),
            Err(_)
                if client
                    .dataflows()
                    .await
                    .is_ok_and(|d| d.iter().any(|d| d.name == fraud::NAME)) =>
            {
                return Ok(())
            }
            Err(e) if Instant::now() > deadline => return Err(e).context("starting the fraud dataflow"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn wait_for_leaders(client: &Client, topic: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    loop {
        if let Ok(info) = client.describe_topic(topic).await {
            if info.partitions.iter().all(|p| p.leader.is_some()) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "partitions of {topic} have no leader after {} s",
                SETUP_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Counts of the faults actually injected, by kind, and those skipped.
#[derive(Default)]
struct Injected {
    by_kind: BTreeMap<&'static str, u64>,
    skipped: u64,
    /// The schedule's faults by kind (with `--intensity high`).
    scheduled: BTreeMap<&'static str, u64>,
}

/// What was done, so it can be undone.
enum Applied {
    Killed(NodeId),
    Paused(NodeId),
    Cut,
    Skipped,
}

async fn run_nemesis(
    cluster: &mut ProcessCluster,
    client: &Client,
    plan: &[Step],
    restart: bool,
    timeline: &Timeline,
    seed: u64,
) -> anyhow::Result<Injected> {
    let mut injected = Injected::default();
    let mut fallback = runnel_cluster::sim::SimRng::new(seed ^ 0x5eed);
    let start = Instant::now();
    for step in plan {
        tokio::time::sleep_until((start + Duration::from_millis(step.at_ms)).into()).await;
        let applied = apply(cluster, client, &step.fault, &mut fallback).await?;
        match &applied {
            Applied::Skipped => injected.skipped += 1,
            Applied::Killed(_) => *injected.by_kind.entry("kill").or_default() += 1,
            Applied::Paused(_) => *injected.by_kind.entry("pause").or_default() += 1,
            Applied::Cut => *injected.by_kind.entry("partition").or_default() += 1,
        }
        let text = match &applied {
            Applied::Killed(node) => format!("{} → SIGKILL node {node} for {} ms", step.fault, step.lasts_ms),
            Applied::Paused(node) => format!("SIGSTOP node {node} for {} ms", step.lasts_ms),
            Applied::Cut => format!("{} for {} ms", step.fault, step.lasts_ms),
            Applied::Skipped => format!("{}: skipped (it would leave no majority running)", step.fault),
        };
        timeline.event("fault", text);
        tokio::time::sleep_until((start + Duration::from_millis(step.at_ms + step.lasts_ms)).into()).await;
        match applied {
            Applied::Killed(node) if restart => {
                cluster.restart(node)?;
                timeline.event("recover", format!("restarted node {node}"));
            }
            Applied::Killed(node) => timeline.event("recover", format!("node {node} stays down until the heal")),
            Applied::Paused(node) => {
                cluster.resume(node)?;
                timeline.event("recover", format!("SIGCONT node {node}"));
            }
            Applied::Cut => {
                cluster.heal_network()?;
                timeline.event("recover", "network healed");
            }
            Applied::Skipped => {}
        }
    }
    Ok(injected)
}

async fn apply(
    cluster: &mut ProcessCluster,
    client: &Client,
    fault: &Fault,
    fallback: &mut runnel_cluster::sim::SimRng,
) -> anyhow::Result<Applied> {
    let nodes = cluster.node_count();
    let up = cluster.running().iter().filter(|n| !cluster.is_paused(**n)).count() as u32;
    let majority_left = up > nodes / 2 + 1;
    match fault {
        Fault::Kill(target) => {
            let node = match target {
                KillTarget::Node(node) => Some(*node),
                KillTarget::LeaderOf(partition) => client
                    .describe_topic(TOPIC)
                    .await
                    .ok()
                    .and_then(|t| t.partitions.iter().find(|p| p.partition == *partition)?.leader),
                KillTarget::Controller => match client.topics().await {
                    Ok(_) => client.controller_leader(),
                    Err(_) => None,
                },
            };
            let node = node.unwrap_or_else(|| NodeId(fallback.between(1, u64::from(nodes)) as u32));
            let running = cluster.running().contains(&node) && !cluster.is_paused(node);
            if !running || !majority_left {
                return Ok(Applied::Skipped);
            }
            cluster.kill(node)?;
            Ok(Applied::Killed(node))
        }
        Fault::Pause(node) => {
            let running = cluster.running().contains(node) && !cluster.is_paused(*node);
            if !running || !majority_left {
                return Ok(Applied::Skipped);
            }
            cluster.pause(*node)?;
            Ok(Applied::Paused(*node))
        }
        Fault::Partition(side) => {
            cluster.cut(side)?;
            Ok(Applied::Cut)
        }
        Fault::PauseThenKill(_) | Fault::KillDuringMoves | Fault::KillAndDamage(..) => {
            bail!("{fault}: scheduled only under --intensity high, whose executor runs it")
        }
    }
}

/// Every second: acks/s, and changes of leaders, replica sets and live nodes.
async fn monitor(client: Arc<Client>, recorder: Arc<Recorder>, timeline: Arc<Timeline>) {
    let mut leaders: BTreeMap<PartitionKey, NodeId> = BTreeMap::new();
    let mut replicas: BTreeMap<PartitionKey, Vec<NodeId>> = BTreeMap::new();
    let mut alive: Vec<NodeId> = Vec::new();
    let mut last_acks = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let acks = recorder.acknowledged.load(Ordering::Relaxed);
        timeline.event(
            "acks",
            format!(
                "{} acks/s (so far: {acks} acknowledged, {} unknown, {} failed)",
                acks - last_acks,
                recorder.unknown.load(Ordering::Relaxed),
                recorder.failed.load(Ordering::Relaxed)
            ),
        );
        last_acks = acks;
        let Ok(topics) = client.topics().await else { continue };
        let mut now_alive = client.alive_nodes();
        now_alive.sort_unstable();
        if now_alive != alive {
            timeline.event("members", format!("live nodes {now_alive:?}"));
            alive = now_alive;
        }
        for topic in topics.iter().filter(|t| !t.name.starts_with("__")) {
            for p in &topic.partitions {
                let key = (topic.name.clone(), p.partition);
                // The node asked may not know the leader for a moment; only
                // a newly known leader is news.
                if let Some(leader) = p.leader {
                    match leaders.insert(key.clone(), leader) {
                        Some(old) if old != leader => {
                            timeline.event("leader", format!("{}/{}: {old} → {leader}", key.0, key.1))
                        }
                        _ => {}
                    }
                }
                let old_replicas = replicas.insert(key.clone(), p.replicas.clone());
                if old_replicas.as_ref().is_some_and(|old| *old != p.replicas) {
                    timeline.event(
                        "replicas",
                        format!(
                            "{}/{}: {:?} → {:?}",
                            key.0,
                            key.1,
                            old_replicas.unwrap_or_default(),
                            p.replicas
                        ),
                    );
                }
            }
        }
    }
}

/// Every committed record of a partition, from its leader (`node` = None)
/// or from one replica.
async fn read_partition(
    client: &Client,
    node: Option<NodeId>,
    topic: &str,
    partition: u32,
) -> Result<Vec<StoredRecord>, runnel_actors::client::ClientError> {
    let mut records = Vec::new();
    let mut offset = 0;
    loop {
        let fetched = match node {
            Some(node) => {
                client
                    .fetch_from_replica(node, topic, partition, offset, 4 << 20)
                    .await?
            }
            None => client.fetch(topic, partition, offset, 4 << 20).await?,
        };
        if fetched.next_offset == offset {
            return Ok(records);
        }
        offset = fetched.next_offset;
        records.extend(fetched.records);
    }
}

type ReplicaReads = BTreeMap<(PartitionKey, NodeId), Vec<checker::Seen>>;

/// Waits until every partition has its full replica set as voters and every
/// replica holds the same committed records. The replicas' reads come back
/// either way: when they never converge, the checker still compares what
/// each holds with the leader's log.
async fn converge(client: &Client, topics: &[String], replication: usize) -> (ReplicaReads, Result<Duration, String>) {
    let start = Instant::now();
    loop {
        let mut reads = ReplicaReads::new();
        let result = replicas_agree(client, topics, replication, &mut reads).await;
        match result {
            Ok(()) => return (reads, Ok(start.elapsed())),
            Err(why) if start.elapsed() > CONVERGE_TIMEOUT => return (reads, Err(why)),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn replicas_agree(
    client: &Client,
    topics: &[String],
    replication: usize,
    reads: &mut ReplicaReads,
) -> Result<(), String> {
    let mut problems = Vec::new();
    for topic in topics {
        let info = client.describe_topic(topic).await.map_err(|e| e.to_string())?;
        for p in &info.partitions {
            let mut replicas = p.replicas.clone();
            replicas.sort_unstable();
            let mut voters = p.voters.clone();
            voters.sort_unstable();
            if replicas.len() != replication || voters != replicas || !p.learners.is_empty() {
                problems.push(format!(
                    "{topic}/{}: assigned {:?}, voters {:?}, learners {:?}, leader {:?}",
                    p.partition, p.replicas, p.voters, p.learners, p.leader
                ));
            }
            let key = (topic.clone(), p.partition);
            let mut counts = Vec::new();
            for &node in &p.replicas {
                match read_partition(client, Some(node), topic, p.partition).await {
                    Ok(records) => {
                        counts.push((node, records.len()));
                        reads.insert((key.clone(), node), records.iter().map(seen_of).collect());
                    }
                    Err(e) => problems.push(format!("{topic}/{} on node {node}: {e}", p.partition)),
                }
            }
            let copies: Vec<&Vec<checker::Seen>> = p
                .replicas
                .iter()
                .filter_map(|n| reads.get(&(key.clone(), *n)))
                .collect();
            if copies.windows(2).any(|w| w[0] != w[1]) {
                problems.push(format!(
                    "{topic}/{}: replicas differ (node, committed records): {counts:?}",
                    p.partition
                ));
            }
        }
    }
    match problems.is_empty() {
        true => Ok(()),
        false => Err(problems.join("; ")),
    }
}

/// Waits for the fraud dataflow's sink to equal the reference computed from
/// the source topic as it ended; records differences as anomalies.
async fn check_dataflow(
    client: &Arc<Client>,
    timeline: &Timeline,
    anomalies: &mut BTreeMap<String, u64>,
) -> anyhow::Result<String> {
    timeline.event(
        "dataflow",
        "waiting for the fraud dataflow's results to match the reference",
    );
    let attempts = fraud::read_attempts(client).await.map_err(anyhow::Error::msg)?;
    let reference = fraud::reference(&attempts);
    let start = Instant::now();
    loop {
        let (results, duplicated) = fraud::read_results(client).await.map_err(anyhow::Error::msg)?;
        let missing = reference.keys().filter(|k| !results.contains_key(*k)).count() as u64;
        let extra = results.keys().filter(|k| !reference.contains_key(*k)).count() as u64;
        let wrong = reference
            .iter()
            .filter(|(k, v)| results.get(*k).is_some_and(|got| got != *v))
            .count() as u64;
        let text = format!(
            "{} results over {} attempts, reference {}: missing {missing}, extra {extra}, wrong count {wrong}, duplicated {duplicated}",
            results.len(),
            attempts.len(),
            reference.len()
        );
        let exact = missing == 0 && extra == 0 && wrong == 0 && duplicated == 0;
        if exact || start.elapsed() > DATAFLOW_TIMEOUT {
            for (kind, count) in [
                ("dataflow_missing", missing),
                ("dataflow_extra", extra),
                ("dataflow_wrong_count", wrong),
                ("dataflow_duplicated", duplicated as u64),
            ] {
                if count > 0 {
                    anomalies.insert(kind.to_string(), count);
                }
            }
            return Ok(text);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The run's report, for a person or as one JSON line.
fn print_report(
    args: &Args,
    seed: u64,
    injected: &Injected,
    convergence: &str,
    dataflow: Option<&str>,
    verdict: &Verdict,
) {
    if args.json {
        let report = json!({
            "report": {
                "seed": seed,
                "nodes": args.nodes,
                "duration_s": args.duration.as_secs(),
                "faults_injected": injected.by_kind,
                "faults_skipped": injected.skipped,
                "faults_scheduled": injected.scheduled,
                "convergence": convergence,
                "dataflow": dataflow,
                "verdict": verdict,
                "ok": verdict.ok(),
            }
        });
        println!("{report}");
        return;
    }
    let faults: Vec<String> = injected.by_kind.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!();
    println!("chaos report (seed {seed})");
    println!(
        "  faults injected: {} ({}); skipped {}",
        injected.by_kind.values().sum::<u64>(),
        faults.join(", "),
        injected.skipped
    );
    println!(
        "  records: attempted {}, acknowledged {}, failed definitely {}, unknown {} (resolved: {} present, {} absent)",
        verdict.attempted,
        verdict.acknowledged,
        verdict.failed,
        verdict.unknown,
        verdict.unknown_present,
        verdict.unknown_absent
    );
    for (reason, records) in &verdict.failure_reasons {
        println!("    {records} records {reason}");
    }
    println!(
        "  final read: {} records; consumers read {} records during the run",
        verdict.records_read, verdict.consumer_reads
    );
    println!("  convergence: {convergence}");
    if let Some(dataflow) = dataflow {
        println!("  dataflow {}: {dataflow}", fraud::NAME);
    }
    print_verdict(seed, verdict);
}

/// The report's verdict: OK, or the anomalies by kind and each one.
fn print_verdict(seed: u64, verdict: &Verdict) {
    if verdict.ok() {
        println!("  verdict: OK (no lost, duplicated or inconsistent records; reads monotonic)");
        return;
    }
    let counts: Vec<String> = verdict.anomaly_counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!(
        "  verdict: {} ANOMALIES ({}); replay the schedule with --seed {seed}",
        verdict.anomaly_total(),
        counts.join(", ")
    );
    for anomaly in &verdict.anomalies {
        println!("    {}", serde_json::to_string(anomaly).unwrap_or_default());
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_parse_with_units_and_bad_ones_are_named() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("soon").unwrap_err().contains("soon"));
    }
}
