//! The agent's userspace pipeline alone, fed synthetic events: sustained throughput, the rate
//! where loss starts, and memory after a flood and with a full observed graph.
//!
//! The events go through a bounded channel of the capacity the agent uses between its ring buffer
//! reader and the pipeline. A full channel drops the event just as the reader does, so "loss"
//! here is what the agent would count as `telemetry_channel_drops`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use driftwatch::api::hub::{DeviationHub, HubConfig};
use driftwatch::events::{EventHub, EventHubConfig};
use driftwatch::pipeline::{Pipeline, PipelineConfig, Shared};
use driftwatch::telemetry::event::{Event, ExecEvent, ExitEvent, ForkEvent, TcpEvent, TcpEventKind};
use driftwatch_model::{Engine, Model};
use serde_json::json;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;

use crate::own_memory_kib;

#[derive(clap::Args, Debug)]
pub struct PipelineArgs {
    /// The model the engine compares against.
    #[arg(long)]
    pub model: PathBuf,
    /// How long each offered rate is held, in seconds.
    #[arg(long, default_value_t = 3.0)]
    pub step_seconds: f64,
    /// First offered rate, in events per second; each step raises it by half.
    #[arg(long, default_value_t = 50_000.0)]
    pub start_rate: f64,
    /// Events sent as fast as the channel takes them, to measure the saturated throughput.
    #[arg(long, default_value_t = 2_000_000)]
    pub flood_events: u64,
    /// Distinct edges fed into the observed graph for the memory measurement.
    #[arg(long, default_value_t = 100_000)]
    pub edges: u64,
    /// Run the pipeline without the raw event hub the agent attaches, to measure what the hub
    /// costs when no client asked for events.
    #[arg(long)]
    pub no_event_hub: bool,
}

/// Capacity of the channel between the ring buffer reader and the pipeline in the agent.
const CHANNEL_CAPACITY: usize = 65_536;
/// Steps stop once the offered rate passes this, whether or not loss was seen.
const MAX_RATE: f64 = 20_000_000.0;

pub fn run(args: &PipelineArgs) -> anyhow::Result<String> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let model = Model::load(&args.model).map_err(|errors| anyhow::anyhow!("{errors}"))
        .with_context(|| format!("the model {} is invalid", args.model.display()))?;

    let rss_start_kib = own_memory_kib("VmRSS");
    let shared = Arc::new(Shared { engine: Mutex::new(Engine::new(model)), stats: Mutex::new(Default::default()) });
    let hub = Arc::new(DeviationHub::new(HubConfig::default()));
    let mut pipeline = Pipeline::new(PipelineConfig::default(), shared.clone(), hub, Box::new(|id| format!("/driftwatch-bench/{id}")));
    // As in the agent, with no subscriber: raw events are never built.
    if !args.no_event_hub {
        pipeline = pipeline.with_events(Arc::new(EventHub::new(EventHubConfig::default(), "")));
    }
    let (sender, receiver) = mpsc::channel::<Event>(CHANNEL_CAPACITY);
    let cancel = CancellationToken::new();
    let task = runtime.spawn(pipeline.run(receiver, Box::new(|| 0), cancel.clone()));

    let mut events = SyntheticEvents::default();
    let steps = rate_steps(args, &sender, &mut events);
    let saturated = flood(args.flood_events, &sender, &mut events);
    // The retained exits and joined sockets expire on the pipeline's own timers.
    std::thread::sleep(Duration::from_secs(2));
    let rss_after_flood_kib = own_memory_kib("VmRSS");

    let edges_started = Instant::now();
    for index in 0..args.edges {
        for event in events.distinct_edge(index) {
            sender.blocking_send(event).context("the pipeline stopped")?;
        }
    }
    wait_drained(&sender);
    // Flows to remote hosts reach the engine when their join window (50 ms by default) expires.
    std::thread::sleep(Duration::from_millis(500));
    let edges_seconds = edges_started.elapsed().as_secs_f64();
    let engine_stats = shared.engine.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).stats();
    let rss_edges_kib = own_memory_kib("VmRSS");

    cancel.cancel();
    drop(sender);
    let _ = runtime.block_on(task);

    let sustained: Vec<&Step> = steps
        .iter()
        .filter(|step| step.dropped == 0 && step.queued_at_end <= SUSTAINED_QUEUE && step.achieved >= step.offered * 0.97)
        .collect();
    let first_loss = steps.iter().find(|step| step.dropped > 0);
    Ok(json!({
        "steps": steps.iter().map(|step| json!({
            "offered_per_s": step.offered, "achieved_per_s": step.achieved, "sent": step.sent, "dropped": step.dropped,
            "queued_at_end": step.queued_at_end,
        })).collect::<Vec<_>>(),
        "max_sustained_per_s": sustained.last().map(|step| step.achieved),
        "first_loss_per_s": first_loss.map(|step| step.offered),
        "saturated_per_s": saturated,
        "rss_start_kib": rss_start_kib,
        "rss_after_flood_kib": rss_after_flood_kib,
        "graph_edges": engine_stats.graph_edges,
        "graph_nodes": engine_stats.graph_nodes,
        "edge_evictions": engine_stats.edge_evictions,
        "rss_with_edges_kib": rss_edges_kib,
        "edges_seconds": edges_seconds,
    })
    .to_string())
}

struct Step {
    offered: f64,
    achieved: f64,
    sent: u64,
    dropped: u64,
    /// Events still waiting in the channel when the step ended.
    queued_at_end: usize,
}

/// A step counts as sustained only when the pipeline kept up, not when the channel merely
/// absorbed the excess for the length of the step: at most this many events may still wait.
const SUSTAINED_QUEUE: usize = CHANNEL_CAPACITY / 8;

/// Offers rising event rates, each for `step_seconds`, until the channel drops events or the rate
/// passes what one producer thread can generate.
fn rate_steps(args: &PipelineArgs, sender: &mpsc::Sender<Event>, events: &mut SyntheticEvents) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut rate = args.start_rate;
    let duration = Duration::from_secs_f64(args.step_seconds);
    while rate <= MAX_RATE {
        let started = Instant::now();
        let (mut sent, mut dropped) = (0u64, 0u64);
        loop {
            let elapsed = started.elapsed();
            if elapsed >= duration {
                break;
            }
            let due = (rate * elapsed.as_secs_f64()) as u64;
            if sent + dropped >= due {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            for _ in (sent + dropped)..due {
                match sender.try_send(events.next_event()) {
                    Ok(()) => sent += 1,
                    Err(TrySendError::Full(_)) => dropped += 1,
                    Err(TrySendError::Closed(_)) => return steps,
                }
            }
        }
        let achieved = (sent + dropped) as f64 / started.elapsed().as_secs_f64();
        let queued_at_end = sender.max_capacity() - sender.capacity();
        eprintln!("pipeline: offered {rate:.0}/s, generated {achieved:.0}/s, dropped {dropped}, queued at the end {queued_at_end}");
        wait_drained(sender);
        let saturated_producer = achieved < rate * 0.97;
        steps.push(Step { offered: rate, achieved, sent, dropped, queued_at_end });
        if dropped > 0 || saturated_producer {
            break;
        }
        rate *= 1.5;
    }
    steps
}

/// Sends `count` events as fast as the channel accepts them and returns the events per second
/// the pipeline took, from the first send until the channel is empty again.
fn flood(count: u64, sender: &mpsc::Sender<Event>, events: &mut SyntheticEvents) -> f64 {
    let started = Instant::now();
    for _ in 0..count {
        if sender.blocking_send(events.next_event()).is_err() {
            break;
        }
    }
    wait_drained(sender);
    let rate = count as f64 / started.elapsed().as_secs_f64();
    eprintln!("pipeline: flood of {count} events at {rate:.0}/s");
    rate
}

fn wait_drained(sender: &mpsc::Sender<Event>) {
    while sender.capacity() < sender.max_capacity() {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A stream of events shaped like a host that forks, execs and opens loopback connections: per
/// process a fork, an exec, connect, connected, accepted, two closes and an exit.
#[derive(Default)]
struct SyntheticEvents {
    sequence: u64,
}

const FIRST_PID: u32 = 100_000;
const PIDS: u32 = 3_000_000;

impl SyntheticEvents {
    fn next_event(&mut self) -> Event {
        let process = self.sequence / 8;
        let phase = self.sequence % 8;
        self.sequence += 1;
        let ktime_ns = self.sequence * 1_000;
        let pid = FIRST_PID + (process % u64::from(PIDS)) as u32;
        let client_port = 20_000 + (process % 40_000) as u16;
        let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), client_port);
        let server = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
        let sock = 0xffff_0000_0000_0000 | (process << 1);
        let tcp = |kind, pid, local, remote, sock| Event::Tcp(tcp_event(ktime_ns, kind, pid, local, remote, sock));
        match phase {
            0 => Event::Fork(ForkEvent { ktime_ns, parent_pid: 1, child_pid: pid, cgroup_id: 1 }),
            1 => exec(ktime_ns, pid, "/usr/bin/true"),
            2 => tcp(TcpEventKind::Connect, pid, client, server, sock),
            3 => tcp(TcpEventKind::Connected, pid, client, server, sock),
            4 => tcp(TcpEventKind::Accepted, 0, server, client, sock | 1),
            5 => tcp(TcpEventKind::Close, pid, client, server, sock),
            6 => tcp(TcpEventKind::Close, 0, server, client, sock | 1),
            _ => Event::Exit(ExitEvent { ktime_ns, pid, tid: pid, exit_code: Some(0), lineage: None }),
        }
    }

    /// Events that give the graph one edge of its own: a process of one of 1,000 programs
    /// connecting to one of 100 ports on a remote host.
    fn distinct_edge(&mut self, index: u64) -> [Event; 3] {
        self.sequence += 3;
        let ktime_ns = self.sequence * 1_000;
        let pid = FIRST_PID + PIDS + (index % 1_000_000) as u32;
        let program = format!("/opt/driftwatch-bench/program-{}", index / 100);
        let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 30_000 + (index % 30_000) as u16);
        let remote = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 19, 0, 10)), 10_000 + (index % 100) as u16);
        let sock = 0xeeee_0000_0000_0000 | index;
        // Processes that match no component are grouped by cgroup, so each program gets a cgroup
        // of its own to make a node of its own.
        let mut exec = exec(ktime_ns, pid, &program);
        if let Event::Exec(event) = &mut exec {
            event.cgroup_id = 2 + index / 100;
        }
        [
            exec,
            Event::Tcp(tcp_event(ktime_ns, TcpEventKind::Connected, pid, local, remote, sock)),
            Event::Tcp(tcp_event(ktime_ns, TcpEventKind::Close, pid, local, remote, sock)),
        ]
    }
}

fn exec(ktime_ns: u64, pid: u32, filename: &str) -> Event {
    let name = filename.rsplit('/').next().unwrap_or(filename).to_string();
    Event::Exec(ExecEvent {
        ktime_ns,
        pid,
        tid: pid,
        filename: filename.to_string(),
        argv: vec![name.clone()],
        argv_truncated: false,
        uid: 0,
        gid: 0,
        cgroup_id: 1,
        comm: name.clone(),
        lineage: None,
        exe_name: name,
        exe_unlinked: Some(false),
        namespace_pid: None,
    })
}

fn tcp_event(ktime_ns: u64, kind: TcpEventKind, pid: u32, local: SocketAddr, remote: SocketAddr, sock: u64) -> TcpEvent {
    TcpEvent {
        ktime_ns,
        kind,
        pid,
        netns: 1,
        local,
        remote,
        sock,
        bytes_sent: 0,
        bytes_received: 0,
        error: 0,
        lineage: None,
        exe_unlinked: false,
        cgroup_id: 0,
        folded_client: None,
    }
}
