//! The graph the page draws: declared zones, components and flows merged with the observed graph.
//!
//! The merge happens here rather than in the browser so that the page only lays out and styles what
//! it receives. Every edge carries one [`EdgeState`], which the page maps to a colour and a line
//! style. Edges past [`TopologyLimits::max_edges`] are left out and counted, because a browser
//! cannot draw a graph of 100,000 edges and a silent cut would look like a quiet system.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use driftwatch_model::graph::{GraphSnapshot, NodeKind};
use driftwatch_model::observation::Protocol;
use driftwatch_model::Model;
use serde::Serialize;

/// The declared part of the picture: what the model says exists and may talk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeclaredModel {
    pub zones: Vec<DeclaredZone>,
    pub components: Vec<DeclaredComponent>,
    pub flows: Vec<DeclaredFlow>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredZone {
    pub id: String,
    /// Trust level, 0 (untrusted) to 100; the page orders zones by it.
    pub trust: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredComponent {
    pub id: String,
    pub zone: String,
    /// Reachable from outside the system.
    pub exposed: bool,
    /// Criticality name: low, medium, high or critical.
    pub criticality: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredFlow {
    /// Client side: a component or zone id.
    pub from: String,
    /// Server side: a component or zone id.
    pub to: String,
    pub protocol: Protocol,
    /// Server ports, never empty.
    pub ports: Vec<u16>,
    /// True for a flow the model expects a control to block.
    pub deny: bool,
}

impl DeclaredModel {
    /// Copies the zones, components and flows of `model`.
    pub fn from_model(model: &Model) -> DeclaredModel {
        DeclaredModel {
            zones: model
                .zones
                .iter()
                .map(|zone| DeclaredZone { id: zone.id.clone(), trust: zone.trust })
                .collect(),
            components: model
                .components
                .iter()
                .map(|component| DeclaredComponent {
                    id: component.id.clone(),
                    zone: component.zone.clone(),
                    exposed: component.exposed,
                    criticality: component.criticality.as_str(),
                })
                .collect(),
            flows: model
                .flows
                .iter()
                .map(|flow| DeclaredFlow {
                    from: flow.from.clone(),
                    to: flow.to.clone(),
                    protocol: flow.protocol,
                    ports: flow.ports.clone(),
                    deny: flow.deny,
                })
                .collect(),
        }
    }
}

/// Bounds of a [`Topology`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopologyLimits {
    /// Observed edges sent to the page; the ones seen least recently are left out first.
    pub max_edges: usize,
}

impl Default for TopologyLimits {
    fn default() -> Self {
        // An SVG with a few thousand paths still lays out and redraws in well under a second.
        TopologyLimits { max_edges: 2000 }
    }
}

/// Style of an edge on the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EdgeState {
    /// A declared flow with traffic on it.
    DeclaredSeen,
    /// A declared flow with no traffic seen yet.
    DeclaredUnseen,
    /// Traffic that no declared flow allows.
    Undeclared,
    /// A flow the model declares as denied, with no traffic seen on it.
    Denied,
}

/// The JSON document the page draws.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Topology {
    /// Zones ordered from least to most trusted.
    pub zones: Vec<TopologyZone>,
    pub nodes: Vec<TopologyNode>,
    pub edges: Vec<TopologyEdge>,
    /// Observed edges left out by [`TopologyLimits::max_edges`].
    pub omitted_edges: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopologyZone {
    pub id: String,
    pub trust: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopologyNode {
    pub id: String,
    /// declared, discovered, external, or zone for a zone named as a flow endpoint.
    pub kind: &'static str,
    /// Zone the node is drawn in; `None` for discovered processes outside every zone.
    pub zone: Option<String>,
    pub exposed: bool,
    pub criticality: Option<&'static str>,
    /// Fleet nodes whose graphs contain this node, when the source reports them (a collector).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopologyEdge {
    pub source: String,
    pub destination: String,
    pub protocol: Protocol,
    pub port: u16,
    pub state: EdgeState,
    /// Connections observed; 0 for a declared flow not seen yet.
    pub connections: u64,
    /// Milliseconds since the Unix epoch of the latest connection, when one was seen.
    pub last_seen_ms: Option<u64>,
    /// A few processes that used the edge.
    pub examples: Vec<ProcessExample>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessExample {
    pub pid: u32,
    pub exe: String,
}

type EdgeKey = (String, String, Protocol, u16);

impl Topology {
    /// Merges the declared model with an observed graph.
    ///
    /// A declared flow counts as seen when an observed, allowed edge joins the same two ids on one
    /// of its ports. An allowed edge between other ids (a component inside a zone that a flow
    /// names, for one) is drawn as its own seen edge.
    pub fn build(declared: &DeclaredModel, graph: &GraphSnapshot, limits: TopologyLimits) -> Topology {
        let mut observed: Vec<_> = graph.edges.iter().collect();
        // Most recent first, so the cut drops the edges idle the longest.
        observed.sort_by(|a, b| b.last_seen.cmp(&a.last_seen));
        let omitted_edges = observed.len().saturating_sub(limits.max_edges);
        observed.truncate(limits.max_edges);

        let mut edges = Vec::new();
        let mut seen_keys: HashSet<EdgeKey> = HashSet::new();
        for edge in &observed {
            seen_keys.insert((edge.source.clone(), edge.destination.clone(), edge.protocol, edge.port));
            edges.push(TopologyEdge {
                source: edge.source.clone(),
                destination: edge.destination.clone(),
                protocol: edge.protocol,
                port: edge.port,
                state: if edge.declared { EdgeState::DeclaredSeen } else { EdgeState::Undeclared },
                connections: edge.connections,
                last_seen_ms: Some(unix_millis(edge.last_seen)),
                examples: edge
                    .examples
                    .iter()
                    .map(|(pid, exe)| ProcessExample { pid: *pid, exe: exe.clone() })
                    .collect(),
            });
        }
        for flow in &declared.flows {
            for port in &flow.ports {
                let key = (flow.from.clone(), flow.to.clone(), flow.protocol, *port);
                if seen_keys.contains(&key) {
                    continue;
                }
                seen_keys.insert(key);
                edges.push(TopologyEdge {
                    source: flow.from.clone(),
                    destination: flow.to.clone(),
                    protocol: flow.protocol,
                    port: *port,
                    state: if flow.deny { EdgeState::Denied } else { EdgeState::DeclaredUnseen },
                    connections: 0,
                    last_seen_ms: None,
                    examples: Vec::new(),
                });
            }
        }
        edges.sort_by(|a, b| {
            (&a.source, &a.destination, a.port, a.protocol).cmp(&(&b.source, &b.destination, b.port, b.protocol))
        });

        let nodes = collect_nodes(declared, graph, &edges);
        let zones = collect_zones(declared, &nodes);
        Topology { zones, nodes, edges, omitted_edges }
    }
}

impl Topology {
    /// Names the fleet nodes behind each graph node, from [`super::LiveSource::hosts`].
    pub fn with_hosts(mut self, mut hosts: BTreeMap<String, Vec<String>>) -> Topology {
        for node in &mut self.nodes {
            if let Some(names) = hosts.remove(&node.id) {
                node.hosts = names;
            }
        }
        self
    }
}

/// Declared components first, then graph nodes, then zones named as flow endpoints, each id once.
fn collect_nodes(declared: &DeclaredModel, graph: &GraphSnapshot, edges: &[TopologyEdge]) -> Vec<TopologyNode> {
    let zone_ids: BTreeSet<&str> = declared.zones.iter().map(|zone| zone.id.as_str()).collect();
    let mut nodes: BTreeMap<String, TopologyNode> = BTreeMap::new();
    for component in &declared.components {
        nodes.insert(
            component.id.clone(),
            TopologyNode {
                id: component.id.clone(),
                kind: "declared",
                zone: Some(component.zone.clone()),
                exposed: component.exposed,
                criticality: Some(component.criticality),
                hosts: Vec::new(),
            },
        );
    }
    for node in &graph.nodes {
        nodes.entry(node.id.clone()).or_insert_with(|| TopologyNode {
            id: node.id.clone(),
            kind: match node.kind {
                NodeKind::Declared => "declared",
                NodeKind::Discovered => "discovered",
                NodeKind::External => "external",
            },
            // An external node named after a zone stands for that zone.
            zone: node.zone.clone().or_else(|| zone_ids.contains(node.id.as_str()).then(|| node.id.clone())),
            exposed: false,
            criticality: None,
            hosts: Vec::new(),
        });
    }
    for edge in edges {
        for id in [&edge.source, &edge.destination] {
            if !nodes.contains_key(id) {
                let is_zone = zone_ids.contains(id.as_str());
                nodes.insert(
                    id.clone(),
                    TopologyNode {
                        id: id.clone(),
                        kind: if is_zone { "zone" } else { "external" },
                        zone: is_zone.then(|| id.clone()),
                        exposed: false,
                        criticality: None,
                        hosts: Vec::new(),
                    },
                );
            }
        }
    }
    nodes.into_values().collect()
}

/// Declared zones by trust, then any zone a node names that the model does not declare.
fn collect_zones(declared: &DeclaredModel, nodes: &[TopologyNode]) -> Vec<TopologyZone> {
    let mut zones: Vec<TopologyZone> =
        declared.zones.iter().map(|zone| TopologyZone { id: zone.id.clone(), trust: Some(zone.trust) }).collect();
    zones.sort_by(|a, b| (a.trust, &a.id).cmp(&(b.trust, &b.id)));
    let mut known: HashSet<String> = zones.iter().map(|zone| zone.id.clone()).collect();
    for node in nodes {
        if let Some(zone) = &node.zone {
            if known.insert(zone.clone()) {
                zones.push(TopologyZone { id: zone.clone(), trust: None });
            }
        }
    }
    zones
}

pub(crate) fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use driftwatch_model::graph::{EdgeSnapshot, NodeSnapshot};

    use super::*;

    fn declared() -> DeclaredModel {
        DeclaredModel {
            zones: vec![
                DeclaredZone { id: "core".into(), trust: 80 },
                DeclaredZone { id: "internet".into(), trust: 0 },
                DeclaredZone { id: "dmz".into(), trust: 40 },
            ],
            components: vec![
                DeclaredComponent { id: "web".into(), zone: "dmz".into(), exposed: true, criticality: "medium" },
                DeclaredComponent { id: "db".into(), zone: "core".into(), exposed: false, criticality: "high" },
            ],
            flows: vec![
                DeclaredFlow { from: "internet".into(), to: "web".into(), protocol: Protocol::Tcp, ports: vec![443], deny: false },
                DeclaredFlow { from: "web".into(), to: "db".into(), protocol: Protocol::Tcp, ports: vec![5432, 5433], deny: false },
                DeclaredFlow { from: "internet".into(), to: "db".into(), protocol: Protocol::Tcp, ports: vec![5432], deny: true },
            ],
        }
    }

    fn edge(source: &str, destination: &str, port: u16, declared: bool, last_seen_secs: u64) -> EdgeSnapshot {
        let time = UNIX_EPOCH + Duration::from_secs(last_seen_secs);
        EdgeSnapshot {
            source: source.into(),
            destination: destination.into(),
            protocol: Protocol::Tcp,
            port,
            declared,
            first_seen: time,
            last_seen: time,
            connections: 3,
            examples: vec![(42, "/usr/bin/curl".into())],
            remote_names: vec![],
        }
    }

    fn state_of(topology: &Topology, source: &str, destination: &str, port: u16) -> Option<EdgeState> {
        topology
            .edges
            .iter()
            .find(|edge| edge.source == source && edge.destination == destination && edge.port == port)
            .map(|edge| edge.state)
    }

    #[test]
    fn declared_flows_without_traffic_are_unseen() {
        let topology = Topology::build(&declared(), &GraphSnapshot::default(), TopologyLimits::default());

        assert_eq!(state_of(&topology, "internet", "web", 443), Some(EdgeState::DeclaredUnseen));
        assert_eq!(state_of(&topology, "web", "db", 5432), Some(EdgeState::DeclaredUnseen));
        assert_eq!(state_of(&topology, "web", "db", 5433), Some(EdgeState::DeclaredUnseen));
        assert_eq!(state_of(&topology, "internet", "db", 5432), Some(EdgeState::Denied));
        assert_eq!(topology.edges.len(), 4);
    }

    #[test]
    fn observed_edges_replace_their_declared_flow() {
        let graph = GraphSnapshot {
            nodes: vec![],
            edges: vec![edge("web", "db", 5432, true, 10), edge("web", "unknown:10.0.0.9", 22, false, 11)],
        };
        let topology = Topology::build(&declared(), &graph, TopologyLimits::default());

        assert_eq!(state_of(&topology, "web", "db", 5432), Some(EdgeState::DeclaredSeen));
        assert_eq!(state_of(&topology, "web", "db", 5433), Some(EdgeState::DeclaredUnseen));
        assert_eq!(state_of(&topology, "web", "unknown:10.0.0.9", 22), Some(EdgeState::Undeclared));
        let seen = topology.edges.iter().find(|edge| edge.port == 5432 && edge.source == "web").unwrap();
        assert_eq!(seen.connections, 3);
        assert_eq!(seen.last_seen_ms, Some(10_000));
        assert_eq!(seen.examples, vec![ProcessExample { pid: 42, exe: "/usr/bin/curl".into() }]);
        assert_eq!(topology.edges.len(), 5);
    }

    #[test]
    fn zones_are_ordered_by_trust_and_endpoints_get_nodes() {
        let graph = GraphSnapshot {
            nodes: vec![NodeSnapshot { id: "unknown:/usr/bin/nc".into(), kind: NodeKind::Discovered, zone: None, processes: Vec::new() }],
            edges: vec![],
        };
        let topology = Topology::build(&declared(), &graph, TopologyLimits::default());

        let zones: Vec<&str> = topology.zones.iter().map(|zone| zone.id.as_str()).collect();
        assert_eq!(zones, ["internet", "dmz", "core"]);
        let internet = topology.nodes.iter().find(|node| node.id == "internet").unwrap();
        assert_eq!(internet.kind, "zone");
        assert_eq!(internet.zone.as_deref(), Some("internet"));
        let web = topology.nodes.iter().find(|node| node.id == "web").unwrap();
        assert_eq!(web.zone.as_deref(), Some("dmz"));
        assert!(web.exposed);
        let discovered = topology.nodes.iter().find(|node| node.id == "unknown:/usr/bin/nc").unwrap();
        assert_eq!(discovered.kind, "discovered");
        assert_eq!(discovered.zone, None);
    }

    #[test]
    fn edges_past_the_limit_are_counted() {
        let graph = GraphSnapshot {
            nodes: vec![],
            edges: (0..5).map(|i| edge("web", &format!("10.0.0.{i}"), 80, false, i)).collect(),
        };
        let declared = DeclaredModel::default();
        let topology = Topology::build(&declared, &graph, TopologyLimits { max_edges: 2 });

        assert_eq!(topology.omitted_edges, 3);
        let kept: Vec<&str> = topology.edges.iter().map(|edge| edge.destination.as_str()).collect();
        assert_eq!(kept, ["10.0.0.3", "10.0.0.4"]);
    }
}
