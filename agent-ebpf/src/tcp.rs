//! TCP state changes from `sock:inet_sock_set_state`.
//!
//! Connect and listen happen in the calling process, so the current task owns the socket. The
//! handshake completions (Connected, ConnectFailed, Accepted) and most closes run in softirq
//! context where the current task is unrelated, so the owner comes from `SOCKETS`, filled at
//! connect and accept time, and the scope decision made there carries over. An accepted socket has
//! no owning process in the kernel yet: it is reported with pid 0 when its (netns, local port) is a
//! listener recorded in scope (or always, when no scope is set). The `accept` programs name the
//! process that takes it off the listener.

use agent_common::{
    ConnectionKey, Counter, Lineage, ListenerKey, ListenerOwner, RecordHeader, RecordKind, SockOwner, TcpKind,
    TcpRecord, FAMILY_INET, FAMILY_INET6, LISTENER_FLAG_AGENT, SOCKET_FLAG_AGENT,
    TCP_FLAG_EXE_UNLINKED, TCP_FLAG_SOCKET_READ,
};
use aya_ebpf::{helpers::bpf_probe_read_kernel, macros::tracepoint, programs::TracePointContext};
use core::ptr::read_volatile;

use crate::{
    count, current_cgroup_id, tracepoint_address, tracepoint_field, kernel, current_ids, current_in_scope, is_agent, ktime_ns, scope_enabled,
    EVENTS, LISTENERS, NETNS_OFFSETS_VALID, OFFSET_NET_INUM, OFFSET_SKC_NET, SEEDED_CONNECTIONS, SOCKETS,
};

// Offsets in the record, from events/sock/inet_sock_set_state/format in tracefs.
const SKADDR_OFFSET: usize = 8;
const OLDSTATE_OFFSET: usize = 16;
const NEWSTATE_OFFSET: usize = 20;
const SPORT_OFFSET: usize = 24;
const DPORT_OFFSET: usize = 26;
const FAMILY_OFFSET: usize = 28;
const PROTOCOL_OFFSET: usize = 30;
const SADDR_OFFSET: usize = 32;
const DADDR_OFFSET: usize = 36;
const SADDR_V6_OFFSET: usize = 40;
const DADDR_V6_OFFSET: usize = 56;

const IPPROTO_TCP: u16 = 6;

// TCP states, include/net/tcp_states.h.
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;
const TCP_LISTEN: i32 = 10;

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_inet_sock_set_state(&ctx);
    0
}

/// Process a record is attributed to.
struct Owner {
    pid: u32,
    tid: u32,
    cgroup_id: u64,
    /// True when the record is written in the owner's own context, so its task can be read.
    current: bool,
    /// Network namespace of the socket when already known, 0 to read it from the socket.
    netns: u32,
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: offsets of this tracepoint's fields, each aligned to its size.
    let protocol: u16 = unsafe { tracepoint_field(ctx, PROTOCOL_OFFSET) };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let (old_state, new_state, skaddr): (i32, i32, u64) = unsafe {
        (
            tracepoint_field(ctx, OLDSTATE_OFFSET),
            tracepoint_field(ctx, NEWSTATE_OFFSET),
            tracepoint_field(ctx, SKADDR_OFFSET),
        )
    };

    match (old_state, new_state) {
        (TCP_CLOSE, TCP_SYN_SENT) => on_connect(ctx, skaddr),
        (TCP_SYN_SENT, TCP_ESTABLISHED) => on_handshake_end(ctx, skaddr, TcpKind::Connected, false),
        (TCP_SYN_SENT, TCP_CLOSE) => on_handshake_end(ctx, skaddr, TcpKind::ConnectFailed, true),
        (TCP_CLOSE, TCP_LISTEN) => on_listen(ctx, skaddr),
        (TCP_LISTEN, TCP_CLOSE) => on_listener_close(ctx, skaddr),
        (TCP_SYN_RECV, TCP_ESTABLISHED) => on_accepted(ctx, skaddr),
        // Every connection that got past the handshake ends with exactly one move to CLOSE, from
        // whichever state the shutdown sequence reached.
        (old, TCP_CLOSE) if old != TCP_CLOSE => on_handshake_end(ctx, skaddr, TcpKind::Close, true),
        _ => Ok(()),
    }
}

fn on_connect(ctx: &TracePointContext, skaddr: u64) -> Result<(), i64> {
    let (tgid, tid) = current_ids();
    if is_agent(tgid) {
        track_socket(skaddr, tgid, SOCKET_FLAG_AGENT, 0);
        return Ok(());
    }
    if !current_in_scope() {
        return Ok(());
    }
    // Read once here and kept with the owner, so that the socket's later records skip the read.
    let netns = socket_netns(skaddr);
    track_socket(skaddr, tgid, 0, netns);
    let owner = Owner {
        pid: tgid,
        tid,
        cgroup_id: current_cgroup_id(),
        current: true,
        netns,
    };
    emit(ctx, skaddr, TcpKind::Connect, &owner)
}

/// Reports a softirq-side change of a socket seen at connect or accept; `forget` removes the
/// socket because it will not change state again.
fn on_handshake_end(
    ctx: &TracePointContext,
    skaddr: u64,
    kind: TcpKind,
    forget: bool,
) -> Result<(), i64> {
    // SAFETY: the value is copied out before the entry can be removed.
    let tracked = unsafe { SOCKETS.get(&skaddr) }.copied();
    if forget && tracked.is_some() {
        let _ = SOCKETS.remove(&skaddr);
    }
    // A connection opened before the agent started is known by its addresses, which the agent
    // seeded from /proc; it closes only once.
    let tracked = match tracked {
        None if kind == TcpKind::Close => take_seeded(ctx, skaddr),
        known => known,
    };
    let (owner, netns) = match tracked {
        Some(socket) if socket.flags & SOCKET_FLAG_AGENT != 0 => return Ok(()),
        Some(socket) => (socket.pid, socket.netns),
        // Sockets lost to a full map, or opened before the agent and not seeded: unattributed,
        // and unknown to be in scope.
        None if scope_enabled() => return Ok(()),
        None => (0, 0),
    };
    emit(
        ctx,
        skaddr,
        kind,
        &Owner {
            pid: owner,
            tid: 0,
            cgroup_id: 0,
            current: false,
            netns,
        },
    )
}

/// Removes and returns the owner that the agent seeded for this connection, if any.
// Kept out of line: inlined, its key would share the program's frame with the record that
// `emit` builds, and the verifier rejects the combined stack.
#[inline(never)]
fn take_seeded(ctx: &TracePointContext, skaddr: u64) -> Option<SockOwner> {
    let mut key = ConnectionKey { netns: socket_netns(skaddr), sport: 0, dport: 0, saddr: [0; 16], daddr: [0; 16] };
    // SAFETY: offsets of this tracepoint's fields, each aligned to its size.
    unsafe {
        key.sport = tracepoint_field(ctx, SPORT_OFFSET);
        key.dport = tracepoint_field(ctx, DPORT_OFFSET);
        if tracepoint_field::<u16>(ctx, FAMILY_OFFSET) == FAMILY_INET6 {
            key.saddr = tracepoint_address(ctx, SADDR_V6_OFFSET);
            key.daddr = tracepoint_address(ctx, DADDR_V6_OFFSET);
        } else {
            key.saddr = widen_ipv4(tracepoint_field::<u32>(ctx, SADDR_OFFSET).to_ne_bytes());
            key.daddr = widen_ipv4(tracepoint_field::<u32>(ctx, DADDR_OFFSET).to_ne_bytes());
        }
    }
    // SAFETY: the value is copied out before the entry is removed.
    let owner = unsafe { SEEDED_CONNECTIONS.get(&key) }.copied()?;
    let _ = SEEDED_CONNECTIONS.remove(&key);
    Some(owner)
}

fn on_listen(ctx: &TracePointContext, skaddr: u64) -> Result<(), i64> {
    let (tgid, tid) = current_ids();
    let key = listener_key(ctx, skaddr)?;
    if is_agent(tgid) {
        remember_listener(&key, tgid, LISTENER_FLAG_AGENT);
        return Ok(());
    }
    if !current_in_scope() {
        return Ok(());
    }
    remember_listener(&key, tgid, 0);
    let owner = Owner {
        pid: tgid,
        tid,
        cgroup_id: current_cgroup_id(),
        current: true,
        // The listener key carries the namespace, read from this socket.
        netns: key.netns,
    };
    emit(ctx, skaddr, TcpKind::Listen, &owner)
}

/// Forgets one listening socket on the (netns, port); the entry goes with the last one, so that
/// closing the IPv6 socket of a dual listener does not hide accepts on the IPv4 one.
// NOTE: the count is updated without atomics. Two sockets of one port that listen or close at
// the same instant on two CPUs can leave it off by one until the port's last close.
fn on_listener_close(ctx: &TracePointContext, skaddr: u64) -> Result<(), i64> {
    let key = listener_key(ctx, skaddr)?;
    match LISTENERS.get_ptr_mut(&key) {
        // SAFETY: the pointer is to this map's value, valid during the program.
        Some(owner) if unsafe { (*owner).sockets } > 1 => unsafe { (*owner).sockets -= 1 },
        _ => {
            let _ = LISTENERS.remove(&key);
        }
    }
    Ok(())
}

fn on_accepted(ctx: &TracePointContext, skaddr: u64) -> Result<(), i64> {
    let key = listener_key(ctx, skaddr)?;
    // SAFETY: the value is copied out of the map.
    let listener = unsafe { LISTENERS.get(&key) }.copied();
    match listener {
        Some(listener) if listener.flags & LISTENER_FLAG_AGENT != 0 => {
            track_socket(skaddr, listener.pid, SOCKET_FLAG_AGENT, 0);
            return Ok(());
        }
        Some(_) => {}
        None if scope_enabled() => return Ok(()),
        None => {}
    }
    // The listener key carries the namespace, read from this socket.
    track_socket(skaddr, 0, 0, key.netns);
    emit(
        ctx,
        skaddr,
        TcpKind::Accepted,
        &Owner {
            pid: 0,
            tid: 0,
            cgroup_id: 0,
            current: false,
            netns: key.netns,
        },
    )
}

fn track_socket(skaddr: u64, pid: u32, flags: u32, netns: u32) {
    if SOCKETS
        .insert(&skaddr, &SockOwner { pid, flags, netns, _reserved: 0 }, 0)
        .is_err()
    {
        count(Counter::TcpSocketMapFull);
    }
}

fn remember_listener(key: &ListenerKey, pid: u32, flags: u32) {
    // Another socket already listens on this (netns, port): count this one too.
    if let Some(owner) = LISTENERS.get_ptr_mut(key) {
        // SAFETY: the pointer is to this map's value, valid during the program.
        unsafe {
            (*owner).sockets = (*owner).sockets.saturating_add(1);
            (*owner).pid = pid;
            (*owner).flags = flags;
        }
        return;
    }
    let owner = ListenerOwner { pid, flags, sockets: 1, _reserved: 0 };
    if LISTENERS.insert(key, &owner, 0).is_err() {
        count(Counter::TcpListenerMapFull);
    }
}

fn listener_key(ctx: &TracePointContext, skaddr: u64) -> Result<ListenerKey, i64> {
    // SAFETY: offset of `sport` in this tracepoint's record, aligned to its size.
    let port: u16 = unsafe { tracepoint_field(ctx, SPORT_OFFSET) };
    Ok(ListenerKey {
        netns: socket_netns(skaddr),
        port,
        _reserved: 0,
    })
}

/// Inode number of the network namespace of the socket at `skaddr`, or 0 when the offsets are
/// unknown or a read fails.
pub(crate) fn socket_netns(skaddr: u64) -> u32 {
    // SAFETY: plain reads of statics that the loader initialised.
    let (valid, skc_net, net_inum) = unsafe {
        (
            read_volatile(&NETNS_OFFSETS_VALID),
            read_volatile(&OFFSET_SKC_NET),
            read_volatile(&OFFSET_NET_INUM),
        )
    };
    if valid == 0 || skaddr == 0 {
        return 0;
    }
    // SAFETY: both reads go through the kernel's fault-handling probe read; a wrong address gives
    // an error, not a crash.
    let net: u64 =
        match unsafe { bpf_probe_read_kernel((skaddr + u64::from(skc_net)) as *const u64) } {
            Ok(net) => net,
            Err(_) => return 0,
        };
    if net == 0 {
        return 0;
    }
    unsafe { bpf_probe_read_kernel((net + u64::from(net_inum)) as *const u32) }.unwrap_or(0)
}

fn emit(ctx: &TracePointContext, skaddr: u64, kind: TcpKind, owner: &Owner) -> Result<(), i64> {
    // SAFETY: offsets of this tracepoint's fields, each aligned to its size.
    let (family, sport, dport): (u16, u16, u16) = unsafe {
        (
            tracepoint_field(ctx, FAMILY_OFFSET),
            tracepoint_field(ctx, SPORT_OFFSET),
            tracepoint_field(ctx, DPORT_OFFSET),
        )
    };
    let (saddr, daddr): ([u8; 16], [u8; 16]) = if family == FAMILY_INET6 {
        unsafe { (tracepoint_address(ctx, SADDR_V6_OFFSET), tracepoint_address(ctx, DADDR_V6_OFFSET)) }
    } else if family == FAMILY_INET {
        let source = unsafe { tracepoint_field::<u32>(ctx, SADDR_OFFSET) }.to_ne_bytes();
        let destination = unsafe { tracepoint_field::<u32>(ctx, DADDR_OFFSET) }.to_ne_bytes();
        (widen_ipv4(source), widen_ipv4(destination))
    } else {
        return Ok(());
    };
    let netns = if owner.netns != 0 { owner.netns } else { socket_netns(skaddr) };
    let mut flags = 0;
    // Only the last record of a connection carries its byte counts and error. Reading them costs
    // five probe reads, so the records before it leave them zero.
    let counters = match kind {
        TcpKind::Close | TcpKind::ConnectFailed => kernel::tcp_socket_counters(skaddr),
        _ => None,
    };
    let (bytes_sent, bytes_received, sk_err) = match counters {
        Some(counters) => {
            flags |= TCP_FLAG_SOCKET_READ;
            counters
        }
        None => (0, 0, 0),
    };
    let mut lineage = Lineage::default();
    if owner.current {
        let task = kernel::current_task();
        lineage = kernel::lineage(task).unwrap_or_default();
        if let Some(dentry) = kernel::exe_dentry(task) {
            if kernel::dentry_unlinked(dentry) == Some(true) {
                flags |= TCP_FLAG_EXE_UNLINKED;
            }
        }
    }

    let Some(mut entry) = EVENTS.reserve::<TcpRecord>(0) else {
        count(Counter::TcpRingBufferFull);
        return Ok(());
    };
    entry.write(TcpRecord {
        header: RecordHeader {
            kind: RecordKind::Tcp as u32,
            pid: owner.pid,
            tid: owner.tid,
            _reserved: 0,
            ktime_ns: ktime_ns(),
            cgroup_id: owner.cgroup_id,
        },
        event: kind as u32,
        netns,
        skaddr,
        family,
        sport,
        dport,
        _reserved: 0,
        saddr,
        daddr,
        bytes_sent,
        bytes_received,
        sk_err,
        flags,
        lineage,
    });
    entry.submit(crate::submit_flags());
    Ok(())
}

/// Places an IPv4 address in the first 4 bytes of a zeroed 16-byte field.
#[inline(always)]
pub(crate) fn widen_ipv4(address: [u8; 4]) -> [u8; 16] {
    let [a, b, c, d] = address;
    [a, b, c, d, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}
