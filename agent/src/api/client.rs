//! Connecting a client to an agent's API over a unix socket, loopback TCP, or TCP with mutual TLS.

use std::time::Duration;

use anyhow::Context as _;
use driftwatch_proto::v1::agent_service_client::AgentServiceClient;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::addr::ListenAddr;
use super::tls;
use super::tls_args::ClientTlsArgs;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to the agent API at `addr` in plaintext, which suits a unix socket or loopback.
///
/// # Errors
///
/// Fails when nothing accepts connections at `addr` within five seconds.
pub async fn connect(addr: &ListenAddr) -> anyhow::Result<AgentServiceClient<Channel>> {
    let channel = connect_channel(addr).await.with_context(|| {
        format!("failed to connect to the driftwatch API at {addr} (is the agent or collector running?)")
    })?;
    Ok(AgentServiceClient::new(channel))
}

/// Connects to the agent API at `addr` as the TLS flags set: with TLS when `--tls-ca` is given,
/// else in plaintext, which a TCP address that is not loopback only gets with `--insecure`.
///
/// # Errors
///
/// Fails when the TLS files are unusable, when plaintext would cross the network without
/// `--insecure`, or when the connection or TLS handshake fails; a TLS failure carries advice on
/// the flag that fixes it.
pub async fn connect_with(addr: &ListenAddr, tls: &ClientTlsArgs) -> anyhow::Result<AgentServiceClient<Channel>> {
    let Some(client_tls) = tls.load()? else {
        if !addr.is_local() && !tls.insecure {
            anyhow::bail!(
                "refusing to connect in plaintext to {addr}, which is not a loopback address: pass \
                 --tls-ca, --tls-cert and --tls-key, or --insecure"
            );
        }
        return connect(addr).await;
    };
    let ListenAddr::Tcp(socket_addr) = addr else {
        anyhow::bail!("TLS needs a TCP address, but {addr} is a unix socket; drop the --tls-* flags");
    };
    let target = socket_addr.to_string();
    match client_tls.channel(&target).await {
        Ok(channel) => Ok(AgentServiceClient::new(channel)),
        Err(error) => {
            let error = anyhow::Error::new(error).context(format!("failed to connect to the driftwatch API at {addr}"));
            Err(with_tls_advice(error, addr))
        }
    }
}

/// Adds advice to an error from a call or a connection when its cause is a TLS failure, such as a
/// server that rejected the client certificate after the handshake. Other errors are returned as
/// they are.
pub fn with_tls_advice(error: anyhow::Error, addr: &ListenAddr) -> anyhow::Error {
    let advice = error.chain().find_map(tls::explain);
    match advice {
        Some(advice) => error.context(format!("TLS with {addr} failed: {advice}")),
        None => error,
    }
}

/// Opens a plaintext gRPC channel to `addr`, for any driftwatch service served there.
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
