//! The pipeline on synthetic TCP events of folded connections: an accepted end that names its
//! folded connecting process joins it, and counts read from the kernel repeat the flow's last
//! joined connection.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use driftwatch_model::observation::Protocol;
use driftwatch_model::{Engine, Model};

use super::{CgroupResolver, Pipeline, PipelineConfig, Shared};
use crate::api::hub::{DeviationHub, HubConfig};
use crate::telemetry::event::{Event, ExecEvent, FoldEvent, FoldedFlow, TcpEvent, TcpEventKind};

const MODEL: &str = r#"version: 1
zones:
  - { id: internet, trust: 0, match: { cidrs: ["0.0.0.0/0", "::/0"] } }
  - { id: lab, trust: 50 }
components:
  - id: client
    zone: lab
    match: { cgroup: ["/test/client"] }
  - id: server
    zone: lab
    match: { cgroup: ["/test/server"] }
flows: []
exceptions: []
"#;

const CLIENT_PID: u32 = 10;
const SERVER_PID: u32 = 20;
const NETNS: u32 = 5;
const SERVER: &str = "127.0.0.1:8080";

/// Builds a pipeline with the exec of the client's and the server's programs and the server's listen.
fn pipeline() -> (Pipeline, Arc<Shared>) {
    let model = Model::parse(MODEL, "model.yaml").expect("the test model is valid");
    let shared = Arc::new(Shared { engine: Mutex::new(Engine::new(model)), stats: Mutex::new(Default::default()) });
    let hub = Arc::new(DeviationHub::new(HubConfig::default()));
    let resolve_cgroup: CgroupResolver =
        Box::new(|id| if id == 1 { "/test/client".to_string() } else { "/test/server".to_string() });
    let mut pipeline = Pipeline::new(PipelineConfig::default(), shared.clone(), hub, resolve_cgroup);
    pipeline.track_folds();
    pipeline.handle(exec(CLIENT_PID, 1, "/usr/bin/client"));
    pipeline.handle(exec(SERVER_PID, 2, "/usr/bin/server"));
    pipeline.handle(tcp(TcpEventKind::Listen, SERVER_PID, SERVER, "0.0.0.0:0", 1));
    (pipeline, shared)
}

fn exec(pid: u32, cgroup_id: u64, filename: &str) -> Event {
    Event::Exec(ExecEvent {
        ktime_ns: 1_000,
        pid,
        tid: pid,
        filename: filename.to_string(),
        argv: vec![filename.to_string()],
        argv_truncated: false,
        uid: 0,
        gid: 0,
        cgroup_id,
        comm: "test".to_string(),
        lineage: None,
        exe_name: "test".to_string(),
        exe_unlinked: Some(false),
        namespace_pid: None,
    })
}

fn tcp(kind: TcpEventKind, pid: u32, local: &str, remote: &str, sock: u64) -> Event {
    Event::Tcp(TcpEvent {
        ktime_ns: 2_000,
        kind,
        pid,
        netns: NETNS,
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
        sock,
        bytes_sent: 0,
        bytes_received: 0,
        error: 0,
        lineage: None,
        exe_unlinked: false,
        cgroup_id: 0,
        folded_client: None,
    })
}

/// Returns the TCP edges of the graph as (source, destination, port, connections).
fn tcp_edges(shared: &Shared) -> Vec<(String, String, u16, u64)> {
    let graph = shared.engine.lock().unwrap().graph_snapshot();
    let mut edges: Vec<_> = graph
        .edges
        .iter()
        .filter(|edge| edge.protocol == Protocol::Tcp)
        .map(|edge| (edge.source.clone(), edge.destination.clone(), edge.port, edge.connections))
        .collect();
    edges.sort();
    edges
}

fn edge(source: &str, destination: &str, connections: u64) -> (String, String, u16, u64) {
    (source.to_string(), destination.to_string(), 8080, connections)
}

#[test]
fn folded_client_joins_accepted_end() {
    let (mut pipeline, shared) = pipeline();
    let Event::Tcp(mut accepted) = tcp(TcpEventKind::Accepted, 0, SERVER, "127.0.0.1:40000", 2) else { unreachable!() };
    accepted.folded_client = Some((CLIENT_PID, NETNS));
    pipeline.handle(Event::Tcp(accepted));
    pipeline.finish();

    assert_eq!(tcp_edges(&shared), [edge("client", "server", 1)]);
}

#[test]
fn counts_repeat_the_last_joined_connection() {
    let (mut pipeline, shared) = pipeline();
    pipeline.handle(tcp(TcpEventKind::Connected, CLIENT_PID, "127.0.0.1:40000", SERVER, 3));
    pipeline.handle(tcp(TcpEventKind::Accepted, 0, SERVER, "127.0.0.1:40000", 4));
    pipeline.finish();
    assert_eq!(tcp_edges(&shared), [edge("client", "server", 1)]);

    let server: SocketAddr = SERVER.parse().unwrap();
    // Seven folded connections completed, two of them were reported with their accepting end.
    let fold = FoldEvent {
        flow: FoldedFlow::Out { netns: NETNS, pid: CLIENT_PID, server },
        connects: 7,
        taken_back: 2,
        established: 7,
        failed: 0,
        closes: 7,
        bytes_sent: 0,
        bytes_received: 0,
        ktime_ns: 3_000,
    };
    pipeline.handle(Event::Fold(fold));
    pipeline.finish();

    assert_eq!(tcp_edges(&shared), [edge("client", "server", 6)]);
    assert_eq!(pipeline.folds.stats.connections, 5);
    assert_eq!(pipeline.folds.stats.without_flow, 0);
}
