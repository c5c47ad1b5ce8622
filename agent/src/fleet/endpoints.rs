//! The endpoints a collector needs to merge this host's graph with the fleet's: the remote IP
//! behind each graph edge that leaves the host, and the listening sockets with their graph nodes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use driftwatch_model::fleet::{NodeListener, PeerFlow, PeerRole};
use driftwatch_model::observation::Protocol;

/// Bounds of an [`EndpointTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointLimits {
    /// Distinct (edge, remote IP) pairs kept; the one seen least recently is evicted at the bound.
    pub max_peers: usize,
    /// Listening sockets kept; new ones are dropped and counted at the bound.
    pub max_listeners: usize,
}

impl Default for EndpointLimits {
    fn default() -> Self {
        EndpointLimits {
            max_peers: 4096,
            max_listeners: 4096,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PeerKey {
    source: String,
    destination: String,
    protocol: Protocol,
    port: u16,
    role: PeerRole,
    remote_ip: IpAddr,
}

#[derive(Debug, Clone, Copy)]
struct PeerCounts {
    connections: u64,
    first_seen: SystemTime,
    last_seen: SystemTime,
}

/// Counters of an [`EndpointTable`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointStats {
    pub peers: u64,
    pub peers_evicted: u64,
    pub listeners: u64,
    pub listeners_dropped: u64,
}

/// Remote ends of edges and local listeners, bounded; see the module documentation.
#[derive(Debug, Default)]
pub struct EndpointTable {
    limits: EndpointLimits,
    peers: HashMap<PeerKey, PeerCounts>,
    /// Listening sockets by kernel socket address.
    listeners: HashMap<u64, NodeListener>,
    peers_evicted: u64,
    listeners_dropped: u64,
}

/// One connection with one end on this host, as the pipeline hands it over.
pub struct PeerConnection<'a> {
    /// Graph node of the client.
    pub source: &'a str,
    /// Graph node of the server.
    pub destination: &'a str,
    pub protocol: Protocol,
    pub port: u16,
    pub role: PeerRole,
    pub remote_ip: IpAddr,
    pub time: SystemTime,
    /// Number of connections this record counts: more than 1 for connections the kernel folded.
    pub connections: u64,
}

impl EndpointTable {
    pub fn new(limits: EndpointLimits) -> EndpointTable {
        EndpointTable {
            limits: EndpointLimits {
                max_peers: limits.max_peers.max(1),
                max_listeners: limits.max_listeners.max(1),
            },
            ..EndpointTable::default()
        }
    }

    /// Counts the connections of an edge with its remote IP.
    pub fn record_peer(&mut self, connection: PeerConnection<'_>) {
        let key = PeerKey {
            source: connection.source.to_owned(),
            destination: connection.destination.to_owned(),
            protocol: connection.protocol,
            port: connection.port,
            role: connection.role,
            remote_ip: connection.remote_ip.to_canonical(),
        };
        if let Some(counts) = self.peers.get_mut(&key) {
            counts.connections += connection.connections;
            counts.last_seen = counts.last_seen.max(connection.time);
            return;
        }
        if self.peers.len() >= self.limits.max_peers {
            // NOTE: a linear scan, so a flood of distinct remote IPs at the bound costs
            // max_peers steps per new pair. An index ordered by last_seen would remove that cost.
            let oldest = self
                .peers
                .iter()
                .min_by_key(|(_, counts)| counts.last_seen)
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                self.peers.remove(&oldest);
                self.peers_evicted += 1;
            }
        }
        self.peers.insert(
            key,
            PeerCounts {
                connections: connection.connections,
                first_seen: connection.time,
                last_seen: connection.time,
            },
        );
    }

    /// Records a listening socket owned by graph node `node`.
    pub fn on_listen(&mut self, sock: u64, node: String, addr: SocketAddr, protocol: Protocol) {
        if !self.listeners.contains_key(&sock) && self.listeners.len() >= self.limits.max_listeners {
            self.listeners_dropped += 1;
            return;
        }
        self.listeners.insert(
            sock,
            NodeListener {
                node,
                addr,
                protocol,
            },
        );
    }

    /// Forgets a socket; sockets that never listened are ignored.
    pub fn on_close(&mut self, sock: u64) {
        self.listeners.remove(&sock);
    }

    /// Returns the peer flows, sorted for a stable snapshot.
    pub fn peers(&self) -> Vec<PeerFlow> {
        let mut peers: Vec<PeerFlow> = self
            .peers
            .iter()
            .map(|(key, counts)| PeerFlow {
                source: key.source.clone(),
                destination: key.destination.clone(),
                protocol: key.protocol,
                port: key.port,
                role: key.role,
                remote_ip: key.remote_ip,
                connections: counts.connections,
                first_seen: counts.first_seen,
                last_seen: counts.last_seen,
            })
            .collect();
        peers.sort_by(|a, b| {
            (&a.source, &a.destination, a.port, a.remote_ip).cmp(&(&b.source, &b.destination, b.port, b.remote_ip))
        });
        peers
    }

    /// Returns the listeners, sorted by address.
    pub fn listeners(&self) -> Vec<NodeListener> {
        let mut listeners: Vec<NodeListener> = self.listeners.values().cloned().collect();
        listeners.sort_by(|a, b| (a.addr, &a.node).cmp(&(b.addr, &b.node)));
        listeners.dedup();
        listeners
    }

    pub fn stats(&self) -> EndpointStats {
        EndpointStats {
            peers: self.peers.len() as u64,
            peers_evicted: self.peers_evicted,
            listeners: self.listeners.len() as u64,
            listeners_dropped: self.listeners_dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn connection(remote: &str, seconds: u64) -> PeerConnection<'static> {
        PeerConnection {
            source: "web",
            destination: "internet",
            protocol: Protocol::Tcp,
            port: 5432,
            role: PeerRole::Client,
            remote_ip: remote.parse().unwrap(),
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(seconds),
            connections: 1,
        }
    }

    #[test]
    fn repeated_connections_are_counted_on_one_peer() {
        let mut table = EndpointTable::new(EndpointLimits::default());
        table.record_peer(connection("198.18.4.10", 5));
        table.record_peer(connection("::ffff:198.18.4.10", 9));
        let peers = table.peers();
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].connections, 2);
        // Connections the kernel counted arrive as one record.
        table.record_peer(PeerConnection { connections: 40, ..connection("198.18.4.10", 12) });
        assert_eq!(table.peers()[0].connections, 42);
        assert_eq!(peers[0].last_seen, SystemTime::UNIX_EPOCH + Duration::from_secs(9));
    }

    #[test]
    fn least_recent_peer_is_evicted_at_the_bound() {
        let mut table = EndpointTable::new(EndpointLimits {
            max_peers: 2,
            max_listeners: 1,
        });
        table.record_peer(connection("198.18.4.1", 1));
        table.record_peer(connection("198.18.4.2", 2));
        table.record_peer(connection("198.18.4.3", 3));
        let ips: Vec<String> = table.peers().iter().map(|p| p.remote_ip.to_string()).collect();
        assert_eq!(ips, vec!["198.18.4.2", "198.18.4.3"]);
        assert_eq!(table.stats().peers_evicted, 1);
    }

    #[test]
    fn listeners_beyond_the_bound_are_dropped_and_counted() {
        let mut table = EndpointTable::new(EndpointLimits {
            max_peers: 1,
            max_listeners: 1,
        });
        table.on_listen(1, "db".into(), "0.0.0.0:5432".parse().unwrap(), Protocol::Tcp);
        table.on_listen(2, "db".into(), "0.0.0.0:5433".parse().unwrap(), Protocol::Tcp);
        assert_eq!(table.listeners().len(), 1);
        assert_eq!(table.stats().listeners_dropped, 1);
        table.on_close(1);
        assert!(table.listeners().is_empty());
    }
}
