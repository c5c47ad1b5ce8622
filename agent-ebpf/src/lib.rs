//! driftwatch kernel programs: process lifecycle (exec, fork, exit), TCP state changes and the
//! process that accepts each connection, UDP flows and DNS answers, written as records into one
//! ring buffer.
//!
//! Only tracepoints and cgroup socket hooks (`sock_addr`, `sock`, `skb`, `sock_ops`) are used,
//! because their record layouts and contexts are stable across kernels, unlike kprobes or struct
//! offsets baked in at build time. The few kernel struct
//! reads use offsets that the agent resolves from the running kernel's BTF and passes in as
//! global data. They cover the socket (network namespace, byte counters, error, addresses), the task
//! (parent, start time, pid namespace, credentials, executable file) and its file table.
//!
//! Every program is a thin entry point calling a `try_` function. No code path may reach a Rust
//! panic: the verifier rejects the whole object when `core::panicking` is linked in, so there is no
//! slice indexing, no `unwrap`, and string reads go through the raw helpers that return a length.

#![no_std]

mod accept;
mod cred;
mod dns;
mod exec;
mod fold;
mod kernel;
mod process;
mod tcp;
mod udp;

use core::ptr::read_volatile;

use agent_common::{
    AcceptOffsets, ArgvStash, ConnectionKey, Counter, FoldCounts, FoldKey, KernelOffsets, PairKey, PairValue, PairedAccept, ListenerKey, ListenerOwner, SockOwner, COUNTER_COUNT,
    DEFAULT_RING_BUFFER_BYTES, EXEC_ARGS_MAX_ENTRIES, EXIT_CODES_MAX_ENTRIES, FOLDS_MAX_ENTRIES, PAIRED_ACCEPTS_MAX_ENTRIES, TCP_PAIRS_MAX_ENTRIES,
    LISTENERS_MAX_ENTRIES, SEEDED_CONNECTIONS_MAX_ENTRIES, SOCKETS_MAX_ENTRIES, UDP_BINDS_MAX_ENTRIES, UDP_FLOWS_MAX_ENTRIES,
    UdpFlowCounts, UdpFlowKey, UringRequest, UringOffsets, URING_ACCEPTS_MAX_ENTRIES,
};
use aya_ebpf::{
    programs::TracePointContext,
    EbpfContext,
    helpers::{bpf_get_current_pid_tgid, r#gen::bpf_get_current_ancestor_cgroup_id},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};

// Map and global names must match `agent_common::MAPS` and `agent_common::GLOBALS`: the link step
// exports exactly those names and the loader looks them up by them.

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BUFFER_BYTES, 0);

/// Unread bytes in `EVENTS` above which a submit wakes the reader. Below it no submit wakes the
/// reader, which polls on a short timer instead: waking it for every record costs a context switch
/// per event, which on a busy host costs more than the programs themselves.
const WAKEUP_UNREAD_BYTES: u64 = 64 * 1024;

/// `bpf_ringbuf_query` flag for the unread byte count, and the submit wakeup flags.
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// Returns the wakeup flags for a submit to `EVENTS`.
#[inline(always)]
pub(crate) fn submit_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_UNREAD_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[map]
static EXEC_ARGS: HashMap<u32, ArgvStash> = HashMap::with_max_entries(EXEC_ARGS_MAX_ENTRIES, 0);

#[map]
static ARGV_SCRATCH: PerCpuArray<ArgvStash> = PerCpuArray::with_max_entries(1, 0);

#[map]
static EXIT_CODES: HashMap<u32, i32> = HashMap::with_max_entries(EXIT_CODES_MAX_ENTRIES, 0);

#[map]
static SOCKETS: HashMap<u64, SockOwner> = HashMap::with_max_entries(SOCKETS_MAX_ENTRIES, 0);

#[map]
static LISTENERS: HashMap<ListenerKey, ListenerOwner> =
    HashMap::with_max_entries(LISTENERS_MAX_ENTRIES, 0);

#[map]
static UDP_FLOWS: LruHashMap<UdpFlowKey, UdpFlowCounts> =
    LruHashMap::with_max_entries(UDP_FLOWS_MAX_ENTRIES, 0);

#[map]
static SEEDED_CONNECTIONS: HashMap<ConnectionKey, SockOwner> =
    HashMap::with_max_entries(SEEDED_CONNECTIONS_MAX_ENTRIES, 0);

#[map]
static FOLDS: HashMap<FoldKey, FoldCounts> = HashMap::with_max_entries(FOLDS_MAX_ENTRIES, 0);

#[map]
static FOLD_WINDOW: Array<u64> = Array::with_max_entries(1, 0);

#[map]
static ACCEPT_SCRATCH: PerCpuArray<fold::AcceptedFold> = PerCpuArray::with_max_entries(1, 0);

#[map]
static TCP_PAIRS: LruHashMap<PairKey, PairValue> = LruHashMap::with_max_entries(TCP_PAIRS_MAX_ENTRIES, 0);

#[map]
static PAIRED_ACCEPTS: HashMap<u64, PairedAccept> = HashMap::with_max_entries(PAIRED_ACCEPTS_MAX_ENTRIES, 0);

/// io_uring accept requests waiting for their completion; see `accept.rs`.
#[map]
static URING_ACCEPTS: HashMap<UringRequest, u64> = HashMap::with_max_entries(URING_ACCEPTS_MAX_ENTRIES, 0);

/// The number of io_uring accepts in `URING_ACCEPTS`; see `accept.rs`.
#[map]
static URING_WAITING: Array<u64> = Array::with_max_entries(1, 0);

#[map]
static UDP_BINDS: LruHashMap<u32, udp::BindInProgress> = LruHashMap::with_max_entries(UDP_BINDS_MAX_ENTRIES, 0);

// Globals live in `.rodata` and the loader rewrites them before loading. They are read with
// `read_volatile` so that the compiler cannot fold in the zero initialisers.

#[no_mangle]
static AGENT_TGID: u32 = 0;

#[no_mangle]
static SCOPE_ENABLED: u32 = 0;

#[no_mangle]
static SCOPE_CGROUP_ID: u64 = 0;

#[no_mangle]
static SCOPE_CGROUP_LEVEL: u32 = 0;

#[no_mangle]
static OFFSET_SKC_NET: u32 = 0;

#[no_mangle]
static OFFSET_NET_INUM: u32 = 0;

#[no_mangle]
static NETNS_OFFSETS_VALID: u32 = 0;

#[no_mangle]
static KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    task_valid: 0,
    task_real_parent: 0,
    task_group_leader: 0,
    task_tgid: 0,
    task_start_boottime: 0,
    exe_valid: 0,
    task_mm: 0,
    mm_exe_file: 0,
    file_dentry: 0,
    dentry_name: 0,
    dentry_inode: 0,
    inode_nlink: 0,
    tcp_valid: 0,
    tcp_bytes_sent: 0,
    tcp_bytes_retrans: 0,
    tcp_bytes_received: 0,
    sock_err: 0,
    sock_shutdown: 0,
    pid_valid: 0,
    task_thread_pid: 0,
    pid_level: 0,
    pid_numbers: 0,
    upid_nr: 0,
    upid_size: 0,
    cred_valid: 0,
    task_cred: 0,
    cred_uid: 0,
    cred_euid: 0,
    cred_gid: 0,
    cred_egid: 0,
    cred_cap_effective: 0,
    _reserved: 0,
};

#[no_mangle]
static URING_OFFSETS: UringOffsets = UringOffsets { valid: 0, accept_file_slot: 0 };

#[no_mangle]
static ACCEPT_OFFSETS: AcceptOffsets = AcceptOffsets {
    valid: 0,
    task_files: 0,
    files_fdt: 0,
    fdtable_max_fds: 0,
    fdtable_fd: 0,
    file_private_data: 0,
    socket_sk: 0,
    socket_file: 0,
    skc_family: 0,
    skc_num: 0,
    skc_dport: 0,
    skc_rcv_saddr: 0,
    skc_daddr: 0,
    skc_v6_rcv_saddr: 0,
    skc_v6_daddr: 0,
    skc_cookie: 0,
};

/// Adds one to a loss counter on this CPU.
#[inline(always)]
fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from the map lookup and stays valid for this program run; a
        // per-CPU slot is not written concurrently.
        unsafe { *value += 1 };
    }
}

/// Current task as (tgid, tid).
#[inline(always)]
fn current_ids() -> (u32, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ((pid_tgid >> 32) as u32, pid_tgid as u32)
}

#[inline(always)]
fn is_agent(tgid: u32) -> bool {
    // SAFETY: a plain read of a static that the loader initialised.
    tgid == unsafe { read_volatile(&AGENT_TGID) }
}

/// True when the current task may be reported: no scope is set, or its cgroup is the scope cgroup
/// or a descendant of it.
#[inline(always)]
fn current_in_scope() -> bool {
    // SAFETY: plain reads of statics that the loader initialised.
    let (enabled, level, scope_id) = unsafe {
        (
            read_volatile(&SCOPE_ENABLED),
            read_volatile(&SCOPE_CGROUP_LEVEL),
            read_volatile(&SCOPE_CGROUP_ID),
        )
    };
    if enabled == 0 {
        return true;
    }
    // SAFETY: the helper takes a level and has no memory arguments.
    let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
    ancestor == scope_id
}

#[inline(always)]
fn scope_enabled() -> bool {
    // SAFETY: a plain read of a static that the loader initialised.
    unsafe { read_volatile(&SCOPE_ENABLED) != 0 }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a loaded program: the verifier rejects any object that links a panic path.
    loop {}
}

/// Reads the field at `offset` of a tracepoint's record with a plain load from the context.
///
/// The verifier lets a tracepoint program read its context directly at any offset aligned to the
/// read's size, which costs a load, where `TracePointContext::read_at` calls a probe-read helper.
/// The TCP program runs on every state change of every socket, so this matters there.
///
/// # Safety
/// `offset` must be a field of the record, aligned to the size of `T`, and `T` at most 8 bytes.
#[inline(always)]
pub(crate) unsafe fn tracepoint_field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    read_volatile((ctx.as_ptr() as *const u8).add(offset) as *const T)
}

/// Reads a 16-byte address field of a tracepoint's record with two plain loads.
///
/// # Safety
/// `offset` must be a 16-byte field of the record, aligned to 8 bytes.
#[inline(always)]
pub(crate) unsafe fn tracepoint_address(ctx: &TracePointContext, offset: usize) -> [u8; 16] {
    let low: u64 = tracepoint_field(ctx, offset);
    let high: u64 = tracepoint_field(ctx, offset + 8);
    // SAFETY: both types are 16 plain bytes; the halves stay in memory order.
    core::mem::transmute::<[u64; 2], [u8; 16]>([low, high])
}

#[inline(always)]
fn ktime_ns() -> u64 {
    // SAFETY: the helper has no arguments.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }
}

/// Returns the monotonic time at the last timer tick, a few milliseconds behind `ktime_ns`. It
/// reads no clock source, whose reads showed in profiles of the connect storm in a virtual
/// machine. For the `sock_ops` program's fold epochs and ages only, because the kernel rejects
/// this helper in tracing programs.
#[inline(always)]
fn coarse_ns() -> u64 {
    // SAFETY: the helper has no arguments.
    unsafe { aya_ebpf::helpers::r#gen::bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
fn current_cgroup_id() -> u64 {
    // SAFETY: the helper has no arguments.
    unsafe { aya_ebpf::helpers::bpf_get_current_cgroup_id() }
}
