//! The pipeline: kernel events in, deviations out.
//!
//! One task owns the process table and the socket state, turns events into observations for the
//! model engine and publishes what the engine raises. It is the only writer of that state, so
//! nothing in it needs a lock. The engine sits behind a mutex because the API reads its graph.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use driftwatch_model::deviation::{Category, Deviation, Evidence, Severity, Stride};
use driftwatch_model::Engine;
use driftwatch_model::observation::{ExecObservation, FlowObservation, ListenObservation, Protocol};
use driftwatch_model::Model;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::api::hub::DeviationHub;
use crate::state::process::{ProcessTable, ProcessTableConfig, ProcessTableStats};
use crate::state::sockets::{JoinedFlow, Listener, SocketState, SocketStats};
use crate::telemetry::event::{Event, TcpEvent, TcpEventKind};

/// Bounds and timing of the pipeline.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub processes: ProcessTableConfig,
    /// How long one end of a connection waits for the other end on this host.
    pub join_window: Duration,
    pub max_pending_connections: usize,
    pub max_listeners: usize,
    /// How often kernel loss counters are checked for a telemetry gap.
    pub loss_check_interval: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            processes: ProcessTableConfig::default(),
            join_window: Duration::from_millis(50),
            max_pending_connections: 65_536,
            max_listeners: 16_384,
            loss_check_interval: Duration::from_secs(1),
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
    pub connect_failures: u64,
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
}

impl PipelineStats {
    /// Lists the counters as (name, value) for the status call.
    pub fn named(&self) -> Vec<(String, u64)> {
        let process = &self.processes;
        let sockets = &self.sockets;
        [
            ("pipeline_events", self.events),
            ("pipeline_execs", self.execs),
            ("pipeline_forks", self.forks),
            ("pipeline_exits", self.exits),
            ("pipeline_tcp_events", self.tcp_events),
            ("pipeline_connect_failures", self.connect_failures),
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
            ("sockets_listeners", sockets.listeners),
            ("sockets_pending", sockets.pending),
            ("sockets_joined", sockets.joined),
            ("sockets_unjoined", sockets.unjoined),
            ("sockets_pending_overflow", sockets.pending_overflow),
            ("sockets_accepted_without_listener", sockets.accepted_without_listener),
            ("sockets_listeners_dropped", sockets.listeners_dropped),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect()
    }
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
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes one timespec into the pointer it is given.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        let monotonic = Duration::new(now.tv_sec as u64, now.tv_nsec as u32);
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

/// The pipeline task's state.
pub struct Pipeline {
    config: PipelineConfig,
    processes: ProcessTable,
    sockets: SocketState,
    clock: KernelClock,
    resolve_cgroup: CgroupResolver,
    shared: Arc<Shared>,
    hub: Arc<DeviationHub>,
    stats: PipelineStats,
    commands: Option<mpsc::Receiver<PipelineCommand>>,
}

impl Pipeline {
    pub fn new(config: PipelineConfig, shared: Arc<Shared>, hub: Arc<DeviationHub>, resolve_cgroup: CgroupResolver) -> Self {
        let sockets = SocketState::new(config.join_window, config.max_pending_connections, config.max_listeners);
        Pipeline {
            processes: ProcessTable::new(config.processes.clone()),
            sockets,
            clock: KernelClock::new(),
            resolve_cgroup,
            shared,
            hub,
            stats: PipelineStats::default(),
            commands: None,
            config,
        }
    }

    /// Makes [`Pipeline::run`] serve requests from `commands` between events.
    pub fn with_commands(mut self, commands: mpsc::Receiver<PipelineCommand>) -> Self {
        self.commands = Some(commands);
        self
    }

    /// Seeds the process table, and the listeners that were open before the agent started, from
    /// /proc; call before the first event. Returns the number of processes.
    pub fn seed_processes(&mut self) -> usize {
        let proc_root = std::path::Path::new("/proc");
        let processes = self.processes.seed_from_proc(proc_root);
        let sockets = crate::state::seed::scan_tcp_sockets(proc_root);
        let listeners = self.sockets.seed_listeners(&sockets);
        tracing::info!(listeners, sockets = sockets.len(), "seeded listeners opened before the agent");
        processes
    }

    /// Handles events until `cancel` fires or the event channel closes.
    pub async fn run(mut self, mut events: mpsc::Receiver<Event>, lost_records: LossCounter, cancel: CancellationToken) {
        let mut loss_check = tokio::time::interval(self.config.loss_check_interval);
        loss_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported_losses = lost_records();
        loop {
            let join_deadline = self.sockets.next_deadline();
            tokio::select! {
                _ = cancel.cancelled() => break,
                event = events.recv() => match event {
                    Some(event) => self.handle(event),
                    None => break,
                },
                Some(command) = next_command(&mut self.commands) => self.serve(command),
                _ = sleep_until(join_deadline) => {
                    let flows = self.sockets.flush_expired(Instant::now());
                    self.observe_flows(flows);
                }
                _ = loss_check.tick() => {
                    let total = lost_records();
                    if total > reported_losses {
                        self.publish_telemetry_gap(total - reported_losses, total);
                        reported_losses = total;
                    }
                    self.stats.lost_records = total;
                    self.processes.expire(Instant::now());
                    // Declared flows not seen within the engine's window come out of its tick.
                    let unused = self.engine().tick(SystemTime::now());
                    self.publish(unused);
                    self.publish_stats();
                }
            }
        }
        // Whatever still waits for a partner goes to the engine before the pipeline stops.
        let flows = self.sockets.flush_expired(Instant::now() + self.config.join_window * 2);
        self.observe_flows(flows);
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
        self.publish_stats();
    }

    /// Applies one event to the state and the engine.
    pub fn handle(&mut self, event: Event) {
        self.stats.events += 1;
        match event {
            Event::Exec(exec) => {
                self.stats.execs += 1;
                let cgroup = (self.resolve_cgroup)(exec.cgroup_id);
                let process = self.processes.on_exec(&exec, cgroup);
                tracing::trace!(pid = process.pid, exe = %process.exe, "exec");
                let observation = ExecObservation { time: self.clock.to_system(exec.ktime_ns), process };
                let deviations = self.engine().observe_exec(&observation);
                self.publish(deviations);
            }
            Event::Fork(fork) => {
                self.stats.forks += 1;
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
            Event::Credentials(change) => {
                tracing::debug!(pid = change.pid, change = ?change.change, after = ?change.after, "credential change");
                if let (Some(after), true) = (change.after, change.pid == change.tid) {
                    self.processes.on_credentials(change.pid, after.uid, after.gid);
                }
            }
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
                };
                self.engine().observe_failed_connect(&observation);
            }
            TcpEventKind::Connected => {
                let process = self.processes.get(tcp.pid);
                let flows = self.sockets.on_connected(process, tcp.pid, tcp.netns, tcp.local, tcp.remote, now);
                self.observe_flows(flows);
            }
            TcpEventKind::Accepted => {
                let processes = &self.processes;
                let flows = self.sockets.on_accepted(|pid| processes.get(pid), tcp.netns, tcp.local, tcp.remote, now);
                self.observe_flows(flows);
            }
            TcpEventKind::Listen => {
                self.sockets.on_listen(tcp.sock, Listener { pid: tcp.pid, addr: tcp.local, netns: tcp.netns });
                let Some(process) = self.processes.get(tcp.pid) else {
                    self.stats.listens_without_process += 1;
                    return;
                };
                let observation = ListenObservation {
                    time: self.clock.to_system(tcp.ktime_ns),
                    process,
                    addr: tcp.local,
                    protocol: Protocol::Tcp,
                    netns: tcp.netns,
                };
                let deviations = self.engine().observe_listen(&observation);
                self.publish(deviations);
            }
            TcpEventKind::Close => self.sockets.on_close(tcp.sock),
        }
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
            time: SystemTime::now(),
            protocol: Protocol::Tcp,
            client,
            server,
            client_addr: flow.client_addr,
            server_addr: flow.server_addr,
            netns,
        };
        let deviations = self.engine().observe_flow(&observation);
        self.publish(deviations);
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
            },
            first_seen: now,
            last_seen: now,
            count: lost,
            resolution: "Raise the ring buffer size (--ring-buffer-kib) or reduce the event rate; see the status counters for the program that lost records.".to_string(),
        };
        self.publish(vec![deviation]);
    }

    fn publish_stats(&mut self) {
        self.stats.processes = self.processes.stats();
        self.stats.sockets = self.sockets.stats();
        *self.shared.stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = self.stats.clone();
    }
}

/// Waits for the next command; never returns when there is no command channel or it closed.
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
