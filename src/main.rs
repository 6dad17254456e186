//! The `runnel` command line.

mod bench;
mod cluster_cli;
mod demo;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "runnel", version, about = "A replicated log and stream processor")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the demonstration of what Runnel can do today.
    Demo {
        /// Where to keep the demo's data (a fresh temporary directory by default).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Create or extend the cluster's certificates.
    Certs {
        #[command(subcommand)]
        command: cluster_cli::CertsCommand,
    },
    /// Run a cluster node.
    Node(cluster_cli::NodeArgs),
    /// Show the cluster's nodes and their state.
    Status(cluster_cli::StatusArgs),
    /// Measure a part of Runnel and print figures (JSON lines, then a summary).
    Bench {
        #[command(subcommand)]
        target: bench::Target,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo { dir } => demo::run(dir),
        Command::Certs { command } => cluster_cli::certs(command),
        Command::Node(args) => cluster_cli::node(args),
        Command::Status(args) => cluster_cli::status(args),
        Command::Bench { target } => bench::run(target),
    }
}
