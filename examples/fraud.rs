//! The motivating query end to end on a running cluster of `runnel node`s:
//! creates `authorization_attempts`, starts the `possible_fraud` dataflow
//! (registered in the `runnel` binary), produces generated attempts, and
//! checks the sink against a reference computed from the input topic.
//!
//! ```sh
//! runnel certs init --dir ./certs --nodes 3
//! runnel node --id 1 --listen 127.0.0.1:7001 --seeds 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003 --data ./d1 --certs ./certs &
//! # ... nodes 2 and 3 likewise ...
//! cargo run --example fraud -- --seeds 127.0.0.1:7001 --certs ./certs --attempts 100000
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::Parser;
use runnel::client::protocol::{MetadataError, TopicConfig};
use runnel::client::{Client, ClientError};
use runnel::dataflow::fraud::{self, Generator};

#[derive(Parser)]
struct Args {
    #[arg(long, value_delimiter = ',', required = true)]
    seeds: Vec<SocketAddr>,
    #[arg(long)]
    certs: PathBuf,
    #[arg(long, default_value_t = 100_000)]
    attempts: usize,
    #[arg(long, default_value_t = 2_000)]
    cards: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// 2026-01-01T00:00:00Z.
const START_MS: i64 = 1_767_225_600_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = Arc::new(Client::connect(args.seeds.clone(), &args.certs).await?);
    let replication = client.alive_nodes().len().clamp(1, 3) as u16;
    match client
        .create_topic(fraud::SOURCE, TopicConfig::new(3, replication))
        .await
    {
        Ok(()) | Err(ClientError::Refused(MetadataError::TopicExists(_))) => {}
        Err(e) => return Err(e).context("creating the source topic"),
    }
    match client.start_dataflow(fraud::NAME).await {
        Ok(()) | Err(ClientError::Refused(MetadataError::DataflowRunning(_))) => {}
        Err(e) => return Err(e).context("starting the dataflow"),
    }
    // The reference covers the whole source topic: run this on a fresh
    // cluster (a second run's attempts would land behind the first run's
    // closing attempts, i.e. late).
    let mut generator = Generator::new(args.seed, args.cards, START_MS, 20);
    let attempts: Vec<_> = generator.by_ref().take(args.attempts).collect();
    let started = Instant::now();
    let closing = generator.closing_attempt();
    fraud::produce(&client, attempts, Some(&closing)).await?;
    println!(
        "produced {} attempts in {:.1} s",
        args.attempts,
        started.elapsed().as_secs_f64()
    );
    let reference = fraud::reference(&fraud::read_attempts(&client).await.map_err(anyhow::Error::msg)?);
    let deadline = Instant::now() + Duration::from_secs(600);
    let (results, duplicates) = loop {
        let (results, duplicates) = fraud::read_results(&client).await.map_err(anyhow::Error::msg)?;
        if results.len() + duplicates >= reference.len() || Instant::now() > deadline {
            break (results, duplicates);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!(
        "{} possible-fraud results in {:.1} s:",
        results.len(),
        started.elapsed().as_secs_f64()
    );
    for ((card, window_start_ms), count) in results.iter().take(10) {
        println!("  {card}  window {window_start_ms}  {count} attempts");
    }
    ensure!(
        results == reference && duplicates == 0,
        "the sink differs from the reference ({} results expected, {} found, {duplicates} duplicated)",
        reference.len(),
        results.len()
    );
    println!("the sink equals the reference computed from the input topic");
    Ok(())
}
