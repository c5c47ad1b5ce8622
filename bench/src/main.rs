//! `driftwatch-bench`: the workloads and in-process measurements behind `cargo xtask bench`.
//!
//! Each subcommand prints one JSON object on stdout when it is done, so the orchestrator reads
//! results without parsing prose; progress goes to stderr.

mod latency;
mod pipeline;
mod sleepers;
mod storm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "driftwatch-bench", about = "Benchmark workloads for driftwatch")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fork and exec a program `count` times, one after the other, and time it.
    ExecStorm(storm::ExecStormArgs),
    /// Open, accept and close `count` TCP connections on 127.0.0.1, one after the other, and time it.
    ConnectStorm(storm::ConnectStormArgs),
    /// Start `count` sleeping children, print `ready`, and keep them until a given file exists.
    Sleepers(sleepers::SleepersArgs),
    /// Measure the time from a connect to the deviation it raises on the agent's gRPC stream.
    Latency(latency::LatencyArgs),
    /// Listen on many loopback ports and accept and close every connection, for `latency`.
    AcceptServer(latency::AcceptServerArgs),
    /// Connect once to each of the given loopback ports, for the fleet benchmark.
    ConnectPorts(latency::ConnectPortsArgs),
    /// Replay synthetic events through the agent's pipeline: throughput, loss point, memory.
    Pipeline(pipeline::PipelineArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::ExecStorm(args) => storm::exec_storm(&args),
        Command::ConnectStorm(args) => storm::connect_storm(&args),
        Command::Sleepers(args) => sleepers::run(&args),
        Command::Latency(args) => latency::run(&args),
        Command::AcceptServer(args) => latency::accept_server(&args),
        Command::Pipeline(args) => pipeline::run(&args),
        Command::ConnectPorts(args) => latency::connect_ports(&args),
    };
    match result {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads a `kB` field such as `VmRSS` or `VmHWM` from /proc/self/status, in KiB.
pub fn own_memory_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
