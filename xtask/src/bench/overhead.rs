//! The overhead comparison: storms under each configuration, round after round.

use anyhow::Context;
use serde_json::json;

use super::observer::{Config, Observed, Peers, Running, Storm};
use super::{load_average, run_bench_binary, Plan, Setup};

/// One storm under one configuration in one round.
#[derive(Debug, Clone)]
pub struct Sample {
    pub round: u32,
    pub storm: Storm,
    pub config: Config,
    /// Operations the storm ran.
    pub operations: u64,
    pub elapsed_ns: u64,
    pub observed: Observed,
    /// 1-minute load average before and after the storm.
    pub load: (f64, f64),
}

impl Sample {
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "round": self.round,
            "storm": self.storm.name(),
            "config": self.config.name(),
            "operations": self.operations,
            "elapsed_ns": self.elapsed_ns,
            "seen": self.observed.seen,
            "lost": self.observed.lost,
            "cpu_ms": self.observed.cpu_ms,
            "peak_rss_kib": self.observed.peak_rss_kib,
            "rss_kib": self.observed.rss_kib,
            "program_run_time_ns": self.observed.programs.map(|programs| programs.run_time_ns),
            "program_runs": self.observed.programs.map(|programs| programs.runs),
            "load_before": self.load.0,
            "load_after": self.load.1,
        })
    }
}

/// Runs `plan.rounds` rounds; each runs both storms under every available configuration, in an
/// order rotated by one place per round so no configuration always runs first or last.
pub fn run(setup: &Setup, plan: &Plan, peers: &Peers) -> anyhow::Result<Vec<Sample>> {
    let configs: Vec<Config> = Config::ALL.into_iter().filter(|config| peers.unavailable(*config).is_none()).collect();
    let mut samples = Vec::new();
    for round in 0..plan.rounds {
        for storm in [Storm::Exec, Storm::Connect] {
            for offset in 0..configs.len() {
                let config = configs[(offset + round as usize) % configs.len()];
                let sample = measure(setup, plan, round, storm, config)?;
                println!(
                    "round {}/{}: {:<13} {:<22} {:>9.3} s  (load {:.2})",
                    round + 1,
                    plan.rounds,
                    storm.name(),
                    config.name(),
                    sample.elapsed_ns as f64 / 1e9,
                    sample.load.1
                );
                samples.push(sample);
            }
        }
    }
    Ok(samples)
}

fn measure(setup: &Setup, plan: &Plan, round: u32, storm: Storm, config: Config) -> anyhow::Result<Sample> {
    let mut observer = Running::start(config, setup)?;
    let (command, operations) = match storm {
        Storm::Exec => ("exec-storm", plan.execs),
        Storm::Connect => ("connect-storm", plan.connects),
    };
    let args = vec![command.to_string(), "--count".to_string(), operations.to_string()];

    observer.mark()?;
    let load_before = load_average();
    let result = run_bench_binary(&setup.bench, &args)?;
    let load_after = load_average();
    let observed = observer.stop(storm)?;

    let elapsed_ns = result["elapsed_ns"].as_u64().unwrap_or(0);
    Ok(Sample { round, storm, config, operations, elapsed_ns, observed, load: (load_before, load_after) })
}

/// Runs each storm once more under each observer that loads eBPF programs, with
/// `kernel.bpf_stats_enabled` on, so that their samples carry the programs' kernel time. The
/// statistics add a clock read before and after every program run, so these runs stay out of the
/// ratios.
pub fn profile(setup: &Setup, plan: &Plan, peers: &Peers) -> anyhow::Result<Vec<Sample>> {
    let _stats = BpfStats::enable()?;
    let mut samples = Vec::new();
    for storm in [Storm::Exec, Storm::Connect] {
        for config in [Config::Driftwatch, Config::Bpftrace] {
            if peers.unavailable(config).is_some() {
                continue;
            }
            let sample = measure(setup, plan, 0, storm, config)?;
            if let Some(programs) = sample.observed.programs {
                println!(
                    "profile: {:<13} {:<22} {:>7.0} ns of eBPF programs per operation, {:.1} runs",
                    storm.name(),
                    config.name(),
                    programs.run_time_ns as f64 / sample.operations.max(1) as f64,
                    programs.runs as f64 / sample.operations.max(1) as f64
                );
            }
            samples.push(sample);
        }
    }
    Ok(samples)
}

/// Guard that sets `kernel.bpf_stats_enabled` to 1 and restores the earlier value on drop.
struct BpfStats {
    before: String,
}

const BPF_STATS_ENABLED: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> anyhow::Result<BpfStats> {
        let before = std::fs::read_to_string(BPF_STATS_ENABLED).with_context(|| format!("failed to read {BPF_STATS_ENABLED}"))?;
        std::fs::write(BPF_STATS_ENABLED, "1").with_context(|| format!("failed to write 1 to {BPF_STATS_ENABLED}"))?;
        Ok(BpfStats { before: before.trim().to_string() })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(error) = std::fs::write(BPF_STATS_ENABLED, &self.before) {
            eprintln!("failed to restore {BPF_STATS_ENABLED} to {}: {error}; write it by hand", self.before);
        }
    }
}

/// Statistics of one configuration on one storm across the rounds.
#[derive(Debug, Clone)]
pub struct Summary {
    pub storm: Storm,
    pub config: Config,
    pub rounds: usize,
    /// Median wall time of the storm, in seconds.
    pub median_seconds: f64,
    /// Median, minimum and maximum of the per-round ratios to the same round without an agent.
    pub ratio: Option<(f64, f64, f64)>,
    /// Median per-round extra time per operation over no agent, in microseconds.
    pub extra_us_per_op: Option<f64>,
    /// Operations the storm ran per round, events seen and lost summed over the rounds.
    pub operations: u64,
    pub seen: Option<u64>,
    pub lost: Option<u64>,
    /// Median CPU time of the observer per storm, in milliseconds.
    pub cpu_ms: Option<f64>,
    /// Largest peak resident memory of the observer, in KiB.
    pub peak_rss_kib: Option<u64>,
    pub load_range: (f64, f64),
}

/// Pairs each sample with the same round's no-agent sample and summarises per configuration.
pub fn summarize(samples: &[Sample]) -> Vec<Summary> {
    let mut summaries = Vec::new();
    for storm in [Storm::Exec, Storm::Connect] {
        for config in Config::ALL {
            let own: Vec<&Sample> = samples.iter().filter(|sample| sample.storm == storm && sample.config == config).collect();
            if own.is_empty() {
                continue;
            }
            let mut ratios = Vec::new();
            let mut extras = Vec::new();
            for sample in &own {
                let baseline = samples
                    .iter()
                    .find(|other| other.storm == storm && other.config == Config::NoAgent && other.round == sample.round);
                if let Some(baseline) = baseline.filter(|baseline| baseline.elapsed_ns > 0) {
                    ratios.push(sample.elapsed_ns as f64 / baseline.elapsed_ns as f64);
                    let extra_ns = sample.elapsed_ns as f64 - baseline.elapsed_ns as f64;
                    extras.push(extra_ns / 1e3 / sample.operations.max(1) as f64);
                }
            }
            let seconds: Vec<f64> = own.iter().map(|sample| sample.elapsed_ns as f64 / 1e9).collect();
            let cpu: Vec<f64> = own.iter().filter_map(|sample| sample.observed.cpu_ms).collect();
            let sum = |pick: fn(&Observed) -> Option<u64>| -> Option<u64> { own.iter().map(|sample| pick(&sample.observed)).sum() };
            let loads = own.iter().flat_map(|sample| [sample.load.0, sample.load.1]);
            summaries.push(Summary {
                storm,
                config,
                rounds: own.len(),
                median_seconds: median(&seconds).unwrap_or(f64::NAN),
                ratio: median(&ratios).map(|middle| (middle, min(&ratios), max(&ratios))),
                extra_us_per_op: median(&extras),
                operations: own[0].operations,
                seen: sum(|observed| observed.seen),
                lost: sum(|observed| observed.lost),
                cpu_ms: median(&cpu),
                peak_rss_kib: own.iter().filter_map(|sample| sample.observed.peak_rss_kib).max(),
                load_range: (loads.clone().fold(f64::INFINITY, f64::min), loads.fold(f64::NEG_INFINITY, f64::max)),
            });
        }
    }
    summaries
}

pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    Some(if sorted.len() % 2 == 0 { (sorted[middle - 1] + sorted[middle]) / 2.0 } else { sorted[middle] })
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(round: u32, config: Config, elapsed_ms: u64) -> Sample {
        Sample {
            round,
            storm: Storm::Exec,
            config,
            operations: 1_000,
            elapsed_ns: elapsed_ms * 1_000_000,
            observed: Observed::default(),
            load: (1.0, 2.0),
        }
    }

    #[test]
    fn ratios_pair_each_round_with_its_own_baseline() {
        // Round 1 ran twice as slow. Only pairing by round gives 1.1x for every round, so the
        // smallest and largest ratio are 1.1x too; any cross-round pairing gives 0.55x or 2.2x.
        let samples = [
            sample(0, Config::NoAgent, 1_000),
            sample(0, Config::Driftwatch, 1_100),
            sample(1, Config::NoAgent, 2_000),
            sample(1, Config::Driftwatch, 2_200),
            sample(2, Config::NoAgent, 1_000),
            sample(2, Config::Driftwatch, 1_100),
        ];
        let summaries = summarize(&samples);
        let driftwatch = summaries.iter().find(|summary| summary.config == Config::Driftwatch).expect("a driftwatch row");

        let (middle, low, high) = driftwatch.ratio.expect("paired ratios");
        assert!((middle - 1.1).abs() < 1e-9, "median ratio {middle}");
        assert!((low - 1.1).abs() < 1e-9, "min ratio {low}");
        assert!((high - 1.1).abs() < 1e-9, "max ratio {high}");
        // 100 ms over 1,000 operations in rounds 0 and 2, 200 ms in round 1.
        assert_eq!(driftwatch.extra_us_per_op, Some(100.0));
    }

    #[test]
    fn median_of_even_count_averages_middle_pair() {
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[]), None);
    }
}
