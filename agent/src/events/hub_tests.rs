use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use driftwatch_model::observation::{ProcessInfo, Protocol};
use tokio_stream::StreamExt;

use super::*;
use crate::api::filter::{DeviationFilter, ExecutableGlob};
use crate::events::{EventDetail, Placement, SocketDetail};

fn process(pid: u32, exe: &str) -> Arc<ProcessInfo> {
    Arc::new(ProcessInfo {
        pid,
        ppid: 1,
        exe: exe.to_string(),
        argv: vec![exe.to_string()],
        argv_truncated: false,
        uid: 0,
        gid: 0,
        user: None,
        cgroup: "/test".to_string(),
        comm: String::new(),
        ancestry: Vec::new(),
        container: None,
        exec: Default::default(),
    })
}

fn exec(pid: u32, exe: &str) -> RawEvent {
    RawEvent {
        kind: EventKind::ProcessExec,
        time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        process: Some(process(pid, exe)),
        placement: Placement { component: format!("unknown:{exe}"), zone: None },
        detail: EventDetail::Exec,
    }
}

fn close(pid: u32, exe: &str, remote_component: &str, remote_zone: &str) -> RawEvent {
    let local: SocketAddr = "10.0.0.1:40000".parse().unwrap();
    let remote: SocketAddr = "10.0.0.2:80".parse().unwrap();
    RawEvent {
        kind: EventKind::TcpClose,
        time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_001),
        process: Some(process(pid, exe)),
        placement: Placement { component: "client".to_string(), zone: Some("dmz".to_string()) },
        detail: EventDetail::Socket(SocketDetail {
            protocol: Protocol::Tcp,
            local,
            remote,
            netns: 1,
            bytes_sent: 10,
            bytes_received: 20,
            error: 0,
            remote_name: None,
            remote_placement: Placement {
                component: remote_component.to_string(),
                zone: Some(remote_zone.to_string()),
            },
            is_reply: false,
            received: false,
        }),
    }
}

fn hub(history: usize, subscriber: usize) -> EventHub {
    EventHub::new(
        EventHubConfig { history_capacity: history, subscriber_capacity: subscriber, linger: Duration::ZERO },
        "node-a",
    )
}

/// Collects messages until none arrives for 50 ms; every test publishes before it drains.
async fn drain_ready(subscription: &mut EventSubscription) -> Vec<EventMessage> {
    let mut messages = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(50), subscription.next()).await {
        messages.push(message);
    }
    messages
}

fn sequences(messages: &[EventMessage]) -> Vec<u64> {
    messages.iter().map(EventMessage::sequence).collect()
}

#[test]
fn kinds_are_wanted_only_while_subscribed() {
    let hub = hub(8, 8);
    assert!(!hub.wants(EventKind::ProcessExec));
    let kinds: EventKinds = [EventKind::ProcessExec].into_iter().collect();
    let subscription = hub.subscribe(FilterSet::all(), kinds, None).unwrap();
    assert!(hub.wants(EventKind::ProcessExec));
    assert!(!hub.wants(EventKind::TcpClose));
    drop(subscription);
    assert!(!hub.wants(EventKind::ProcessExec));
    assert_eq!(hub.counters().subscribers, 0);
}

#[test]
fn kind_lingers_after_last_subscriber() {
    let hub = EventHub::new(EventHubConfig { linger: Duration::from_secs(3600), ..EventHubConfig::default() }, "");
    let kinds: EventKinds = [EventKind::TcpClose].into_iter().collect();
    drop(hub.subscribe(FilterSet::all(), kinds, None).unwrap());
    assert!(hub.wants(EventKind::TcpClose));
    assert!(hub.shared.still_lingering(EventKind::TcpClose, Instant::now()));
    assert!(!hub.shared.still_lingering(EventKind::TcpClose, Instant::now() + Duration::from_secs(3601)));
    assert!(!hub.wants(EventKind::TcpClose));
}

#[tokio::test]
async fn subscription_gets_only_requested_kinds() {
    let hub = hub(8, 8);
    let kinds: EventKinds = [EventKind::TcpClose].into_iter().collect();
    let mut subscription = hub.subscribe(FilterSet::all(), kinds, None).unwrap();
    hub.publish(exec(10, "/usr/bin/curl"));
    hub.publish(close(10, "/usr/bin/curl", "web", "dmz"));
    let messages = drain_ready(&mut subscription).await;
    assert_eq!(sequences(&messages), vec![2]);
    let EventMessage::Event { node, event, .. } = &messages[0] else { panic!("{messages:?}") };
    assert_eq!(&**node, "node-a");
    assert_eq!(event.kind, EventKind::TcpClose);
}

#[tokio::test]
async fn resume_replays_exactly_the_missed_events() {
    let hub = hub(8, 8);
    let _keeps_recording = hub.subscribe(FilterSet::all(), EventKinds::all(), None).unwrap();
    for pid in 1..=5 {
        hub.publish(exec(pid, "/bin/true"));
    }
    let mut resumed = hub.subscribe(FilterSet::all(), EventKinds::all(), Some(3)).unwrap();
    hub.publish(exec(6, "/bin/true"));
    assert_eq!(sequences(&drain_ready(&mut resumed).await), vec![3, 4, 5, 6]);
}

#[tokio::test]
async fn resume_before_oldest_starts_with_loss_notice() {
    let hub = hub(3, 8);
    for pid in 1..=5 {
        hub.publish(exec(pid, "/bin/true"));
    }
    let mut resumed = hub.subscribe(FilterSet::all(), EventKinds::all(), Some(1)).unwrap();
    let messages = drain_ready(&mut resumed).await;
    assert_eq!(
        messages[0],
        EventMessage::Loss(LossNotice { first_sequence: 1, last_sequence: 2, reason: LossReason::HistoryEvicted })
    );
    assert_eq!(sequences(&messages[1..]), vec![3, 4, 5]);
    assert_eq!(hub.counters().evicted, 2);
}

#[test]
fn resume_past_next_sequence_is_rejected() {
    let hub = hub(8, 8);
    hub.publish(exec(1, "/bin/true"));
    let error = hub.subscribe(FilterSet::all(), EventKinds::all(), Some(5)).err().unwrap();
    assert_eq!(error, SubscribeError::FromSequenceAhead { requested: 5, next: 2 });
}

#[tokio::test]
async fn slow_subscriber_gets_loss_notice_and_is_counted() {
    let hub = hub(64, 4);
    let mut subscription = hub.subscribe(FilterSet::all(), EventKinds::all(), None).unwrap();
    for pid in 1..=10 {
        hub.publish(exec(pid, "/bin/true"));
    }
    let messages = drain_ready(&mut subscription).await;
    assert_eq!(
        messages[0],
        EventMessage::Loss(LossNotice { first_sequence: 1, last_sequence: 6, reason: LossReason::SubscriberLagged })
    );
    assert_eq!(sequences(&messages[1..]), vec![7, 8, 9, 10]);
    assert_eq!(hub.counters().dropped_slow, 6);
}

fn executables(patterns: &[&str]) -> Vec<ExecutableGlob> {
    patterns.iter().map(|pattern| ExecutableGlob::new(pattern).unwrap()).collect()
}

#[test]
fn executable_filter_keeps_matching_process_events() {
    let set = FilterSet::from(DeviationFilter { executables: executables(&["/usr/bin/curl"]), ..Default::default() });
    assert!(set.matches_event("n", &exec(1, "/usr/bin/curl")));
    assert!(!set.matches_event("n", &exec(2, "/usr/bin/wget")));
}

#[test]
fn deny_filter_removes_events() {
    let set = FilterSet {
        deny: vec![DeviationFilter { executables: executables(&["/usr/bin/*"]), ..Default::default() }],
        ..FilterSet::default()
    };
    assert!(!set.matches_event("n", &exec(1, "/usr/bin/curl")));
    assert!(set.matches_event("n", &exec(2, "/opt/app")));
}

#[test]
fn deviation_only_allow_filter_leaves_events_alone() {
    let set = FilterSet::from(DeviationFilter {
        categories: vec![driftwatch_model::deviation::Category::UnexpectedFlow],
        ..Default::default()
    });
    assert!(set.matches_event("n", &exec(1, "/usr/bin/curl")));
    let deny_by_category = FilterSet {
        deny: vec![DeviationFilter {
            min_severity: Some(driftwatch_model::deviation::Severity::Low),
            ..Default::default()
        }],
        ..FilterSet::default()
    };
    assert!(deny_by_category.matches_event("n", &exec(1, "/usr/bin/curl")));
}

#[test]
fn event_kind_filter_narrows_events_only() {
    let set = FilterSet::from(DeviationFilter { event_kinds: vec![EventKind::TcpClose], ..Default::default() });
    assert!(!set.matches_event("n", &exec(1, "/bin/true")));
    assert!(set.matches_event("n", &close(1, "/bin/true", "web", "dmz")));
    assert!(!DeviationFilter { event_kinds: vec![EventKind::TcpClose], ..Default::default() }.concerns_deviations());
}

#[test]
fn component_and_zone_match_either_end() {
    let by_remote = DeviationFilter { components: vec!["web".into()], ..Default::default() };
    assert!(by_remote.matches_event("n", &close(1, "/bin/true", "web", "core")));
    assert!(!by_remote.matches_event("n", &close(1, "/bin/true", "db", "core")));
    let by_zone = DeviationFilter { zones: vec!["core".into()], ..Default::default() };
    assert!(by_zone.matches_event("n", &close(1, "/bin/true", "db", "core")));
    assert!(!by_zone.matches_event("n", &exec(1, "/bin/true")));
}

#[test]
fn node_filter_matches_recording_node() {
    let filter = DeviationFilter { nodes: vec!["node-a".into()], ..Default::default() };
    assert!(filter.matches_event("node-a", &exec(1, "/bin/true")));
    assert!(!filter.matches_event("node-b", &exec(1, "/bin/true")));
}
