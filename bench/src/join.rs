//! `runnel bench join`: the fraud query with a stream–table join (each
//! attempt enriched with its card's row of a 100,000-key table) against the
//! same windowed count without the join, end to end on an embedded node
//! (RF=1), with pull queries asked while each runs.
//!
//! Both runs load the same table and the same attempts into a fresh
//! cluster, then submit their statement and time it from submission until
//! every task has read every record and every result is written.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bytes::Bytes;
use runnel_actors::client::{Acks, Client, Producer};
use runnel_actors::metadata::TopicConfig;
use runnel_dataflow::fraud::{self, Attempt, Generator};
use runnel_sql::{Outcome, Session};
use runnel_storage::Record;
use runnel_verify::fixtures::embedded::start_cluster;
use runnel_verify::fixtures::scratch_dir;

use super::window::{wait_finished, SQL_STATEMENT, START_MS, STEP_MS};

#[derive(clap::Args)]
pub struct Args {
    /// Attempts each run reads.
    #[arg(long, default_value_t = 10_000_000)]
    events: usize,
    /// Cards: the attempts' keys, and the table's rows.
    #[arg(long, default_value_t = 100_000)]
    cards: u64,
    /// Partitions of the attempts' topic (the table's has 3).
    #[arg(long, default_value_t = 3)]
    partitions: u32,
}

/// The cards table, declared over a compacted topic.
const TABLE: &str = "CREATE TABLE cards (card_number STRING PRIMARY KEY, country STRING, card_limit BIGINT)
  WITH (KAFKA_TOPIC='cards', VALUE_FORMAT='JSON', PARTITIONS=3, REPLICAS=1);";

/// The fraud query, each attempt joined with its card's row first.
const JOINED: &str = "CREATE STREAM possible_fraud AS
  SELECT a.card_number, count(*), MAX(c.card_limit) AS card_limit
  FROM authorization_attempts a JOIN cards c ON a.card_number = c.card_number
  WINDOW TUMBLING (SIZE 5 MINUTE, GRACE PERIOD 30 SECONDS)
  GROUP BY a.card_number HAVING count(*) > 3 EMIT FINAL;";

/// Which statement a run submits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    WindowedCount,
    Join,
}

/// What one run measured.
struct Measured {
    elapsed: Duration,
    results: usize,
    /// Pull queries answered while it ran, in ms, sorted.
    pulls_ms: Vec<f64>,
    pull_errors: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = runnel_dataflow::host::node_runtime().context("starting the async runtime")?;
    let mut summary = Vec::new();
    let mut rates = Vec::new();
    for variant in [Variant::WindowedCount, Variant::Join] {
        let measured = runtime.block_on(one_run(&args, variant))?;
        let rate = args.events as f64 / measured.elapsed.as_secs_f64();
        rates.push(rate);
        let (p50, p99) = (
            super::quantile(&measured.pulls_ms, 0.5),
            super::quantile(&measured.pulls_ms, 0.99),
        );
        println!(
            "{}",
            serde_json::json!({"bench": "join", "case": "end_to_end", "variant": format!("{variant:?}"),
                "nodes": 1, "replication": 1, "partitions": args.partitions, "events": args.events,
                "table_rows": args.cards, "seconds": measured.elapsed.as_secs_f64(), "events_per_s": rate.round(),
                "fraud_windows": measured.results, "pull_queries": measured.pulls_ms.len(),
                "pull_errors": measured.pull_errors, "pull_p50_ms": p50, "pull_p99_ms": p99})
        );
        summary.push(format!(
            "{variant:?}: {} events topic to topic in {:.1} s = {rate:.0} events/s; {} pull queries while it ran, p50 {p50:.1} ms, p99 {p99:.1} ms ({} refused while restoring or starting)",
            args.events,
            measured.elapsed.as_secs_f64(),
            measured.pulls_ms.len(),
            measured.pull_errors
        ));
    }
    if let [count, join] = rates[..] {
        summary.push(format!(
            "the join at {:.0}% of the windowed count's events/s (target >= 50%)",
            100.0 * join / count
        ));
    }
    println!("summary:");
    for line in summary {
        println!("  {line}");
    }
    Ok(())
}

async fn one_run(args: &Args, variant: Variant) -> anyhow::Result<Measured> {
    let scratch = scratch_dir("runnel-bench-join-", None)?;
    let dir = scratch.path().join("cluster");
    let (members, addrs) = start_cluster(&dir, 1).await?;
    let client = Arc::new(Client::connect(addrs.clone(), &dir.join("certs")).await?);
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = client
        .create_topic(fraud::SOURCE, TopicConfig::new(args.partitions, 1))
        .await
    {
        ensure!(Instant::now() < deadline, "could not create the source topic: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let session = Session::new(client.clone());
    execute(&session, &format!("{}\n{TABLE}", fraud::DECLARATION)).await?;
    load_cards(&client, args.cards).await?;
    let mut generator = Generator::new(11, args.cards, START_MS, STEP_MS);
    let mut attempts: Vec<Attempt> = generator.by_ref().take(args.events).collect();
    let closing = generator.closing_attempt();
    fraud::produce(&client, attempts.iter().cloned(), Some(&closing)).await?;
    attempts.push(closing);
    let expected = fraud::reference(&attempts).len();
    drop(attempts);
    let inputs = args.events as u64 + u64::from(args.partitions);
    let started = Instant::now();
    execute(
        &session,
        match variant {
            Variant::WindowedCount => SQL_STATEMENT,
            Variant::Join => JOINED,
        },
    )
    .await?;
    let running = Arc::new(AtomicBool::new(true));
    // One of the busiest 1% of cards (the generator's first).
    let statement = "SELECT * FROM possible_fraud WHERE card_number = 'card-000000';".to_string();
    let pulls = tokio::spawn(pull_while(session, statement, running.clone()));
    let finished = wait_finished(&client, 1, inputs, expected as u64).await;
    let elapsed = started.elapsed();
    running.store(false, Ordering::Relaxed);
    let (mut pulls_ms, pull_errors) = pulls.await.context("the pull queries' task")?;
    for member in members.into_values() {
        member.stop().await;
    }
    finished?;
    pulls_ms.sort_by(f64::total_cmp);
    Ok(Measured {
        elapsed,
        results: expected,
        pulls_ms,
        pull_errors,
    })
}

async fn execute(session: &Session, script: &str) -> anyhow::Result<()> {
    for (text, outcome) in session.execute_script(script).await {
        if let Err(e) = outcome {
            anyhow::bail!("{}", e.render(&text));
        }
    }
    Ok(())
}

/// One row per card (and one for the windows' closing attempt, so the
/// inner join keeps it too).
async fn load_cards(client: &Arc<Client>, cards: u64) -> anyhow::Result<()> {
    let mut producer = Producer::new(client.clone(), "cards", Acks::All).await?;
    let numbers = (0..cards).map(|card| format!("card-{card:06}"));
    for (i, number) in numbers.chain(["closing".to_string()]).enumerate() {
        let country = ["NL", "DE", "FR"][i % 3];
        let row = serde_json::json!({"card_number": number, "country": country, "card_limit": i % 1000});
        let record = Record {
            timestamp_ms: START_MS,
            key: Some(Bytes::from(number)),
            value: Some(Bytes::from(row.to_string())),
            headers: Vec::new(),
        };
        producer.send(None, record).await?;
    }
    producer.flush().await?;
    Ok(())
}

/// Asks `statement` again and again while `running`, 20 ms apart: the
/// times of those answered with rows, and how many were refused.
async fn pull_while(session: Session, statement: String, running: Arc<AtomicBool>) -> (Vec<f64>, usize) {
    let (mut took_ms, mut errors) = (Vec::new(), 0);
    while running.load(Ordering::Relaxed) {
        let started = Instant::now();
        match session.execute_script(&statement).await.pop() {
            Some((_, Ok(Outcome::Table { .. }))) => took_ms.push(started.elapsed().as_secs_f64() * 1e3),
            _ => errors += 1,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (took_ms, errors)
}
