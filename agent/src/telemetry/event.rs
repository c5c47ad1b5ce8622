//! Typed kernel events, decoded from the ring buffer records.

use std::net::SocketAddr;

/// One decoded kernel event. Times are `CLOCK_MONOTONIC` nanoseconds (`bpf_ktime_get_ns`).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Exec(ExecEvent),
    Fork(ForkEvent),
    Exit(ExitEvent),
    Tcp(TcpEvent),
}

/// A successful exec: the new program of `pid`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecEvent {
    pub ktime_ns: u64,
    /// Process id (tgid) after the exec.
    pub pid: u32,
    /// Thread id that called exec; differs from `pid` when a non-leader thread exec'd.
    pub tid: u32,
    /// Executable path as the kernel resolved it.
    pub filename: String,
    pub argv: Vec<String>,
    /// True when argv was longer than the capture limit and was cut.
    pub argv_truncated: bool,
    pub uid: u32,
    pub gid: u32,
    /// cgroup v2 id (the inode number of the cgroup directory).
    pub cgroup_id: u64,
    pub comm: String,
}

/// A new task: `child_pid` is the new task's id. For a new thread it is a thread id that never
/// becomes a process; [`ExitEvent`] removes it again.
#[derive(Debug, Clone, PartialEq)]
pub struct ForkEvent {
    pub ktime_ns: u64,
    /// Process id (tgid) of the parent.
    pub parent_pid: u32,
    pub child_pid: u32,
    pub cgroup_id: u64,
}

/// A task exited.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitEvent {
    pub ktime_ns: u64,
    pub pid: u32,
    pub tid: u32,
    /// Exit status as `wait(2)` reports it, when the kernel program saw an `exit_group`.
    pub exit_code: Option<i32>,
}

/// What happened to a TCP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpEventKind {
    /// `connect()` started (SYN sent). The source port may still be 0.
    Connect,
    /// An outgoing connection was established; `pid` is the process that called `connect()`.
    Connected,
    /// A connection attempt failed (refused, reset or timed out) before it was established.
    ConnectFailed,
    /// A socket started listening in `pid`.
    Listen,
    /// An incoming connection was established on a listener. The kernel completes the handshake
    /// outside any process, so `pid` is 0 and the agent attributes it to the listener's owner.
    Accepted,
    /// An established connection closed.
    Close,
}

/// A TCP state change that the graph needs.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpEvent {
    pub ktime_ns: u64,
    pub kind: TcpEventKind,
    /// Owning process (tgid), 0 when not known in the kernel.
    pub pid: u32,
    /// Network namespace inode of the socket, 0 when unknown.
    pub netns: u32,
    /// Local address and port of the socket.
    pub local: SocketAddr,
    /// Remote address and port; unspecified for a listener.
    pub remote: SocketAddr,
    /// Kernel socket address, an opaque id that pairs the events of one socket.
    pub sock: u64,
}
