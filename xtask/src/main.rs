//! Build orchestration for driftwatch: `cargo xtask <command>`.
//!
//! The kernel programs need a BPF linker and a build of their own (see `build.rs`), so every
//! command that runs the agent builds through here first.

mod build;
mod demo;
mod prereq;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, demo and test driftwatch")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build bpf-linker if missing, the eBPF object, and the agent with the object embedded.
    Build(build::BuildOptions),
    /// Build everything, then run the three-tier demo with an intrusion.
    Demo(demo::DemoOptions),
    /// Build everything, then run the whole test suite (needs root).
    Test(build::TestOptions),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build(options) => build::build_all(&options).map(|_| ()),
        Command::Demo(options) => demo::run(&options),
        Command::Test(options) => build::test(&options),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
