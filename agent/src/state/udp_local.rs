//! UDP flows whose two ends run in scope on this host.
//!
//! The kernel reports a UDP flow from each end that takes part in it: the sender's first
//! datagram to a destination, the receiver's first read from a sender, the server's first reply.
//! When both ends run in scope in one network namespace, those records describe one flow. Each
//! end judged alone gives an edge of its own: from the client to the zone of the server's
//! address, and from the zone of the client's address to the server. The sender's record comes
//! first. When its destination is a port that a process in scope bound in the sender's own
//! namespace, on an address that delivers there, [`LocalUdp`] names that process, so that the
//! flow is one edge between the two components, as a TCP connection is. The server's own records
//! of the flow then add nothing.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use driftwatch_model::FastMap;

/// A UDP socket bound to a port its process chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpListener {
    pub pid: u32,
    pub addr: SocketAddr,
}

/// (network namespace, port, IPv6 socket) of UDP listeners.
type ListenerKey = (u32, u16, bool);

/// Listeners kept per [`ListenerKey`]: sockets bound to different addresses of one port, or
/// sharing one with SO_REUSEPORT.
const LISTENERS_PER_PORT: usize = 8;

/// (network namespace, client address, server port) of a joined flow. Any process may read the
/// server's end: a worker that the process that bound the port forked, for one.
type JoinedKey = (u32, SocketAddr, u16);

/// How long the server's read or reply of a joined flow is expected after the client's datagram.
/// Later, the client's port may belong to another process.
pub const JOIN_LIFETIME: Duration = Duration::from_secs(10);

/// Counters for the status call.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalUdpStats {
    /// UDP listeners the table holds.
    pub listeners: u64,
    /// Binds not kept because the table was full: flows to those ports are observed from each
    /// end.
    pub listeners_dropped: u64,
    /// UDP flows from a process in scope to a UDP listener in scope, observed as one edge.
    pub joined: u64,
    /// Reads and replies of a server whose flow the client's datagram already joined.
    pub server_ends_joined: u64,
    /// Datagrams to a port that several running processes bound alike, so that the receiving one
    /// is unknown: observed from each end.
    pub ambiguous: u64,
}

/// The UDP listeners in scope, by network namespace and port, and the flows joined to them.
pub struct LocalUdp {
    listeners: FastMap<ListenerKey, Vec<UdpListener>>,
    max_ports: usize,
    /// Joined flows and when they were joined, oldest first in `joined_order`.
    joined: FastMap<JoinedKey, Instant>,
    joined_order: VecDeque<(JoinedKey, Instant)>,
    max_joined: usize,
    stats: LocalUdpStats,
}

impl LocalUdp {
    /// Creates a table of the listeners of at most `max_ports` ports that remembers the last
    /// `max_joined` joined flows.
    pub fn new(max_ports: usize, max_joined: usize) -> LocalUdp {
        LocalUdp {
            listeners: FastMap::default(),
            max_ports,
            joined: FastMap::default(),
            joined_order: VecDeque::new(),
            max_joined: max_joined.max(1),
            stats: LocalUdpStats::default(),
        }
    }

    /// Records that process `pid` bound `addr` in `netns`.
    // NOTE: the kernel does not report a UDP socket's close. A port stays with the processes that
    // bound it until they exit, and one that closed its socket and still runs makes a later
    // bind of the same address ambiguous.
    pub fn on_bind(&mut self, netns: u32, addr: SocketAddr, pid: u32) {
        let key = (netns, addr.port(), addr.is_ipv6());
        if !self.listeners.contains_key(&key) && self.listeners.len() >= self.max_ports {
            self.stats.listeners_dropped += 1;
            return;
        }
        let listeners = self.listeners.entry(key).or_default();
        let listener = UdpListener { pid, addr };
        if listeners.contains(&listener) {
            return;
        }
        if listeners.len() >= LISTENERS_PER_PORT {
            listeners.remove(0);
            self.stats.listeners_dropped += 1;
        }
        listeners.push(listener);
    }

    /// Returns the listener that a datagram sent to `destination` from `netns` reaches, among
    /// those whose process `runs`. Like the kernel, it prefers a socket bound to the destination
    /// address over one bound to the unspecified address, and an IPv4 socket over an IPv6 one.
    /// `None` when no listener matches, or when sockets of several processes match alike.
    pub fn listener_for(&mut self, netns: u32, destination: SocketAddr, runs: impl Fn(u32) -> bool) -> Option<UdpListener> {
        let ip = destination.ip().to_canonical();
        // An IPv4 destination reaches an IPv4 socket, or an IPv6 socket bound to `[::]`.
        let families: &[bool] = if ip.is_ipv4() { &[false, true] } else { &[true] };
        let mut best: Option<(u8, UdpListener)> = None;
        let mut ambiguous = false;
        for &ipv6 in families {
            let Some(listeners) = self.listeners.get(&(netns, destination.port(), ipv6)) else { continue };
            for &listener in listeners.iter().filter(|listener| runs(listener.pid)) {
                let Some(score) = delivery_score(listener.addr.ip(), ip, ipv6) else { continue };
                match best {
                    Some((best_score, current)) if best_score == score => ambiguous |= current.pid != listener.pid,
                    Some((best_score, _)) if best_score > score => {}
                    _ => {
                        best = Some((score, listener));
                        ambiguous = false;
                    }
                }
            }
        }
        if ambiguous {
            self.stats.ambiguous += 1;
            return None;
        }
        best.map(|(_, listener)| listener)
    }

    /// Records a flow from `client` to the listener on `server` in `netns`, joined at `now`.
    /// Returns false, and records nothing, when the client's port is not known yet: a UDP
    /// `connect()` reports before the kernel picks the port, so the server's records of that flow
    /// cannot be distinguished from another client's.
    pub fn join(&mut self, netns: u32, client: SocketAddr, server: SocketAddr, now: Instant) -> bool {
        if client.port() == 0 {
            return false;
        }
        self.stats.joined += 1;
        let key = (netns, SocketAddr::new(source_address(client.ip(), server.ip()), client.port()), server.port());
        self.expire(now);
        if self.joined.len() >= self.max_joined {
            if let Some((oldest, _)) = self.joined_order.pop_front() {
                self.joined.remove(&oldest);
            }
        }
        self.joined.insert(key, now);
        self.joined_order.push_back((key, now));
        true
    }

    /// Returns true, and counts it, when a server's record about the peer `client` on its port
    /// `server_port` belongs to a flow a client's datagram joined less than [`JOIN_LIFETIME`]
    /// before `now`.
    pub fn server_end_joined(&mut self, netns: u32, client: SocketAddr, server_port: u16, now: Instant) -> bool {
        self.expire(now);
        let client = SocketAddr::new(client.ip().to_canonical(), client.port());
        let joined = self.joined.contains_key(&(netns, client, server_port));
        if joined {
            self.stats.server_ends_joined += 1;
        }
        joined
    }

    /// Forgets the joins older than [`JOIN_LIFETIME`].
    fn expire(&mut self, now: Instant) {
        while let Some(&(key, joined_at)) = self.joined_order.front() {
            if now.saturating_duration_since(joined_at) < JOIN_LIFETIME {
                break;
            }
            self.joined_order.pop_front();
            // A key joined again later keeps its newer entry.
            if self.joined.get(&key) == Some(&joined_at) {
                self.joined.remove(&key);
            }
        }
    }

    pub fn stats(&self) -> LocalUdpStats {
        let listeners = self.listeners.values().map(Vec::len).sum::<usize>() as u64;
        LocalUdpStats { listeners, ..self.stats }
    }
}

/// Returns how closely a socket bound to `bound` (an IPv6 socket when `ipv6`) matches datagrams
/// sent to `destination` in its own network namespace, higher for a closer match, or `None` when
/// it does not receive them. It receives its own address, and any loopback address when it is
/// bound to the unspecified address. Another address of the namespace cannot be distinguished
/// from a remote one here, so only a socket bound to it exactly counts.
// NOTE: an IPv6 socket on `[::]` with IPV6_V6ONLY receives no IPv4 datagram, but the bind record
// does not tell it from a dual-stack one.
fn delivery_score(bound: IpAddr, destination: IpAddr, ipv6: bool) -> Option<u8> {
    let bound = bound.to_canonical();
    // A datagram to the unspecified address goes to this host, as one to loopback does.
    let destination = if destination.is_unspecified() { loopback_of(destination) } else { destination };
    let family = if destination.is_ipv4() && !ipv6 { 1 } else { 0 };
    if bound == destination {
        Some(4 + family)
    } else if bound.is_unspecified() && destination.is_loopback() {
        Some(2 + family)
    } else {
        None
    }
}

/// Returns the loopback address of the family of `ip`.
fn loopback_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

/// Returns the address a datagram from a socket bound to `client` to `server` leaves from. A
/// socket on the unspecified address sends to a local address from the address the local route
/// gives: the loopback route's 127.0.0.1 or ::1 to a loopback destination, the destination
/// itself to another address of the namespace.
// NOTE: a loopback route with another preferred source gives another address; the flow is then
// observed from each end.
fn source_address(client: IpAddr, server: IpAddr) -> IpAddr {
    let client = client.to_canonical();
    if !client.is_unspecified() {
        return client;
    }
    let server = server.to_canonical();
    if server.is_loopback() || server.is_unspecified() {
        loopback_of(server)
    } else {
        server
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn runs(_: u32) -> bool {
        true
    }

    fn pid_for(local: &mut LocalUdp, destination: &str) -> Option<u32> {
        local.listener_for(1, addr(destination), runs).map(|listener| listener.pid)
    }

    #[test]
    fn loopback_reaches_wildcard_listener() {
        let mut local = LocalUdp::new(8, 8);
        local.on_bind(1, addr("0.0.0.0:7010"), 40);
        let found = local.listener_for(1, addr("127.0.0.1:7010"), runs);
        assert_eq!(found, Some(UdpListener { pid: 40, addr: addr("0.0.0.0:7010") }));
        assert_eq!(pid_for(&mut local, "127.0.0.2:7010"), Some(40));
        assert_eq!(local.listener_for(2, addr("127.0.0.1:7010"), runs), None, "another namespace");
        assert_eq!(pid_for(&mut local, "127.0.0.1:7011"), None, "another port");
        // Another host's address could be routed anywhere.
        assert_eq!(pid_for(&mut local, "198.18.2.10:7010"), None);
        // An IPv4 socket does not read IPv6 datagrams.
        assert_eq!(pid_for(&mut local, "[::1]:7010"), None);
    }

    #[test]
    fn bound_address_must_match() {
        let mut local = LocalUdp::new(8, 8);
        local.on_bind(1, addr("198.18.2.10:514"), 41);
        local.on_bind(1, addr("[::1]:515"), 42);
        assert_eq!(pid_for(&mut local, "198.18.2.10:514"), Some(41));
        assert_eq!(pid_for(&mut local, "127.0.0.1:514"), None, "bound to another address");
        assert_eq!(pid_for(&mut local, "[::1]:515"), Some(42));
        assert_eq!(pid_for(&mut local, "127.0.0.1:515"), None);
    }

    #[test]
    fn dual_stack_listener_reads_ipv4() {
        let mut local = LocalUdp::new(8, 8);
        local.on_bind(1, addr("[::]:53"), 43);
        assert_eq!(pid_for(&mut local, "127.0.0.1:53"), Some(43));
        assert_eq!(pid_for(&mut local, "[::1]:53"), Some(43));
        // Both families bound: the IPv4 socket takes IPv4 datagrams.
        local.on_bind(1, addr("0.0.0.0:53"), 44);
        assert_eq!(pid_for(&mut local, "127.0.0.1:53"), Some(44));
        assert_eq!(pid_for(&mut local, "[::1]:53"), Some(43));
    }

    #[test]
    fn exact_address_beats_wildcard() {
        let mut local = LocalUdp::new(8, 8);
        local.on_bind(1, addr("127.0.0.7:7029"), 45);
        local.on_bind(1, addr("0.0.0.0:7029"), 46);
        assert_eq!(pid_for(&mut local, "127.0.0.7:7029"), Some(45));
        assert_eq!(pid_for(&mut local, "127.0.0.1:7029"), Some(46));
    }

    #[test]
    fn shared_port_is_ambiguous() {
        let mut local = LocalUdp::new(8, 8);
        local.on_bind(1, addr("0.0.0.0:7028"), 47);
        local.on_bind(1, addr("0.0.0.0:7028"), 48);
        assert_eq!(pid_for(&mut local, "127.0.0.1:7028"), None, "SO_REUSEPORT between two processes");
        assert_eq!(local.stats().ambiguous, 1);
        // Once one of them has exited, the other one is the listener.
        let found = local.listener_for(1, addr("127.0.0.1:7028"), |pid| pid == 48);
        assert_eq!(found.map(|listener| listener.pid), Some(48));
    }

    #[test]
    fn full_tables_count_drops() {
        let mut local = LocalUdp::new(1, 8);
        local.on_bind(1, addr("0.0.0.0:7010"), 40);
        local.on_bind(1, addr("0.0.0.0:7011"), 46);
        assert_eq!(pid_for(&mut local, "127.0.0.1:7011"), None);
        for pid in 50..50 + LISTENERS_PER_PORT as u32 {
            local.on_bind(1, addr("0.0.0.0:7010"), pid);
        }
        let stats = local.stats();
        assert_eq!(stats.listeners, LISTENERS_PER_PORT as u64);
        assert_eq!(stats.listeners_dropped, 2);
    }

    #[test]
    fn unspecified_destination_is_local() {
        let mut local = LocalUdp::new(8, 8);
        local.on_bind(1, addr("127.0.0.1:7252"), 40);
        assert_eq!(pid_for(&mut local, "0.0.0.0:7252"), Some(40));
    }

    #[test]
    fn server_ends_of_a_joined_flow() {
        let now = Instant::now();
        let mut local = LocalUdp::new(8, 8);
        assert!(local.join(1, addr("0.0.0.0:45000"), addr("127.0.0.1:7010"), now));
        assert!(local.server_end_joined(1, addr("127.0.0.1:45000"), 7010, now));
        assert!(!local.server_end_joined(1, addr("127.0.0.1:45001"), 7010, now), "another client port");
        assert!(!local.server_end_joined(1, addr("127.0.0.2:45000"), 7010, now), "another loopback address");
        assert!(!local.server_end_joined(2, addr("127.0.0.1:45000"), 7010, now), "another namespace");
        assert!(!local.server_end_joined(1, addr("10.250.0.1:45000"), 7010, now), "another host");
        let stats = local.stats();
        assert_eq!((stats.joined, stats.server_ends_joined), (1, 1));
    }

    #[test]
    fn join_expires() {
        let now = Instant::now();
        let mut local = LocalUdp::new(8, 8);
        local.join(1, addr("[::]:45000"), addr("[::1]:7010"), now);
        assert!(local.server_end_joined(1, addr("[::1]:45000"), 7010, now + JOIN_LIFETIME / 2));
        // The client's port may belong to another process by now.
        assert!(!local.server_end_joined(1, addr("[::1]:45000"), 7010, now + JOIN_LIFETIME));
    }

    #[test]
    fn client_source_address() {
        let now = Instant::now();
        let mut local = LocalUdp::new(8, 8);
        local.join(1, addr("198.18.2.10:45000"), addr("198.18.2.10:7010"), now);
        local.join(1, addr("0.0.0.0:45001"), addr("198.18.2.10:7010"), now);
        local.join(1, addr("0.0.0.0:45002"), addr("127.0.0.5:7010"), now);
        assert!(local.server_end_joined(1, addr("198.18.2.10:45000"), 7010, now));
        assert!(local.server_end_joined(1, addr("198.18.2.10:45001"), 7010, now));
        assert!(local.server_end_joined(1, addr("127.0.0.1:45002"), 7010, now));
    }

    #[test]
    fn unbound_client_joins_nothing() {
        let now = Instant::now();
        let mut local = LocalUdp::new(8, 8);
        // A UDP connect reported before the kernel picked the client's port.
        assert!(!local.join(1, addr("0.0.0.0:0"), addr("127.0.0.1:7010"), now));
        assert!(!local.server_end_joined(1, addr("127.0.0.1:45000"), 7010, now));
        assert_eq!(local.stats().joined, 0);
    }

    #[test]
    fn full_join_table_forgets_oldest() {
        let now = Instant::now();
        let mut local = LocalUdp::new(8, 2);
        for port in [45000, 45001, 45002] {
            local.join(1, addr(&format!("127.0.0.1:{port}")), addr("127.0.0.1:7010"), now);
        }
        assert!(!local.server_end_joined(1, addr("127.0.0.1:45000"), 7010, now));
        assert!(local.server_end_joined(1, addr("127.0.0.1:45002"), 7010, now));
    }
}
