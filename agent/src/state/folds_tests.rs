use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use driftwatch_model::observation::{FlowObservation, ProcessInfo, Protocol};

use super::*;
use crate::state::sockets::PendingEnd;

fn process(pid: u32, exe: &str) -> Arc<ProcessInfo> {
    Arc::new(ProcessInfo {
        pid,
        ppid: 1,
        exe: exe.into(),
        argv: vec![exe.into()],
        argv_truncated: false,
        uid: 0,
        gid: 0,
        user: None,
        cgroup: String::new(),
        comm: String::new(),
        ancestry: Vec::new(),
        container: None,
        exec: Default::default(),
    })
}

fn end(pid: u32, netns: u32, exe: &str) -> PendingEnd {
    PendingEnd { pid, netns, process: Some(process(pid, exe)), time: SystemTime::UNIX_EPOCH }
}

fn observation(flow: &JoinedFlow) -> FlowObservation {
    FlowObservation {
        time: SystemTime::UNIX_EPOCH,
        protocol: Protocol::Tcp,
        client: flow.client.as_ref().and_then(|end| end.process.clone()),
        server: flow.server.as_ref().and_then(|end| end.process.clone()),
        client_addr: flow.client_addr,
        server_addr: flow.server_addr,
        netns: 5,
        remote_name: None,
    }
}

fn fold(flow: FoldedFlow) -> FoldEvent {
    FoldEvent { flow, connects: 3, taken_back: 1, established: 2, failed: 1, closes: 2, bytes_sent: 10, bytes_received: 20, ktime_ns: 1 }
}

fn enabled(mut folds: Folds) -> Folds {
    folds.enable();
    folds
}

#[test]
fn disabled_table_remembers_nothing() {
    let mut folds = Folds::new(Duration::from_millis(300), 16);
    let flow = JoinedFlow {
        client_addr: addr("10.0.0.1:40000"),
        server_addr: addr("10.0.0.2:80"),
        client: Some(end(1, 1, "/bin/app")),
        server: None,
    };
    folds.remember(&flow, &observation(&flow));
    assert!(folds.observation(&FoldedFlow::Out { netns: 1, pid: 1, server: addr("10.0.0.2:80") }).is_none());
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

#[test]
fn joined_flow_is_remembered_for_both_kernel_flows() {
    let mut folds = enabled(Folds::new(Duration::from_millis(300), 16));
    let flow = JoinedFlow {
        client_addr: addr("127.0.0.1:40000"),
        server_addr: addr("127.0.0.1:8080"),
        client: Some(end(10, 5, "/usr/bin/curl")),
        server: Some(end(20, 6, "/usr/sbin/nginx")),
    };
    folds.remember(&flow, &observation(&flow));

    let out = FoldedFlow::Out { netns: 5, pid: 10, server: addr("127.0.0.1:8080") };
    let repeated = folds.observation(&out).expect("outgoing flow");
    assert_eq!(repeated.client.as_ref().map(|p| p.pid), Some(10));
    assert_eq!(repeated.server.as_ref().map(|p| p.pid), Some(20));

    // The accepting end folds on its own only for clients the kernel does not report.
    let incoming = FoldedFlow::In { netns: 6, server: addr("127.0.0.1:8080"), client: "127.0.0.1".parse().unwrap() };
    let repeated = folds.observation(&incoming).expect("incoming flow");
    assert!(repeated.client.is_none());
    assert_eq!(repeated.server.as_ref().map(|p| p.pid), Some(20));
    assert_eq!(repeated.netns, 6);

    // Another client port of the same flow is the same kernel flow; another pid is not.
    assert!(folds.observation(&FoldedFlow::Out { netns: 5, pid: 11, server: addr("127.0.0.1:8080") }).is_none());
}

#[test]
fn failed_attempts_repeat_apart_from_connections() {
    let mut folds = enabled(Folds::new(Duration::from_millis(300), 16));
    let flow = JoinedFlow {
        client_addr: addr("10.0.0.1:40000"),
        server_addr: addr("10.0.0.2:5432"),
        client: Some(end(10, 5, "/usr/bin/app")),
        server: Some(end(20, 6, "/usr/bin/postgres")),
    };
    let refused = FlowObservation { server: None, ..observation(&flow) };
    folds.remember_failed(10, 5, &refused);
    let out = FoldedFlow::Out { netns: 5, pid: 10, server: addr("10.0.0.2:5432") };
    // A failed attempt gives no connection to repeat.
    assert!(folds.observation(&out).is_none());
    assert!(folds.failed_observation(&out).is_some_and(|failed| failed.server.is_none()));

    folds.remember(&flow, &observation(&flow));
    assert!(folds.observation(&out).is_some_and(|connected| connected.server.is_some()));
    assert!(folds.failed_observation(&out).is_some_and(|failed| failed.server.is_none()));
}

#[test]
fn held_counts_come_out_in_order() {
    let mut folds = enabled(Folds::new(Duration::from_millis(300), 16));
    let start = Instant::now();
    let first = FoldedFlow::Out { netns: 1, pid: 1, server: addr("10.0.0.2:80") };
    let second = FoldedFlow::Out { netns: 1, pid: 2, server: addr("10.0.0.2:80") };
    folds.hold(fold(first), start);
    folds.hold(fold(second), start + Duration::from_millis(100));
    assert_eq!(folds.next_deadline(), Some(start + Duration::from_millis(300)));
    assert!(folds.take_due(start + Duration::from_millis(299)).is_empty());
    let due = folds.take_due(start + Duration::from_millis(350));
    assert_eq!(due.iter().map(|fold| fold.flow).collect::<Vec<_>>(), [first]);
    assert_eq!(folds.take_all().iter().map(|fold| fold.flow).collect::<Vec<_>>(), [second]);
    assert_eq!(folds.stats.counts, 2);
    assert_eq!((folds.stats.closes, folds.stats.bytes_sent, folds.stats.bytes_received), (4, 20, 40));
}

#[test]
fn repeats_count_established_out_and_accepted_in() {
    // One of the two established was taken back: reported with its accepting end.
    let out = fold(FoldedFlow::Out { netns: 1, pid: 1, server: addr("10.0.0.2:80") });
    assert_eq!(repeats(&out), (1, 1));
    let incoming = fold(FoldedFlow::In { netns: 1, server: addr("10.0.0.2:80"), client: "10.0.0.9".parse().unwrap() });
    // One of the three was taken back: accepted by a process outside the scope or not expected.
    assert_eq!(repeats(&incoming), (2, 0));
}

#[test]
fn full_table_forgets_and_counts_its_flows() {
    let mut folds = enabled(Folds::new(Duration::from_millis(300), 2));
    for pid in 1..=3 {
        let flow = JoinedFlow {
            client_addr: addr("10.0.0.1:40000"),
            server_addr: addr("10.0.0.2:80"),
            client: Some(end(pid, 1, "/bin/app")),
            server: None,
        };
        folds.remember(&flow, &observation(&flow));
    }
    assert_eq!(folds.stats.flows_evicted, 1);
    assert!(folds.observation(&FoldedFlow::Out { netns: 1, pid: 3, server: addr("10.0.0.2:80") }).is_some());
    // The flow remembered first went first.
    assert!(folds.observation(&FoldedFlow::Out { netns: 1, pid: 1, server: addr("10.0.0.2:80") }).is_none());
    assert!(folds.observation(&FoldedFlow::Out { netns: 1, pid: 2, server: addr("10.0.0.2:80") }).is_some());
}
