//! Merging the observed graphs of several hosts into one graph of the fleet.
//!
//! Each host's agent observes only its own end of a connection to another host. The client's agent
//! records an edge to the server's address (resolved to a zone or `external:<ip>`), and the
//! server's agent records an edge from the client's address. With each graph a host reports its listeners, its
//! addresses and, for every edge with a remote end, the remote IP ([`PeerFlow`]). The merge
//! resolves a client's remote end through the listener that serves it on another host, so the
//! connection becomes one edge between the two graph nodes, and drops the server's half of a
//! connection that the client's host already reported.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use crate::graph::{EdgeKey, EdgeSnapshot, GraphSnapshot, NodeKind, NodeSnapshot, MAX_EXAMPLES};
use crate::observation::Protocol;

/// End of a flow that is on the reporting host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerRole {
    /// The host's process connected; the remote address is the server's.
    Client,
    /// The host's process accepted; the remote address is the client's.
    Server,
}

/// The connections of one graph edge from or to one remote IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerFlow {
    /// Edge source, as in [`EdgeSnapshot::source`].
    pub source: String,
    /// Edge destination, as in [`EdgeSnapshot::destination`].
    pub destination: String,
    pub protocol: Protocol,
    /// Server port.
    pub port: u16,
    pub role: PeerRole,
    pub remote_ip: IpAddr,
    pub connections: u64,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
}

/// A listening socket and the graph node of the process that owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeListener {
    pub node: String,
    /// Bound address; an unspecified IP serves every address of the host.
    pub addr: SocketAddr,
    pub protocol: Protocol,
}

/// Report of one host for the merge.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostGraph {
    /// Host (agent node) name.
    pub host: String,
    pub graph: GraphSnapshot,
    pub peers: Vec<PeerFlow>,
    pub listeners: Vec<NodeListener>,
    /// The host's own addresses.
    pub addresses: Vec<IpAddr>,
}

/// Counts of what a merge resolved, for the collector's status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeStats {
    /// Client-side peer flows resolved to a listener on a host of the fleet.
    pub resolved: u64,
    /// Server-side peer flows dropped because the client's host reported the same connections.
    pub deduplicated: u64,
}

/// Merges the hosts' graphs; see the module documentation.
///
/// Nodes with the same id on several hosts become one node: a component is fleet-wide. External
/// nodes that no merged edge uses any more are left out. `declared` judges an edge whose
/// destination the merge rewrote, because neither host's agent could judge it; pass
/// `|_| false` when no model is at hand.
pub fn merge(hosts: &[HostGraph], declared: impl Fn(&EdgeKey) -> bool) -> (GraphSnapshot, MergeStats) {
    let listeners = listener_index(hosts);
    let mut stats = MergeStats::default();

    // Connections a client's host resolved, by (client host IP, server host, server node, port),
    // so the server's host can drop its half of them.
    let mut resolved_pairs: HashSet<(usize, usize, String, Protocol, u16)> = HashSet::new();
    let mut host_edges: Vec<BTreeMap<EdgeKey, EdgeSnapshot>> = hosts
        .iter()
        .map(|host| {
            host.graph
                .edges
                .iter()
                .map(|edge| (edge_key(edge), edge.clone()))
                .collect()
        })
        .collect();
    let mut rewritten: Vec<EdgeSnapshot> = Vec::new();

    for (host_index, host) in hosts.iter().enumerate() {
        for peer in host.peers.iter().filter(|peer| peer.role == PeerRole::Client) {
            let key = (canonical(peer.remote_ip), peer.port, peer.protocol);
            let Some((server_host, server_node)) = listeners.get(&key) else {
                continue;
            };
            let original = EdgeKey {
                source: peer.source.clone(),
                destination: peer.destination.clone(),
                protocol: peer.protocol,
                port: peer.port,
            };
            let (examples, remote_names) = host_edges[host_index]
                .get(&original)
                .map(|edge| (edge.examples.clone(), edge.remote_names.clone()))
                .unwrap_or_default();
            subtract(&mut host_edges[host_index], &original, peer.connections);
            let key = EdgeKey {
                source: peer.source.clone(),
                destination: server_node.clone(),
                protocol: peer.protocol,
                port: peer.port,
            };
            rewritten.push(EdgeSnapshot {
                declared: declared(&key),
                source: key.source,
                destination: key.destination,
                protocol: key.protocol,
                port: key.port,
                first_seen: peer.first_seen,
                last_seen: peer.last_seen,
                connections: peer.connections,
                examples,
                remote_names,
            });
            stats.resolved += 1;
            resolved_pairs.insert((host_index, *server_host, server_node.clone(), peer.protocol, peer.port));
        }
    }

    let address_hosts = address_index(hosts);
    for (host_index, host) in hosts.iter().enumerate() {
        for peer in host.peers.iter().filter(|peer| peer.role == PeerRole::Server) {
            let Some(&client_host) = address_hosts.get(&canonical(peer.remote_ip)) else {
                continue;
            };
            let pair = (client_host, host_index, peer.destination.clone(), peer.protocol, peer.port);
            if !resolved_pairs.contains(&pair) {
                continue;
            }
            let original = EdgeKey {
                source: peer.source.clone(),
                destination: peer.destination.clone(),
                protocol: peer.protocol,
                port: peer.port,
            };
            subtract(&mut host_edges[host_index], &original, peer.connections);
            stats.deduplicated += 1;
        }
    }

    let mut edges: BTreeMap<EdgeKey, EdgeSnapshot> = BTreeMap::new();
    let all = host_edges.into_iter().flat_map(BTreeMap::into_values).chain(rewritten);
    for edge in all {
        match edges.entry(edge_key(&edge)) {
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(edge);
            }
            std::collections::btree_map::Entry::Occupied(mut slot) => add_into(slot.get_mut(), edge),
        }
    }

    let mut nodes: BTreeMap<String, NodeSnapshot> = BTreeMap::new();
    for node in hosts.iter().flat_map(|host| host.graph.nodes.iter()) {
        nodes.entry(node.id.clone()).or_insert_with(|| node.clone());
    }
    let used: HashSet<&str> = edges
        .values()
        .flat_map(|edge| [edge.source.as_str(), edge.destination.as_str()])
        .collect();
    nodes.retain(|id, node| node.kind != NodeKind::External || used.contains(id.as_str()));

    let graph = GraphSnapshot {
        nodes: nodes.into_values().collect(),
        edges: edges.into_values().collect(),
    };
    (graph, stats)
}

fn edge_key(edge: &EdgeSnapshot) -> EdgeKey {
    EdgeKey {
        source: edge.source.clone(),
        destination: edge.destination.clone(),
        protocol: edge.protocol,
        port: edge.port,
    }
}

/// Removes `connections` from an edge, and the edge once none is left.
fn subtract(edges: &mut BTreeMap<EdgeKey, EdgeSnapshot>, key: &EdgeKey, connections: u64) {
    let Some(edge) = edges.get_mut(key) else {
        return;
    };
    edge.connections = edge.connections.saturating_sub(connections);
    if edge.connections == 0 {
        edges.remove(key);
    }
}

fn add_into(edge: &mut EdgeSnapshot, other: EdgeSnapshot) {
    edge.connections += other.connections;
    edge.declared |= other.declared;
    edge.first_seen = edge.first_seen.min(other.first_seen);
    edge.last_seen = edge.last_seen.max(other.last_seen);
    for example in other.examples {
        if edge.examples.len() < MAX_EXAMPLES && !edge.examples.contains(&example) {
            edge.examples.push(example);
        }
    }
}

/// Maps (IP, port, protocol) to the host and graph node that listen there. A listener on an
/// unspecified address serves each of its host's addresses.
fn listener_index(hosts: &[HostGraph]) -> HashMap<(IpAddr, u16, Protocol), (usize, String)> {
    let mut index = HashMap::new();
    for (host_index, host) in hosts.iter().enumerate() {
        for listener in &host.listeners {
            let ip = canonical(listener.addr.ip());
            let ips: Vec<IpAddr> = if ip.is_unspecified() {
                host.addresses.iter().copied().map(canonical).collect()
            } else {
                vec![ip]
            };
            for ip in ips {
                // Loopback addresses exist on every host, so they identify no listener in the fleet.
                if ip.is_loopback() {
                    continue;
                }
                index.insert(
                    (ip, listener.addr.port(), listener.protocol),
                    (host_index, listener.node.clone()),
                );
            }
        }
    }
    index
}

fn address_index(hosts: &[HostGraph]) -> HashMap<IpAddr, usize> {
    let mut index = HashMap::new();
    for (host_index, host) in hosts.iter().enumerate() {
        for ip in host.addresses.iter().copied().map(canonical) {
            if !ip.is_loopback() {
                index.insert(ip, host_index);
            }
        }
    }
    index
}

fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
    }

    fn node(id: &str, kind: NodeKind) -> NodeSnapshot {
        NodeSnapshot {
            id: id.into(),
            kind,
            zone: None,
            processes: Vec::new(),
        }
    }

    fn edge(source: &str, destination: &str, port: u16, connections: u64) -> EdgeSnapshot {
        EdgeSnapshot {
            source: source.into(),
            destination: destination.into(),
            protocol: Protocol::Tcp,
            port,
            declared: false,
            first_seen: at(1),
            last_seen: at(2),
            connections,
            examples: vec![(7, format!("/bin/{source}"))],
            remote_names: vec![],
        }
    }

    fn peer(source: &str, destination: &str, role: PeerRole, remote: &str, connections: u64) -> PeerFlow {
        PeerFlow {
            source: source.into(),
            destination: destination.into(),
            protocol: Protocol::Tcp,
            port: 5432,
            role,
            remote_ip: remote.parse().unwrap(),
            connections,
            first_seen: at(1),
            last_seen: at(2),
        }
    }

    /// Host a runs web, which connected three times to db on host b.
    fn web_and_db() -> Vec<HostGraph> {
        let web = HostGraph {
            host: "a".into(),
            graph: GraphSnapshot {
                nodes: vec![node("web", NodeKind::Declared), node("internet", NodeKind::External)],
                edges: vec![edge("web", "internet", 5432, 3)],
            },
            peers: vec![peer("web", "internet", PeerRole::Client, "198.18.4.10", 3)],
            listeners: Vec::new(),
            addresses: vec!["198.18.2.10".parse().unwrap()],
        };
        let db = HostGraph {
            host: "b".into(),
            graph: GraphSnapshot {
                nodes: vec![node("db", NodeKind::Declared), node("internet", NodeKind::External)],
                edges: vec![edge("internet", "db", 5432, 3)],
            },
            peers: vec![peer("internet", "db", PeerRole::Server, "198.18.2.10", 3)],
            listeners: vec![NodeListener {
                node: "db".into(),
                addr: "0.0.0.0:5432".parse().unwrap(),
                protocol: Protocol::Tcp,
            }],
            addresses: vec!["198.18.4.10".parse().unwrap()],
        };
        vec![web, db]
    }

    #[test]
    fn cross_host_connection_becomes_one_edge() {
        let (graph, stats) = merge(&web_and_db(), |_| true);
        assert_eq!(graph.edges.len(), 1, "{:#?}", graph.edges);
        let edge = &graph.edges[0];
        assert_eq!((edge.source.as_str(), edge.destination.as_str()), ("web", "db"));
        assert_eq!(edge.connections, 3);
        assert!(edge.declared);
        assert_eq!(edge.examples, vec![(7, "/bin/web".to_string())]);
        assert_eq!(stats, MergeStats { resolved: 1, deduplicated: 1 });
        let ids: Vec<&str> = graph.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, vec!["db", "web"], "the unused external node is left out");
    }

    #[test]
    fn other_remote_connections_keep_their_edge() {
        let mut hosts = web_and_db();
        hosts[0].graph.edges[0].connections = 5;
        hosts[0].peers.push(peer("web", "internet", PeerRole::Client, "203.0.113.9", 2));
        let (graph, _) = merge(&hosts, |_| false);
        let pairs: Vec<(&str, &str, u64)> = graph
            .edges
            .iter()
            .map(|e| (e.source.as_str(), e.destination.as_str(), e.connections))
            .collect();
        assert_eq!(pairs, vec![("web", "db", 3), ("web", "internet", 2)]);
    }

    #[test]
    fn server_half_stays_without_client_host() {
        let mut hosts = web_and_db();
        hosts.remove(0);
        let (graph, stats) = merge(&hosts, |_| false);
        assert_eq!(graph.edges, vec![edge("internet", "db", 5432, 3)]);
        assert_eq!(stats, MergeStats::default());
    }

    #[test]
    fn specific_listener_address_resolves_alone() {
        let mut hosts = web_and_db();
        hosts[1].listeners[0].addr = "198.18.4.11:5432".parse().unwrap();
        let (graph, stats) = merge(&hosts, |_| false);
        assert_eq!(stats.resolved, 0);
        assert_eq!(graph.edges.len(), 2);
    }

    #[test]
    fn same_edge_on_two_hosts_is_summed() {
        let host = |name: &str| HostGraph {
            host: name.into(),
            graph: GraphSnapshot {
                nodes: vec![node("web", NodeKind::Declared)],
                edges: vec![edge("web", "web", 8080, 2)],
            },
            ..HostGraph::default()
        };
        let (graph, _) = merge(&[host("a"), host("b")], |_| false);
        assert_eq!(graph.edges.len(), 1);
        assert_eq!(graph.edges[0].connections, 4);
        assert_eq!(graph.nodes.len(), 1);
    }
}
