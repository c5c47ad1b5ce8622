//! The observers the overhead comparison runs: driftwatch, auditd and bpftrace, each started
//! before a storm and stopped after it, with the events it saw and the CPU and memory it used.

use std::fs::{self, File};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use driftwatch_e2e::stream;

use super::{check_interrupted, Setup};

/// One configuration of the overhead comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Config {
    NoAgent,
    Driftwatch,
    Auditd,
    Bpftrace,
}

impl Config {
    pub const ALL: [Config; 4] = [Config::NoAgent, Config::Driftwatch, Config::Auditd, Config::Bpftrace];

    pub fn name(self) -> &'static str {
        match self {
            Config::NoAgent => "no agent",
            Config::Driftwatch => "driftwatch",
            Config::Auditd => "auditd",
            Config::Bpftrace => "bpftrace (count only)",
        }
    }
}

/// The storms of the overhead comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storm {
    Exec,
    Connect,
}

impl Storm {
    pub fn name(self) -> &'static str {
        match self {
            Storm::Exec => "exec storm",
            Storm::Connect => "connect storm",
        }
    }
}

/// Whether each peer could be installed and started, with the reason when not.
#[derive(Debug, Clone)]
pub struct Peers {
    pub auditd: Result<String, String>,
    pub bpftrace: Result<String, String>,
}

impl Peers {
    /// Returns None when `config` can run, or the reason it cannot.
    pub fn unavailable(&self, config: Config) -> Option<&str> {
        match config {
            Config::Auditd => self.auditd.as_ref().err().map(String::as_str),
            Config::Bpftrace => self.bpftrace.as_ref().err().map(String::as_str),
            Config::NoAgent | Config::Driftwatch => None,
        }
    }
}

/// Counts and resource use an observer reported for one storm.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Events of the storm's kind the observer counted during the storm, host-wide.
    pub seen: Option<u64>,
    /// Records the observer itself reports as lost.
    pub lost: Option<u64>,
    /// CPU time of the observer's process over the storm (and, for driftwatch, until its
    /// pipeline caught up), in milliseconds.
    pub cpu_ms: Option<f64>,
    /// Peak resident memory of the observer's process since it started, in KiB.
    pub peak_rss_kib: Option<u64>,
    /// Resident memory after the storm, in KiB.
    pub rss_kib: Option<u64>,
    /// Kernel time and runs of the observer's eBPF programs during the storm. The kernel counts
    /// them only while `kernel.bpf_stats_enabled` is on, as in [`super::overhead::profile`].
    pub programs: Option<ProgramStats>,
}

/// Run time and run count summed over a process's eBPF programs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgramStats {
    pub run_time_ns: u64,
    pub runs: u64,
}

/// Installs auditd and bpftrace when missing, then starts and stops each once to see whether it
/// runs here.
pub fn prepare_peers(setup: &Setup) -> Peers {
    let auditd = install("auditd", "auditd").and_then(|version| {
        let running = Running::start(Config::Auditd, setup).map_err(|error| format!("auditd did not start: {error:#}"))?;
        running.stop(Storm::Exec).map_err(|error| format!("auditd did not stop cleanly: {error:#}"))?;
        Ok(version)
    });
    let bpftrace = install("bpftrace", "bpftrace").and_then(|version| {
        let running = Running::start(Config::Bpftrace, setup).map_err(|error| format!("bpftrace did not start: {error:#}"))?;
        running.stop(Storm::Exec).map_err(|error| format!("bpftrace did not stop cleanly: {error:#}"))?;
        Ok(version)
    });
    for (name, state) in [("auditd", &auditd), ("bpftrace", &bpftrace)] {
        match state {
            Ok(version) => println!("{name}: {version}"),
            Err(reason) => println!("{name}: unavailable: {reason}"),
        }
    }
    Peers { auditd, bpftrace }
}

/// Installs `package` with apt-get when `program` is missing; returns the installed version.
fn install(program: &str, package: &str) -> Result<String, String> {
    if crate::prereq::find_in_path(program).is_none() {
        if crate::prereq::find_in_path("apt-get").is_none() {
            return Err(format!("{program} is missing and apt-get is not available to install {package}"));
        }
        println!("installing {package} with apt-get");
        let status = Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map_err(|error| format!("failed to run apt-get: {error}"))?;
        if !status.success() {
            return Err(format!("apt-get install {package} failed with {status}"));
        }
    }
    let output = Command::new("dpkg-query").args(["-W", "-f", "${Version}", package]).output();
    match output {
        Ok(output) if output.status.success() => Ok(format!("{package} {}", String::from_utf8_lossy(&output.stdout))),
        _ => Ok(format!("{package} (version unknown)")),
    }
}

/// A started observer; `stop` ends it by its pid and returns what it saw.
pub struct Running {
    config: Config,
    child: Option<Child>,
    dir: PathBuf,
    api: Option<SocketAddr>,
    before: Counters,
    cpu_before: Option<u64>,
    programs_before: Option<ProgramStats>,
    audit_enabled_before: Option<String>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    execs: u64,
    flows: u64,
    lost: u64,
    audit_lost: u64,
}

/// How long an observer may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long driftwatch's pipeline and auditd's log writer may take to catch up after a storm.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(120);

/// The bpftrace script: a counter per process tracepoint that driftwatch attaches to and one on
/// the TCP state tracepoint, which driftwatch uses where the kernel refuses `sock_ops`. Nothing is
/// sent to user space until the end.
const BPFTRACE_SCRIPT: &str = r#"
tracepoint:sched:sched_process_exec { @exec = count(); }
tracepoint:sched:sched_process_fork { @fork = count(); }
tracepoint:sched:sched_process_exit { @exit = count(); }
tracepoint:syscalls:sys_enter_execve { @execve = count(); }
tracepoint:syscalls:sys_enter_execveat { @execveat = count(); }
tracepoint:syscalls:sys_enter_exit_group { @exit_group = count(); }
tracepoint:sock:inet_sock_set_state {
  @tcp_state = count();
  if (args->oldstate == 2 && args->newstate == 1) { @connected = count(); }
}
"#;

/// Marks the audit rules this benchmark adds, so its records are counted and its rules removed.
const AUDIT_KEY: &str = "driftwatch-bench";

impl Running {
    /// Starts `config` and waits until it observes.
    pub fn start(config: Config, setup: &Setup) -> anyhow::Result<Running> {
        let dir = setup.workdir.join(format!("{config:?}").to_lowercase());
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("failed to clear {}", dir.display()))?;
        }
        fs::create_dir_all(&dir)?;
        let mut running = Running { config, child: None, dir, api: None, before: Counters::default(), cpu_before: None, programs_before: None, audit_enabled_before: None };
        let started = match config {
            Config::NoAgent => Ok(()),
            Config::Driftwatch => running.start_driftwatch(setup),
            Config::Auditd => running.start_auditd(),
            Config::Bpftrace => running.start_bpftrace(),
        };
        if let Err(error) = started {
            running.kill();
            return Err(error);
        }
        Ok(running)
    }

    /// Reads the counters a storm's results are taken against; call right before the storm.
    pub fn mark(&mut self) -> anyhow::Result<()> {
        self.before = self.counters()?;
        self.cpu_before = self.pid().and_then(cpu_ticks);
        self.programs_before = self.pid().and_then(program_stats);
        Ok(())
    }

    /// Waits until the observer has processed the storm, reads what it saw, and stops it.
    pub fn stop(mut self, storm: Storm) -> anyhow::Result<Observed> {
        let result = self.collect(storm);
        let stopped = self.shutdown();
        let observed = result?;
        stopped?;
        Ok(observed)
    }

    fn collect(&mut self, storm: Storm) -> anyhow::Result<Observed> {
        let mut observed = Observed::default();
        let Some(pid) = self.pid() else {
            return Ok(observed);
        };
        match self.config {
            Config::Driftwatch => {
                self.wait_for_pipeline()?;
                let after = self.counters()?;
                observed.seen = Some(match storm {
                    Storm::Exec => after.execs - self.before.execs,
                    Storm::Connect => after.flows - self.before.flows,
                });
                observed.lost = Some(after.lost - self.before.lost);
            }
            Config::Auditd => {
                self.wait_for_audit_log()?;
                let after = self.counters()?;
                observed.seen = Some(count_audit_records(&self.dir.join("audit.log"), storm)?);
                observed.lost = Some(after.audit_lost.saturating_sub(self.before.audit_lost));
            }
            Config::NoAgent | Config::Bpftrace => {}
        }
        observed.cpu_ms = cpu_ticks(pid).zip(self.cpu_before).map(|(after, before)| ticks_to_ms(after - before));
        observed.programs = program_stats(pid).zip(self.programs_before).map(|(after, before)| ProgramStats {
            run_time_ns: after.run_time_ns.saturating_sub(before.run_time_ns),
            runs: after.runs.saturating_sub(before.runs),
        });
        observed.peak_rss_kib = memory_kib(pid, "VmHWM");
        observed.rss_kib = memory_kib(pid, "VmRSS");
        if self.config == Config::Bpftrace {
            // bpftrace prints its counters when it exits on SIGINT.
            let counts = self.stop_bpftrace()?;
            let key = match storm {
                Storm::Exec => "@exec",
                Storm::Connect => "@connected",
            };
            observed.seen = Some(counts.iter().find(|(name, _)| name == key).map_or(0, |(_, value)| *value));
            observed.lost = Some(0);
        }
        Ok(observed)
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn start_driftwatch(&mut self, setup: &Setup) -> anyhow::Result<()> {
        let ready = self.dir.join("ready");
        let log = File::create(self.dir.join("agent.log"))?;
        // Not scoped: like a real deployment, the agent observes every process on the host.
        let child = Command::new(&setup.agent)
            .arg("agent")
            .arg("--model")
            .arg(&setup.model)
            .args(["--api", "127.0.0.1:0", "--ready-file"])
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("failed to start {}", setup.agent.display()))?;
        self.child = Some(child);
        let address = self.wait_for_start(|| fs::read_to_string(&ready).ok().filter(|text| text.ends_with('\n')))?;
        self.api = Some(address.trim().parse().with_context(|| format!("the ready file holds {address:?}"))?);
        Ok(())
    }

    fn start_auditd(&mut self) -> anyhow::Result<()> {
        self.audit_enabled_before = audit_status()?.get("enabled").cloned();
        let conf = format!(
            "log_file = {log}\nlog_format = RAW\nlog_group = root\nflush = INCREMENTAL_ASYNC\nfreq = 50\n\
             max_log_file = 0\nmax_log_file_action = IGNORE\nnum_logs = 0\nspace_left = 2\nspace_left_action = IGNORE\n\
             admin_space_left = 1\nadmin_space_left_action = IGNORE\ndisk_full_action = IGNORE\ndisk_error_action = IGNORE\n\
             write_logs = yes\nname_format = NONE\nplugin_dir = {plugins}\n",
            log = self.dir.join("audit.log").display(),
            plugins = self.dir.join("plugins").display(),
        );
        fs::create_dir_all(self.dir.join("plugins"))?;
        let conf_path = self.dir.join("auditd.conf");
        fs::write(&conf_path, conf)?;
        let log = File::create(self.dir.join("auditd.out"))?;
        let child = Command::new(crate::prereq::find_in_path("auditd").context("auditd is not installed")?)
            .arg("-n")
            .arg("-c")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("failed to start auditd")?;
        let pid = child.id().to_string();
        self.child = Some(child);
        self.wait_for_start(|| audit_status().ok().filter(|status| status.get("pid") == Some(&pid)).map(|_| String::new()))?;
        auditctl(&["-b", "8192"])?;
        for syscalls in ["execve,execveat", "connect,accept,accept4"] {
            auditctl(&["-a", "always,exit", "-F", "arch=b64", "-S", syscalls, "-k", AUDIT_KEY])?;
        }
        Ok(())
    }

    fn start_bpftrace(&mut self) -> anyhow::Result<()> {
        let script = self.dir.join("count.bt");
        fs::write(&script, BPFTRACE_SCRIPT)?;
        let out = self.dir.join("bpftrace.out");
        let log = File::create(&out)?;
        let child = Command::new(crate::prereq::find_in_path("bpftrace").context("bpftrace is not installed")?)
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("failed to start bpftrace")?;
        self.child = Some(child);
        // bpftrace prints the line before it attaches; the probes count from the moment each attaches.
        self.wait_for_start(|| fs::read_to_string(&out).ok().filter(|text| text.contains("Attaching")))?;
        std::thread::sleep(Duration::from_secs(1));
        Ok(())
    }

    /// Polls `ready` until it returns Some, failing when the observer exits or the time is up.
    fn wait_for_start(&mut self, mut ready: impl FnMut() -> Option<String>) -> anyhow::Result<String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            check_interrupted()?;
            if let Some(value) = ready() {
                return Ok(value);
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!("{} exited with {status} before it was ready; its output is in {}", self.config.name(), self.dir.display());
                }
            }
            if Instant::now() >= deadline {
                bail!("{} was not ready within {START_TIMEOUT:?}; its output is in {}", self.config.name(), self.dir.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn counters(&self) -> anyhow::Result<Counters> {
        match self.config {
            Config::Driftwatch => {
                let api = self.api.context("driftwatch has no API address")?;
                let status = stream::status(api)?;
                let value = |name: &str| status.counters.iter().find(|counter| counter.name == name).map_or(0, |counter| counter.value);
                let kernel: u64 = status
                    .counters
                    .iter()
                    .filter(|counter| counter.name.starts_with("kernel_drops_") && !counter.name.contains("_cpu"))
                    .map(|counter| counter.value)
                    .sum();
                Ok(Counters {
                    execs: value("pipeline_execs"),
                    // Connections the kernel folded reach the graph as counts.
                    flows: value("pipeline_flows") + value("folds_connections"),
                    lost: kernel + value("telemetry_channel_drops"),
                    audit_lost: 0,
                })
            }
            Config::Auditd => {
                let status = audit_status()?;
                Ok(Counters { audit_lost: status.get("lost").and_then(|value| value.parse().ok()).unwrap_or(0), ..Counters::default() })
            }
            Config::NoAgent | Config::Bpftrace => Ok(Counters::default()),
        }
    }

    /// Waits until the pipeline has handled every event the ring buffer reader had passed on a
    /// second after the storm. Other work on the host keeps producing events, so "no more
    /// events" never comes; the pipeline's counters are refreshed once a second.
    fn wait_for_pipeline(&self) -> anyhow::Result<()> {
        let api = self.api.context("driftwatch has no API address")?;
        let value = |status: &driftwatch_proto::v1::AgentStatus, name: &str| {
            status.counters.iter().find(|counter| counter.name == name).map_or(0, |counter| counter.value)
        };
        std::thread::sleep(Duration::from_secs(1));
        let sent = value(&stream::status(api)?, "telemetry_events_sent");
        let deadline = Instant::now() + CATCH_UP_TIMEOUT;
        loop {
            std::thread::sleep(Duration::from_millis(1_100));
            check_interrupted()?;
            let handled = value(&stream::status(api)?, "pipeline_events");
            if handled >= sent {
                // Folded connections are read from the kernel once a second, and the pipeline
                // applies them after its join and accept windows.
                std::thread::sleep(Duration::from_millis(2_500));
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("driftwatch's pipeline handled {handled} events in {CATCH_UP_TIMEOUT:?}, fewer than the {sent} it was sent");
            }
        }
    }

    /// Waits until the kernel's audit backlog has been empty for two readings in a row, then
    /// gives auditd a moment to write what it last received. The log never stops growing while
    /// other work on the host runs, so its size cannot be the signal.
    fn wait_for_audit_log(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + CATCH_UP_TIMEOUT;
        let mut empty_readings = 0;
        while empty_readings < 2 {
            std::thread::sleep(Duration::from_millis(250));
            check_interrupted()?;
            let backlog: u64 = audit_status()?.get("backlog").and_then(|value| value.parse().ok()).unwrap_or(0);
            empty_readings = if backlog == 0 { empty_readings + 1 } else { 0 };
            if Instant::now() >= deadline {
                bail!("the kernel's audit backlog did not drain within {CATCH_UP_TIMEOUT:?}");
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }

    /// Sends SIGINT to bpftrace, waits for it to exit and returns the counters it printed.
    fn stop_bpftrace(&mut self) -> anyhow::Result<Vec<(String, u64)>> {
        let Some(mut child) = self.child.take() else {
            return Ok(Vec::new());
        };
        signal(child.id(), libc::SIGINT);
        let status = wait_with_timeout(&mut child, Duration::from_secs(30))?;
        let output = fs::read_to_string(self.dir.join("bpftrace.out"))?;
        if !status.success() {
            bail!("bpftrace exited with {status}:\n{output}");
        }
        Ok(output
            .lines()
            .filter_map(|line| {
                let (name, value) = line.split_once(": ")?;
                Some((name.trim().to_string(), value.trim().parse().ok()?))
            })
            .collect())
    }

    fn shutdown(&mut self) -> anyhow::Result<()> {
        if self.config == Config::Auditd {
            let removed = auditctl(&["-D", "-k", AUDIT_KEY]);
            self.terminate();
            if let Some(enabled) = self.audit_enabled_before.take() {
                auditctl(&["-e", &enabled])?;
            }
            return removed;
        }
        self.terminate();
        Ok(())
    }

    /// SIGTERM to the observer's pid, SIGKILL after ten seconds.
    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGTERM);
            if wait_with_timeout(&mut child, Duration::from_secs(10)).is_err() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    fn kill(&mut self) {
        if self.config == Config::Auditd {
            let _ = auditctl(&["-D", "-k", AUDIT_KEY]);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(enabled) = self.audit_enabled_before.take() {
            let _ = auditctl(&["-e", &enabled]);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            bail!("pid {} did not exit within {timeout:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn auditctl(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("auditctl").args(args).output().context("failed to run auditctl")?;
    if !output.status.success() {
        bail!("auditctl {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

/// `auditctl -s` as name/value pairs (enabled, pid, lost, backlog, ...).
fn audit_status() -> anyhow::Result<std::collections::HashMap<String, String>> {
    let output = Command::new("auditctl").arg("-s").output().context("failed to run auditctl -s")?;
    if !output.status.success() {
        bail!("auditctl -s failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(' ')?;
            Some((name.to_string(), value.trim().to_string()))
        })
        .collect())
}

/// Counts the SYSCALL records of this benchmark's rules for the storm's syscall: execve and
/// execveat for the exec storm, connect for the connect storm (x86_64 syscall numbers).
fn count_audit_records(log: &Path, storm: Storm) -> anyhow::Result<u64> {
    let text = fs::read_to_string(log).with_context(|| format!("failed to read {}", log.display()))?;
    let syscalls: &[&str] = match storm {
        Storm::Exec => &["syscall=59 ", "syscall=322 "],
        Storm::Connect => &["syscall=42 "],
    };
    let key = format!("key=\"{AUDIT_KEY}\"");
    Ok(text
        .lines()
        .filter(|line| line.starts_with("type=SYSCALL") && line.contains(&key) && syscalls.iter().any(|syscall| line.contains(syscall)))
        .count() as u64)
}

/// utime + stime of `pid` in clock ticks, from /proc/PID/stat.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses, so fields are counted after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the name, field 1 is the state; utime and stime are fields 12 and 13 from there.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

pub fn ticks_to_ms(ticks: u64) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 * 1000.0 / per_second
}

/// Sums the run time and run count of the eBPF programs that process `pid` has open, from the
/// `run_time_ns` and `run_cnt` lines of their descriptors' fdinfo. The kernel counts them only
/// while `kernel.bpf_stats_enabled` is 1. Returns None when the process has no program open.
pub fn program_stats(pid: u32) -> Option<ProgramStats> {
    let entries = fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()?;
    // A program open on several descriptors counts once.
    let mut programs = std::collections::BTreeMap::new();
    for entry in entries.flatten() {
        let Ok(text) = fs::read_to_string(entry.path()) else { continue };
        if let Some((id, stats)) = parse_program_fdinfo(&text) {
            programs.insert(id, stats);
        }
    }
    if programs.is_empty() {
        return None;
    }
    Some(programs.values().fold(ProgramStats::default(), |sum, program| ProgramStats {
        run_time_ns: sum.run_time_ns + program.run_time_ns,
        runs: sum.runs + program.runs,
    }))
}

/// Returns the program id and statistics in the fdinfo text of a descriptor, or None when the
/// descriptor is not an eBPF program.
fn parse_program_fdinfo(text: &str) -> Option<(u64, ProgramStats)> {
    let field = |name: &str| {
        text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':')?.trim().parse::<u64>().ok())
    };
    Some((field("prog_id")?, ProgramStats { run_time_ns: field("run_time_ns")?, runs: field("run_cnt")? }))
}

/// Reads a `kB` field such as VmRSS or VmHWM from /proc/PID/status.
pub fn memory_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| line.strip_prefix(field)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_count_takes_only_benchmark_syscalls() {
        let dir = std::env::temp_dir().join(format!("driftwatch-bench-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("audit.log");
        let key = format!("key=\"{AUDIT_KEY}\"");
        let lines = [
            format!("type=SYSCALL msg=audit(1.0:1): arch=c000003e syscall=59 success=yes exit=0 {key}"),
            format!("type=SYSCALL msg=audit(1.0:2): arch=c000003e syscall=322 success=yes exit=0 {key}"),
            format!("type=SYSCALL msg=audit(1.0:3): arch=c000003e syscall=42 success=yes exit=0 {key}"),
            "type=SYSCALL msg=audit(1.0:4): arch=c000003e syscall=59 success=yes exit=0 key=\"other\"".to_string(),
            format!("type=EXECVE msg=audit(1.0:1): argc=1 a0=\"true\" syscall=59 {key}"),
        ];
        std::fs::write(&log, lines.join("\n")).unwrap();

        let execs = count_audit_records(&log, Storm::Exec).unwrap();
        let connects = count_audit_records(&log, Storm::Connect).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();

        assert_eq!(execs, 2);
        assert_eq!(connects, 1);
    }

    #[test]
    fn program_fdinfo_gives_id_and_statistics() {
        let program = "pos:\t0\nflags:\t02000002\nprog_type:\t13\nprog_tag:\t0123456789abcdef\nprog_id:\t57\nrun_time_ns:\t2763000\nrun_cnt:\t340000\n";
        assert_eq!(parse_program_fdinfo(program), Some((57, ProgramStats { run_time_ns: 2_763_000, runs: 340_000 })));
        let map = "pos:\t0\nflags:\t02000002\nmap_type:\t1\nmap_id:\t12\n";
        assert_eq!(parse_program_fdinfo(map), None);
    }

    #[test]
    fn cpu_ticks_of_own_process_are_read() {
        let ticks = cpu_ticks(std::process::id());
        assert!(ticks.is_some(), "/proc/self/stat could not be parsed");
    }
}
