//! The comparison engine: folds observations into the observed graph and raises deviations from
//! the declared model.
//!
//! Every deviation has a stable id, and the first occurrence of an id is returned. Later
//! occurrences update its count and `last_seen` in the table. They are returned again only once
//! [`EngineConfig::repeat_interval`] has passed since the id was last returned, so a stream shows
//! that a deviation is still happening without repeating it per connection. A deviation whose id
//! matches an exception in force at the observation time is not returned and not stored; it is
//! counted as suppressed.
//!
//! The engine reads no clock: all times, exception expiry included, come from the observations.

mod endpoint;
mod explain;
mod extra;
mod table;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use self::endpoint::{Resolved, Side};
use self::table::{DeviationTable, Offer};
use crate::deviation::{Category, Deviation, Evidence};
use crate::graph::{AttackPath, Connection, EdgeKey, GraphSnapshot, NodeRef, ObservedGraph};
use crate::model::Model;
use crate::FastMap;
use crate::observation::{
    ExecObservation, FlowObservation, ListenObservation, ProcessInfo, Protocol,
};
use crate::severity::{self, Impact, Likelihood};

/// Bounds and timing of an [`Engine`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Minimum time between two returns of the same deviation id.
    pub repeat_interval: Duration,
    /// Deviation ids kept in the table; past it the least recently seen id is evicted.
    pub max_deviations: usize,
    /// Edges kept in the observed graph; past it the edge idle the longest is evicted.
    pub max_edges: usize,
    /// Longest attack path searched, in edges. Each search walks at most this far from both ends
    /// of a new edge.
    pub max_path_hops: usize,
    /// An allowed flow not observed for this long is reported by [`Engine::tick`] as
    /// declared-flow-unused.
    pub unused_flow_window: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            repeat_interval: Duration::from_secs(60),
            max_deviations: 10_000,
            max_edges: 100_000,
            max_path_hops: 6,
            unused_flow_window: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Counters since the engine was created; they survive model reloads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineStats {
    pub exec_observations: u64,
    pub listen_observations: u64,
    pub flow_observations: u64,
    /// Deviations returned for the first time.
    pub deviations_raised: u64,
    /// Deviations returned again after the repeat interval.
    pub deviations_repeated: u64,
    /// Occurrences that an exception covered.
    pub deviations_suppressed: u64,
    /// Deviation ids evicted from the bounded table.
    pub deviation_evictions: u64,
    /// Graph edges evicted to respect the edge bound.
    pub edge_evictions: u64,
    /// Deviation ids in the table now.
    pub deviations_tracked: u64,
    pub graph_nodes: u64,
    pub graph_edges: u64,
    pub model_reloads: u64,
    /// Connection attempts that the network refused or dropped.
    pub failed_connect_observations: u64,
    /// Refused attempts that a `deny` flow covers: the control held.
    pub controls_held: u64,
    /// Connections that a `deny` flow covers: the control failed.
    pub controls_failed: u64,
    /// Deviations that an expired exception would have covered; they are reported as usual.
    pub expired_exception_matches: u64,
}

impl EngineStats {
    /// Returns the counters as (name, value) pairs for a status report, each name prefixed `engine_`.
    pub fn named(&self) -> Vec<(String, u64)> {
        [
            ("engine_exec_observations", self.exec_observations),
            ("engine_listen_observations", self.listen_observations),
            ("engine_flow_observations", self.flow_observations),
            ("engine_deviations_raised", self.deviations_raised),
            ("engine_deviations_repeated", self.deviations_repeated),
            ("engine_deviations_suppressed", self.deviations_suppressed),
            ("engine_deviation_evictions", self.deviation_evictions),
            ("engine_edge_evictions", self.edge_evictions),
            ("engine_deviations_tracked", self.deviations_tracked),
            ("engine_graph_nodes", self.graph_nodes),
            ("engine_graph_edges", self.graph_edges),
            ("engine_model_reloads", self.model_reloads),
            (
                "engine_failed_connect_observations",
                self.failed_connect_observations,
            ),
            ("engine_controls_held", self.controls_held),
            ("engine_controls_failed", self.controls_failed),
            (
                "engine_expired_exception_matches",
                self.expired_exception_matches,
            ),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect()
    }
}

/// A deviation before the table and the exceptions see it.
pub(crate) struct Finding {
    category: Category,
    likelihood: Likelihood,
    impact: Impact,
    source: String,
    destination: String,
    protocol: Option<Protocol>,
    port: Option<u16>,
    summary: String,
    resolution: String,
    evidence: Evidence,
}

impl Finding {
    pub(crate) fn id(&self) -> String {
        let mut id = format!(
            "{}@{}@{}",
            self.category.as_str(),
            self.source,
            self.destination
        );
        if let (Some(protocol), Some(port)) = (self.protocol, self.port) {
            id.push_str(&format!("@{}/{port}", protocol.as_str()));
        }
        id
    }

    fn into_deviation(self, time: SystemTime) -> Deviation {
        Deviation {
            id: self.id(),
            category: self.category,
            severity: severity::assess(self.likelihood, self.impact),
            stride: self.category.stride(),
            summary: self.summary,
            source: self.source,
            destination: self.destination,
            protocol: self.protocol,
            port: self.port,
            evidence: self.evidence,
            first_seen: time,
            last_seen: time,
            count: 1,
            resolution: self.resolution,
        }
    }
}

/// How one `deny` flow of the model has fared since the model was put in force.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlCheck {
    /// Index of the flow in [`Model::flows`].
    pub flow: usize,
    /// Refused or dropped attempts the flow covers.
    pub held: u64,
    /// Connections the flow covers.
    pub failed: u64,
    pub last_held: Option<SystemTime>,
    pub last_failed: Option<SystemTime>,
}

/// Compares observations with a declared model.
#[derive(Debug)]
pub struct Engine {
    model: Model,
    config: EngineConfig,
    table: DeviationTable,
    graph: ObservedGraph,
    stats: EngineStats,
    /// One entry per `deny` flow, in model order.
    controls: Vec<ControlCheck>,
    /// When each flow of the model was last covered by an observed connection.
    flow_last_seen: Vec<Option<SystemTime>>,
    /// The earliest time seen since the model was put in force; the unused-flow window starts here.
    watch_since: Option<SystemTime>,
    /// Attack paths by deviation id, bounded by [`EngineConfig::max_deviations`].
    attack_paths: HashMap<String, AttackPath>,
    /// The judgement of each edge when it was last judged in full, so that a repeat within the
    /// repeat interval is only counted. Emptied with the model and when full.
    judged_edges: FastMap<EdgeKey, JudgedEdge>,
    /// Attributions of the processes of recent flows under the model in force.
    attributions: endpoint::AttributionCache,
}

/// Most edges whose judgement is kept. Repeats come from the edges in use, a small part of a large
/// graph, and each entry contains a copy of its key and ids.
const JUDGED_EDGES_MAX: usize = 16_384;

/// The outcome of judging one edge in full: whether the model declares it and the ids of the
/// deviations it raised, none of them covered by an exception, active or expired.
#[derive(Debug, Clone)]
struct JudgedEdge {
    declared: bool,
    deviation_ids: Vec<String>,
}

impl Engine {
    /// Creates an engine with the default [`EngineConfig`].
    pub fn new(model: Model) -> Engine {
        Engine::with_config(model, EngineConfig::default())
    }

    pub fn with_config(model: Model, config: EngineConfig) -> Engine {
        let mut graph = ObservedGraph::new(config.max_edges);
        graph.apply_model(&model);
        let mut engine = Engine {
            table: DeviationTable::new(config.max_deviations),
            model,
            config,
            graph,
            stats: EngineStats::default(),
            controls: Vec::new(),
            flow_last_seen: Vec::new(),
            watch_since: None,
            attack_paths: HashMap::new(),
            judged_edges: FastMap::default(),
            attributions: endpoint::AttributionCache::default(),
        };
        engine.reset_model_state();
        engine
    }

    fn reset_model_state(&mut self) {
        self.controls = self
            .model
            .flows
            .iter()
            .enumerate()
            .filter(|(_, f)| f.deny)
            .map(|(flow, _)| ControlCheck {
                flow,
                ..ControlCheck::default()
            })
            .collect();
        self.flow_last_seen = vec![None; self.model.flows.len()];
        self.watch_since = None;
        self.attack_paths.clear();
        self.judged_edges.clear();
        self.attributions.clear();
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Puts a new model in force and judges what was already observed against it. Returns the
    /// deviations the new model raises for the observed graph.
    ///
    /// The deviation table is emptied, because its entries were judged against the old model. The
    /// graph is rebuilt by replaying the latest connection of every edge through the new model.
    /// Both ends are then attributed by the new selectors, and edges are re-marked against the new
    /// flows. An edge the new model no longer allows is raised at once rather than at its next
    /// connection. Edges keep their counts where their key did not change. Executions and
    /// listeners are not kept by the engine, so the caller observes the ones still relevant again.
    pub fn replace_model(&mut self, model: Model) -> Vec<Deviation> {
        self.model = model;
        self.table.clear();
        self.reset_model_state();
        let previous = std::mem::replace(
            &mut self.graph,
            ObservedGraph::new(self.config.max_edges),
        );
        self.graph.apply_model(&self.model);

        // The replay judges old connections again; it observes nothing new, so it leaves the
        // observation counters as they were.
        let counted = self.stats.clone();
        let mut raised = Vec::new();
        for observation in previous.observations() {
            raised.extend(self.observe_flow(&observation));
        }
        self.graph.inherit_history(&previous);
        self.stats.flow_observations = counted.flow_observations;
        // The unused-flow window of the new model starts with the next observation, not with the
        // replayed ones.
        self.watch_since = None;
        self.stats.model_reloads += 1;
        raised
    }

    /// Checks a new program against the executables of the component it runs in.
    pub fn observe_exec(&mut self, observation: &ExecObservation) -> Vec<Deviation> {
        self.stats.exec_observations += 1;
        let findings = exec_findings(&self.model, observation);
        self.emit_all(findings, observation.time)
    }

    /// Checks a listening socket against the `listens` of the process's component.
    pub fn observe_listen(&mut self, observation: &ListenObservation) -> Vec<Deviation> {
        self.stats.listen_observations += 1;
        let findings = listen_findings(&self.model, observation);
        self.emit_all(findings, observation.time)
    }

    /// Records a flow in the graph and checks it against the declared flows.
    ///
    /// A connection that a `deny` flow covers is `control-failed` instead of `unexpected-flow`,
    /// even where an allowed flow covers it too. A new edge is also searched for attack paths.
    pub fn observe_flow(&mut self, observation: &FlowObservation) -> Vec<Deviation> {
        self.stats.flow_observations += 1;
        self.note_time(observation.time);
        let model = &self.model;
        let (source, destination) = resolve_flow(model, Some(&mut self.attributions), observation);
        let protocol = observation.protocol;
        let port = observation.server_addr.port();
        let source_key = (source.node.as_str(), source.zone_id());
        let destination_key = (destination.node.as_str(), destination.zone_id());
        let denied = model.matching_flow(source_key, destination_key, protocol, port, true);
        let declared =
            denied.is_none() && model.flow_declared(source_key, destination_key, protocol, port);
        mark_flows_seen(model, &mut self.flow_last_seen, source_key, destination_key, observation);

        let new_edge = self
            .graph
            .record(source.node_ref(), destination.node_ref(), connection_of(observation, declared));
        let key = EdgeKey {
            source: source.node.clone(),
            destination: destination.node.clone(),
            protocol,
            port,
        };
        self.graph.remember(&key, observation.clone());

        // The same edge judged the same way raises the same ids, so a repeat that the table would
        // only count needs none of the text below. Denied flows also count their control, and
        // new edges search for attack paths, so they always take the full path.
        if denied.is_none() && !new_edge {
            if let Some(judged) = self.judged_edges.get(&key) {
                if judged.declared == declared
                    && self.table.count_quiet_repeats(&judged.deviation_ids, observation.time, self.config.repeat_interval, 1)
                {
                    return Vec::new();
                }
            }
        }

        let mut findings = match denied {
            Some(flow) => {
                let check = self.controls.iter_mut().find(|c| c.flow == flow);
                if let Some(check) = check {
                    check.failed += 1;
                    check.last_failed = Some(observation.time);
                }
                self.stats.controls_failed += 1;
                vec![extra::control_failed(
                    model,
                    &model.flows[flow],
                    observation,
                    &source,
                    &destination,
                )]
            }
            None => flow_findings(model, observation, &source, &destination, declared),
        };
        // Kept before the attack paths, which only a new edge raises.
        if denied.is_none() {
            let limit = self.config.max_edges.min(JUDGED_EDGES_MAX);
            remember_judgement(&mut self.judged_edges, limit, model, key.clone(), declared, &findings, observation.time);
        }
        if new_edge {
            let paths = self.graph.attack_paths_through(
                &key,
                |id| extra::is_path_entry(model, id),
                |id| extra::is_path_target(model, id),
                self.config.max_path_hops,
            );
            for path in paths {
                let finding = extra::attack_path(
                    model,
                    &path,
                    flow_evidence(observation, &source, &destination),
                );
                if self.attack_paths.len() < self.config.max_deviations {
                    self.attack_paths.insert(finding.id(), path);
                }
                findings.push(finding);
            }
        }
        self.emit_all(findings, observation.time)
    }


    /// Observes `count` connections that each repeat `observation`, as `count` calls of
    /// [`Engine::observe_flow`] would. Once a repeat would only be counted (on an edge that
    /// exists, its deviations returned within the repeat interval), the rest are counted in one
    /// step, so a burst of repeated connections costs about one observation. That includes the
    /// connections of a `deny` flow and deviations under an exception in force.
    pub fn observe_flow_repeated(&mut self, observation: &FlowObservation, count: u64) -> Vec<Deviation> {
        let mut deviations = Vec::new();
        for observed in 0..count {
            if self.count_quiet_flow_repeats(observation, count - observed) {
                break;
            }
            deviations.extend(self.observe_flow(observation));
        }
        deviations
    }

    /// Counts `count` repeats of `observation` when each would only be counted: an edge that
    /// exists, and each deviation either returned within the repeat interval or suppressed by an
    /// exception in force. Returns false, changing nothing, otherwise.
    fn count_quiet_flow_repeats(&mut self, observation: &FlowObservation, count: u64) -> bool {
        let model = &self.model;
        let (source, destination) = resolve_flow(model, Some(&mut self.attributions), observation);
        let protocol = observation.protocol;
        let port = observation.server_addr.port();
        let source_key = (source.node.as_str(), source.zone_id());
        let destination_key = (destination.node.as_str(), destination.zone_id());
        let denied = model.matching_flow(source_key, destination_key, protocol, port, true);
        let declared = denied.is_none() && model.flow_declared(source_key, destination_key, protocol, port);
        let key = EdgeKey {
            source: source.node.clone(),
            destination: destination.node.clone(),
            protocol,
            port,
        };
        if !self.graph.has_edge(&key) {
            return false;
        }
        let (time, interval) = (observation.time, self.config.repeat_interval);
        // The findings the full path would offer, built once for the whole burst. On an edge that
        // exists, a denied flow's only finding is its failed control.
        let findings = match denied {
            Some(flow) => vec![extra::control_failed(model, &model.flows[flow], observation, &source, &destination)],
            None => flow_findings(model, observation, &source, &destination, declared),
        };
        // An exception in force only counts the suppression. One that expired takes the full path,
        // which notes it in the deviation.
        let mut suppressed = 0;
        let mut offered = Vec::with_capacity(findings.len());
        for id in findings.iter().map(Finding::id) {
            if model.exception_for(&id, time).is_some() {
                suppressed += 1;
            } else if model.expired_exception_for(&id, time).is_some() {
                return false;
            } else {
                offered.push(id);
            }
        }
        if !self.table.count_quiet_repeats(&offered, time, interval, count) {
            return false;
        }

        self.stats.deviations_suppressed += suppressed * count;
        if let Some(flow) = denied {
            if let Some(check) = self.controls.iter_mut().find(|check| check.flow == flow) {
                check.failed += count;
                check.last_failed = Some(time);
            }
            self.stats.controls_failed += count;
        }
        self.stats.flow_observations += count;
        mark_flows_seen(model, &mut self.flow_last_seen, source_key, destination_key, observation);
        self.graph.record_repeats(&key, connection_of(observation, declared), count);
        self.graph.remember(&key, observation.clone());
        self.note_time(observation.time);
        true
    }

    /// Records a connection attempt that the network refused or dropped (a reset, an ICMP error or
    /// a timeout). When a `deny` flow covers it, the control held and is counted. It raises no
    /// deviation and adds no edge, since no traffic passed.
    pub fn observe_failed_connect(&mut self, observation: &FlowObservation) {
        self.stats.failed_connect_observations += 1;
        self.note_time(observation.time);
        let (source, destination) = resolve_flow(&self.model, Some(&mut self.attributions), observation);
        let denied = self.model.matching_flow(
            (source.node.as_str(), source.zone_id()),
            (destination.node.as_str(), destination.zone_id()),
            observation.protocol,
            observation.server_addr.port(),
            true,
        );
        let Some(flow) = denied else {
            return;
        };
        self.stats.controls_held += 1;
        if let Some(check) = self.controls.iter_mut().find(|c| c.flow == flow) {
            check.held += 1;
            check.last_held = Some(observation.time);
        }
    }

    /// Raises declared-flow-unused for each allowed flow that no connection has covered for
    /// [`EngineConfig::unused_flow_window`], counting from the first time the engine saw after the
    /// model was put in force. Call it periodically with the current time; the deviation table
    /// repeats a still-unused flow at most once per repeat interval.
    pub fn tick(&mut self, now: SystemTime) -> Vec<Deviation> {
        self.note_time(now);
        let window = self.config.unused_flow_window;
        let since = self.watch_since.unwrap_or(now);
        if now.duration_since(since).unwrap_or_default() < window {
            return Vec::new();
        }
        let findings: Vec<Finding> = self
            .model
            .flows
            .iter()
            .zip(&self.flow_last_seen)
            .filter(|(flow, last_seen)| {
                !flow.deny
                    && last_seen
                        .is_none_or(|seen| now.duration_since(seen).unwrap_or_default() >= window)
            })
            .map(|(flow, last_seen)| extra::flow_unused(flow, *last_seen, window))
            .collect();
        self.emit_all(findings, now)
    }

    /// Returns how each `deny` flow has fared since the model was put in force.
    pub fn control_checks(&self) -> &[ControlCheck] {
        &self.controls
    }

    /// Returns the hop-by-hop path behind a new-attack-path deviation id.
    pub fn attack_path(&self, deviation_id: &str) -> Option<&AttackPath> {
        self.attack_paths.get(deviation_id)
    }

    fn note_time(&mut self, time: SystemTime) {
        if self.watch_since.is_none_or(|since| time < since) {
            self.watch_since = Some(time);
        }
    }

    /// Returns the graph nodes that the client and the server of `observation` resolve to, as
    /// [`Engine::observe_flow`] records them, without recording anything.
    pub fn flow_nodes(&self, observation: &FlowObservation) -> (NodeRef, NodeRef) {
        let (source, destination) = resolve_flow(&self.model, None, observation);
        (source.node_ref(), destination.node_ref())
    }

    /// Returns the graph node a process on this host resolves to: its component, or
    /// `unknown:<exe>`.
    pub fn process_node(&self, process: &Arc<ProcessInfo>) -> NodeRef {
        endpoint::local(&self.model, process, SocketAddr::from(([0, 0, 0, 0], 0))).node_ref()
    }

    pub fn graph_snapshot(&self) -> GraphSnapshot {
        self.graph.snapshot()
    }

    /// Returns the current deviation table, most severe first.
    pub fn deviations(&self) -> Vec<Deviation> {
        self.table.all()
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            deviation_evictions: self.table.evictions(),
            edge_evictions: self.graph.evictions(),
            deviations_tracked: self.table.len() as u64,
            graph_nodes: self.graph.node_count() as u64,
            graph_edges: self.graph.edge_count() as u64,
            ..self.stats.clone()
        }
    }

    fn emit_all(&mut self, findings: Vec<Finding>, time: SystemTime) -> Vec<Deviation> {
        let mut returned = Vec::new();
        for finding in findings {
            let mut deviation = finding.into_deviation(time);
            if self.model.exception_for(&deviation.id, time).is_some() {
                self.stats.deviations_suppressed += 1;
                continue;
            }
            // An expired exception no longer suppresses, but the reader should learn that one
            // existed, since renewing it may be all the deviation needs.
            if let Some(expired) = self.model.expired_exception_for(&deviation.id, time) {
                self.stats.expired_exception_matches += 1;
                deviation.summary.push_str(&format!(
                    " (the exception \"{}\" at line {} covered this until it expired on {})",
                    expired.id.text,
                    expired.line,
                    expired
                        .expires
                        .map(crate::pattern::format_date)
                        .unwrap_or_default(),
                ));
            }
            match self
                .table
                .offer(deviation, time, self.config.repeat_interval)
            {
                Offer::New(deviation) => {
                    self.stats.deviations_raised += 1;
                    returned.push(deviation);
                }
                Offer::Repeat(deviation) => {
                    self.stats.deviations_repeated += 1;
                    returned.push(deviation);
                }
                Offer::Quiet => {}
            }
        }
        returned
    }
}

/// Marks the allowed flows of `model` that cover `observation` as seen at its time.
fn mark_flows_seen(
    model: &Model,
    flow_last_seen: &mut [Option<SystemTime>],
    source: (&str, Option<&str>),
    destination: (&str, Option<&str>),
    observation: &FlowObservation,
) {
    let port = observation.server_addr.port();
    for (flow, last_seen) in model.flows.iter().zip(flow_last_seen.iter_mut()) {
        if !flow.deny && model.flow_covers(flow, source, destination, observation.protocol, port) {
            *last_seen = Some(observation.time);
        }
    }
}

/// Returns the connection that `observation` adds to its edge.
fn connection_of(observation: &FlowObservation, declared: bool) -> Connection {
    Connection {
        protocol: observation.protocol,
        port: observation.server_addr.port(),
        declared,
        time: observation.time,
        example: observation.client.as_ref().or(observation.server.as_ref()).map(|p| (p.pid, p.exe.clone())),
        remote_name: observation.remote_name.clone(),
    }
}

/// Resolves both ends of a flow to graph nodes, through `cache` when given.
fn resolve_flow<'m, 'o>(
    model: &'m Model,
    mut cache: Option<&mut endpoint::AttributionCache>,
    observation: &'o FlowObservation,
) -> (Side<'m, 'o>, Side<'m, 'o>) {
    let mut local = |process: &'o Arc<ProcessInfo>, addr: SocketAddr| {
        let attribution = match cache.as_deref_mut() {
            Some(cache) => cache.attribute(model, process),
            None => model.attribute_process(process),
        };
        endpoint::local_attributed(model, attribution, process, addr)
    };
    let source = match &observation.client {
        Some(process) => local(process, observation.client_addr),
        None => endpoint::remote_client(model, observation.client_addr),
    };
    let destination = match &observation.server {
        Some(process) => local(process, observation.server_addr),
        None => endpoint::remote_server(model, observation.server_addr, observation.protocol),
    };
    (source, destination)
}

fn exec_findings(model: &Model, observation: &ExecObservation) -> Vec<Finding> {
    let process = observation.process.as_ref();
    // Processes that match no component are reported when they use the network, not per exec.
    let side = endpoint::local(
        model,
        &observation.process,
        SocketAddr::from(([0, 0, 0, 0], 0)),
    );
    let Resolved::Component {
        component, zone, ..
    } = &side.resolved
    else {
        return Vec::new();
    };
    if component.allows_executable(&process.exe) {
        return Vec::new();
    }

    let likelihood = if component.exposed {
        Likelihood::High
    } else {
        Likelihood::Moderate
    };
    let summary = format!(
        "{} ran a program that component {} does not list among its executables ({})",
        explain::describe_source(&side),
        component.id,
        component.executable_patterns().join(", "),
    );
    vec![Finding {
        category: Category::UnexpectedExecutable,
        likelihood,
        impact: Impact::of_criticality(component.criticality),
        source: component.id.clone(),
        destination: process.exe.clone(),
        protocol: None,
        port: None,
        summary,
        resolution: explain::executables_resolution(component, &process.exe),
        evidence: Evidence {
            process: Some(process.clone()),
            peer_process: None,
            local_addr: None,
            remote_addr: None,
            source_zone: Some(zone.id.clone()),
            destination_zone: None,
            netns: 0,
            remote_name: None,
        },
    }]
}

/// Rates the damage at stake when a flow reaches `side`.
fn impact_of(side: &Side<'_, '_>) -> Impact {
    match &side.resolved {
        Resolved::Component { component, .. } => Impact::of_criticality(component.criticality),
        Resolved::Zone(zone) => Impact::of_trust(zone.trust),
        Resolved::UnknownProcess | Resolved::External(_) => Impact::Low,
    }
}

/// Flow impact: what is at stake at the destination, or, for a flow toward a less trusted zone,
/// at the source too, because what leaves a component is what that component holds.
fn flow_impact(source: &Side<'_, '_>, destination: &Side<'_, '_>) -> Impact {
    let at_destination = impact_of(destination);
    match (source.zone(), destination.zone()) {
        (Some(from), Some(to)) if to.trust < from.trust => at_destination.max(impact_of(source)),
        _ => at_destination,
    }
}

/// Flow likelihood: raised once when the source is exposed, untrusted or unidentified, and once
/// more when the flow goes toward a more trusted zone.
fn flow_likelihood(source: &Side<'_, '_>, destination: &Side<'_, '_>) -> Likelihood {
    let untrusted_source = match &source.resolved {
        Resolved::Component {
            component, zone, ..
        } => component.exposed || severity::is_untrusted(zone),
        Resolved::Zone(zone) => severity::is_untrusted(zone),
        Resolved::UnknownProcess | Resolved::External(_) => true,
    };
    let mut likelihood = Likelihood::Low;
    if untrusted_source {
        likelihood = likelihood.raised();
    }
    if let (Some(from), Some(to)) = (source.zone(), destination.zone()) {
        if to.trust > from.trust {
            likelihood = likelihood.raised();
        }
    }
    likelihood
}

fn flow_evidence(
    observation: &FlowObservation,
    source: &Side<'_, '_>,
    destination: &Side<'_, '_>,
) -> Evidence {
    let acting = observation.client.as_ref().or(observation.server.as_ref());
    let peer = if observation.client.is_some() {
        observation.server.as_ref()
    } else {
        None
    };
    Evidence {
        process: acting.map(|p| ProcessInfo::clone(p)),
        peer_process: peer.map(|p| ProcessInfo::clone(p)),
        local_addr: Some(observation.client_addr),
        remote_addr: Some(observation.server_addr),
        source_zone: source.zone_id().map(str::to_owned),
        destination_zone: destination.zone_id().map(str::to_owned),
        netns: observation.netns,
        remote_name: observation.remote_name.clone(),
    }
}

/// Keeps the ids `findings` raise for the edge `key`, unless an exception covers one of them (an
/// exception can expire between two connections, so those edges are judged in full each time).
/// Holds at most `limit` edges; past it, every edge is judged in full once more.
fn remember_judgement(
    judged: &mut FastMap<EdgeKey, JudgedEdge>,
    limit: usize,
    model: &Model,
    key: EdgeKey,
    declared: bool,
    findings: &[Finding],
    time: SystemTime,
) {
    let deviation_ids: Vec<String> = findings.iter().map(Finding::id).collect();
    let excepted = deviation_ids
        .iter()
        .any(|id| model.exception_for(id, time).is_some() || model.expired_exception_for(id, time).is_some());
    if excepted {
        judged.remove(&key);
        return;
    }
    if judged.len() >= limit && !judged.contains_key(&key) {
        judged.clear();
    }
    judged.insert(key, JudgedEdge { declared, deviation_ids });
}

fn flow_findings(
    model: &Model,
    observation: &FlowObservation,
    source: &Side<'_, '_>,
    destination: &Side<'_, '_>,
    declared: bool,
) -> Vec<Finding> {
    let protocol = observation.protocol;
    let port = observation.server_addr.port();
    let port_label = explain::port_label(protocol, port);
    let evidence = flow_evidence(observation, source, destination);
    let finding =
        |category, likelihood, impact, from: &str, to: &str, summary, resolution| Finding {
            category,
            likelihood,
            impact,
            source: from.to_owned(),
            destination: to.to_owned(),
            protocol: Some(protocol),
            port: Some(port),
            summary,
            resolution,
            evidence: evidence.clone(),
        };
    let mut findings = Vec::new();

    // A flow with an unidentified local process cannot be declared until the process has a
    // component, so unknown-component replaces unexpected-flow for it.
    if source.is_unknown_process() || destination.is_unknown_process() {
        if let (Resolved::UnknownProcess, Some(process)) = (&source.resolved, source.process) {
            let summary = format!(
                "{} matches no component and connected to {} on {port_label}",
                explain::process_label(process),
                explain::describe_destination(destination),
            );
            let (id, stub) = explain::component_stub(model, process, None, "");
            let resolution = format!(
                "{stub}flows:\n  - {{ from: {id}, to: {}, port: {port} }}\n",
                destination.node
            );
            findings.push(finding(
                Category::UnknownComponent,
                Likelihood::Moderate,
                impact_of(destination),
                &source.node,
                &destination.node,
                summary,
                resolution,
            ));
        }
        if let (Resolved::UnknownProcess, Some(process)) =
            (&destination.resolved, destination.process)
        {
            let summary = format!(
                "{} matches no component and accepted a connection from {} on {port_label}",
                explain::process_label(process),
                explain::describe_source(source),
            );
            let listens = explain::listens_line(protocol, observation.server_addr);
            let (id, stub) = explain::component_stub(model, process, None, &listens);
            let resolution = format!(
                "{stub}flows:\n  - {{ from: {}, to: {id}, port: {port} }}\n",
                source.node
            );
            findings.push(finding(
                Category::UnknownComponent,
                Likelihood::Moderate,
                impact_of(source),
                &destination.node,
                &source.node,
                summary,
                resolution,
            ));
        }
    } else if !declared {
        let likelihood = flow_likelihood(source, destination);
        let impact = flow_impact(source, destination);
        let resolution = explain::flow_resolution(source, destination, protocol, port);
        let summary = format!(
            "{} connected to {} on {port_label}; no declared {} -> {} flow allows {port_label}",
            explain::describe_source(source),
            explain::describe_destination(destination),
            source.node,
            destination.node,
        );
        findings.push(finding(
            Category::UnexpectedFlow,
            likelihood,
            impact,
            &source.node,
            &destination.node,
            summary,
            resolution.clone(),
        ));

        if let (Some(from), Some(to)) = (source.zone(), destination.zone()) {
            if from.id != to.id {
                let direction = match to.trust.cmp(&from.trust) {
                    std::cmp::Ordering::Greater => "a more trusted",
                    std::cmp::Ordering::Less => "a less trusted",
                    std::cmp::Ordering::Equal => "an equally trusted",
                };
                // A side resolved only to a zone is named by its address, because the zone
                // follows in the sentence anyway.
                let source_label = match &source.resolved {
                    Resolved::Zone(_) => source.addr.ip().to_string(),
                    _ => explain::describe_source(source),
                };
                let destination_label = match &destination.resolved {
                    Resolved::Zone(_) => destination.addr.ip().to_string(),
                    _ => explain::describe_destination(destination),
                };
                let summary = format!(
                    "{source_label} in zone {} (trust {}) connected to {destination_label} in zone {} (trust {}) on {port_label}: an undeclared flow toward {direction} zone",
                    from.id,
                    from.trust,
                    to.id,
                    to.trust,
                );
                findings.push(finding(
                    Category::TrustBoundaryCrossing,
                    likelihood,
                    impact,
                    &source.node,
                    &destination.node,
                    summary,
                    resolution,
                ));
            }
        }
    }

    for (external, other) in [(source, destination), (destination, source)] {
        let Resolved::External(ip) = external.resolved else {
            continue;
        };
        let summary = format!(
            "{} connected to {} on {port_label}, and {ip} is in no declared zone",
            explain::describe_source(source),
            explain::describe_destination(destination),
        );
        findings.push(finding(
            Category::UnattributedEndpoint,
            Likelihood::Moderate,
            other
                .component()
                .map_or(Impact::Low, |c| Impact::of_criticality(c.criticality)),
            &source.node,
            &destination.node,
            summary,
            explain::flow_resolution(source, destination, protocol, port),
        ));
    }
    findings
}

fn listen_findings(model: &Model, observation: &ListenObservation) -> Vec<Finding> {
    let process = observation.process.as_ref();
    let addr = observation.addr;
    let port_label = explain::port_label(observation.protocol, addr.port());
    let bound = addr.ip().to_canonical();
    let mut evidence = Evidence {
        process: Some(process.clone()),
        peer_process: None,
        local_addr: Some(addr),
        remote_addr: None,
        source_zone: None,
        destination_zone: None,
        netns: observation.netns,
        remote_name: None,
    };

    let side = endpoint::local(model, &observation.process, addr);
    match &side.resolved {
        Resolved::Component {
            component, zone, ..
        } => {
            if component.allows_listen(observation.protocol, addr.port(), bound) {
                return Vec::new();
            }
            evidence.source_zone = Some(zone.id.clone());
            let likelihood = if bound.is_loopback() {
                Likelihood::Low
            } else if component.exposed {
                Likelihood::High
            } else {
                Likelihood::Moderate
            };
            let summary = format!(
                "{} listens on {port_label} at {bound}; the model declares no such listener for {}",
                explain::describe_source(&side),
                component.id,
            );
            vec![Finding {
                category: Category::NewListener,
                likelihood,
                impact: Impact::of_criticality(component.criticality),
                source: component.id.clone(),
                destination: bound.to_string(),
                protocol: Some(observation.protocol),
                port: Some(addr.port()),
                summary,
                resolution: explain::listens_resolution(component, observation.protocol, addr),
                evidence,
            }]
        }
        _ => {
            let summary = format!(
                "{} matches no component and listens on {port_label} at {bound}",
                explain::process_label(process)
            );
            let listens = explain::listens_line(observation.protocol, addr);
            let (_, resolution) = explain::component_stub(model, process, None, &listens);
            let impact = if bound.is_loopback() {
                Impact::Low
            } else {
                Impact::Medium
            };
            vec![Finding {
                category: Category::UnknownComponent,
                likelihood: Likelihood::Moderate,
                impact,
                source: side.node.clone(),
                destination: bound.to_string(),
                protocol: Some(observation.protocol),
                port: Some(addr.port()),
                summary,
                resolution,
                evidence,
            }]
        }
    }
}
