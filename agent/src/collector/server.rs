//! Serving the collector: `CollectorService` for agents and `AgentService` for clients, on one
//! listener.

use std::sync::Arc;
use std::time::Duration;

use driftwatch_proto::v1::collector_service_server::CollectorServiceServer;
use tokio_util::sync::CancellationToken;

use super::service::CollectorApi;
use super::Collector;
use crate::api::server::{agent_service, serve_router_on, AgentView};
use crate::api::ApiListener;

/// How often the collector pings each connection over HTTP/2, and how long it waits for the reply
/// before it closes the connection. A node's open push stream rejects streams from other agent
/// runs, so a connection cut without a FIN (a crashed host, a lost route) must end within about
/// 20 s for a restarted agent to take its node over.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the collector on `listener` until `shutdown` is cancelled. This is the one place the
/// collector's gRPC server is built, so transport settings such as TLS belong here.
///
/// # Errors
///
/// When the server fails; the error names the address.
pub async fn serve_collector(
    listener: ApiListener,
    collector: Arc<Collector>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let view: Arc<dyn AgentView> = Arc::clone(&collector) as Arc<dyn AgentView>;
    let fleet_api = agent_service(Arc::clone(collector.hub()), view, shutdown.clone());
    let push_api = CollectorServiceServer::new(CollectorApi {
        collector,
        shutdown: shutdown.clone(),
    });
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(fleet_api)
        .add_service(push_api);
    serve_router_on(listener, router, shutdown).await
}
