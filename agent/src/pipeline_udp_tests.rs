//! The pipeline on synthetic UDP events: a server's replies to client ports become one flow from
//! the clients to the server's port, and a client's datagram stays a flow to its destination.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use driftwatch_model::observation::Protocol;
use driftwatch_model::{Engine, Model};

use super::{CgroupResolver, Pipeline, PipelineConfig, Shared};
use crate::api::hub::{DeviationHub, HubConfig};
use crate::events::{EventBuilder, EventDetail, EventKind};
use crate::telemetry::event::{Event, ExecEvent, UdpEvent, UdpEventKind};

const MODEL: &str = r#"version: 1
zones:
  - { id: internet, trust: 0, match: { cidrs: ["0.0.0.0/0", "::/0"] } }
  - { id: lab, trust: 50 }
components:
  - id: resolver
    zone: lab
    match: { cgroup: ["/test/resolver"] }
    executables: ["/usr/sbin/resolver"]
flows: []
exceptions: []
"#;

const RESOLVER_PID: u32 = 100;

/// Builds a pipeline with the default ephemeral range and hands it the resolver's exec.
fn pipeline() -> (Pipeline, Arc<Shared>) {
    let model = Model::parse(MODEL, "model.yaml").expect("the test model is valid");
    let shared = Arc::new(Shared { engine: Mutex::new(Engine::new(model)), stats: Mutex::new(Default::default()) });
    let hub = Arc::new(DeviationHub::new(HubConfig::default()));
    let resolve_cgroup: CgroupResolver = Box::new(|_| "/test/resolver".to_string());
    let mut pipeline = Pipeline::new(PipelineConfig::default(), shared.clone(), hub, resolve_cgroup);
    pipeline.handle(exec(RESOLVER_PID));
    (pipeline, shared)
}

/// Builds the exec of the resolver's program as process `pid`.
fn exec(pid: u32) -> Event {
    Event::Exec(ExecEvent {
        ktime_ns: 1_000,
        pid,
        tid: pid,
        filename: "/usr/sbin/resolver".to_string(),
        argv: vec!["resolver".to_string()],
        argv_truncated: false,
        uid: 0,
        gid: 0,
        cgroup_id: 1,
        comm: "resolver".to_string(),
        lineage: None,
        exe_name: "resolver".to_string(),
        exe_unlinked: Some(false),
        namespace_pid: None,
    })
}

/// Builds raw events the way the pipeline does for its subscribers.
fn event_builder<'a>(pipeline: &'a Pipeline, engine: &'a Engine) -> EventBuilder<'a> {
    EventBuilder {
        processes: &pipeline.processes,
        engine,
        dns: &pipeline.dns,
        clock: pipeline.clock,
        ephemeral_ports: pipeline.config.ephemeral_ports,
    }
}

fn udp_send(local: &str, remote: &str) -> Event {
    udp(UdpEventKind::Send, local, remote)
}

fn udp(kind: UdpEventKind, local: &str, remote: &str) -> Event {
    udp_of(RESOLVER_PID, kind, local, remote)
}

fn udp_of(pid: u32, kind: UdpEventKind, local: &str, remote: &str) -> Event {
    Event::Udp(UdpEvent {
        ktime_ns: 2_000,
        kind,
        pid,
        tid: pid,
        netns: 1,
        cookie: 7,
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
        cgroup_id: 1,
    })
}

#[test]
fn replies_to_client_ports_are_one_inbound_edge() {
    let (mut pipeline, shared) = pipeline();

    for port in [40001, 40002, 40003] {
        pipeline.handle(udp_send("0.0.0.0:53", &format!("198.51.100.7:{port}")));
    }

    let engine = shared.engine.lock().unwrap();
    let graph = engine.graph_snapshot();
    let edges: Vec<_> = graph.edges.iter().filter(|edge| edge.protocol == Protocol::Udp).collect();
    assert_eq!(edges.len(), 1, "{edges:#?}");
    assert_eq!(edges[0].source, "internet");
    assert_eq!(edges[0].destination, "resolver");
    assert_eq!(edges[0].port, 53);
    assert_eq!(edges[0].connections, 3);
    assert_eq!(edges[0].examples, [(RESOLVER_PID, "/usr/sbin/resolver".to_string())]);
    let ids: BTreeSet<String> = engine.deviations().into_iter().map(|deviation| deviation.id).collect();
    let expected: BTreeSet<String> = [
        "trust-boundary-crossing@internet@resolver@udp/53",
        "unexpected-flow@internet@resolver@udp/53",
    ]
    .map(str::to_string)
    .into();
    assert_eq!(ids, expected);
    assert_eq!(pipeline.stats.udp_replies, 3);
}

/// Returns the UDP edges of the graph as (source, destination, port, connections).
fn udp_edges(shared: &Shared) -> Vec<(String, String, u16, u64)> {
    let graph = shared.engine.lock().unwrap().graph_snapshot();
    let mut edges: Vec<_> = graph
        .edges
        .iter()
        .filter(|edge| edge.protocol == Protocol::Udp)
        .map(|edge| (edge.source.clone(), edge.destination.clone(), edge.port, edge.connections))
        .collect();
    edges.sort();
    edges
}

#[test]
fn received_datagrams_are_the_inbound_edge() {
    let (mut pipeline, shared) = pipeline();

    for port in [40001, 40002] {
        pipeline.handle(udp(UdpEventKind::Receive, "0.0.0.0:53", &format!("198.51.100.7:{port}")));
    }

    assert_eq!(udp_edges(&shared), [("internet".to_string(), "resolver".to_string(), 53, 2)]);
    assert_eq!(pipeline.stats.udp_receives, 2);
    assert_eq!(pipeline.stats.udp_replies_read, 0);
}

#[test]
fn reply_after_receive_adds_no_connection() {
    let (mut pipeline, shared) = pipeline();

    pipeline.handle(udp(UdpEventKind::Receive, "0.0.0.0:53", "198.51.100.7:40001"));
    pipeline.handle(udp_send("0.0.0.0:53", "198.51.100.7:40001"));
    // A client port the receive hook did not see: the reply is the only evidence of its flow.
    pipeline.handle(udp_send("0.0.0.0:53", "198.51.100.7:40002"));

    assert_eq!(udp_edges(&shared), [("internet".to_string(), "resolver".to_string(), 53, 2)]);
    assert_eq!(pipeline.stats.udp_replies, 2);
    assert_eq!(pipeline.stats.udp_replies_already_received, 1);
}

#[test]
fn reply_read_by_client_adds_no_edge() {
    let (mut pipeline, shared) = pipeline();

    pipeline.handle(udp_send("0.0.0.0:40001", "198.51.100.7:123"));
    pipeline.handle(udp(UdpEventKind::Receive, "0.0.0.0:40001", "198.51.100.7:123"));

    assert_eq!(udp_edges(&shared), [("resolver".to_string(), "internet".to_string(), 123, 1)]);
    assert_eq!(pipeline.stats.udp_receives, 1);
    assert_eq!(pipeline.stats.udp_replies_read, 1);
}

#[test]
fn client_datagram_stays_outbound() {
    let (mut pipeline, shared) = pipeline();

    pipeline.handle(udp_send("0.0.0.0:40001", "198.51.100.7:53"));
    pipeline.handle(udp_send("0.0.0.0:123", "198.51.100.7:123"));

    let graph = shared.engine.lock().unwrap().graph_snapshot();
    let mut edges: Vec<(String, String, u16)> = graph
        .edges
        .iter()
        .filter(|edge| edge.protocol == Protocol::Udp)
        .map(|edge| (edge.source.clone(), edge.destination.clone(), edge.port))
        .collect();
    edges.sort();
    let expected = [
        ("resolver".to_string(), "internet".to_string(), 53u16),
        ("resolver".to_string(), "internet".to_string(), 123u16),
    ];
    assert_eq!(edges, expected);
    assert_eq!(pipeline.stats.udp_replies, 0);
}

#[test]
fn reply_raw_event_keeps_kernel_addresses() {
    let (pipeline, _shared) = pipeline();
    let engine = pipeline.engine();
    let builder = event_builder(&pipeline, &engine);

    let reply = builder.build(&udp_send("0.0.0.0:53", "198.51.100.7:40001")).unwrap();
    assert_eq!(reply.placement.component, "resolver");
    let EventDetail::Socket(socket) = &reply.detail else { panic!("not a socket event: {reply:?}") };
    assert_eq!(socket.local, "0.0.0.0:53".parse::<SocketAddr>().unwrap());
    assert_eq!(socket.remote, "198.51.100.7:40001".parse::<SocketAddr>().unwrap());
    assert!(socket.is_reply);
    assert_eq!(socket.remote_placement.component, "internet");

    let query = builder.build(&udp_send("0.0.0.0:40001", "198.51.100.7:53")).unwrap();
    let EventDetail::Socket(socket) = &query.detail else { panic!("not a socket event: {query:?}") };
    assert!(!socket.is_reply);
    assert_eq!(query.placement.component, "resolver");
    assert_eq!(socket.remote_placement.component, "internet");
}

#[test]
fn receive_raw_event_is_marked_received() {
    let (pipeline, _shared) = pipeline();
    let engine = pipeline.engine();
    let builder = event_builder(&pipeline, &engine);

    let read = builder.build(&udp(UdpEventKind::Receive, "0.0.0.0:53", "198.51.100.7:40001")).unwrap();
    let EventDetail::Socket(socket) = &read.detail else { panic!("not a socket event: {read:?}") };
    assert!(socket.received);
    assert!(!socket.is_reply, "a datagram the server read is not its reply");
    assert_eq!(socket.remote, "198.51.100.7:40001".parse::<SocketAddr>().unwrap());

    let sent = builder.build(&udp_send("0.0.0.0:53", "198.51.100.7:40001")).unwrap();
    let EventDetail::Socket(socket) = &sent.detail else { panic!("not a socket event: {sent:?}") };
    assert!(!socket.received);
    assert!(socket.is_reply);
}

#[test]
fn bind_is_listener_not_flow() {
    let (mut pipeline, shared) = pipeline();

    pipeline.handle(udp(UdpEventKind::Bind, "0.0.0.0:514", "0.0.0.0:0"));

    let engine = shared.engine.lock().unwrap();
    let ids: Vec<String> = engine.deviations().into_iter().map(|deviation| deviation.id).collect();
    assert_eq!(ids, ["new-listener@resolver@0.0.0.0@udp/514"]);
    assert!(engine.graph_snapshot().edges.is_empty());
    assert_eq!(pipeline.stats.udp_binds, 1);
    assert_eq!(pipeline.stats.udp_flows, 0);
    assert_eq!(pipeline.stats.flows, 0);
}

#[test]
fn bind_raw_event_is_udp_listen() {
    let (pipeline, _shared) = pipeline();
    let engine = pipeline.engine();
    let builder = event_builder(&pipeline, &engine);

    let bound = builder.build(&udp(UdpEventKind::Bind, "[::]:514", "[::]:0")).unwrap();
    assert_eq!(bound.kind, EventKind::UdpListen);
    assert_eq!(bound.placement.component, "resolver");
    let EventDetail::Socket(socket) = &bound.detail else { panic!("not a socket event: {bound:?}") };
    assert!(!socket.is_reply, "a bind is no reply");
    assert!(!socket.received);
    assert_eq!(socket.local, "[::]:514".parse::<SocketAddr>().unwrap());
}

#[test]
fn flow_to_local_listener_is_one_edge() {
    let (mut pipeline, shared) = pipeline();
    const CLIENT_PID: u32 = 101;
    pipeline.handle(exec(CLIENT_PID));

    pipeline.handle(udp(UdpEventKind::Bind, "0.0.0.0:7010", "0.0.0.0:0"));
    pipeline.handle(udp_of(CLIENT_PID, UdpEventKind::Send, "0.0.0.0:45000", "127.0.0.1:7010"));
    // The server reads the datagram and echoes it: both records belong to the joined flow.
    pipeline.handle(udp(UdpEventKind::Receive, "0.0.0.0:7010", "127.0.0.1:45000"));
    pipeline.handle(udp_send("0.0.0.0:7010", "127.0.0.1:45000"));
    // Another client port is another flow, and a remote client is a flow of its own.
    pipeline.handle(udp_of(CLIENT_PID, UdpEventKind::Send, "0.0.0.0:45001", "127.0.0.1:7010"));
    pipeline.handle(udp(UdpEventKind::Receive, "0.0.0.0:7010", "198.51.100.7:40001"));

    let expected = [
        ("internet".to_string(), "resolver".to_string(), 7010, 1),
        ("resolver".to_string(), "resolver".to_string(), 7010, 2),
    ];
    assert_eq!(udp_edges(&shared), expected);
    let stats = pipeline.local_udp.stats();
    assert_eq!((stats.listeners, stats.joined, stats.server_ends_joined), (1, 2, 2));
    let graph = shared.engine.lock().unwrap().graph_snapshot();
    let edge = graph.edges.iter().find(|edge| edge.source == "resolver" && edge.destination == "resolver").unwrap();
    assert_eq!(edge.examples, [(CLIENT_PID, "/usr/sbin/resolver".to_string())]);
}

#[test]
fn exited_listener_joins_nothing() {
    let (mut pipeline, shared) = pipeline();
    const CLIENT_PID: u32 = 101;
    pipeline.handle(exec(CLIENT_PID));
    pipeline.handle(udp(UdpEventKind::Bind, "0.0.0.0:7010", "0.0.0.0:0"));
    pipeline.handle(Event::Exit(crate::telemetry::event::ExitEvent { ktime_ns: 1_500, pid: RESOLVER_PID, tid: RESOLVER_PID, exit_code: Some(0), lineage: None }));

    pipeline.handle(udp_of(CLIENT_PID, UdpEventKind::Send, "0.0.0.0:45000", "127.0.0.1:7010"));

    assert_eq!(udp_edges(&shared), [("resolver".to_string(), "internet".to_string(), 7010, 1)]);
    assert_eq!(pipeline.local_udp.stats().joined, 0);
}
