//! The agent alone: pipeline throughput, latency to a deviation, memory at scale.

use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use driftwatch_e2e::agent::AgentUnderTest;
use driftwatch_e2e::cgroup::Cgroup;
use driftwatch_e2e::process::spawn_in;
use driftwatch_e2e::{stream, wait_until};
use serde_json::{json, Value};

use super::observer::memory_kib;
use super::{load_average, parse_last_json, run_bench_binary, Plan, Setup};

/// Replays synthetic events through the pipeline in `driftwatch-bench pipeline`.
pub fn pipeline(setup: &Setup, plan: &Plan) -> anyhow::Result<Value> {
    println!("\nreplaying synthetic events through the pipeline");
    let load_before = load_average();
    let mut result = run_bench_binary(
        &setup.bench,
        &[
            "pipeline".to_string(),
            "--model".to_string(),
            setup.model.display().to_string(),
            "--step-seconds".to_string(),
            plan.pipeline_step_seconds.to_string(),
            "--flood-events".to_string(),
            plan.pipeline_flood_events.to_string(),
            "--edges".to_string(),
            plan.edges.to_string(),
        ],
    )?;
    result["load_before"] = json!(load_before);
    result["load_after"] = json!(load_average());
    Ok(result)
}

/// Model of the scoped agent: a client and a server component in two cgroups below `scope`,
/// with no flow declared, so each connection of the latency probe raises an unexpected-flow.
fn scoped_model(scope: &str) -> String {
    let component = |id: &str| {
        format!("  - id: {id}\n    zone: local\n    match: {{ cgroup: [\"{scope}/{id}\"] }}\n    executables: [\"**/driftwatch-bench\"]\n")
    };
    format!(
        "version: 1\n\
         zones:\n  - {{ id: local, trust: 50, match: {{ cidrs: [\"127.0.0.0/8\"] }} }}\n\
         components:\n{}{}\
         flows: []\n\
         exceptions: []\n",
        component("client"),
        component("server")
    )
}

/// How long the agent may take to see every live process.
const PROCESSES_TIMEOUT: Duration = Duration::from_secs(120);

/// Starts the agent scoped to a cgroup of its own, times connects to their deviations, then
/// fills the cgroup with sleeping processes and reads the agent's memory.
pub fn latency_and_memory(setup: &Setup, plan: &Plan) -> anyhow::Result<Value> {
    println!("\nlatency from connect to deviation, and memory with {} live processes", plan.live_processes);
    let cgroup = Cgroup::create_replacing_stale("/driftwatch-bench")?;
    let client_cgroup = cgroup.child("client")?;
    let server_cgroup = cgroup.child("server")?;
    let model = setup.workdir.join("scoped-model.yaml");
    std::fs::write(&model, scoped_model(cgroup.relative_path()))?;
    let agent = AgentUnderTest::start_with(&setup.agent, &model, cgroup.path(), &[])?;
    let pid = agent.pid();
    let rss_idle_kib = memory_kib(pid, "VmRSS");

    let mut server_command = Command::new(&setup.bench);
    server_command.args(["accept-server", "--ports", &plan.latency_samples.to_string()]);
    let server = spawn_in(None, Some(&server_cgroup), server_command)?;
    let ports_line = server.wait_for_line(Duration::from_secs(30), |line| line.starts_with("ports "))?;
    let ports = ports_line.trim_start_matches("ports ").to_string();

    let mut latency_command = Command::new(&setup.bench);
    latency_command.args(["latency", "--api", &agent.api_arg(), "--ports", &ports]);
    let mut probe = spawn_in(None, Some(&client_cgroup), latency_command)?;
    let lines = probe.wait_success(Duration::from_secs(60 + u64::from(plan.latency_samples) * 2))?;
    let latency = parse_last_json(&lines.join("\n")).context("the latency probe printed no JSON result")?;
    drop(server);
    let rss_after_latency_kib = memory_kib(pid, "VmRSS");

    let live_before = live_processes(&agent)?;
    let stop_file = setup.workdir.join("sleepers.stop");
    let _ = std::fs::remove_file(&stop_file);
    let mut sleepers_command = Command::new(&setup.bench);
    sleepers_command.args(["sleepers", "--count", &plan.live_processes.to_string(), "--until-file"]).arg(&stop_file);
    let mut sleepers = spawn_in(None, Some(&client_cgroup), sleepers_command)?;
    sleepers.wait_for_line(PROCESSES_TIMEOUT, |line| line == "ready")?;
    let target = live_before + u64::from(plan.live_processes);
    let seen = wait_until(PROCESSES_TIMEOUT, || {
        std::thread::sleep(Duration::from_millis(500));
        live_processes(&agent).ok().filter(|live| *live >= target)
    });
    let live_seen = match seen {
        Some(live) => live,
        None => live_processes(&agent)?,
    };
    let rss_live_kib = memory_kib(pid, "VmRSS");
    let hwm_live_kib = memory_kib(pid, "VmHWM");

    std::fs::write(&stop_file, b"")?;
    sleepers.wait_success(PROCESSES_TIMEOUT)?;
    let _ = wait_until(PROCESSES_TIMEOUT, || {
        std::thread::sleep(Duration::from_millis(500));
        live_processes(&agent).ok().filter(|live| *live <= live_before)
    });
    let rss_after_exit_kib = memory_kib(pid, "VmRSS");
    let hwm_kib = memory_kib(pid, "VmHWM");
    drop(agent);
    cgroup.kill_remaining()?;
    drop(client_cgroup);
    drop(server_cgroup);

    Ok(json!({
        "latency": latency,
        "live_processes": plan.live_processes,
        "live_processes_seen": live_seen.saturating_sub(live_before),
        "rss_idle_kib": rss_idle_kib,
        "rss_after_latency_kib": rss_after_latency_kib,
        "rss_with_live_processes_kib": rss_live_kib,
        "hwm_with_live_processes_kib": hwm_live_kib,
        "rss_after_processes_exited_kib": rss_after_exit_kib,
        "hwm_kib": hwm_kib,
        "load": load_average(),
    }))
}

fn live_processes(agent: &AgentUnderTest) -> anyhow::Result<u64> {
    let status = stream::status(agent.api_addr())?;
    Ok(status.counters.iter().find(|counter| counter.name == "processes_live").map_or(0, |counter| counter.value))
}
