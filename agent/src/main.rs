//! `driftwatch`: the agent daemon and its command-line clients.

use std::future::Future;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use driftwatch::commands::{agent, check, collector, graph, model, status, watch};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "driftwatch", version, about = "Check a declared threat model against what the kernel sees")]
struct Cli {
    /// Log format of the agent's own messages on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load the kernel programs, compare with the model, serve the API.
    Agent(agent::AgentArgs),
    /// Receive the pushes of many agents and serve the fleet's deviations, graph and status.
    Collector(collector::CollectorArgs),
    /// Stream deviations from a running agent or collector.
    Watch(watch::WatchArgs),
    /// Print the observed graph of a running agent.
    Graph(graph::GraphArgs),
    /// Print a running agent's status: hooks, counters, model.
    Status(status::StatusArgs),
    /// Run a command under observation and check what it did against the model (CI mode).
    Check(check::CheckArgs),
    /// Work with model files.
    #[command(subcommand)]
    Model(model::ModelCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon reports its lifecycle at info; the clients and `check` stay quiet unless
    // something goes wrong, so their output is the report.
    let default_level = if matches!(cli.command, Command::Agent(_) | Command::Collector(_)) { "info" } else { "warn" };
    init_logging(cli.log_format, default_level);
    let result = match cli.command {
        Command::Model(command) => model::run(command),
        Command::Agent(args) => block_on(agent::run(args)),
        Command::Check(args) => block_on(check::run(args)),
        Command::Collector(args) => block_on(collector::run(args)),
        Command::Watch(args) => block_on(async { watch::run(args).await.map(|()| ExitCode::SUCCESS) }),
        Command::Graph(args) => block_on(async { graph::run(args).await.map(|()| ExitCode::SUCCESS) }),
        Command::Status(args) => block_on(async { status::run(args).await.map(|()| ExitCode::SUCCESS) }),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", driftwatch::errors::chain_text(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn block_on(command: impl Future<Output = anyhow::Result<ExitCode>>) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(command)
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = EnvFilter::try_from_env("DRIFTWATCH_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
