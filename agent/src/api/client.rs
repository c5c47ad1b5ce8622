//! Connecting a client to an agent's API over a unix socket or loopback TCP.

use std::time::Duration;

use anyhow::Context as _;
use driftwatch_proto::v1::agent_service_client::AgentServiceClient;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::addr::ListenAddr;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to the agent API at `addr`.
///
/// # Errors
///
/// Fails when nothing accepts connections at `addr` within five seconds.
pub async fn connect(addr: &ListenAddr) -> anyhow::Result<AgentServiceClient<Channel>> {
    let channel = connect_channel(addr).await.with_context(|| {
        format!("failed to connect to the driftwatch agent at {addr}; is the agent running?")
    })?;
    Ok(AgentServiceClient::new(channel))
}

/// Opens a gRPC channel to `addr`, for any driftwatch service served there.
///
/// # Errors
///
/// The transport error when nothing accepts connections at `addr` within five seconds.
pub async fn connect_channel(addr: &ListenAddr) -> Result<Channel, tonic::transport::Error> {
    match addr {
        ListenAddr::Tcp(socket_addr) => {
            Endpoint::from_shared(format!("http://{socket_addr}"))?
                .connect_timeout(CONNECT_TIMEOUT)
                .connect()
                .await
        }
        ListenAddr::Unix(path) => {
            let path = path.clone();
            // The URI is required by the HTTP/2 layer but never resolved: the connector ignores it
            // and dials the socket.
            Endpoint::from_static("http://localhost")
                .connect_timeout(CONNECT_TIMEOUT)
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move { UnixStream::connect(path).await.map(TokioIo::new) }
                }))
                .await
        }
    }
}
