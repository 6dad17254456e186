//! The `runnel` command line.

mod broker_cli;
mod cluster_cli;
mod dataflow_cli;
mod dataflow_reset;
mod demo;
mod group_cli;
mod sim_cli;
mod sql_cli;
mod watch;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator: a node allocates and frees
/// small buffers per record (decoded keys, values, headers) on every core,
/// where glibc's malloc spent a third of the dataflow benchmark's time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The runtime of a process that hosts nodes (twice as many workers as
/// cores; see [`runnel::dataflow::host::node_runtime`] for why).
fn node_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    runnel::dataflow::host::node_runtime().context("starting the async runtime")
}

/// This binary, which the harnesses and benchmarks start as `runnel node`.
fn this_binary() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("finding the runnel binary")
}

#[derive(Parser)]
#[command(name = "runnel", version, about = "A replicated log and stream processor")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines on standard error are written: `text` for a person,
    /// `json` (one object per line) for a log collector.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
    /// Create, list, describe or delete topics.
    Topic {
        #[command(subcommand)]
        command: broker_cli::TopicCommand,
    },
    /// Send one record per line of standard input to a topic.
    Produce(broker_cli::ProduceArgs),
    /// Print a topic's records.
    Consume(broker_cli::ConsumeArgs),
    /// List, describe (with lag), reset the offsets of, or delete consumer groups.
    Group {
        #[command(subcommand)]
        command: group_cli::GroupCommand,
    },
    /// Start, list, describe or stop dataflows.
    Dataflow {
        #[command(subcommand)]
        command: dataflow_cli::DataflowCommand,
    },
    /// Run KSQL statements: an interactive shell, or `-e`/`-f` to run and exit.
    Sql(sql_cli::SqlArgs),
    /// Spread replicas evenly over the live nodes (e.g. after a node joins).
    Rebalance(broker_cli::ConnectArgs),
    /// Run real nodes under injected faults and check that nothing
    /// acknowledged is lost, duplicated or reordered.
    Chaos(runnel_verify::chaos::Args),
    /// Run seeds of the deterministic whole-cluster simulation (one process,
    /// simulated network and time) and check every guarantee.
    Sim(sim_cli::Args),
    /// Measure a part of Runnel and print figures (JSON lines, then a summary).
    Bench {
        #[command(subcommand)]
        target: runnel_bench::Target,
    },
    /// Print a shell completion script: `runnel completions bash >
    /// /etc/bash_completion.d/runnel` (or zsh, fish, elvish, powershell).
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
}

fn main() -> std::process::ExitCode {
    quiet_on_closed_pipe();
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader went away (`runnel consume | head -1`): done, quietly.
        Err(error) if is_closed_pipe(&error) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // One line a person can act on: the error and its causes.
            eprintln!("error: {}", one_line(&error));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: an error whose
/// message already ends with its cause's ("cannot bind …: Address already
/// in use") does not repeat it.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Whether an error comes from writing to a pipe whose reader has closed.
fn is_closed_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `println!` (and code that expects on its writes) panics when standard
/// output is a closed pipe; such a panic ends the command quietly with
/// status 0, like any other write to a reader that has gone (`… | head`).
/// Other panics report as before.
fn quiet_on_closed_pipe() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.contains("Broken pipe") || message.contains("BrokenPipe") {
            std::process::exit(0);
        }
        report(info);
    }));
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The demo shows its phases; a node shows what it does.
    let default_filter = match cli.command {
        Command::Demo { .. } => "error,runnel::demo=info",
        Command::Chaos(_) | Command::Sim(_) => "error",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        // Colour codes only for a person at a terminal, not in a log file.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    match cli.command {
        Command::Demo { dir } => demo::run(dir),
        Command::Certs { command } => cluster_cli::certs(command),
        Command::Node(args) => cluster_cli::node(args),
        Command::Status(args) => cluster_cli::status(args),
        Command::Topic { command } => broker_cli::topic(command),
        Command::Produce(args) => broker_cli::produce(args),
        Command::Consume(args) => broker_cli::consume(args),
        Command::Group { command } => group_cli::group(command),
        Command::Rebalance(args) => broker_cli::rebalance(args),
        Command::Dataflow { command } => dataflow_cli::dataflow(command),
        Command::Sql(args) => sql_cli::sql(args),
        Command::Chaos(args) => {
            runnel_verify::chaos::run(args, &this_binary()?, cluster_cli::wait_for_shutdown_signal())
        }
        Command::Sim(args) => sim_cli::run(args),
        Command::Bench { target } => runnel_bench::run(target, &this_binary()?),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "runnel", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script).context("writing the completion script")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag and argument of every command says what it is for.
    #[test]
    fn every_flag_has_help_text() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && !arg.is_hide_set() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&<Cli as clap::CommandFactory>::command(), "runnel", &mut missing);
        assert!(missing.is_empty(), "{} without help: {missing:#?}", missing.len());
    }

    #[test]
    fn an_error_line_names_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        let bind = anyhow::Error::new(io).context("cannot bind 127.0.0.1:7101: Address already in use");
        let error = bind.context("starting the node");
        assert_eq!(
            one_line(&error),
            "starting the node: cannot bind 127.0.0.1:7101: Address already in use"
        );
        let pipe = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe)).context("printing");
        assert!(is_closed_pipe(&pipe));
        assert!(!is_closed_pipe(&error));
    }
}
