//! The gRPC API end to end, without a kernel: a real tonic server on a unix socket or loopback
//! TCP, fed by the test through a `DeviationHub` and a fake `AgentView`, and a real client.

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use driftwatch::api::convert::{
    category_to_proto, deviation_from_proto, graph_from_proto, severity_to_proto,
};
use driftwatch::api::{
    connect, serve_on, AgentView, ApiListener, DeviationHub, HookStatus, HubConfig, ListenAddr,
    ModelInfo, StatusSnapshot,
};
use driftwatch_model::deviation::{Category, Deviation, Evidence, Severity, Stride};
use driftwatch_model::graph::{EdgeSnapshot, GraphSnapshot, NodeKind, NodeSnapshot};
use driftwatch_model::observation::{ProcessInfo, Protocol};
use driftwatch_proto::v1 as pb;
use pb::agent_service_client::AgentServiceClient;
use pb::stream_deviations_response::Payload;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Streaming;

/// Bounds every wait on the server, so a broken stream fails the test instead of hanging it.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

fn epoch(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn deviation(n: u64, category: Category, severity: Severity) -> Deviation {
    Deviation {
        id: format!("{}@web@db@tcp/{n}", category.as_str()),
        category,
        severity,
        stride: Stride::InformationDisclosure,
        summary: format!("deviation {n}"),
        source: "web".into(),
        destination: "db".into(),
        protocol: Some(Protocol::Tcp),
        port: Some(5432),
        evidence: Evidence {
            process: Some(ProcessInfo {
                pid: 4242,
                ppid: 1,
                exe: "/usr/bin/curl".into(),
                argv: vec!["curl".into(), "db:5432".into()],
                argv_truncated: false,
                uid: 33,
                gid: 33,
                user: Some("www-data".into()),
                cgroup: "/system.slice/nginx.service".into(),
                comm: "curl".into(),
                ancestry: vec![(4000, "/bin/bash".into()), (1, "/sbin/init".into())],
                container: None,
                exec: Default::default(),
            }),
            peer_process: None,
            local_addr: Some("10.0.0.1:43210".parse().unwrap()),
            remote_addr: Some("[fd00::2]:5432".parse().unwrap()),
            source_zone: Some("dmz".into()),
            destination_zone: Some("core".into()),
            netns: 4026531840,
            remote_name: None,
        },
        first_seen: epoch(1_700_000_000),
        last_seen: epoch(1_700_000_000 + n),
        count: n,
        resolution: "flows:\n  - { from: web, to: db, port: 5432 }\n".into(),
    }
}

fn flow(n: u64) -> Deviation {
    deviation(n, Category::UnexpectedFlow, Severity::Medium)
}

struct FakeView;

impl FakeView {
    fn graph_snapshot() -> GraphSnapshot {
        GraphSnapshot {
            nodes: vec![
                NodeSnapshot {
                    id: "web".into(),
                    kind: NodeKind::Declared,
                    zone: Some("dmz".into()),
                    processes: Vec::new(),
                },
                NodeSnapshot {
                    id: "db".into(),
                    kind: NodeKind::Declared,
                    zone: Some("core".into()),
                    processes: Vec::new(),
                },
                NodeSnapshot {
                    id: "unknown:/usr/bin/curl".into(),
                    kind: NodeKind::Discovered,
                    zone: None,
                    processes: Vec::new(),
                },
            ],
            edges: vec![EdgeSnapshot {
                source: "web".into(),
                destination: "db".into(),
                protocol: Protocol::Tcp,
                port: 5432,
                declared: true,
                first_seen: epoch(1_700_000_000),
                last_seen: epoch(1_700_000_500),
                connections: 31,
                examples: vec![(77, "/usr/sbin/nginx".into())],
                remote_names: vec![],
            }],
        }
    }
}

impl AgentView for FakeView {
    fn graph(&self) -> GraphSnapshot {
        FakeView::graph_snapshot()
    }

    fn status(&self) -> StatusSnapshot {
        StatusSnapshot {
            version: "9.8.7".into(),
            started_at: SystemTime::now() - Duration::from_secs(120),
            hooks: vec![
                HookStatus {
                    name: "sched_process_exec".into(),
                    attached: true,
                    error: None,
                },
                HookStatus {
                    name: "cgroup_connect6".into(),
                    attached: false,
                    error: Some("cgroup2 is not mounted".into()),
                },
            ],
            counters: vec![("events_received".into(), 1234), ("events_lost".into(), 0)],
            model: Some(ModelInfo {
                path: PathBuf::from("/etc/driftwatch/model.yaml"),
                loaded_at: epoch(1_700_000_000),
                zones: 3,
                components: 5,
                flows: 7,
            }),
        }
    }
}

/// A running server and the handles to feed and stop it.
struct Agent {
    addr: ListenAddr,
    hub: Arc<DeviationHub>,
    shutdown: CancellationToken,
    server: JoinHandle<anyhow::Result<()>>,
}

impl Agent {
    /// Binds before spawning, so the socket accepts connections once this returns.
    async fn start(addr: ListenAddr, config: HubConfig) -> Agent {
        let listener = ApiListener::bind(&addr)
            .await
            .expect("bind the API listener");
        let addr = listener.local_addr().unwrap();
        let hub = Arc::new(DeviationHub::new(config));
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_on(
            listener,
            Arc::clone(&hub),
            Arc::new(FakeView),
            shutdown.clone(),
        ));
        Agent {
            addr,
            hub,
            shutdown,
            server,
        }
    }

    async fn start_tcp() -> Agent {
        Agent::start("127.0.0.1:0".parse().unwrap(), HubConfig::default()).await
    }

    async fn client(&self) -> AgentServiceClient<Channel> {
        connect(&self.addr).await.expect("connect to the API")
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(STEP_TIMEOUT, self.server)
            .await
            .expect("server stops within the timeout")
            .expect("server task does not panic");
        result.expect("server exits cleanly");
    }
}

/// Subscribes and returns once the server has registered the subscription: tonic resolves the
/// call when the response headers arrive, which the server sends after `subscribe` returned.
async fn subscribe(
    client: &mut AgentServiceClient<Channel>,
    request: pb::StreamDeviationsRequest,
) -> Streaming<pb::StreamDeviationsResponse> {
    client
        .stream_deviations(request)
        .await
        .expect("subscribe")
        .into_inner()
}

async fn next_message(
    stream: &mut Streaming<pb::StreamDeviationsResponse>,
) -> pb::StreamDeviationsResponse {
    tokio::time::timeout(STEP_TIMEOUT, stream.message())
        .await
        .expect("a message arrives within the timeout")
        .expect("the stream has no error")
        .expect("the stream is still open")
}

fn deviation_of(response: pb::StreamDeviationsResponse) -> (u64, Deviation) {
    match response.payload {
        Some(Payload::Deviation(deviation)) => (
            response.sequence,
            deviation_from_proto(deviation).expect("valid deviation"),
        ),
        other => panic!(
            "expected a deviation at sequence {}, got {other:?}",
            response.sequence
        ),
    }
}

#[tokio::test]
async fn unix_socket_serves_status_and_graph() {
    let dir = tempfile::tempdir().unwrap();
    // The parent directory does not exist yet: binding creates it.
    let path = dir.path().join("run/driftwatch/api.sock");
    let agent = Agent::start(ListenAddr::Unix(path.clone()), HubConfig::default()).await;

    let metadata = std::fs::metadata(&path).unwrap();
    assert!(metadata.file_type().is_socket());
    assert_eq!(metadata.permissions().mode() & 0o777, 0o660);

    agent.hub.publish(flow(1));
    agent.hub.publish(flow(2));
    let mut client = agent.client().await;
    let status = client
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.version, "9.8.7");
    assert_eq!(status.hooks.len(), 2);
    assert_eq!(status.hooks[1].name, "cgroup_connect6");
    assert!(!status.hooks[1].attached);
    assert_eq!(status.hooks[1].error, "cgroup2 is not mounted");
    let counters: Vec<(&str, u64)> = status
        .counters
        .iter()
        .map(|c| (c.name.as_str(), c.value))
        .collect();
    assert_eq!(
        &counters[..2],
        &[("events_received", 1234), ("events_lost", 0)]
    );
    assert!(counters.contains(&("api_published", 2)), "{counters:?}");
    let uptime = status.uptime.unwrap().seconds;
    assert!((120..130).contains(&uptime), "uptime {uptime}");
    let model = status.model.unwrap();
    assert_eq!(model.path, "/etc/driftwatch/model.yaml");
    assert_eq!((model.zones, model.components, model.flows), (3, 5, 7));
    assert_eq!(
        (status.last_sequence, status.oldest_retained_sequence),
        (2, 1)
    );

    let graph = client
        .get_graph(pb::GetGraphRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(graph.taken_at.is_some());
    assert_eq!(graph_from_proto(graph).unwrap(), FakeView::graph_snapshot());

    agent.stop().await;
    assert!(!path.exists(), "the socket file is removed at shutdown");
}

#[tokio::test]
async fn tcp_loopback_serves_status() {
    let agent = Agent::start_tcp().await;
    let ListenAddr::Tcp(socket_addr) = agent.addr else {
        panic!("{}", agent.addr)
    };
    assert_ne!(
        socket_addr.port(),
        0,
        "the listener reports the port it was given"
    );

    let mut client = agent.client().await;
    let status = client
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.version, "9.8.7");
    agent.stop().await;
}

#[tokio::test]
async fn bind_replaces_only_stale_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    // A listener that is dropped leaves its socket file behind, as a crashed agent does.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());

    let agent = Agent::start(ListenAddr::Unix(path.clone()), HubConfig::default()).await;
    let err = ApiListener::bind(&ListenAddr::Unix(path.clone()))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("already serving"), "{err:#}");
    agent.stop().await;

    std::fs::write(&path, "not a socket").unwrap();
    let err = ApiListener::bind(&ListenAddr::Unix(path.clone()))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("is not a socket"), "{err:#}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
}

#[tokio::test]
#[allow(deprecated, reason = "the fields that predate the filter lists are still honoured")]
async fn stream_filters_by_min_severity_and_category() {
    let agent = Agent::start_tcp().await;
    let mut client = agent.client().await;
    let request = pb::StreamDeviationsRequest {
        min_severity: severity_to_proto(Severity::High) as i32,
        categories: vec![
            category_to_proto(Category::UnexpectedFlow) as i32,
            category_to_proto(Category::NewListener) as i32,
        ],
        exclude_categories: vec![],
        from_sequence: None,
        ..Default::default()
    };
    let mut stream = subscribe(&mut client, request).await;

    let published = [
        (Category::UnexpectedFlow, Severity::Low),
        (Category::UnexpectedFlow, Severity::High),
        (Category::TelemetryGap, Severity::Critical),
        (Category::NewListener, Severity::Elevated),
        (Category::NewListener, Severity::Critical),
        (Category::UnexpectedExecutable, Severity::Critical),
        (Category::UnexpectedFlow, Severity::Critical),
    ];
    for (n, (category, severity)) in published.iter().enumerate() {
        agent
            .hub
            .publish(deviation(n as u64 + 1, *category, *severity));
    }

    let mut received = Vec::new();
    for _ in 0..3 {
        let (sequence, deviation) = deviation_of(next_message(&mut stream).await);
        received.push((sequence, deviation.category, deviation.severity));
    }
    assert_eq!(
        received,
        vec![
            (2, Category::UnexpectedFlow, Severity::High),
            (5, Category::NewListener, Severity::Critical),
            (7, Category::UnexpectedFlow, Severity::Critical),
        ]
    );
    agent.stop().await;
}

#[tokio::test]
async fn stream_deviation_keeps_every_field() {
    let agent = Agent::start_tcp().await;
    let mut client = agent.client().await;
    let mut stream = subscribe(&mut client, pb::StreamDeviationsRequest::default()).await;

    let sent = flow(3);
    agent.hub.publish(sent.clone());
    let (sequence, received) = deviation_of(next_message(&mut stream).await);
    assert_eq!(sequence, 1);
    assert_eq!(received, sent);
    agent.stop().await;
}

#[tokio::test]
async fn replay_from_sequence_sends_later_ones_then_follows() {
    let agent = Agent::start_tcp().await;
    for n in 1..=5 {
        agent.hub.publish(flow(n));
    }
    let mut client = agent.client().await;
    let request = pb::StreamDeviationsRequest {
        from_sequence: Some(3),
        ..Default::default()
    };
    let mut stream = subscribe(&mut client, request).await;

    for expected in 3..=5 {
        let (sequence, deviation) = deviation_of(next_message(&mut stream).await);
        assert_eq!(sequence, expected);
        assert_eq!(deviation.summary, format!("deviation {expected}"));
    }
    agent.hub.publish(flow(6));
    agent.hub.publish(flow(7));
    for expected in 6..=7 {
        let (sequence, _) = deviation_of(next_message(&mut stream).await);
        assert_eq!(sequence, expected);
    }
    agent.stop().await;
}

#[tokio::test]
async fn replay_past_history_starts_with_loss_notice() {
    let config = HubConfig {
        history_capacity: 4,
        subscriber_capacity: 64,
    };
    let agent = Agent::start("127.0.0.1:0".parse().unwrap(), config).await;
    for n in 1..=10 {
        agent.hub.publish(flow(n));
    }
    let mut client = agent.client().await;
    let request = pb::StreamDeviationsRequest {
        from_sequence: Some(0),
        ..Default::default()
    };
    let mut stream = subscribe(&mut client, request).await;

    let first = next_message(&mut stream).await;
    assert_eq!(first.sequence, 6);
    let Some(Payload::Loss(notice)) = first.payload else {
        panic!("{first:?}")
    };
    assert_eq!(
        (notice.missed, notice.first_sequence, notice.last_sequence),
        (6, 1, 6)
    );
    assert_eq!(notice.reason, pb::LossReason::HistoryEvicted as i32);
    for expected in 7..=10 {
        assert_eq!(deviation_of(next_message(&mut stream).await).0, expected);
    }
    agent.stop().await;
}

#[tokio::test]
async fn replay_from_future_sequence_is_invalid_argument() {
    let agent = Agent::start_tcp().await;
    agent.hub.publish(flow(1));
    let mut client = agent.client().await;
    let request = pb::StreamDeviationsRequest {
        from_sequence: Some(50),
        ..Default::default()
    };
    let status = client
        .stream_deviations(request)
        .await
        .expect_err("the request is rejected");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("replay start 50 is ahead of the newest sequence, 1,"),
        "{}",
        status.message()
    );
    agent.stop().await;
}

#[tokio::test]
async fn events_without_event_hub_are_unimplemented() {
    let agent = Agent::start_tcp().await;
    let mut client = agent.client().await;
    let request = pb::StreamDeviationsRequest {
        events: vec![pb::EventKind::ProcessExec as i32],
        ..Default::default()
    };
    let status = client
        .stream_deviations(request)
        .await
        .expect_err("the request is rejected");
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert_eq!(status.message(), driftwatch::api::server::NO_RAW_EVENTS);
}

#[tokio::test]
async fn mixed_filter_is_invalid_argument() {
    let agent = Agent::start_tcp().await;
    let mut client = agent.client().await;
    let request = pb::StreamDeviationsRequest {
        deny: vec![pb::DeviationFilter {
            categories: vec![pb::Category::UnexpectedFlow as i32],
            event_kinds: vec![pb::EventKind::TcpClose as i32],
            ..Default::default()
        }],
        ..Default::default()
    };
    let status = client
        .stream_deviations(request)
        .await
        .expect_err("the request is rejected");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("deny[0]: a filter concerns deviations"), "{}", status.message());
}

#[tokio::test]
#[allow(deprecated, reason = "the fields that predate the filter lists are still validated")]
async fn unknown_filter_category_is_invalid_argument() {
    let agent = Agent::start_tcp().await;
    let mut client = agent.client().await;
    let request = pb::StreamDeviationsRequest {
        categories: vec![99],
        ..Default::default()
    };
    let status = client
        .stream_deviations(request)
        .await
        .expect_err("the request is rejected");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    agent.stop().await;
}

#[tokio::test]
async fn slow_subscriber_gets_loss_notice_with_right_count() {
    let config = HubConfig {
        history_capacity: 16,
        subscriber_capacity: 8,
    };
    let agent = Agent::start("127.0.0.1:0".parse().unwrap(), config).await;
    let mut client = agent.client().await;
    let mut stream = subscribe(&mut client, pb::StreamDeviationsRequest::default()).await;
    agent.hub.publish(flow(1));
    assert_eq!(deviation_of(next_message(&mut stream).await).0, 1);

    // The client reads nothing while this runs. Each deviation carries 4 KiB, so 2000 of them are
    // far more than the HTTP/2 flow-control windows and the 8-slot buffer can hold.
    let padding = "x".repeat(4096);
    let last_sequence = 2001;
    for n in 2..=last_sequence {
        let mut deviation = flow(n);
        deviation.summary = padding.clone();
        agent.hub.publish(deviation);
    }

    let mut delivered = BTreeSet::new();
    let mut missed = BTreeSet::new();
    let mut notices = 0;
    let mut previous = 1;
    while previous < last_sequence {
        let response = next_message(&mut stream).await;
        assert!(
            response.sequence > previous,
            "sequence {} after {previous}",
            response.sequence
        );
        match response.payload {
            Some(Payload::Deviation(_)) => {
                assert_eq!(
                    response.sequence,
                    previous + 1,
                    "a deviation follows without a gap"
                );
                delivered.insert(response.sequence);
            }
            Some(Payload::Loss(notice)) => {
                notices += 1;
                assert_eq!(notice.reason, pb::LossReason::SubscriberLagged as i32);
                assert_eq!(
                    notice.first_sequence,
                    previous + 1,
                    "the notice starts at the gap"
                );
                assert_eq!(notice.last_sequence, response.sequence);
                assert_eq!(
                    notice.missed,
                    notice.last_sequence - notice.first_sequence + 1
                );
                missed.extend(notice.first_sequence..=notice.last_sequence);
            }
            Some(Payload::Event(_)) | Some(Payload::EventLoss(_)) => {
                panic!("event at {} although none was requested", response.sequence)
            }
            None => panic!("empty payload at {}", response.sequence),
        }
        previous = response.sequence;
    }

    assert!(notices >= 1, "a slow subscriber is told it missed messages");
    assert_eq!(
        delivered.len() + missed.len(),
        2000,
        "every sequence is delivered or reported"
    );
    assert!(delivered.is_disjoint(&missed));
    let counters = agent.hub.counters();
    assert_eq!(counters.dropped_slow, missed.len() as u64);
    agent.stop().await;
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let agent = Agent::start_tcp().await;
    let mut client = agent.client().await;
    let mut stream = subscribe(&mut client, pb::StreamDeviationsRequest::default()).await;
    let hub = Arc::clone(&agent.hub);
    assert_eq!(hub.counters().subscribers, 1);

    agent.stop().await;
    let end = tokio::time::timeout(STEP_TIMEOUT, stream.message())
        .await
        .expect("the stream ends within the timeout");
    assert!(matches!(end, Ok(None)), "the stream ends cleanly: {end:?}");
    assert_eq!(hub.counters().subscribers, 0);
}

#[tokio::test]
async fn watch_command_exits_cleanly_on_agent_shutdown() {
    use driftwatch::commands::watch::{self, OutputFormat, WatchArgs};

    let agent = Agent::start_tcp().await;
    let args = WatchArgs {
        api: agent.addr.clone(),
        min_severity: None,
        categories: vec![],
        exclude_categories: vec![],
        replay: false,
        from_sequence: None,
        format: OutputFormat::Jsonl,
        since: None,
        last: None,
        allow: vec![],
        deny: vec![],
        show_resolution: false,
        tls: Default::default(),
        events: None,
        from_event_sequence: None,
    };
    let watcher = tokio::spawn(watch::run(args));

    // The command subscribes on its own schedule; the hub's subscriber count shows when it has.
    let hub = Arc::clone(&agent.hub);
    tokio::time::timeout(STEP_TIMEOUT, async {
        while hub.counters().subscribers == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the watch command subscribes within the timeout");

    agent.stop().await;
    let result = tokio::time::timeout(STEP_TIMEOUT, watcher)
        .await
        .expect("the watch command returns within the timeout")
        .expect("the watch command does not panic");
    assert!(result.is_ok(), "{result:?}");
}
