//! Record types and names shared by the kernel programs (`agent-ebpf`) and the agent.
//!
//! Every record the kernel writes into the ring buffer starts with a [`RecordHeader`]; its `kind`
//! field names the record that follows and is converted with [`RecordKind::try_from`], so an unknown
//! number is an error rather than undefined behaviour. Record numbers, counter indexes and field
//! layouts are never reused for something else: add new ones at the end.
//!
//! The names of programs, maps and global variables live here once ([`PROGRAMS`], [`MAPS`],
//! [`GLOBALS`]) because the BPF link step keeps only the symbols it is told to export and the loader
//! looks them up by name; two copies would drift apart.

#![no_std]

use core::mem::size_of;

/// Ring buffer holding every record ([`ExecRecord`], [`ForkRecord`], [`ExitRecord`], [`TcpRecord`],
/// [`CredRecord`], [`UdpRecord`], [`DnsRecord`], [`AcceptRecord`]).
pub const MAP_EVENTS: &str = "EVENTS";
/// Per-CPU array of `u64` loss counters, indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Hash map from thread id to the argv captured at `execve` entry ([`ArgvStash`]).
pub const MAP_EXEC_ARGS: &str = "EXEC_ARGS";
/// Per-CPU array with one [`ArgvStash`], where argv is assembled before it goes into
/// [`MAP_EXEC_ARGS`] (it is too large for the 512-byte BPF stack).
pub const MAP_ARGV_SCRATCH: &str = "ARGV_SCRATCH";
/// Hash map from tgid to the status passed to `exit_group`.
pub const MAP_EXIT_CODES: &str = "EXIT_CODES";
/// Hash map from kernel socket address to the socket's owner ([`SockOwner`]).
pub const MAP_SOCKETS: &str = "SOCKETS";
/// Hash map from a listening (netns, port) to [`ListenerOwner`] flags.
pub const MAP_LISTENERS: &str = "LISTENERS";

/// LRU hash map from [`UdpFlowKey`] to [`UdpFlowCounts`]: the UDP flows already reported, so that
/// only the first datagram of a flow becomes a record and later ones only count.
pub const MAP_UDP_FLOWS: &str = "UDP_FLOWS";
/// Hash map from a TCP connection's [`ConnectionKey`] to its owner ([`SockOwner`]), for
/// connections that existed before the agent started; the agent fills it from /proc.
pub const MAP_SEEDED_CONNECTIONS: &str = "SEEDED_CONNECTIONS";
/// LRU hash map from thread id to the UDP `bind()` that thread has in progress, kept by the
/// `bind4/6` programs for `post_bind4/6`, which report the bind once it succeeded.
pub const MAP_UDP_BINDS: &str = "UDP_BINDS";
/// Hash map of TCP flows whose repeated connections the kernel counts instead of reporting
/// ([`FoldKey`] to [`FoldCounts`]).
pub const MAP_FOLDS: &str = "FOLDS";
/// One-entry array: the fold epoch in nanoseconds, 0 to report every TCP connection. A connection
/// whose flow had a connection reported in the same epoch is counted in [`MAP_FOLDS`] instead. The
/// agent sets it to 0 while a client streams raw TCP events.
pub const MAP_FOLD_WINDOW: &str = "FOLD_WINDOW";
/// LRU hash map from a connection's 4-tuple ([`PairKey`]) to whether its connecting end was
/// folded, so that the accepting end of a connection between two processes on this host is
/// folded exactly when the connecting end was.
pub const MAP_TCP_PAIRS: &str = "TCP_PAIRS";
/// Hash map from the kernel address of an accepted socket whose connecting end on this host was
/// folded ([`SOCKET_FLAG_FOLDED_PAIRED`]) to its [`PairedAccept`], until an `accept` program takes
/// it. Such a socket requests no state changes, because its connecting end's flow counts the
/// connection. When the map is full, the socket goes to [`MAP_SOCKETS`] with its state changes
/// instead. The agent removes entries older than [`PAIRED_ACCEPT_MAX_AGE_NS`]: those of sockets
/// that no `accept` system call took (an io_uring accept, a listener closed first).
pub const MAP_PAIRED_ACCEPTS: &str = "PAIRED_ACCEPTS";
/// Per-CPU scratch space of the `sock_ops` program for its decision on an accepted connection,
/// kept off its stack.
pub const MAP_ACCEPT_SCRATCH: &str = "ACCEPT_SCRATCH";

/// Hash map of the io_uring accepts waiting for a completion ([`UringRequest`] to `u64`), whose
/// completions name the accepting process.
pub const MAP_URING_ACCEPTS: &str = "URING_ACCEPTS";

/// One-entry array: the number of entries in [`MAP_URING_ACCEPTS`] under a request, so that a
/// completion on a host with no io_uring accept waiting ends before the map lookup.
pub const MAP_URING_WAITING: &str = "URING_WAITING";

/// Every map the eBPF object defines.
pub const MAPS: &[&str] = &[
    MAP_EVENTS,
    MAP_COUNTERS,
    MAP_EXEC_ARGS,
    MAP_ARGV_SCRATCH,
    MAP_EXIT_CODES,
    MAP_SOCKETS,
    MAP_LISTENERS,
    MAP_UDP_FLOWS,
    MAP_SEEDED_CONNECTIONS,
    MAP_UDP_BINDS,
    MAP_FOLDS,
    MAP_FOLD_WINDOW,
    MAP_TCP_PAIRS,
    MAP_ACCEPT_SCRATCH,
    MAP_PAIRED_ACCEPTS,
    MAP_URING_ACCEPTS,
    MAP_URING_WAITING,
];

/// `u32`: tgid of the agent, whose own activity is not reported.
pub const GLOBAL_AGENT_TGID: &str = "AGENT_TGID";
/// `u32`: 1 when only processes inside the scope cgroup are reported.
pub const GLOBAL_SCOPE_ENABLED: &str = "SCOPE_ENABLED";
/// `u64`: cgroup v2 id of the scope cgroup.
pub const GLOBAL_SCOPE_CGROUP_ID: &str = "SCOPE_CGROUP_ID";
/// `u32`: depth of the scope cgroup below the cgroup v2 root (the root is level 0).
pub const GLOBAL_SCOPE_CGROUP_LEVEL: &str = "SCOPE_CGROUP_LEVEL";
/// `u32`: byte offset of `skc_net` in `struct sock_common`.
pub const GLOBAL_OFFSET_SKC_NET: &str = "OFFSET_SKC_NET";
/// `u32`: byte offset of `ns.inum` in `struct net`.
pub const GLOBAL_OFFSET_NET_INUM: &str = "OFFSET_NET_INUM";
/// `u32`: 1 when the two offsets above are valid; the network namespace is reported as 0 otherwise.
pub const GLOBAL_NETNS_OFFSETS_VALID: &str = "NETNS_OFFSETS_VALID";
/// [`KernelOffsets`]: task, file and TCP socket member offsets from the running kernel's BTF.
pub const GLOBAL_KERNEL_OFFSETS: &str = "KERNEL_OFFSETS";
/// [`AcceptOffsets`]: offsets that lead from a task's file descriptor to its socket's addresses.
pub const GLOBAL_ACCEPT_OFFSETS: &str = "ACCEPT_OFFSETS";
/// [`UringOffsets`]: where an io_uring accept request keeps its fixed-file slot.
pub const GLOBAL_URING_OFFSETS: &str = "URING_OFFSETS";

/// Every global variable the loader sets before the programs load.
pub const GLOBALS: &[&str] = &[
    GLOBAL_AGENT_TGID,
    GLOBAL_SCOPE_ENABLED,
    GLOBAL_SCOPE_CGROUP_ID,
    GLOBAL_SCOPE_CGROUP_LEVEL,
    GLOBAL_OFFSET_SKC_NET,
    GLOBAL_OFFSET_NET_INUM,
    GLOBAL_NETNS_OFFSETS_VALID,
    GLOBAL_KERNEL_OFFSETS,
    GLOBAL_ACCEPT_OFFSETS,
    GLOBAL_URING_OFFSETS,
];

/// One tracepoint program: its function name in the eBPF object and where it attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramSpec {
    /// Function (and program) name in the object.
    pub name: &'static str,
    /// Tracepoint category, the directory under `events/` in tracefs.
    pub category: &'static str,
    /// Tracepoint name inside the category.
    pub tracepoint: &'static str,
    /// When true, the agent does not start without this hook.
    pub required: bool,
    /// Record fields the program reads at fixed offsets. The loader checks them against the
    /// tracepoint's format in tracefs, and leaves the program unattached when one differs.
    pub fields: &'static [TracepointField],
}

/// A field of a tracepoint's record, as its format file in tracefs lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TracepointField {
    pub name: &'static str,
    pub offset: u32,
    pub size: u32,
}

/// `io_uring:io_uring_submit_req` fields: the ring, the request, its user data and its opcode.
pub const URING_SUBMIT_RING: TracepointField = TracepointField { name: "ctx", offset: 8, size: 8 };
pub const URING_SUBMIT_REQ: TracepointField = TracepointField { name: "req", offset: 16, size: 8 };
pub const URING_SUBMIT_USER_DATA: TracepointField = TracepointField { name: "user_data", offset: 24, size: 8 };
pub const URING_SUBMIT_OPCODE: TracepointField = TracepointField { name: "opcode", offset: 32, size: 1 };
/// `io_uring:io_uring_complete` fields: the ring, the request, its user data, result and flags.
pub const URING_COMPLETE_RING: TracepointField = TracepointField { name: "ctx", offset: 8, size: 8 };
pub const URING_COMPLETE_REQ: TracepointField = TracepointField { name: "req", offset: 16, size: 8 };
pub const URING_COMPLETE_USER_DATA: TracepointField = TracepointField { name: "user_data", offset: 24, size: 8 };
pub const URING_COMPLETE_RES: TracepointField = TracepointField { name: "res", offset: 32, size: 4 };
pub const URING_COMPLETE_CFLAGS: TracepointField = TracepointField { name: "cflags", offset: 36, size: 4 };

/// Program names of the io_uring accept hooks.
pub const URING_SUBMIT_PROGRAM: &str = "io_uring_submit_req";
pub const URING_COMPLETE_PROGRAM: &str = "io_uring_complete";

/// Every program in the eBPF object.
pub const PROGRAMS: &[ProgramSpec] = &[
    ProgramSpec {
        name: "sys_enter_execve",
        category: "syscalls",
        tracepoint: "sys_enter_execve",
        required: false,
        fields: &[],
    },
    ProgramSpec {
        name: "sys_enter_execveat",
        category: "syscalls",
        tracepoint: "sys_enter_execveat",
        required: false,
        fields: &[],
    },
    ProgramSpec {
        name: "sys_exit_execve",
        category: "syscalls",
        tracepoint: "sys_exit_execve",
        required: false,
        fields: &[],
    },
    ProgramSpec {
        name: "sys_exit_execveat",
        category: "syscalls",
        tracepoint: "sys_exit_execveat",
        required: false,
        fields: &[],
    },
    ProgramSpec {
        name: "sched_process_exec",
        category: "sched",
        tracepoint: "sched_process_exec",
        required: true,
        fields: &[],
    },
    ProgramSpec {
        name: "sched_process_fork",
        category: "sched",
        tracepoint: "sched_process_fork",
        required: true,
        fields: &[],
    },
    ProgramSpec {
        name: "sys_enter_exit_group",
        category: "syscalls",
        tracepoint: "sys_enter_exit_group",
        required: false,
        fields: &[],
    },
    ProgramSpec {
        name: "sched_process_exit",
        category: "sched",
        tracepoint: "sched_process_exit",
        required: true,
        fields: &[],
    },
    ProgramSpec {
        name: "inet_sock_set_state",
        category: "sock",
        tracepoint: "inet_sock_set_state",
        required: true,
        fields: &[],
    },
    ProgramSpec {
        name: "sys_exit_setuid",
        category: "syscalls",
        tracepoint: "sys_exit_setuid",
        required: false,
        fields: &[],
    },
    ProgramSpec {
        name: "sys_exit_setgid",
        category: "syscalls",
        tracepoint: "sys_exit_setgid",
        required: false,
        fields: &[],
    },
    ProgramSpec {
        name: "sys_exit_setreuid",
        category: "syscalls",
        tracepoint: "sys_exit_setreuid",
        required: false,
        fields: &[],
    },
    ProgramSpec {
        name: "sys_exit_setregid",
        category: "syscalls",
        tracepoint: "sys_exit_setregid",
        required: false,
        fields: &[],
    },
    ProgramSpec {
        name: "sys_exit_setresuid",
        category: "syscalls",
        tracepoint: "sys_exit_setresuid",
        required: false,
        fields: &[],
    },
    ProgramSpec {
        name: "sys_exit_setresgid",
        category: "syscalls",
        tracepoint: "sys_exit_setresgid",
        required: false,
        fields: &[],
    },
    ProgramSpec {
        name: "sys_exit_capset",
        category: "syscalls",
        tracepoint: "sys_exit_capset",
        required: false,
        fields: &[],
    },
    ProgramSpec {
        name: "sys_exit_accept",
        category: "syscalls",
        tracepoint: "sys_exit_accept",
        required: false,
        fields: &[],
    },
    ProgramSpec {
        name: "sys_exit_accept4",
        category: "syscalls",
        tracepoint: "sys_exit_accept4",
        required: false,
        fields: &[],
    },
    ProgramSpec {
        name: URING_SUBMIT_PROGRAM,
        category: "io_uring",
        tracepoint: "io_uring_submit_req",
        required: false,
        fields: &[URING_SUBMIT_RING, URING_SUBMIT_REQ, URING_SUBMIT_USER_DATA, URING_SUBMIT_OPCODE],
    },
    ProgramSpec {
        name: URING_COMPLETE_PROGRAM,
        category: "io_uring",
        tracepoint: "io_uring_complete",
        required: false,
        fields: &[URING_COMPLETE_RING, URING_COMPLETE_REQ, URING_COMPLETE_USER_DATA, URING_COMPLETE_RES, URING_COMPLETE_CFLAGS],
    },
];

/// Attach point of a cgroup program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupHook {
    /// `BPF_CGROUP_INET4_CONNECT`: `connect()` on an IPv4 socket (or an IPv4-mapped address).
    Connect4,
    /// `BPF_CGROUP_INET6_CONNECT`.
    Connect6,
    /// `BPF_CGROUP_UDP4_SENDMSG`: a datagram sent with a destination address (`sendto`,
    /// `sendmsg`, io_uring `IORING_OP_SENDMSG`), not on a connected socket without one.
    UdpSendmsg4,
    /// `BPF_CGROUP_UDP6_SENDMSG`.
    UdpSendmsg6,
    /// `BPF_CGROUP_UDP4_RECVMSG`: a datagram read with the sender's address (`recvfrom`,
    /// `recvmsg`).
    UdpRecvmsg4,
    /// `BPF_CGROUP_UDP6_RECVMSG`.
    UdpRecvmsg6,
    /// `BPF_CGROUP_INET4_BIND`: `bind()` on an IPv4 socket, before the kernel binds it.
    Bind4,
    /// `BPF_CGROUP_INET6_BIND`.
    Bind6,
    /// `BPF_CGROUP_INET4_POST_BIND`: an IPv4 socket that `bind()` bound.
    PostBind4,
    /// `BPF_CGROUP_INET6_POST_BIND`.
    PostBind6,
    /// `BPF_CGROUP_INET_INGRESS`: packets delivered to a socket of the cgroup.
    SkbIngress,
}

/// One cgroup program: its function name in the eBPF object and its hook. The agent attaches it
/// to the scope cgroup, or to the cgroup v2 root when there is no scope, so it runs only for
/// sockets created in that subtree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupProgramSpec {
    pub name: &'static str,
    pub hook: CgroupHook,
    /// When true, the agent does not start without this hook.
    pub required: bool,
}

/// Every cgroup program in the eBPF object.
pub const CGROUP_PROGRAMS: &[CgroupProgramSpec] = &[
    CgroupProgramSpec { name: "udp_connect4", hook: CgroupHook::Connect4, required: false },
    CgroupProgramSpec { name: "udp_connect6", hook: CgroupHook::Connect6, required: false },
    CgroupProgramSpec { name: "udp_sendmsg4", hook: CgroupHook::UdpSendmsg4, required: false },
    CgroupProgramSpec { name: "udp_sendmsg6", hook: CgroupHook::UdpSendmsg6, required: false },
    CgroupProgramSpec { name: "udp_recvmsg4", hook: CgroupHook::UdpRecvmsg4, required: false },
    CgroupProgramSpec { name: "udp_recvmsg6", hook: CgroupHook::UdpRecvmsg6, required: false },
    CgroupProgramSpec { name: "udp_bind4", hook: CgroupHook::Bind4, required: false },
    CgroupProgramSpec { name: "udp_bind6", hook: CgroupHook::Bind6, required: false },
    CgroupProgramSpec { name: "udp_post_bind4", hook: CgroupHook::PostBind4, required: false },
    CgroupProgramSpec { name: "udp_post_bind6", hook: CgroupHook::PostBind6, required: false },
    CgroupProgramSpec { name: "dns_ingress", hook: CgroupHook::SkbIngress, required: false },
];

/// The `sock_ops` program that reports TCP state changes in place of the `inet_sock_set_state`
/// tracepoint program when the kernel accepts it. It attaches to the cgroup v2 root, also under
/// a scope, so that it also reports the sockets of processes that moved into the scope.
pub const TCP_SOCK_OPS_PROGRAM: &str = "tcp_sock_ops";

/// The tracepoint program that [`TCP_SOCK_OPS_PROGRAM`] replaces.
pub const TCP_TRACEPOINT_PROGRAM: &str = "inet_sock_set_state";

/// Every symbol the BPF link step must keep: programs, then maps, then globals.
pub fn export_names() -> impl Iterator<Item = &'static str> {
    PROGRAMS
        .iter()
        .map(|program| program.name)
        .chain(CGROUP_PROGRAMS.iter().map(|program| program.name))
        .chain([TCP_SOCK_OPS_PROGRAM])
        .chain(MAPS.iter().copied())
        .chain(GLOBALS.iter().copied())
}

/// Default size of the [`MAP_EVENTS`] ring buffer in bytes.
pub const DEFAULT_RING_BUFFER_BYTES: u32 = 8 << 20;
/// Maximum number of `execve` calls in flight at once whose argv is stashed.
pub const EXEC_ARGS_MAX_ENTRIES: u32 = 2048;
/// Maximum number of processes whose `exit_group` status waits for their exit.
pub const EXIT_CODES_MAX_ENTRIES: u32 = 16384;
/// Maximum number of TCP sockets tracked between connect (or accept) and close.
pub const SOCKETS_MAX_ENTRIES: u32 = 65536;
/// Maximum number of listening sockets tracked.
pub const LISTENERS_MAX_ENTRIES: u32 = 8192;
/// Maximum number of UDP flows remembered in [`MAP_UDP_FLOWS`]. When it is full the least
/// recently used flow is forgotten, and its next datagram is reported again as a new flow.
pub const UDP_FLOWS_MAX_ENTRIES: u32 = 16384;
/// Maximum number of UDP binds in progress in [`MAP_UDP_BINDS`], one per thread inside
/// `bind()`. A bind that fails leaves its entry behind until the thread binds again or the entry
/// is the least recently used one.
pub const UDP_BINDS_MAX_ENTRIES: u32 = 1024;
/// Bytes of a DNS message captured in a [`DnsRecord`]: the classic UDP limit of 512 bytes (RFC
/// 1035) plus room for the EDNS answers most resolvers send. Longer messages are cut.
pub const DNS_CAPTURE_BYTES: usize = 1024;
/// UDP port of DNS.
pub const DNS_PORT: u16 = 53;
/// Maximum number of connections seeded from /proc whose close the kernel attributes.
pub const SEEDED_CONNECTIONS_MAX_ENTRIES: u32 = 16384;
/// Maximum number of folded TCP flows in [`MAP_FOLDS`]. When it is full, connections of flows
/// not in it are reported one by one.
pub const FOLDS_MAX_ENTRIES: u32 = 16384;
/// Maximum number of connections in [`MAP_TCP_PAIRS`] between their connect and their accept.
pub const TCP_PAIRS_MAX_ENTRIES: u32 = 8192;
/// Maximum number of accepted connections in [`MAP_PAIRED_ACCEPTS`] waiting for their accept.
pub const PAIRED_ACCEPTS_MAX_ENTRIES: u32 = 8192;
/// Maximum number of entries in [`MAP_URING_ACCEPTS`]: one per waiting io_uring accept, and one
/// per ring and user data of those.
pub const URING_ACCEPTS_MAX_ENTRIES: u32 = 8192;
/// Age after which the agent removes an entry of [`MAP_PAIRED_ACCEPTS`]: two minutes, far longer
/// than a connection usually waits in a listen queue.
pub const PAIRED_ACCEPT_MAX_AGE_NS: u64 = 120_000_000_000;

/// Maximum number of argv entries captured.
pub const ARGV_MAX_ARGS: u32 = 16;
/// Bytes of argv captured: the arguments, each with its trailing NUL.
pub const ARGV_CAPTURE_BYTES: usize = 1024;
/// Scratch size of [`ArgvStash::data`]: twice the capture size, so that the verifier can prove a
/// string read of up to [`ARGV_CAPTURE_BYTES`] at any offset below it stays inside the buffer.
pub const ARGV_SCRATCH_BYTES: usize = 2 * ARGV_CAPTURE_BYTES;
/// Bytes of the executable path captured, including the trailing NUL.
pub const FILENAME_BYTES: usize = 512;
/// Length of a task's `comm`, including the trailing NUL (`TASK_COMM_LEN`).
pub const COMM_BYTES: usize = 16;

/// Kind of a record, the first field of [`RecordHeader`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum RecordKind {
    Exec = 1,
    Fork = 2,
    Exit = 3,
    Tcp = 4,
    Credentials = 5,
    Udp = 6,
    Dns = 7,
    Accept = 8,
}

/// A `kind` number that no [`RecordKind`] has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownValue(pub u32);

impl TryFrom<u32> for RecordKind {
    type Error = UnknownValue;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        match value {
            1 => Ok(Self::Exec),
            2 => Ok(Self::Fork),
            3 => Ok(Self::Exit),
            4 => Ok(Self::Tcp),
            5 => Ok(Self::Credentials),
            6 => Ok(Self::Udp),
            7 => Ok(Self::Dns),
            8 => Ok(Self::Accept),
            other => Err(UnknownValue(other)),
        }
    }
}

/// First bytes of every record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct RecordHeader {
    /// A [`RecordKind`] number.
    pub kind: u32,
    /// Process id (tgid) of the task the record is about; 0 when not known.
    pub pid: u32,
    /// Thread id of that task; 0 when not known.
    pub tid: u32,
    pub _reserved: u32,
    /// `bpf_ktime_get_ns`, `CLOCK_MONOTONIC` nanoseconds.
    pub ktime_ns: u64,
    /// cgroup v2 id of the current task; 0 in records written outside process context.
    pub cgroup_id: u64,
}

/// [`ExecRecord::flags`] bit: argv had more arguments or bytes than were captured.
pub const EXEC_FLAG_ARGV_TRUNCATED: u32 = 1;
/// [`ExecRecord::flags`] bit: no argv was stashed at syscall entry (the hook was missing or the
/// stash was full), so `argv` is empty.
pub const EXEC_FLAG_ARGV_MISSING: u32 = 2;
/// [`ExecRecord::flags`] bit: the filename was longer than [`FILENAME_BYTES`] and was cut.
pub const EXEC_FLAG_FILENAME_TRUNCATED: u32 = 4;

/// [`ExecRecord::flags`] bit: the executable file had no name left in any directory when the
/// record was written (a memfd, or a file unlinked before or during the exec).
pub const EXEC_FLAG_EXE_UNLINKED: u32 = 8;
/// [`ExecRecord::flags`] bit: the executable file could not be read through the task
/// ([`KernelOffsets`] missing or a read failed), so `exe_name` is empty and
/// [`EXEC_FLAG_EXE_UNLINKED`] means nothing.
pub const EXEC_FLAG_EXE_UNKNOWN: u32 = 16;
/// [`ExecRecord::flags`] bit: `parent_tgid` and the start times could not be read.
pub const EXEC_FLAG_LINEAGE_UNKNOWN: u32 = 32;

/// Bytes of the executable's own file name (the last path component) captured.
pub const EXE_NAME_BYTES: usize = 64;

/// Parent and start times of a process, read from its task in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct Lineage {
    /// tgid of the task's current parent (`real_parent`), which the kernel updates when the
    /// parent exits and the task is reparented; 0 when not known.
    pub parent_tgid: u32,
    pub _reserved: u32,
    /// Start of the process (its thread group leader) in nanoseconds since boot, including
    /// suspend, which `/proc/<pid>/stat` reports in clock ticks. With the tgid it names one
    /// process even after the pid is reused.
    pub start_boottime_ns: u64,
    /// The same for the parent process.
    pub parent_start_boottime_ns: u64,
}

/// A successful exec (`sched:sched_process_exec`).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct ExecRecord {
    /// `pid` is the tgid after the exec, `tid` the thread id that called exec.
    pub header: RecordHeader,
    pub uid: u32,
    pub gid: u32,
    /// `EXEC_FLAG_*` bits.
    pub flags: u32,
    /// Number of bytes of `filename`, without the trailing NUL.
    pub filename_len: u32,
    /// Number of bytes of `argv`: NUL-terminated arguments one after the other.
    pub argv_len: u32,
    pub _reserved: u32,
    pub comm: [u8; COMM_BYTES],
    pub filename: [u8; FILENAME_BYTES],
    pub argv: [u8; ARGV_CAPTURE_BYTES],
    pub lineage: Lineage,
    /// Number of bytes of `exe_name`, without the trailing NUL.
    pub exe_name_len: u32,
    pub _reserved2: u32,
    /// Directory entry name of the file the process now runs (`memfd:<name>` for a memfd, the
    /// interpreter's name for a script): the file the kernel mapped, which `filename` does not
    /// name after `fexecve` or for a script.
    pub exe_name: [u8; EXE_NAME_BYTES],
    /// Process id inside the task's own pid namespace; 0 when unknown.
    pub ns_pid: u32,
    /// Depth of that pid namespace, 0 for the host's.
    pub ns_level: u32,
}

/// A new task (`sched:sched_process_fork`); `header.pid` is the parent's tgid.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct ForkRecord {
    pub header: RecordHeader,
    /// Id of the new task (a thread id when the parent created a thread).
    pub child_pid: u32,
    pub _reserved: u32,
}

/// A task exited (`sched:sched_process_exit`).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct ExitRecord {
    pub header: RecordHeader,
    /// Status as `wait(2)` reports it; valid when `has_exit_code` is 1.
    pub exit_code: i32,
    pub has_exit_code: u32,
    /// 1 when this was the last thread of the process.
    pub group_dead: u32,
    pub _reserved: u32,
    pub lineage: Lineage,
}

/// TCP event type, stored in [`TcpRecord::event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum TcpKind {
    Connect = 1,
    Connected = 2,
    ConnectFailed = 3,
    Listen = 4,
    /// The handshake of an accepted connection completed. When the connecting end ran on this
    /// host and its records were folded, the header's `tid` is that process and its `_reserved`
    /// the connecting socket's network namespace, so that the connection joins both ends.
    Accepted = 5,
    Close = 6,
}

impl TryFrom<u32> for TcpKind {
    type Error = UnknownValue;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        match value {
            1 => Ok(Self::Connect),
            2 => Ok(Self::Connected),
            3 => Ok(Self::ConnectFailed),
            4 => Ok(Self::Listen),
            5 => Ok(Self::Accepted),
            6 => Ok(Self::Close),
            other => Err(UnknownValue(other)),
        }
    }
}

/// `AF_INET`.
pub const FAMILY_INET: u16 = 2;
/// `AF_INET6`.
pub const FAMILY_INET6: u16 = 10;

/// A TCP state change (`sock:inet_sock_set_state`).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct TcpRecord {
    /// `pid` is the owning process, 0 when the kernel program does not know it.
    pub header: RecordHeader,
    /// A [`TcpKind`] number.
    pub event: u32,
    /// Inode number of the socket's network namespace, 0 when unknown.
    pub netns: u32,
    /// Kernel address of the socket, pairing the records of one connection.
    pub skaddr: u64,
    /// [`FAMILY_INET`] or [`FAMILY_INET6`].
    pub family: u16,
    /// Local port, host byte order.
    pub sport: u16,
    /// Remote port, host byte order.
    pub dport: u16,
    pub _reserved: u16,
    /// Local address: the first 4 bytes for IPv4, all 16 for IPv6, network byte order.
    pub saddr: [u8; 16],
    /// Remote address, same layout as `saddr`.
    pub daddr: [u8; 16],
    /// Payload bytes sent, each once (`tcp_sock.bytes_sent - bytes_retrans`), counted by the
    /// kernel's TCP stack; final in a [`TcpKind::Close`] record. 0 when the offsets are unknown.
    pub bytes_sent: u64,
    /// Payload bytes received (`tcp_sock.bytes_received`, less the sequence number a received
    /// FIN takes), the same way.
    pub bytes_received: u64,
    /// The socket's pending error (`sock.sk_err`), 0 when none or unknown. It is `ECONNREFUSED`
    /// when the peer sent a reset in reply to the SYN, and `ETIMEDOUT` when the SYN retries ran out.
    pub sk_err: i32,
    /// `TCP_FLAG_*` bits.
    pub flags: u32,
    /// The owning process's lineage, for records written in its context (Connect, Listen).
    pub lineage: Lineage,
}

/// [`TcpRecord::flags`] bit: the calling process runs an executable that has no name left in any
/// directory (deleted after it started, or a memfd). Only set in Connect and Listen records.
pub const TCP_FLAG_EXE_UNLINKED: u32 = 1;
/// [`TcpRecord::flags`] bit: `bytes_sent`, `bytes_received` and `sk_err` were read.
pub const TCP_FLAG_SOCKET_READ: u32 = 2;

/// Kind of a [`UdpRecord`], stored in [`UdpRecord::event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum UdpKind {
    /// The first datagram of a flow sent with a destination address (`sendto`, `sendmsg`).
    Send = 1,
    /// `connect()` on a UDP socket: every later `send()` on it goes to this destination.
    Connect = 2,
    /// The first datagram from a peer that the process read with the peer's address
    /// (`recvfrom`, `recvmsg`); the record's destination fields are the sender's.
    Receive = 3,
    /// A successful `bind()` to a port the process chose: the socket receives datagrams there,
    /// the UDP form of a listener. The source fields are the bound address and port, and the
    /// destination fields are zero. Binds to port 0, which take an ephemeral port, are not
    /// reported.
    Bind = 4,
}

impl TryFrom<u32> for UdpKind {
    type Error = UnknownValue;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        match value {
            1 => Ok(Self::Send),
            3 => Ok(Self::Receive),
            2 => Ok(Self::Connect),
            4 => Ok(Self::Bind),
            other => Err(UnknownValue(other)),
        }
    }
}

/// A new UDP flow, from the cgroup `sendmsg4/6` and `connect4/6` hooks, in the sending process's
/// context. These hooks sit below the system calls, so sends issued through io_uring arrive
/// here too.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct UdpRecord {
    /// `pid` and `tid` are the sender, or the receiver for [`UdpKind::Receive`]; `cgroup_id` its
    /// cgroup.
    pub header: RecordHeader,
    /// A [`UdpKind`] number.
    pub event: u32,
    /// Inode number of the socket's network namespace, 0 when unknown.
    pub netns: u32,
    /// Socket cookie (`bpf_get_socket_cookie`), which [`DnsRecord::cookie`] carries too.
    pub cookie: u64,
    /// [`FAMILY_INET`] or [`FAMILY_INET6`]: the family of the destination address.
    pub family: u16,
    /// Local port, host byte order; 0 when the socket is not bound yet (a connect before the
    /// first send).
    pub sport: u16,
    /// Remote port, host byte order.
    pub dport: u16,
    pub _reserved: u16,
    /// Local address the socket is bound to, all zeros when unbound; same layout as `daddr`.
    pub saddr: [u8; 16],
    /// Remote address (the destination, or the sender for [`UdpKind::Receive`]): the first 4
    /// bytes for IPv4, all 16 for IPv6, network byte order.
    pub daddr: [u8; 16],
}

/// Key type of [`MAP_UDP_FLOWS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct UdpFlowKey {
    pub pid: u32,
    pub netns: u32,
    /// The socket cookie for DNS flows, whose answers are joined to the asking process by it;
    /// 0 for every other flow, so that a process sending from many sockets to one destination
    /// is still one flow.
    pub cookie: u64,
    pub family: u16,
    pub dport: u16,
    /// A [`UdpKind`] number, so that a connect after a send to the same place is still reported.
    pub event: u16,
    /// The local port for [`UdpKind::Receive`], so that a sender that reaches a second port of
    /// the same process is reported again; 0 for sends and connects.
    pub sport: u16,
    pub daddr: [u8; 16],
}

/// Value type of [`MAP_UDP_FLOWS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct UdpFlowCounts {
    /// Datagrams sent with a destination address, or read with a sender's address, on this flow
    /// (connects count one each).
    pub packets: u64,
    /// `bpf_ktime_get_ns` of the last one.
    pub last_ns: u64,
}

/// A DNS message received on a socket in scope, from the cgroup `skb` ingress hook: a UDP
/// datagram from port 53. It runs in softirq context, so `header.pid` is 0 and the socket cookie
/// names the socket that asked.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct DnsRecord {
    pub header: RecordHeader,
    /// Socket cookie of the receiving socket.
    pub cookie: u64,
    /// [`FAMILY_INET`] or [`FAMILY_INET6`].
    pub family: u16,
    /// Server port, host byte order (53).
    pub sport: u16,
    /// Local port the message went to, host byte order.
    pub dport: u16,
    pub _reserved: u16,
    /// Length of the whole DNS message, which may be more than was captured.
    pub message_len: u32,
    /// Bytes of `data` filled, at most [`DNS_CAPTURE_BYTES`].
    pub captured_len: u32,
    /// Address of the server, same layout as [`UdpRecord::daddr`].
    pub saddr: [u8; 16],
    /// The DNS message from its header on.
    pub data: [u8; DNS_CAPTURE_BYTES],
}

/// Member offsets in kernel structs, resolved from the running kernel's BTF at start-up and
/// passed to the programs as [`GLOBAL_KERNEL_OFFSETS`]. A group whose `*_valid` field is 0 is
/// not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct KernelOffsets {
    /// 1 when the `task_*` offsets are valid.
    pub task_valid: u32,
    pub task_real_parent: u32,
    pub task_group_leader: u32,
    pub task_tgid: u32,
    pub task_start_boottime: u32,
    /// 1 when the executable file offsets (`task_mm` to `inode_nlink`) are valid.
    pub exe_valid: u32,
    pub task_mm: u32,
    pub mm_exe_file: u32,
    /// `file.f_path.dentry`.
    pub file_dentry: u32,
    /// `dentry.d_name.name`.
    pub dentry_name: u32,
    pub dentry_inode: u32,
    pub inode_nlink: u32,
    /// 1 when the TCP socket offsets are valid.
    pub tcp_valid: u32,
    pub tcp_bytes_sent: u32,
    pub tcp_bytes_retrans: u32,
    pub tcp_bytes_received: u32,
    pub sock_err: u32,
    /// `sock.sk_shutdown`, a byte on the kernels that have the counters above.
    pub sock_shutdown: u32,
    /// 1 when the pid namespace offsets are valid.
    pub pid_valid: u32,
    pub task_thread_pid: u32,
    /// `pid.level`: depth of the task's pid namespace (0 for the initial one).
    pub pid_level: u32,
    /// `pid.numbers`, an array of `struct upid`, one per level.
    pub pid_numbers: u32,
    pub upid_nr: u32,
    pub upid_size: u32,
    /// 1 when the credential offsets are valid.
    pub cred_valid: u32,
    /// `task_struct.cred`, the credentials the task acts with.
    pub task_cred: u32,
    pub cred_uid: u32,
    pub cred_euid: u32,
    pub cred_gid: u32,
    pub cred_egid: u32,
    pub cred_cap_effective: u32,
    pub _reserved: u32,
}

/// System call that changed credentials, stored in [`CredRecord::syscall`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CredSyscall {
    Setuid = 1,
    Setgid = 2,
    Setreuid = 3,
    Setregid = 4,
    Setresuid = 5,
    Setresgid = 6,
    Capset = 7,
}

impl TryFrom<u32> for CredSyscall {
    type Error = UnknownValue;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        match value {
            1 => Ok(Self::Setuid),
            2 => Ok(Self::Setgid),
            3 => Ok(Self::Setreuid),
            4 => Ok(Self::Setregid),
            5 => Ok(Self::Setresuid),
            6 => Ok(Self::Setresgid),
            7 => Ok(Self::Capset),
            other => Err(UnknownValue(other)),
        }
    }
}

/// A successful credential change, written at the system call's exit with the credentials the
/// task has afterwards.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct CredRecord {
    pub header: RecordHeader,
    /// A [`CredSyscall`] number.
    pub syscall: u32,
    /// 1 when the fields below were read; 0 when the credential offsets are unknown.
    pub read: u32,
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub egid: u32,
    /// Effective capability bits.
    pub cap_effective: u64,
}

/// A process took a connection off a listening socket: `accept()` or `accept4()` returned the new
/// file descriptor `fd`, and `skaddr` is the `struct sock` behind it, the same address that the
/// [`TcpRecord`] of the connection's [`TcpKind::Accepted`] carries. The addresses are read from
/// the socket itself, so the record is complete when that `Accepted` record was never written.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct AcceptRecord {
    /// `pid` and `tid` are the accepting process and thread. They are 0, with no cgroup, when a
    /// process outside the cgroup scope accepted a connection of a listener in scope.
    pub header: RecordHeader,
    pub skaddr: u64,
    pub fd: u32,
    /// `TCP_FLAG_EXE_UNLINKED` when the accepting process runs a deleted executable.
    pub flags: u32,
    /// Inode number of the socket's network namespace, 0 when unknown.
    pub netns: u32,
    /// [`FAMILY_INET`] or [`FAMILY_INET6`].
    pub family: u16,
    /// Local port, host byte order.
    pub sport: u16,
    /// Remote port, host byte order.
    pub dport: u16,
    pub _reserved: u16,
    pub _reserved2: u32,
    /// Local address, laid out as in [`TcpRecord::saddr`].
    pub saddr: [u8; 16],
    /// Remote address, laid out as in [`TcpRecord::daddr`].
    pub daddr: [u8; 16],
    /// The accepting process's lineage, read from its task.
    pub lineage: Lineage,
}

/// Member offsets that lead from a task to the socket behind one of its file descriptors
/// (`task->files->fdt->fd[n]->private_data->sk`) and to that socket's addresses, resolved from
/// BTF like [`KernelOffsets`] and passed as [`GLOBAL_ACCEPT_OFFSETS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct AcceptOffsets {
    /// 1 when every offset below is valid; the accept programs write nothing otherwise.
    pub valid: u32,
    /// `task_struct.files`.
    pub task_files: u32,
    /// `files_struct.fdt`.
    pub files_fdt: u32,
    /// `fdtable.max_fds`.
    pub fdtable_max_fds: u32,
    /// `fdtable.fd`, an array of `struct file *`.
    pub fdtable_fd: u32,
    /// `file.private_data`, the `struct socket *` of a socket file.
    pub file_private_data: u32,
    /// `socket.sk`.
    pub socket_sk: u32,
    /// `socket.file`, which points back to the file of a socket and so proves the file is one.
    pub socket_file: u32,
    /// `sock_common.skc_family`.
    pub skc_family: u32,
    /// `sock_common.skc_num`: the local port in host byte order.
    pub skc_num: u32,
    /// `sock_common.skc_dport`: the remote port in network byte order.
    pub skc_dport: u32,
    /// `sock_common.skc_rcv_saddr`: the local IPv4 address.
    pub skc_rcv_saddr: u32,
    /// `sock_common.skc_daddr`: the remote IPv4 address.
    pub skc_daddr: u32,
    /// `sock_common.skc_v6_rcv_saddr`.
    pub skc_v6_rcv_saddr: u32,
    /// `sock_common.skc_v6_daddr`.
    pub skc_v6_daddr: u32,
    /// `sock_common.skc_cookie`, set once a program requests the socket's cookie.
    pub skc_cookie: u32,
}

/// Argv captured at `execve` entry, the value type of [`MAP_EXEC_ARGS`].
#[derive(Clone, Copy)]
#[repr(C)]
pub struct ArgvStash {
    /// Bytes used in `data`, at most [`ARGV_CAPTURE_BYTES`].
    pub len: u32,
    /// `EXEC_FLAG_ARGV_TRUNCATED` when cut.
    pub flags: u32,
    pub data: [u8; ARGV_SCRATCH_BYTES],
}

/// Value type of [`MAP_SOCKETS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct SockOwner {
    /// Process that called `connect()`, or that accepted the socket: the listener's owner until
    /// an `accept` program names the process that took it off the listener, 0 when unknown.
    pub pid: u32,
    /// `SOCKET_FLAG_*` bits.
    pub flags: u32,
    /// Network namespace inode of the socket, read once when it is first tracked; 0 when unknown.
    pub netns: u32,
    /// [`FoldKey::exec`] of a connecting socket's process at connect time, 0 for others.
    pub exec: u32,
}

/// [`SockOwner::flags`] bit: the socket belongs to the agent; its records are not reported.
pub const SOCKET_FLAG_AGENT: u32 = 1;
/// [`SockOwner::flags`] bit: a connecting socket whose records are counted in its outgoing
/// [`FoldKey`] instead of sent.
pub const SOCKET_FLAG_FOLDED_OUT: u32 = 2;
/// [`SockOwner::flags`] bit: an accepted socket whose records are counted in its incoming
/// [`FoldKey`] instead of sent.
pub const SOCKET_FLAG_FOLDED_IN: u32 = 4;
/// [`SockOwner::flags`] bit: an accepted socket whose connecting end on this host was folded, so
/// that end's flow counts the connection. Its own records are neither sent nor counted, and it is
/// kept in [`MAP_PAIRED_ACCEPTS`] until it is accepted.
pub const SOCKET_FLAG_FOLDED_PAIRED: u32 = 8;
/// Every `SOCKET_FLAG_FOLDED_*` bit.
pub const SOCKET_FLAGS_FOLDED: u32 = SOCKET_FLAG_FOLDED_OUT | SOCKET_FLAG_FOLDED_IN | SOCKET_FLAG_FOLDED_PAIRED;

/// Value type of [`MAP_PAIRED_ACCEPTS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct PairedAccept {
    /// The socket's cookie, which differs from that of a later socket at the same address.
    pub cookie: u64,
    /// When the handshake ended (`bpf_ktime_get_ns`).
    pub ktime_ns: u64,
}

/// Key type of [`MAP_URING_ACCEPTS`]: what a completion of an io_uring request carries.
///
/// Each accept has an entry under its request, valued 0. Beside it, the entry with request 0
/// counts the ring's accepts with that user data: the completions that a multishot accept posts
/// while it stays armed name no request, and find that entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct UringRequest {
    /// `struct io_ring_ctx` address.
    pub ring: u64,
    pub user_data: u64,
    /// `struct io_kiocb` address, 0 in the entry that counts.
    pub req: u64,
}

/// Offsets in an io_uring request, resolved from BTF and passed as [`GLOBAL_URING_OFFSETS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct UringOffsets {
    /// 1 when the offset below is valid; the io_uring programs record nothing otherwise.
    pub valid: u32,
    /// `io_kiocb.cmd` plus `io_accept.file_slot`: nonzero for an accept into a fixed-file slot,
    /// whose result is no descriptor.
    pub accept_file_slot: u32,
}

/// [`FoldKey::direction`] of a flow this host's process connected.
pub const FOLD_OUT: u16 = 1;
/// [`FoldKey::direction`] of a flow accepted on a listener of this host.
pub const FOLD_IN: u16 = 2;

/// Key type of [`MAP_FOLDS`]: a TCP flow as one graph edge, without the client's port.
///
/// An outgoing flow is the connecting process and the server's address and port. An incoming
/// flow is the local address and port the connection reached and the client's address. Its
/// accepting process is the one that the flow's last reported connection named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct FoldKey {
    pub netns: u32,
    /// The connecting process of an outgoing flow, 0 for an incoming one.
    pub pid: u32,
    /// [`FAMILY_INET`] or [`FAMILY_INET6`].
    pub family: u16,
    /// [`FOLD_OUT`] or [`FOLD_IN`].
    pub direction: u16,
    /// Local port of an incoming flow, host byte order; 0 for an outgoing one.
    pub local_port: u16,
    /// Remote port of an outgoing flow, host byte order; 0 for an incoming one.
    pub remote_port: u16,
    /// Local address of an incoming flow, laid out as in [`TcpRecord::saddr`]; zero for an
    /// outgoing one.
    pub local_addr: [u8; 16],
    /// Remote address, laid out as in [`TcpRecord::daddr`].
    pub remote_addr: [u8; 16],
    /// For an outgoing flow, a value that changes when the process runs another program (the
    /// address of its memory map, shifted), so that the new program's first connection is reported;
    /// 0 for an incoming flow or when unknown. Userspace does not use it.
    pub exec: u32,
    pub _reserved: u32,
}

/// Value type of [`MAP_FOLDS`]. The counters only grow; the reader takes differences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct FoldCounts {
    /// Fold epoch (`bpf_ktime_get_coarse_ns`, the monotonic time at the last timer tick, divided
    /// by the [`MAP_FOLD_WINDOW`] value) of the flow's last reported connection. A connection is folded only in that same epoch.
    pub epoch: u64,
    /// Connections folded: connect calls for an outgoing flow, completed handshakes for an
    /// incoming one.
    pub connects: u64,
    /// Folded outgoing connections that completed their handshake.
    pub established: u64,
    /// Folded outgoing connections refused or timed out.
    pub failed: u64,
    /// Folded connections closed after their handshake.
    pub closes: u64,
    /// Payload bytes of the closed folded connections, as in [`TcpRecord::bytes_sent`].
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// `bpf_ktime_get_coarse_ns` of the last change: `CLOCK_MONOTONIC` at the timer tick before
    /// it, up to a tick (a few milliseconds) early.
    pub last_ns: u64,
    /// Folded incoming connections taken back out of `connects`: accepted by a process outside
    /// the scope, or by another process than the flow's last reported acceptor, which then
    /// reports them.
    pub taken_back: u64,
    /// The process that accepted the incoming flow's last reported connection, 0 when unknown.
    pub acceptor: u32,
    pub _reserved: u32,
}

/// Key type of [`MAP_TCP_PAIRS`]: a connection's 4-tuple from its connecting end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct PairKey {
    pub family: u16,
    pub client_port: u16,
    pub server_port: u16,
    pub _reserved: u16,
    pub client_addr: [u8; 16],
    pub server_addr: [u8; 16],
}

/// Value type of [`MAP_TCP_PAIRS`]: the connecting end's choice and its outgoing [`FoldKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct PairValue {
    /// [`PAIR_FOLDED`] or [`PAIR_REPORTED`].
    pub choice: u32,
    /// The connecting process.
    pub pid: u32,
    pub netns: u32,
    pub exec: u32,
    /// The connecting socket's family, which an IPv4-mapped address in the key hides.
    pub family: u16,
    pub _reserved: u16,
    pub _reserved2: u32,
}

/// [`PairValue::choice`]: the connecting end was folded.
pub const PAIR_FOLDED: u32 = 1;
/// [`PairValue::choice`]: the connecting end was reported.
pub const PAIR_REPORTED: u32 = 2;

/// Key type of [`MAP_LISTENERS`]: the address a socket listens on, so that listeners of one port
/// on different addresses stay apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct ListenerKey {
    pub netns: u32,
    /// Local port, host byte order.
    pub port: u16,
    /// [`FAMILY_INET`] or [`FAMILY_INET6`]: a connection is accepted on a socket of its
    /// listener's family, so IPv4 and IPv6 wildcard listeners stay apart.
    pub family: u16,
    /// Local address as the socket's family gives it, laid out as in [`TcpRecord::saddr`]; all
    /// zeros for a wildcard listener.
    pub addr: [u8; 16],
}

/// Key type of [`MAP_SEEDED_CONNECTIONS`]: a connection as `inet_sock_set_state` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct ConnectionKey {
    /// Inode number of the socket's network namespace.
    pub netns: u32,
    /// Local port, host byte order.
    pub sport: u16,
    /// Remote port, host byte order.
    pub dport: u16,
    /// Local address, laid out as in [`TcpRecord::saddr`] for the socket's family: an IPv4
    /// address of an IPv6 socket is IPv4-mapped.
    pub saddr: [u8; 16],
    /// Remote address, the same way.
    pub daddr: [u8; 16],
}

/// Value type of [`MAP_LISTENERS`]: the process that listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct ListenerOwner {
    pub pid: u32,
    /// `LISTENER_FLAG_*` bits.
    pub flags: u32,
    /// Listening sockets on this (netns, port): an IPv4 and an IPv6 socket, or several with
    /// SO_REUSEPORT. The entry goes when the last of them closes.
    pub sockets: u32,
    /// Changes with each listen on the address, so that a new listener starts new incoming
    /// [`FoldKey`]s; 0 for a listener the agent seeded.
    pub serial: u32,
}

/// [`ListenerOwner::flags`] bit: the listener belongs to the agent; its accepts are not reported.
pub const LISTENER_FLAG_AGENT: u32 = 1;

/// [`ListenerOwner::flags`] bit: the listener is outside the cgroup scope. Its entry keeps
/// connections to its address from falling back to a wildcard listener in scope on the port.
pub const LISTENER_FLAG_OUTSIDE_SCOPE: u32 = 2;

/// [`ListenerOwner::flags`] bit: the `sock_ops` program alone requested the state changes of the
/// listening sockets on this (netns, port), and no other program had. Their accepted sockets
/// inherit the request, so one that the agent does not track can drop it. Never set by the
/// tracepoint, nor on seeded entries.
pub const LISTENER_FLAG_OWN_STATE_CHANGES: u32 = 4;

/// Index of a loss counter in [`MAP_COUNTERS`]. Every record that could not be sent and every
/// stash that could not be made adds one to exactly one counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Counter {
    /// `sys_enter_execve(at)`: the argv stash map was full.
    ExecArgsStashFull = 0,
    /// `sys_enter_execve(at)`: no per-CPU scratch space was available.
    ExecArgsScratchMissing = 1,
    /// `sched_process_exec`: the ring buffer was full.
    ExecRingBufferFull = 2,
    /// `sched_process_fork`: the ring buffer was full.
    ForkRingBufferFull = 3,
    /// `sys_enter_exit_group`: the exit status map was full.
    ExitCodeStashFull = 4,
    /// `sched_process_exit`: the ring buffer was full.
    ExitRingBufferFull = 5,
    /// TCP state program (`tcp_sock_ops` or `inet_sock_set_state`): the ring buffer was full.
    TcpRingBufferFull = 6,
    /// TCP state program: the socket owner map was full, so later records of that socket
    /// carry no pid (and are not reported under a cgroup scope).
    TcpSocketMapFull = 7,
    /// TCP state program: the listener map was full, so accepts on that port are not reported
    /// under a cgroup scope.
    TcpListenerMapFull = 8,
    /// `sys_exit_set*id`, `sys_exit_capset`: the ring buffer was full.
    CredRingBufferFull = 9,
    /// `udp_sendmsg4/6`, `udp_connect4/6`: the ring buffer was full, so a new UDP flow was lost.
    UdpRingBufferFull = 10,
    /// `udp_sendmsg4/6`, `udp_connect4/6`: the flow could not be remembered, so its next
    /// datagram is reported again.
    UdpFlowMapFull = 11,
    /// `dns_ingress`: the ring buffer was full, so a DNS answer was lost.
    DnsRingBufferFull = 12,
    /// `sys_exit_accept`, `sys_exit_accept4`: the ring buffer was full, so the connection is
    /// attributed to the listener's owner instead of the process that accepted it.
    AcceptRingBufferFull = 13,
    /// `tcp_sock_ops`: the fold map was full, so the connections of a new flow are reported one
    /// by one instead of counted.
    FoldMapFull = 14,
    /// `io_uring_submit_req`: the map of io_uring accepts was full, so the connections of an
    /// accept are attributed to the listener's owner.
    UringAcceptMapFull = 15,
}

/// Number of [`Counter`] values, the size of [`MAP_COUNTERS`].
pub const COUNTER_COUNT: u32 = 16;

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::ExecArgsStashFull,
        Counter::ExecArgsScratchMissing,
        Counter::ExecRingBufferFull,
        Counter::ForkRingBufferFull,
        Counter::ExitCodeStashFull,
        Counter::ExitRingBufferFull,
        Counter::TcpRingBufferFull,
        Counter::TcpSocketMapFull,
        Counter::TcpListenerMapFull,
        Counter::CredRingBufferFull,
        Counter::UdpRingBufferFull,
        Counter::UdpFlowMapFull,
        Counter::DnsRingBufferFull,
        Counter::AcceptRingBufferFull,
        Counter::FoldMapFull,
        Counter::UringAcceptMapFull,
    ];

    /// Returns the program that increments the counter (`sys_enter_execve` also stands for
    /// `sys_enter_execveat`, `sys_exit_accept` for `sys_exit_accept4`, and `udp_sendmsg4` for
    /// every UDP program, which share the UDP flow map).
    pub const fn program(self) -> &'static str {
        match self {
            Counter::ExecArgsStashFull | Counter::ExecArgsScratchMissing => "sys_enter_execve",
            Counter::ExecRingBufferFull => "sched_process_exec",
            Counter::ForkRingBufferFull => "sched_process_fork",
            Counter::ExitCodeStashFull => "sys_enter_exit_group",
            Counter::ExitRingBufferFull => "sched_process_exit",
            Counter::TcpRingBufferFull
            | Counter::TcpSocketMapFull
            | Counter::TcpListenerMapFull
            | Counter::FoldMapFull => "tcp_state",
            Counter::CredRingBufferFull => "sys_exit_setuid",
            Counter::UdpRingBufferFull | Counter::UdpFlowMapFull => "udp_sendmsg4",
            Counter::DnsRingBufferFull => "dns_ingress",
            Counter::AcceptRingBufferFull => "sys_exit_accept",
            Counter::UringAcceptMapFull => "io_uring_submit_req",
        }
    }

    /// Returns true when the counter counts lost records or attributions. A full fold map loses
    /// nothing, because the connections of a flow it cannot take are reported one by one.
    pub const fn loses_events(self) -> bool {
        !matches!(self, Counter::FoldMapFull)
    }

    /// Returns why the record or stash was lost, as a snake_case identifier for metric names.
    pub const fn reason(self) -> &'static str {
        match self {
            Counter::ExecArgsStashFull => "argv_stash_map_full",
            Counter::ExecArgsScratchMissing => "argv_scratch_buffer_missing",
            Counter::ExecRingBufferFull
            | Counter::ForkRingBufferFull
            | Counter::ExitRingBufferFull
            | Counter::TcpRingBufferFull
            | Counter::CredRingBufferFull
            | Counter::UdpRingBufferFull
            | Counter::DnsRingBufferFull
            | Counter::AcceptRingBufferFull => "ring_buffer_full",
            Counter::UdpFlowMapFull => "udp_flow_map_full",
            Counter::ExitCodeStashFull => "exit_status_map_full",
            Counter::TcpSocketMapFull => "socket_owner_map_full",
            Counter::TcpListenerMapFull => "listener_map_full",
            Counter::FoldMapFull => "fold_map_full",
            Counter::UringAcceptMapFull => "uring_accept_map_full",
        }
    }
}

// The decoder and the kernel programs depend on these exact sizes; a field added without updating
// both sides fails the build here.
const _: () = assert!(size_of::<RecordHeader>() == 32);
const _: () = assert!(
    size_of::<ExecRecord>()
        == 32 + 24 + COMM_BYTES + FILENAME_BYTES + ARGV_CAPTURE_BYTES + 24 + 8 + EXE_NAME_BYTES + 8
);
const _: () = assert!(size_of::<ForkRecord>() == 40);
const _: () = assert!(size_of::<ExitRecord>() == 48 + 24);
const _: () = assert!(size_of::<TcpRecord>() == 32 + 24 + 32 + 24 + 24);
const _: () = assert!(size_of::<Lineage>() == 24);
const _: () = assert!(size_of::<CredRecord>() == 32 + 32);
const _: () = assert!(size_of::<KernelOffsets>() == 32 * 4);
const _: () = assert!(size_of::<AcceptRecord>() == 32 + 32 + 32 + 24);
const _: () = assert!(size_of::<AcceptOffsets>() == 16 * 4);
const _: () = assert!(size_of::<ArgvStash>() == 8 + ARGV_SCRATCH_BYTES);
const _: () = assert!(size_of::<FoldKey>() == 56);
const _: () = assert!(size_of::<FoldCounts>() == 80);
const _: () = assert!(size_of::<PairKey>() == 40);
const _: () = assert!(size_of::<PairValue>() == 24);
const _: () = assert!(size_of::<SockOwner>() == 16);
const _: () = assert!(size_of::<PairedAccept>() == 16);
const _: () = assert!(size_of::<ListenerKey>() == 24);
const _: () = assert!(size_of::<ListenerOwner>() == 16);
const _: () = assert!(size_of::<UdpRecord>() == 32 + 24 + 32);
const _: () = assert!(size_of::<UdpFlowKey>() == 24 + 16);
const _: () = assert!(size_of::<UdpFlowCounts>() == 16);
const _: () = assert!(size_of::<DnsRecord>() == 32 + 24 + 16 + DNS_CAPTURE_BYTES);
const _: () = assert!(size_of::<ConnectionKey>() == 40);
const _: () = assert!(size_of::<UringOffsets>() == 8);
const _: () = assert!(size_of::<UringRequest>() == 24);
const _: () = assert!(Counter::ALL.len() == COUNTER_COUNT as usize);
const _: () = assert!(ARGV_CAPTURE_BYTES.is_power_of_two());
// The DNS program bounds its copy length with a mask of `DNS_CAPTURE_BYTES - 1`.
const _: () = assert!(DNS_CAPTURE_BYTES.is_power_of_two());

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are `#[repr(C)]`, contain only integers and byte arrays, and have no
    // implicit padding (the size assertions above pin every byte), so any bit pattern is valid.
    unsafe impl aya::Pod for RecordHeader {}
    unsafe impl aya::Pod for ExecRecord {}
    unsafe impl aya::Pod for ForkRecord {}
    unsafe impl aya::Pod for ExitRecord {}
    unsafe impl aya::Pod for TcpRecord {}
    unsafe impl aya::Pod for ArgvStash {}
    unsafe impl aya::Pod for SockOwner {}
    unsafe impl aya::Pod for PairedAccept {}
    unsafe impl aya::Pod for ListenerKey {}
    unsafe impl aya::Pod for ListenerOwner {}
    unsafe impl aya::Pod for ConnectionKey {}
    unsafe impl aya::Pod for FoldKey {}
    unsafe impl aya::Pod for FoldCounts {}
    unsafe impl aya::Pod for Lineage {}
    unsafe impl aya::Pod for CredRecord {}
    unsafe impl aya::Pod for KernelOffsets {}
    unsafe impl aya::Pod for UdpRecord {}
    unsafe impl aya::Pod for UdpFlowKey {}
    unsafe impl aya::Pod for UdpFlowCounts {}
    unsafe impl aya::Pod for DnsRecord {}
    unsafe impl aya::Pod for AcceptRecord {}
    unsafe impl aya::Pod for AcceptOffsets {}
    unsafe impl aya::Pod for UringOffsets {}
    unsafe impl aya::Pod for UringRequest {}
}
