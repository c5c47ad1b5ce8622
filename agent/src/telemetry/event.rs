//! Typed kernel events, decoded from the ring buffer records.

use std::net::{IpAddr, SocketAddr};

/// One decoded kernel event. Times are `CLOCK_MONOTONIC` nanoseconds (`bpf_ktime_get_ns`).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Exec(ExecEvent),
    Fork(ForkEvent),
    Exit(ExitEvent),
    Tcp(TcpEvent),
    Credentials(CredEvent),
    Udp(UdpEvent),
    Dns(DnsEvent),
    Accept(AcceptEvent),
    /// Connections of one TCP flow that the kernel counted instead of reporting.
    Fold(FoldEvent),
}

/// A TCP flow whose repeated connections the kernel counts, as one graph edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FoldedFlow {
    /// Connections from a process on this host to `server`.
    Out { netns: u32, pid: u32, server: SocketAddr },
    /// Connections from `client` accepted on `server`, a local address and port.
    In { netns: u32, server: SocketAddr, client: IpAddr },
}

/// Counts the kernel added for a [`FoldedFlow`] since the agent last read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoldEvent {
    pub flow: FoldedFlow,
    /// Connections folded: connect calls of an outgoing flow, accepted connections of an
    /// incoming one.
    pub connects: u64,
    /// Folded incoming connections taken back out of `connects`: a process outside the scope, or
    /// another process than the one expected, accepted them.
    pub taken_back: u64,
    /// Folded outgoing connections that completed their handshake.
    pub established: u64,
    /// Folded outgoing connections refused or timed out.
    pub failed: u64,
    /// Folded connections closed, with their payload bytes.
    pub closes: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Kernel time of the last change.
    pub ktime_ns: u64,
}

/// A process took a connection off a listening socket with `accept()` or `accept4()`.
#[derive(Debug, Clone, PartialEq)]
pub struct AcceptEvent {
    pub ktime_ns: u64,
    /// The accepting process (tgid) and thread.
    pub pid: u32,
    pub tid: u32,
    pub cgroup_id: u64,
    /// Kernel socket address, the `sock` of the connection's [`TcpEventKind::Accepted`] event.
    pub sock: u64,
    /// The new file descriptor.
    pub fd: u32,
    /// Network namespace inode of the socket, 0 when unknown.
    pub netns: u32,
    /// Local (server) address of the connection.
    pub local: SocketAddr,
    /// Remote (client) address of the connection.
    pub remote: SocketAddr,
    /// The accepting process's lineage.
    pub lineage: Option<Lineage>,
    /// The accepting process runs an executable that was deleted after it started (or a memfd).
    pub exe_unlinked: bool,
}

/// System call that changed a process's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredChange {
    Setuid,
    Setgid,
    Setreuid,
    Setregid,
    Setresuid,
    Setresgid,
    Capset,
}

/// A successful credential change, with the credentials the thread has afterwards.
#[derive(Debug, Clone, PartialEq)]
pub struct CredEvent {
    pub ktime_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub change: CredChange,
    /// `None` when the kernel program could not read the credentials.
    pub after: Option<Credentials>,
}

/// User and group ids and effective capabilities of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub egid: u32,
    /// Effective capability bits (`CAP_*` numbers as bit positions).
    pub cap_effective: u64,
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
    /// Task name after the exec; the process may rename itself later, so it identifies nothing.
    pub comm: String,
    /// Parent process and start times, read from the task when the exec completed.
    pub lineage: Option<Lineage>,
    /// Name of the file the kernel runs: `memfd:<name>` for a memfd, the interpreter's file name
    /// for a script; empty when unknown.
    pub exe_name: String,
    /// Whether that file had no directory entry left (a memfd or an unlinked file); `None` when
    /// the kernel program could not tell.
    pub exe_unlinked: Option<bool>,
    /// Process id inside the process's own pid namespace and that namespace's depth (0 for the
    /// host's), when known. In a container the first is the pid that processes in the container
    /// use.
    pub namespace_pid: Option<(u32, u32)>,
}

/// Parent and start times of a process, read from its task in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lineage {
    /// Process id of the current parent, after any reparenting.
    pub parent_pid: u32,
    /// Start of the process in nanoseconds since boot (`/proc/<pid>/stat` field 22 in ns).
    pub start_boottime_ns: u64,
    /// The same for the parent.
    pub parent_start_boottime_ns: u64,
}

impl ExecEvent {
    /// True when the program was started from a file descriptor (`fexecve`, or `execveat` with
    /// `AT_EMPTY_PATH`): the kernel then reports the path as `/dev/fd/<n>`.
    pub fn from_descriptor(&self) -> bool {
        self.filename.starts_with("/dev/fd/")
    }

    /// True when the program runs from a memfd, a file that never existed on any file system.
    pub fn fileless(&self) -> bool {
        self.exe_name.starts_with("memfd:")
    }
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
    /// The exiting task's parent and start times.
    pub lineage: Option<Lineage>,
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
    /// outside any process, so `pid` is 0; the [`AcceptEvent`] with the same `sock` names the
    /// process that accepts it.
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
    /// Payload bytes sent so far, each once; the connection's total in a `Close` event.
    pub bytes_sent: u64,
    /// Payload bytes received so far; the connection's total in a `Close` event.
    pub bytes_received: u64,
    /// The socket's pending error as an errno, 0 when none. In a `ConnectFailed` event it is
    /// `ECONNREFUSED` when the peer sent a reset, and `ETIMEDOUT` when no reply came.
    pub error: i32,
    /// The owning process's lineage, in `Connect` and `Listen` events.
    pub lineage: Option<Lineage>,
    /// In `Connect` and `Listen` events: the process runs an executable that was deleted after it
    /// started (or a memfd).
    pub exe_unlinked: bool,
    /// cgroup v2 id of the owning process in `Connect` and `Listen` events, 0 in the others.
    pub cgroup_id: u64,
    /// In an `Accepted` event: the connecting process on this host and its socket's network
    /// namespace, when the kernel folded that end's records into a count.
    pub folded_client: Option<(u32, u32)>,
}

impl TcpEvent {
    /// True when the peer rejected a `ConnectFailed` attempt with a reset.
    pub fn refused(&self) -> bool {
        self.error == libc::ECONNREFUSED
    }

    /// True when a `ConnectFailed` attempt ran out of SYN retries without a reply.
    pub fn timed_out(&self) -> bool {
        self.error == libc::ETIMEDOUT
    }
}

/// Hook that saw a UDP flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpEventKind {
    /// The first datagram sent to this destination with an address (`sendto`, `sendmsg`).
    Send,
    /// `connect()` on a UDP socket, which fixes the destination of every later `send()`.
    Connect,
    /// The first datagram the process read from this peer with the peer's address (`recvfrom`,
    /// `recvmsg`); `remote` is the sender.
    Receive,
    /// A successful `bind()` to a port the process chose, so a UDP listener; `local` is the bound
    /// address and `remote` is unspecified.
    Bind,
}

/// A new UDP flow: the first datagram a process sent to a destination or read from a peer, or a
/// UDP connect. Later datagrams of the same flow are only counted in the kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct UdpEvent {
    pub ktime_ns: u64,
    pub kind: UdpEventKind,
    /// Sending (or, for a receive, receiving) process (tgid).
    pub pid: u32,
    /// Its thread; an io-wq worker thread for a send that io_uring ran asynchronously.
    pub tid: u32,
    /// Network namespace inode of the socket, 0 when unknown.
    pub netns: u32,
    /// Socket cookie, an id of the socket that DNS answers to it carry too.
    pub cookie: u64,
    /// Local address and port; unspecified when the socket is not bound to an address, and port 0
    /// when a connect came before the socket had a port.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// cgroup v2 id of the process.
    pub cgroup_id: u64,
}

/// A DNS message delivered to a socket in scope: a UDP datagram from port 53.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsEvent {
    pub ktime_ns: u64,
    /// Cookie of the receiving socket, which the [`UdpEvent`] of the query carries too.
    pub cookie: u64,
    /// The server the message came from.
    pub server: SocketAddr,
    /// Local port the message went to.
    pub local_port: u16,
    /// The message, cut at the capture limit when `message_len` is larger.
    pub message: Vec<u8>,
    /// Length of the whole message.
    pub message_len: u32,
}

/// Returns the current time on the clock that kernel records are stamped with
/// (`CLOCK_MONOTONIC`), in nanoseconds.
pub fn kernel_now_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the pointer it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}
