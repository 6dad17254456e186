//! `runnel bench window`: the fraud query's window operator alone against a
//! plain HashMap-per-window count loop over the same events (the per-core
//! ceiling), then the whole dataflow topic to topic on an embedded cluster
//! of one node (RF=1) and of three nodes (RF=3).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use runnel_actors::client::Client;
use runnel_actors::metadata::{NodeId, TopicConfig};
use runnel_dataflow::fraud::{self, Attempt, Generator};
use runnel_dataflow::window::{Emit, Window, WindowBounds, WindowOperator, WindowResult};

use runnel_verify::fixtures::embedded::start_cluster;
use runnel_verify::fixtures::scratch_dir;

use super::median;

#[derive(clap::Args)]
pub struct Args {
    /// Events for the in-process operator comparison.
    #[arg(long, default_value_t = 10_000_000)]
    events: usize,
    /// Events for each end-to-end run (topic to topic).
    #[arg(long, default_value_t = 10_000_000)]
    cluster_events: usize,
    /// Distinct card numbers in the generated events.
    #[arg(long, default_value_t = 100_000)]
    cards: u64,
    /// Paired runs of the in-process comparison.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Source partitions for the end-to-end runs.
    #[arg(long, default_value_t = 3)]
    partitions: u32,
    /// Skip the end-to-end runs.
    #[arg(long)]
    operator_only: bool,
    /// Which end-to-end clusters to run: 1 (one node, RF=1) and/or 3 (three nodes, RF=3).
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 3])]
    nodes: Vec<u32>,
    /// Also run the query submitted as SQL (`SQL_STATEMENT`) after each
    /// builder run, on a fresh cluster with the same input, and report the
    /// ratio of their events/s.
    #[arg(long)]
    sql: bool,
}

/// The fraud query as SQL with the builder dataflow's exact semantics (its
/// 30 s grace, one result per window when it closes), so both write the
/// same results.
pub(crate) const SQL_STATEMENT: &str = "CREATE STREAM possible_fraud AS
  SELECT card_number, count(*) FROM authorization_attempts
  WINDOW TUMBLING (SIZE 5 MINUTE, GRACE PERIOD 30 SECONDS)
  GROUP BY card_number HAVING count(*) > 3 EMIT FINAL;";

/// How the query is given to the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// The Rust-builder dataflow registered in the binary.
    Builder,
    /// The statement above, planned and committed as data.
    Sql,
}

/// Event times 30 ms apart: 10 M events span about 3.5 days of 5-minute windows.
pub(crate) const STEP_MS: i64 = 30;
pub(crate) const START_MS: i64 = 1_767_225_600_000;

pub fn run(args: Args) -> anyhow::Result<()> {
    let events: Vec<(String, i64)> = Generator::new(7, args.cards, START_MS, STEP_MS)
        .take(args.events)
        .map(|a| (a.card_number, a.at_ms))
        .collect();
    let mut summary = vec![operator_vs_plain(args.runs, &events)?];
    if !args.operator_only {
        end_to_end_runs(&args, &mut summary)?;
    }
    println!("summary:");
    for line in summary {
        println!("  {line}");
    }
    Ok(())
}

/// (a): `runs` paired runs of the operator and the plain loop; the summary
/// line of their medians.
fn operator_vs_plain(runs: usize, events: &[(String, i64)]) -> anyhow::Result<String> {
    let mut operator_rates = Vec::new();
    let mut plain_rates = Vec::new();
    let mut ratios = Vec::new();
    for run in 0..runs {
        let (operator_rate, plain_rate) = paired_run(run, events)?;
        operator_rates.push(operator_rate);
        plain_rates.push(plain_rate);
        ratios.push(operator_rate / plain_rate);
    }
    let operator_median = median(&mut operator_rates);
    let plain_median = median(&mut plain_rates);
    let ratio_median = median(&mut ratios);
    Ok(format!(
        "(a) window operator alone: {:.2} M events/s; plain HashMap loop {:.2} M events/s; median paired ratio {:.0}% (target >= 50%)",
        operator_median / 1e6,
        plain_median / 1e6,
        ratio_median * 100.0
    ))
}

/// One paired run, printed as a JSON line: (operator, plain) events per
/// second. The two must find the same fraud windows.
fn paired_run(run: usize, events: &[(String, i64)]) -> anyhow::Result<(f64, f64)> {
    // Alternate the order: neither side always runs on a warm cache.
    let (operator, plain) = if run.is_multiple_of(2) {
        let o = operator_pass(events)?;
        (o, plain_pass(events))
    } else {
        let p = plain_pass(events);
        (operator_pass(events)?, p)
    };
    ensure!(
        operator.1 == plain.1,
        "operator and plain loop disagree: {} vs {} fraud windows",
        operator.1,
        plain.1
    );
    let operator_rate = events.len() as f64 / operator.0.as_secs_f64();
    let plain_rate = events.len() as f64 / plain.0.as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"bench": "window", "case": "operator_vs_plain", "run": run, "events": events.len(),
            "operator_events_per_s": operator_rate.round(), "plain_events_per_s": plain_rate.round(),
            "fraud_windows": operator.1})
    );
    Ok((operator_rate, plain_rate))
}

/// (b) and (c): the dataflow topic to topic on the clusters `--nodes`
/// names, each printed as a JSON line and added to `summary`.
fn end_to_end_runs(args: &Args, summary: &mut Vec<String>) -> anyhow::Result<()> {
    let runtime = runnel_dataflow::host::node_runtime().context("starting the async runtime")?;
    let variants: &[Variant] = if args.sql {
        &[Variant::Builder, Variant::Sql]
    } else {
        &[Variant::Builder]
    };
    for (label, nodes) in [("(b) 1 node, RF=1", 1u32), ("(c) 3 nodes, RF=3", 3u32)] {
        if !args.nodes.contains(&nodes) {
            continue;
        }
        let mut rates = Vec::new();
        for &variant in variants {
            let (elapsed, results, cores_busy) = runtime.block_on(end_to_end(args, nodes, variant))?;
            let rate = args.cluster_events as f64 / elapsed.as_secs_f64();
            rates.push(rate);
            println!(
                "{}",
                serde_json::json!({"bench": "window", "case": "end_to_end", "variant": format!("{variant:?}"),
                    "nodes": nodes, "replication": nodes,
                    "partitions": args.partitions, "events": args.cluster_events,
                    "seconds": elapsed.as_secs_f64(), "events_per_s": rate.round(), "fraud_windows": results,
                    "cores_busy": (cores_busy * 100.0).round() / 100.0})
            );
            summary.push(format!(
                "{label}, {variant:?}: {} events topic to topic in {:.1} s = {:.0} events/s, {:.2} cores busy{}",
                args.cluster_events,
                elapsed.as_secs_f64(),
                rate,
                cores_busy,
                if nodes == 1 && variant == Variant::Builder {
                    " (target >= 2,000,000)"
                } else {
                    ""
                }
            ));
        }
        if let [builder, sql] = rates[..] {
            summary.push(format!(
                "{label}: SQL at {:.0}% of the builder's events/s (target >= 70%)",
                100.0 * sql / builder
            ));
        }
    }
    Ok(())
}

/// Starts the query as `variant` says.
async fn start_query(client: &Arc<Client>, variant: Variant) -> anyhow::Result<()> {
    match variant {
        Variant::Builder => Ok(client.start_dataflow(fraud::NAME).await?),
        Variant::Sql => {
            let session = runnel_sql::Session::new(client.clone());
            let script = format!("{}\n{SQL_STATEMENT}", fraud::DECLARATION);
            for (text, outcome) in session.execute_script(&script).await {
                if let Err(e) = outcome {
                    anyhow::bail!("{}", e.render(&text));
                }
            }
            Ok(())
        }
    }
}

/// Waits until a two-stage dataflow's tasks on `nodes` nodes read `inputs`
/// records in each stage and wrote `results`.
pub(crate) async fn wait_finished(client: &Client, nodes: u32, inputs: u64, results: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let mut read = [0u64; 2];
        let mut written = 0u64;
        for node in 1..=nodes {
            for task in client.dataflow_tasks(NodeId(node)).await.unwrap_or_default() {
                read[(task.stage as usize).min(1)] += task.records_in;
                if task.stage == 1 {
                    written += task.records_out;
                }
            }
        }
        if read[0] >= inputs && read[1] >= inputs && written >= results {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the dataflow did not finish: read {read:?} of {inputs}, wrote {written} of {results}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The fraud query through [`WindowOperator`]: (time, fraud windows).
fn operator_pass(events: &[(String, i64)]) -> anyhow::Result<(Duration, usize)> {
    let window = Window::tumbling(Duration::from_millis(fraud::WINDOW_MS as u64))
        .grace(Duration::from_millis(fraud::GRACE_MS as u64));
    let mut operator: WindowOperator<String, u64> = WindowOperator::new(window, Emit::Final);
    let mut out = Vec::new();
    let mut fraud_windows = 0;
    let mut max_ms = i64::MIN;
    let having = |_: &String, _: &WindowBounds, count: &u64| *count > fraud::THRESHOLD;
    let started = Instant::now();
    for (card, at_ms) in events {
        operator.add(
            card.clone(),
            *at_ms,
            &(),
            &|| 0,
            &|c, _: &()| *c += 1,
            &|a, b| *a += b,
            &|_| Ok(()),
            &mut out,
        )?;
        if *at_ms > max_ms {
            max_ms = *at_ms;
            operator.advance(max_ms, &having, &mut out);
        }
        fraud_windows += count_fraud(&mut out);
    }
    operator.advance(i64::MAX, &having, &mut out);
    fraud_windows += count_fraud(&mut out);
    Ok((started.elapsed(), fraud_windows))
}

fn count_fraud(out: &mut Vec<WindowResult<String, u64>>) -> usize {
    let fraud = out
        .iter()
        .filter(|r| matches!(r, WindowResult::Update { value, .. } if *value > fraud::THRESHOLD))
        .count();
    out.clear();
    fraud
}

/// The same count with a plain HashMap per window, closed windows dropped.
fn plain_pass(events: &[(String, i64)]) -> (Duration, usize) {
    let mut windows: HashMap<i64, HashMap<String, u64>> = HashMap::new();
    let mut fraud_windows = 0;
    let mut max_ms = i64::MIN;
    let started = Instant::now();
    for (card, at_ms) in events {
        let start = at_ms - at_ms.rem_euclid(fraud::WINDOW_MS);
        let counts = windows.entry(start).or_default();
        match counts.get_mut(card) {
            Some(count) => *count += 1,
            None => {
                counts.insert(card.clone(), 1);
            }
        }
        if *at_ms > max_ms {
            max_ms = *at_ms;
            let closed: Vec<i64> = windows
                .keys()
                .copied()
                .filter(|s| s + fraud::WINDOW_MS + fraud::GRACE_MS <= max_ms)
                .collect();
            for start in closed {
                if let Some(counts) = windows.remove(&start) {
                    fraud_windows += counts.values().filter(|&&c| c > fraud::THRESHOLD).count();
                }
            }
        }
    }
    for counts in windows.values() {
        fraud_windows += counts.values().filter(|&&c| c > fraud::THRESHOLD).count();
    }
    (started.elapsed(), fraud_windows)
}

/// Loads the source topic, starts the dataflow and times it until every
/// task has read all of its input and the sink holds the reference's count.
async fn end_to_end(args: &Args, nodes: u32, variant: Variant) -> anyhow::Result<(Duration, usize, f64)> {
    let scratch = scratch_dir("runnel-bench-window-", None)?;
    let dir = scratch.path().join("cluster");
    let (members, addrs) = start_cluster(&dir, nodes).await?;
    let client = Arc::new(Client::connect(addrs.clone(), &dir.join("certs")).await?);
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = client
        .create_topic(fraud::SOURCE, TopicConfig::new(args.partitions, nodes as u16))
        .await
    {
        ensure!(Instant::now() < deadline, "could not create the source topic: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut generator = Generator::new(11, args.cards, START_MS, STEP_MS);
    let mut attempts: Vec<Attempt> = generator.by_ref().take(args.cluster_events).collect();
    let closing = generator.closing_attempt();
    let loading = Instant::now();
    fraud::produce(&client, attempts.iter().cloned(), Some(&closing)).await?;
    println!(
        "{}",
        serde_json::json!({"bench": "window", "case": "load_source", "nodes": nodes, "events": args.cluster_events,
            "seconds": loading.elapsed().as_secs_f64(),
            "events_per_s": (args.cluster_events as f64 / loading.elapsed().as_secs_f64()).round()})
    );
    attempts.push(closing);
    let expected = fraud::reference(&attempts).len();
    drop(attempts);
    let inputs = args.cluster_events as u64 + u64::from(args.partitions);
    let started = Instant::now();
    let cpu_before = super::cluster::process_usage(std::process::id())?.0;
    start_query(&client, variant).await?;
    wait_finished(&client, nodes, inputs, expected as u64).await?;
    let elapsed = started.elapsed();
    let cores_busy = (super::cluster::process_usage(std::process::id())?.0 - cpu_before) / elapsed.as_secs_f64();
    for member in members.into_values() {
        member.stop().await;
    }
    Ok((elapsed, expected, cores_busy))
}
