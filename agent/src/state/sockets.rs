//! TCP socket state: listeners, and the join of both ends of a connection on this host.
//!
//! The kernel reports an outgoing connection in the connecting process (`Connected`) and an
//! incoming one without a process (`Accepted`: the handshake completes in softirq). When both ends
//! run on this host, for example in two network namespaces joined by a veth pair, the two events
//! carry the same 4-tuple, mirrored. The join holds each end for a short window so that the flow
//! reaches the engine once, with the client process and the server process together. An end whose
//! partner does not arrive within the window is a flow to or from another host.
//!
//! The server end belongs to the process that accepts the connection, which an `accept` event
//! names after the handshake: a prefork worker, one of several SO_REUSEPORT listeners, or a process
//! that received the listening socket from another. When the kernel reports acceptors, an accepted
//! end waits up to the accept window for that event and falls back to the listener's owner after
//! it (io_uring's accept, a full ring buffer, or a process slow to accept).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use driftwatch_model::observation::ProcessInfo;
use driftwatch_model::FastMap as HashMap;

/// How long the join remembers an accepted socket it has already handed on, so that a late
/// `accept` event or a late `Accepted` event of the same socket does not make a second flow.
const RECENT_SOCKET_RETENTION: Duration = Duration::from_secs(30);

/// A listening socket and its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub pid: u32,
    pub addr: SocketAddr,
    pub netns: u32,
}

/// One end of a connection waiting for its partner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingEnd {
    /// The process on this end, 0 when unknown.
    pub pid: u32,
    pub netns: u32,
    /// The process as it was when the event arrived. It is taken then, not when the join window
    /// ends, because a process that connects and then execs must be reported as the program that
    /// connected.
    pub process: Option<Arc<ProcessInfo>>,
    /// When the kernel reported this end, on the wall clock.
    pub time: SystemTime,
}

/// A connection ready for the engine, with whatever ends were seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinedFlow {
    pub client_addr: SocketAddr,
    pub server_addr: SocketAddr,
    /// The connecting end, when it ran on this host.
    pub client: Option<PendingEnd>,
    /// The accepting end, when it ran on this host.
    pub server: Option<PendingEnd>,
}

/// Counters of the socket state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketStats {
    pub listeners: u64,
    pub pending: u64,
    pub joined: u64,
    pub unjoined: u64,
    /// Pending ends flushed early because the pending table was full.
    pub pending_overflow: u64,
    /// Accepted connections whose listener the agent never saw.
    pub accepted_without_listener: u64,
    /// Listeners not kept because the listener table was full.
    pub listeners_dropped: u64,
    /// Accepted connections attributed to the process that accepted them.
    pub accepts_by_acceptor: u64,
    /// Accepted connections attributed to the listener's owner because no `accept` event came
    /// within the accept window.
    pub accepts_by_listener_owner: u64,
    /// `accept` events that came after their connection was handed on with the listener's owner.
    pub late_accepts: u64,
}

/// Key of a connection: client and server address, plus the namespace for loopback, whose
/// addresses repeat in every namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct FlowKey {
    client: SocketAddr,
    server: SocketAddr,
    loopback_netns: u32,
}

impl FlowKey {
    fn new(client: SocketAddr, server: SocketAddr, netns: u32) -> Self {
        let loopback = client.ip().is_loopback() && server.ip().is_loopback();
        FlowKey { client, server, loopback_netns: if loopback { netns } else { 0 } }
    }
}

struct Pending {
    /// When the flow goes to the engine with whatever ends it has.
    deadline: Instant,
    /// When the join window of the first end passes; the deadline once no acceptor is awaited.
    join_deadline: Instant,
    flow: JoinedFlow,
    /// The accepted socket whose `accept` event the server end waits for.
    awaiting_acceptor: Option<u64>,
}

/// State of an accepted socket that the join has handed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecentSocket {
    /// The `accept` event came first and its end went into the join; the `Accepted` event adds
    /// nothing.
    Accepted,
    /// The flow went to the engine with the listener's owner; a late `accept` event adds nothing.
    HandedToListenerOwner,
}

/// Listener table and connection join. The pipeline task owns it.
pub struct SocketState {
    join_window: Duration,
    /// How long an accepted end waits for the process that accepts it; `None` when the kernel
    /// does not report acceptors and the listener's owner is taken at once.
    accept_window: Option<Duration>,
    max_pending: usize,
    max_listeners: usize,
    /// Listening sockets by (netns, port), with their kernel socket ids. Several sockets can
    /// share a port: the IPv4 and IPv6 halves of a dual listener, or SO_REUSEPORT groups.
    listeners: HashMap<(u32, u16), Vec<(u64, Listener)>>,
    listener_socks: HashMap<u64, (u32, u16)>,
    pending: HashMap<FlowKey, Pending>,
    /// Deadlines of `pending`, earliest first. An entry whose deadline no longer matches its
    /// pending flow is stale and skipped.
    ///
    /// An entry is the deadline and a sequence number, whose flow key is in `order_keys`. With
    /// the keys in the heap, each pop moved and compared pairs of socket addresses, about 8% of
    /// the agent's CPU time in a connect storm (perf).
    order: BinaryHeap<Reverse<(Instant, u64)>>,
    order_keys: HashMap<u64, FlowKey>,
    /// Sequence number of the next entry in `order`.
    next_sequence: u64,
    /// Accepted sockets whose server end waits in `pending` for its acceptor.
    awaiting: HashMap<u64, FlowKey>,
    /// Sockets whose late events add nothing, with when each entry expires. The close of a socket
    /// removes its entry: a later socket at the same kernel address is another one.
    recent: HashMap<u64, (RecentSocket, Instant)>,
    recent_order: VecDeque<(Instant, u64)>,
    stats: SocketStats,
}

impl SocketState {
    pub fn new(join_window: Duration, max_pending: usize, max_listeners: usize) -> Self {
        SocketState {
            join_window,
            accept_window: None,
            max_pending,
            max_listeners,
            listeners: HashMap::default(),
            listener_socks: HashMap::default(),
            pending: HashMap::default(),
            order: BinaryHeap::new(),
            order_keys: HashMap::default(),
            next_sequence: 0,
            awaiting: HashMap::default(),
            recent: HashMap::default(),
            recent_order: VecDeque::new(),
            stats: SocketStats::default(),
        }
    }

    /// Makes accepted ends wait up to `window` for the `accept` event that names their process.
    /// Call it only when the kernel reports acceptors; otherwise every accepted connection would
    /// wait the whole window for nothing.
    pub fn await_acceptors(&mut self, window: Duration) {
        self.accept_window = Some(window);
    }
    /// Records a listener. Returns false when the table is full and the listener was not kept.
    pub fn on_listen(&mut self, sock: u64, listener: Listener) -> bool {
        let key = (listener.netns, listener.addr.port());
        if !self.listeners.contains_key(&key) && self.listeners.len() >= self.max_listeners {
            self.stats.listeners_dropped += 1;
            return false;
        }
        if let Some(previous) = self.listener_socks.insert(sock, key) {
            self.remove_listener_sock(previous, sock);
        }
        let sockets = self.listeners.entry(key).or_default();
        sockets.retain(|(existing, _)| *existing != sock);
        sockets.push((sock, listener));
        true
    }

    /// Records the listeners found in /proc at start-up, so that connections accepted on them
    /// are attributed. Returns how many were kept. They are keyed by socket inode, which no
    /// kernel event carries, so they stay; a newer listener on their address and port comes
    /// first in [`Self::listener`].
    pub fn seed_listeners(&mut self, sockets: &[super::seed::SeededSocket]) -> usize {
        let mut kept = 0;
        for socket in sockets {
            if socket.state != super::seed::SeededState::Listen || socket.pid == 0 {
                continue;
            }
            let listener = Listener { pid: socket.pid, addr: socket.local, netns: socket.netns };
            // Inode numbers and kernel socket addresses never collide: the top bit marks an inode.
            if self.on_listen(socket.inode | 1 << 63, listener) {
                kept += 1;
            }
        }
        kept
    }

    /// Adds the connections found in /proc at start-up to the join, as if their ends had just
    /// been reported, so that they reach the graph like new ones. A connection whose local port
    /// is a listening port in its namespace is the accepting end; any other is the connecting end.
    /// Both ends of a connection on this host join as usual. Call after [`Self::seed_listeners`].
    /// Returns how many ends were added, and the flows ready for the engine: joined ones and any
    /// pushed out by a full pending table.
    pub fn seed_connections(
        &mut self,
        sockets: &[super::seed::SeededSocket],
        resolve: impl Fn(u32) -> Option<Arc<ProcessInfo>>,
        now: Instant,
    ) -> (usize, Vec<JoinedFlow>) {
        let mut added = 0;
        let mut flushed = Vec::new();
        for socket in sockets {
            if socket.state != super::seed::SeededState::Established || socket.pid == 0 {
                continue;
            }
            // Opened before the agent started; it is first seen now.
            let end = PendingEnd { pid: socket.pid, netns: socket.netns, process: resolve(socket.pid), time: SystemTime::now() };
            let accepted = self.listeners.contains_key(&(socket.netns, socket.local.port()));
            let out = if accepted {
                let key = FlowKey::new(socket.remote, socket.local, socket.netns);
                self.add_end(key, now, None, |flow| flow.server = Some(end))
            } else {
                let key = FlowKey::new(socket.local, socket.remote, socket.netns);
                self.add_end(key, now, None, |flow| flow.client = Some(end))
            };
            flushed.extend(out);
            added += 1;
        }
        (added, flushed)
    }

    /// Forgets a socket that closed: its listener, or what a late event of it would add nothing to.
    pub fn on_close(&mut self, sock: u64) {
        self.recent.remove(&sock);
        if let Some(key) = self.listener_socks.remove(&sock) {
            self.remove_listener_sock(key, sock);
        }
    }

    fn remove_listener_sock(&mut self, key: (u32, u16), sock: u64) {
        if let Some(sockets) = self.listeners.get_mut(&key) {
            sockets.retain(|(existing, _)| *existing != sock);
            if sockets.is_empty() {
                self.listeners.remove(&key);
            }
        }
    }

    /// Returns every open listening socket.
    pub fn listeners(&self) -> impl Iterator<Item = &Listener> {
        self.listeners.values().flatten().map(|(_, listener)| listener)
    }

    /// Returns the owner of the listener for a local address in a namespace: the socket bound to
    /// that address, else one bound to all addresses of its family, else, for an IPv4 address,
    /// an IPv6 one bound to all addresses. `None` when only other addresses of the port listen.
    pub fn listener(&self, netns: u32, local: SocketAddr) -> Option<&Listener> {
        let sockets = self.listeners.get(&(netns, local.port()))?;
        // The newest socket first: no listener's close is reported, so an older one on the same
        // address may have closed.
        let exact = sockets.iter().rev().find(|(_, listener)| listener.addr.ip() == local.ip());
        // An IPv4 connection reaches an IPv6 wildcard listener too, when that socket is
        // dual-stack; a wildcard socket of the connection's own family comes first.
        let wildcard = |same_family: bool| {
            sockets.iter().rev().find(|(_, listener)| {
                listener.addr.ip().is_unspecified() && (!same_family || listener.addr.is_ipv4() == local.is_ipv4())
            })
        };
        let dual_stack = || if local.is_ipv4() { wildcard(false) } else { None };
        // A listener on another address of the port did not take this connection.
        exact.or_else(|| wildcard(true)).or_else(dual_stack).map(|(_, listener)| listener)
    }

    /// Records the connecting end. Returns the joined flow when the accepting end was waiting.
    pub fn on_connected(
        &mut self,
        process: Option<Arc<ProcessInfo>>,
        pid: u32,
        netns: u32,
        local: SocketAddr,
        remote: SocketAddr,
        now: Instant,
        time: SystemTime,
    ) -> Vec<JoinedFlow> {
        let key = FlowKey::new(local, remote, netns);
        let end = PendingEnd { pid, netns, process, time };
        self.add_end(key, now, None, |flow| flow.client = Some(end))
    }

    /// Records the accepting end of the kernel socket `sock`. It is attributed to the listener's
    /// owner, whom `resolve` looks up, unless an `accept` event names the process that accepted it:
    /// one already seen, or one that comes within the accept window.
    pub fn on_accepted(
        &mut self,
        resolve: impl FnOnce(u32) -> Option<Arc<ProcessInfo>>,
        sock: u64,
        netns: u32,
        local: SocketAddr,
        remote: SocketAddr,
        now: Instant,
        time: SystemTime,
    ) -> Vec<JoinedFlow> {
        if self.recent_state(sock) == Some(RecentSocket::Accepted) {
            self.recent.remove(&sock);
            return Vec::new();
        }
        let pid = match self.listener(netns, local) {
            Some(listener) => listener.pid,
            None => {
                self.stats.accepted_without_listener += 1;
                0
            }
        };
        let key = FlowKey::new(remote, local, netns);
        let process = if pid == 0 { None } else { resolve(pid) };
        let end = PendingEnd { pid, netns, process, time };
        let awaiting = self.accept_window.map(|window| (sock, now + window));
        if awaiting.is_none() {
            self.stats.accepts_by_listener_owner += 1;
        }
        self.add_end(key, now, awaiting, |flow| flow.server = Some(end))
    }

    /// Records the process that accepted the kernel socket `sock`. Its connection is joined as
    /// usual; when the `Accepted` event never came (it is not sent for a listener the kernel
    /// program does not know under a cgroup scope), this end stands for it.
    pub fn on_accept(
        &mut self,
        process: Option<Arc<ProcessInfo>>,
        pid: u32,
        sock: u64,
        netns: u32,
        local: SocketAddr,
        remote: SocketAddr,
        now: Instant,
        time: SystemTime,
    ) -> Vec<JoinedFlow> {
        self.expire_recent(now);
        let end = PendingEnd { pid, netns, process, time };
        if let Some(key) = self.awaiting.remove(&sock) {
            return self.resolve_acceptor(key, end, now);
        }
        if self.recent_state(sock) == Some(RecentSocket::HandedToListenerOwner) {
            self.recent.remove(&sock);
            self.stats.late_accepts += 1;
            return Vec::new();
        }
        self.stats.accepts_by_acceptor += 1;
        self.remember_recent(sock, RecentSocket::Accepted, now);
        let key = FlowKey::new(remote, local, netns);
        self.add_end(key, now, None, |flow| flow.server = Some(end))
    }

    /// Returns the flows whose join window has passed.
    pub fn flush_expired(&mut self, now: Instant) -> Vec<JoinedFlow> {
        self.expire_recent(now);
        let mut flushed = Vec::new();
        while let Some(Reverse((deadline, _))) = self.order.peek().copied() {
            if deadline > now {
                break;
            }
            let Some(key) = self.pop_deadline() else { continue };
            if self.pending.get(&key).is_some_and(|pending| pending.deadline == deadline) {
                let flow = self.take_pending(key, now);
                if flow.client.is_some() && flow.server.is_some() {
                    self.stats.joined += 1;
                } else {
                    self.stats.unjoined += 1;
                }
                flushed.push(flow);
            }
        }
        flushed
    }

    /// Returns the earliest deadline of a pending end, for the pipeline's timer. It can be a
    /// stale one, which only makes the timer fire early.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.order.peek().map(|Reverse((deadline, _))| *deadline)
    }

    pub fn stats(&self) -> SocketStats {
        SocketStats { listeners: self.listeners.len() as u64, pending: self.pending.len() as u64, ..self.stats.clone() }
    }

    /// Puts the acceptor into the server end of the flow at `key` and hands the flow on when it
    /// is complete.
    fn resolve_acceptor(&mut self, key: FlowKey, end: PendingEnd, now: Instant) -> Vec<JoinedFlow> {
        let Some(pending) = self.pending.get_mut(&key) else {
            return Vec::new();
        };
        self.stats.accepts_by_acceptor += 1;
        pending.flow.server = Some(end);
        pending.awaiting_acceptor = None;
        if pending.flow.client.is_some() {
            self.stats.joined += 1;
            return vec![self.take_pending(key, now)];
        }
        // The client end may still come from this host until the join window passes.
        if pending.join_deadline <= now {
            self.stats.unjoined += 1;
            return vec![self.take_pending(key, now)];
        }
        pending.deadline = pending.join_deadline;
        let deadline = pending.join_deadline;
        self.push_deadline(deadline, key);
        Vec::new()
    }

    /// Removes the flow at `key`; a server end that still waits for its acceptor keeps the
    /// listener's owner.
    fn take_pending(&mut self, key: FlowKey, now: Instant) -> JoinedFlow {
        let pending = self.pending.remove(&key).expect("caller checked the entry");
        if let Some(sock) = pending.awaiting_acceptor {
            self.awaiting.remove(&sock);
            self.stats.accepts_by_listener_owner += 1;
            self.remember_recent(sock, RecentSocket::HandedToListenerOwner, now);
        }
        pending.flow
    }

    fn recent_state(&self, sock: u64) -> Option<RecentSocket> {
        self.recent.get(&sock).map(|(state, _)| *state)
    }

    fn remember_recent(&mut self, sock: u64, state: RecentSocket, now: Instant) {
        if self.recent.len() >= self.max_pending {
            while let Some((expiry, oldest)) = self.recent_order.pop_front() {
                if self.forget_recent(oldest, expiry) {
                    break;
                }
            }
        }
        let expiry = now + RECENT_SOCKET_RETENTION;
        self.recent.insert(sock, (state, expiry));
        self.recent_order.push_back((expiry, sock));
    }

    fn expire_recent(&mut self, now: Instant) {
        while let Some(&(expiry, sock)) = self.recent_order.front() {
            if expiry > now {
                break;
            }
            self.recent_order.pop_front();
            self.forget_recent(sock, expiry);
        }
    }

    /// Removes the entry of `sock` when it is the one that expires at `expiry`, not that of a
    /// later socket at the same address. Returns whether it did.
    fn forget_recent(&mut self, sock: u64, expiry: Instant) -> bool {
        if self.recent.get(&sock).is_some_and(|(_, current)| *current == expiry) {
            self.recent.remove(&sock);
            return true;
        }
        false
    }

    /// Adds one end to the flow at `key`. `awaiting` is the accepted socket and the time until
    /// which the server end waits for its acceptor.
    fn add_end(
        &mut self,
        key: FlowKey,
        now: Instant,
        awaiting: Option<(u64, Instant)>,
        set_end: impl FnOnce(&mut JoinedFlow),
    ) -> Vec<JoinedFlow> {
        if let Some(mut pending) = self.pending.remove(&key) {
            set_end(&mut pending.flow);
            if let Some((sock, until)) = awaiting {
                if let Some(previous) = pending.awaiting_acceptor.replace(sock) {
                    self.awaiting.remove(&previous);
                }
                self.awaiting.insert(sock, key);
                if until > pending.deadline {
                    pending.deadline = until;
                    self.push_deadline(until, key);
                }
            }
            if pending.flow.client.is_some() && pending.flow.server.is_some() && pending.awaiting_acceptor.is_none() {
                self.stats.joined += 1;
                return vec![pending.flow];
            }
            // Either the server end waits for its acceptor, or the same end came twice (a 4-tuple
            // reused within the window): the newer end replaces the older one and the flow waits.
            self.pending.insert(key, pending);
            return Vec::new();
        }
        let mut out = Vec::new();
        if self.pending.len() >= self.max_pending {
            // Make room by flushing the earliest flow without its partner; it still reaches the engine.
            while let Some(Reverse((deadline, _))) = self.order.peek().copied() {
                let Some(oldest) = self.pop_deadline() else { continue };
                if self.pending.get(&oldest).is_some_and(|pending| pending.deadline == deadline) {
                    self.stats.pending_overflow += 1;
                    out.push(self.take_pending(oldest, now));
                    break;
                }
            }
        }
        let mut flow = JoinedFlow { client_addr: key.client, server_addr: key.server, client: None, server: None };
        set_end(&mut flow);
        let join_deadline = now + self.join_window;
        let mut deadline = join_deadline;
        let mut awaiting_acceptor = None;
        if let Some((sock, until)) = awaiting {
            self.awaiting.insert(sock, key);
            awaiting_acceptor = Some(sock);
            deadline = deadline.max(until);
        }
        self.pending.insert(key, Pending { deadline, join_deadline, flow, awaiting_acceptor });
        self.push_deadline(deadline, key);
        out
    }

    fn push_deadline(&mut self, at: Instant, key: FlowKey) {
        self.order.push(Reverse((at, self.next_sequence)));
        self.order_keys.insert(self.next_sequence, key);
        self.next_sequence += 1;
    }

    /// Removes the earliest entry of `order` and returns its flow key.
    fn pop_deadline(&mut self) -> Option<FlowKey> {
        let Reverse((_, sequence)) = self.order.pop()?;
        self.order_keys.remove(&sequence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel time of every end in these tests; the join does not look at it.
    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn state() -> SocketState {
        SocketState::new(Duration::from_millis(100), 4, 4)
    }

    #[test]
    fn both_ends_join_into_one_flow() {
        let mut state = state();
        let now = Instant::now();
        assert!(state.on_listen(1, Listener { pid: 20, addr: addr("0.0.0.0:5432"), netns: 2 }));
        assert!(state.on_connected(None, 10, 1, addr("198.18.0.2:40000"), addr("198.18.0.3:5432"), now, T0).is_empty());
        let joined = state.on_accepted(|_| None, 0x100, 2, addr("198.18.0.3:5432"), addr("198.18.0.2:40000"), now, T0);
        assert_eq!(joined.len(), 1);
        assert_eq!(joined[0].client, Some(PendingEnd { pid: 10, netns: 1, process: None, time: T0 }));
        assert_eq!(joined[0].server, Some(PendingEnd { pid: 20, netns: 2, process: None, time: T0 }));
        assert_eq!(joined[0].server_addr, addr("198.18.0.3:5432"));
        assert!(state.flush_expired(now + Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn accepted_first_still_joins() {
        let mut state = state();
        let now = Instant::now();
        state.on_listen(1, Listener { pid: 20, addr: addr("[::]:443"), netns: 2 });
        assert!(state.on_accepted(|_| None, 0x100, 2, addr("[fd00::3]:443"), addr("[fd00::2]:5000"), now, T0).is_empty());
        let joined = state.on_connected(None, 10, 1, addr("[fd00::2]:5000"), addr("[fd00::3]:443"), now, T0);
        assert_eq!(joined.len(), 1);
    }

    #[test]
    fn lone_end_flushes_after_window() {
        let mut state = state();
        let now = Instant::now();
        state.on_connected(None, 10, 1, addr("198.18.0.2:40000"), addr("198.18.9.9:443"), now, T0);
        assert!(state.flush_expired(now + Duration::from_millis(50)).is_empty());
        let flushed = state.flush_expired(now + Duration::from_millis(150));
        assert_eq!(flushed.len(), 1);
        assert_eq!(flushed[0].server, None);
        assert_eq!(state.stats().unjoined, 1);
    }

    #[test]
    fn loopback_in_different_namespaces_does_not_join() {
        let mut state = state();
        let now = Instant::now();
        state.on_connected(None, 10, 1, addr("127.0.0.1:40000"), addr("127.0.0.1:80"), now, T0);
        assert!(state.on_accepted(|_| None, 0x100, 2, addr("127.0.0.1:80"), addr("127.0.0.1:40000"), now, T0).is_empty());
        assert_eq!(state.flush_expired(now + Duration::from_secs(1)).len(), 2);
    }

    #[test]
    fn accepted_without_listener_is_counted() {
        let mut state = state();
        state.on_accepted(|_| None, 0x100, 2, addr("198.18.0.3:22"), addr("198.18.0.2:1"), Instant::now(), T0);
        assert_eq!(state.stats().accepted_without_listener, 1);
    }

    #[test]
    fn full_pending_table_flushes_oldest() {
        let mut state = state();
        let now = Instant::now();
        for port in 0..4 {
            state.on_connected(None, 10, 1, addr(&format!("198.18.0.2:{}", 4000 + port)), addr("198.18.9.9:443"), now, T0);
        }
        let out = state.on_connected(None, 10, 1, addr("198.18.0.2:5000"), addr("198.18.9.9:443"), now, T0);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].client_addr, addr("198.18.0.2:4000"));
        assert_eq!(state.stats().pending_overflow, 1);
    }

    #[test]
    fn accepted_on_a_seeded_listener_is_attributed() {
        use crate::state::seed::{SeededSocket, SeededState};
        let mut state = state();
        let seeded = |state, inode, pid| SeededSocket { state, netns: 2, local: addr("0.0.0.0:5432"), remote: addr("0.0.0.0:0"), inode, pid };
        let sockets = [seeded(SeededState::Listen, 77, 20), seeded(SeededState::Established, 78, 21), seeded(SeededState::Listen, 79, 0)];
        assert_eq!(state.seed_listeners(&sockets), 1);
        let now = Instant::now();
        state.on_accepted(|_| None, 0x100, 2, addr("198.18.0.3:5432"), addr("198.18.0.2:40000"), now, T0);
        let flushed = state.flush_expired(now + Duration::from_secs(1));
        assert_eq!(flushed[0].server, Some(PendingEnd { pid: 20, netns: 2, process: None, time: T0 }));
        assert_eq!(state.stats().accepted_without_listener, 0);
    }

    #[test]
    fn listener_stays_while_another_socket_listens() {
        let mut state = state();
        state.on_listen(9, Listener { pid: 20, addr: addr("127.0.0.1:80"), netns: 2 });
        state.on_listen(10, Listener { pid: 21, addr: addr("[::1]:80"), netns: 2 });
        assert_eq!(state.listener(2, addr("127.0.0.1:80")).map(|l| l.pid), Some(20));
        assert_eq!(state.listener(2, addr("[::1]:80")).map(|l| l.pid), Some(21));
        state.on_close(10);
        assert_eq!(state.listener(2, addr("127.0.0.1:80")).map(|l| l.pid), Some(20));
        state.on_close(9);
        assert!(state.listener(2, addr("127.0.0.1:80")).is_none());
    }

    #[test]
    fn listener_other_address_not_owner() {
        let mut state = state();
        state.on_listen(9, Listener { pid: 20, addr: addr("127.0.0.1:80"), netns: 2 });
        assert!(state.listener(2, addr("127.0.0.2:80")).is_none());
        state.on_listen(10, Listener { pid: 21, addr: addr("[::]:80"), netns: 2 });
        assert_eq!(state.listener(2, addr("127.0.0.2:80")).map(|l| l.pid), Some(21), "dual-stack wildcard");
        state.on_listen(11, Listener { pid: 22, addr: addr("0.0.0.0:80"), netns: 2 });
        assert_eq!(state.listener(2, addr("127.0.0.2:80")).map(|l| l.pid), Some(22), "IPv4 wildcard first");
        assert_eq!(state.listener(2, addr("127.0.0.1:80")).map(|l| l.pid), Some(20), "exact address first");
        assert!(state.listener(2, addr("[::1]:80")).is_some_and(|l| l.pid == 21));
    }

    #[test]
    fn listener_newest_on_address_first() {
        let mut state = state();
        state.on_listen(9, Listener { pid: 20, addr: addr("127.0.0.1:80"), netns: 2 });
        state.on_listen(10, Listener { pid: 21, addr: addr("127.0.0.1:80"), netns: 2 });
        assert_eq!(state.listener(2, addr("127.0.0.1:80")).map(|l| l.pid), Some(21));
    }

    #[test]
    fn closed_listener_is_forgotten() {
        let mut state = state();
        state.on_listen(9, Listener { pid: 20, addr: addr("0.0.0.0:80"), netns: 2 });
        state.on_close(9);
        assert!(state.listener(2, addr("198.18.0.3:80")).is_none());
    }

    fn prefork_state(now: Instant) -> SocketState {
        let mut state = state();
        state.await_acceptors(Duration::from_millis(500));
        state.on_listen(1, Listener { pid: 20, addr: addr("0.0.0.0:80"), netns: 2 });
        assert!(state.on_connected(None, 10, 1, addr("198.18.0.2:40000"), addr("198.18.0.3:80"), now, T0).is_empty());
        state
    }

    #[test]
    fn accepting_process_replaces_listener_owner() {
        let now = Instant::now();
        let mut state = prefork_state(now);
        assert!(state.on_accepted(|_| None, 0x100, 2, addr("198.18.0.3:80"), addr("198.18.0.2:40000"), now, T0).is_empty());
        // The join window passes while the worker has not accepted yet: nothing goes out.
        assert!(state.flush_expired(now + Duration::from_millis(200)).is_empty());
        let later = now + Duration::from_millis(300);
        let joined = state.on_accept(None, 21, 0x100, 2, addr("198.18.0.3:80"), addr("198.18.0.2:40000"), later, T0);
        assert_eq!(joined.len(), 1);
        assert_eq!(joined[0].server, Some(PendingEnd { pid: 21, netns: 2, process: None, time: T0 }));
        assert_eq!(joined[0].client.as_ref().map(|end| end.pid), Some(10));
        assert_eq!(state.stats().accepts_by_acceptor, 1);
        assert_eq!(state.stats().accepts_by_listener_owner, 0);
        assert!(state.flush_expired(now + Duration::from_secs(5)).is_empty());
    }

    #[test]
    fn accept_before_accepted_is_not_counted_twice() {
        let now = Instant::now();
        let mut state = prefork_state(now);
        let joined = state.on_accept(None, 21, 0x100, 2, addr("198.18.0.3:80"), addr("198.18.0.2:40000"), now, T0);
        assert_eq!(joined.len(), 1);
        assert_eq!(joined[0].server.as_ref().map(|end| end.pid), Some(21));
        assert!(state.on_accepted(|_| None, 0x100, 2, addr("198.18.0.3:80"), addr("198.18.0.2:40000"), now, T0).is_empty());
        assert!(state.flush_expired(now + Duration::from_secs(5)).is_empty());
    }

    #[test]
    fn missing_accept_falls_back_to_listener_owner() {
        let now = Instant::now();
        let mut state = prefork_state(now);
        state.on_accepted(|_| None, 0x100, 2, addr("198.18.0.3:80"), addr("198.18.0.2:40000"), now, T0);
        let flushed = state.flush_expired(now + Duration::from_millis(600));
        assert_eq!(flushed.len(), 1);
        assert_eq!(flushed[0].server.as_ref().map(|end| end.pid), Some(20));
        assert_eq!(state.stats().accepts_by_listener_owner, 1);
        // The accept that comes too late makes no second flow.
        let late = state.on_accept(None, 21, 0x100, 2, addr("198.18.0.3:80"), addr("198.18.0.2:40000"), now + Duration::from_secs(1), T0);
        assert!(late.is_empty());
        assert_eq!(state.stats().late_accepts, 1);
        assert!(state.flush_expired(now + Duration::from_secs(5)).is_empty());
    }

    #[test]
    fn closed_socket_address_starts_afresh() {
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        let mut state = prefork_state(now);
        // An accept whose `Accepted` event never comes (its listener is unknown to the kernel
        // program), then the close of that socket.
        assert_eq!(state.on_accept(None, 21, 0x100, 2, addr("198.18.0.3:80"), addr("198.18.0.2:40000"), now, T0).len(), 1);
        state.on_close(0x100);
        // A later socket at the same address is reported in full.
        assert!(state.on_connected(None, 10, 1, addr("198.18.0.2:40001"), addr("198.18.0.3:80"), later, T0).is_empty());
        state.on_accepted(|_| None, 0x100, 2, addr("198.18.0.3:80"), addr("198.18.0.2:40001"), later, T0);
        let flushed = state.flush_expired(later + Duration::from_millis(600));
        assert_eq!(flushed.len(), 1);
        assert_eq!(flushed[0].server.as_ref().map(|end| end.pid), Some(20));

        // The same after a connection handed to the listener's owner.
        state.on_close(0x100);
        state.on_accept(None, 21, 0x100, 2, addr("198.18.0.3:80"), addr("198.18.0.2:40002"), later, T0);
        assert_eq!(state.stats().late_accepts, 0);
        let flushed = state.flush_expired(later + Duration::from_secs(2));
        assert_eq!(flushed.len(), 1);
        assert_eq!(flushed[0].server.as_ref().map(|end| end.pid), Some(21));
    }

    #[test]
    fn reused_address_keeps_its_own_expiry() {
        let now = Instant::now();
        let mut state = prefork_state(now);
        assert_eq!(state.on_accept(None, 21, 0x100, 2, addr("198.18.0.3:80"), addr("198.18.0.2:40000"), now, T0).len(), 1);
        state.on_close(0x100);
        let later = now + Duration::from_secs(20);
        assert!(state.on_connected(None, 10, 1, addr("198.18.0.2:40001"), addr("198.18.0.3:80"), later, T0).is_empty());
        assert_eq!(state.on_accept(None, 21, 0x100, 2, addr("198.18.0.3:80"), addr("198.18.0.2:40001"), later, T0).len(), 1);
        // The first socket's entry expires at 30 s; the second's, at 50 s, still absorbs the late
        // `Accepted` event.
        state.flush_expired(now + Duration::from_secs(31));
        let late = state.on_accepted(|_| None, 0x100, 2, addr("198.18.0.3:80"), addr("198.18.0.2:40001"), now + Duration::from_secs(31), T0);
        assert!(late.is_empty());
        assert!(state.flush_expired(now + Duration::from_secs(32)).is_empty());
    }

    #[test]
    fn remote_client_flow_leaves_once_acceptor_is_known() {
        let mut state = state();
        state.await_acceptors(Duration::from_millis(500));
        state.on_listen(1, Listener { pid: 20, addr: addr("0.0.0.0:80"), netns: 2 });
        let now = Instant::now();
        state.on_accepted(|_| None, 0x100, 2, addr("198.18.0.3:80"), addr("203.0.113.9:40000"), now, T0);
        let joined = state.on_accept(None, 21, 0x100, 2, addr("198.18.0.3:80"), addr("203.0.113.9:40000"), now + Duration::from_millis(150), T0);
        assert_eq!(joined.len(), 1, "the join window has passed, so no client end can come");
        assert_eq!(joined[0].client, None);
        assert_eq!(joined[0].server.as_ref().map(|end| end.pid), Some(21));
    }

    #[test]
    fn seeded_connection_joins_its_two_ends() {
        use crate::state::seed::{SeededSocket, SeededState};
        let mut state = state();
        let socket = |state, local: &str, remote: &str, inode, pid| SeededSocket { state, netns: 2, local: addr(local), remote: addr(remote), inode, pid };
        let sockets = [
            socket(SeededState::Listen, "0.0.0.0:5432", "0.0.0.0:0", 70, 20),
            socket(SeededState::Established, "127.0.0.1:5432", "127.0.0.1:40000", 71, 21),
            socket(SeededState::Established, "127.0.0.1:40000", "127.0.0.1:5432", 72, 10),
            socket(SeededState::Established, "127.0.0.1:40001", "127.0.0.1:5432", 73, 0),
        ];
        state.seed_listeners(&sockets);
        let now = Instant::now();
        let (added, joined) = state.seed_connections(&sockets, |_| None, now);
        assert_eq!(added, 2);
        assert_eq!(joined.len(), 1, "{joined:?}");
        assert_eq!(joined[0].client_addr, addr("127.0.0.1:40000"));
        assert_eq!(joined[0].server_addr, addr("127.0.0.1:5432"));
        assert_eq!(joined[0].client.as_ref().map(|end| end.pid), Some(10));
        assert_eq!(joined[0].server.as_ref().map(|end| end.pid), Some(21));
        assert!(state.flush_expired(now + Duration::from_secs(1)).is_empty());
    }
}
