//! `cargo xtask bench`: what driftwatch costs and what it sustains, next to auditd and bpftrace.
//!
//! The overhead part runs the same storms with no observer, with driftwatch watching the whole
//! host, with auditd auditing execve and connect/accept, and with a bpftrace script that only
//! counts on the tracepoints driftwatch uses. Every round runs each configuration once, in an
//! order that rotates from round to round, so load from other work on the machine hits them
//! alike. Each ratio compares a run with the same round's run without an observer.
//!
//! The rest measures the agent alone: the userspace pipeline's throughput and loss point,
//! latency from a connect to its deviation on the gRPC stream, and memory with many live
//! processes and a full graph. Results go to the terminal and to `target/bench/results.json`.

mod fleet;
mod observer;
mod overhead;
mod report;
mod scale;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context};

use crate::build::{self, BuildOptions};

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchOptions {
    /// Small storms and two rounds, for checking that the benchmark works (about a minute once
    /// everything is built).
    #[arg(long)]
    pub quick: bool,
    /// Rounds of the overhead comparison (default 5, quick 2).
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Fork+exec operations per exec storm (default 20000, quick 1000).
    #[arg(long)]
    pub execs: Option<u64>,
    /// Connections per connect storm (default 50000, quick 5000).
    #[arg(long)]
    pub connects: Option<u64>,
    /// Connections timed for the latency to a deviation (default 200, quick 30).
    #[arg(long)]
    pub latency_samples: Option<u32>,
    /// Live processes for the memory measurement (default 10000, quick 1000).
    #[arg(long)]
    pub live_processes: Option<u32>,
    /// Graph edges for the memory measurement (default 100000, quick 10000).
    #[arg(long)]
    pub edges: Option<u64>,
    /// Also rewrite the results section of docs/benchmarks.md.
    #[arg(long)]
    pub update_docs: bool,
    /// Measure only the collector with three agents: its deviation throughput and the latency to
    /// its stream. Writes target/bench/fleet.json.
    #[arg(long)]
    pub fleet: bool,
    /// Deviations each agent raises for the collector's throughput, one loopback listener each
    /// (default 2000, quick 500).
    #[arg(long)]
    pub fleet_connections: Option<u64>,
}

/// The sizes one run uses, after `--quick` and the explicit options are applied.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub rounds: u32,
    pub execs: u64,
    pub connects: u64,
    pub latency_samples: u32,
    pub live_processes: u32,
    pub edges: u64,
    pub pipeline_step_seconds: f64,
    pub pipeline_flood_events: u64,
    pub fleet_connections: u64,
}

impl Plan {
    fn from_options(options: &BenchOptions) -> Plan {
        let quick = options.quick;
        let pick = |explicit: Option<u64>, full: u64, small: u64| explicit.unwrap_or(if quick { small } else { full });
        Plan {
            quick,
            rounds: pick(options.rounds.map(u64::from), 5, 2) as u32,
            execs: pick(options.execs, 20_000, 1_000),
            connects: pick(options.connects, 50_000, 5_000),
            latency_samples: pick(options.latency_samples.map(u64::from), 200, 30) as u32,
            live_processes: pick(options.live_processes.map(u64::from), 10_000, 1_000) as u32,
            edges: pick(options.edges, 100_000, 10_000),
            pipeline_step_seconds: if quick { 1.0 } else { 3.0 },
            pipeline_flood_events: pick(None, 2_000_000, 300_000),
            fleet_connections: pick(options.fleet_connections, 2_000, 500),
        }
    }
}

/// Binaries and paths every part of the benchmark uses.
pub struct Setup {
    pub agent: PathBuf,
    pub bench: PathBuf,
    /// The model the unscoped agent and the pipeline replay run on.
    pub model: PathBuf,
    /// Scratch directory for logs, configurations and models, under target/bench.
    pub workdir: PathBuf,
}

/// Runs the benchmark; see the module documentation.
pub fn run(options: &BenchOptions) -> anyhow::Result<()> {
    build::require_root("the benchmark loads eBPF programs, starts auditd and creates cgroups")?;
    install_interrupt_handler()?;
    crate::prereq::ensure_tools()?;
    let plan = Plan::from_options(options);
    let agent = build::build_all(&BuildOptions { debug: false })?.agent;
    let bench = build_bench_binary()?;

    let root = build::workspace_root();
    let out_dir = build::target_dir(&root).join("bench");
    let workdir = out_dir.join("work");
    std::fs::create_dir_all(&workdir).with_context(|| format!("failed to create {}", workdir.display()))?;
    let setup = Setup { agent, bench, model: root.join("demo/model.yaml"), workdir };

    if options.fleet {
        let result = fleet::run(&setup, &plan)?;
        let json_path = out_dir.join("fleet.json");
        std::fs::write(&json_path, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("failed to write {}", json_path.display()))?;
        println!("{}
wrote {}", serde_json::to_string_pretty(&result)?, json_path.display());
        return Ok(());
    }

    let peers = observer::prepare_peers(&setup);
    let machine = report::Machine::read();
    println!("\n{}", machine.describe());

    let overhead = overhead::run(&setup, &plan, &peers)?;
    let profile = overhead::profile(&setup, &plan, &peers)?;
    let pipeline = scale::pipeline(&setup, &plan)?;
    let agent_scale = scale::latency_and_memory(&setup, &plan)?;

    let results = report::Results { machine, plan, peers, overhead, profile, pipeline, agent_scale };
    let table = results.table();
    println!("\n{table}");
    let json_path = out_dir.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&results.to_json())?)
        .with_context(|| format!("failed to write {}", json_path.display()))?;
    println!("wrote {}", json_path.display());
    if options.update_docs {
        let docs = root.join("docs/benchmarks.md");
        report::update_docs(&docs, &results.markdown())?;
        println!("updated {}", docs.display());
    }
    Ok(())
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    // Only an atomic store: anything more is not async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes Ctrl-C and SIGTERM set a flag that the benchmark checks between steps, so it fails
/// like on any other error and its guards stop the observers and remove the audit rules.
/// The observers run in process groups of their own, so the terminal's Ctrl-C reaches only this
/// process and the storm it runs.
fn install_interrupt_handler() -> anyhow::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let previous = unsafe { libc::signal(signal, on_signal as extern "C" fn(libc::c_int) as *const () as libc::sighandler_t) };
        if previous == libc::SIG_ERR {
            bail!("failed to install a handler for signal {signal}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Fails with "interrupted" once Ctrl-C or SIGTERM arrived.
pub fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Builds `driftwatch-bench` in release mode and returns its path.
fn build_bench_binary() -> anyhow::Result<PathBuf> {
    let root = build::workspace_root();
    let target_dir = build::target_dir(&root);
    println!("building driftwatch-bench");
    let status = Command::new(build::cargo())
        .args(["build", "--release", "-p", "driftwatch-bench"])
        .current_dir(&root)
        // The same value as the agent build, so the agent library is not compiled a second time.
        .env("DRIFTWATCH_BPF_OBJECT", target_dir.join("bpf").join("driftwatch.bpf.o"))
        .status()
        .context("failed to run cargo")?;
    if !status.success() {
        bail!("`cargo build --release -p driftwatch-bench` failed with {status}");
    }
    let binary = target_dir.join("release/driftwatch-bench");
    if !binary.is_file() {
        bail!("cargo reported success but {} does not exist", binary.display());
    }
    Ok(binary)
}

/// Runs `bench` with `args`, waits for it, and parses the JSON object it prints last.
pub fn run_bench_binary(bench: &Path, args: &[String]) -> anyhow::Result<serde_json::Value> {
    check_interrupted()?;
    let output = Command::new(bench)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("failed to start {}", bench.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!("{} {} exited with {}; stdout:\n{stdout}", bench.display(), args.join(" "), output.status);
    }
    parse_last_json(&stdout).with_context(|| format!("{} {} printed no JSON result", bench.display(), args.join(" ")))
}

/// Returns the last line of `text` that parses as a JSON object.
pub fn parse_last_json(text: &str) -> Option<serde_json::Value> {
    text.lines().rev().find_map(|line| serde_json::from_str::<serde_json::Value>(line.trim()).ok().filter(|value| value.is_object()))
}

/// Returns the 1-minute load average from /proc/loadavg.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}
