//! `driftwatch check`: CI mode. Runs one command in a cgroup of its own, observes exactly that
//! process tree with the kernel programs, compares what it did with the model and reports.
//!
//! The run has five phases. The kernel programs load scoped to a fresh cgroup, so nothing else on
//! the host is reported. The command starts inside that cgroup (it joins between fork and exec).
//! When it ends, whatever it left running in the cgroup is killed. Then a sentinel process enters
//! the cgroup and exits at once. The BPF ring buffer hands records out in the order they were
//! reserved, so every record of the command's tree arrives before the sentinel's exit record.
//! Last, the deviations are reported and the cgroup is removed.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use driftwatch_model::deviation::{Category, Deviation, Evidence, Severity, Stride};
use driftwatch_model::{Engine, Model};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::api::hub::{DeviationHub, HubConfig};
use crate::pipeline::{CgroupResolver, Pipeline, PipelineConfig, Shared};
use crate::state::udp_reply::EphemeralPorts;
use crate::report::{CheckReport, CommandOutcome, ModelLocations, ReportFormat};
use crate::telemetry::{self, CgroupPaths, Event, Telemetry, TelemetryConfig, TelemetryCounters};

/// Exit status when no deviation reaches `--fail-on` and the command succeeded.
pub const EXIT_CLEAN: u8 = 0;
/// Exit status when deviations at or above `--fail-on` were found.
pub const EXIT_FINDINGS: u8 = 1;
/// Exit status when the command failed (non-zero status, a signal, or it could not start).
pub const EXIT_COMMAND_FAILED: u8 = 2;
/// Exit status when driftwatch itself could not run: not root, an invalid model, no cgroup v2.
pub const EXIT_NOT_RUN: u8 = 3;

/// How long leftover processes of the command may take to die after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

const EXIT_CODES_HELP: &str = "\
Exit status:
  0  the command succeeded and no deviation reached --fail-on
  1  deviations at or above --fail-on were found
  2  the command failed: non-zero exit status, killed by a signal, or could not start. This wins
     over 1 because a broken-off run shows only part of what the command does; the report still
     lists the deviations found. clap also exits with 2 for an invalid command line.
  3  driftwatch could not run: not root, an invalid model (errors print as file:line:column), no
     cgroup v2, or the kernel programs did not load

Needs root: it loads eBPF programs and creates a cgroup under the cgroup v2 mount.";

#[derive(clap::Args, Debug)]
#[command(after_help = EXIT_CODES_HELP)]
pub struct CheckArgs {
    /// The declared threat model (YAML).
    #[arg(long)]
    pub model: PathBuf,

    /// Deviations of this severity or above fail the run (exit status 1): low, medium, elevated,
    /// high or critical.
    #[arg(long, default_value = "high", value_parser = parse_severity)]
    pub fail_on: Severity,

    /// Report format. With a format other than text and no --output, the command's stdout goes to
    /// stderr so that stdout holds only the report.
    #[arg(long, value_enum, default_value = "text")]
    pub format: ReportFormat,

    /// Write the report to this file instead of stdout.
    #[arg(long)]
    pub output: Option<PathBuf>,

    /// Also write the observed graph as JSON to this file, for `driftwatch model diff`.
    #[arg(long)]
    pub record: Option<PathBuf>,

    /// Size of the kernel ring buffer in MiB (a power of two).
    #[arg(long, default_value_t = 8)]
    pub ring_buffer_mib: u32,

    /// How long to wait, after the command ends, for its last kernel events to arrive.
    #[arg(long, default_value = "10s")]
    pub drain_timeout: humantime::Duration,

    /// The command to observe and its arguments, after `--`.
    #[arg(required = true, last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

fn parse_severity(text: &str) -> Result<Severity, String> {
    Severity::parse(text).ok_or_else(|| format!("invalid severity {text:?}: expected low, medium, elevated, high or critical"))
}

/// Runs the check and returns the exit status documented in [`EXIT_CODES_HELP`].
pub async fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let model_text = match fs::read_to_string(&args.model) {
        Ok(text) => text,
        Err(error) => {
            eprintln!("error: failed to read the model {}: {error}", args.model.display());
            return Ok(ExitCode::from(EXIT_NOT_RUN));
        }
    };
    let model = match Model::parse(&model_text, &args.model.display().to_string()) {
        Ok(model) => model,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("error: the model {} is invalid ({} errors); the command did not run", args.model.display(), errors.len());
            return Ok(ExitCode::from(EXIT_NOT_RUN));
        }
    };
    let locations = ModelLocations::new(&model, &model_text);

    let observed = match observe(&args, model).await {
        Ok(observed) => observed,
        Err(error) => {
            eprintln!("error: {}", crate::errors::chain_text(error.as_ref()));
            return Ok(ExitCode::from(EXIT_NOT_RUN));
        }
    };

    let command = args.command.iter().map(|word| word.to_string_lossy().into_owned()).collect();
    let report = CheckReport::new(
        args.model.display().to_string(),
        command,
        observed.outcome,
        observed.deviations,
        args.fail_on,
        locations,
    );
    if let Err(error) = write_outputs(&args, &report, &observed.graph_json) {
        eprintln!("error: {}", crate::errors::chain_text(error.as_ref()));
        return Ok(ExitCode::from(EXIT_NOT_RUN));
    }
    Ok(ExitCode::from(exit_status(&report)))
}

/// Maps a report onto the exit status. A failed command takes precedence over findings.
pub fn exit_status(report: &CheckReport) -> u8 {
    match report.verdict() {
        crate::report::Verdict::Pass => EXIT_CLEAN,
        crate::report::Verdict::Findings => EXIT_FINDINGS,
        crate::report::Verdict::CommandFailed => EXIT_COMMAND_FAILED,
    }
}

fn write_outputs(args: &CheckArgs, report: &CheckReport, graph_json: &str) -> anyhow::Result<()> {
    if let Some(path) = &args.record {
        fs::write(path, graph_json).with_context(|| format!("failed to write the observed graph to {}", path.display()))?;
    }
    match &args.output {
        Some(path) => {
            let text = report.render(args.format, false);
            fs::write(path, text).with_context(|| format!("failed to write the report to {}", path.display()))?;
            // The summary still reaches the CI log when the report goes to a file.
            println!("{}", report.summary_line());
        }
        None => {
            let colour = args.format == ReportFormat::Text && std::io::stdout().is_terminal();
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(report.render(args.format, colour).as_bytes()).context("failed to write the report")?;
            stdout.flush().context("failed to write the report")?;
        }
    }
    Ok(())
}

/// The outcome, the deviations and the graph of one observed run.
struct Observed {
    outcome: CommandOutcome,
    deviations: Vec<Deviation>,
    graph_json: String,
}

async fn observe(args: &CheckArgs, model: Model) -> anyhow::Result<Observed> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "driftwatch check must run as root: loading eBPF programs needs CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN, and the command's cgroup is created under the cgroup v2 mount (try: sudo driftwatch check ...)"
        );
    }
    let cgroup = CommandCgroup::create()?;

    let config = TelemetryConfig {
        scope_cgroup: Some(cgroup.path.clone()),
        ring_buffer_bytes: args.ring_buffer_mib.checked_mul(1024 * 1024).context("--ring-buffer-mib is too large")?,
        channel_capacity: 65_536,
        ..TelemetryConfig::default()
    };
    let (telemetry, events) = Telemetry::start(config).context("failed to start kernel telemetry")?;

    let shared = Arc::new(Shared { engine: Mutex::new(Engine::new(model)), stats: Mutex::new(Default::default()) });
    // No client subscribes to the hub in CI mode, because the report reads the engine's table.
    let hub = Arc::new(DeviationHub::new(HubConfig::default()));
    let pipeline_config =
        PipelineConfig { ephemeral_ports: EphemeralPorts::read_or_default(), ..PipelineConfig::default() };
    let mut pipeline = Pipeline::new(pipeline_config, shared.clone(), hub, cgroup.resolver()?);
    if telemetry.tcp_from_sock_ops() {
        pipeline.track_folds();
    }
    if telemetry.reports_acceptors() {
        pipeline.await_acceptors();
    }
    let (sentinel_sender, sentinel_receiver) = oneshot::channel();
    let cancel = CancellationToken::new();
    let consumer = tokio::spawn(consume(pipeline, events, sentinel_receiver, cancel.clone()));

    let outcome = run_command(args, &cgroup).await?;
    tracing::info!(outcome = %outcome, "command ended");

    let leftovers = cgroup.kill_all()?;
    if !leftovers.is_empty() {
        tracing::info!(pids = ?leftovers, "killed processes the command left running in its cgroup");
    }

    let drain_timeout: Duration = args.drain_timeout.into();
    let sentinel = cgroup.run_sentinel(sentinel_sender)?;
    let drained = match tokio::time::timeout(drain_timeout, consumer).await {
        Ok(joined) => joined.context("the event consumer task failed")?,
        Err(_) => {
            cancel.cancel();
            tracing::warn!(timeout = ?drain_timeout, sentinel, "the sentinel's exit record did not arrive in time");
            Drained { pipeline: None, complete: false }
        }
    };
    if let Some(mut pipeline) = drained.pipeline {
        pipeline.finish();
    }

    let counters = telemetry.counters();
    drop(telemetry);
    cgroup.remove()?;

    let engine = shared.engine.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut deviations = engine.deviations();
    if let Some(gap) = telemetry_gap(&counters, drained.complete, drain_timeout) {
        deviations.push(gap);
    }
    Ok(Observed { outcome, deviations, graph_json: engine.graph_snapshot().to_json() })
}

/// The consumer task's result: the pipeline, unless the task was cancelled, and whether the
/// sentinel's record arrived.
struct Drained {
    pipeline: Option<Pipeline>,
    complete: bool,
}

/// Feeds kernel events to the pipeline until the sentinel process's exit record arrives.
///
/// The sentinel's pid comes through `sentinel` before the sentinel can exit, and the branch that
/// reads it is polled first, so its exit record is never mistaken for an ordinary event.
async fn consume(
    mut pipeline: Pipeline,
    mut events: mpsc::Receiver<Event>,
    mut sentinel: oneshot::Receiver<u32>,
    cancel: CancellationToken,
) -> Drained {
    let mut sentinel_pid: Option<u32> = None;
    loop {
        let join_deadline = pipeline.next_join_deadline();
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Drained { pipeline: None, complete: false },
            pid = &mut sentinel, if sentinel_pid.is_none() => match pid {
                Ok(pid) => sentinel_pid = Some(pid),
                Err(_) => return Drained { pipeline: Some(pipeline), complete: false },
            },
            event = events.recv() => match event {
                Some(Event::Exit(exit)) if Some(exit.pid) == sentinel_pid => {
                    return Drained { pipeline: Some(pipeline), complete: true };
                }
                Some(event) => pipeline.handle(event),
                None => {
                    tracing::error!("the kernel event channel closed before the sentinel's exit record arrived");
                    return Drained { pipeline: Some(pipeline), complete: false };
                }
            },
            _ = sleep_until(join_deadline) => pipeline.flush_joins(Instant::now()),
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// Builds a telemetry-gap deviation when records were lost or the stream did not drain.
fn telemetry_gap(counters: &TelemetryCounters, complete: bool, drain_timeout: Duration) -> Option<Deviation> {
    let lost = counters.kernel_drops() + counters.channel_drops + counters.decode_errors;
    if lost == 0 && complete {
        return None;
    }
    let mut reasons = Vec::new();
    if lost > 0 {
        reasons.push(format!(
            "{lost} kernel records were lost ({} in the kernel, {} with the event channel full, {} undecodable)",
            counters.kernel_drops(),
            counters.channel_drops,
            counters.decode_errors
        ));
    }
    if !complete {
        reasons.push(format!("the last kernel events did not arrive within {}", humantime::format_duration(drain_timeout)));
    }
    let now = SystemTime::now();
    Some(Deviation {
        id: format!("{}@driftwatch@kernel", Category::TelemetryGap.as_str()),
        category: Category::TelemetryGap,
        severity: Severity::Elevated,
        stride: Stride::Repudiation,
        summary: format!("{}; deviations of this run may be missing", reasons.join(" and ")),
        source: "driftwatch".to_string(),
        destination: "kernel".to_string(),
        protocol: None,
        port: None,
        evidence: Evidence {
            process: None,
            peer_process: None,
            local_addr: None,
            remote_addr: None,
            source_zone: None,
            destination_zone: None,
            netns: 0,
            remote_name: None,
        },
        first_seen: now,
        last_seen: now,
        count: lost.max(1),
        resolution: "Raise --ring-buffer-mib or --drain-timeout and run the check again.".to_string(),
    })
}

/// Starts the command inside `cgroup` and waits for it to end. Ctrl-C or SIGTERM kills the
/// command's cgroup and ends the run as a failed command.
async fn run_command(args: &CheckArgs, cgroup: &CommandCgroup) -> anyhow::Result<CommandOutcome> {
    use tokio::signal::unix::{signal, SignalKind};

    let (program, arguments) = args.command.split_first().context("no command given after --")?;
    let mut command = tokio::process::Command::new(program);
    command.args(arguments);
    if args.format != ReportFormat::Text && args.output.is_none() {
        // SAFETY: dup returns a new descriptor that the OwnedFd then owns alone.
        let stderr = unsafe { libc::dup(libc::STDERR_FILENO) };
        if stderr >= 0 {
            // SAFETY: `stderr` is a fresh descriptor from dup, owned by nothing else.
            command.stdout(File::from(unsafe { OwnedFd::from_raw_fd(stderr) }));
        }
    }
    // Opened before fork because the child may only make async-signal-safe calls; std opens it
    // with O_CLOEXEC, so the command never inherits it.
    let procs = cgroup.procs_file()?;
    // SAFETY: the closure runs in the forked child, where only async-signal-safe calls are allowed.
    // It calls write(2) on a descriptor opened before the fork and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            // "0" moves the writing process itself.
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }

    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => return Ok(CommandOutcome::NotStarted(format!("{}: {error}", program.to_string_lossy()))),
    };
    let mut terminate = signal(SignalKind::terminate()).context("failed to install the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("failed to install the SIGINT handler")?;
    let status = tokio::select! {
        status = child.wait() => status.context("failed to wait for the command")?,
        _ = terminate.recv() => return stop_on_signal(cgroup, &mut child, libc::SIGTERM).await,
        _ = interrupt.recv() => return stop_on_signal(cgroup, &mut child, libc::SIGINT).await,
    };
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => CommandOutcome::Exited(code),
        (None, Some(signal)) => CommandOutcome::Signaled(signal),
        (None, None) => CommandOutcome::Exited(-1),
    })
}

async fn stop_on_signal(cgroup: &CommandCgroup, child: &mut tokio::process::Child, signal: i32) -> anyhow::Result<CommandOutcome> {
    tracing::warn!(signal, "stopped by a signal; killing the command");
    cgroup.kill_all()?;
    let _ = child.wait().await;
    Ok(CommandOutcome::Signaled(signal))
}

/// The cgroup the command runs in, below the cgroup v2 mount. Dropping it kills what is left in it
/// and removes it, so an early error leaves nothing behind.
struct CommandCgroup {
    mount: PathBuf,
    path: PathBuf,
    removed: bool,
}

impl CommandCgroup {
    fn create() -> anyhow::Result<CommandCgroup> {
        let mount = telemetry::cgroup2_mount().context("failed to find the cgroup v2 mount")?;
        let path = mount.join(format!("driftwatch-check-{}", std::process::id()));
        fs::create_dir(&path).with_context(|| format!("failed to create the cgroup {}", path.display()))?;
        tracing::debug!(cgroup = %path.display(), "created the command's cgroup");
        Ok(CommandCgroup { mount, path, removed: false })
    }

    fn procs_file(&self) -> anyhow::Result<File> {
        let procs = self.path.join("cgroup.procs");
        OpenOptions::new().write(true).open(&procs).with_context(|| format!("failed to open {}", procs.display()))
    }

    /// Maps cgroup ids from kernel records to paths relative to the mount, such as
    /// `/driftwatch-check-4242`. Every reported process is in this cgroup or below it, so the
    /// lookup walks only this subtree.
    fn resolver(&self) -> anyhow::Result<CgroupResolver> {
        let own_id = telemetry::cgroup_id(&self.path).context("failed to read the id of the command's cgroup")?;
        let relative = |path: &Path, mount: &Path| format!("/{}", path.strip_prefix(mount).unwrap_or(path).display());
        let own_path = relative(&self.path, &self.mount);
        let mount = self.mount.clone();
        let mut paths = CgroupPaths::new(self.path.clone(), 1024);
        Ok(Box::new(move |id| {
            if id == own_id {
                return own_path.clone();
            }
            match paths.path_by_id(id) {
                Ok(Some(path)) => relative(&path, &mount),
                Ok(None) => String::new(),
                Err(error) => {
                    tracing::debug!(%error, id, "cannot resolve a cgroup id");
                    String::new()
                }
            }
        }))
    }

    /// Returns the pids in this cgroup and below it.
    fn pids(&self) -> anyhow::Result<Vec<u32>> {
        let mut pids = Vec::new();
        collect_pids(&self.path, &mut pids)?;
        Ok(pids)
    }

    /// Sends SIGKILL to every process left in this cgroup, which only the command and its
    /// descendants can have entered, waits until it is empty and returns the pids killed.
    fn kill_all(&self) -> anyhow::Result<Vec<u32>> {
        let killed = self.pids()?;
        if killed.is_empty() {
            return Ok(killed);
        }
        // cgroup.kill (Linux 5.14+) also catches processes forked while we signal.
        if fs::write(self.path.join("cgroup.kill"), "1").is_err() {
            for &pid in &killed {
                // SAFETY: kill has no memory-safety preconditions; a pid that already exited gives ESRCH.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + KILL_TIMEOUT;
        let mut delay = Duration::from_millis(2);
        loop {
            let left = self.pids()?;
            if left.is_empty() {
                return Ok(killed);
            }
            if Instant::now() >= deadline {
                anyhow::bail!("processes {left:?} are still in the cgroup {} {KILL_TIMEOUT:?} after SIGKILL", self.path.display());
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    /// Forks a sentinel that joins this cgroup and exits without exec, and returns its pid.
    ///
    /// The pid goes to `notify` before the sentinel joins the cgroup: the sentinel blocks on a pipe
    /// until then, so the consumer always knows the pid before the exit record can arrive.
    fn run_sentinel(&self, notify: oneshot::Sender<u32>) -> anyhow::Result<u32> {
        let procs = self.procs_file()?;
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error()).context("failed to create the sentinel's pipe");
        }
        // SAFETY: both descriptors are fresh from pipe2 and owned by nothing else.
        let (release_read, release_write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

        // SAFETY: the child makes only async-signal-safe calls (read, write, _exit) on descriptors
        // opened before the fork, and allocates nothing.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("failed to fork the sentinel");
        }
        if pid == 0 {
            unsafe {
                let mut byte = 0u8;
                libc::read(release_read.as_raw_fd(), (&mut byte as *mut u8).cast(), 1);
                let joined = libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) == 1;
                libc::_exit(if joined { 0 } else { 1 });
            }
        }
        drop(release_read);
        let pid = pid as u32;
        let _ = notify.send(pid);
        // SAFETY: writes one byte from a live buffer to a descriptor this process owns.
        unsafe { libc::write(release_write.as_raw_fd(), b"1".as_ptr().cast(), 1) };
        let mut status = 0;
        // SAFETY: waits for the child forked above; status is a live integer.
        unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            anyhow::bail!("the sentinel process failed to join the cgroup {}", self.path.display());
        }
        Ok(pid)
    }

    fn remove(mut self) -> anyhow::Result<()> {
        self.removed = true;
        self.kill_all()?;
        remove_tree(&self.path)
    }
}

impl Drop for CommandCgroup {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        if let Err(error) = self.kill_all() {
            tracing::error!(error = %format!("{error:#}"), "cannot empty the command's cgroup");
            return;
        }
        if let Err(error) = remove_tree(&self.path) {
            tracing::error!(error = %format!("{error:#}"), "cannot remove the command's cgroup");
        }
    }
}

fn collect_pids(dir: &Path, pids: &mut Vec<u32>) -> anyhow::Result<()> {
    let procs = match fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(procs) => procs,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error).with_context(|| format!("failed to read {}/cgroup.procs", dir.display())),
    };
    pids.extend(procs.lines().filter_map(|line| line.trim().parse::<u32>().ok()));
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error).with_context(|| format!("failed to list {}", dir.display())),
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            collect_pids(&entry.path(), pids)?;
        }
    }
    Ok(())
}

/// Removes a cgroup and the cgroups the command created below it, deepest first, because rmdir
/// fails on a cgroup that still has children.
fn remove_tree(dir: &Path) -> anyhow::Result<()> {
    let entries = fs::read_dir(dir).with_context(|| format!("failed to list {}", dir.display()))?;
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            remove_tree(&entry.path())?;
        }
    }
    fs::remove_dir(dir).with_context(|| format!("failed to remove the cgroup {}", dir.display()))
}
