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

use std::net::{IpAddr, SocketAddr};

use driftwatch_model::FastMap;

use super::udp_reply::RecentSet;

/// A UDP socket bound to a port its process chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpListener {
    pub pid: u32,
    pub addr: SocketAddr,
}

/// (network namespace, port, IPv6 socket) of a UDP listener.
type ListenerKey = (u32, u16, bool);

/// (network namespace, server pid, client port, server port) of a joined flow. Client port 0
/// stands for a client whose socket was not bound yet when the kernel reported it (a UDP
/// `connect()` reports before the kernel picks the port).
type JoinedKey = (u32, u32, u16, u16);

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
}

/// The UDP listeners in scope, by network namespace and port, and the flows joined to them.
pub struct LocalUdp {
    listeners: FastMap<ListenerKey, UdpListener>,
    max_listeners: usize,
    joined: RecentSet<JoinedKey>,
    stats: LocalUdpStats,
}

impl LocalUdp {
    /// Creates a table of at most `max_listeners` listeners that remembers the last `max_joined`
    /// joined flows.
    pub fn new(max_listeners: usize, max_joined: usize) -> LocalUdp {
        LocalUdp {
            listeners: FastMap::default(),
            max_listeners,
            joined: RecentSet::new(max_joined),
            stats: LocalUdpStats::default(),
        }
    }

    /// Records that process `pid` bound `addr` in `netns`. A later bind of the same port and
    /// family replaces the earlier one.
    // NOTE: the kernel does not report a UDP socket's close, so a port stays with the last process
    // that bound it. Of several SO_REUSEPORT sockets on one port, the last bound is named.
    pub fn on_bind(&mut self, netns: u32, addr: SocketAddr, pid: u32) {
        let key = (netns, addr.port(), addr.is_ipv6());
        if !self.listeners.contains_key(&key) && self.listeners.len() >= self.max_listeners {
            self.stats.listeners_dropped += 1;
            return;
        }
        self.listeners.insert(key, UdpListener { pid, addr });
    }

    /// Returns the listener that a datagram sent to `destination` from `netns` reaches, when the
    /// table contains one that the address delivers to.
    pub fn listener_for(&self, netns: u32, destination: SocketAddr) -> Option<UdpListener> {
        let ip = destination.ip().to_canonical();
        // An IPv4 destination reaches an IPv4 socket, or an IPv6 socket bound to `[::]`.
        let families: &[bool] = if ip.is_ipv4() { &[false, true] } else { &[true] };
        families
            .iter()
            .filter_map(|&ipv6| self.listeners.get(&(netns, destination.port(), ipv6)))
            .find(|listener| delivers(listener.addr.ip(), ip))
            .copied()
    }

    /// Records a flow from `client_port` to the listener of `server_pid` on `server_port`.
    pub fn join(&mut self, netns: u32, server_pid: u32, client_port: u16, server_port: u16) {
        self.stats.joined += 1;
        self.joined.insert((netns, server_pid, client_port, server_port));
    }

    /// Returns true, and counts it, when a record of `server_pid` about the peer `client` on its
    /// port `server_port` belongs to a flow the client's datagram joined. A flow joined before its
    /// client's port was known matches every client on a loopback address.
    pub fn server_end_joined(&mut self, netns: u32, server_pid: u32, client: SocketAddr, server_port: u16) -> bool {
        let exact = self.joined.contains(&(netns, server_pid, client.port(), server_port));
        let unbound = client.ip().to_canonical().is_loopback() && self.joined.contains(&(netns, server_pid, 0, server_port));
        if exact || unbound {
            self.stats.server_ends_joined += 1;
        }
        exact || unbound
    }

    pub fn stats(&self) -> LocalUdpStats {
        LocalUdpStats { listeners: self.listeners.len() as u64, ..self.stats }
    }
}

/// Returns true when a socket bound to `bound` receives datagrams sent to `destination` in its own
/// network namespace: its own address, or any loopback address when it is bound to the
/// unspecified address. Another address of the namespace cannot be distinguished from a remote
/// one here, so only a socket bound to it exactly counts.
fn delivers(bound: IpAddr, destination: IpAddr) -> bool {
    let bound = bound.to_canonical();
    bound == destination || (bound.is_unspecified() && destination.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn loopback_reaches_wildcard_listener() {
        let mut local = LocalUdp::new(8, 8);
        local.on_bind(1, addr("0.0.0.0:7010"), 40);
        assert_eq!(local.listener_for(1, addr("127.0.0.1:7010")), Some(UdpListener { pid: 40, addr: addr("0.0.0.0:7010") }));
        assert_eq!(local.listener_for(1, addr("127.0.0.2:7010")).map(|listener| listener.pid), Some(40));
        assert_eq!(local.listener_for(2, addr("127.0.0.1:7010")), None, "another namespace");
        assert_eq!(local.listener_for(1, addr("127.0.0.1:7011")), None, "another port");
        // Another host's address could be routed anywhere.
        assert_eq!(local.listener_for(1, addr("198.18.2.10:7010")), None);
        // An IPv4 socket does not read IPv6 datagrams.
        assert_eq!(local.listener_for(1, addr("[::1]:7010")), None);
    }

    #[test]
    fn bound_address_must_match() {
        let mut local = LocalUdp::new(8, 8);
        local.on_bind(1, addr("198.18.2.10:514"), 41);
        local.on_bind(1, addr("[::1]:515"), 42);
        assert_eq!(local.listener_for(1, addr("198.18.2.10:514")).map(|listener| listener.pid), Some(41));
        assert_eq!(local.listener_for(1, addr("127.0.0.1:514")), None, "bound to another address");
        assert_eq!(local.listener_for(1, addr("[::1]:515")).map(|listener| listener.pid), Some(42));
        assert_eq!(local.listener_for(1, addr("127.0.0.1:515")), None);
    }

    #[test]
    fn dual_stack_listener_reads_ipv4() {
        let mut local = LocalUdp::new(8, 8);
        local.on_bind(1, addr("[::]:53"), 43);
        assert_eq!(local.listener_for(1, addr("127.0.0.1:53")).map(|listener| listener.pid), Some(43));
        assert_eq!(local.listener_for(1, addr("[::1]:53")).map(|listener| listener.pid), Some(43));
        // Both families bound: the IPv4 socket takes IPv4 datagrams.
        local.on_bind(1, addr("0.0.0.0:53"), 44);
        assert_eq!(local.listener_for(1, addr("127.0.0.1:53")).map(|listener| listener.pid), Some(44));
        assert_eq!(local.listener_for(1, addr("[::1]:53")).map(|listener| listener.pid), Some(43));
    }

    #[test]
    fn last_bind_wins_and_full_table_counts() {
        let mut local = LocalUdp::new(1, 8);
        local.on_bind(1, addr("0.0.0.0:7010"), 40);
        local.on_bind(1, addr("0.0.0.0:7010"), 45);
        assert_eq!(local.listener_for(1, addr("127.0.0.1:7010")).map(|listener| listener.pid), Some(45));
        local.on_bind(1, addr("0.0.0.0:7011"), 46);
        assert_eq!(local.listener_for(1, addr("127.0.0.1:7011")), None);
        let stats = local.stats();
        assert_eq!((stats.listeners, stats.listeners_dropped), (1, 1));
    }

    #[test]
    fn server_ends_of_a_joined_flow() {
        let mut local = LocalUdp::new(8, 8);
        local.join(1, 40, 45000, 7010);
        assert!(local.server_end_joined(1, 40, addr("127.0.0.1:45000"), 7010));
        assert!(!local.server_end_joined(1, 40, addr("127.0.0.1:45001"), 7010), "another client port");
        assert!(!local.server_end_joined(1, 41, addr("127.0.0.1:45000"), 7010), "another server");
        assert!(!local.server_end_joined(2, 40, addr("127.0.0.1:45000"), 7010), "another namespace");
        let stats = local.stats();
        assert_eq!((stats.joined, stats.server_ends_joined), (1, 1));
    }

    #[test]
    fn unbound_client_matches_loopback_peers_only() {
        let mut local = LocalUdp::new(8, 8);
        local.join(1, 40, 0, 7010);
        assert!(local.server_end_joined(1, 40, addr("127.0.0.1:45000"), 7010));
        assert!(local.server_end_joined(1, 40, addr("[::1]:45001"), 7010));
        // A client on another host is a flow of its own.
        assert!(!local.server_end_joined(1, 40, addr("198.18.1.10:45000"), 7010));
    }
}
