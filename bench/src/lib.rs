//! `runnel bench …`: measurements printed as JSON lines and a human summary.

pub mod cluster;
mod storage;
pub mod transport;
mod window;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum Target {
    /// Log append throughput against a plain write loop on the same disk.
    Storage(storage::Args),
    /// Remote send throughput and call latency between two node processes.
    Transport(transport::Args),
    /// Produce throughput, ack latency and failover gap on 3 node processes.
    Produce(cluster::ProduceArgs),
    /// Consumer throughput reading back what was produced, 3 node processes.
    Consume(cluster::ConsumeArgs),
    /// CPU and memory of 3 idle nodes holding many partitions.
    Idle(cluster::IdleArgs),
    /// The fraud query: window operator vs a plain loop, then end to end.
    Window(window::Args),
}

pub fn run(target: Target) -> anyhow::Result<()> {
    match target {
        Target::Storage(args) => storage::run(args),
        Target::Transport(args) => transport::run(args),
        Target::Produce(args) => cluster::produce(args),
        Target::Consume(args) => cluster::consume(args),
        Target::Idle(args) => cluster::idle(args),
        Target::Window(args) => window::run(args),
    }
}

/// The median of some measurements (they are noisy on shared machines).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}
