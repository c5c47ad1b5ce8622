//! TCP socket state: listeners, and the join of both ends of a connection on this host.
//!
//! The kernel reports an outgoing connection in the connecting process (`Connected`) and an
//! incoming one without a process (`Accepted`: the handshake completes in softirq). When both ends
//! run on this host, for example in two network namespaces joined by a veth pair, the two events
//! carry the same 4-tuple, mirrored. The join holds each end for a short window so that the flow
//! reaches the engine once, with the client process and the server process together. An end whose
//! partner does not arrive within the window is a flow to or from another host.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use driftwatch_model::observation::ProcessInfo;

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
}

/// Key of a connection: client and server address, plus the namespace for loopback, whose
/// addresses repeat in every namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    deadline: Instant,
    flow: JoinedFlow,
}

/// Listener table and connection join. The pipeline task owns it.
pub struct SocketState {
    join_window: Duration,
    max_pending: usize,
    max_listeners: usize,
    /// Listening sockets by (netns, port), with their kernel socket ids. Several sockets can
    /// share a port: the IPv4 and IPv6 halves of a dual listener, or SO_REUSEPORT groups.
    listeners: HashMap<(u32, u16), Vec<(u64, Listener)>>,
    listener_socks: HashMap<u64, (u32, u16)>,
    pending: HashMap<FlowKey, Pending>,
    order: VecDeque<(Instant, FlowKey)>,
    stats: SocketStats,
}

impl SocketState {
    pub fn new(join_window: Duration, max_pending: usize, max_listeners: usize) -> Self {
        SocketState {
            join_window,
            max_pending,
            max_listeners,
            listeners: HashMap::new(),
            listener_socks: HashMap::new(),
            pending: HashMap::new(),
            order: VecDeque::new(),
            stats: SocketStats::default(),
        }
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
    /// kernel event carries, so they are forgotten only when a new listener takes their port.
    // NOTE: the kernel's listener map is not seeded, so under a cgroup scope the kernel program
    // drops accepts on these listeners before they reach this table; without a scope they arrive.
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

    /// Forgets a listener when its socket closes; other sockets are ignored.
    pub fn on_close(&mut self, sock: u64) {
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
    /// that address, else one bound to all addresses of its family, else any on the port.
    pub fn listener(&self, netns: u32, local: SocketAddr) -> Option<&Listener> {
        let sockets = self.listeners.get(&(netns, local.port()))?;
        let exact = sockets.iter().find(|(_, listener)| listener.addr.ip() == local.ip());
        let wildcard = || {
            sockets.iter().find(|(_, listener)| {
                listener.addr.ip().is_unspecified() && listener.addr.is_ipv4() == local.is_ipv4()
            })
        };
        exact.or_else(wildcard).or_else(|| sockets.last()).map(|(_, listener)| listener)
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
    ) -> Vec<JoinedFlow> {
        let key = FlowKey::new(local, remote, netns);
        let end = PendingEnd { pid, netns, process };
        self.add_end(key, now, |flow| flow.client = Some(end))
    }

    /// Records the accepting end, attributed to the listener's owner, whom `resolve` looks up.
    pub fn on_accepted(
        &mut self,
        resolve: impl FnOnce(u32) -> Option<Arc<ProcessInfo>>,
        netns: u32,
        local: SocketAddr,
        remote: SocketAddr,
        now: Instant,
    ) -> Vec<JoinedFlow> {
        let pid = match self.listener(netns, local) {
            Some(listener) => listener.pid,
            None => {
                self.stats.accepted_without_listener += 1;
                0
            }
        };
        let key = FlowKey::new(remote, local, netns);
        let process = if pid == 0 { None } else { resolve(pid) };
        let end = PendingEnd { pid, netns, process };
        self.add_end(key, now, |flow| flow.server = Some(end))
    }

    /// Returns the flows whose join window has passed.
    pub fn flush_expired(&mut self, now: Instant) -> Vec<JoinedFlow> {
        let mut flushed = Vec::new();
        while let Some(&(deadline, key)) = self.order.front() {
            if deadline > now {
                break;
            }
            self.order.pop_front();
            if let Some(pending) = self.pending.get(&key) {
                if pending.deadline == deadline {
                    let pending = self.pending.remove(&key).expect("entry checked above");
                    self.stats.unjoined += 1;
                    flushed.push(pending.flow);
                }
            }
        }
        flushed
    }

    /// Returns the earliest deadline of a pending end, for the pipeline's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.order.front().map(|(deadline, _)| *deadline)
    }

    pub fn stats(&self) -> SocketStats {
        SocketStats { listeners: self.listeners.len() as u64, pending: self.pending.len() as u64, ..self.stats.clone() }
    }

    fn add_end(&mut self, key: FlowKey, now: Instant, set_end: impl FnOnce(&mut JoinedFlow)) -> Vec<JoinedFlow> {
        if let Some(mut pending) = self.pending.remove(&key) {
            set_end(&mut pending.flow);
            if pending.flow.client.is_some() && pending.flow.server.is_some() {
                self.stats.joined += 1;
                return vec![pending.flow];
            }
            // The same end twice (a 4-tuple reused within the window): the newer end replaces
            // the older one and the flow waits for its partner again.
            self.pending.insert(key, pending);
            return Vec::new();
        }
        let mut out = Vec::new();
        if self.pending.len() >= self.max_pending {
            // Make room by flushing the oldest end without its partner; it still reaches the engine.
            while let Some((_, oldest)) = self.order.pop_front() {
                if let Some(pending) = self.pending.remove(&oldest) {
                    self.stats.pending_overflow += 1;
                    out.push(pending.flow);
                    break;
                }
            }
        }
        let mut flow = JoinedFlow { client_addr: key.client, server_addr: key.server, client: None, server: None };
        set_end(&mut flow);
        let deadline = now + self.join_window;
        self.pending.insert(key, Pending { deadline, flow });
        self.order.push_back((deadline, key));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(state.on_connected(None, 10, 1, addr("198.18.0.2:40000"), addr("198.18.0.3:5432"), now).is_empty());
        let joined = state.on_accepted(|_| None, 2, addr("198.18.0.3:5432"), addr("198.18.0.2:40000"), now);
        assert_eq!(joined.len(), 1);
        assert_eq!(joined[0].client, Some(PendingEnd { pid: 10, netns: 1, process: None }));
        assert_eq!(joined[0].server, Some(PendingEnd { pid: 20, netns: 2, process: None }));
        assert_eq!(joined[0].server_addr, addr("198.18.0.3:5432"));
        assert!(state.flush_expired(now + Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn accepted_first_still_joins() {
        let mut state = state();
        let now = Instant::now();
        state.on_listen(1, Listener { pid: 20, addr: addr("[::]:443"), netns: 2 });
        assert!(state.on_accepted(|_| None, 2, addr("[fd00::3]:443"), addr("[fd00::2]:5000"), now).is_empty());
        let joined = state.on_connected(None, 10, 1, addr("[fd00::2]:5000"), addr("[fd00::3]:443"), now);
        assert_eq!(joined.len(), 1);
    }

    #[test]
    fn lone_end_flushes_after_window() {
        let mut state = state();
        let now = Instant::now();
        state.on_connected(None, 10, 1, addr("198.18.0.2:40000"), addr("198.18.9.9:443"), now);
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
        state.on_connected(None, 10, 1, addr("127.0.0.1:40000"), addr("127.0.0.1:80"), now);
        assert!(state.on_accepted(|_| None, 2, addr("127.0.0.1:80"), addr("127.0.0.1:40000"), now).is_empty());
        assert_eq!(state.flush_expired(now + Duration::from_secs(1)).len(), 2);
    }

    #[test]
    fn accepted_without_listener_is_counted() {
        let mut state = state();
        state.on_accepted(|_| None, 2, addr("198.18.0.3:22"), addr("198.18.0.2:1"), Instant::now());
        assert_eq!(state.stats().accepted_without_listener, 1);
    }

    #[test]
    fn full_pending_table_flushes_oldest() {
        let mut state = state();
        let now = Instant::now();
        for port in 0..4 {
            state.on_connected(None, 10, 1, addr(&format!("198.18.0.2:{}", 4000 + port)), addr("198.18.9.9:443"), now);
        }
        let out = state.on_connected(None, 10, 1, addr("198.18.0.2:5000"), addr("198.18.9.9:443"), now);
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
        state.on_accepted(|_| None, 2, addr("198.18.0.3:5432"), addr("198.18.0.2:40000"), now);
        let flushed = state.flush_expired(now + Duration::from_secs(1));
        assert_eq!(flushed[0].server, Some(PendingEnd { pid: 20, netns: 2, process: None }));
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
    fn closed_listener_is_forgotten() {
        let mut state = state();
        state.on_listen(9, Listener { pid: 20, addr: addr("0.0.0.0:80"), netns: 2 });
        state.on_close(9);
        assert!(state.listener(2, addr("198.18.0.3:80")).is_none());
    }
}
