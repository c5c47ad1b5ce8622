//! Builders shared by the integration tests: the example model, processes and observations.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use driftwatch_model::observation::{
    ExecObservation, FlowObservation, ListenObservation, ProcessInfo, Protocol,
};
use driftwatch_model::deviation::Deviation;
use driftwatch_model::Model;

/// The example model of the design notes, with a host zone for loopback added in `three_tier`.
pub const SKETCH: &str = include_str!("sketch.yaml");

/// Three tiers (web, api, db) with zones that have CIDRs, for engine tests.
pub const THREE_TIER: &str = r#"version: 1
zones:
  - id: internet
    trust: 0
    match: { cidrs: ["0.0.0.0/0", "::/0"] }
  - id: partners
    trust: 30
    match: { cidrs: ["198.51.100.0/24"] }
  - id: dmz
    trust: 40
  - id: core
    trust: 80
    match: { cidrs: ["10.20.0.0/16"] }
components:
  - id: web
    zone: dmz
    exposed: true
    match: { exe: ["/usr/sbin/nginx"], cgroup: ["/system.slice/nginx.service"] }
    listens: [{ port: 443 }]
  - id: api
    zone: dmz
    match: { exe: ["/opt/api/bin/*"], user: [api, 1001] }
    listens: [{ port: 8080, address: "127.0.0.1" }]
    executables: ["/opt/api/bin/*", "/usr/bin/python3*"]
  - id: db
    zone: core
    criticality: critical
    match: { exe: ["/usr/lib/postgresql/*/bin/postgres"] }
    listens: [{ port: 5432 }]
  - id: backup
    zone: core
    match: { cgroup: ["/system.slice/backup.service"] }
flows:
  - { from: internet, to: web, port: 443 }
  - { from: web, to: api, port: 8080 }
  - { from: api, to: db, port: 5432 }
  - { from: core, to: internet, port: 53, proto: udp }
exceptions:
  - { id: "unexpected-flow@api@internet@udp/*", reason: "pip mirror", expires: 2030-01-01 }
  - { id: "new-listener@backup@*", reason: "expired waiver", expires: 2020-01-01 }
"#;

pub fn model(text: &str) -> Model {
    match Model::parse(text, "test.yaml") {
        Ok(model) => model,
        Err(errors) => panic!("model should parse:\n{errors}"),
    }
}

/// A fixed observation clock: 2025-01-01T00:00:00Z plus `seconds`.
pub fn at(seconds: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_735_689_600 + seconds)
}

pub fn process(pid: u32, exe: &str, cgroup: &str) -> ProcessInfo {
    ProcessInfo {
        pid,
        ppid: 1,
        exe: exe.to_owned(),
        argv: vec![exe.to_owned()],
        argv_truncated: false,
        uid: 0,
        gid: 0,
        user: Some("root".to_owned()),
        cgroup: cgroup.to_owned(),
        comm: exe
            .rsplit('/')
            .next()
            .unwrap_or(exe)
            .chars()
            .take(15)
            .collect(),
        ancestry: vec![(1, "/usr/lib/systemd/systemd".to_owned())],
        container: None,
        exec: Default::default(),
    }
}

pub fn nginx() -> ProcessInfo {
    process(100, "/usr/sbin/nginx", "/system.slice/nginx.service")
}

pub fn api() -> ProcessInfo {
    ProcessInfo {
        uid: 1001,
        user: Some("api".to_owned()),
        ..process(200, "/opt/api/bin/server", "/system.slice/api.service")
    }
}

pub fn postgres() -> ProcessInfo {
    process(
        300,
        "/usr/lib/postgresql/16/bin/postgres",
        "/system.slice/postgresql.service",
    )
}

pub fn addr(text: &str) -> SocketAddr {
    text.parse().expect("test socket address")
}

pub fn exec(time: SystemTime, process: ProcessInfo) -> ExecObservation {
    ExecObservation {
        time,
        process: Arc::new(process),
    }
}

pub fn listen(time: SystemTime, process: ProcessInfo, bound: &str) -> ListenObservation {
    ListenObservation {
        time,
        process: Arc::new(process),
        addr: addr(bound),
        protocol: Protocol::Tcp,
        netns: 4026531840,
    }
}

/// A TCP flow; `None` for a side means it is only an address, not a process on this host.
pub fn flow(
    time: SystemTime,
    client: Option<ProcessInfo>,
    client_addr: &str,
    server: Option<ProcessInfo>,
    server_addr: &str,
) -> FlowObservation {
    FlowObservation {
        time,
        protocol: Protocol::Tcp,
        client: client.map(Arc::new),
        server: server.map(Arc::new),
        client_addr: addr(client_addr),
        server_addr: addr(server_addr),
        netns: 4026531840,
        remote_name: None,
    }
}

/// Small edits to a test process.
pub trait ProcessInfoExt {
    fn with_pid(self, pid: u32) -> ProcessInfo;
}

impl ProcessInfoExt for ProcessInfo {
    fn with_pid(self, pid: u32) -> ProcessInfo {
        ProcessInfo { pid, ..self }
    }
}

/// Feeds `bursts` of repeated connections (an observation and how many times it repeats) to two
/// engines on `model`: one connection at a time, and one burst at a time through
/// `Engine::observe_flow_repeated`. Checks that both return the same deviations and end in the
/// same state; returns the deviations.
pub fn assert_bursts_match_single_observations(model: &str, bursts: &[(FlowObservation, u64)]) -> Vec<Deviation> {
    let mut single = driftwatch_model::Engine::new(self::model(model));
    let mut batched = driftwatch_model::Engine::new(self::model(model));
    let mut raised_single = Vec::new();
    let mut raised_batched = Vec::new();
    for (observation, count) in bursts {
        for _ in 0..*count {
            raised_single.extend(single.observe_flow(observation));
        }
        raised_batched.extend(batched.observe_flow_repeated(observation, *count));
    }
    assert_eq!(raised_batched, raised_single, "deviations returned");
    assert_eq!(batched.deviations(), single.deviations(), "deviation table");
    assert_eq!(batched.graph_snapshot(), single.graph_snapshot(), "graph");
    assert_eq!(batched.stats(), single.stats(), "engine counters");
    assert_eq!(batched.control_checks(), single.control_checks(), "deny flow checks");
    raised_batched
}
