//! The observed-communication graph: who talked to whom, on which port, how often, and whether
//! the model allows it.

use std::collections::{HashMap, VecDeque};

use crate::FastMap;
use std::fmt::Write as _;
use std::time::SystemTime;

use petgraph::stable_graph::{EdgeIndex, NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use serde::{Deserialize, Serialize};

use crate::model::{systemd_unit, Model};
use crate::observation::{FlowObservation, ProcessInfo, Protocol};
use crate::recency::{RecencyIndex, Stamp};

/// How a graph node came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    /// A component declared in the model.
    Declared,
    /// Processes that match no declared component, grouped by workload (the cgroup of a systemd
    /// unit, a container or another dedicated cgroup) or else by executable.
    Discovered,
    /// A remote endpoint, by zone or by address.
    External,
}

/// A point-in-time copy of the graph, for the API, `driftwatch graph` and recordings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GraphSnapshot {
    pub nodes: Vec<NodeSnapshot>,
    pub edges: Vec<EdgeSnapshot>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSnapshot {
    /// Component id; `unknown:cgroup:<path>` or `unknown:<exe>` for a discovered node; a zone id
    /// or `external:<ip>` for an external one.
    pub id: String,
    pub kind: NodeKind,
    pub zone: Option<String>,
    /// Executables and cgroups of the processes behind the node, up to [`MAX_NODE_PROCESSES`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<NodeProcess>,
}

/// A program and the cgroup it ran in, for one of the processes behind a graph node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeProcess {
    pub exe: String,
    /// cgroup v2 path relative to the cgroup2 mount; empty when unknown.
    pub cgroup: String,
    /// The systemd unit the cgroup path names, such as `nginx.service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// The container id the cgroup path names. The engine leaves it empty, and the agent fills
    /// it in, because the container runtimes' cgroup layouts are classified in the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

impl NodeProcess {
    /// Describes `process` without a container id.
    pub fn of(process: &ProcessInfo) -> NodeProcess {
        NodeProcess {
            exe: process.exe.clone(),
            cgroup: process.cgroup.clone(),
            unit: systemd_unit(&process.cgroup).map(str::to_owned),
            container: None,
        }
    }
}

/// Distinct (executable, cgroup) pairs kept per node, so a node of many programs stays bounded.
pub const MAX_NODE_PROCESSES: usize = 8;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeSnapshot {
    pub source: String,
    pub destination: String,
    pub protocol: Protocol,
    /// Server port.
    pub port: u16,
    /// True when a declared flow allows this edge.
    pub declared: bool,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    /// Connections observed on this edge.
    pub connections: u64,
    /// A few processes that used the edge, as (pid, executable).
    pub examples: Vec<(u32, String)>,
    /// DNS names by which processes reached the edge's server addresses, at most
    /// [`MAX_EXAMPLES`] of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_names: Vec<String>,
}

/// Connections of one edge kept as examples, so a snapshot shows who used it without growing.
pub const MAX_EXAMPLES: usize = 4;

/// Identifies an edge: one direction, one protocol, one server port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EdgeKey {
    pub source: String,
    pub destination: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone)]
struct NodeData {
    id: String,
    kind: NodeKind,
    zone: Option<String>,
    processes: Vec<NodeProcess>,
}

#[derive(Debug, Clone)]
struct EdgeData {
    key: EdgeKey,
    declared: bool,
    first_seen: SystemTime,
    last_seen: SystemTime,
    connections: u64,
    examples: Vec<(u32, String)>,
    remote_names: Vec<String>,
    stamp: Stamp,
    /// The latest connection on the edge, kept so a new model can judge the edge again.
    last_observation: Option<FlowObservation>,
}

/// A node as the engine names it when recording a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRef {
    pub id: String,
    pub kind: NodeKind,
    pub zone: Option<String>,
    /// The process on this end of the flow, when it is on this host.
    pub process: Option<NodeProcess>,
}

/// One connection to record on an edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub protocol: Protocol,
    /// Server port.
    pub port: u16,
    /// True when a declared flow allows it.
    pub declared: bool,
    pub time: SystemTime,
    /// The process that made it, as (pid, executable).
    pub example: Option<(u32, String)>,
    /// DNS name of the server address, when known.
    pub remote_name: Option<String>,
}

/// The observed-communication graph, bounded by an edge count.
///
/// Nodes are the declared components (always present) plus discovered processes and external
/// endpoints (present while an edge uses them). When a new edge would pass the bound, the edge
/// idle the longest is evicted and counted.
#[derive(Debug, Clone)]
pub struct ObservedGraph {
    graph: StableDiGraph<NodeData, EdgeData>,
    nodes: FastMap<String, NodeIndex>,
    edges: FastMap<EdgeKey, EdgeIndex>,
    recency: RecencyIndex<EdgeIndex>,
    max_edges: usize,
    evictions: u64,
}

impl ObservedGraph {
    /// Creates an empty graph that keeps at most `max_edges` edges (at least one).
    pub fn new(max_edges: usize) -> ObservedGraph {
        ObservedGraph {
            graph: StableDiGraph::new(),
            nodes: FastMap::default(),
            edges: FastMap::default(),
            recency: RecencyIndex::new(),
            max_edges: max_edges.max(1),
            evictions: 0,
        }
    }

    pub fn node_count(&self) -> usize {
        self.graph.node_count()
    }

    pub fn edge_count(&self) -> usize {
        self.graph.edge_count()
    }

    /// Edges evicted to stay within the bound since the graph was created.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// True when the graph has the edge `key`.
    pub fn has_edge(&self, key: &EdgeKey) -> bool {
        self.edges.contains_key(key)
    }

    /// Adds `count` connections like `connection` to the edge `key`, as `count` calls of
    /// [`Graph::record`] would. Returns false, changing nothing, when there is no such edge.
    pub fn record_repeats(&mut self, key: &EdgeKey, connection: Connection, count: u64) -> bool {
        let Some(&index) = self.edges.get(key) else {
            return false;
        };
        self.add_connections(index, connection, count);
        true
    }

    fn add_connections(&mut self, index: EdgeIndex, connection: Connection, count: u64) {
        let edge = &mut self.graph[index];
        edge.connections += count;
        edge.declared = connection.declared;
        if connection.time > edge.last_seen {
            edge.last_seen = connection.time;
        }
        if let Some(example) = connection.example {
            if edge.examples.len() < MAX_EXAMPLES && !edge.examples.contains(&example) {
                edge.examples.push(example);
            }
        }
        if let Some(name) = connection.remote_name {
            if edge.remote_names.len() < MAX_EXAMPLES && !edge.remote_names.contains(&name) {
                edge.remote_names.push(name);
            }
        }
        let previous = edge.stamp;
        let last_seen = edge.last_seen;
        self.graph[index].stamp = self.recency.touch(Some(previous), last_seen, index);
    }

    /// Keeps `observation` as the latest connection on the edge `key`, for [`Self::observations`].
    pub fn remember(&mut self, key: &EdgeKey, observation: FlowObservation) {
        if let Some(&index) = self.edges.get(key) {
            self.graph[index].last_observation = Some(observation);
        }
    }

    /// Returns the latest connection kept on each edge, oldest first.
    pub fn observations(&self) -> Vec<FlowObservation> {
        let mut observations: Vec<FlowObservation> = self
            .graph
            .edge_weights()
            .filter_map(|edge| edge.last_observation.clone())
            .collect();
        observations.sort_by_key(|observation| observation.time);
        observations
    }

    /// Carries the counters of `previous` into this graph, which was rebuilt from the observations
    /// of `previous`: the eviction count, and for each edge with the same key, its first sighting,
    /// connection count and examples. An edge whose key changed (because the model now attributes
    /// an end differently) starts its counts afresh.
    pub fn inherit_history(&mut self, previous: &ObservedGraph) {
        self.evictions += previous.evictions;
        for (id, &index) in &self.nodes {
            let Some(&old) = previous.nodes.get(id) else {
                continue;
            };
            let processes = &mut self.graph[index].processes;
            for process in &previous.graph[old].processes {
                if processes.len() < MAX_NODE_PROCESSES && !processes.contains(process) {
                    processes.push(process.clone());
                }
            }
        }
        for (key, &index) in &self.edges {
            let Some(&old) = previous.edges.get(key) else {
                continue;
            };
            let old = &previous.graph[old];
            let edge = &mut self.graph[index];
            edge.first_seen = edge.first_seen.min(old.first_seen);
            edge.connections = edge.connections.max(old.connections);
            for example in &old.examples {
                if edge.examples.len() < MAX_EXAMPLES && !edge.examples.contains(example) {
                    edge.examples.push(example.clone());
                }
            }
        }
    }

    /// Adds a node or updates the kind and zone of an existing one.
    pub fn upsert_node(&mut self, node: NodeRef) -> NodeIndex {
        if let Some(&index) = self.nodes.get(&node.id) {
            let data = &mut self.graph[index];
            data.kind = node.kind;
            data.zone = node.zone;
            if let Some(process) = node.process {
                if data.processes.len() < MAX_NODE_PROCESSES && !data.processes.contains(&process) {
                    data.processes.push(process);
                }
            }
            return index;
        }
        let id = node.id.clone();
        let index = self.graph.add_node(NodeData {
            id: node.id,
            kind: node.kind,
            zone: node.zone,
            processes: node.process.into_iter().collect(),
        });
        self.nodes.insert(id, index);
        index
    }

    /// Records one connection from `source` to `destination`. Returns true when the edge is new.
    pub fn record(
        &mut self,
        source: NodeRef,
        destination: NodeRef,
        connection: Connection,
    ) -> bool {
        let key = EdgeKey {
            source: source.id.clone(),
            destination: destination.id.clone(),
            protocol: connection.protocol,
            port: connection.port,
        };
        if let Some(&index) = self.edges.get(&key) {
            self.add_connections(index, connection, 1);
            return false;
        }
        let Connection {
            protocol: _,
            port: _,
            declared,
            time,
            example,
            remote_name,
        } = connection;

        while self.graph.edge_count() >= self.max_edges {
            if !self.evict_oldest() {
                break;
            }
        }
        let source_index = self.upsert_node(source);
        let destination_index = self.upsert_node(destination);
        let data = EdgeData {
            key: key.clone(),
            declared,
            first_seen: time,
            last_seen: time,
            connections: 1,
            examples: example.into_iter().collect(),
            remote_names: remote_name.into_iter().collect(),
            stamp: (time, 0),
            last_observation: None,
        };
        let index = self.graph.add_edge(source_index, destination_index, data);
        self.graph[index].stamp = self.recency.touch(None, time, index);
        self.edges.insert(key, index);
        true
    }

    fn evict_oldest(&mut self) -> bool {
        let Some(index) = self.recency.pop_oldest() else {
            return false;
        };
        let Some((source, destination)) = self.graph.edge_endpoints(index) else {
            return false;
        };
        if let Some(edge) = self.graph.remove_edge(index) {
            self.edges.remove(&edge.key);
        }
        self.evictions += 1;
        self.remove_if_orphan(source);
        self.remove_if_orphan(destination);
        true
    }

    /// Removes a discovered or external node that no edge uses any more, so such nodes stay
    /// bounded by the edges.
    fn remove_if_orphan(&mut self, index: NodeIndex) {
        let Some(node) = self.graph.node_weight(index) else {
            return;
        };
        if node.kind == NodeKind::Declared {
            return;
        }
        if self.graph.neighbors_undirected(index).next().is_none() {
            if let Some(node) = self.graph.remove_node(index) {
                self.nodes.remove(&node.id);
            }
        }
    }

    /// Re-derives node kinds and the `declared` flag of every edge after a model change. Nodes of
    /// components the model no longer has become discovered nodes; declared components the graph
    /// lacks are added.
    ///
    /// NOTE: an `external:<ip>` node stays external even if the new model has a zone that contains
    /// the address. The next flow to that address is recorded under the zone.
    pub fn apply_model(&mut self, model: &Model) {
        let indices: Vec<NodeIndex> = self.graph.node_indices().collect();
        for index in indices {
            let node = &mut self.graph[index];
            if let Some(component) = model.component(&node.id) {
                node.kind = NodeKind::Declared;
                node.zone = Some(component.zone.clone());
            } else if model.zone(&node.id).is_some() {
                node.kind = NodeKind::External;
                node.zone = Some(node.id.clone());
            } else if node.kind == NodeKind::Declared {
                node.kind = NodeKind::Discovered;
                node.zone = None;
            }
            self.remove_if_orphan(index);
        }
        for component in &model.components {
            let node = NodeRef {
                id: component.id.clone(),
                kind: NodeKind::Declared,
                zone: Some(component.zone.clone()),
                process: None,
            };
            self.upsert_node(node);
        }

        let edge_indices: Vec<EdgeIndex> = self.graph.edge_indices().collect();
        for index in edge_indices {
            let Some((source, destination)) = self.graph.edge_endpoints(index) else {
                continue;
            };
            let source = (
                self.graph[source].id.as_str(),
                self.graph[source].zone.as_deref(),
            );
            let destination = (
                self.graph[destination].id.as_str(),
                self.graph[destination].zone.as_deref(),
            );
            let key = &self.graph[index].key;
            let declared = model.flow_declared(source, destination, key.protocol, key.port);
            self.graph[index].declared = declared;
        }
    }

    /// Copies the graph out, nodes sorted by id and edges by key, so equal graphs compare equal.
    pub fn snapshot(&self) -> GraphSnapshot {
        let mut nodes: Vec<NodeSnapshot> = self
            .graph
            .node_weights()
            .map(|n| {
                let mut processes = n.processes.clone();
                processes.sort();
                NodeSnapshot {
                    id: n.id.clone(),
                    kind: n.kind,
                    zone: n.zone.clone(),
                    processes,
                }
            })
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));

        let mut edges: Vec<&EdgeData> = self.graph.edge_weights().collect();
        edges.sort_by(|a, b| a.key.cmp(&b.key));
        let edges = edges
            .into_iter()
            .map(|e| EdgeSnapshot {
                source: e.key.source.clone(),
                destination: e.key.destination.clone(),
                protocol: e.key.protocol,
                port: e.key.port,
                declared: e.declared,
                first_seen: e.first_seen,
                last_seen: e.last_seen,
                connections: e.connections,
                examples: e.examples.clone(),
                remote_names: e.remote_names.clone(),
            })
            .collect();
        GraphSnapshot { nodes, edges }
    }
}

/// One hop of an attack path: an observed edge with the processes that used it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathHop {
    pub source: String,
    pub destination: String,
    pub protocol: Protocol,
    pub port: u16,
    /// True when a declared flow allows this hop.
    pub declared: bool,
    /// Processes that used the hop, as (pid, executable).
    pub examples: Vec<(u32, String)>,
}

/// A chain of observed edges from an entry point to a critical component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttackPath {
    pub entry: String,
    pub target: String,
    pub hops: Vec<PathHop>,
}

impl ObservedGraph {
    /// Finds the observed paths that run through the edge `key` from an entry node to a target
    /// node and use at least one undeclared edge, at most `max_hops` edges long.
    ///
    /// Returns one path per entry and target, over the route the walks found first. The search is
    /// two breadth-first walks from the ends of the edge, each bounded by `max_hops`.
    ///
    /// A path is left out when a later node on it is an entry and the rest of the path contains
    /// an undeclared hop. That shorter path is the one to report, with or without the new edge,
    /// so the findings do not depend on the order of observation. For example, the internet's
    /// declared hop to an exposed web that reaches the db undeclared gives the path from web only,
    /// and two exposed components that reach the db over one undeclared hop give a path each.
    pub fn attack_paths_through(
        &self,
        key: &EdgeKey,
        is_entry: impl Fn(&str) -> bool,
        is_target: impl Fn(&str) -> bool,
        max_hops: usize,
    ) -> Vec<AttackPath> {
        let Some(&edge) = self.edges.get(key) else {
            return Vec::new();
        };
        let Some((start, end)) = self.graph.edge_endpoints(edge) else {
            return Vec::new();
        };
        if max_hops == 0 {
            return Vec::new();
        }
        // Downstream first: most new edges reach no critical component, and then the walk
        // upstream, which can cover most of the graph, is not needed at all.
        let downstream = self.walk(end, Direction::Outgoing, max_hops - 1);
        let mut targets: Vec<(&str, usize, NodeIndex)> = downstream
            .iter()
            .filter(|(node, _)| is_target(&self.graph[**node].id))
            .map(|(node, (depth, _))| (self.graph[*node].id.as_str(), *depth, *node))
            .collect();
        if targets.is_empty() {
            return Vec::new();
        }
        targets.sort();
        let upstream = self.walk(start, Direction::Incoming, max_hops - 1);
        let mut entries: Vec<(usize, &str, NodeIndex)> = upstream
            .iter()
            .filter(|(node, _)| is_entry(&self.graph[**node].id))
            .map(|(node, (depth, _))| (*depth, self.graph[*node].id.as_str(), *node))
            .collect();
        entries.sort();

        let mut paths = Vec::new();
        for (target_id, target_depth, target) in targets {
            let mut onward = vec![edge];
            onward.extend(self.trace(&downstream, target, Direction::Outgoing));
            if self.contains_older_path(&onward, &is_entry) {
                continue;
            }
            for &(entry_depth, entry_id, entry) in &entries {
                if entry == target || entry_depth + target_depth + 1 > max_hops {
                    continue;
                }
                // Both traces come back in path order, entry first.
                let mut edges = self.trace(&upstream, entry, Direction::Incoming);
                edges.extend_from_slice(&onward);
                if !self.is_simple(&edges) || self.contains_older_path(&edges, &is_entry) {
                    continue;
                }
                let hops: Vec<PathHop> = edges.iter().map(|&e| self.hop(e)).collect();
                if hops.iter().all(|h| h.declared) {
                    continue;
                }
                paths.push(AttackPath {
                    entry: entry_id.to_owned(),
                    target: target_id.to_owned(),
                    hops,
                });
            }
        }
        paths
    }

    /// Breadth-first walk from `from` along edges in `direction`, up to `max_depth` edges. Returns
    /// each reached node with its depth and the edge it was first reached by.
    fn walk(
        &self,
        from: NodeIndex,
        direction: Direction,
        max_depth: usize,
    ) -> HashMap<NodeIndex, (usize, Option<EdgeIndex>)> {
        let mut reached = HashMap::from([(from, (0, None))]);
        let mut queue = VecDeque::from([(from, 0)]);
        while let Some((node, depth)) = queue.pop_front() {
            if depth == max_depth {
                continue;
            }
            let mut next: Vec<_> = self.graph.edges_directed(node, direction).collect();
            // Declared edges first, so a path runs through allowed hops where the graph offers a
            // choice and points at the undeclared ones that matter.
            next.sort_by_key(|e| (!e.weight().declared, e.weight().key.clone()));
            for e in next {
                let other = match direction {
                    Direction::Incoming => e.source(),
                    Direction::Outgoing => e.target(),
                };
                if let std::collections::hash_map::Entry::Vacant(slot) = reached.entry(other) {
                    slot.insert((depth + 1, Some(e.id())));
                    queue.push_back((other, depth + 1));
                }
            }
        }
        reached
    }

    /// Follows the first-reached edges from `node` back to the walk's start.
    fn trace(
        &self,
        walk: &HashMap<NodeIndex, (usize, Option<EdgeIndex>)>,
        mut node: NodeIndex,
        direction: Direction,
    ) -> Vec<EdgeIndex> {
        let mut edges = Vec::new();
        while let Some(&(_, Some(edge))) = walk.get(&node) {
            edges.push(edge);
            let Some((source, target)) = self.graph.edge_endpoints(edge) else {
                break;
            };
            node = match direction {
                Direction::Incoming => target,
                Direction::Outgoing => source,
            };
        }
        if direction == Direction::Outgoing {
            edges.reverse();
        }
        edges
    }

    /// Returns true when a hop of `path` after the first leaves an entry node and the rest of
    /// the path from there contains an undeclared hop, so it is an attack path without the first.
    fn contains_older_path(&self, path: &[EdgeIndex], is_entry: impl Fn(&str) -> bool) -> bool {
        (1..path.len()).any(|i| {
            let source = &self.graph[path[i]].key.source;
            is_entry(source) && path[i..].iter().any(|&e| !self.graph[e].declared)
        })
    }

    /// True when the chain of edges visits no node twice.
    fn is_simple(&self, edges: &[EdgeIndex]) -> bool {
        let mut seen = Vec::with_capacity(edges.len() + 1);
        for (i, &edge) in edges.iter().enumerate() {
            let Some((source, target)) = self.graph.edge_endpoints(edge) else {
                return false;
            };
            if i == 0 {
                seen.push(source);
            }
            if seen.contains(&target) {
                return false;
            }
            seen.push(target);
        }
        true
    }

    fn hop(&self, edge: EdgeIndex) -> PathHop {
        let data = &self.graph[edge];
        PathHop {
            source: data.key.source.clone(),
            destination: data.key.destination.clone(),
            protocol: data.key.protocol,
            port: data.key.port,
            declared: data.declared,
            examples: data.examples.clone(),
        }
    }
}

impl GraphSnapshot {
    /// Renders the graph in Graphviz DOT. Declared components are boxes, discovered processes
    /// dashed boxes, external endpoints ellipses; edges no declared flow allows are red.
    pub fn to_dot(&self) -> String {
        let mut out = String::from("digraph driftwatch {\n  rankdir=LR;\n");
        for node in &self.nodes {
            let style = match node.kind {
                NodeKind::Declared => "shape=box",
                NodeKind::Discovered => "shape=box, style=dashed",
                NodeKind::External => "shape=ellipse",
            };
            let label = match &node.zone {
                Some(zone) if zone != &node.id => {
                    format!("{}\\n[{}]", dot_escape(&node.id), dot_escape(zone))
                }
                _ => dot_escape(&node.id),
            };
            let _ = writeln!(
                out,
                "  \"{}\" [{style}, label=\"{label}\"];",
                dot_escape(&node.id)
            );
        }
        for edge in &self.edges {
            let color = if edge.declared { "black" } else { "red" };
            let _ = writeln!(
                out,
                "  \"{}\" -> \"{}\" [label=\"{}/{} x{}\", color={color}];",
                dot_escape(&edge.source),
                dot_escape(&edge.destination),
                edge.protocol.as_str(),
                edge.port,
                edge.connections,
            );
        }
        out.push_str("}\n");
        out
    }

    /// Serialises the snapshot as pretty-printed JSON; times are seconds and nanoseconds since the
    /// Unix epoch.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a graph snapshot always serialises")
    }
}

fn dot_escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}
