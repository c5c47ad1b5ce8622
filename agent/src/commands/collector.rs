//! `driftwatch collector`: receives the pushes of a fleet's agents and serves the fleet's
//! deviations, merged graph and status.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::api::hub::HubConfig;
use crate::api::{ApiListener, ListenAddr, ServerTlsArgs};
use crate::collector::{serve_collector, Collector, CollectorConfig};

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
}

pub async fn run(args: CollectorArgs) -> anyhow::Result<ExitCode> {
    let config = CollectorConfig {
        data_dir: args.data_dir.clone(),
        hub: HubConfig {
            history_capacity: args.history,
            ..HubConfig::default()
        },
    };
    let collector = Arc::new(Collector::open(config).context("failed to open the collector's journal")?);
    let cancel = CancellationToken::new();

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
    match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
        Ok(Ok(result)) => result?,
        Ok(Err(join_error)) => return Err(join_error).context("the collector's server task failed"),
        Err(_) => tracing::warn!(timeout = ?DRAIN_TIMEOUT, "the server did not stop in time"),
    }
    Ok(ExitCode::SUCCESS)
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
