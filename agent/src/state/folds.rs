//! Connections the kernel folded, counted on the edges of the flows they repeat.
//!
//! The kernel reports the first connection of a TCP flow in each fold epoch and only counts the
//! flow's later ones (see `fold.rs` in the kernel crate). This table keeps, for each flow, the
//! observation its last reported connection became, with the processes of both ends as the join
//! found them. A count from the kernel repeats that observation.
//!
//! A count is held for the join and accept windows before it is applied, so that the reported
//! connection it follows has left the join and set the flow's observation.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use driftwatch_model::observation::FlowObservation;
use driftwatch_model::FastMap as HashMap;

use crate::state::sockets::JoinedFlow;
use crate::telemetry::event::{FoldEvent, FoldedFlow};

/// Counters of the folded connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FoldStats {
    /// Flow counts read from the kernel.
    pub counts: u64,
    /// Folded connections counted on an edge.
    pub connections: u64,
    /// Folded connection attempts that failed.
    pub failed: u64,
    /// Folded connections closed, and their payload bytes.
    pub closes: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Folded connections of a flow with no reported connection on record, attributed from the
    /// flow's own process or listener instead.
    pub without_flow: u64,
    /// Flows forgotten because the table was full.
    pub flows_evicted: u64,
}

/// The last observation of each folded flow, and the counts waiting to be applied.
pub struct Folds {
    hold: Duration,
    /// False until [`Folds::enable`]: without a kernel that folds, nothing is remembered.
    enabled: bool,
    flows: FlowTable,
    /// The last failed attempt of each outgoing flow, which its folded failures repeat.
    failed: FlowTable,
    held: VecDeque<(Instant, FoldEvent)>,
    pub stats: FoldStats,
}

/// Observations by flow, at most `max`; the flow remembered first goes first.
struct FlowTable {
    max: usize,
    observations: HashMap<FoldedFlow, FlowObservation>,
    order: VecDeque<FoldedFlow>,
}

impl FlowTable {
    fn new(max: usize) -> Self {
        FlowTable { max, observations: HashMap::default(), order: VecDeque::new() }
    }

    /// Inserts or replaces the observation of `key`. Returns true when another flow was forgotten
    /// to make room; its next counts fall back to its own process until its next reported
    /// connection.
    fn insert(&mut self, key: FoldedFlow, observation: FlowObservation) -> bool {
        if self.observations.insert(key, observation).is_some() {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() <= self.max {
            return false;
        }
        if let Some(oldest) = self.order.pop_front() {
            self.observations.remove(&oldest);
        }
        true
    }

    fn get(&self, key: &FoldedFlow) -> Option<&FlowObservation> {
        self.observations.get(key)
    }
}

impl Folds {
    /// `hold` is how long a count waits before it is applied; `max_flows` bounds the flows
    /// remembered.
    pub fn new(hold: Duration, max_flows: usize) -> Self {
        Folds {
            hold,
            enabled: false,
            flows: FlowTable::new(max_flows),
            failed: FlowTable::new(max_flows),
            held: VecDeque::new(),
            stats: FoldStats::default(),
        }
    }

    /// Remembers flows from now on, for a kernel that folds repeated connections.
    pub fn enable(&mut self) {
        self.enabled = true;
    }

    /// Remembers `observation`, which `flow` became, for the kernel flows of its two ends.
    pub fn remember(&mut self, flow: &JoinedFlow, observation: &FlowObservation) {
        if !self.enabled {
            return;
        }
        if let Some(client) = &flow.client {
            let key = FoldedFlow::Out { netns: client.netns, pid: client.pid, server: flow.server_addr };
            self.stats.flows_evicted += u64::from(self.flows.insert(key, observation.clone()));
        }
        if let Some(server) = &flow.server {
            // The kernel folds the accepting end on its own only when the connecting end is not a
            // process it reports, so the flow's count then has no client process.
            let key = FoldedFlow::In { netns: server.netns, server: flow.server_addr, client: flow.client_addr.ip() };
            let repeated = FlowObservation { client: None, netns: server.netns, ..observation.clone() };
            self.stats.flows_evicted += u64::from(self.flows.insert(key, repeated));
        }
    }

    /// Remembers a failed connection attempt by `pid`, which the flow's folded failures repeat.
    pub fn remember_failed(&mut self, pid: u32, netns: u32, observation: &FlowObservation) {
        if !self.enabled {
            return;
        }
        let key = FoldedFlow::Out { netns, pid, server: observation.server_addr };
        self.stats.flows_evicted += u64::from(self.failed.insert(key, observation.clone()));
    }

    /// Queues a count from the kernel that arrived at `now`.
    pub fn hold(&mut self, fold: FoldEvent, now: Instant) {
        self.stats.counts += 1;
        self.stats.closes += fold.closes;
        self.stats.bytes_sent += fold.bytes_sent;
        self.stats.bytes_received += fold.bytes_received;
        self.held.push_back((now + self.hold, fold));
    }

    /// When the oldest held count is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.held.front().map(|(deadline, _)| *deadline)
    }

    /// Takes the held counts due at `now`, oldest first.
    pub fn take_due(&mut self, now: Instant) -> Vec<FoldEvent> {
        let due = self.held.iter().take_while(|(deadline, _)| *deadline <= now).count();
        self.held.drain(..due).map(|(_, fold)| fold).collect()
    }

    /// Takes every held count.
    pub fn take_all(&mut self) -> Vec<FoldEvent> {
        self.held.drain(..).map(|(_, fold)| fold).collect()
    }

    /// Returns the observation of the flow's last reported connection.
    pub fn observation(&self, flow: &FoldedFlow) -> Option<&FlowObservation> {
        self.flows.get(flow)
    }

    /// Returns the observation of the flow's last reported failed attempt.
    pub fn failed_observation(&self, flow: &FoldedFlow) -> Option<&FlowObservation> {
        self.failed.get(flow)
    }
}


/// Connections and failed attempts a count adds to its flow's edge: completed handshakes of an
/// outgoing flow, accepted connections of an incoming one.
pub fn repeats(fold: &FoldEvent) -> (u64, u64) {
    match fold.flow {
        // A connect taken back was reported with its accepting end.
        FoldedFlow::Out { .. } => (fold.established.saturating_sub(fold.taken_back), fold.failed),
        // A connection taken back in a later read than its count stays counted.
        FoldedFlow::In { .. } => (fold.connects.saturating_sub(fold.taken_back), 0),
    }
}

#[cfg(test)]
#[path = "folds_tests.rs"]
mod tests;
