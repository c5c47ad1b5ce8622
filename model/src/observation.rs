//! What the agent observed, in the terms the engine compares with the model.

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
