//! `driftwatch agent`: the daemon. Loads the kernel programs, runs the pipeline and serves the API.

use std::ffi::CString;
use std::net::SocketAddr;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use driftwatch_model::Engine;
use driftwatch_model::Model;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::api::hub::{DeviationFilter, DeviationHub, HubConfig};
use crate::api::server::{self, ApiListener, SocketAccess, DEFAULT_SOCKET_MODE};
use crate::events::{EventHub, EventHubConfig, EventKind};
use crate::api::tls::{ClientTls, ClientTlsFiles};
use crate::api::{ListenAddr, ServerTlsArgs};
use crate::labels::{self, CriSource, DockerSource, LabelSource, LookupConfig, DEFAULT_CRI_SOCKETS};
use crate::jsonl::{self, JsonlTarget, JsonlWriter};
use crate::metrics::{self, AgentCollector, AgentMetrics, MetricsRegistry};
use crate::fleet::addr::CollectorAddr;
use crate::fleet::endpoints::{EndpointLimits, EndpointTable};
use crate::fleet::host;
use crate::fleet::push::{run_pusher, PushConfig, PushCounters, PushSource};
use crate::pipeline::{CgroupResolver, Pipeline, PipelineConfig, Shared};
use crate::state::udp_reply::EphemeralPorts;
use crate::reload::{self, ModelReloader, ReloadTrigger};
use crate::telemetry::{self, CgroupPaths, FoldSwitch, TcpHook, Telemetry, TelemetryConfig};
use crate::view::{self, AgentStatusView};
use crate::web::{self, live_view_config, LiveView, WebAddr, WebListener};

/// How long the agent waits for its tasks to finish after a stop signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests waiting for the pipeline task; reloads are serialised, so one is enough in practice.
const PIPELINE_COMMANDS: usize = 4;

#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// The declared threat model (YAML).
    #[arg(long)]
    pub model: PathBuf,

    /// Address of the gRPC API: `unix:/path/to.sock` or `IP:PORT` (port 0 picks a free one). A TCP
    /// address that is not loopback needs mutual TLS (--tls-cert, --tls-key, --tls-client-ca) or
    /// --insecure.
    #[arg(long, default_value = "unix:/run/driftwatch/api.sock")]
    pub api: ListenAddr,

    /// Mode of the API's unix socket, in octal: who may connect besides root.
    #[arg(long, value_name = "MODE", default_value = "0660", value_parser = parse_mode)]
    pub api_mode: u32,

    /// Group, by name or id, given the API's unix socket, so that its members may connect.
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    pub api_group: Option<u32>,

    #[command(flatten)]
    pub tls: ServerTlsArgs,

    /// Write every deviation and loss notice as one JSON object per line to FILE, or to stdout
    /// with `-`. A file is rotated by size (--jsonl-max-size-mib, --jsonl-keep).
    #[arg(long, value_name = "FILE|-")]
    pub jsonl: Option<PathBuf>,

    /// Size in MiB at which the --jsonl file is rotated to FILE.1.
    #[arg(long, value_name = "MIB", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub jsonl_max_size_mib: u64,

    /// Rotated --jsonl files kept (FILE.1 is the newest); 0 truncates the file in place.
    #[arg(long, value_name = "COUNT", default_value_t = 5)]
    pub jsonl_keep: u32,

    /// Serve Prometheus metrics over HTTP at http://ADDR/metrics, such as 127.0.0.1:9464 (port 0
    /// picks a free one).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,

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

    /// Source of TCP state changes. `auto` takes the cgroup sock_ops program when the kernel
    /// accepts it, else the inet_sock_set_state tracepoint, which costs more per connection.
    /// `tracepoint` always takes the tracepoint.
    #[arg(long, value_enum, default_value_t = TcpHook::Auto)]
    pub tcp_hook: TcpHook,

    /// Leave the io_uring programs unattached. They name the process of an io_uring accept, and
    /// run for every io_uring request on the host: about 40 ns each here. Without them, such a
    /// connection is charged to the listening socket's owner.
    #[arg(long)]
    pub no_io_uring_accepts: bool,

    /// Fold epoch in milliseconds. A TCP flow is a process with the server's address and port, or
    /// a local address and port with the client's address. With the sock_ops hook, a flow's first
    /// connection in each epoch is reported, and its later ones are counted in the kernel and added
    /// to the flow's edge about once a second. The kernel reads the time of its last timer tick
    /// (every 1 to 10 ms, by CONFIG_HZ) for epochs, so an epoch lasts at least one tick. 0 reports
    /// every connection (as the agent does anyway while a client streams raw TCP events).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=MAX_FOLD_WINDOW_MS))]
    pub fold_window_ms: u64,

    /// Deviations kept for replay to new subscribers. With --collector it is also the buffer of
    /// deviations the collector has not acknowledged: what overflows it while the collector is
    /// unreachable is lost, counted and reported on both sides.
    #[arg(long, default_value_t = 4096)]
    pub history: usize,

    /// Docker Engine API socket that container labels are read from. When it does not exist at
    /// start-up, Docker containers carry ids but no labels.
    #[arg(long, default_value = "/var/run/docker.sock")]
    pub docker_socket: PathBuf,

    /// CRI runtime socket (containerd, CRI-O) that Kubernetes container and pod labels are read
    /// from. Default: the first of /run/containerd/containerd.sock and /var/run/crio/crio.sock that
    /// exists.
    #[arg(long)]
    pub cri_socket: Option<PathBuf>,
    /// Name of this node in the fleet, carried by every deviation it streams. Defaults to the
    /// host name.
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,

    /// Push deviations, the graph and endpoints to the collector at this address:
    /// `unix:/path/to.sock`, `IP:PORT` or `HOST:PORT` (such as a Kubernetes Service name). Anything
    /// but a unix socket, a loopback address or `localhost` needs mutual TLS (--collector-tls-ca,
    /// --collector-tls-cert, --collector-tls-key).
    #[arg(long, value_name = "ADDR")]
    pub collector: Option<CollectorAddr>,

    /// An address of this node that the collector resolves flows from other nodes to. Repeat for
    /// several. Defaults to the addresses of the interfaces in the agent's network namespace.
    #[arg(long = "advertise-address", value_name = "IP")]
    pub advertise_addresses: Vec<IpAddr>,

    /// Seconds between the graph snapshots pushed to the collector.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
    pub snapshot_interval: f64,

    /// CA certificates the collector's certificate must chain to; turns on mutual TLS towards the
    /// collector.
    #[arg(long, value_name = "FILE", requires = "collector")]
    pub collector_tls_ca: Option<PathBuf>,

    /// This agent's client certificate chain for the collector.
    #[arg(long, value_name = "FILE", requires = "collector_tls_ca", requires = "collector_tls_key")]
    pub collector_tls_cert: Option<PathBuf>,

    /// The private key of --collector-tls-cert.
    #[arg(long, value_name = "FILE", requires = "collector_tls_cert")]
    pub collector_tls_key: Option<PathBuf>,

    /// Name the collector's certificate must carry; by default the host or IP address dialled.
    #[arg(long, value_name = "NAME", requires = "collector_tls_ca")]
    pub collector_tls_server_name: Option<String>,
    /// Serve the live view in the browser on this loopback `IP:PORT` (port 0 picks a free one);
    /// `--web` alone serves it on 127.0.0.1:9180.
    #[arg(long, num_args = 0..=1, default_missing_value = web::DEFAULT_WEB_ADDR, value_name = "ADDR")]
    pub web: Option<WebAddr>,

    /// Also serve the live view to requests for this host name, besides IP addresses and
    /// localhost; repeat for several. Requests for any other name get 403, which keeps pages of
    /// other origins out through DNS rebinding.
    #[arg(long = "web-allow-host", value_name = "NAME", requires = "web", value_parser = web::parse_allowed_host)]
    pub web_allow_hosts: Vec<String>,

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
            eprintln!("{}", super::model_failure_summary(&args.model, &errors, "agent"));
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
    let api_tls = args.tls.load().context("failed to load the API's TLS files")?;
    if api_tls.is_none() {
        args.tls.check_plaintext_allowed(&args.api)?;
    }
    let jsonl_writer = args.jsonl.as_deref().map(|path| open_jsonl(path, &args)).transpose()?;
    let node = match &args.node {
        Some(node) if node.is_empty() => anyhow::bail!("--node must not be empty"),
        Some(node) => node.clone(),
        None => host::host_name().context("failed to read the host name; name this node with --node")?,
    };
    if !(args.snapshot_interval > 0.0 && args.snapshot_interval.is_finite()) {
        anyhow::bail!("--snapshot-interval {} is not a positive number of seconds", args.snapshot_interval);
    }

    // Kernel side first: nothing else is worth starting if the programs do not load.
    let config = TelemetryConfig {
        scope_cgroup: scope_cgroup.clone(),
        ring_buffer_bytes: args.ring_buffer_kib.checked_mul(1024).context("--ring-buffer-kib is too large")?,
        channel_capacity: 65_536,
        tcp_hook: args.tcp_hook,
        uring_accepts: !args.no_io_uring_accepts,
        fold_window: Duration::from_millis(args.fold_window_ms),
        ..TelemetryConfig::default()
    };
    let (mut telemetry, events) = Telemetry::start(config).context("failed to start kernel telemetry")?;
    if args.fold_window_ms > 0 && !telemetry.tcp_from_sock_ops() {
        tracing::warn!("repeated TCP connections are not folded: only the sock_ops hook folds, and it is not attached");
    }

    let (commands, command_receiver) = tokio::sync::mpsc::channel(PIPELINE_COMMANDS);
    let reloader = Arc::new(ModelReloader::new(args.model.clone(), &model, &model_text, commands));
    let shared = Arc::new(Shared { engine: Mutex::new(Engine::new(model)), stats: Mutex::new(Default::default()) });
    let hub = Arc::new(DeviationHub::with_node(HubConfig { history_capacity: args.history, ..HubConfig::default() }, &node));
    let event_hub = Arc::new(EventHub::new(EventHubConfig::default(), &node));
    let cancel = CancellationToken::new();
    // Subscribed before the pipeline starts, so the file gets every deviation from the first.
    let jsonl_task = jsonl_writer.map(|writer| {
        let subscription = hub.subscribe(DeviationFilter::default(), None).expect("a live-only subscription cannot fail");
        tokio::spawn(jsonl::run_writer(subscription, writer, cancel.clone()))
    });

    // Label lookups run in a task of their own, so that a slow runtime never stalls the pipeline.
    let pipeline_config =
        PipelineConfig { ephemeral_ports: EphemeralPorts::read_or_default(), ..PipelineConfig::default() };
    let (label_requests, label_requests_rx) = mpsc::channel(1024);
    let (label_replies_tx, label_replies) = mpsc::channel(1024);
    let label_sources = label_sources(&args.docker_socket, args.cri_socket.as_deref());
    let lookup_task = tokio::spawn(labels::run_lookups(
        label_sources,
        LookupConfig::default(),
        label_requests_rx,
        label_replies_tx,
        cancel.clone(),
    ));

    let fold_task = tokio::spawn(pause_folding_for_raw_tcp(telemetry.fold_switch(), event_hub.clone(), cancel.clone()));

    let mut pipeline = Pipeline::new(pipeline_config, shared.clone(), hub.clone(), cgroup_resolver())
        .with_label_lookups(label_requests, label_replies)
        .with_commands(command_receiver)
        .with_events(event_hub.clone());
    let endpoints = Arc::new(Mutex::new(EndpointTable::new(EndpointLimits::default())));
    if args.collector.is_some() {
        pipeline.track_endpoints(endpoints.clone());
    }
    if args.fold_window_ms > 0 && telemetry.tcp_from_sock_ops() {
        pipeline.track_folds();
    }
    if telemetry.reports_acceptors() {
        pipeline.await_acceptors();
    } else {
        tracing::warn!("the accept hooks are not active; accepted connections are attributed to the listener's owner");
    }
    let scope = telemetry.scope().map(|scope| scope_relative_path(&scope.path));
    let seeded = pipeline.seed_from_proc(scope.as_deref());
    tracing::info!(
        processes = seeded.processes,
        connections = seeded.connections,
        udp_listeners = seeded.udp_listeners,
        "process table and sockets seeded from /proc"
    );
    // Without a scope the kernel reports accepts on every listener, known or not.
    if scope.is_some() {
        let listeners: Vec<(u32, std::net::SocketAddr, u32, u64)> =
            seeded.listeners.iter().map(|socket| (socket.netns, socket.local, socket.pid, socket.inode)).collect();
        match telemetry.seed_listeners(&listeners) {
            Ok(added) => tracing::info!(listeners = added, "kernel listener map seeded"),
            Err(error) => tracing::warn!(
                error = %anyhow::Error::from(error),
                "failed to seed the kernel listener map; connections accepted on listeners opened before the agent are attributed only when an accept names their process"
            ),
        }
    }
    let connections: Vec<_> =
        seeded.established.iter().map(|socket| (socket.netns, socket.local, socket.remote, socket.pid)).collect();
    match telemetry.seed_connections(&connections) {
        Ok(added) if telemetry.tcp_from_sock_ops() => {
            tracing::info!(connections = added, "connections opened before the agent are watched in /proc for their close")
        }
        Ok(added) => tracing::info!(connections = added, "kernel connection map seeded"),
        Err(error) => tracing::warn!(
            error = %anyhow::Error::from(error),
            "failed to seed the kernel connection map; connections opened before the agent close without a process"
        ),
    }
    let telemetry = Arc::new(telemetry);
    let lost = {
        let telemetry = telemetry.clone();
        Box::new(move || {
            let counters = telemetry.counters();
            counters.kernel_drops() + counters.channel_drops + counters.decode_errors
        })
    };
    let pipeline_task = tokio::spawn(pipeline.run(events, lost, cancel.clone()));

    let view = Arc::new(AgentStatusView::new(shared.clone(), telemetry.clone(), model_info).with_reloader(reloader.clone()).with_events(event_hub.clone()));
    let push_counters = args.collector.as_ref().map(|_| Arc::new(PushCounters::default()));
    let registry = Arc::new(MetricsRegistry::default());
    let agent_metrics = AgentMetrics::register(&registry);
    reloader.count_with(agent_metrics.clone());
    registry.register_collector(Box::new(AgentCollector {
        telemetry: telemetry.clone(),
        shared: shared.clone(),
        hub: hub.clone(),
        events: Some(event_hub.clone()),
        api_tls: api_tls.clone(),
        push: push_counters.clone(),
    }));
    let metrics_task = match args.metrics {
        Some(addr) => {
            let listener = metrics::bind_metrics(addr).await?;
            Some(tokio::spawn(metrics::serve_metrics(listener, registry.clone(), cancel.clone())))
        }
        None => None,
    };

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
    let access = SocketAccess { mode: args.api_mode, group: args.api_group };
    let mut listener = ApiListener::bind_with_access(&args.api, access).await?;
    if let Some(tls) = api_tls {
        listener = listener.with_tls(tls)?;
    }
    let address = listener.local_addr().context("failed to read the API address")?;
    let server_task = tokio::spawn(server::serve_on(listener, hub.clone(), view.clone(), cancel.clone()));
    let signals = StopSignals::install()?;
    let push_task = match (&args.collector, push_counters) {
        (Some(collector), Some(counters)) => {
            let addresses = if args.advertise_addresses.is_empty() {
                host::interface_addresses().context("failed to list this node's addresses; give them with --advertise-address")?
            } else {
                args.advertise_addresses.clone()
            };
            let config = PushConfig {
                collector: collector.clone(),
                node: node.clone(),
                run_id: host::random_run_id(),
                snapshot_interval: Duration::from_secs_f64(args.snapshot_interval),
                addresses,
                tls: collector_tls(&args)?,
            };
            view.attach_push_counters(counters.clone());
            let source = PushSource { hub: hub.clone(), view: view.clone(), endpoints };
            tracing::info!(collector = %collector, node = %node, "pushing to a collector");
            Some(tokio::spawn(run_pusher(config, source, counters, cancel.clone())))
        }
        _ => None,
    };
    let web_task = match &args.web {
        Some(addr) => {
            let listener = WebListener::bind(addr).await?;
            let live_view = LiveView::new(view.clone(), hub.clone(), live_view_config(&args.web_allow_hosts));
            Some(tokio::spawn(web::serve_on(listener, live_view, cancel.clone())))
        }
        None => None,
    };
    tracing::info!(api = %address, "agent ready");
    if let Some(path) = &args.ready_file {
        if let Err(error) = write_ready_file(path, &address.to_string()) {
            // Stop the server first so that it removes its socket file.
            cancel.cancel();
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, server_task).await;
            return Err(error);
        }
    }

    signals
        .wait(|| {
            let reloader = reloader.clone();
            // The reloader logs and counts the outcome; an error means the agent is stopping anyway.
            tokio::spawn(async move { reloader.reload(ReloadTrigger::Signal).await });
        })
        .await;
    tracing::info!("stopping");
    if let Some(path) = &args.ready_file {
        let _ = std::fs::remove_file(path);
    }

    cancel.cancel();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let _ = pipeline_task.await;
        let _ = server_task.await;
        let _ = lookup_task.await;
        let _ = fold_task.await;
        if let Some(task) = metrics_task {
            let _ = task.await;
        }
        if let Some(task) = jsonl_task {
            let _ = task.await;
        }
        if let Some(push_task) = push_task {
            let _ = push_task.await;
        }
        if let Some(web_task) = web_task {
            let _ = web_task.await;
        }
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

/// Returns the cgroup path of `path` relative to the cgroup2 mount (`/system.slice/x.service`),
/// the form process cgroup paths take.
fn scope_relative_path(path: &Path) -> String {
    let relative = telemetry::cgroup2_mount()
        .ok()
        .and_then(|mount| path.strip_prefix(mount).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf());
    format!("/{}", relative.display().to_string().trim_start_matches('/'))
}

/// Loads the client TLS files for the collector, or returns `None` without --collector-tls-ca.
/// Plaintext to a collector that is not on loopback or a unix socket is refused.
fn collector_tls(args: &AgentArgs) -> anyhow::Result<Option<ClientTls>> {
    let Some(ca) = &args.collector_tls_ca else {
        if let Some(collector) = args.collector.as_ref().filter(|collector| !collector.is_local()) {
            anyhow::bail!(
                "refusing to push in plaintext to the collector at {collector}, which is not a loopback address: pass --collector-tls-ca, --collector-tls-cert and --collector-tls-key"
            );
        }
        return Ok(None);
    };
    let files = ClientTlsFiles {
        ca: ca.clone(),
        cert: args.collector_tls_cert.clone(),
        key: args.collector_tls_key.clone(),
        server_name: args.collector_tls_server_name.clone(),
    };
    let tls = ClientTls::load(&files).context("failed to load the collector TLS files")?;
    Ok(Some(tls))
}

fn open_jsonl(path: &Path, args: &AgentArgs) -> anyhow::Result<JsonlWriter> {
    let target = if path == Path::new("-") {
        JsonlTarget::Stdout
    } else {
        JsonlTarget::File {
            path: path.to_path_buf(),
            max_bytes: args.jsonl_max_size_mib.saturating_mul(1024 * 1024),
            keep: args.jsonl_keep,
        }
    };
    JsonlWriter::open(target).with_context(|| format!("failed to open the --jsonl output {}", path.display()))
}

fn parse_mode(text: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .map_err(|_| format!("expected an octal mode such as {DEFAULT_SOCKET_MODE:04o}"))?;
    if mode > 0o777 {
        return Err(format!("{text} has bits above 0777; a socket mode takes permission bits only"));
    }
    Ok(mode)
}

/// Resolves a group name or a numeric gid.
fn parse_group(text: &str) -> Result<u32, String> {
    if let Ok(gid) = text.parse::<u32>() {
        return Ok(gid);
    }
    let name = CString::new(text).map_err(|_| "a group name cannot contain a NUL byte".to_string())?;
    // SAFETY: libc::group is plain data (integers and pointers), for which all zeros is valid.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer refers to live memory of the size passed, and getgrnam_r writes only
    // into `group`, `buffer` and `result`.
    let status = unsafe { libc::getgrnam_r(name.as_ptr(), &mut group, buffer.as_mut_ptr(), buffer.len(), &mut result) };
    if status != 0 {
        return Err(format!("failed to look up group {text:?}: {}", std::io::Error::from_raw_os_error(status)));
    }
    if result.is_null() {
        return Err(format!("group {text:?} not found in the group database"));
    }
    Ok(group.gr_gid)
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

/// Writes `address` and a newline to `path` so that a reader never sees part of it.
pub(crate) fn write_ready_file(path: &Path, address: &str) -> anyhow::Result<()> {
    // Written whole under another name, then renamed, so a reader never sees half of it.
    let partial = path.with_extension("partial");
    std::fs::write(&partial, format!("{address}\n")).with_context(|| format!("failed to write {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("failed to write {}", path.display()))
}

/// The signals the agent handles, installed before it reports ready so that a SIGHUP sent right
/// after the ready file appears reloads the model instead of killing the agent.
struct StopSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            terminate: signal(SignalKind::terminate()).context("failed to install the SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("failed to install the SIGINT handler")?,
            hangup: signal(SignalKind::hangup()).context("failed to install the SIGHUP handler")?,
        })
    }

    /// Waits for SIGTERM or SIGINT, calling `on_hangup` for each SIGHUP meanwhile.
    async fn wait(mut self, mut on_hangup: impl FnMut()) {
        loop {
            tokio::select! {
                _ = self.terminate.recv() => return,
                _ = self.interrupt.recv() => return,
                _ = self.hangup.recv() => on_hangup(),
            }
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

/// Builds the label sources whose sockets exist. A missing socket disables its source with one
/// info line: a host without Docker or Kubernetes is normal, not an error.
fn label_sources(docker_socket: &Path, cri_socket: Option<&Path>) -> Vec<Arc<dyn LabelSource>> {
    let mut sources: Vec<Arc<dyn LabelSource>> = Vec::new();
    if docker_socket.exists() {
        tracing::info!(socket = %docker_socket.display(), "docker label source enabled");
        sources.push(Arc::new(DockerSource::new(docker_socket.to_path_buf())));
    } else {
        tracing::info!(socket = %docker_socket.display(), "no docker socket; docker containers carry no labels (set --docker-socket)");
    }

    let cri = match cri_socket {
        Some(path) => Some(path.to_path_buf()).filter(|path| path.exists()),
        None => DEFAULT_CRI_SOCKETS.iter().map(PathBuf::from).find(|path| path.exists()),
    };
    match cri {
        Some(path) => {
            tracing::info!(socket = %path.display(), "cri label source enabled");
            sources.push(Arc::new(CriSource::new(path)));
        }
        None => {
            let tried = match cri_socket {
                Some(path) => path.display().to_string(),
                None => DEFAULT_CRI_SOCKETS.join(", "),
            };
            tracing::info!(tried = %tried, "no cri socket; kubernetes containers carry no labels (set --cri-socket)");
        }
    }
    sources
}

/// Maximum fold epoch, in milliseconds, because a folded connection takes the processes of a
/// reported one up to an epoch older.
const MAX_FOLD_WINDOW_MS: u64 = 60_000;

/// How often the agent checks whether a client streams raw TCP events.
const RAW_TCP_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Makes the kernel report every TCP connection while a client streams raw TCP events, and fold
/// repeated connections again when none does. Each connection then has its raw events.
async fn pause_folding_for_raw_tcp(switch: FoldSwitch, events: Arc<EventHub>, cancel: CancellationToken) {
    const TCP_KINDS: [EventKind; 5] = [
        EventKind::TcpConnect,
        EventKind::TcpEstablished,
        EventKind::TcpConnectFailed,
        EventKind::TcpAccept,
        EventKind::TcpClose,
    ];
    let mut interval = tokio::time::interval(RAW_TCP_CHECK_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut paused = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = interval.tick() => {}
        }
        let requested = TCP_KINDS.iter().any(|kind| events.wants(*kind));
        if requested == paused {
            continue;
        }
        match switch.report_every_connection(requested) {
            Ok(()) => {
                paused = requested;
                tracing::info!(every_connection = requested, "raw TCP event subscribers changed; TCP connection folding updated");
            }
            Err(error) => {
                tracing::warn!(%error, every_connection = requested, "failed to update TCP connection folding; retrying in 250 ms")
            }
        }
    }
}
