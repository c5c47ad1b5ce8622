//! `cargo xtask demo`: a three-tier system in network namespaces, watched by the agent.
//!
//! The demo builds the agent, starts an internet client, the web, api and db tiers and an
//! undeclared host in namespaces of their own, and the agent on `demo/model.yaml` scoped to the
//! cgroup /driftwatch-demo. Normal traffic must raise nothing. Then the client uses the web tier's
//! command endpoint to run bash, which talks to db directly, sends data to the undeclared host and
//! opens a listener, and the demo waits until the agent has reported each of those.
//!
//! Everything it starts is removed again on success, on failure and on Ctrl-C.

mod interrupt;
mod report;
mod stack;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use driftwatch_e2e::demo::intrusion_command;
use driftwatch_e2e::stream::{self, DeviationWatcher};
use driftwatch_e2e::ProcessGuard;
use driftwatch_proto::v1::{Category, Deviation, Graph};

use crate::build::{self, BuildOptions};
use stack::{DemoStack, ADDRESSES};

/// Options of `cargo xtask demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoOptions {
    /// Leave everything running after the demo, so a second shell can run `driftwatch watch`;
    /// Ctrl-C then cleans up.
    #[arg(long)]
    pub keep_running: bool,

    /// Requests the internet client sends in the normal-traffic phase.
    #[arg(long, default_value_t = 20)]
    pub requests: u32,
}

/// How long the agent may take to turn traffic into graph edges and deviations.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one client run may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the demo; see the module documentation.
pub fn run(options: &DemoOptions) -> anyhow::Result<()> {
    build::require_root("the demo creates network namespaces and cgroups and loads eBPF programs")?;
    crate::prereq::ensure_tools()?;
    let agent_bin = build::build_all(&BuildOptions { debug: false })?.agent;
    let service_bin = build_demo_service()?;
    interrupt::install()?;

    let model = workspace_root().join("demo/model.yaml");
    let mut stack = DemoStack::start(&agent_bin, &service_bin, &model)?;
    let result = run_phases(&stack, &service_bin, options);
    match &result {
        Ok(()) if options.keep_running => {
            report::print_keep_running(&stack, &agent_bin, &service_bin);
            interrupt::wait();
        }
        Ok(()) => {}
        Err(_) => {
            let log = stack.keep_agent_log();
            eprintln!("the agent's log is kept at {}", log.display());
        }
    }

    let summary = stack.cleanup_summary();
    drop(stack);
    println!("\n{summary}");
    result
}

fn run_phases(stack: &DemoStack, service_bin: &Path, options: &DemoOptions) -> anyhow::Result<()> {
    let watcher = DeviationWatcher::subscribe(stack.agent.api_addr())?;

    println!(
        "\n=== phase 1: normal traffic ({} requests from the internet client) ===",
        options.requests
    );
    let client = stack.client(service_bin, &["--requests", &options.requests.to_string()])?;
    let output = run_client(client, CLIENT_TIMEOUT)?;
    println!("{}", output.join("\n"));
    let graph = wait_for_declared_edges(stack, u64::from(options.requests))?;
    let raised = watcher.deviations();
    let last_sequence = stream::status(stack.agent.api_addr())?.last_sequence;
    if !raised.is_empty() || last_sequence != 0 {
        bail!(
            "normal traffic raised deviations, so the model and the demo disagree:\n{}",
            stream::describe_all(&raised)
        );
    }
    println!("no deviation raised: every flow, listener and program matches the model");
    report::print_graph(&graph);

    println!("\n=== phase 2: intrusion through the web tier's command endpoint ===");
    let command = intrusion_command(service_bin);
    println!("the client sends: EXEC {command}");
    let client = stack.client(service_bin, &["--exec", &command])?;
    let output = run_client(client, CLIENT_TIMEOUT)?;
    println!("{}", output.join("\n"));
    wait_for_intrusion(&watcher)?;
    wait_for_stream_to_catch_up(stack, &watcher)?;

    println!("\n=== what the agent reported ===");
    report::print_summary(&watcher.deviations());
    report::print_graph(&stream::graph(stack.agent.api_addr())?);
    Ok(())
}

/// Waits until each declared edge shows every request's connection, which also shows that the
/// agent has processed all of phase 1 before the demo checks that nothing was raised.
fn wait_for_declared_edges(stack: &DemoStack, requests: u64) -> anyhow::Result<Graph> {
    let expected = [("web", 8080), ("api", 8081), ("db", 5432)];
    let mut last = Graph::default();
    let found = interrupt::wait_until(OBSERVE_TIMEOUT, || {
        last = stream::graph(stack.agent.api_addr()).ok()?;
        let complete = expected.iter().all(|(destination, port)| {
            last.edges.iter().any(|edge| {
                edge.destination == *destination
                    && edge.port == *port
                    && edge.connections >= requests
            })
        });
        complete.then(|| last.clone())
    })?;
    found.with_context(|| {
        format!(
            "the graph did not show {requests} connections on each declared flow (to web:8080, \
             api:8081 and db:5432) within {OBSERVE_TIMEOUT:?}; it has:\n{}",
            report::graph_text(&last)
        )
    })
}

fn wait_for_intrusion(watcher: &DeviationWatcher) -> anyhow::Result<()> {
    let ext_prefix = format!("{}:", ADDRESSES.ext);
    let checks: [(&str, Box<dyn Fn(&Deviation) -> bool>); 5] = [
        (
            "unexpected-executable for /bin/bash in web",
            Box::new(|d: &Deviation| {
                is(d, Category::UnexpectedExecutable)
                    && d.source == "web"
                    && stream::process_of(d).is_some_and(|(_, exe)| exe.ends_with("/bash"))
            }),
        ),
        (
            "unexpected-flow from web to db on tcp/5432",
            Box::new(|d: &Deviation| {
                is(d, Category::UnexpectedFlow)
                    && d.source == "web"
                    && d.destination == "db"
                    && d.port == Some(5432)
            }),
        ),
        (
            "trust-boundary-crossing from web to db",
            Box::new(|d: &Deviation| {
                is(d, Category::TrustBoundaryCrossing) && d.source == "web" && d.destination == "db"
            }),
        ),
        (
            "a deviation for the connection to the undeclared host",
            Box::new(move |d: &Deviation| {
                d.evidence
                    .as_ref()
                    .is_some_and(|evidence| evidence.remote_addr.starts_with(&ext_prefix))
            }),
        ),
        (
            "new-listener on port 4444 in web",
            Box::new(|d: &Deviation| is(d, Category::NewListener) && d.port == Some(4444)),
        ),
    ];
    for (what, accept) in &checks {
        let found = interrupt::wait_for_deviation(watcher, what, OBSERVE_TIMEOUT, accept)?;
        println!("seen: {what}: {}", found.id);
    }
    Ok(())
}

/// Waits until the watcher has every deviation the agent raised so far, so the summary is complete:
/// one observation can raise several deviations, and the checks above wait for only one of them.
fn wait_for_stream_to_catch_up(
    stack: &DemoStack,
    watcher: &DeviationWatcher,
) -> anyhow::Result<()> {
    let raised = stream::status(stack.agent.api_addr())?.last_sequence;
    let caught_up = interrupt::wait_until(OBSERVE_TIMEOUT, || {
        (watcher.last_sequence() >= raised).then_some(())
    })?;
    caught_up.with_context(|| {
        format!(
            "the deviation stream stopped at sequence {} while the agent has raised {raised}",
            watcher.last_sequence()
        )
    })
}

/// Waits for a client run to succeed and returns its output; Ctrl-C ends the wait.
fn run_client(mut client: ProcessGuard, timeout: Duration) -> anyhow::Result<Vec<String>> {
    interrupt::wait_until(timeout, || client.wait_exit(Duration::ZERO).ok())?
        .context("the client did not finish in time")?;
    client.wait_success(Duration::ZERO)
}

fn is(deviation: &Deviation, category: Category) -> bool {
    deviation.category == category as i32
}

fn workspace_root() -> PathBuf {
    let xtask_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask_dir
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Builds `driftwatch-demo-service` in release mode and returns its path.
pub(crate) fn build_demo_service() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!("building driftwatch-demo-service");
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "driftwatch-demo"])
        .current_dir(&root)
        .status()
        .context("failed to run cargo")?;
    if !status.success() {
        bail!("`cargo build --release -p driftwatch-demo` failed with {status}");
    }
    // A relative CARGO_TARGET_DIR is relative to the workspace root, where cargo ran.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), |dir| root.join(dir));
    let binary = target_dir.join("release/driftwatch-demo-service");
    if !binary.is_file() {
        bail!(
            "cargo reported success but {} does not exist",
            binary.display()
        );
    }
    Ok(binary)
}
