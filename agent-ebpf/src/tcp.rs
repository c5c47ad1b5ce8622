//! TCP state changes, from a cgroup `sock_ops` program where the kernel allows one, else from the
//! `sock:inet_sock_set_state` tracepoint.
//!
//! Both give the same records. The tracepoint runs for every state change of every TCP socket and
//! builds a trace record each time. The `sock_ops` program runs at connect, listen and the end of
//! each handshake, and requests the state changes of the sockets it tracks only. A socket out of
//! scope so costs one call.
//!
//! Connect and listen happen in the calling process, so the current task owns the socket. The
//! handshake completions (Connected, ConnectFailed, Accepted) and most closes run in softirq
//! context where the current task is unrelated, so the owner comes from `SOCKETS`, filled at
//! connect and accept time, and the scope decision made there carries over. An accepted socket has
//! no owning process in the kernel yet: it is reported with pid 0 when the listener it reached, by
//! (netns, local address, port) or (netns, wildcard address, port), was recorded in scope (or
//! always, when no scope is set). The `accept` programs name the process that takes it off the
//! listener.
//!
//! The `sock_ops` program counts the repeated connections of a flow instead of reporting them
//! (see `fold.rs`). Their sockets are tracked with a `SOCKET_FLAG_FOLDED_*` bit, and their
//! handshake end and close add to the flow's counters. An accepted socket whose connecting end on
//! this host was folded adds nothing: it waits in `PAIRED_ACCEPTS` for the `accept` programs and
//! requests no state changes.

use agent_common::{
    ConnectionKey, Counter, Lineage, ListenerKey, ListenerOwner, PairedAccept, RecordHeader, RecordKind, SockOwner, TcpKind,
    TcpRecord, FAMILY_INET, FAMILY_INET6, LISTENER_FLAG_AGENT, LISTENER_FLAG_OUTSIDE_SCOPE, LISTENER_FLAG_OWN_STATE_CHANGES, SOCKET_FLAGS_FOLDED,
    SOCKET_FLAG_AGENT, SOCKET_FLAG_FOLDED_OUT, SOCKET_FLAG_FOLDED_PAIRED, TCP_FLAG_EXE_UNLINKED, TCP_FLAG_SOCKET_READ,
};
use aya_ebpf::{
    bindings::bpf_sock,
    helpers::{bpf_probe_read_kernel, r#gen::bpf_get_socket_cookie},
    macros::{sock_ops, tracepoint},
    programs::{SockOpsContext, TracePointContext},
};
use core::ptr::{addr_of, read_volatile};

use crate::{
    count, current_cgroup_id, fold, tracepoint_address, tracepoint_field, kernel, current_ids, current_in_scope, is_agent, ktime_ns, scope_enabled,
    ACCEPT_SCRATCH, EVENTS, LISTENERS, NETNS_OFFSETS_VALID, OFFSET_NET_INUM, OFFSET_SKC_NET, PAIRED_ACCEPTS, SEEDED_CONNECTIONS, SOCKETS,
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

// `sock_ops` operations and flags, include/uapi/linux/bpf.h.
const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_TCP_LISTEN_CB: u32 = 11;
const BPF_SOCK_OPS_STATE_CB_FLAG: u32 = 1 << 2;

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_inet_sock_set_state(&ctx);
    0
}

#[sock_ops]
pub fn tcp_sock_ops(ctx: SockOpsContext) -> u32 {
    let _ = try_sock_ops(&ctx);
    1
}

/// The socket fields of a state change, read from the tracepoint's record or from the
/// `sock_ops` context.
pub(crate) trait TcpFields {
    /// True when this hook folds repeated connections (see the `fold` module).
    const FOLDS: bool;

    fn family(&self) -> u16;
    /// Local port in host byte order.
    fn local_port(&self) -> u16;
    /// Remote port in host byte order.
    fn remote_port(&self) -> u16;
    /// Local and remote address of a socket of `family`, an IPv4 address in the first 4 bytes.
    fn addresses(&self, family: u16) -> ([u8; 16], [u8; 16]);
    /// Local address of a socket of `family`, laid out as in `addresses`.
    ///
    /// Both families' fields are loaded whatever `family` is, and the choice is made between
    /// the values. Loads that depend on `family` let the compiler merge them into one load at a
    /// computed context offset, which the verifier rejects.
    fn local_address(&self, family: u16) -> [u8; 16];

    /// The socket's cookie, `None` where the hook cannot read it.
    fn cookie(&self) -> Option<u64> {
        None
    }

    /// Whether the socket's state changes are requested, `None` where the hook has no such
    /// request.
    fn state_changes_requested(&self) -> Option<bool> {
        None
    }

    /// Stops the socket's state changes, where the hook runs for them on request.
    fn drop_state_changes(&self) {}
}

impl TcpFields for TracePointContext {
    const FOLDS: bool = false;

    fn family(&self) -> u16 {
        // SAFETY: offset of this tracepoint's field, aligned to its size.
        unsafe { tracepoint_field(self, FAMILY_OFFSET) }
    }

    fn local_port(&self) -> u16 {
        // SAFETY: as above.
        unsafe { tracepoint_field(self, SPORT_OFFSET) }
    }

    fn remote_port(&self) -> u16 {
        // SAFETY: as above.
        unsafe { tracepoint_field(self, DPORT_OFFSET) }
    }

    fn addresses(&self, family: u16) -> ([u8; 16], [u8; 16]) {
        // SAFETY: offsets of this tracepoint's fields, each aligned to its size.
        unsafe {
            if family == FAMILY_INET6 {
                (tracepoint_address(self, SADDR_V6_OFFSET), tracepoint_address(self, DADDR_V6_OFFSET))
            } else {
                (
                    widen_ipv4(tracepoint_field::<u32>(self, SADDR_OFFSET).to_ne_bytes()),
                    widen_ipv4(tracepoint_field::<u32>(self, DADDR_OFFSET).to_ne_bytes()),
                )
            }
        }
    }

    fn local_address(&self, family: u16) -> [u8; 16] {
        // SAFETY: offsets of this tracepoint's fields, each aligned to its size.
        let (v6, v4) = unsafe {
            (tracepoint_address(self, SADDR_V6_OFFSET), tracepoint_field::<u32>(self, SADDR_OFFSET))
        };
        if family == FAMILY_INET6 {
            v6
        } else {
            widen_ipv4(v4.to_ne_bytes())
        }
    }
}

impl TcpFields for SockOpsContext {
    const FOLDS: bool = true;

    fn cookie(&self) -> Option<u64> {
        // SAFETY: the helper takes this program's context.
        Some(unsafe { bpf_get_socket_cookie(self.ops.cast()) })
    }

    fn state_changes_requested(&self) -> Option<bool> {
        Some(self.cb_flags() & BPF_SOCK_OPS_STATE_CB_FLAG != 0)
    }

    fn drop_state_changes(&self) {
        let _ = self.set_cb_flags((self.cb_flags() & !BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }

    fn family(&self) -> u16 {
        SockOpsContext::family(self) as u16
    }

    fn local_port(&self) -> u16 {
        SockOpsContext::local_port(self) as u16
    }

    fn remote_port(&self) -> u16 {
        // The field contains the port in network byte order, which some kernels shift into the
        // upper 16 bits.
        let raw = SockOpsContext::remote_port(self);
        let port = if raw > 0xffff { raw >> 16 } else { raw };
        u16::from_be(port as u16)
    }

    fn addresses(&self, family: u16) -> ([u8; 16], [u8; 16]) {
        let ops = self.ops;
        // SAFETY: each read is one 4-byte context field, the only access size the verifier
        // allows for them.
        unsafe {
            if family == FAMILY_INET6 {
                (
                    crate::udp::ipv6_bytes([
                        read_volatile(addr_of!((*ops).local_ip6[0])),
                        read_volatile(addr_of!((*ops).local_ip6[1])),
                        read_volatile(addr_of!((*ops).local_ip6[2])),
                        read_volatile(addr_of!((*ops).local_ip6[3])),
                    ]),
                    crate::udp::ipv6_bytes([
                        read_volatile(addr_of!((*ops).remote_ip6[0])),
                        read_volatile(addr_of!((*ops).remote_ip6[1])),
                        read_volatile(addr_of!((*ops).remote_ip6[2])),
                        read_volatile(addr_of!((*ops).remote_ip6[3])),
                    ]),
                )
            } else {
                (
                    widen_ipv4(read_volatile(addr_of!((*ops).local_ip4)).to_ne_bytes()),
                    widen_ipv4(read_volatile(addr_of!((*ops).remote_ip4)).to_ne_bytes()),
                )
            }
        }
    }

    fn local_address(&self, family: u16) -> [u8; 16] {
        let ops = self.ops;
        // SAFETY: each read is one 4-byte context field, the only access size the verifier
        // allows for them.
        let (v6, v4) = unsafe {
            (
                [
                    read_volatile(addr_of!((*ops).local_ip6[0])),
                    read_volatile(addr_of!((*ops).local_ip6[1])),
                    read_volatile(addr_of!((*ops).local_ip6[2])),
                    read_volatile(addr_of!((*ops).local_ip6[3])),
                ],
                read_volatile(addr_of!((*ops).local_ip4)),
            )
        };
        if family == FAMILY_INET6 {
            crate::udp::ipv6_bytes(v6)
        } else {
            widen_ipv4(v4.to_ne_bytes())
        }
    }
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), i64> {
    let op = ctx.op();
    // The other operations (timeouts, window, ECN, request sockets) end here, before any read of
    // the socket.
    if !matches!(
        op,
        BPF_SOCK_OPS_TCP_CONNECT_CB
            | BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
            | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
            | BPF_SOCK_OPS_STATE_CB
            | BPF_SOCK_OPS_TCP_LISTEN_CB
    ) {
        return Ok(());
    }
    // Of the state changes, only the move to CLOSE is reported. Most callbacks are the others,
    // so they end before the socket's address is read.
    if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) as i32 != TCP_CLOSE {
        return Ok(());
    }
    // SAFETY: `sk` is a context field of pointer size, which the verifier types as a socket that
    // may be null; the null check follows.
    let sk: *const bpf_sock = unsafe { read_volatile(addr_of!((*ctx.ops).__bindgen_anon_2.sk)) }.cast_const();
    if sk.is_null() {
        return Ok(());
    }
    let skaddr = crate::udp::kernel_address(sk);
    if skaddr == 0 {
        return Ok(());
    }

    let tracked = match op {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ctx, skaddr)?,
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(ctx, skaddr)?,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_accepted(ctx, skaddr)?,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            on_handshake_end(ctx, skaddr, TcpKind::Connected, false, false)?;
            false
        }
        _ => {
            // Only the sockets tracked below asked for their state changes.
            let (old_state, new_state) = (ctx.arg(0) as i32, ctx.arg(1) as i32);
            match (old_state, new_state) {
                (TCP_SYN_SENT, TCP_CLOSE) => on_handshake_end(ctx, skaddr, TcpKind::ConnectFailed, true, false)?,
                (TCP_LISTEN, TCP_CLOSE) => on_listener_close(ctx, skaddr)?,
                (old, TCP_CLOSE) if old != TCP_CLOSE => on_handshake_end(ctx, skaddr, TcpKind::Close, true, false)?,
                _ => {}
            }
            false
        }
    };
    if tracked {
        // Keeps the flags another program set on the socket.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
    Ok(())
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
    /// In an Accepted record, the network namespace of a folded connecting end (see `TcpKind`).
    peer_netns: u32,
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
        (TCP_CLOSE, TCP_SYN_SENT) => on_connect(ctx, skaddr).map(|_| ()),
        (TCP_SYN_SENT, TCP_ESTABLISHED) => on_handshake_end(ctx, skaddr, TcpKind::Connected, false, true),
        (TCP_SYN_SENT, TCP_CLOSE) => on_handshake_end(ctx, skaddr, TcpKind::ConnectFailed, true, true),
        (TCP_CLOSE, TCP_LISTEN) => on_listen(ctx, skaddr).map(|_| ()),
        (TCP_LISTEN, TCP_CLOSE) => on_listener_close(ctx, skaddr),
        (TCP_SYN_RECV, TCP_ESTABLISHED) => on_accepted(ctx, skaddr).map(|_| ()),
        // Every connection that got past the handshake ends with exactly one move to CLOSE, from
        // whichever state the shutdown sequence reached.
        (old, TCP_CLOSE) if old != TCP_CLOSE => on_handshake_end(ctx, skaddr, TcpKind::Close, true, true),
        _ => Ok(()),
    }
}

/// Reports a connect in scope. Returns true when the socket is tracked: its later state changes
/// are reported or, for the agent's own socket, skipped.
fn on_connect<F: TcpFields>(ctx: &F, skaddr: u64) -> Result<bool, i64> {
    let (tgid, tid) = current_ids();
    if is_agent(tgid) {
        track_socket(skaddr, tgid, SOCKET_FLAG_AGENT, 0, 0);
        return Ok(true);
    }
    if !current_in_scope() {
        return Ok(false);
    }
    // Read once here and kept with the owner, so that the socket's later records skip the read.
    let netns = socket_netns(skaddr);
    let folding = F::FOLDS && fold::enabled();
    let exec = if folding { kernel::exec_cookie() } else { 0 };
    if folding && fold::fold_connect(ctx, tgid, netns, exec) {
        track_socket(skaddr, tgid, SOCKET_FLAG_FOLDED_OUT, netns, exec);
        return Ok(true);
    }
    track_socket(skaddr, tgid, 0, netns, exec);
    let owner = Owner {
        pid: tgid,
        tid,
        cgroup_id: current_cgroup_id(),
        current: true,
        netns,
        peer_netns: 0,
    };
    emit(ctx, skaddr, TcpKind::Connect, &owner)?;
    Ok(true)
}

/// Reports a softirq-side change of a socket seen at connect or accept; `forget` removes the
/// socket because it will not change state again. `untracked` also reports the sockets this
/// agent did not see start, as the tracepoint does. The `sock_ops` program leaves them out,
/// because it hears of one only when another `sock_ops` program, or an earlier run of the agent,
/// requested its state changes. The agent reports the close of the connections opened before it
/// by reading /proc.
fn on_handshake_end<F: TcpFields>(
    ctx: &F,
    skaddr: u64,
    kind: TcpKind,
    forget: bool,
    untracked: bool,
) -> Result<(), i64> {
    // SAFETY: the value is copied out before the entry can be removed.
    let tracked = unsafe { SOCKETS.get(&skaddr) }.copied();
    if forget && tracked.is_some() {
        let _ = SOCKETS.remove(&skaddr);
    }
    // A connection opened before the agent started is known by its addresses, which the agent
    // seeded from /proc; it closes only once.
    let tracked = match tracked {
        None if kind == TcpKind::Close && untracked => take_seeded(ctx, skaddr),
        known => known,
    };
    let (owner, netns) = match tracked {
        Some(socket) if socket.flags & SOCKET_FLAG_AGENT != 0 => return Ok(()),
        Some(socket) if socket.flags & SOCKET_FLAGS_FOLDED != 0 => {
            fold::fold_end(ctx, skaddr, &socket, kind);
            return Ok(());
        }
        Some(socket) if F::FOLDS && kind == TcpKind::ConnectFailed && socket.exec != 0 && fold::enabled() => {
            fold::forget_failed(ctx, &socket);
            (socket.pid, socket.netns)
        }
        Some(socket) => (socket.pid, socket.netns),
        // Sockets lost to a full map, or opened before the agent and not seeded: unattributed,
        // and unknown to be in scope.
        None if scope_enabled() || !untracked => return Ok(()),
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
            peer_netns: 0,
        },
    )
}

/// Removes and returns the owner that the agent seeded for this connection, if any.
// Kept out of line: inlined, its key would share the program's frame with the record that
// `emit` builds, and the verifier rejects the combined stack.
#[inline(never)]
fn take_seeded<F: TcpFields>(ctx: &F, skaddr: u64) -> Option<SockOwner> {
    let mut key = ConnectionKey { netns: socket_netns(skaddr), sport: 0, dport: 0, saddr: [0; 16], daddr: [0; 16] };
    key.sport = ctx.local_port();
    key.dport = ctx.remote_port();
    (key.saddr, key.daddr) = ctx.addresses(ctx.family());
    // SAFETY: the value is copied out before the entry is removed.
    let owner = unsafe { SEEDED_CONNECTIONS.get(&key) }.copied()?;
    let _ = SEEDED_CONNECTIONS.remove(&key);
    Some(owner)
}

/// Reports a listen in scope, and records one outside it. Returns true when the listener is
/// tracked, so that its close matters.
fn on_listen<F: TcpFields>(ctx: &F, skaddr: u64) -> Result<bool, i64> {
    let (tgid, tid) = current_ids();
    let key = listener_key(ctx, skaddr)?;
    // The caller requests this socket's state changes next, unless another program already has.
    let own = if ctx.state_changes_requested() == Some(false) { LISTENER_FLAG_OWN_STATE_CHANGES } else { 0 };
    if is_agent(tgid) {
        remember_listener(&key, tgid, LISTENER_FLAG_AGENT | own);
        return Ok(true);
    }
    if !current_in_scope() {
        // The entry marks the address as taken by a listener outside the scope, so that its
        // connections do not fall back to a wildcard listener in scope on the port. It also
        // overrides an entry left by a listener in scope that closed unseen (one opened before
        // the agent, whose close `sock_ops` does not report). The close of this listener is
        // tracked, so that its entry goes with it.
        // NOTE: an address and port shared with SO_REUSEPORT by processes in and out of scope
        // is marked by whichever listened last, and accepts of the one in scope are then
        // reported only through the `accept` programs.
        remember_listener(&key, tgid, LISTENER_FLAG_OUTSIDE_SCOPE | own);
        return Ok(true);
    }
    remember_listener(&key, tgid, own);
    let owner = Owner {
        pid: tgid,
        tid,
        cgroup_id: current_cgroup_id(),
        current: true,
        // The listener key carries the namespace, read from this socket.
        netns: key.netns,
        peer_netns: 0,
    };
    emit(ctx, skaddr, TcpKind::Listen, &owner)?;
    Ok(true)
}

/// Forgets one listening socket on the (netns, port, family, address). The entry goes with the
/// last one, so that closing one of several SO_REUSEPORT sockets does not hide accepts on the
/// others.
// NOTE: the count is updated without atomics. Two sockets of one address and port that listen or
// close at the same instant on two CPUs can leave it off by one until the last of them closes.
fn on_listener_close<F: TcpFields>(ctx: &F, skaddr: u64) -> Result<(), i64> {
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

/// Reports a connection accepted on a listener in scope. Returns true when the socket is
/// tracked.
fn on_accepted<F: TcpFields>(ctx: &F, skaddr: u64) -> Result<bool, i64> {
    let mut key = listener_key(ctx, skaddr)?;
    // The connection's local address is the one it reached: a listener bound to it, else one of
    // its family bound to the wildcard address.
    // SAFETY: the values are copied out of the map.
    let listener = match unsafe { LISTENERS.get(&key) }.copied() {
        Some(listener) => Some(listener),
        None => {
            key.addr = [0; 16];
            unsafe { LISTENERS.get(&key) }.copied()
        }
    };
    let listener_pid = match listener {
        Some(listener) if listener.flags & LISTENER_FLAG_AGENT != 0 => {
            track_socket(skaddr, listener.pid, SOCKET_FLAG_AGENT, 0, 0);
            return Ok(true);
        }
        // The socket keeps the state changes it inherited: a process in scope may accept it (the
        // listening socket passed to it, or SO_REUSEPORT), and its close is then reported.
        Some(listener) if listener.flags & LISTENER_FLAG_OUTSIDE_SCOPE != 0 => return Ok(false),
        Some(listener) => listener.pid,
        None if scope_enabled() => return Ok(false),
        None => 0,
    };
    let serial = listener.map_or(0, |listener| listener.serial);
    // The decision is kept in a per-CPU map: this program's stack has no room for it.
    let Some(decision) = ACCEPT_SCRATCH.get_ptr_mut(0) else { return Ok(false) };
    // SAFETY: the pointer is to this CPU's slot of the map, valid during the program and written
    // by no other program run at the same time.
    let decision = unsafe { &mut *decision };
    *decision = fold::AcceptedFold::REPORT;
    if F::FOLDS && fold::enabled() {
        let shared = listener.is_some_and(|listener| listener.sockets > 1);
        fold::fold_accepted(ctx, key.netns, serial, !shared, decision);
        if decision.flag == SOCKET_FLAG_FOLDED_PAIRED && remember_paired(ctx, skaddr) {
            // The connecting end's flow counts this connection, so its state changes are not
            // needed. The entry only marks the socket for the accept program to skip.
            if let Some(listener) = &listener {
                leave_untracked(ctx, listener);
            }
            return Ok(false);
        }
        if decision.flag != 0 {
            // The expected acceptor lets the accept program tell at once that it took the socket.
            let owner = if decision.acceptor != 0 { decision.acceptor } else { listener_pid };
            track_socket(skaddr, owner, decision.flag, key.netns, serial);
            return Ok(true);
        }
    }
    // The listener key carries the namespace, read from this socket. The listener's owner is
    // recorded as the socket's owner until an `accept` program names the process that took it.
    // That program skips most of its work when it is the same process. The listener's serial
    // names the socket's incoming flow.
    track_socket(skaddr, listener_pid, 0, key.netns, serial);
    emit(
        ctx,
        skaddr,
        TcpKind::Accepted,
        &Owner {
            pid: 0,
            // A connecting end on this host that was folded, so that the record joins it.
            tid: decision.client_pid,
            cgroup_id: 0,
            current: false,
            netns: key.netns,
            peer_netns: decision.client_netns,
        },
    )?;
    Ok(true)
}

/// Drops the state changes that an accepted socket the agent does not track inherited from its
/// listener, when only this program requested them there: four calls saved per connection.
// NOTE: another `sock_ops` program loses them when it relies on the listener's request but made it
// after this program ran at listen, or requested them on this socket before this program ran. A
// paired socket accepted after the agent swept its entry has its accept reported, not its close.
#[inline(always)]
fn leave_untracked<F: TcpFields>(ctx: &F, listener: &ListenerOwner) {
    if listener.flags & LISTENER_FLAG_OWN_STATE_CHANGES != 0 {
        ctx.drop_state_changes();
    }
}

/// Records an accepted socket whose connecting end was folded in `PAIRED_ACCEPTS`, with its cookie
/// so that a later socket at the same address is not taken for it. Returns false when the map is
/// full: the socket is then tracked in `SOCKETS`, as the others.
#[inline(always)]
fn remember_paired<F: TcpFields>(ctx: &F, skaddr: u64) -> bool {
    let Some(cookie) = ctx.cookie() else { return false };
    PAIRED_ACCEPTS.insert(&skaddr, &PairedAccept { cookie, ktime_ns: crate::coarse_ns() }, 0).is_ok()
}

fn track_socket(skaddr: u64, pid: u32, flags: u32, netns: u32, exec: u32) {
    if SOCKETS
        .insert(&skaddr, &SockOwner { pid, flags, netns, exec }, 0)
        .is_err()
    {
        count(Counter::TcpSocketMapFull);
    }
}

fn remember_listener(key: &ListenerKey, pid: u32, flags: u32) {
    // Another socket already listens on this (netns, port, family, address): count this one too.
    if let Some(owner) = LISTENERS.get_ptr_mut(key) {
        // SAFETY: the pointer is to this map's value, valid during the program.
        unsafe {
            (*owner).sockets = (*owner).sockets.saturating_add(1);
            (*owner).pid = pid;
            // The accepted sockets may come from any of the listening sockets.
            (*owner).flags = flags & ((*owner).flags | !LISTENER_FLAG_OWN_STATE_CHANGES);
            (*owner).serial = listen_serial();
        }
        return;
    }
    let owner = ListenerOwner { pid, flags, sockets: 1, serial: listen_serial() };
    if LISTENERS.insert(key, &owner, 0).is_err() {
        count(Counter::TcpListenerMapFull);
    }
}

/// Returns a serial for a listen: the low bits of the time, never 0 (the seeded listeners' serial).
#[inline(always)]
fn listen_serial() -> u32 {
    ktime_ns() as u32 | 1
}

fn listener_key<F: TcpFields>(ctx: &F, skaddr: u64) -> Result<ListenerKey, i64> {
    let family = ctx.family();
    Ok(ListenerKey {
        netns: socket_netns(skaddr),
        port: ctx.local_port(),
        family,
        addr: ctx.local_address(family),
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

fn emit<F: TcpFields>(ctx: &F, skaddr: u64, kind: TcpKind, owner: &Owner) -> Result<(), i64> {
    let family = ctx.family();
    if family != FAMILY_INET6 && family != FAMILY_INET {
        return Ok(());
    }
    let (sport, dport) = (ctx.local_port(), ctx.remote_port());
    let (saddr, daddr) = ctx.addresses(family);
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
            _reserved: owner.peer_netns,
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
