//! The pipeline: kernel events in, deviations out.
//!
//! One task owns the process table and the socket state, turns events into observations for the
//! model engine and publishes what the engine raises. It is the only writer of that state, so
//! nothing in it needs a lock. The engine sits behind a mutex because the API reads its graph.
//!
//! Processes in containers carry the container's identity from a [`LabelTracker`]. An observation
//! whose processes wait for a label lookup is held (see [`crate::labels::HoldQueue`]) and evaluated
//! when the lookup returns, so a container's first connection is attributed by its labels.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use driftwatch_model::deviation::{Category, Deviation, Evidence, Severity, Stride};
use driftwatch_model::Engine;
use driftwatch_model::observation::{ExecObservation, FlowObservation, ListenObservation, ProcessInfo, Protocol};
use driftwatch_model::Model;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::api::hub::DeviationHub;
use crate::events::{EventBuilder, EventHub, EventKind};
use crate::labels::{HoldQueue, HoldStats, LabelReply, LabelRequest, LabelStats, LabelTracker, TrackerConfig};
use crate::dns::{DnsConfig, DnsNames, DnsSocket, DnsStats};
use crate::fleet::endpoints::{EndpointTable, PeerConnection};
use driftwatch_model::fleet::PeerRole;
use crate::state::folds::{repeats, FoldStats, Folds};
use crate::state::process::{ProcessTable, ProcessTableConfig, ProcessTableStats};
use crate::state::seed::{SeededSocket, SeededState};
use crate::state::sockets::{JoinedFlow, Listener, SocketState, SocketStats};
use crate::state::udp_local::{LocalUdp, LocalUdpStats};
use crate::state::udp_reply::{is_udp_reply, EphemeralPorts, ReceivedPeers};
use crate::telemetry::event::{AcceptEvent, DnsEvent, Event, FoldEvent, FoldedFlow, TcpEvent, TcpEventKind, UdpEvent, UdpEventKind};

/// Bounds and timing of the pipeline.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub processes: ProcessTableConfig,
    /// How long one end of a connection waits for the other end on this host.
    pub join_window: Duration,
    pub max_pending_connections: usize,
    pub max_listeners: usize,
    /// How long an accepted connection waits for the `accept` event that names the process that
    /// took it, when the kernel reports acceptors. A worker that accepts later than this is not
    /// named: the connection keeps the listener's owner.
    pub accept_window: Duration,
    /// How often kernel loss counters are checked for a telemetry gap.
    pub loss_check_interval: Duration,
    /// The container label cache.
    pub labels: TrackerConfig,
    /// How long an observation waits for the labels of its processes' containers. Longer than
    /// the lookup timeout, so that a lookup that times out still releases it.
    pub label_hold: Duration,
    /// Observations held at most; beyond it the oldest is evaluated without waiting.
    pub max_held: usize,
    pub dns: DnsConfig,
    /// The kernel's ephemeral port range, which separates a UDP server's reply from a client's
    /// datagram. The agent reads it from the host with [`EphemeralPorts::read_or_default`].
    pub ephemeral_ports: EphemeralPorts,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            processes: ProcessTableConfig::default(),
            join_window: Duration::from_millis(50),
            max_pending_connections: 65_536,
            max_listeners: 16_384,
            accept_window: Duration::from_millis(250),
            loss_check_interval: Duration::from_secs(1),
            labels: TrackerConfig::default(),
            label_hold: Duration::from_secs(3),
            max_held: 4096,
            dns: DnsConfig::default(),
            ephemeral_ports: EphemeralPorts::LINUX_DEFAULT,
        }
    }
}

/// Counters of the pipeline, for the status call.
#[derive(Debug, Clone, Default)]
pub struct PipelineStats {
    pub events: u64,
    pub execs: u64,
    pub forks: u64,
    pub exits: u64,
    pub tcp_events: u64,
    pub accepts: u64,
    pub credential_changes: u64,
    pub connect_failures: u64,
    /// New UDP flows (first datagrams sent or read, and UDP connects) reported by the kernel.
    pub udp_flows: u64,
    /// UDP flows whose first datagram was a server's reply, observed as flows from the client.
    pub udp_replies: u64,
    /// UDP flows reported by the receiving process.
    pub udp_receives: u64,
    /// Received datagrams that were replies to the receiving process's request, whose own send
    /// already reported the flow.
    pub udp_replies_read: u64,
    /// Server replies to a peer whose datagram the server's receive already reported.
    pub udp_replies_already_received: u64,
    /// UDP sockets bound to a port their process chose: UDP listeners.
    pub udp_binds: u64,
    pub flows: u64,
    /// Flows neither of whose ends the process table knew.
    pub flows_without_process: u64,
    /// Listen events from a process the table did not know.
    pub listens_without_process: u64,
    pub deviations_published: u64,
    /// Records lost before they reached the pipeline, as last reported by telemetry.
    pub lost_records: u64,
    pub processes: ProcessTableStats,
    pub sockets: SocketStats,
    pub labels: LabelStats,
    pub held: HoldStats,
    /// Process entries that took a container identity with new labels after a lookup returned.
    pub processes_relabeled: u64,
    pub dns: DnsStats,
    pub local_udp: LocalUdpStats,
    pub folds: FoldStats,
}

impl PipelineStats {
    /// Lists the counters as (name, value) for the status call.
    pub fn named(&self) -> Vec<(String, u64)> {
        let process = &self.processes;
        let sockets = &self.sockets;
        let labels = &self.labels;
        let held = &self.held;
        [
            ("pipeline_events", self.events),
            ("pipeline_execs", self.execs),
            ("pipeline_forks", self.forks),
            ("pipeline_exits", self.exits),
            ("pipeline_tcp_events", self.tcp_events),
            ("pipeline_accepts", self.accepts),
            ("pipeline_credential_changes", self.credential_changes),
            ("pipeline_connect_failures", self.connect_failures),
            ("pipeline_udp_flows", self.udp_flows),
            ("pipeline_udp_replies", self.udp_replies),
            ("pipeline_udp_receives", self.udp_receives),
            ("pipeline_udp_replies_read", self.udp_replies_read),
            ("pipeline_udp_replies_already_received", self.udp_replies_already_received),
            ("pipeline_udp_binds", self.udp_binds),
            ("pipeline_udp_listeners", self.local_udp.listeners),
            ("pipeline_udp_listeners_dropped", self.local_udp.listeners_dropped),
            ("pipeline_udp_flows_joined", self.local_udp.joined),
            ("pipeline_udp_server_ends_joined", self.local_udp.server_ends_joined),
            ("pipeline_udp_listeners_ambiguous", self.local_udp.ambiguous),
            ("pipeline_flows", self.flows),
            ("pipeline_flows_without_process", self.flows_without_process),
            ("pipeline_listens_without_process", self.listens_without_process),
            ("pipeline_deviations_published", self.deviations_published),
            ("pipeline_lost_records", self.lost_records),
            ("processes_live", process.live),
            ("processes_exited_retained", process.exited),
            ("processes_seeded", process.seeded),
            ("processes_evicted", process.evicted),
            ("processes_exec_without_fork", process.exec_without_fork),
            ("processes_cgroup_moves", process.cgroup_moves),
            ("processes_read_from_proc", process.read_from_proc),
            ("processes_reused_pids", process.reused_pids),
            ("processes_proc_read_failures", process.proc_read_failures),
            ("processes_vanished", process.vanished),
            ("sockets_listeners", sockets.listeners),
            ("sockets_pending", sockets.pending),
            ("sockets_joined", sockets.joined),
            ("sockets_unjoined", sockets.unjoined),
            ("sockets_pending_overflow", sockets.pending_overflow),
            ("sockets_accepted_without_listener", sockets.accepted_without_listener),
            ("sockets_listeners_dropped", sockets.listeners_dropped),
            ("labels_requests", labels.requests),
            ("labels_requests_dropped", labels.requests_dropped),
            ("labels_found", labels.found),
            ("labels_not_found", labels.not_found),
            ("labels_lookup_failures", labels.failures),
            ("labels_no_source", labels.no_source),
            ("labels_cache_entries", labels.entries),
            ("labels_cache_evicted", labels.evicted),
            ("labels_in_flight", labels.in_flight),
            ("labels_processes_relabeled", self.processes_relabeled),
            ("labels_held", held.held),
            ("labels_held_waiting", held.waiting),
            ("labels_held_released", held.released),
            ("labels_held_expired", held.expired),
            ("labels_held_overflow", held.overflow),
            ("dns_messages", self.dns.messages),
            ("dns_parse_errors", self.dns.parse_errors),
            ("dns_unmatched", self.dns.unmatched),
            ("dns_cut", self.dns.cut),
            ("dns_names_learned", self.dns.names_learned),
            ("dns_sockets_evicted", self.dns.sockets_evicted),
            ("dns_names_cached", self.dns.cache.entries),
            ("dns_names_evicted", self.dns.cache.evicted),
            ("dns_names_expired", self.dns.cache.expired),
            ("sockets_accepts_by_acceptor", sockets.accepts_by_acceptor),
            ("sockets_accepts_by_listener_owner", sockets.accepts_by_listener_owner),
            ("sockets_late_accepts", sockets.late_accepts),
            ("folds_counts", self.folds.counts),
            ("folds_connections", self.folds.connections),
            ("folds_failed", self.folds.failed),
            ("folds_closes", self.folds.closes),
            ("folds_bytes_sent", self.folds.bytes_sent),
            ("folds_bytes_received", self.folds.bytes_received),
            ("folds_without_flow", self.folds.without_flow),
            ("folds_flows_evicted", self.folds.flows_evicted),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect()
    }
}

/// Result of [`Pipeline::seed_from_proc`]: what existed before the agent started.
#[derive(Debug, Clone, Default)]
pub struct Seeded {
    /// Processes added to the process table.
    pub processes: usize,
    /// Listening sockets in scope, with their owners.
    pub listeners: Vec<SeededSocket>,
    /// Established connection ends added to the join.
    pub connections: usize,
    /// Established connections in scope, with their owners.
    pub established: Vec<SeededSocket>,
    /// UDP listeners in scope, with their owners.
    pub udp_listeners: usize,
}

/// True when the cgroup path `cgroup` is `scope` or a cgroup below it.
fn cgroup_within(cgroup: &str, scope: &str) -> bool {
    let scope = scope.trim_end_matches('/');
    scope.is_empty() || cgroup == scope || cgroup.strip_prefix(scope).is_some_and(|rest| rest.starts_with('/'))
}

/// State the pipeline shares with the API.
pub struct Shared {
    pub engine: Mutex<Engine>,
    pub stats: Mutex<PipelineStats>,
}

/// Converts kernel monotonic timestamps (`bpf_ktime_get_ns`) to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct KernelClock {
    boot_wall: SystemTime,
}

impl KernelClock {
    /// Measures the offset between CLOCK_MONOTONIC and the wall clock now.
    pub fn new() -> Self {
        let monotonic = Duration::from_nanos(crate::telemetry::event::kernel_now_ns());
        KernelClock { boot_wall: SystemTime::now() - monotonic }
    }

    pub fn to_system(self, ktime_ns: u64) -> SystemTime {
        self.boot_wall + Duration::from_nanos(ktime_ns)
    }
}

impl Default for KernelClock {
    fn default() -> Self {
        Self::new()
    }
}

/// A request to the pipeline task from elsewhere in the agent.
#[derive(Debug)]
pub enum PipelineCommand {
    /// Put a validated model in force, judge what was observed against it, and reply with the
    /// number of deviations that raised.
    ReplaceModel { model: Box<Model>, reply: oneshot::Sender<usize> },
}

/// Resolves a cgroup id from a kernel record to its cgroup v2 path.
pub type CgroupResolver = Box<dyn FnMut(u64) -> String + Send>;

/// Reports the total of records lost so far between the kernel and the pipeline.
pub type LossCounter = Box<dyn Fn() -> u64 + Send>;

/// An observation that may wait for container labels before it reaches the engine.
#[derive(Clone)]
enum Observation {
    Exec(ExecObservation),
    Listen(ListenObservation),
    Flow(FlowObservation),
    /// A connection attempt that failed, which proves a `deny` flow held.
    FailedConnect(FlowObservation),
}

impl Observation {
    fn processes(&self) -> [Option<&Arc<ProcessInfo>>; 2] {
        match self {
            Observation::Exec(exec) => [Some(&exec.process), None],
            Observation::Listen(listen) => [Some(&listen.process), None],
            Observation::Flow(flow) | Observation::FailedConnect(flow) => [flow.client.as_ref(), flow.server.as_ref()],
        }
    }

    fn processes_mut(&mut self) -> [Option<&mut Arc<ProcessInfo>>; 2] {
        match self {
            Observation::Exec(exec) => [Some(&mut exec.process), None],
            Observation::Listen(listen) => [Some(&mut listen.process), None],
            Observation::Flow(flow) | Observation::FailedConnect(flow) => [flow.client.as_mut(), flow.server.as_mut()],
        }
    }
}

/// The pipeline task's state.
pub struct Pipeline {
    config: PipelineConfig,
    processes: ProcessTable,
    sockets: SocketState,
    /// Connections the kernel counted instead of reporting, and the flows they repeat.
    folds: Folds,
    /// Peers of the UDP datagrams processes read, so that a server's replies add no flow.
    received_peers: ReceivedPeers,
    /// UDP listeners in scope, so that a flow between two processes in scope is one edge.
    local_udp: LocalUdp,
    labels: LabelTracker,
    label_replies: Option<mpsc::Receiver<LabelReply>>,
    held: HoldQueue<Observation>,
    dns: DnsNames,
    clock: KernelClock,
    resolve_cgroup: CgroupResolver,
    shared: Arc<Shared>,
    hub: Arc<DeviationHub>,
    stats: PipelineStats,
    /// Remote ends and listeners for a collector, when the agent pushes to one.
    endpoints: Option<Arc<Mutex<EndpointTable>>>,
    commands: Option<mpsc::Receiver<PipelineCommand>>,
    /// Raw events for subscribers that ask for them.
    events: Option<Arc<EventHub>>,
}

/// Most events the pipeline handles between two looks at its timers and other inputs.
const EVENT_BATCH: usize = 256;

impl Pipeline {
    pub fn new(config: PipelineConfig, shared: Arc<Shared>, hub: Arc<DeviationHub>, resolve_cgroup: CgroupResolver) -> Self {
        let sockets = SocketState::new(config.join_window, config.max_pending_connections, config.max_listeners);
        Pipeline {
            processes: ProcessTable::new(config.processes.clone()),
            sockets,
            folds: Folds::new(config.join_window + config.accept_window, 2 * agent_common::FOLDS_MAX_ENTRIES as usize),
            received_peers: ReceivedPeers::new(agent_common::UDP_FLOWS_MAX_ENTRIES as usize),
            local_udp: LocalUdp::new(config.max_listeners, agent_common::UDP_FLOWS_MAX_ENTRIES as usize),
            labels: LabelTracker::new(config.labels.clone(), None),
            label_replies: None,
            held: HoldQueue::new(config.label_hold, config.max_held),
            dns: DnsNames::new(&config.dns),
            clock: KernelClock::new(),
            resolve_cgroup,
            shared,
            hub,
            stats: PipelineStats::default(),
            endpoints: None,
            commands: None,
            events: None,
            config,
        }
    }

    /// Publishes raw events of the kinds subscribers want to `events` from now on.
    pub fn with_events(mut self, events: Arc<EventHub>) -> Self {
        self.events = Some(events);
        self
    }

    /// Makes [`Pipeline::run`] serve requests from `commands` between events.
    pub fn with_commands(mut self, commands: mpsc::Receiver<PipelineCommand>) -> Self {
        self.commands = Some(commands);
        self
    }

    /// Remembers each flow's observation from now on, for a kernel that folds repeated TCP
    /// connections into counts.
    pub fn track_folds(&mut self) {
        self.folds.enable();
    }

    /// Records remote ends of flows and listeners in `table` from now on, for a collector.
    pub fn track_endpoints(&mut self, table: Arc<Mutex<EndpointTable>>) {
        self.endpoints = Some(table);
    }

    /// Connects the pipeline to a label lookup task: misses go to `requests`, outcomes come back
    /// on `replies`. Without it, processes in containers carry ids but never labels.
    pub fn with_label_lookups(mut self, requests: mpsc::Sender<LabelRequest>, replies: mpsc::Receiver<LabelReply>) -> Self {
        self.labels = LabelTracker::new(self.config.labels.clone(), Some(requests));
        self.label_replies = Some(replies);
        self
    }

    /// Makes accepted connections wait for the `accept` event that names their process; call it
    /// when the kernel reports acceptors ([`crate::telemetry::Telemetry::reports_acceptors`]).
    pub fn await_acceptors(&mut self) {
        self.sockets.await_acceptors(self.config.accept_window);
    }

    /// Seeds the process table, the listeners and the established TCP connections that existed
    /// before the agent started, from /proc; call before the first event. Only sockets of
    /// processes whose cgroup path is `scope` or below it are used, when a scope is given.
    /// Returns what was seeded; its listeners are the ones to seed in the kernel too.
    pub fn seed_from_proc(&mut self, scope: Option<&str>) -> Seeded {
        let proc_root = std::path::Path::new("/proc");
        let processes = self.processes.seed_from_proc(proc_root);
        // Containers that already run get their lookups now rather than at their next event.
        let now = Instant::now();
        for (pid, origin) in self.processes.containerized() {
            if let Some(identity) = self.labels.identity(&origin, now) {
                self.processes.set_container(pid, identity);
            }
        }
        let agent = std::process::id();
        let in_scope = |pid: u32| {
            let Some(scope) = scope else { return true };
            self.processes.get(pid).is_some_and(|process| cgroup_within(&process.cgroup, scope))
        };
        let scanned = crate::state::seed::scan_sockets(proc_root);
        let sockets: Vec<SeededSocket> = scanned
            .tcp
            .into_iter()
            .filter(|socket| socket.pid != 0 && socket.pid != agent && in_scope(socket.pid))
            .collect();
        // A UDP socket on an ephemeral port is most likely a client's that sent without binding.
        let ephemeral = self.config.ephemeral_ports;
        let udp_listeners: Vec<SeededSocket> = scanned
            .udp
            .into_iter()
            .filter(|socket| socket.pid != 0 && socket.pid != agent && in_scope(socket.pid))
            .filter(|socket| !ephemeral.contains(socket.local.port()))
            .collect();
        let listeners = self.sockets.seed_listeners(&sockets);
        let processes_table = &self.processes;
        let (connections, flows) = self.sockets.seed_connections(&sockets, |pid| processes_table.get(pid), Instant::now());
        tracing::info!(processes, listeners, connections, udp_listeners = udp_listeners.len(), "seeded processes and sockets opened before the agent");
        self.observe_flows(flows);
        let (listeners, established): (Vec<SeededSocket>, Vec<SeededSocket>) =
            sockets.into_iter().partition(|socket| socket.state == SeededState::Listen);
        self.observe_seeded_listeners(&listeners, Protocol::Tcp);
        self.observe_seeded_listeners(&udp_listeners, Protocol::Udp);
        for socket in &udp_listeners {
            self.local_udp.on_bind(socket.netns, socket.local, socket.pid);
        }
        Seeded { processes, listeners, connections, established, udp_listeners: udp_listeners.len() }
    }

    /// Judges the listeners found in /proc at start-up like new ones.
    fn observe_seeded_listeners(&mut self, listeners: &[SeededSocket], protocol: Protocol) {
        let time = SystemTime::now();
        for socket in listeners {
            let Some(process) = self.processes.get(socket.pid) else { continue };
            let observation = ListenObservation { time, process, addr: socket.local, protocol, netns: socket.netns };
            self.submit(Observation::Listen(observation));
        }
    }

    /// Handles events until `cancel` fires or the event channel closes.
    pub async fn run(mut self, mut events: mpsc::Receiver<Event>, lost_records: LossCounter, cancel: CancellationToken) {
        let mut loss_check = tokio::time::interval(self.config.loss_check_interval);
        loss_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported_losses = lost_records();
        let mut label_replies = self.label_replies.take();
        // Events are taken in batches: one pass of the select below (its timers and channels)
        // costs more than handling a typical event.
        let mut batch = Vec::with_capacity(EVENT_BATCH);
        loop {
            let join_deadline = self.sockets.next_deadline();
            let hold_deadline = self.held.next_deadline();
            let fold_deadline = self.folds.next_deadline();
            tokio::select! {
                _ = cancel.cancelled() => break,
                received = events.recv_many(&mut batch, EVENT_BATCH) => {
                    if received == 0 {
                        break;
                    }
                    for event in batch.drain(..) {
                        self.handle(event);
                    }
                }
                Some(reply) = recv_reply(&mut label_replies) => self.apply_label_reply(reply),
                _ = sleep_until(hold_deadline) => self.release_held(Instant::now()),
                Some(command) = next_command(&mut self.commands) => self.serve(command),
                _ = sleep_until(join_deadline) => {
                    let flows = self.sockets.flush_expired(Instant::now());
                    self.observe_flows(flows);
                }
                _ = sleep_until(fold_deadline) => self.apply_folds(Instant::now()),
                _ = loss_check.tick() => {
                    let total = lost_records();
                    if total > reported_losses {
                        self.publish_telemetry_gap(total - reported_losses, total);
                        reported_losses = total;
                    }
                    self.stats.lost_records = total;
                    self.processes.sweep_vanished(std::path::Path::new("/proc"), Instant::now());
                    self.processes.expire(Instant::now());
                    self.dns.expire(Instant::now());
                    // Declared flows not seen within the engine's window come out of its tick.
                    let unused = self.engine().tick(SystemTime::now());
                    self.publish(unused);
                    self.publish_stats();
                }
            }
        }
        // Whatever still waits for a partner or for labels goes to the engine before the pipeline stops.
        let flows = self.sockets.flush_expired(Instant::now() + self.config.join_window * 2);
        self.observe_flows(flows);
        self.apply_all_folds();
        self.release_all_held();
        self.publish_stats();
    }

    /// Returns when the oldest connection end that waits for its partner stops waiting, if any.
    pub fn next_join_deadline(&self) -> Option<Instant> {
        self.sockets.next_deadline()
    }

    /// Hands connections whose join window has passed by `now` to the engine, each with the one end
    /// that was seen.
    pub fn flush_joins(&mut self, now: Instant) {
        let flows = self.sockets.flush_expired(now);
        self.observe_flows(flows);
    }

    /// Hands every connection end still waiting for its partner to the engine and publishes the
    /// counters, for a caller that drives [`Pipeline::handle`] itself and has no more events.
    pub fn finish(&mut self) {
        self.flush_joins(Instant::now() + self.config.join_window * 2);
        self.apply_all_folds();
        self.release_all_held();
        self.publish_stats();
    }

    /// Applies the outcome of a label lookup: the container's processes take the new identity and
    /// the observations held for it go to the engine.
    pub fn apply_label_reply(&mut self, reply: LabelReply) {
        let container_id = reply.container_id.clone();
        if let Some(identity) = self.labels.apply(reply, Instant::now()) {
            let updated = self.processes.update_container(&identity);
            self.stats.processes_relabeled += updated as u64;
            tracing::debug!(container = %container_id, state = identity.labels_state.as_str(), processes = updated, "container labels updated");
        }
        self.release_held(Instant::now());
    }

    /// Evaluates held observations whose lookups returned or whose hold time has passed.
    fn release_held(&mut self, now: Instant) {
        let labels = &self.labels;
        let ready = self.held.take_ready(now, |observation| waits_for_labels(labels, observation));
        for observation in ready {
            self.evaluate(observation, 1);
        }
    }

    fn release_all_held(&mut self) {
        for observation in self.held.take_all() {
            self.evaluate(observation, 1);
        }
    }

    /// Gives `process` the current identity of its container, requesting a lookup when the label
    /// cache has none; the process table entry follows.
    fn with_container(&mut self, process: Arc<ProcessInfo>) -> Arc<ProcessInfo> {
        let Some(details) = self.processes.exec_details(process.pid) else { return process };
        let Some(identity) = self.labels.identity(&details.origin, Instant::now()) else { return process };
        if process.container.as_ref().is_some_and(|known| Arc::ptr_eq(known, &identity)) {
            return process;
        }
        // The table may hold a newer entry for the pid (an exec since the event); only a matching
        // one takes the identity.
        if self.processes.get(process.pid).is_some_and(|entry| Arc::ptr_eq(&entry, &process)) {
            if let Some(updated) = self.processes.set_container(process.pid, identity.clone()) {
                return updated;
            }
        }
        let mut info = ProcessInfo::clone(&process);
        info.container = Some(identity);
        Arc::new(info)
    }

    /// Passes an observation to the engine, or queues it while a label lookup for one of its
    /// processes is in flight.
    fn submit(&mut self, observation: Observation) {
        self.submit_repeated(observation, 1);
    }

    /// Passes `count` observations that repeat `observation`, as `count` calls of `submit` would.
    fn submit_repeated(&mut self, mut observation: Observation, count: u64) {
        for process in observation.processes_mut().into_iter().flatten() {
            *process = self.with_container(process.clone());
        }
        if !waits_for_labels(&self.labels, &observation) {
            self.evaluate(observation, count);
            return;
        }
        for _ in 0..count {
            if let Some(oldest) = self.held.push(observation.clone(), Instant::now()) {
                tracing::debug!("label hold queue full; evaluating the oldest observation without waiting");
                self.evaluate(oldest, 1);
            }
        }
    }

    /// Passes `count` repeats of an observation to the engine with the latest container
    /// identities.
    fn evaluate(&mut self, mut observation: Observation, count: u64) {
        for process in observation.processes_mut().into_iter().flatten() {
            let Some(known) = &process.container else { continue };
            let Some(current) = self.labels.current(&known.id) else { continue };
            if !Arc::ptr_eq(known, current) {
                let mut info = ProcessInfo::clone(process);
                info.container = Some(current.clone());
                *process = Arc::new(info);
            }
        }
        let deviations = match observation {
            Observation::Exec(exec) => (0..count).flat_map(|_| self.engine().observe_exec(&exec)).collect(),
            Observation::Listen(listen) => (0..count).flat_map(|_| self.engine().observe_listen(&listen)).collect(),
            Observation::Flow(flow) => {
                self.record_peer(&flow, count);
                self.engine().observe_flow_repeated(&flow, count)
            }
            Observation::FailedConnect(flow) => {
                let mut engine = self.engine();
                for _ in 0..count {
                    engine.observe_failed_connect(&flow);
                }
                Vec::new()
            }
        };
        self.publish(deviations);
    }

    /// Applies one event to the state and the engine.
    pub fn handle(&mut self, event: Event) {
        self.stats.events += 1;
        // The event is copied only when a subscriber wants its kind. Its raw form is built after
        // the state took the event in, so an exec carries the new program.
        let raw = self.events.as_ref().filter(|hub| EventBuilder::kind_of(&event).is_some_and(|kind| hub.wants(kind)));
        let raw = raw.map(|_| event.clone());
        match event {
            Event::Exec(exec) => {
                self.stats.execs += 1;
                let cgroup = (self.resolve_cgroup)(exec.cgroup_id);
                let process = self.processes.on_exec(&exec, cgroup);
                tracing::trace!(pid = process.pid, exe = %process.exe, "exec");
                let observation = ExecObservation { time: self.clock.to_system(exec.ktime_ns), process };
                self.submit(Observation::Exec(observation));
            }
            Event::Fork(fork) => {
                self.stats.forks += 1;
                // Written in the parent's context, so the child starts from its current cgroup.
                self.follow_cgroup(fork.parent_pid, fork.cgroup_id, fork.ktime_ns);
                self.processes.on_fork(&fork);
            }
            Event::Exit(exit) => {
                self.stats.exits += 1;
                if let (Some(lineage), true) = (exit.lineage, exit.pid == exit.tid) {
                    self.processes.observe_lineage(exit.pid, lineage);
                }
                self.processes.on_exit(&exit, Instant::now());
            }
            Event::Tcp(tcp) => {
                self.stats.tcp_events += 1;
                self.handle_tcp(tcp);
            }
            Event::Udp(udp) if udp.kind == UdpEventKind::Bind => {
                self.stats.udp_binds += 1;
                self.handle_udp_bind(&udp);
            }
            Event::Udp(udp) => {
                self.stats.udp_flows += 1;
                self.handle_udp(udp);
            }
            Event::Dns(dns) => self.handle_dns(&dns),
            Event::Accept(accept) => {
                self.stats.accepts += 1;
                self.handle_accept(accept);
            }
            Event::Fold(fold) => self.folds.hold(fold, Instant::now()),
            Event::Credentials(change) => {
                self.stats.credential_changes += 1;
                tracing::debug!(pid = change.pid, change = ?change.change, after = ?change.after, "credential change");
                if let (Some(after), true) = (change.after, change.pid == change.tid) {
                    self.processes.on_credentials(change.pid, after.uid, after.gid);
                }
            }
        }
        if let Some(raw) = raw {
            self.publish_raw(|builder| builder.build(&raw));
        }
    }

    fn publish_raw(&self, build: impl FnOnce(&EventBuilder) -> Option<crate::events::RawEvent>) {
        let Some(hub) = &self.events else { return };
        let engine = self.engine();
        let builder = EventBuilder {
            processes: &self.processes,
            engine: &engine,
            dns: &self.dns,
            clock: self.clock,
            ephemeral_ports: self.config.ephemeral_ports,
        };
        if let Some(event) = build(&builder) {
            hub.publish(event);
        }
    }

    fn serve(&mut self, command: PipelineCommand) {
        match command {
            PipelineCommand::ReplaceModel { model, reply } => {
                let raised = self.replace_model(*model);
                // The requester may have given up waiting; the model is in force all the same.
                let _ = reply.send(raised);
            }
        }
    }

    /// Puts `model` in force and publishes what it raises for the observed graph and for the
    /// listeners open now. Returns the number of deviations published.
    pub fn replace_model(&mut self, model: Model) -> usize {
        let mut raised = self.engine().replace_model(model);
        // The engine keeps no listeners, so the open ones are judged again here.
        let now = SystemTime::now();
        let listens: Vec<ListenObservation> = self
            .sockets
            .listeners()
            .filter_map(|listener| {
                let process = self.processes.get(listener.pid)?;
                Some(ListenObservation { time: now, process, addr: listener.addr, protocol: Protocol::Tcp, netns: listener.netns })
            })
            .collect();
        for listen in &listens {
            raised.extend(self.engine().observe_listen(listen));
        }
        // NOTE: running programs are not judged again, so a new model that drops an executable
        // raises unexpected-executable only when a process starts it again.
        let count = raised.len();
        self.publish(raised);
        self.publish_stats();
        count
    }

    fn handle_tcp(&mut self, tcp: TcpEvent) {
        let now = Instant::now();
        self.follow_cgroup(tcp.pid, tcp.cgroup_id, tcp.ktime_ns);
        // Connect and Listen run in the owner's context, which the kernel program read: its
        // current parent and whether its executable is still on disk.
        if let Some(lineage) = tcp.lineage {
            self.processes.observe_lineage(tcp.pid, lineage);
        }
        if tcp.exe_unlinked {
            self.processes.mark_exe_deleted(tcp.pid);
        }
        match tcp.kind {
            TcpEventKind::Connect => {}
            TcpEventKind::ConnectFailed => {
                self.stats.connect_failures += 1;
                let Some(process) = self.processes.get(tcp.pid) else { return };
                // A refused or dropped attempt raises nothing by itself, but it proves a `deny` flow held.
                let observation = FlowObservation {
                    time: self.clock.to_system(tcp.ktime_ns),
                    protocol: Protocol::Tcp,
                    client: Some(process),
                    server: None,
                    client_addr: tcp.local,
                    server_addr: tcp.remote,
                    netns: tcp.netns,
                    remote_name: self.dns.name_of(tcp.remote.ip(), now).map(str::to_owned),
                };
                self.folds.remember_failed(tcp.pid, tcp.netns, &observation);
                self.submit(Observation::FailedConnect(observation));
            }
            TcpEventKind::Connected => {
                let process = self.processes.get(tcp.pid);
                let time = self.clock.to_system(tcp.ktime_ns);
                let flows = self.sockets.on_connected(process, tcp.pid, tcp.netns, tcp.local, tcp.remote, now, time);
                self.observe_flows(flows);
            }
            TcpEventKind::Accepted => {
                let time = self.clock.to_system(tcp.ktime_ns);
                // The kernel folded the connecting end of this connection, so its end comes with
                // this record, and the two join as if it had been reported.
                if let Some((pid, netns)) = tcp.folded_client {
                    let process = self.processes.get(pid);
                    let flows = self.sockets.on_connected(process, pid, netns, tcp.remote, tcp.local, now, time);
                    self.observe_flows(flows);
                }
                let processes = &self.processes;
                let flows =
                    self.sockets.on_accepted(|pid| processes.get(pid), tcp.sock, tcp.netns, tcp.local, tcp.remote, now, time);
                self.observe_flows(flows);
            }
            TcpEventKind::Listen => {
                self.sockets.on_listen(tcp.sock, Listener { pid: tcp.pid, addr: tcp.local, netns: tcp.netns });
                let Some(process) = self.processes.get(tcp.pid) else {
                    self.stats.listens_without_process += 1;
                    return;
                };
                if let Some(endpoints) = &self.endpoints {
                    let node = self.engine().process_node(&process).id;
                    lock(endpoints).on_listen(tcp.sock, node, tcp.local, Protocol::Tcp);
                }
                let observation = ListenObservation {
                    time: self.clock.to_system(tcp.ktime_ns),
                    process,
                    addr: tcp.local,
                    protocol: Protocol::Tcp,
                    netns: tcp.netns,
                };
                self.submit(Observation::Listen(observation));
            }
            TcpEventKind::Close => {
                self.sockets.on_close(tcp.sock);
                if let Some(endpoints) = &self.endpoints {
                    lock(endpoints).on_close(tcp.sock);
                }
            }
        }
    }

    /// Hands a new UDP flow to the engine, seen from the sending process only. A datagram that
    /// [`is_udp_reply`] takes for a server's reply is handed over as the flow from the remote
    /// client to the server's port, so a DNS server raises one udp/53 flow and not one flow per
    /// client port.
    // NOTE: the receiving end of a UDP flow is not joined, even when it runs on this host, so a
    // UDP flow between two observed processes is reported twice: as a flow to the server's address
    // from the client, and as a flow from the client's address to the server from its reply.
    fn handle_udp(&mut self, udp: UdpEvent) {
        self.follow_cgroup(udp.pid, udp.cgroup_id, udp.ktime_ns);
        if udp.remote.port() == agent_common::DNS_PORT && udp.kind != UdpEventKind::Receive {
            self.dns.on_query_socket(udp.cookie, DnsSocket { pid: udp.pid, netns: udp.netns });
        }
        self.stats.flows += 1;
        let Some(process) = self.processes.get(udp.pid) else {
            self.stats.flows_without_process += 1;
            return;
        };
        let ephemeral = self.config.ephemeral_ports;
        let now = Instant::now();
        tracing::trace!(pid = udp.pid, tid = udp.tid, kind = ?udp.kind, local = %udp.local, remote = %udp.remote, "udp flow");
        // The kernel reports each client port of a flow to a server once, so the engine counts
        // that flow once per client socket, as it counts TCP connections.
        // NOTE: a busy UDP server still costs one kernel record per new client port, until the
        // kernel program keys its flows by its own port in place of the client's port.
        let (client, server, client_addr, server_addr) = if udp.kind == UdpEventKind::Receive {
            self.stats.udp_receives += 1;
            if is_udp_reply(udp.remote.port(), udp.local.port(), ephemeral) {
                self.stats.udp_replies_read += 1;
                return;
            }
            if self.local_udp.server_end_joined(udp.netns, udp.remote, udp.local.port(), now) {
                return;
            }
            self.received_peers.insert((udp.pid, udp.netns, udp.remote));
            (None, Some(process), udp.remote, udp.local)
        } else if is_udp_reply(udp.local.port(), udp.remote.port(), ephemeral) {
            self.stats.udp_replies += 1;
            if self.received_peers.contains(&(udp.pid, udp.netns, udp.remote)) {
                self.stats.udp_replies_already_received += 1;
                return;
            }
            if self.local_udp.server_end_joined(udp.netns, udp.remote, udp.local.port(), now) {
                return;
            }
            (None, Some(process), udp.remote, udp.local)
        } else {
            // A server's reply from its port to a client's fixed port, in a flow the client's
            // datagram joined.
            if self.local_udp.server_end_joined(udp.netns, udp.remote, udp.local.port(), now) {
                return;
            }
            // A listener in scope in the sender's namespace that the destination reaches is the
            // other end: the flow is one edge between the two processes.
            let processes = &self.processes;
            let listening = self
                .local_udp
                .listener_for(udp.netns, udp.remote, |pid| processes.get_live(pid).is_some())
                .and_then(|listener| processes.get_live(listener.pid));
            // A client whose port is not known yet is observed from each end.
            let joined = listening.is_some() && self.local_udp.join(udp.netns, udp.local, udp.remote, now);
            let server = if joined { listening } else { None };
            (Some(process), server, udp.local, udp.remote)
        };
        let observation = FlowObservation {
            time: self.clock.to_system(udp.ktime_ns),
            protocol: Protocol::Udp,
            client,
            server,
            client_addr,
            server_addr,
            netns: udp.netns,
            remote_name: self.dns.name_of(server_addr.ip(), Instant::now()).map(str::to_owned),
        };
        self.submit(Observation::Flow(observation));
    }

    /// Applies a record written in the process's own context, which shows that the process runs
    /// and in which cgroup. A process the table does not know is read from /proc. One that moved
    /// to another cgroup has its program judged again in the component that cgroup gives it, as
    /// after an exec.
    fn follow_cgroup(&mut self, pid: u32, cgroup_id: u64, ktime_ns: u64) {
        if cgroup_id == 0 {
            return;
        }
        let read = self.processes.ensure_live(pid, std::path::Path::new("/proc"));
        let resolve = &mut self.resolve_cgroup;
        let moved = self.processes.observe_cgroup(pid, cgroup_id, std::path::Path::new("/proc"), |id| resolve(id));
        // A process read from /proc is new to the engine too: its program was never judged.
        let judged = if read { self.processes.get(pid) } else { moved };
        let Some(process) = judged else { return };
        let observation = ExecObservation { time: self.clock.to_system(ktime_ns), process };
        self.submit(Observation::Exec(observation));
    }

    /// Hands a UDP socket bound to a chosen port to the engine as a listener.
    // NOTE: UDP listeners are not published as fleet endpoints, because no close of a UDP socket
    // is reported and the entry would outlive the socket.
    fn handle_udp_bind(&mut self, udp: &UdpEvent) {
        tracing::trace!(pid = udp.pid, local = %udp.local, "udp bind");
        self.follow_cgroup(udp.pid, udp.cgroup_id, udp.ktime_ns);
        self.local_udp.on_bind(udp.netns, udp.local, udp.pid);
        let Some(process) = self.processes.get(udp.pid) else {
            self.stats.listens_without_process += 1;
            return;
        };
        let observation = ListenObservation {
            time: self.clock.to_system(udp.ktime_ns),
            process,
            addr: udp.local,
            protocol: Protocol::Udp,
            netns: udp.netns,
        };
        self.submit(Observation::Listen(observation));
    }

    fn handle_dns(&mut self, dns: &DnsEvent) {
        if let Some(learned) = self.dns.on_message(dns, Instant::now()) {
            tracing::debug!(
                name = %learned.name,
                addresses = ?learned.addresses,
                pid = learned.asker.map(|asker| asker.pid),
                server = %dns.server,
                "learned DNS name"
            );
            if self.events.as_ref().is_some_and(|hub| hub.wants(EventKind::DnsAnswer)) {
                self.publish_raw(|builder| Some(builder.dns_answer(dns, &learned)));
            }
        }
    }

    fn handle_accept(&mut self, accept: AcceptEvent) {
        tracing::trace!(pid = accept.pid, fd = accept.fd, local = %accept.local, remote = %accept.remote, "accept");
        if let Some(lineage) = accept.lineage {
            self.processes.observe_lineage(accept.pid, lineage);
        }
        self.follow_cgroup(accept.pid, accept.cgroup_id, accept.ktime_ns);
        if accept.exe_unlinked {
            self.processes.mark_exe_deleted(accept.pid);
        }
        let process = self.processes.get(accept.pid);
        let flows = self.sockets.on_accept(
            process,
            accept.pid,
            accept.sock,
            accept.netns,
            accept.local,
            accept.remote,
            Instant::now(),
            self.clock.to_system(accept.ktime_ns),
        );
        self.observe_flows(flows);
    }

    fn observe_flows(&mut self, flows: Vec<JoinedFlow>) {
        for flow in flows {
            self.observe_flow(flow);
        }
    }

    fn observe_flow(&mut self, flow: JoinedFlow) {
        self.stats.flows += 1;
        let client = flow.client.as_ref().and_then(|end| end.process.clone());
        let server = flow.server.as_ref().and_then(|end| end.process.clone());
        if client.is_none() && server.is_none() {
            self.stats.flows_without_process += 1;
            return;
        }
        let netns = flow.client.as_ref().or(flow.server.as_ref()).map_or(0, |end| end.netns);
        let observation = FlowObservation {
            time: flow_time(&flow),
            protocol: Protocol::Tcp,
            client,
            server,
            client_addr: flow.client_addr,
            server_addr: flow.server_addr,
            netns,
            remote_name: self.dns.name_of(flow.server_addr.ip(), Instant::now()).map(str::to_owned),
        };
        self.folds.remember(&flow, &observation);
        self.submit(Observation::Flow(observation));
    }

    /// Applies the folded counts due at `now`, after the connections whose join window has passed.
    pub fn apply_folds(&mut self, now: Instant) {
        self.flush_joins(now);
        for fold in self.folds.take_due(now) {
            self.apply_fold(fold);
        }
    }

    fn apply_all_folds(&mut self) {
        for fold in self.folds.take_all() {
            self.apply_fold(fold);
        }
    }

    /// Counts folded connections on their flow's edge: each repeats the observation of the flow's
    /// last reported connection, at the time of the last one.
    // NOTE: so for up to an epoch a folded connection takes the processes of that reported one,
    // even when the connecting process has since run another program or another process took
    // over the listener.
    fn apply_fold(&mut self, fold: FoldEvent) {
        let (connections, failed) = repeats(&fold);
        self.folds.stats.connections += connections;
        self.folds.stats.failed += failed;
        let time = self.clock.to_system(fold.ktime_ns);
        if connections > 0 {
            let known = self.folds.observation(&fold.flow).cloned();
            if let Some(observation) = self.repeated_observation(known, &fold.flow, time, connections) {
                self.submit_repeated(Observation::Flow(observation), connections);
            }
        }
        if failed > 0 {
            let known = self.folds.failed_observation(&fold.flow).cloned();
            if let Some(observation) = self.repeated_observation(known, &fold.flow, time, failed) {
                self.submit_repeated(Observation::FailedConnect(observation), failed);
            }
        }
    }

    /// Returns the observation that `count` folded connections of `flow` repeat at `time`: `known`,
    /// or one made from the flow itself when none is on record.
    fn repeated_observation(
        &mut self,
        known: Option<FlowObservation>,
        flow: &FoldedFlow,
        time: SystemTime,
        count: u64,
    ) -> Option<FlowObservation> {
        if let Some(known) = known {
            return Some(FlowObservation { time, ..known });
        }
        self.folds.stats.without_flow += count;
        let observation = self.fold_observation(flow, time);
        if observation.is_none() {
            self.stats.flows_without_process += count;
        }
        observation
    }

    /// Builds the observation of a folded flow with no reported connection on record (its entry
    /// was evicted): the connecting process, or the owner of the listener the connections reached.
    fn fold_observation(&self, flow: &FoldedFlow, time: SystemTime) -> Option<FlowObservation> {
        let (client, server, client_addr, server_addr, netns) = match *flow {
            FoldedFlow::Out { netns, pid, server } => {
                let unspecified = SocketAddr::new(unspecified_like(server.ip()), 0);
                (self.processes.get(pid), None, unspecified, server, netns)
            }
            FoldedFlow::In { netns, server, client } => {
                let owner = self.sockets.listener(netns, server).and_then(|listener| self.processes.get(listener.pid));
                (None, owner, SocketAddr::new(client, 0), server, netns)
            }
        };
        if client.is_none() && server.is_none() {
            return None;
        }
        Some(FlowObservation {
            time,
            protocol: Protocol::Tcp,
            client,
            server,
            client_addr,
            server_addr,
            netns,
            remote_name: self.dns.name_of(server_addr.ip(), Instant::now()).map(str::to_owned),
        })
    }

    /// Records the remote end of a flow with exactly one end on this host.
    fn record_peer(&self, observation: &FlowObservation, connections: u64) {
        let Some(endpoints) = &self.endpoints else { return };
        let (role, remote_ip) = match (&observation.client, &observation.server) {
            (Some(_), None) => (PeerRole::Client, observation.server_addr.ip()),
            (None, Some(_)) => (PeerRole::Server, observation.client_addr.ip()),
            _ => return,
        };
        let (source, destination) = self.engine().flow_nodes(observation);
        lock(endpoints).record_peer(PeerConnection {
            source: &source.id,
            destination: &destination.id,
            protocol: observation.protocol,
            port: observation.server_addr.port(),
            role,
            remote_ip,
            time: observation.time,
            connections,
        });
    }

    fn engine(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.shared.engine.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish(&mut self, deviations: Vec<Deviation>) {
        for deviation in deviations {
            tracing::debug!(id = %deviation.id, severity = deviation.severity.as_str(), "deviation");
            self.hub.publish(deviation);
            self.stats.deviations_published += 1;
        }
    }

    fn publish_telemetry_gap(&mut self, lost: u64, total: u64) {
        tracing::error!(lost, total, "kernel records were lost; verdicts for this window are degraded");
        let now = SystemTime::now();
        let deviation = Deviation {
            id: format!("{}@agent@kernel", Category::TelemetryGap.as_str()),
            category: Category::TelemetryGap,
            severity: Severity::Elevated,
            stride: Stride::Repudiation,
            summary: format!(
                "{lost} kernel records were lost ({total} since start); deviations in this window may be missing"
            ),
            source: "agent".to_string(),
            destination: "kernel".to_string(),
            protocol: None,
            port: None,
            evidence: Evidence {
                process: None,
                peer_process: None,
                local_addr: None,
                remote_addr: None,
                source_zone: None,
                destination_zone: None,
                netns: 0,
                remote_name: None,
            },
            first_seen: now,
            last_seen: now,
            count: lost,
            resolution: "Check the status counters kernel_drops_* for the program and the reason. For ring_buffer_full, raise the ring buffer size (--ring-buffer-kib) or reduce the event rate. For a *_map_full reason, the kernel map was full: more sockets, flows or accepts were open or waiting at once than it has entries for.".to_string(),
        };
        self.publish(vec![deviation]);
    }

    fn publish_stats(&mut self) {
        self.stats.processes = self.processes.stats();
        self.stats.sockets = self.sockets.stats();
        self.stats.labels = self.labels.stats();
        self.stats.held = self.held.stats();
        self.stats.dns = self.dns.stats();
        self.stats.local_udp = self.local_udp.stats();
        self.stats.folds = self.folds.stats.clone();
        *self.shared.stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = self.stats.clone();
    }
}

/// Returns the unspecified address of `ip`'s family.
fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits for the next command; never returns when there is no command channel or it closed.
/// When a joined connection happened: the time of its first end the kernel reported, not the end
/// of the join window that handed it on.
fn flow_time(flow: &JoinedFlow) -> SystemTime {
    flow.client.iter().chain(flow.server.iter()).map(|end| end.time).min().unwrap_or_else(SystemTime::now)
}

async fn next_command(commands: &mut Option<mpsc::Receiver<PipelineCommand>>) -> Option<PipelineCommand> {
    match commands {
        Some(receiver) => match receiver.recv().await {
            Some(command) => Some(command),
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// True when a label lookup for the container of one of the observation's processes is in flight.
fn waits_for_labels(labels: &LabelTracker, observation: &Observation) -> bool {
    observation
        .processes()
        .into_iter()
        .flatten()
        .filter_map(|process| process.container.as_ref())
        .any(|container| labels.is_in_flight(&container.id))
}

async fn recv_reply(replies: &mut Option<mpsc::Receiver<LabelReply>>) -> Option<LabelReply> {
    match replies {
        Some(replies) => replies.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[path = "pipeline_udp_tests.rs"]
mod udp_tests;

#[cfg(test)]
#[path = "pipeline_fold_tests.rs"]
mod fold_tests;

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::{Duration, SystemTime};

    use super::{cgroup_within, flow_time};
    use crate::state::sockets::{JoinedFlow, PendingEnd};

    #[test]
    fn flow_time_is_the_first_end_reported() {
        let at = |seconds| SystemTime::UNIX_EPOCH + Duration::from_secs(seconds);
        let end = |time| PendingEnd { pid: 1, netns: 1, process: None, time };
        let addr: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let flow = JoinedFlow { client_addr: addr, server_addr: addr, client: Some(end(at(20))), server: Some(end(at(10))) };
        assert_eq!(flow_time(&flow), at(10));
        let client_only = JoinedFlow { server: None, ..flow };
        assert_eq!(flow_time(&client_only), at(20));
    }

    #[test]
    fn cgroup_within_scope_needs_a_whole_component() {
        assert!(cgroup_within("/dw/web", "/dw"));
        assert!(cgroup_within("/dw", "/dw/"));
        assert!(cgroup_within("/anything", "/"));
        assert!(!cgroup_within("/dw-other/web", "/dw"));
        assert!(!cgroup_within("/", "/dw"));
    }
}
