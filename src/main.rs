//! The `runnel` command line.

mod bench;
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
        Command::Bench { target } => bench::run(target),
    }
}
