//! The tonic service for driftwatch.v1 and the listener it serves on.
//!
//! The service reads deviations from a [`DeviationHub`] and everything else through [`AgentView`],
//! so it depends on neither the kernel side nor the engine. Binding is a separate step
//! ([`ApiListener::bind`]) so that a caller knows the socket accepts connections before it starts
//! clients, and learns the port when it asked for port 0.

use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use anyhow::{bail, Context as _};
use driftwatch_model::graph::GraphSnapshot;
use driftwatch_proto::v1 as pb;
use pb::agent_service_server::{AgentService, AgentServiceServer};
use tonic::transport::server::Router;
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{Request, Response, Status};

use super::addr::ListenAddr;
use super::convert;
use super::convert_events::event_message_to_proto;
use super::hub::{DeviationHub, HubMessage, SubscribeError};
use super::request::{events_from_request, subscription_from_request};
use crate::events::{EventHub, EventMessage};
use super::status::{NodeStatus, StatusSnapshot};
use super::tls::ServerTls;
use crate::reload::{ModelReloader, ReloadTrigger};

/// Default mode of the unix socket: the owner (root) and the group may connect, others may not.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;

/// Who may connect to a unix socket: its mode and, when set, the group it is handed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    pub mode: u32,
    /// Group id the socket file is given to; `None` keeps the agent's own group.
    pub group: Option<u32>,
}

impl Default for SocketAccess {
    fn default() -> Self {
        SocketAccess {
            mode: DEFAULT_SOCKET_MODE,
            group: None,
        }
    }
}

/// The API's read access to the running agent for everything except deviations.
pub trait AgentView: Send + Sync + 'static {
    /// Returns a copy of the observed graph.
    fn graph(&self) -> GraphSnapshot;
    /// Returns the agent's status.
    fn status(&self) -> StatusSnapshot;
    /// Returns the nodes that push to this process; only a collector has any.
    fn nodes(&self) -> Vec<NodeStatus> {
        Vec::new()
    }

    /// Returns what reloads the model, or `None` when this agent serves a fixed model.
    fn model_reloader(&self) -> Option<Arc<ModelReloader>> {
        None
    }

    /// Returns the hub of raw events, or `None` when this process records none (a collector).
    fn event_hub(&self) -> Option<Arc<EventHub>> {
        None
    }
}

/// A bound API socket, ready to accept connections.
pub struct ApiListener {
    inner: BoundSocket,
}

enum BoundSocket {
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
    Tcp(TcpListener),
    Tls {
        listener: TcpListener,
        tls: ServerTls,
    },
}

impl ApiListener {
    /// Binds `addr`. For a unix socket it creates the parent directory, replaces a stale socket
    /// file that no process listens on, and sets the mode to 0660.
    ///
    /// # Errors
    ///
    /// Fails when the address is in use (including a socket file another process serves), when the
    /// path exists and is not a socket, or when the directory or socket cannot be created.
    pub async fn bind(addr: &ListenAddr) -> anyhow::Result<ApiListener> {
        ApiListener::bind_with_access(addr, SocketAccess::default()).await
    }

    /// Binds `addr` like [`ApiListener::bind`], giving a unix socket `access` instead of the
    /// default mode. `access` does not apply to TCP.
    ///
    /// # Errors
    ///
    /// As [`ApiListener::bind`], and when the socket's mode or group cannot be set.
    pub async fn bind_with_access(addr: &ListenAddr, access: SocketAccess) -> anyhow::Result<ApiListener> {
        let inner = match addr {
            ListenAddr::Unix(path) => BoundSocket::Unix {
                listener: bind_unix(path, access).await?,
                path: path.clone(),
            },
            ListenAddr::Tcp(socket_addr) => {
                let listener = TcpListener::bind(socket_addr)
                    .await
                    .with_context(|| format!("failed to listen on {socket_addr}"))?;
                BoundSocket::Tcp(listener)
            }
        };
        Ok(ApiListener { inner })
    }

    /// Serves TLS on this TCP listener: every connection must complete a mutual TLS handshake
    /// before it reaches the API.
    ///
    /// # Errors
    ///
    /// Fails for a unix socket, whose access is controlled by file permissions instead.
    pub fn with_tls(self, tls: ServerTls) -> anyhow::Result<ApiListener> {
        let inner = match self.inner {
            BoundSocket::Tcp(listener) | BoundSocket::Tls { listener, .. } => BoundSocket::Tls { listener, tls },
            BoundSocket::Unix { path, .. } => bail!(
                "TLS needs a TCP API address, but the API listens on unix:{}; drop the --tls-* flags \
                 or listen on IP:PORT",
                path.display()
            ),
        };
        Ok(ApiListener { inner })
    }

    /// Returns true when connections must complete a TLS handshake.
    pub fn is_tls(&self) -> bool {
        matches!(self.inner, BoundSocket::Tls { .. })
    }

    /// Returns the address clients connect to. For TCP it carries the port the system chose when
    /// the requested port was 0.
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match &self.inner {
            BoundSocket::Unix { path, .. } => Ok(ListenAddr::Unix(path.clone())),
            BoundSocket::Tcp(listener) | BoundSocket::Tls { listener, .. } => {
                listener.local_addr().map(ListenAddr::Tcp)
            }
        }
    }
}

async fn bind_unix(path: &Path, access: SocketAccess) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| {
            format!("failed to create the socket directory {}", parent.display())
        })?;
    }
    remove_stale_socket(path).await?;

    let listener = UnixListener::bind(path)
        .with_context(|| format!("failed to listen on unix socket {}", path.display()))?;
    // NOTE: until this call the socket has the mode the umask gives, so a client of another group
    // could connect in that short window if the umask is permissive.
    let mode = access.mode;
    if let Some(group) = access.group {
        std::os::unix::fs::chown(path, None, Some(group))
            .with_context(|| format!("failed to give {} to group {group}", path.display()))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("failed to set mode {mode:o} on {}", path.display()))?;
    Ok(listener)
}

/// Removes a socket file left by an agent that did not shut down cleanly. A socket that still
/// accepts connections belongs to a running agent, and a path that is not a socket is not ours to
/// delete, so both are errors.
async fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    let metadata = match fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => {
            return Err(err).with_context(|| format!("failed to inspect {}", path.display()))
        }
    };
    if !metadata.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; remove it or choose another API address",
            path.display()
        );
    }
    if UnixStream::connect(path).await.is_ok() {
        bail!(
            "another process is already serving on {}; stop it or choose another API address",
            path.display()
        );
    }
    tracing::info!(path = %path.display(), "removing stale API socket");
    fs::remove_file(path)
        .with_context(|| format!("failed to remove stale socket {}", path.display()))
}

/// Binds `listen` and serves the API on it until `shutdown` is cancelled.
///
/// Callers that need to know when clients can connect bind with [`ApiListener::bind`] and call
/// [`serve_on`] instead.
pub async fn serve(
    listen: ListenAddr,
    hub: Arc<DeviationHub>,
    view: Arc<dyn AgentView>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = ApiListener::bind(&listen).await?;
    serve_on(listener, hub, view, shutdown).await
}

/// Serves the API on a bound listener until `shutdown` is cancelled. Open deviation streams end
/// at cancellation, so shutdown does not wait for clients to hang up. A unix socket file is removed
/// on the way out.
pub async fn serve_on(
    listener: ApiListener,
    hub: Arc<DeviationHub>,
    view: Arc<dyn AgentView>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let service = agent_service(hub, view, shutdown.clone());
    let router = tonic::transport::Server::builder().add_service(service);
    serve_router_on(listener, router, shutdown).await
}

/// Builds the `AgentService` that an agent serves about itself and a collector about the fleet.
/// Its deviation streams end when `shutdown` is cancelled.
pub fn agent_service(
    hub: Arc<DeviationHub>,
    view: Arc<dyn AgentView>,
    shutdown: CancellationToken,
) -> AgentServiceServer<impl AgentService> {
    AgentServiceServer::new(AgentApi {
        hub,
        view,
        shutdown,
    })
}

/// Serves `router` on a bound listener until `shutdown` is cancelled, and removes a unix socket
/// file on the way out.
pub async fn serve_router_on(
    listener: ApiListener,
    router: Router,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let local_addr = listener
        .local_addr()
        .context("failed to read the API listener's address")?;
    tracing::info!(addr = %local_addr, tls = listener.is_tls(), "API listening");

    let result = match listener.inner {
        BoundSocket::Unix { listener, path } => {
            let result = router
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener),
                    shutdown.cancelled(),
                )
                .await;
            if let Err(err) = fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %err, "failed to remove the API socket");
            }
            result
        }
        BoundSocket::Tcp(listener) => {
            router
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(listener),
                    shutdown.cancelled(),
                )
                .await
        }
        BoundSocket::Tls { listener, tls } => {
            let incoming = tls.incoming(listener, shutdown.clone());
            router
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
                .await
        }
    };
    result.with_context(|| format!("API server on {local_addr} failed"))?;
    tracing::info!(addr = %local_addr, "API stopped");
    Ok(())
}

/// The status message of a request for raw events to a server without them. Only the collector
/// serves `AgentService` without an event hub: agents forward deviations to it, never raw events.
pub const NO_RAW_EVENTS: &str =
    "a collector does not carry raw events, only deviations; drop --events (leave events empty) or watch an agent";

struct AgentApi {
    hub: Arc<DeviationHub>,
    view: Arc<dyn AgentView>,
    shutdown: CancellationToken,
}

type DeviationStream =
    Pin<Box<dyn Stream<Item = Result<pb::StreamDeviationsResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    type StreamDeviationsStream = DeviationStream;

    async fn stream_deviations(
        &self,
        request: Request<pb::StreamDeviationsRequest>,
    ) -> Result<Response<DeviationStream>, Status> {
        let request = request.into_inner();
        let (filter, replay) = subscription_from_request(&request)
            .map_err(|err| Status::invalid_argument(err.to_string()))?;
        let events = events_from_request(&request).map_err(|err| Status::invalid_argument(err.to_string()))?;
        // Subscribed before the deviations, so a rejected resume leaves no deviation subscriber.
        let event_subscription = match events {
            None => None,
            Some(events) => {
                let hub = self.view.event_hub().ok_or_else(|| {
                    Status::unimplemented(NO_RAW_EVENTS)
                })?;
                let subscription = hub
                    .subscribe(filter.clone(), events.kinds, events.from_sequence)
                    .map_err(|err| Status::invalid_argument(format!("from_event_sequence: {err}")))?;
                tracing::debug!(kinds = ?events.kinds, from = ?events.from_sequence, "event subscriber joined");
                Some(subscription)
            }
        };
        let subscription = self
            .hub
            .subscribe_with(filter.clone(), replay)
            .map_err(|err| match err {
                SubscribeError::FromSequenceAhead { .. } => {
                    Status::invalid_argument(err.to_string())
                }
            })?;
        tracing::debug!(?filter, ?replay, "deviation subscriber joined");

        let messages = subscription.map(|message| {
            if let HubMessage::Loss(notice) = &message {
                tracing::warn!(
                    missed = notice.missed(),
                    first_sequence = notice.first_sequence,
                    last_sequence = notice.last_sequence,
                    reason = ?notice.reason,
                    "deviation subscriber missed messages; it was sent a loss notice"
                );
            }
            Ok(convert::hub_message_to_proto(&message))
        });
        let Some(event_subscription) = event_subscription else {
            let stream = UntilCancelled::new(messages, self.shutdown.clone());
            return Ok(Response::new(Box::pin(stream)));
        };
        let events = event_subscription.map(|message| {
            if let EventMessage::Loss(notice) = &message {
                tracing::warn!(
                    missed = notice.missed(),
                    first_sequence = notice.first_sequence,
                    last_sequence = notice.last_sequence,
                    reason = ?notice.reason,
                    "event subscriber missed events; it was sent a loss notice"
                );
            }
            Ok(event_message_to_proto(&message))
        });
        // Each half keeps its own order; how the two interleave follows arrival.
        let stream = UntilCancelled::new(messages.merge(events), self.shutdown.clone());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_graph(
        &self,
        _request: Request<pb::GetGraphRequest>,
    ) -> Result<Response<pb::Graph>, Status> {
        // A large graph takes a while to copy, so it does not run on a runtime worker.
        let view = Arc::clone(&self.view);
        let graph = tokio::task::spawn_blocking(move || view.graph())
            .await
            .map_err(|err| Status::internal(format!("graph snapshot failed: {err}")))?;
        Ok(Response::new(convert::graph_to_proto(
            &graph,
            SystemTime::now(),
        )))
    }

    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::AgentStatus>, Status> {
        let status = self.view.status();
        let hub = self.hub.counters();
        let mut response = convert::status_to_proto(&status, &hub, SystemTime::now());
        response.nodes = self
            .view
            .nodes()
            .iter()
            .map(convert::node_status_to_proto)
            .collect();
        Ok(Response::new(response))
    }

    async fn reload_model(
        &self,
        _request: Request<pb::ReloadModelRequest>,
    ) -> Result<Response<pb::ReloadModelResponse>, Status> {
        let Some(reloader) = self.view.model_reloader() else {
            return Err(Status::unimplemented(
                "this agent serves a fixed model and does not reload it",
            ));
        };
        tracing::info!(model = %reloader.path().display(), "model reload requested over the API");
        let outcome = reloader
            .reload(ReloadTrigger::Api)
            .await
            .map_err(|err| Status::unavailable(err.to_string()))?;
        Ok(Response::new(convert::reload_outcome_to_proto(&outcome)))
    }
}

/// Ends a stream when a token is cancelled. tonic's graceful shutdown waits for open responses,
/// and a deviation stream never ends on its own.
struct UntilCancelled<S> {
    inner: S,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    done: bool,
}

impl<S> UntilCancelled<S> {
    fn new(inner: S, token: CancellationToken) -> Self {
        UntilCancelled {
            inner,
            cancelled: Box::pin(token.cancelled_owned()),
            done: false,
        }
    }
}

impl<S: Stream + Unpin> Stream for UntilCancelled<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.cancelled.as_mut().poll(cx).is_ready() {
            this.done = true;
            return Poll::Ready(None);
        }
        let next = Pin::new(&mut this.inner).poll_next(cx);
        if let Poll::Ready(None) = next {
            this.done = true;
        }
        next
    }
}
