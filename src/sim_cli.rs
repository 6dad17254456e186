//! `runnel sim`: many seeds of the deterministic simulation ([`runnel_verify::sim`]),
//! for sweeps longer than the test suite's.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use runnel_verify::chaos::parse_duration;
use runnel_verify::fixtures::scratch_dir;
use runnel_verify::sim::{run as run_seed, SimConfig, SimReport};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The first seed; seeds run in order from it.
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// How many seeds to run.
    #[arg(long, default_value_t = 200)]
    seeds: u64,
    /// Simulated time with faults and producers, per seed.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    duration: Duration,
    /// Simulated nodes.
    #[arg(long, default_value_t = 5)]
    nodes: u32,
    /// Partitions of the simulated topic.
    #[arg(long, default_value_t = 3)]
    partitions: u32,
    /// Network faults only: no crashes, restarts or partitions.
    #[arg(long)]
    no_nemesis: bool,
    /// Without the dataflow (its tasks, topics and result check).
    #[arg(long)]
    no_dataflow: bool,
    /// Run the dataflow as a stream–stream join (the records joined with
    /// themselves within 150 ms: two source stages and a join stage), every
    /// pair checked exactly once, instead of the windowed count.
    #[arg(long)]
    join: bool,
    /// Run the dataflow as an aggregate over a table (the records keyed by
    /// row, a few keys per partition rewritten and deleted; each row's
    /// latest attempt counted per card with its amounts summed), the sink
    /// checked against the table the topic holds at the end.
    #[arg(long, conflicts_with = "join")]
    table: bool,
    /// Where replicas keep their files (a fresh temporary directory by
    /// default; tmpfs such as /dev/shm is fastest).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Events shown for a failing seed (its last ones).
    #[arg(long, default_value_t = 40)]
    trace_lines: usize,
    /// One JSON line per seed, then the summary as one.
    #[arg(long)]
    json: bool,
    /// Damage a replica's files while its node is down (garbage Raft or log
    /// metadata, a deleted closed segment, a flipped byte in one), one at a
    /// time; the cluster must find and rebuild it.
    #[arg(long)]
    disk_damage: bool,
    /// The topic's min.insync.replicas (default: a majority of
    /// --replication); above a majority, acks=all needs that many replicas
    /// in sync.
    #[arg(long)]
    min_insync: Option<u16>,
    /// The topic's retention.ms in simulated time (e.g. 3000), with small
    /// segments: retention deletes them during the run, followers behind
    /// get snapshots, and each deletion must take only expired records.
    /// Runs without the dataflow (whose check needs all of its input).
    #[arg(long)]
    retention_ms: Option<u64>,
    /// A compacted topic (cleanup.policy=compact) whose records share 16
    /// keys, with small segments: every replica compacts during the run,
    /// and a record may be missing only when a later one of its key is in
    /// the log. With --retention-ms too, the topic is compact,delete and
    /// both run. Runs without the dataflow (whose check needs all of its
    /// input).
    #[arg(long)]
    compact: bool,
    /// The deliberately injected bug (acks=all answered before the commit),
    /// to see the checks fail.
    #[arg(long, hide = true)]
    test_ack_before_commit: bool,
    /// The deliberately injected dataflow bug (task output written without
    /// producer ids and sequences), to see the checks fail.
    #[arg(long, hide = true)]
    test_unsequenced_task_output: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.seeds > 0, "--seeds must be at least 1");
    anyhow::ensure!(args.nodes >= 3, "--nodes must be at least 3 (three controllers)");
    anyhow::ensure!(args.partitions >= 1, "--partitions must be at least 1");
    let config = sim_config(&args);
    let scratch =
        scratch_dir("runnel-sim-", args.dir.as_deref()).context("creating the simulation's scratch directory")?;
    let started = Instant::now();
    let mut totals = SimReport::default();
    let mut failed = Vec::new();
    let last = args.first_seed.saturating_add(args.seeds - 1);
    for seed in args.first_seed..=last {
        let report = match run_seed(seed, &config, scratch.path()) {
            Ok(report) => report,
            Err(error) => {
                eprintln!("seed {seed}: the simulation failed: {error}");
                failed.push(seed);
                continue;
            }
        };
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        }
        if let Some(failure) = report.failure() {
            eprintln!("{failure}");
            for line in report.trace.iter().rev().take(args.trace_lines).rev() {
                eprintln!("    {line}");
            }
            failed.push(seed);
        }
        totals.add(report);
    }
    let elapsed = started.elapsed().as_secs_f64();
    if args.json {
        print_json_summary(args.seeds, &failed, elapsed, &totals);
    }
    println!(
        "{} seeds ({}..={last}) in {elapsed:.1} s: {}; failed seeds: {failed:?}",
        args.seeds,
        args.first_seed,
        totals.summary()
    );
    anyhow::ensure!(
        failed.is_empty(),
        "{} of {} seeds failed; replay one with `runnel sim --first-seed S --seeds 1` or \
         `RUNNEL_SEED=S cargo test -p runnel-verify --test sim`",
        failed.len(),
        args.seeds
    );
    Ok(())
}

/// The simulation every seed runs.
fn sim_config(args: &Args) -> SimConfig {
    SimConfig {
        nodes: args.nodes,
        partitions: args.partitions,
        duration_ms: args.duration.as_millis() as u64,
        nemesis: !args.no_nemesis,
        dataflow: !args.no_dataflow && args.retention_ms.is_none() && !args.compact,
        join_dataflow: args.join,
        table_dataflow: args.table,
        bug_ack_before_commit: args.test_ack_before_commit,
        bug_unsequenced_task_output: args.test_unsequenced_task_output,
        disk_damage: args.disk_damage,
        min_insync: args.min_insync,
        retention_ms: args.retention_ms,
        compact: args.compact,
        ..SimConfig::default()
    }
}

/// `--json`: the sweep's summary as one JSON line, after the seeds' lines.
fn print_json_summary(seeds: u64, failed: &[u64], elapsed: f64, totals: &SimReport) {
    let summary = serde_json::json!({
        "summary": true,
        "seeds": seeds,
        "failed_seeds": failed,
        "wall_s": elapsed,
        "sim_s": totals.sim_ms as f64 / 1000.0,
        "faults": totals.faults,
        "bytes_lost": totals.bytes_lost,
        "torn_writes": totals.torn_writes,
        "leader_changes": totals.leader_changes,
        "replica_moves": totals.replica_moves,
        "attempted": totals.verdict.attempted,
        "acknowledged": totals.verdict.acknowledged,
        "unknown": totals.verdict.unknown,
        "records_checked": totals.records_checked,
    });
    println!("{summary}");
}
