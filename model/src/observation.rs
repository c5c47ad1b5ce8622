//! What the agent observed, in the terms the engine compares with the model.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// A process as the engine sees it: everything identity selectors and evidence need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Host process id (tgid).
    pub pid: u32,
    /// Parent process id, 0 when unknown.
    pub ppid: u32,
    /// Executable path as the kernel resolved it at exec.
    pub exe: String,
    pub argv: Vec<String>,
    /// True when the kernel program cut argv at its capture limit.
    pub argv_truncated: bool,
    pub uid: u32,
    pub gid: u32,
    /// User name for `uid` from the host's passwd database, when known.
    pub user: Option<String>,
    /// cgroup v2 path relative to the cgroup2 mount, such as `/system.slice/nginx.service`.
    pub cgroup: String,
    /// Task name (`comm`), at most 15 bytes; informational only, since any process can rename itself.
    pub comm: String,
    /// Ancestors nearest first, as (pid, executable), up to init or the first unknown one.
    pub ancestry: Vec<(u32, String)>,
    /// The container the process runs in, when its cgroup path names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<Arc<ContainerIdentity>>,
    /// Facts about how the program was started and where the process runs, beyond `exe`.
    #[serde(default)]
    pub exec: ExecFacts,
}

/// A container as far as the agent knows it: the id and pod uid come from the cgroup path at once,
/// the name and labels from the container runtime once a lookup returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerIdentity {
    /// Container id, 64 hex digits.
    pub id: String,
    /// Runtime that created the container: `docker`, `containerd`, `cri-o`, or `kubernetes` when
    /// the cgroup path names a pod but no runtime.
    pub runtime: String,
    /// Container name from the runtime (for Kubernetes, the name in the pod spec); empty when unknown.
    #[serde(default)]
    pub name: String,
    /// Container labels, `None` until the runtime returned them.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// State of the lookup that fills `labels`.
    #[serde(default)]
    pub labels_state: LabelsState,
    /// The Kubernetes pod, when the cgroup path names one.
    #[serde(default)]
    pub pod: Option<PodIdentity>,
}

/// Progress of the lookup of a container's labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LabelsState {
    /// No lookup has returned yet, or no label source serves this runtime.
    #[default]
    Pending,
    /// The runtime returned the labels.
    Resolved,
    /// The runtime does not know the container (it may have exited before the lookup).
    NotFound,
    /// The runtime could not be asked (socket missing, timeout, error reply).
    Failed,
}

impl LabelsState {
    pub fn as_str(self) -> &'static str {
        match self {
            LabelsState::Pending => "pending",
            LabelsState::Resolved => "resolved",
            LabelsState::NotFound => "not-found",
            LabelsState::Failed => "failed",
        }
    }
}

/// A Kubernetes pod: the uid from the cgroup path, the rest from the container runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodIdentity {
    /// Pod uid with dashes, as the Kubernetes API shows it.
    pub uid: String,
    /// Namespace and name; empty until the runtime returned them.
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    /// Pod labels, `None` until the runtime returned them.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

impl ContainerIdentity {
    /// Returns the container labels, or `None` while they are unknown.
    pub fn labels(&self) -> Option<&BTreeMap<String, String>> {
        self.labels.as_ref()
    }

    /// Returns the pod labels, or `None` when there is no pod or its labels are unknown.
    pub fn pod_labels(&self) -> Option<&BTreeMap<String, String>> {
        self.pod.as_ref().and_then(|pod| pod.labels.as_ref())
    }
}

/// Facts about how a process's program was started and where it runs, from the exec record and
/// the cgroup path, which the executable path alone does not show.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecFacts {
    /// Runs from a memfd: no file on any file system ever held the program.
    pub fileless: bool,
    /// The executable had no directory entry at exec time, or lost it while the process ran.
    pub exe_deleted: bool,
    /// Started from a file descriptor (`fexecve`, `execveat` with `AT_EMPTY_PATH`).
    pub from_descriptor: bool,
    /// For a script: the interpreter named on its `#!` line. `ProcessInfo::exe` is the script.
    pub interpreter: Option<String>,
    /// Process id inside the process's own pid namespace, when known.
    pub namespace_pid: Option<u32>,
    /// Depth of that pid namespace: 0 for the host's, 1 for a container's on the host.
    pub pid_namespace_level: u32,
    /// The innermost systemd unit that the cgroup path names (`nginx.service`).
    pub systemd_unit: Option<String>,
}

/// Transport protocol of a flow or listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A process started a new program (exec).
#[derive(Debug, Clone)]
pub struct ExecObservation {
    pub time: SystemTime,
    pub process: Arc<ProcessInfo>,
}

/// A process started listening.
#[derive(Debug, Clone)]
pub struct ListenObservation {
    pub time: SystemTime,
    pub process: Arc<ProcessInfo>,
    /// Bound address; unspecified (`0.0.0.0`, `::`) for all addresses.
    pub addr: SocketAddr,
    pub protocol: Protocol,
    /// Network namespace inode of the socket, 0 when unknown.
    pub netns: u32,
}

/// One established connection (or, for UDP, one flow), seen from one or both ends.
///
/// The client is the side that connected. Either side may be a process on this host or only a
/// remote address: an inbound connection from another host has no client process, an outbound one
/// to another host has no server process. At least one of `client` and `server` is `Some`.
#[derive(Debug, Clone)]
pub struct FlowObservation {
    pub time: SystemTime,
    pub protocol: Protocol,
    pub client: Option<Arc<ProcessInfo>>,
    pub server: Option<Arc<ProcessInfo>>,
    pub client_addr: SocketAddr,
    pub server_addr: SocketAddr,
    /// Network namespace inode of the client socket (or of the server socket when the client is remote).
    pub netns: u32,
    /// DNS name of the server address, learned from an answer a process on this host received.
    pub remote_name: Option<String>,
}

impl FlowObservation {
    pub fn server_ip(&self) -> IpAddr {
        self.server_addr.ip()
    }
}
