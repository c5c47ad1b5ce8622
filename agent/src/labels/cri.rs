//! Container and pod labels from a Kubernetes CRI runtime (containerd, CRI-O) over its unix
//! socket with gRPC.
//!
//! Per container: `ContainerStatus` for the container's name and labels, `ListContainers`
//! filtered on the id for its pod sandbox id (runtime.v1 `ContainerStatus` has no sandbox id), and
//! `PodSandboxStatus` for the pod's namespace, name, uid and labels.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use driftwatch_proto::cri;
use driftwatch_proto::cri::runtime_service_client::RuntimeServiceClient;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::{ContainerMetadata, LabelError, LabelSource, LookupFuture, PodMetadata};
use crate::state::container::Runtime;

/// Sockets probed, in order, when `--cri-socket` is not given.
pub const DEFAULT_CRI_SOCKETS: &[&str] = &["/run/containerd/containerd.sock", "/var/run/crio/crio.sock"];

/// A CRI runtime on one unix socket.
#[derive(Debug, Clone)]
pub struct CriSource {
    socket: PathBuf,
    client: RuntimeServiceClient<Channel>,
}

impl CriSource {
    /// Creates the source. The channel connects on first use and reconnects after the runtime
    /// restarts, so creating it never fails.
    pub fn new(socket: PathBuf) -> CriSource {
        let path = socket.clone();
        // The URI is required by the HTTP/2 layer but never resolved: the connector dials the socket.
        let channel = Endpoint::from_static("http://localhost").connect_with_connector_lazy(tower::service_fn(
            move |_: Uri| {
                let path = path.clone();
                async move { UnixStream::connect(path).await.map(TokioIo::new) }
            },
        ));
        CriSource { socket, client: RuntimeServiceClient::new(channel) }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn status_error(&self, status: tonic::Status) -> LabelError {
        LabelError::Request { socket: self.socket.clone(), reason: format!("{:?}: {}", status.code(), status.message()) }
    }

    async fn inspect(&self, container_id: &str) -> Result<Option<ContainerMetadata>, LabelError> {
        let mut client = self.client.clone();
        let request = cri::ContainerStatusRequest { container_id: container_id.to_string(), verbose: false };
        let status = match client.container_status(request).await {
            Ok(reply) => reply.into_inner().status,
            Err(status) if status.code() == tonic::Code::NotFound => return Ok(None),
            Err(status) => return Err(self.status_error(status)),
        };
        let Some(status) = status else {
            return Err(LabelError::InvalidReply {
                socket: self.socket.clone(),
                container_id: container_id.to_string(),
                reason: "ContainerStatusResponse has no status".to_string(),
            });
        };
        let name = status.metadata.as_ref().map(|metadata| metadata.name.clone()).unwrap_or_default();
        let labels = to_btree(status.labels);

        let filter = cri::ContainerFilter { id: container_id.to_string() };
        let listed = client
            .list_containers(cri::ListContainersRequest { filter: Some(filter) })
            .await
            .map_err(|status| self.status_error(status))?
            .into_inner();
        let sandbox_id = listed
            .containers
            .into_iter()
            .find(|container| container.id == container_id)
            .map(|container| container.pod_sandbox_id)
            .unwrap_or_default();
        let pod = if sandbox_id.is_empty() { None } else { self.pod(&mut client, &sandbox_id).await? };
        Ok(Some(ContainerMetadata { name, labels, pod }))
    }

    async fn pod(
        &self,
        client: &mut RuntimeServiceClient<Channel>,
        sandbox_id: &str,
    ) -> Result<Option<PodMetadata>, LabelError> {
        let request = cri::PodSandboxStatusRequest { pod_sandbox_id: sandbox_id.to_string(), verbose: false };
        let status = match client.pod_sandbox_status(request).await {
            Ok(reply) => reply.into_inner().status,
            // The sandbox went away between the two calls: the container's own labels still count.
            Err(status) if status.code() == tonic::Code::NotFound => return Ok(None),
            Err(status) => return Err(self.status_error(status)),
        };
        Ok(status.map(|status| {
            let metadata = status.metadata.unwrap_or_default();
            PodMetadata {
                uid: metadata.uid,
                namespace: metadata.namespace,
                name: metadata.name,
                labels: to_btree(status.labels),
            }
        }))
    }
}

fn to_btree(labels: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    labels.into_iter().collect()
}

impl LabelSource for CriSource {
    fn name(&self) -> &'static str {
        "cri"
    }

    fn serves(&self, runtime: Runtime) -> bool {
        matches!(runtime, Runtime::Containerd | Runtime::CriO | Runtime::Kubernetes)
    }

    fn lookup<'a>(&'a self, container_id: &'a str) -> LookupFuture<'a> {
        Box::pin(self.inspect(container_id))
    }
}
