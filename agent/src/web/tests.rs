use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use driftwatch_model::deviation::{Category, Deviation, Evidence, Severity, Stride};
use driftwatch_model::graph::GraphSnapshot;
use driftwatch_model::observation::{ProcessInfo, Protocol};
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::topology::{DeclaredComponent, DeclaredFlow, DeclaredZone};
use super::*;
use crate::api::HubConfig;

struct FixedSource;

impl LiveSource for FixedSource {
    fn graph(&self) -> GraphSnapshot {
        GraphSnapshot::default()
    }

    fn declared(&self) -> DeclaredModel {
        DeclaredModel {
            zones: vec![DeclaredZone { id: "dmz".into(), trust: 40 }],
            components: vec![DeclaredComponent {
                id: "web".into(),
                zone: "dmz".into(),
                exposed: true,
                criticality: "medium",
            }],
            flows: vec![DeclaredFlow {
                from: "dmz".into(),
                to: "web".into(),
                protocol: Protocol::Tcp,
                ports: vec![8080],
                deny: false,
            }],
        }
    }
}

fn deviation(n: u64, exe: &str) -> Deviation {
    let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + n);
    let process = ProcessInfo {
        pid: 100 + n as u32,
        ppid: 1,
        exe: exe.into(),
        argv: vec![exe.into(), "--flag".into()],
        argv_truncated: false,
        uid: 0,
        gid: 0,
        user: Some("root".into()),
        cgroup: "/test".into(),
        comm: "comm".into(),
        ancestry: vec![(1, "/sbin/init".into())],
        container: None,
        exec: Default::default(),
    };
    Deviation {
        id: format!("unexpected-flow@web@ext{n}@tcp/9999"),
        category: Category::UnexpectedFlow,
        severity: Severity::Medium,
        stride: Stride::InformationDisclosure,
        summary: format!("deviation {n}"),
        source: "web".into(),
        destination: format!("ext{n}"),
        protocol: Some(Protocol::Tcp),
        port: Some(9999),
        evidence: Evidence {
            process: Some(process),
            peer_process: None,
            local_addr: Some("10.0.0.1:40000".parse().unwrap()),
            remote_addr: Some("10.0.0.2:9999".parse().unwrap()),
            source_zone: Some("dmz".into()),
            destination_zone: None,
            netns: 0,
            remote_name: None,
        },
        first_seen: time,
        last_seen: time,
        count: 1,
        resolution: "flows:\n  - { from: web, to: ext, port: 9999 }\n".into(),
    }
}

fn live_view(published: u64) -> (Arc<LiveView>, Arc<DeviationHub>) {
    let hub = Arc::new(DeviationHub::new(HubConfig { history_capacity: 16, subscriber_capacity: 16 }));
    for n in 1..=published {
        hub.publish(deviation(n, "/usr/bin/curl"));
    }
    let view = LiveView::new(Arc::new(FixedSource), Arc::clone(&hub), LiveViewConfig::default());
    (view, hub)
}

/// One server-sent event: its `event`, `id` and `data` fields.
#[derive(Debug, Default, Clone, PartialEq)]
struct SseEvent {
    event: String,
    id: Option<String>,
    data: String,
}

/// Reads server-sent events from `uri` until `count` events other than comments have arrived.
async fn read_events(view: &Arc<LiveView>, uri: &str, last_event_id: Option<&str>, count: usize) -> Vec<SseEvent> {
    let mut request = Request::builder().header("host", "127.0.0.1:9180").uri(uri);
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let router = view.router(CancellationToken::new());
    let response = router.oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();

    let mut text = String::new();
    let mut events = Vec::new();
    while events.len() < count {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} events arrived: {events:?}", events.len()))
            .expect("the stream ended early")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let mut event = SseEvent::default();
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    event.event = value.into();
                } else if let Some(value) = line.strip_prefix("id: ") {
                    event.id = Some(value.into());
                } else if let Some(value) = line.strip_prefix("data: ") {
                    event.data.push_str(value);
                }
            }
            if !event.event.is_empty() {
                events.push(event);
            }
        }
    }
    events
}

#[tokio::test]
async fn events_start_with_graph_then_recent_deviations() {
    let (view, _hub) = live_view(3);

    let events = read_events(&view, "/api/events", None, 4).await;

    assert_eq!(events[0].event, "graph");
    let graph: serde_json::Value = serde_json::from_str(&events[0].data).unwrap();
    assert_eq!(graph["version"], 1);
    assert_eq!(graph["edges"][0]["source"], "dmz");
    assert_eq!(graph["edges"][0]["destination"], "web");
    assert_eq!(graph["edges"][0]["state"], "declared-unseen");
    let ids: Vec<Option<&str>> = events[1..].iter().map(|event| event.id.as_deref()).collect();
    assert_eq!(ids, [Some("1"), Some("2"), Some("3")]);
    let first: serde_json::Value = serde_json::from_str(&events[1].data).unwrap();
    assert_eq!(first["sequence"], 1);
    assert_eq!(first["category"], "unexpected-flow");
    assert_eq!(first["severity"], "medium");
    assert_eq!(first["process"]["exe"], "/usr/bin/curl");
    assert_eq!(first["process"]["argv"][1], "--flag");
    assert_eq!(first["remote_addr"], "10.0.0.2:9999");
    assert_eq!(first["last_seen_ms"], 1_700_000_001_000u64);
    assert_eq!(first["resolution"], "flows:\n  - { from: web, to: ext, port: 9999 }\n");
}

#[tokio::test]
async fn events_resume_after_last_event_id() {
    let (view, _hub) = live_view(3);

    let events = read_events(&view, "/api/events", Some("1"), 3).await;

    assert_eq!(events[0].event, "graph");
    assert_eq!(events[1].id.as_deref(), Some("2"));
    assert_eq!(events[2].id.as_deref(), Some("3"));
}

#[tokio::test]
async fn events_resume_from_query_and_follow_live() {
    let (view, hub) = live_view(3);
    let publisher = {
        let hub = Arc::clone(&hub);
        tokio::spawn(async move {
            // Published once the stream has replayed, so it arrives as a live message.
            while hub.counters().subscribers == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            hub.publish(deviation(4, "/tmp/<script>alert(1)</script>"));
        })
    };

    let events = read_events(&view, "/api/events?from=3", None, 3).await;
    publisher.await.unwrap();

    assert_eq!(events[1].id.as_deref(), Some("3"));
    assert_eq!(events[2].id.as_deref(), Some("4"));
    let live: serde_json::Value = serde_json::from_str(&events[2].data).unwrap();
    assert_eq!(live["process"]["exe"], "/tmp/<script>alert(1)</script>");
}

#[tokio::test]
async fn resume_past_next_sequence_sends_reset() {
    let (view, _hub) = live_view(2);

    let events = read_events(&view, "/api/events?from=50", None, 4).await;

    assert_eq!(events[0].event, "graph");
    assert_eq!(events[1].event, "reset");
    assert_eq!(events[1].data, r#"{"requested":50,"next":3}"#);
    assert_eq!(events[2].id.as_deref(), Some("1"));
    assert_eq!(events[3].id.as_deref(), Some("2"));
}

#[tokio::test]
async fn evicted_history_is_a_loss_event() {
    // The hub keeps 16, so sequences 1 to 4 of 20 are gone.
    let (view, _hub) = live_view(20);

    let events = read_events(&view, "/api/events?from=1", None, 2).await;

    assert_eq!(events[1].event, "loss");
    assert_eq!(events[1].id.as_deref(), Some("4"));
    assert_eq!(events[1].data, r#"{"first_sequence":1,"last_sequence":4,"missed":4,"reason":"history-evicted"}"#);
}

#[tokio::test]
async fn invalid_resume_point_is_rejected() {
    let (view, _hub) = live_view(0);
    let router = view.router(CancellationToken::new());

    let request = Request::builder().header("host", "127.0.0.1:9180").uri("/api/events?from=abc").body(Body::empty()).unwrap();
    let response = router.oneshot(request).await.unwrap();

    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        std::str::from_utf8(&body).unwrap(),
        r#"invalid from="abc" in the query: expected a deviation sequence number"#
    );
}

#[tokio::test]
async fn page_is_served_with_a_content_security_policy() {
    let (view, _hub) = live_view(0);

    for (path, content_type) in [
        ("/", "text/html; charset=utf-8"),
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/style.css", "text/css; charset=utf-8"),
    ] {
        let router = view.router(CancellationToken::new());
        let request = Request::builder().header("host", "127.0.0.1:9180").uri(path).body(Body::empty()).unwrap();
        let response = router.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(response.headers()["content-type"], content_type, "{path}");
        assert_eq!(response.headers()["content-security-policy"], CONTENT_SECURITY_POLICY, "{path}");
    }
}

#[test]
fn web_addr_must_be_loopback() {
    assert_eq!("127.0.0.1:9180".parse::<WebAddr>().unwrap().to_string(), "127.0.0.1:9180");
    assert_eq!("[::1]:0".parse::<WebAddr>().unwrap().to_string(), "[::1]:0");
    assert_eq!(
        "0.0.0.0:9180".parse::<WebAddr>(),
        Err(WebAddrError::NotLoopback("0.0.0.0:9180".parse().unwrap()))
    );
    assert_eq!("localhost".parse::<WebAddr>(), Err(WebAddrError::Invalid("localhost".into())));
}

/// A collector-like source: the declared model of [`FixedSource`] and the fleet nodes behind `web`.
struct FleetSource;

impl LiveSource for FleetSource {
    fn graph(&self) -> GraphSnapshot {
        GraphSnapshot::default()
    }

    fn declared(&self) -> DeclaredModel {
        FixedSource.declared()
    }

    fn hosts(&self) -> BTreeMap<String, Vec<String>> {
        BTreeMap::from([("web".to_string(), vec!["node-a".to_string(), "node-b".to_string()])])
    }
}

#[tokio::test]
async fn fleet_view_names_nodes() {
    let hub = Arc::new(DeviationHub::new(HubConfig { history_capacity: 16, subscriber_capacity: 16 }));
    hub.publish_from(Arc::from("node-b"), deviation(1, "/usr/bin/curl"), SystemTime::now());
    let view = LiveView::new(Arc::new(FleetSource), Arc::clone(&hub), LiveViewConfig::default());

    let events = read_events(&view, "/api/events", None, 2).await;

    let graph: serde_json::Value = serde_json::from_str(&events[0].data).unwrap();
    let web = graph["nodes"].as_array().unwrap().iter().find(|node| node["id"] == "web").unwrap();
    assert_eq!(web["hosts"], serde_json::json!(["node-a", "node-b"]));
    let deviation: serde_json::Value = serde_json::from_str(&events[1].data).unwrap();
    assert_eq!(deviation["node"], "node-b");
}

#[tokio::test]
async fn foreign_host_is_forbidden() {
    let hub = Arc::new(DeviationHub::new(HubConfig { history_capacity: 16, subscriber_capacity: 16 }));
    let view = LiveView::new(Arc::new(FixedSource), hub, live_view_config(&["dash.example".to_owned()]));

    for path in ["/", "/app.js", "/api/graph", "/api/events"] {
        let router = view.router(CancellationToken::new());
        let request = Request::builder().header("host", "rebind.attacker.example:9180").uri(path).body(Body::empty()).unwrap();
        let response = router.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{path}");
        assert_eq!(response.headers()["content-type"], "text/plain; charset=utf-8", "{path}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(std::str::from_utf8(&body).unwrap().starts_with("the host \"rebind.attacker.example\" is not allowed"), "{path}");
    }
    for host in ["dash.example:9180", "localhost:9180", "[::1]:9180"] {
        let router = view.router(CancellationToken::new());
        let request = Request::builder().header("host", host).uri("/api/graph").body(Body::empty()).unwrap();
        let response = router.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{host}");
    }
}
