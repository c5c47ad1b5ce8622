//! The results: a table for the terminal and the docs page, and a JSON document.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::Context;
use serde_json::{json, Value};

use super::observer::{Config, Peers};
use super::overhead::{self, Sample, Summary};
use super::Plan;

/// The machine a run came from.
#[derive(Debug, Clone)]
pub struct Machine {
    pub date: String,
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub load_at_start: String,
}

impl Machine {
    pub fn read() -> Machine {
        let command_output = |program: &str, args: &[&str]| {
            Command::new(program)
                .args(args)
                .output()
                .ok()
                .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
                .unwrap_or_default()
        };
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| text.lines().find_map(|line| line.strip_prefix("model name")?.split_once(':').map(|(_, name)| name.trim().to_string())))
            .unwrap_or_else(|| "unknown".to_string());
        Machine {
            date: command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            kernel: command_output("uname", &["-r"]),
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            cpu_model,
            load_at_start: std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{}, Linux {}, {} CPUs ({}), load average at start {}",
            self.date, self.kernel, self.cpus, self.cpu_model, self.load_at_start
        )
    }
}

/// Everything one run measured.
pub struct Results {
    pub machine: Machine,
    pub plan: Plan,
    pub peers: Peers,
    pub overhead: Vec<Sample>,
    /// Samples of the profile pass: one storm of each kind per observer with eBPF programs, with
    /// the programs' kernel time.
    pub profile: Vec<Sample>,
    pub pipeline: Value,
    pub agent_scale: Value,
}

impl Results {
    pub fn to_json(&self) -> Value {
        let summaries = overhead::summarize(&self.overhead);
        json!({
            "machine": {
                "date": self.machine.date,
                "kernel": self.machine.kernel,
                "cpus": self.machine.cpus,
                "cpu_model": self.machine.cpu_model,
                "load_at_start": self.machine.load_at_start,
            },
            "plan": {
                "quick": self.plan.quick,
                "rounds": self.plan.rounds,
                "execs": self.plan.execs,
                "connects": self.plan.connects,
                "latency_samples": self.plan.latency_samples,
                "live_processes": self.plan.live_processes,
                "edges": self.plan.edges,
            },
            "peers": {
                "auditd": peer_json(&self.peers.auditd),
                "bpftrace": peer_json(&self.peers.bpftrace),
            },
            "overhead": summaries.iter().map(summary_json).collect::<Vec<_>>(),
            "samples": self.overhead.iter().map(Sample::to_json).collect::<Vec<_>>(),
            "profile": profile_rows(&self.profile, &summaries),
            "pipeline": self.pipeline,
            "agent_scale": self.agent_scale,
        })
    }

    /// Formats the whole table as Markdown, which reads as well in a terminal as on the docs page.
    pub fn table(&self) -> String {
        self.markdown()
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let plan = &self.plan;
        let _ = writeln!(out, "Run: {}{}\n", self.machine.describe(), if plan.quick { " (--quick)" } else { "" });
        let _ = writeln!(
            out,
            "Storms: {} fork+exec of /bin/true, {} loopback connect/accept/close; {} rounds, configurations interleaved.\n",
            plan.execs, plan.connects, plan.rounds
        );

        let _ = writeln!(out, "| storm | configuration | median time | ratio to no agent (median, min-max) | extra us/op | events seen / happened | lost | observer CPU | observer peak RSS | load |");
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
        let summaries = overhead::summarize(&self.overhead);
        for summary in &summaries {
            let _ = writeln!(out, "{}", summary_row(summary));
        }
        for config in [Config::Auditd, Config::Bpftrace] {
            if let Some(reason) = self.peers.unavailable(config) {
                let _ = writeln!(out, "| both | {} | unavailable: {} | | | | | | | |", config.name(), reason.replace('|', "/"));
            }
        }
        let _ = writeln!(out, "\nEvents seen count the whole host, so other work on the machine adds to them; \"happened\" is what the storm itself did per round, times the rounds.");

        let profile = profile_rows(&self.profile, &summaries);
        if let Some(rows) = profile.as_array().filter(|rows| !rows.is_empty()) {
            let _ = writeln!(
                out,
                "\nOne more storm of each kind per observer, with `kernel.bpf_stats_enabled` on: the time its eBPF programs ran, against the no-agent median time per operation. It leaves out the observer's own process (see observer CPU) and what the programs cost the storm outside their runs.\n"
            );
            let _ = writeln!(out, "| storm | configuration | eBPF program time per op | program runs per op | share of the no-agent time per op |");
            let _ = writeln!(out, "|---|---|---|---|---|");
            for row in rows {
                let share = row["share_of_baseline"].as_f64().map_or("-".to_string(), |share| format!("{:.1}%", share * 100.0));
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {share} |",
                    row["storm"].as_str().unwrap_or("-"),
                    row["config"].as_str().unwrap_or("-"),
                    row["ns_per_op"].as_f64().map_or("-".to_string(), |ns| format!("{ns:.0} ns")),
                    row["runs_per_op"].as_f64().map_or("-".to_string(), |runs| format!("{runs:.1}")),
                );
            }
        }

        let pipeline = &self.pipeline;
        let _ = writeln!(out, "\n| pipeline (synthetic events, in process) | value |\n|---|---|");
        let _ = writeln!(out, "| highest rate sustained with zero loss and no backlog | {} |", rate(&pipeline["max_sustained_per_s"]));
        let _ = writeln!(out, "| first offered rate with loss | {} |", rate(&pipeline["first_loss_per_s"]));
        let _ = writeln!(out, "| saturated throughput (flood, channel always full) | {} |", rate(&pipeline["saturated_per_s"]));
        let _ = writeln!(out, "| RSS at start / after the flood | {} / {} |", mib(&pipeline["rss_start_kib"]), mib(&pipeline["rss_after_flood_kib"]));
        let _ = writeln!(
            out,
            "| RSS with {} graph edges ({} nodes) | {} (built at {}) |",
            pipeline["graph_edges"], pipeline["graph_nodes"], mib(&pipeline["rss_with_edges_kib"]),
            edges_rate(pipeline)
        );

        let scale = &self.agent_scale;
        let latency = &scale["latency"];
        let _ = writeln!(out, "\n| agent, scoped to a cgroup | value |\n|---|---|");
        let _ = writeln!(
            out,
            "| connect -> deviation on the gRPC stream, p50 / p99 / max | {} / {} / {} ({} samples, {} missed) |",
            micros(&latency["p50_us"]), micros(&latency["p99_us"]), micros(&latency["max_us"]), latency["samples"], latency["missed"]
        );
        let _ = writeln!(out, "| RSS idle | {} |", mib(&scale["rss_idle_kib"]));
        let _ = writeln!(
            out,
            "| RSS with {} live processes ({} seen) | {} (peak {}) |",
            scale["live_processes"], scale["live_processes_seen"], mib(&scale["rss_with_live_processes_kib"]), mib(&scale["hwm_with_live_processes_kib"])
        );
        let _ = writeln!(out, "| RSS after they exited | {} |", mib(&scale["rss_after_processes_exited_kib"]));
        out
    }
}

/// Returns the profile pass per storm and observer: program time and runs per operation, and
/// that time as a share of the no-agent median time per operation.
fn profile_rows(profile: &[Sample], summaries: &[Summary]) -> Value {
    let rows = profile.iter().filter_map(|sample| {
        let programs = sample.observed.programs?;
        let operations = sample.operations.max(1) as f64;
        let ns_per_op = programs.run_time_ns as f64 / operations;
        let baseline_ns_per_op = summaries
            .iter()
            .find(|summary| summary.storm == sample.storm && summary.config == Config::NoAgent)
            .map(|summary| summary.median_seconds * 1e9 / summary.operations.max(1) as f64);
        Some(json!({
            "storm": sample.storm.name(),
            "config": sample.config.name(),
            "ns_per_op": ns_per_op,
            "runs_per_op": programs.runs as f64 / operations,
            "share_of_baseline": baseline_ns_per_op.filter(|ns| *ns > 0.0).map(|ns| ns_per_op / ns),
        }))
    });
    Value::Array(rows.collect())
}

fn peer_json(state: &Result<String, String>) -> Value {
    match state {
        Ok(version) => json!({ "available": true, "version": version }),
        Err(reason) => json!({ "available": false, "reason": reason }),
    }
}

fn summary_json(summary: &Summary) -> Value {
    json!({
        "storm": summary.storm.name(),
        "config": summary.config.name(),
        "rounds": summary.rounds,
        "median_seconds": summary.median_seconds,
        "ratio_median": summary.ratio.map(|ratio| ratio.0),
        "ratio_min": summary.ratio.map(|ratio| ratio.1),
        "ratio_max": summary.ratio.map(|ratio| ratio.2),
        "extra_us_per_op": summary.extra_us_per_op,
        "operations_per_round": summary.operations,
        "seen": summary.seen,
        "lost": summary.lost,
        "cpu_ms_median": summary.cpu_ms,
        "peak_rss_kib": summary.peak_rss_kib,
        "load_min": summary.load_range.0,
        "load_max": summary.load_range.1,
    })
}

fn summary_row(summary: &Summary) -> String {
    let baseline = summary.config == Config::NoAgent;
    let ratio = match summary.ratio {
        _ if baseline => "1 (baseline)".to_string(),
        Some((middle, low, high)) => format!("{middle:.3}x ({low:.3}-{high:.3})"),
        None => "-".to_string(),
    };
    let extra = match summary.extra_us_per_op {
        _ if baseline => "-".to_string(),
        Some(extra) => format!("{extra:+.1}"),
        None => "-".to_string(),
    };
    let happened = summary.operations * summary.rounds as u64;
    let seen = summary.seen.map_or("-".to_string(), |seen| format!("{seen} / {happened}"));
    let lost = summary.lost.map_or("-".to_string(), |lost| lost.to_string());
    let cpu = summary.cpu_ms.map_or("-".to_string(), |cpu| format!("{cpu:.0} ms"));
    let rss = summary.peak_rss_kib.map_or("-".to_string(), |kib| format!("{:.1} MiB", kib as f64 / 1024.0));
    format!(
        "| {} | {} | {:.3} s | {ratio} | {extra} | {seen} | {lost} | {cpu} | {rss} | {:.1}-{:.1} |",
        summary.storm.name(),
        summary.config.name(),
        summary.median_seconds,
        summary.load_range.0,
        summary.load_range.1
    )
}

fn rate(value: &Value) -> String {
    value.as_f64().map_or("not reached".to_string(), |rate| format!("{:.0} events/s", rate))
}

fn mib(value: &Value) -> String {
    value.as_f64().map_or("-".to_string(), |kib| format!("{:.1} MiB", kib / 1024.0))
}

fn micros(value: &Value) -> String {
    value.as_f64().map_or("-".to_string(), |us| if us >= 1000.0 { format!("{:.2} ms", us / 1000.0) } else { format!("{us:.0} us") })
}

fn edges_rate(pipeline: &Value) -> String {
    match (pipeline["graph_edges"].as_f64(), pipeline["edges_seconds"].as_f64()) {
        (Some(edges), Some(seconds)) if seconds > 0.0 => format!("{:.0} new edges/s", edges / seconds),
        _ => "-".to_string(),
    }
}

/// The markers around the generated part of docs/benchmarks.md.
const BEGIN: &str = "<!-- results: begin (written by cargo xtask bench --update-docs) -->";
const END: &str = "<!-- results: end -->";

/// Replaces the text between the result markers in `path` with `table`.
pub fn update_docs(path: &Path, table: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("failed to read {}", path.display()))?;
    let (head, rest) = text.split_once(BEGIN).with_context(|| format!("{} has no line {BEGIN}", path.display()))?;
    let (_, tail) = rest.split_once(END).with_context(|| format!("{} has no line {END}", path.display()))?;
    let updated = format!("{head}{BEGIN}\n\n{table}\n{END}{tail}");
    std::fs::write(path, updated).with_context(|| format!("failed to write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_share_over_baseline_time() {
        use super::super::observer::{Observed, ProgramStats, Storm};
        let sample = |config, elapsed_ms: u64, programs| Sample {
            round: 0,
            storm: Storm::Connect,
            config,
            operations: 1_000,
            elapsed_ns: elapsed_ms * 1_000_000,
            observed: Observed { programs, ..Observed::default() },
            load: (0.0, 0.0),
        };
        // 100 us per operation without an agent; 2 us of program time per operation.
        let rounds = [sample(Config::NoAgent, 100, None), sample(Config::Driftwatch, 103, None)];
        let profile = [sample(Config::Driftwatch, 105, Some(ProgramStats { run_time_ns: 2_000_000, runs: 14_000 }))];

        let rows = profile_rows(&profile, &overhead::summarize(&rounds));
        let row = &rows[0];
        assert_eq!(row["config"], "driftwatch");
        assert_eq!(row["ns_per_op"], 2_000.0);
        assert_eq!(row["runs_per_op"], 14.0);
        assert!((row["share_of_baseline"].as_f64().unwrap() - 0.02).abs() < 1e-12, "{row}");
    }

    #[test]
    fn update_docs_replaces_only_between_markers() {
        let dir = std::env::temp_dir().join(format!("driftwatch-bench-docs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("benchmarks.md");
        std::fs::write(&path, format!("intro\n{BEGIN}\nold table\n{END}\noutro\n")).unwrap();

        update_docs(&path, "new table\n").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();

        assert_eq!(text, format!("intro\n{BEGIN}\n\nnew table\n\n{END}\noutro\n"));
    }

    #[test]
    fn update_docs_rejects_file_without_markers() {
        let dir = std::env::temp_dir().join(format!("driftwatch-bench-nomarkers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("benchmarks.md");
        std::fs::write(&path, "no markers here\n").unwrap();

        let result = update_docs(&path, "table");
        std::fs::remove_dir_all(&dir).unwrap();

        assert!(result.is_err());
    }
}
