//! Repeated TCP connections counted in the kernel instead of reported one by one.
//!
//! The graph keeps one edge per flow: the connecting process and the server's address and port,
//! or the address and port a connection reached and its client's address. Once a connection of a
//! flow was reported, the flow's next connections in the same fold epoch only add to its counters
//! in `FOLDS`. The agent reads the counters about once a second and counts them on the edge of the
//! flow's last reported connection. The first connection of a flow in each epoch is reported in
//! full, so a new flow is never delayed. An exec starts new outgoing flows of the process, and a
//! listen new incoming flows on its address.
//!
//! The two ends of a connection between two processes on this host are folded together. Folded
//! on one end only, the reported end would find no partner and the agent would take the
//! connection for one with another host. The connecting end records its choice under the 4-tuple
//! in `TCP_PAIRS`, and the accepting end follows it when its own flow was reported in the same
//! epoch. Otherwise the accepting end is reported, names the connecting process in its record, and
//! takes the connection back out of that end's count. So an entry that a process wrote for a
//! 4-tuple of its choosing cannot hide a new client.
//!
//! Only the `sock_ops` program folds. The tracepoint learns a connection's local port after its
//! connect, so it could not pair the two ends.

use agent_common::{
    Counter, FoldCounts, FoldKey, PairKey, PairValue, SockOwner, TcpKind, FAMILY_INET, FAMILY_INET6, FOLD_IN, FOLD_OUT,
    PAIR_FOLDED, PAIR_REPORTED, SOCKET_FLAG_FOLDED_IN, SOCKET_FLAG_FOLDED_OUT, SOCKET_FLAG_FOLDED_PAIRED,
};
use core::{
    ptr::addr_of_mut,
    sync::atomic::{AtomicU64, Ordering},
};

use crate::{coarse_ns, count, kernel, tcp::TcpFields, FOLDS, FOLD_WINDOW, TCP_PAIRS};

/// Fold epoch in nanoseconds, 0 when every connection is reported.
#[inline(always)]
fn window() -> u64 {
    FOLD_WINDOW.get(0).copied().unwrap_or(0)
}

/// True when repeated connections are folded.
#[inline(always)]
pub(crate) fn enabled() -> bool {
    window() != 0
}

/// Decides whether a connect in scope is folded, and records the choice for the accepting end.
/// Returns true when its records are to be counted instead of sent.
// Two steps, each with its own key, so that neither frame with a callee's exceeds the verifier's
// stack limit.
#[inline(always)]
pub(crate) fn fold_connect<F: TcpFields>(ctx: &F, pid: u32, netns: u32, exec: u32) -> bool {
    let folded = count_outgoing(ctx, pid, netns, exec);
    record_pair(ctx, pid, netns, exec, folded);
    folded
}

/// Counts the connect in its outgoing flow when the flow had one reported in the epoch.
#[inline(never)]
fn count_outgoing<F: TcpFields>(ctx: &F, pid: u32, netns: u32, exec: u32) -> bool {
    let family = ctx.family();
    let (_, remote) = ctx.addresses(family);
    count_repeat(&outgoing_key(netns, pid, exec, family, remote, ctx.remote_port())).is_some()
}

/// Records the connecting end's choice under the connection's 4-tuple for its accepting end.
#[inline(never)]
fn record_pair<F: TcpFields>(ctx: &F, pid: u32, netns: u32, exec: u32, folded: bool) {
    let family = ctx.family();
    let (local, remote) = ctx.addresses(family);
    let value = PairValue {
        choice: if folded { PAIR_FOLDED } else { PAIR_REPORTED },
        pid,
        netns,
        exec,
        family,
        _reserved: 0,
        _reserved2: 0,
    };
    // An entry that no accept takes (a server on another host) ages out of the LRU map.
    let _ = TCP_PAIRS.insert(&pair_key(family, local, ctx.local_port(), remote, ctx.remote_port()), &value, 0);
}

/// The decision of [`fold_accepted`] on an accepted connection, kept in `ACCEPT_SCRATCH`.
#[repr(C)]
pub(crate) struct AcceptedFold {
    /// The `SOCKET_FLAG_FOLDED_*` bit for its socket, 0 to report it.
    pub flag: u32,
    /// The process expected to accept it: the flow's last reported acceptor, 0 when unknown.
    pub acceptor: u32,
    /// For a reported connection whose connecting end on this host was folded: that process and
    /// its socket's network namespace, which the `Accepted` record carries, and the rest of its
    /// outgoing flow's key.
    pub client_pid: u32,
    pub client_netns: u32,
    pub client_exec: u32,
    pub client_family: u16,
}

impl AcceptedFold {
    /// A decision to report the connection, with no folded connecting end.
    pub(crate) const REPORT: AcceptedFold =
        AcceptedFold { flag: 0, acceptor: 0, client_pid: 0, client_netns: 0, client_exec: 0, client_family: 0 };
}

/// Decides whether a connection accepted on a listener in scope is folded, into `decision`.
/// `serial` is the listener's ([`agent_common::ListenerOwner::serial`]). `alone` is false when
/// the listener shares its address with others (SO_REUSEPORT): each connection must then name the
/// process that took it, so none is folded.
///
/// A connection whose connecting end was folded is folded too when this end's flow, of this
/// listener, was reported in the same epoch. Otherwise it is reported, and taken back out of the
/// connecting end's count: a new listener, a listener of a group, or an epoch that ended during
/// the handshake.
// The steps are separate functions, each with its own keys, because one frame holding them all
// and a callee's exceeds the verifier's stack limit.
#[inline(always)]
pub(crate) fn fold_accepted<F: TcpFields>(ctx: &F, netns: u32, serial: u32, alone: bool, decision: &mut AcceptedFold) {
    let may_pair = alone && incoming_reported(ctx, netns, serial);
    let choice = consult_pair(ctx, may_pair, decision);
    if decision.flag != 0 {
        return;
    }
    if decision.client_pid != 0 {
        take_back_connect(ctx, decision);
    }
    if choice != 0 || !alone {
        note_incoming(ctx, netns, serial);
        return;
    }
    fold_incoming(ctx, netns, serial, decision);
}

/// True when this connection's incoming flow had a connection reported in the current epoch.
#[inline(never)]
fn incoming_reported<F: TcpFields>(ctx: &F, netns: u32, serial: u32) -> bool {
    let family = ctx.family();
    let (local, remote) = ctx.addresses(family);
    reported_this_epoch(&incoming_key(netns, serial, family, local, ctx.local_port(), remote))
}

/// Takes the connecting end's entry for this connection, if it runs on this host, and returns its
/// choice (0 when there is none). A folded connecting end folds this end too when `may_pair`:
/// this end's flow was reported in the epoch. Otherwise it is taken back and named in `decision`.
#[inline(never)]
fn consult_pair<F: TcpFields>(ctx: &F, may_pair: bool, decision: &mut AcceptedFold) -> u32 {
    let family = ctx.family();
    let (local, remote) = ctx.addresses(family);
    let pair = pair_key(family, remote, ctx.remote_port(), local, ctx.local_port());
    // SAFETY: the value is copied out before the entry is removed.
    let Some(client) = unsafe { TCP_PAIRS.get(&pair) }.copied() else { return 0 };
    let _ = TCP_PAIRS.remove(&pair);
    if client.choice == PAIR_FOLDED {
        if may_pair {
            decision.flag = SOCKET_FLAG_FOLDED_PAIRED;
        } else {
            decision.client_pid = client.pid;
            decision.client_netns = client.netns;
            decision.client_exec = client.exec;
            decision.client_family = client.family;
        }
    }
    client.choice
}

/// Marks this connection's incoming flow reported in the current epoch.
#[inline(never)]
fn note_incoming<F: TcpFields>(ctx: &F, netns: u32, serial: u32) {
    let family = ctx.family();
    let (local, remote) = ctx.addresses(family);
    note_reported(&incoming_key(netns, serial, family, local, ctx.local_port(), remote));
}

/// Folds this connection into its incoming flow when the flow had one reported in the epoch.
#[inline(never)]
fn fold_incoming<F: TcpFields>(ctx: &F, netns: u32, serial: u32, decision: &mut AcceptedFold) {
    let family = ctx.family();
    let (local, remote) = ctx.addresses(family);
    if let Some(acceptor) = count_repeat(&incoming_key(netns, serial, family, local, ctx.local_port(), remote)) {
        decision.flag = SOCKET_FLAG_FOLDED_IN;
        decision.acceptor = acceptor;
    }
}

/// Takes the folded connect that `decision` names back out of its outgoing flow's count, because
/// its accepting end is reported with it.
#[inline(never)]
fn take_back_connect<F: TcpFields>(ctx: &F, decision: &AcceptedFold) {
    let family = ctx.family();
    let local = ctx.local_address(family);
    // The connecting socket's view of this address: an IPv4-mapped one when only one of the two
    // sockets is IPv6.
    let server = match (decision.client_family, family) {
        (FAMILY_INET6, FAMILY_INET) => map_ipv4(&local),
        (FAMILY_INET, FAMILY_INET6) => unmap(&local),
        _ => local,
    };
    let key = outgoing_key(
        decision.client_netns,
        decision.client_pid,
        decision.client_exec,
        decision.client_family,
        server,
        ctx.local_port(),
    );
    if let Some(counts) = FOLDS.get_ptr_mut(&key) {
        // SAFETY: as in `fold_end`.
        unsafe { add(addr_of_mut!((*counts).taken_back), 1) };
    }
}

/// Counts the handshake end or the close of a folded socket in its flow.
#[inline(never)]
pub(crate) fn fold_end<F: TcpFields>(ctx: &F, skaddr: u64, owner: &SockOwner, kind: TcpKind) {
    // Tracked here only when `PAIRED_ACCEPTS` was full; the connecting end counts it. The
    // tracepoint folds nothing, and leaves this function empty.
    if !F::FOLDS || owner.flags & SOCKET_FLAG_FOLDED_PAIRED != 0 {
        return;
    }

    let family = ctx.family();
    let (local, remote) = ctx.addresses(family);
    let outgoing = owner.flags & SOCKET_FLAG_FOLDED_OUT != 0;
    let key = if outgoing {
        outgoing_key(owner.netns, owner.pid, owner.exec, family, remote, ctx.remote_port())
    } else {
        incoming_key(owner.netns, owner.exec, family, local, ctx.local_port(), remote)
    };
    if outgoing && kind == TcpKind::ConnectFailed {
        // The attempt no accept will take: its entry would otherwise wait in the LRU map.
        let _ = TCP_PAIRS.remove(&pair_key(family, local, ctx.local_port(), remote, ctx.remote_port()));
    }

    // The agent removes a flow's entry once it is idle and none of its connections is open, so a
    // close finds the entry unless the map was full when the entry came back.
    let Some(counts) = FOLDS.get_ptr_mut(&key) else { return };
    // SAFETY: the pointer is to this map's value, valid during the program. The counters are
    // changed with atomic adds because other CPUs change them too.
    unsafe {
        match kind {
            TcpKind::Connected => add(addr_of_mut!((*counts).established), 1),
            TcpKind::ConnectFailed => add(addr_of_mut!((*counts).failed), 1),
            TcpKind::Close => {
                add(addr_of_mut!((*counts).closes), 1);
                if let Some((sent, received, _)) = kernel::tcp_socket_counters(skaddr) {
                    add(addr_of_mut!((*counts).bytes_sent), sent);
                    add(addr_of_mut!((*counts).bytes_received), received);
                }
            }
            _ => return,
        }
        (*counts).last_ns = coarse_ns();
    }
}

/// Makes the next connect of a reported connection's flow reported too: its attempt failed, so
/// the agent has no established connection of the flow in this epoch to repeat.
#[inline(never)]
pub(crate) fn forget_failed<F: TcpFields>(ctx: &F, owner: &SockOwner) {
    let family = ctx.family();
    let (_, remote) = ctx.addresses(family);
    let key = outgoing_key(owner.netns, owner.pid, owner.exec, family, remote, ctx.remote_port());
    if let Some(counts) = FOLDS.get_ptr_mut(&key) {
        // SAFETY: the pointer is to this map's value, valid during the program.
        unsafe { (*counts).epoch = NO_EPOCH };
    }
}

/// Takes a folded incoming connection back out of its flow's count: a process outside the scope
/// accepted it, or another process than the flow's last reported acceptor, which the caller then
/// reports.
#[inline(never)]
pub(crate) fn unfold_accepted(key: &FoldKey) {
    if let Some(counts) = FOLDS.get_ptr_mut(key) {
        // SAFETY: as in `fold_end`.
        unsafe { add(addr_of_mut!((*counts).taken_back), 1) };
    }
}

/// Records `tgid` as the process that accepted the incoming flow's reported connection, so that
/// its folded connections taken by another process are reported.
#[inline(never)]
pub(crate) fn note_acceptor(tgid: u32, key: &FoldKey) {
    if let Some(counts) = FOLDS.get_ptr_mut(key) {
        // SAFETY: as in `fold_end`; a plain store of one field.
        unsafe { (*counts).acceptor = tgid };
    }
}

/// Epoch value that no connection is in.
const NO_EPOCH: u64 = u64::MAX;

#[inline(always)]
fn outgoing_key(netns: u32, pid: u32, exec: u32, family: u16, remote: [u8; 16], remote_port: u16) -> FoldKey {
    FoldKey {
        netns,
        pid,
        family,
        direction: FOLD_OUT,
        local_port: 0,
        remote_port,
        local_addr: [0; 16],
        remote_addr: remote,
        exec,
        _reserved: 0,
    }
}

/// Returns the key of the incoming flow of a connection that reached `local`:`local_port` from
/// `remote`, on the listener with `serial`.
#[inline(always)]
pub(crate) fn incoming_key(
    netns: u32,
    serial: u32,
    family: u16,
    local: [u8; 16],
    local_port: u16,
    remote: [u8; 16],
) -> FoldKey {
    FoldKey {
        netns,
        pid: 0,
        family,
        direction: FOLD_IN,
        local_port,
        remote_port: 0,
        local_addr: local,
        remote_addr: remote,
        exec: serial,
        _reserved: 0,
    }
}

/// Returns the pair key of a connection from `client` to `server`. An IPv4-mapped IPv6 address is
/// written as the IPv4 address it is, so that an IPv4 socket at one end and a dual-stack IPv6
/// socket at the other give the same key.
#[inline(always)]
fn pair_key(family: u16, client: [u8; 16], client_port: u16, server: [u8; 16], server_port: u16) -> PairKey {
    let mapped = family == FAMILY_INET6 && is_ipv4_mapped(&client) && is_ipv4_mapped(&server);
    let (family, client, server) = if mapped {
        (FAMILY_INET, unmap(&client), unmap(&server))
    } else {
        (family, client, server)
    };
    PairKey { family, client_port, server_port, _reserved: 0, client_addr: client, server_addr: server }
}

#[inline(always)]
fn is_ipv4_mapped(address: &[u8; 16]) -> bool {
    let [a, b, c, d, e, f, g, h, i, j, k, l, ..] = *address;
    (a | b | c | d | e | f | g | h | i | j) == 0 && k == 0xff && l == 0xff
}

#[inline(always)]
fn map_ipv4(address: &[u8; 16]) -> [u8; 16] {
    let [a, b, c, d, ..] = *address;
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d]
}

#[inline(always)]
fn unmap(address: &[u8; 16]) -> [u8; 16] {
    let [.., m, n, o, p] = *address;
    crate::tcp::widen_ipv4([m, n, o, p])
}

/// Returns the current time, to a timer tick, and fold epoch, or `None` when folding is off.
#[inline(always)]
fn now_and_epoch() -> Option<(u64, u64)> {
    let window = window();
    if window == 0 {
        return None;
    }
    let now = coarse_ns();
    Some((now, now / window))
}

/// True when a connection of `key` was reported in the current epoch.
#[inline(always)]
fn reported_this_epoch(key: &FoldKey) -> bool {
    let Some((_, epoch)) = now_and_epoch() else { return false };
    // SAFETY: the value is copied out of the map.
    unsafe { FOLDS.get(key) }.is_some_and(|counts| counts.epoch == epoch)
}

/// Marks the flow of `key` reported in the current epoch.
#[inline(never)]
fn note_reported(key: &FoldKey) {
    let Some((now, epoch)) = now_and_epoch() else { return };
    match FOLDS.get_ptr_mut(key) {
        // SAFETY: the pointer is to this map's value, valid during the program.
        Some(counts) => unsafe {
            (*counts).epoch = epoch;
            (*counts).last_ns = now;
        },
        None => insert(key, epoch, now),
    }
}

/// Counts a connection of `key` when the flow had one reported in the current epoch, and returns
/// the flow's last reported acceptor. Otherwise marks the flow reported now and returns `None`:
/// the caller reports this connection.
#[inline(always)]
fn count_repeat(key: &FoldKey) -> Option<u32> {
    let Some((now, epoch)) = now_and_epoch() else { return None };
    match FOLDS.get_ptr_mut(key) {
        // SAFETY: the pointer is to this map's value, valid during the program.
        Some(counts) => unsafe {
            if (*counts).epoch == epoch {
                add(addr_of_mut!((*counts).connects), 1);
                (*counts).last_ns = now;
                return Some((*counts).acceptor);
            }
            (*counts).epoch = epoch;
            (*counts).last_ns = now;
            None
        },
        None => {
            insert(key, epoch, now);
            None
        }
    }
}

/// Adds the entry of a flow reported now. Another CPU that added it first keeps its entry, and a
/// full map leaves the flow's connections reported one by one.
#[inline(never)]
fn insert(key: &FoldKey, epoch: u64, now: u64) {
    // Inserted from a static, so that the value takes no room in the frame of `fold_connect`,
    // which calls this with its own keys on the stack.
    match FOLDS.insert(key, &EMPTY_COUNTS, BPF_NOEXIST) {
        Ok(()) => {}
        Err(EEXIST) => return,
        Err(_) => {
            count(Counter::FoldMapFull);
            return;
        }
    }
    if let Some(counts) = FOLDS.get_ptr_mut(key) {
        // SAFETY: the pointer is to this map's value, valid during the program.
        unsafe {
            (*counts).epoch = epoch;
            (*counts).last_ns = now;
        }
    }
}

/// The counters of a new flow, before its epoch is set. Between the insert and that store, a
/// connection of the flow on another CPU finds epoch 0 and is reported.
static EMPTY_COUNTS: FoldCounts = FoldCounts {
    epoch: 0,
    connects: 0,
    established: 0,
    failed: 0,
    closes: 0,
    bytes_sent: 0,
    bytes_received: 0,
    last_ns: 0,
    taken_back: 0,
    acceptor: 0,
    _reserved: 0,
};

/// `bpf_map_update_elem` flag: fail instead of replacing an entry.
const BPF_NOEXIST: u64 = 1;
/// `bpf_map_update_elem` error with `BPF_NOEXIST` when the entry exists.
const EEXIST: i64 = -17;

/// Adds to a counter that programs on other CPUs may change at the same time.
///
/// # Safety
/// `counter` must point into a map value that stays valid during the program.
#[inline(always)]
pub(crate) unsafe fn add(counter: *mut u64, value: u64) {
    AtomicU64::from_ptr(counter).fetch_add(value, Ordering::Relaxed);
}
