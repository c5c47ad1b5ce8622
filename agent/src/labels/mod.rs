//! Container and pod labels from the container runtimes, so that `match.container` and
//! `match.pod` selectors can match a process.
//!
//! The cgroup path of a process names its container id and pod uid at once
//! ([`crate::state::container`]). The labels live in the runtime that created the container, which
//! a node agent asks over the runtime's unix socket: the Docker Engine API for Docker containers,
//! the Kubernetes CRI (containerd, CRI-O) for a pod's containers. Each runtime is one
//! [`LabelSource`].
//!
//! The pipeline never waits for a runtime. It keeps what it learned in a bounded [`LabelTracker`]
//! keyed by container id and hands misses to the [`run_lookups`] task over a bounded channel. The
//! task asks the sources with a timeout and a cap on lookups in flight, and sends each outcome
//! back. The pipeline then re-attributes the processes of that container and evaluates the
//! observations it held for them. Failed lookups are counted, logged and retried after a delay.

mod cri;
mod docker;
mod hold;
mod lookup;
mod tracker;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

pub use cri::CriSource;
pub use cri::DEFAULT_CRI_SOCKETS;
pub use docker::DockerSource;
pub use hold::{HoldQueue, HoldStats};
pub use lookup::{run_lookups, LabelReply, LabelRequest, LookupConfig, LookupOutcome};
pub use tracker::{LabelStats, LabelTracker, TrackerConfig};

use crate::state::container::Runtime;

/// Container facts that a runtime returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerMetadata {
    /// Container name: the Docker name without its leading `/`, or the name in the pod spec.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The pod, for a container that a CRI runtime runs in a pod sandbox.
    pub pod: Option<PodMetadata>,
}

/// Pod sandbox facts that a CRI runtime returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodMetadata {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// Error of a label source that could not respond.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("failed to connect to {socket}: {source}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("request to {socket} failed: {reason}")]
    Request { socket: PathBuf, reason: String },
    #[error("{socket} returned HTTP status {status} for container {container_id}")]
    Status {
        socket: PathBuf,
        status: u16,
        container_id: String,
    },
    #[error("{socket} returned an invalid reply for container {container_id}: {reason}")]
    InvalidReply {
        socket: PathBuf,
        container_id: String,
        reason: String,
    },
}

/// The future a [`LabelSource`] returns: the container's metadata, `None` when the runtime does
/// not know the container.
pub type LookupFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<ContainerMetadata>, LabelError>> + Send + 'a>>;

/// A container runtime that returns the labels of its containers.
pub trait LabelSource: Send + Sync {
    /// Short name for logs and counters, such as `docker` or `cri`.
    fn name(&self) -> &'static str;

    /// True when this source manages containers that a cgroup path attributes to `runtime`.
    fn serves(&self, runtime: Runtime) -> bool;

    /// Looks up one container by its 64-hex-digit id.
    fn lookup<'a>(&'a self, container_id: &'a str) -> LookupFuture<'a>;
}

/// Returns the name the model and the API use for a runtime.
pub fn runtime_name(runtime: Runtime) -> &'static str {
    match runtime {
        Runtime::Docker => "docker",
        Runtime::Containerd => "containerd",
        Runtime::CriO => "cri-o",
        Runtime::Kubernetes => "kubernetes",
    }
}
