//! Runnel's benchmarks, behind `runnel bench …`: each measures a part of
//! Runnel and prints JSON lines, then a human summary. They are not part of
//! the test command.
//!
//! - [`storage`]: log append throughput against plain write loops.
//! - [`transport`]: remote send throughput and call latency between two node
//!   processes, against plain TCP.
//! - [`cluster`]: produce, consume and idle figures on three `runnel node`
//!   processes.
//! - [`failover`]: the longest wait for an acknowledgement when a leader is
//!   killed, and a restarted cluster's first acknowledged write.
//! - [`kafka`]: Kafka clients (confluent-kafka) against Runnel's own client
//!   on the same clusters.
//! - [`window`]: the fraud query — the window operator alone, then end to end
//!   on embedded clusters.
//! - [`join`]: the fraud query with a stream–table join against the same
//!   query without it, and pull queries while they run.
//!
//! Node processes and embedded clusters come from
//! [`runnel_verify::fixtures`].

pub mod cluster;
pub mod failover;
pub mod join;
pub mod kafka;
pub mod storage;
pub mod transport;
pub mod window;

use std::path::Path;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum Target {
    /// Log append throughput against a plain write loop on the same disk.
    Storage(storage::Args),
    /// Remote send throughput and call latency between two node processes.
    Transport(transport::Args),
    /// Produce throughput, ack latency and failover gap on 3 node processes.
    Produce(cluster::ProduceArgs),
    /// Producer wait after a leader's SIGKILL; a restarted cluster's first ack.
    Failover(failover::Args),
    /// Consumer throughput reading back what was produced, 3 node processes.
    Consume(cluster::ConsumeArgs),
    /// CPU and memory of 3 idle nodes holding many partitions.
    Idle(cluster::IdleArgs),
    /// The fraud query: window operator vs a plain loop, then end to end.
    Window(window::Args),
    /// Kafka clients (librdkafka) against Runnel's own client, same clusters.
    Kafka(kafka::Args),
    /// A stream–table join (100,000 keys) against the windowed count alone.
    Join(join::Args),
}

/// Runs one benchmark; those with node processes run the `runnel` binary `exe`.
pub fn run(target: Target, exe: &Path) -> anyhow::Result<()> {
    match target {
        Target::Storage(args) => storage::run(args),
        Target::Transport(args) => transport::run(args, exe),
        Target::Produce(args) => cluster::produce(args, exe),
        Target::Failover(args) => failover::run(args, exe),
        Target::Consume(args) => cluster::consume(args, exe),
        Target::Idle(args) => cluster::idle(args, exe),
        Target::Window(args) => window::run(args),
        Target::Kafka(args) => kafka::run(args, exe),
        Target::Join(args) => join::run(args),
    }
}

/// The `q` quantile (0 to 1) of measurements sorted ascending.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n => sorted[((n - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize],
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
