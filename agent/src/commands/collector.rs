//! `driftwatch collector`: receives the pushes of a fleet's agents and serves the fleet's
//! deviations, merged graph and status.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use driftwatch_model::Model;
use tokio_util::sync::CancellationToken;

use crate::api::hub::HubConfig;
use crate::api::{ApiListener, ListenAddr, ServerTlsArgs};
use crate::collector::{self, serve_collector, Collector, CollectorConfig, FleetModel};
use crate::metrics::{self, MetricsRegistry};
use crate::view;
use crate::web::{self, live_view_config, LiveView, WebAddr, WebListener};

/// How long the collector waits for its server to finish after a stop signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(clap::Args, Debug)]
pub struct CollectorArgs {
    /// Address agents push to and clients query: `unix:/path/to.sock`, or a loopback `IP:PORT`
    /// (port 0 picks a free one).
    #[arg(long, value_name = "ADDR")]
    pub listen: ListenAddr,

    /// Directory of the journal that keeps the stream sequence, the replay history and each
    /// node's resume point across restarts. Without it a restart starts from nothing, and agents
    /// resend everything still in their buffers.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Deviations of the whole fleet kept for replay to new subscribers.
    #[arg(long, default_value_t = 16_384)]
    pub history: usize,

    /// Write the listen address to this file once the collector serves.
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,

    #[command(flatten)]
    pub tls: ServerTlsArgs,

    /// The fleet's threat model (the YAML the agents load). The collector uses it only to draw
    /// declared flows in the live view and to judge flows between nodes that no single agent can
    /// (a client on one node, its server on another). The agents still raise every deviation, with
    /// their own model; the collector raises none. Read once at start-up: restart the collector
    /// after a change.
    #[arg(long, value_name = "FILE")]
    pub model: Option<PathBuf>,

    /// Serve the live view of the whole fleet in the browser on this loopback `IP:PORT`, where port
    /// 0 picks a free one. `--web` alone serves it on 127.0.0.1:9180.
    #[arg(long, num_args = 0..=1, default_missing_value = web::DEFAULT_WEB_ADDR, value_name = "ADDR")]
    pub web: Option<WebAddr>,

    /// Also serve the live view to requests for this host name, besides IP addresses and
    /// localhost; repeat for several. Requests for any other name get 403, which keeps pages of
    /// other origins out through DNS rebinding.
    #[arg(long = "web-allow-host", value_name = "NAME", requires = "web", value_parser = web::parse_allowed_host)]
    pub web_allow_hosts: Vec<String>,

    /// Serve Prometheus metrics over HTTP at http://ADDR/metrics, such as 127.0.0.1:9465 (port 0
    /// picks a free one).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
}

pub async fn run(args: CollectorArgs) -> anyhow::Result<ExitCode> {
    let model = match args.model.as_deref().map(load_model).transpose() {
        Ok(model) => model,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(ExitCode::from(2));
        }
    };
    let config = CollectorConfig {
        data_dir: args.data_dir.clone(),
        hub: HubConfig {
            history_capacity: args.history,
            ..HubConfig::default()
        },
        model,
    };
    let collector = Arc::new(Collector::open(config).context("failed to open the collector's journal")?);
    let cancel = CancellationToken::new();

    let metrics_task = match args.metrics {
        Some(addr) => {
            let registry = Arc::new(MetricsRegistry::default());
            collector::metrics::register(&registry, &collector);
            let listener = metrics::bind_metrics(addr).await?;
            Some(tokio::spawn(metrics::serve_metrics(listener, registry, cancel.clone())))
        }
        None => None,
    };
    let web_task = match &args.web {
        Some(addr) => {
            let listener = WebListener::bind(addr).await?;
            let source: Arc<dyn web::LiveSource> = Arc::clone(&collector) as Arc<dyn web::LiveSource>;
            let live_view = LiveView::new(source, Arc::clone(collector.hub()), live_view_config(&args.web_allow_hosts));
            Some(tokio::spawn(web::serve_on(listener, live_view, cancel.clone())))
        }
        None => None,
    };

    // The listener's own error names the address.
    let tls = args.tls.load().context("failed to load the collector's TLS files")?;
    if tls.is_none() {
        args.tls.check_plaintext_allowed(&args.listen)?;
    }
    let mut listener = ApiListener::bind(&args.listen).await?;
    if let Some(tls) = tls {
        listener = listener.with_tls(tls)?;
    }
    let address = listener.local_addr().context("failed to read the listen address")?;
    let server = tokio::spawn(serve_collector(listener, Arc::clone(&collector), cancel.clone()));
    tracing::info!(listen = %address, "collector ready");
    if let Some(path) = &args.ready_file {
        super::agent::write_ready_file(path, &address.to_string())?;
    }

    wait_for_stop().await?;
    tracing::info!("stopping");
    if let Some(path) = &args.ready_file {
        let _ = std::fs::remove_file(path);
    }
    cancel.cancel();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        // Only the gRPC server's error decides the exit status; the HTTP servers' are logged.
        for task in [metrics_task, web_task].into_iter().flatten() {
            if let Ok(Err(error)) = task.await {
                tracing::error!(error = %format!("{error:#}"), "an HTTP server of the collector failed");
            }
        }
        server.await
    })
    .await;
    match drained {
        Ok(Ok(result)) => result?,
        Ok(Err(join_error)) => return Err(join_error).context("the collector's server task failed"),
        Err(_) => tracing::warn!(timeout = ?DRAIN_TIMEOUT, "the servers did not stop in time"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Loads the fleet's model, or returns its errors and a last line stating that the collector did
/// not start.
fn load_model(path: &Path) -> Result<FleetModel, String> {
    match Model::load(path) {
        Ok(model) => {
            tracing::info!(model = %path.display(), components = model.components.len(), flows = model.flows.len(), "fleet model loaded");
            let info = view::model_info(path, &model, SystemTime::now());
            Ok(FleetModel { model, info })
        }
        Err(errors) => Err(format!("{errors}\n{}", super::model_failure_summary(path, &errors, "collector"))),
    }
}

async fn wait_for_stop() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("failed to install the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("failed to install the SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}
