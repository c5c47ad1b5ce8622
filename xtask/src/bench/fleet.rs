//! The collector with three agents: the deviation throughput it sustains and the latency from a
//! kernel event to its deviation on the collector's stream.
//!
//! Throughput: the collector is stopped while each agent's workload raises the same number of
//! deviations, which the agents buffer in their replay history. The collector is then started
//! again and all three agents push their backlog at once. The rate is counted from the first to the
//! last deviation the collector stored, so the time the agents take to reconnect is left out. The
//! collector's status is read 5 ms apart at first and up to 100 ms apart later, which bounds the
//! precision of that time.
//!
//! Latency: with everything connected, `driftwatch-bench latency` runs under the first agent and
//! subscribes to the collector instead of the agent, so every sample crosses agent, push stream and
//! collector. The samples' server runs under the same agent.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use driftwatch_e2e::agent::AgentUnderTest;
use driftwatch_e2e::cgroup::Cgroup;
use driftwatch_e2e::process::spawn_in;
use driftwatch_e2e::{stream, wait_until, CollectorUnderTest};
use serde_json::{json, Value};

use super::{load_average, parse_last_json, Plan, Setup};

const AGENTS: [&str; 3] = ["a", "b", "c"];
/// How long agents and the collector may take to work through a backlog.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Model of the three agents: one component per agent cgroup, and `server` for the latency
/// samples' server under the first agent, with no flow declared, so each connection to a fresh
/// port raises a fresh unexpected-flow. Declaring the server keeps its listeners from raising
/// anything but new-listener, which the latency probe ignores.
fn fleet_model(scope: &str) -> String {
    let mut components = String::new();
    let cgroups = AGENTS.iter().map(|id| (*id, format!("{scope}/{id}")));
    for (id, cgroup) in cgroups.chain([("server", format!("{scope}/{}/server", AGENTS[0]))]) {
        components.push_str(&format!(
            "  - id: {id}\n    zone: local\n    match: {{ cgroup: [\"{cgroup}\"] }}\n    executables: [\"**/driftwatch-bench\"]\n"
        ));
    }
    format!(
        "version: 1\nzones:\n  - {{ id: local, trust: 50, match: {{ cidrs: [\"127.0.0.0/8\"] }} }}\ncomponents:\n{components}flows: []\nexceptions: []\n"
    )
}

/// Runs both measurements; see the module documentation.
pub fn run(setup: &Setup, plan: &Plan) -> anyhow::Result<Value> {
    let per_agent = plan.fleet_connections;
    println!("\ncollector with three agents: {per_agent} deviations each, then {} latency samples", plan.latency_samples);
    // SAFETY: the benchmark is single-threaded here; the variable is read by the harness only.
    unsafe { std::env::set_var("DRIFTWATCH_BIN", &setup.agent) };
    let root = Cgroup::create_replacing_stale("/dw-hE-bench-fleet")?;
    let servers = root.child("servers")?;
    let cgroups: Vec<Cgroup> = AGENTS.iter().map(|id| root.child(id)).collect::<Result<_, _>>()?;
    let model = setup.workdir.join("fleet-model.yaml");
    std::fs::write(&model, fleet_model(root.relative_path()))?;

    let mut collector = CollectorUnderTest::start()?;
    let collector_addr = collector.addr().to_string();
    collector.kill();
    let mut agents = Vec::new();
    for (id, cgroup) in AGENTS.iter().zip(&cgroups) {
        let node = format!("bench-{id}");
        let args = ["--collector", collector_addr.as_str(), "--node", node.as_str(), "--history", "262144"];
        agents.push(AgentUnderTest::start_with(&setup.agent, &model, cgroup.path(), &args)?);
    }

    let ports = accept_server(setup, &servers, per_agent)?;
    let mut workloads = Vec::new();
    for cgroup in &cgroups {
        let mut command = Command::new(&setup.bench);
        command.args(["connect-ports", "--ports", &ports.1]);
        workloads.push(spawn_in(None, Some(cgroup), command)?);
    }
    for workload in &mut workloads {
        workload.wait_success(DRAIN_TIMEOUT)?;
    }
    // Every agent has raised at least one deviation per connection before the collector returns.
    let mut backlog = 0;
    for agent in &agents {
        let raised = wait_until(DRAIN_TIMEOUT, || {
            let status = stream::status(agent.api_addr()).ok()?;
            (status.last_sequence >= per_agent).then_some(status.last_sequence)
        })
        .context("an agent did not raise a deviation per connection")?;
        backlog += raised;
    }
    drop(ports.0);

    collector.restart()?;
    let api = collector.addr();
    let mut first: Option<(Instant, u64)> = None;
    let mut last = (Instant::now(), 0);
    let drained = wait_until(DRAIN_TIMEOUT, || {
        let stored = stream::status(api).ok()?.last_sequence;
        let now = Instant::now();
        if stored > 0 && first.is_none() {
            first = Some((now, stored));
        }
        last = (now, stored);
        (stored >= backlog).then_some(())
    });
    drained.with_context(|| format!("the collector stored {} of {backlog} deviations in {DRAIN_TIMEOUT:?}", last.1))?;
    let (first_at, first_stored) = first.context("the collector stored nothing")?;
    let seconds = last.0.duration_since(first_at).as_secs_f64();
    let rate = (last.1 - first_stored) as f64 / seconds.max(1e-3);
    println!("  drained {backlog} deviations from three agents at {rate:.0} per second");

    // Latency: a fresh set of ports, so every sample raises a fresh deviation. The server runs
    // inside the first agent's scope, so the agent observes both ends at once instead of waiting
    // out its join window for a partner end that another host would have.
    let local_servers = cgroups[0].child("server")?;
    let latency_ports = accept_server(setup, &local_servers, u64::from(plan.latency_samples))?;
    let mut probe_command = Command::new(&setup.bench);
    probe_command.args(["latency", "--api", &api.to_string(), "--ports", &latency_ports.1]);
    let mut probe = spawn_in(None, Some(&cgroups[0]), probe_command)?;
    let lines = probe.wait_success(Duration::from_secs(60 + u64::from(plan.latency_samples) * 2))?;
    let latency = parse_last_json(&lines.join("\n")).context("the latency probe printed no JSON result")?;
    println!("  kernel event to collector stream: {latency}");
    drop(latency_ports.0);
    drop(local_servers);

    let status = stream::status(api)?;
    let counter = |name: &str| status.counters.iter().find(|c| c.name == name).map_or(0, |c| c.value);
    let result = json!({
        "agents": AGENTS.len(),
        "deviations": backlog,
        "drain_seconds": seconds,
        "deviations_per_second": rate,
        "duplicates": counter("collector_duplicates"),
        "lost": counter("collector_lost"),
        "latency": latency,
        "load": load_average(),
    });
    drop(agents);
    drop(collector);
    root.kill_remaining()?;
    Ok(result)
}

/// Starts `driftwatch-bench accept-server` with `count` ports in `cgroup`, outside every agent's
/// scope; returns it with its ports as a comma-separated list.
fn accept_server(setup: &Setup, cgroup: &Cgroup, count: u64) -> anyhow::Result<(driftwatch_e2e::ProcessGuard, String)> {
    let mut command = Command::new(&setup.bench);
    command.args(["accept-server", "--ports", &count.to_string()]);
    let server = spawn_in(None, Some(cgroup), command)?;
    let line = server.wait_for_line(Duration::from_secs(60), |line| line.starts_with("ports "))?;
    let ports = line.trim_start_matches("ports ").to_string();
    Ok((server, ports))
}
