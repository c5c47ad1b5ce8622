//! `driftwatch agent`: the daemon. Loads the kernel programs, runs the pipeline and serves the API.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use driftwatch_model::Engine;
use driftwatch_model::Model;
use tokio_util::sync::CancellationToken;

use crate::api::hub::{DeviationHub, HubConfig};
use crate::api::server::{self, ApiListener};
use crate::api::ListenAddr;
use crate::pipeline::{CgroupResolver, Pipeline, PipelineConfig, Shared};
use crate::reload::{self, ModelReloader, ReloadTrigger};
use crate::telemetry::{self, CgroupPaths, Telemetry, TelemetryConfig};
use crate::view::{self, AgentStatusView};

/// How long the agent waits for its tasks to finish after a stop signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests waiting for the pipeline task; reloads are serialised, so one is enough in practice.
const PIPELINE_COMMANDS: usize = 4;

#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// The declared threat model (YAML).
    #[arg(long)]
    pub model: PathBuf,

    /// Address of the gRPC API: `unix:/path/to.sock`, or a loopback `IP:PORT` (port 0 picks a free
    /// one).
    #[arg(long, default_value = "unix:/run/driftwatch/api.sock")]
    pub api: ListenAddr,

    /// Observe only processes inside this cgroup v2 directory (an absolute path under the cgroup2
    /// mount, or a path relative to the mount such as `/system.slice/nginx.service`).
    #[arg(long)]
    pub scope_cgroup: Option<PathBuf>,

    /// Write the API address to this file once the hooks are attached and the API serves.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,

    /// Size of the kernel ring buffer in KiB: a power of two, at least one page.
    #[arg(long, default_value_t = 8192)]
    pub ring_buffer_kib: u32,

    /// Deviations kept for replay to new subscribers.
    #[arg(long, default_value_t = 4096)]
    pub history: usize,

    /// Do not reload the model when its file changes; SIGHUP and `driftwatch model reload` still
    /// reload it.
    #[arg(long)]
    pub no_model_watch: bool,
}

pub async fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let (model, model_text) = match Model::load_with_text(&args.model) {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("error: the model {} is invalid; the agent did not start", args.model.display());
            return Ok(ExitCode::from(2));
        }
    };
    let model_info = view::model_info(&args.model, &model, SystemTime::now());
    tracing::info!(model = %args.model.display(), components = model.components.len(), flows = model.flows.len(), "model loaded");
    for warning in model.warnings(SystemTime::now()) {
        tracing::warn!(%warning, hint = %warning.hint, "model warning");
    }

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "driftwatch agent must run as root: loading eBPF programs needs CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN (try: sudo driftwatch agent ...)"
        );
    }
    let scope_cgroup = args.scope_cgroup.as_deref().map(resolve_scope).transpose()?;

    // Kernel side first: nothing else is worth starting if the programs do not load.
    let config = TelemetryConfig {
        scope_cgroup: scope_cgroup.clone(),
        ring_buffer_bytes: args.ring_buffer_kib.checked_mul(1024).context("--ring-buffer-kib is too large")?,
        channel_capacity: 65_536,
    };
    let (telemetry, events) = Telemetry::start(config).context("failed to start kernel telemetry")?;
    let telemetry = Arc::new(telemetry);

    let (commands, command_receiver) = tokio::sync::mpsc::channel(PIPELINE_COMMANDS);
    let reloader = Arc::new(ModelReloader::new(args.model.clone(), &model, &model_text, commands));
    let shared = Arc::new(Shared { engine: Mutex::new(Engine::new(model)), stats: Mutex::new(Default::default()) });
    let hub = Arc::new(DeviationHub::new(HubConfig { history_capacity: args.history, ..HubConfig::default() }));
    let cancel = CancellationToken::new();

    let mut pipeline = Pipeline::new(PipelineConfig::default(), shared.clone(), hub.clone(), cgroup_resolver())
        .with_commands(command_receiver);
    let seeded = pipeline.seed_processes();
    tracing::info!(processes = seeded, "process table seeded from /proc");
    let lost = {
        let telemetry = telemetry.clone();
        Box::new(move || {
            let counters = telemetry.counters();
            counters.kernel_drops() + counters.channel_drops + counters.decode_errors
        })
    };
    let pipeline_task = tokio::spawn(pipeline.run(events, lost, cancel.clone()));

    let view = Arc::new(AgentStatusView::new(shared.clone(), telemetry.clone(), model_info).with_reloader(reloader.clone()));
    // Set up before the agent reports ready, so a change made right after is seen.
    let watch = if args.no_model_watch { None } else { Some(reload::watch_model_file(reloader.clone())) };
    let watch_task = match watch {
        None => None,
        Some(Ok(watch)) => Some(tokio::spawn(watch.run(cancel.clone()))),
        Some(Err(error)) => {
            // SIGHUP and the API still reload, so this is no reason to stop.
            tracing::warn!(error = %format!("{error:#}"), "model file changes are not watched; reload with SIGHUP or `driftwatch model reload`");
            None
        }
    };
    // The listener's own error names the address.
    let listener = ApiListener::bind(&args.api).await?;
    let address = listener.local_addr().context("failed to read the API address")?;
    let server_task = tokio::spawn(server::serve_on(listener, hub.clone(), view.clone(), cancel.clone()));
    tracing::info!(api = %address, "agent ready");
    if let Some(path) = &args.ready_file {
        if let Err(error) = write_ready_file(path, &address.to_string()) {
            // Stop the server first so that it removes its socket file.
            cancel.cancel();
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, server_task).await;
            return Err(error);
        }
    }

    wait_for_stop_signal(|| {
        let reloader = reloader.clone();
        // The reloader logs the outcome; an error means the agent is stopping anyway.
        tokio::spawn(async move { reloader.reload(ReloadTrigger::Signal).await });
    })
    .await?;
    tracing::info!("stopping");
    if let Some(path) = &args.ready_file {
        let _ = std::fs::remove_file(path);
    }

    cancel.cancel();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let _ = pipeline_task.await;
        let _ = server_task.await;
        if let Some(watch_task) = watch_task {
            let _ = watch_task.await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(timeout = ?DRAIN_TIMEOUT, "tasks did not stop in time");
    }
    // Dropping the telemetry detaches every program.
    drop(telemetry);
    Ok(ExitCode::SUCCESS)
}

/// Accepts a directory under the cgroup2 mount or a path relative to the mount.
fn resolve_scope(path: &Path) -> anyhow::Result<PathBuf> {
    let mount = telemetry::cgroup2_mount().context("failed to find the cgroup v2 mount for --scope-cgroup")?;
    let full = if path.starts_with(&mount) {
        path.to_path_buf()
    } else {
        mount.join(path.strip_prefix("/").unwrap_or(path))
    };
    if !full.is_dir() {
        anyhow::bail!("--scope-cgroup {}: {} is not a cgroup v2 directory", path.display(), full.display());
    }
    Ok(full)
}

fn write_ready_file(path: &Path, address: &str) -> anyhow::Result<()> {
    // Written whole under another name, then renamed, so a reader never sees half of it.
    let partial = path.with_extension("partial");
    std::fs::write(&partial, format!("{address}\n")).with_context(|| format!("failed to write {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("failed to write {}", path.display()))
}

/// Waits for SIGTERM or SIGINT, calling `on_hangup` for each SIGHUP meanwhile.
async fn wait_for_stop_signal(mut on_hangup: impl FnMut()) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("failed to install the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("failed to install the SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("failed to install the SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
            _ = hangup.recv() => on_hangup(),
        }
    }
}

/// Maps cgroup ids from kernel records to paths relative to the cgroup2 mount, such as
/// `/system.slice/nginx.service`, with a bounded cache.
fn cgroup_resolver() -> CgroupResolver {
    let mount = match telemetry::cgroup2_mount() {
        Ok(mount) => mount,
        Err(error) => {
            tracing::warn!(%error, "no cgroup v2 mount; cgroup selectors in the model match nothing");
            return Box::new(|_| String::new());
        }
    };
    let mut paths = CgroupPaths::new(mount.clone(), 4096);
    Box::new(move |id| match paths.path_by_id(id) {
        Ok(Some(path)) => {
            let relative = path.strip_prefix(&mount).unwrap_or(&path);
            format!("/{}", relative.display())
        }
        Ok(None) => String::new(),
        Err(error) => {
            tracing::debug!(%error, id, "cannot resolve a cgroup id");
            String::new()
        }
    })
}
