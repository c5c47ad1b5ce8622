//! The collector: receives every agent's push stream, stores and re-sequences their deviations,
//! merges their graphs, and serves `AgentService` for the whole fleet.
//!
//! All nodes' deviations go through one lock, in which each is checked against its node's cursor
//! (dropped when already stored), written to the journal, and only then published and
//! acknowledged. A restarted collector reads the journal back, so it continues its own sequence,
//! replays its history to clients and sends each agent the sequence to resume after.
//!
//! The collector may hold the fleet's model (the YAML the agents load). It uses the model only to
//! judge the edges that no single agent could: a flow from a process on one node to a listener on
//! another, which the merge rewrites to end at the listener's component. The agents still raise
//! every deviation; the collector raises none, so none arrives twice.

pub mod journal;
pub mod metrics;
pub mod server;
mod service;
mod web;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use driftwatch_model::deviation::Deviation;
use driftwatch_model::fleet::{self, HostGraph, MergeStats};
use driftwatch_model::graph::{EdgeKey, GraphSnapshot};
use driftwatch_model::Model;
use tonic::Status;

use crate::api::hub::{DeviationHub, Entry, EntryItem, HubConfig, NodeGap};
use crate::api::server::AgentView;
use crate::api::status::{ModelInfo, NodeStatus, StatusSnapshot};
use journal::{Cursor, Journal, JournalError};
use metrics::LagHistograms;

pub use server::serve_collector;

/// Settings of a [`Collector`].
#[derive(Debug, Clone)]
pub struct CollectorConfig {
    /// Directory of the journal. `None` keeps everything in memory, so a restart loses it.
    pub data_dir: Option<PathBuf>,
    pub hub: HubConfig,
    /// The fleet's model, which judges edges between nodes; see the module documentation.
    pub model: Option<FleetModel>,
}

/// The model the collector judges cross-node edges with, and what its status reports of it.
#[derive(Debug, Clone)]
pub struct FleetModel {
    pub model: Model,
    pub info: ModelInfo,
}

/// The push stream a node has open.
#[derive(Debug, Clone, Copy)]
struct OpenStream {
    id: u64,
    /// Run id of the agent process on the other end.
    run_id: u64,
}

/// The collector's state of one node.
#[derive(Debug, Default)]
struct NodeState {
    cursor: Cursor,
    /// The open push stream, if any. A stream from the same run replaces it; a stream from
    /// another run is rejected while it is open.
    stream: Option<OpenStream>,
    duplicates: u64,
    /// Streams rejected because another agent process held this node's name.
    rejected_streams: u64,
    connected_at: Option<SystemTime>,
    version: String,
    snapshot: Option<HostGraph>,
    /// Deviations the agent had published but the collector had not acknowledged, as the agent
    /// reported with its latest snapshot.
    unacknowledged: u64,
}

struct Inner {
    journal: Option<Journal>,
    nodes: BTreeMap<String, NodeState>,
    next_stream: u64,
    journal_errors: u64,
    invalid_deviations: u64,
}

/// The collector's state; see the module documentation.
pub struct Collector {
    hub: Arc<DeviationHub>,
    inner: Mutex<Inner>,
    started_at: SystemTime,
    /// Lines after which the journal is rewritten; twice the history keeps rewrites rare.
    compact_after: usize,
    model: Option<FleetModel>,
    lag: LagHistograms,
}

/// Identity of a push stream, from [`Collector::open_stream`].
#[derive(Debug, Clone)]
pub struct StreamId {
    pub node: Arc<str>,
    id: u64,
    run_id: u64,
}

impl Collector {
    /// Creates the collector, reading the journal in `config.data_dir` when there is one.
    ///
    /// # Errors
    ///
    /// When the journal cannot be created or read.
    pub fn open(config: CollectorConfig) -> Result<Collector, JournalError> {
        let capacity = config.hub.history_capacity.max(1);
        let (journal, hub, nodes) = match &config.data_dir {
            Some(dir) => {
                let (journal, recovered) = Journal::open(dir, capacity)?;
                tracing::info!(
                    journal = %journal.path().display(),
                    next_sequence = recovered.next_sequence,
                    retained = recovered.entries.len(),
                    nodes = recovered.cursors.len(),
                    "journal read"
                );
                let hub = DeviationHub::restore(config.hub, "", recovered.next_sequence, recovered.entries);
                let nodes = recovered
                    .cursors
                    .into_iter()
                    .map(|(name, cursor)| (name, NodeState { cursor, ..NodeState::default() }))
                    .collect();
                (Some(journal), hub, nodes)
            }
            None => (None, DeviationHub::new(config.hub), BTreeMap::new()),
        };
        Ok(Collector {
            hub: Arc::new(hub),
            inner: Mutex::new(Inner {
                journal,
                nodes,
                next_stream: 1,
                journal_errors: 0,
                invalid_deviations: 0,
            }),
            started_at: SystemTime::now(),
            compact_after: capacity.saturating_mul(2).max(1024),
            model: config.model,
            lag: LagHistograms::default(),
        })
    }

    pub fn hub(&self) -> &Arc<DeviationHub> {
        &self.hub
    }

    /// Registers a push stream for `node` and returns it with the agent sequence the agent resumes
    /// after. A stream from a new run of the agent starts at 0. A second stream from the same run
    /// (a reconnect after the first connection was cut) replaces the first, which ends at its next
    /// message.
    ///
    /// # Errors
    ///
    /// INVALID_ARGUMENT for an empty node name; ALREADY_EXISTS while another run of the node has
    /// a stream open, which means two agents share one `--node`; UNAVAILABLE when the journal
    /// cannot record a new run.
    pub fn open_stream(&self, node: &str, run_id: u64, version: &str) -> Result<(StreamId, u64), Status> {
        if node.is_empty() {
            return Err(Status::invalid_argument(
                "hello.node is empty; start the agent with --node NAME",
            ));
        }
        let mut inner = self.lock();
        let id = inner.next_stream;
        inner.next_stream += 1;
        let Inner { journal, nodes, .. } = &mut *inner;
        let state = nodes.entry(node.to_owned()).or_default();
        if let Some(open) = state.stream.filter(|open| open.run_id != run_id) {
            state.rejected_streams += 1;
            tracing::error!(
                node,
                open_run = open.run_id,
                rejected_run = run_id,
                "rejected a push stream: another agent process already pushes as this node; give each agent a unique --node"
            );
            return Err(Status::already_exists(format!(
                "node {node} already has an open push stream from agent run {}, so this stream from run {run_id} is rejected; \
                 two agents share the node name: give each agent a unique --node",
                open.run_id
            )));
        }
        if state.cursor.run_id != run_id {
            if state.cursor.run_id != 0 {
                tracing::info!(node, previous_run = state.cursor.run_id, run_id, "node restarted; its sequence starts again at 1");
            }
            state.cursor.run_id = run_id;
            state.cursor.acknowledged = 0;
            if let Some(journal) = journal {
                journal
                    .append_cursor(node, state.cursor)
                    .map_err(|err| Status::unavailable(format!("failed to write the journal: {err}")))?;
            }
        }
        if state.stream.is_some() {
            tracing::warn!(node, run_id, "a reconnect from the same agent run replaces its open push stream");
        }
        state.stream = Some(OpenStream { id, run_id });
        state.connected_at = Some(SystemTime::now());
        state.version = version.to_owned();
        let resume = state.cursor.acknowledged;
        tracing::info!(node, run_id, resume_after = resume, "node connected");
        let stream = StreamId {
            node: Arc::from(node),
            id,
            run_id,
        };
        Ok((stream, resume))
    }

    /// Stores a deviation with the agent sequence `sequence` unless it is already stored, and
    /// returns the node's acknowledged sequence.
    ///
    /// # Errors
    ///
    /// ABORTED when a newer stream replaced this one; UNAVAILABLE when the journal write fails,
    /// in which case nothing is acknowledged and the agent sends the deviation again.
    pub fn accept_deviation(&self, stream: &StreamId, sequence: u64, deviation: Deviation) -> Result<u64, Status> {
        let mut inner = self.lock();
        let acknowledged = current(&inner, stream)?.cursor.acknowledged;
        if sequence <= acknowledged {
            inner.nodes.get_mut(&*stream.node).map(|state| state.duplicates += 1);
            return Ok(acknowledged);
        }
        if sequence > acknowledged + 1 {
            // The agent skipped sequences without a gap message; record them as lost all the same.
            self.store_gap(&mut inner, stream, acknowledged + 1, sequence - 1)?;
        }
        let raised_at = deviation.last_seen;
        let entry = Entry {
            sequence: self.hub.next_sequence(),
            published_at: SystemTime::now(),
            item: EntryItem::Deviation {
                node: Arc::clone(&stream.node),
                deviation: Arc::new(deviation),
            },
        };
        let stored_at = entry.published_at;
        self.store(&mut inner, stream, entry, sequence)?;
        let state = node_mut(&mut inner, stream);
        state.cursor.received += 1;
        self.lag.observe(&stream.node, raised_at, stored_at);
        Ok(sequence)
    }

    /// Stores a gap the agent reported, from past the acknowledged sequence to `last`, and returns
    /// the node's acknowledged sequence.
    ///
    /// # Errors
    ///
    /// As [`Collector::accept_deviation`].
    pub fn accept_gap(&self, stream: &StreamId, first: u64, last: u64) -> Result<u64, Status> {
        let mut inner = self.lock();
        let acknowledged = current(&inner, stream)?.cursor.acknowledged;
        if last <= acknowledged {
            return Ok(acknowledged);
        }
        self.store_gap(&mut inner, stream, first.max(acknowledged + 1), last)?;
        Ok(last)
    }

    /// Records a deviation that failed to convert as lost, so the gap is visible.
    pub fn reject_invalid(&self, stream: &StreamId, sequence: u64) -> Result<u64, Status> {
        self.lock().invalid_deviations += 1;
        self.accept_gap(stream, sequence, sequence)
    }

    fn store_gap(&self, inner: &mut Inner, stream: &StreamId, first: u64, last: u64) -> Result<(), Status> {
        let gap = NodeGap {
            node: Arc::clone(&stream.node),
            first_sequence: first,
            last_sequence: last,
        };
        tracing::error!(node = %stream.node, first_sequence = first, last_sequence = last, missed = gap.missed(), "node lost deviations before pushing them");
        let missed = gap.missed();
        let entry = Entry {
            sequence: self.hub.next_sequence(),
            published_at: SystemTime::now(),
            item: EntryItem::NodeGap(gap),
        };
        self.store(inner, stream, entry, last)?;
        node_mut(inner, stream).cursor.lost += missed;
        Ok(())
    }

    /// Journals `entry`, publishes it, and moves the node's cursor to `agent_sequence`.
    fn store(&self, inner: &mut Inner, stream: &StreamId, entry: Entry, agent_sequence: u64) -> Result<(), Status> {
        if let Some(journal) = &mut inner.journal {
            if let Err(error) = journal.append_entry(&entry, stream.run_id, agent_sequence) {
                inner.journal_errors += 1;
                tracing::error!(%error, node = %stream.node, "failed to write the journal; the deviation is not acknowledged");
                return Err(Status::unavailable(format!("the collector failed to write its journal: {error}")));
            }
        }
        let sequence = match entry.item {
            EntryItem::Deviation { node, deviation } => {
                self.hub.publish_from(node, Deviation::clone(&deviation), entry.published_at)
            }
            EntryItem::NodeGap(gap) => self.hub.publish_node_gap(gap, entry.published_at),
        };
        debug_assert_eq!(sequence, entry.sequence, "the hub is published only under the collector lock");
        node_mut(inner, stream).cursor.acknowledged = agent_sequence;
        self.compact_if_due(inner);
        Ok(())
    }

    fn compact_if_due(&self, inner: &mut Inner) {
        let Some(journal) = &mut inner.journal else { return };
        if journal.lines_since_compaction() < self.compact_after {
            return;
        }
        let cursors: BTreeMap<String, Cursor> = inner
            .nodes
            .iter()
            .map(|(name, state)| (name.clone(), state.cursor))
            .collect();
        if let Err(error) = journal.compact(self.hub.next_sequence(), &cursors, &self.hub.retained()) {
            inner.journal_errors += 1;
            // Appending goes on to the old file, which still contains everything.
            tracing::error!(%error, "failed to rewrite the journal; it keeps growing until a rewrite succeeds");
        }
    }

    /// Replaces the node's graph and endpoints, and the backlog the agent reported with them.
    pub fn accept_snapshot(&self, stream: &StreamId, snapshot: HostGraph, unacknowledged: u64) -> Result<(), Status> {
        let mut inner = self.lock();
        current(&inner, stream)?;
        let state = node_mut(&mut inner, stream);
        state.snapshot = Some(snapshot);
        state.unacknowledged = unacknowledged;
        Ok(())
    }

    /// Marks the stream closed, unless a newer one replaced it.
    pub fn close_stream(&self, stream: &StreamId) {
        let mut inner = self.lock();
        if let Some(state) = inner.nodes.get_mut(&*stream.node) {
            if state.stream.is_some_and(|open| open.id == stream.id) {
                state.stream = None;
                tracing::info!(node = %stream.node, acknowledged = state.cursor.acknowledged, "node disconnected");
            }
        }
    }

    /// Returns the merged graph of every node's latest snapshot and what the merge resolved.
    ///
    /// An edge whose destination the merge rewrote is declared when the fleet's model allows it;
    /// without a model every such edge is undeclared.
    pub fn merged_graph(&self) -> (GraphSnapshot, MergeStats) {
        let hosts: Vec<HostGraph> = self
            .lock()
            .nodes
            .values()
            .filter_map(|state| state.snapshot.clone())
            .collect();
        let Some(fleet_model) = &self.model else {
            return fleet::merge(&hosts, |_| false);
        };
        // The agents resolved every graph node to its zone, so the zones come from their graphs.
        let zones: HashMap<&str, Option<&str>> = hosts
            .iter()
            .flat_map(|host| host.graph.nodes.iter())
            .map(|node| (node.id.as_str(), node.zone.as_deref()))
            .collect();
        let zone_of = |id: &str| zones.get(id).copied().flatten();
        let declared = |key: &EdgeKey| {
            let source = (key.source.as_str(), zone_of(&key.source));
            let destination = (key.destination.as_str(), zone_of(&key.destination));
            fleet_model.model.flow_declared(source, destination, key.protocol, key.port)
        };
        fleet::merge(&hosts, declared)
    }

    /// Returns the fleet's model, when the collector was given one.
    pub fn model(&self) -> Option<&Model> {
        self.model.as_ref().map(|fleet_model| &fleet_model.model)
    }

    /// Returns, for every graph node with processes, the names of the fleet nodes whose latest
    /// snapshot has processes behind it. Every agent's graph contains every declared component,
    /// so a component with no process on a node does not name that node.
    pub fn hosts_by_graph_node(&self) -> BTreeMap<String, Vec<String>> {
        let inner = self.lock();
        let mut hosts: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, state) in &inner.nodes {
            let Some(snapshot) = &state.snapshot else { continue };
            for node in snapshot.graph.nodes.iter().filter(|node| !node.processes.is_empty()) {
                hosts.entry(node.id.clone()).or_default().push(name.clone());
            }
        }
        hosts
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn current<'a>(inner: &'a Inner, stream: &StreamId) -> Result<&'a NodeState, Status> {
    match inner.nodes.get(&*stream.node) {
        Some(state) if state.stream.is_some_and(|open| open.id == stream.id) => Ok(state),
        _ => Err(Status::aborted(format!(
            "a newer push stream for node {} replaced this one",
            stream.node
        ))),
    }
}

fn node_mut<'a>(inner: &'a mut Inner, stream: &StreamId) -> &'a mut NodeState {
    inner.nodes.entry(stream.node.to_string()).or_default()
}

impl AgentView for Collector {
    fn graph(&self) -> GraphSnapshot {
        self.merged_graph().0
    }

    fn status(&self) -> StatusSnapshot {
        let (_, merge) = self.merged_graph();
        let inner = self.lock();
        let sum = |field: fn(&NodeState) -> u64| inner.nodes.values().map(field).sum::<u64>();
        let counters = [
            ("collector_nodes", inner.nodes.len() as u64),
            ("collector_nodes_connected", sum(|n| u64::from(n.stream.is_some()))),
            ("collector_received", sum(|n| n.cursor.received)),
            ("collector_duplicates", sum(|n| n.duplicates)),
            ("collector_streams_rejected", sum(|n| n.rejected_streams)),
            ("collector_lost", sum(|n| n.cursor.lost)),
            ("collector_invalid_deviations", inner.invalid_deviations),
            ("collector_journal_errors", inner.journal_errors),
            ("collector_merge_resolved", merge.resolved),
            ("collector_merge_deduplicated", merge.deduplicated),
        ];
        StatusSnapshot {
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: self.started_at,
            hooks: Vec::new(),
            counters: counters.into_iter().map(|(name, value)| (name.to_string(), value)).collect(),
            model: self.model.as_ref().map(|fleet_model| fleet_model.info.clone()),
        }
    }

    fn nodes(&self) -> Vec<NodeStatus> {
        self.lock()
            .nodes
            .iter()
            .map(|(name, state)| NodeStatus {
                name: name.clone(),
                connected: state.stream.is_some(),
                acknowledged_sequence: state.cursor.acknowledged,
                received: state.cursor.received,
                duplicates: state.duplicates,
                lost: state.cursor.lost,
                connected_at: state.connected_at,
                version: state.version.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod stream_tests;
