use std::time::{Duration, SystemTime};

use driftwatch_model::deviation::{Evidence, Stride};
use tokio_stream::StreamExt;

use driftwatch_model::deviation::{Category, Severity};

use super::*;

fn deviation(n: u64, category: Category, severity: Severity) -> Deviation {
    let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + n);
    Deviation {
        id: format!("{}@src{n}@dst@tcp/80", category.as_str()),
        category,
        severity,
        stride: Stride::Tampering,
        summary: format!("deviation {n}"),
        source: format!("src{n}"),
        destination: "dst".into(),
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
        first_seen: time,
        last_seen: time,
        count: 1,
        resolution: String::new(),
    }
}

fn flow(n: u64) -> Deviation {
    deviation(n, Category::UnexpectedFlow, Severity::Medium)
}

fn hub(history: usize, subscriber: usize) -> DeviationHub {
    DeviationHub::new(HubConfig {
        history_capacity: history,
        subscriber_capacity: subscriber,
    })
}

/// Collects messages until none arrives for 50 ms. Every test publishes before it drains, so the
/// wait only confirms that nothing more is queued.
async fn drain_ready(subscription: &mut Subscription) -> Vec<HubMessage> {
    let mut messages = Vec::new();
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(50), subscription.next()).await
    {
        messages.push(message);
    }
    messages
}

fn sequences(messages: &[HubMessage]) -> Vec<u64> {
    messages.iter().map(HubMessage::sequence).collect()
}

#[test]
fn publish_assigns_increasing_sequences_from_one() {
    let hub = hub(8, 8);
    assert_eq!(hub.publish(flow(1)), 1);
    assert_eq!(hub.publish(flow(2)), 2);
    assert_eq!(hub.publish(flow(3)), 3);
    assert_eq!(hub.counters().last_sequence, 3);
    assert_eq!(hub.counters().published, 3);
}

#[test]
fn history_evicts_oldest_at_capacity_and_counts_it() {
    let hub = hub(3, 8);
    for n in 1..=5 {
        hub.publish(flow(n));
    }
    let counters = hub.counters();
    assert_eq!(counters.evicted, 2);
    assert_eq!(counters.oldest_retained_sequence, 3);
    assert_eq!(counters.last_sequence, 5);
}

#[tokio::test]
async fn live_subscriber_receives_only_later_deviations() {
    let hub = hub(8, 8);
    hub.publish(flow(1));
    let mut subscription = hub.subscribe(DeviationFilter::default(), None).unwrap();
    hub.publish(flow(2));
    hub.publish(flow(3));

    let messages = drain_ready(&mut subscription).await;
    assert_eq!(sequences(&messages), vec![2, 3]);
    let HubMessage::Deviation { deviation, .. } = &messages[0] else {
        panic!("{messages:?}")
    };
    assert_eq!(deviation.summary, "deviation 2");
}

#[tokio::test]
async fn replay_from_sequence_then_follows_live() {
    let hub = hub(8, 8);
    for n in 1..=5 {
        hub.publish(flow(n));
    }
    let mut subscription = hub.subscribe(DeviationFilter::default(), Some(3)).unwrap();
    hub.publish(flow(6));

    let messages = drain_ready(&mut subscription).await;
    assert_eq!(sequences(&messages), vec![3, 4, 5, 6]);
    assert!(messages
        .iter()
        .all(|m| matches!(m, HubMessage::Deviation { .. })));
}

#[tokio::test]
async fn replay_from_zero_sends_all_retained() {
    let hub = hub(8, 8);
    for n in 1..=3 {
        hub.publish(flow(n));
    }
    let mut subscription = hub.subscribe(DeviationFilter::default(), Some(0)).unwrap();
    assert_eq!(
        sequences(&drain_ready(&mut subscription).await),
        vec![1, 2, 3]
    );
}

#[tokio::test]
async fn replay_past_evicted_history_starts_with_loss_notice() {
    let hub = hub(3, 8);
    for n in 1..=6 {
        hub.publish(flow(n));
    }
    let mut subscription = hub.subscribe(DeviationFilter::default(), Some(2)).unwrap();

    let messages = drain_ready(&mut subscription).await;
    let expected_notice = LossNotice {
        first_sequence: 2,
        last_sequence: 3,
        reason: LossReason::HistoryEvicted,
    };
    assert_eq!(messages[0], HubMessage::Loss(expected_notice));
    assert_eq!(expected_notice.missed(), 2);
    assert_eq!(sequences(&messages[1..]), vec![4, 5, 6]);
}

#[test]
fn replay_from_future_sequence_is_rejected() {
    let hub = hub(8, 8);
    hub.publish(flow(1));
    // The next sequence is 2, so resuming from 2 is fine and 3 cannot come from this run.
    assert!(hub.subscribe(DeviationFilter::default(), Some(2)).is_ok());
    let err = hub
        .subscribe(DeviationFilter::default(), Some(3))
        .err()
        .unwrap();
    assert_eq!(
        err,
        SubscribeError::FromSequenceAhead {
            requested: 3,
            next: 2
        }
    );
}

#[tokio::test]
async fn slow_subscriber_gets_loss_notice_with_exact_range() {
    let hub = hub(64, 4);
    let mut subscription = hub.subscribe(DeviationFilter::default(), None).unwrap();
    for n in 1..=10 {
        hub.publish(flow(n));
    }

    let messages = drain_ready(&mut subscription).await;
    let expected_notice = LossNotice {
        first_sequence: 1,
        last_sequence: 6,
        reason: LossReason::SubscriberLagged,
    };
    assert_eq!(messages[0], HubMessage::Loss(expected_notice));
    assert_eq!(sequences(&messages[1..]), vec![7, 8, 9, 10]);
    assert_eq!(hub.counters().dropped_slow, 6);
}

#[tokio::test]
async fn lag_notice_starts_after_last_read() {
    let hub = hub(64, 4);
    let mut subscription = hub.subscribe(DeviationFilter::default(), None).unwrap();
    hub.publish(flow(1));
    hub.publish(flow(2));
    assert_eq!(sequences(&drain_ready(&mut subscription).await), vec![1, 2]);

    for n in 3..=12 {
        hub.publish(flow(n));
    }
    let messages = drain_ready(&mut subscription).await;
    assert_eq!(
        messages[0],
        HubMessage::Loss(LossNotice {
            first_sequence: 3,
            last_sequence: 8,
            reason: LossReason::SubscriberLagged
        })
    );
    assert_eq!(sequences(&messages[1..]), vec![9, 10, 11, 12]);
}

#[tokio::test]
async fn filter_applies_to_replay_and_live() {
    let hub = hub(16, 16);
    hub.publish(deviation(1, Category::UnexpectedFlow, Severity::Low));
    hub.publish(deviation(2, Category::UnexpectedFlow, Severity::High));
    hub.publish(deviation(3, Category::NewListener, Severity::Critical));
    let filter = DeviationFilter {
        min_severity: Some(Severity::Elevated),
        categories: vec![Category::UnexpectedFlow],
        ..DeviationFilter::default()
    };
    let mut subscription = hub.subscribe(filter, Some(1)).unwrap();
    hub.publish(deviation(4, Category::UnexpectedFlow, Severity::Critical));
    hub.publish(deviation(5, Category::UnexpectedFlow, Severity::Medium));
    hub.publish(deviation(6, Category::TelemetryGap, Severity::Critical));

    assert_eq!(sequences(&drain_ready(&mut subscription).await), vec![2, 4]);
}

#[tokio::test]
async fn filtered_out_messages_do_not_hide_a_lag() {
    let hub = hub(64, 4);
    let filter = DeviationFilter {
        min_severity: Some(Severity::High),
        ..DeviationFilter::default()
    };
    let mut subscription = hub.subscribe(filter, None).unwrap();
    for n in 1..=10 {
        hub.publish(flow(n));
    }
    let messages = drain_ready(&mut subscription).await;
    // Every deviation here is below the filter, but the subscriber still learns it lost six.
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].sequence(), 6);
    assert!(matches!(messages[0], HubMessage::Loss(notice) if notice.missed() == 6));
}

#[test]
fn subscriber_count_follows_subscriptions() {
    let hub = hub(8, 8);
    let first = hub.subscribe(DeviationFilter::default(), None).unwrap();
    let second = hub.subscribe(DeviationFilter::default(), None).unwrap();
    assert_eq!(hub.counters().subscribers, 2);
    drop(first);
    assert_eq!(hub.counters().subscribers, 1);
    drop(second);
    assert_eq!(hub.counters().subscribers, 0);
}

#[tokio::test]
async fn subscription_ends_when_hub_is_dropped() {
    let hub = hub(8, 8);
    let mut subscription = hub.subscribe(DeviationFilter::default(), None).unwrap();
    hub.publish(flow(1));
    drop(hub);
    assert_eq!(subscription.next().await.map(|m| m.sequence()), Some(1));
    assert_eq!(subscription.next().await, None);
}

#[tokio::test]
async fn replay_last_takes_latest_passing_entries() {
    let hub = hub(16, 16);
    hub.publish(deviation(1, Category::UnexpectedFlow, Severity::High));
    hub.publish(deviation(2, Category::NewListener, Severity::High));
    hub.publish(deviation(3, Category::UnexpectedFlow, Severity::High));
    hub.publish(deviation(4, Category::UnexpectedFlow, Severity::High));
    let filter = DeviationFilter {
        categories: vec![Category::UnexpectedFlow],
        ..DeviationFilter::default()
    };
    let mut subscription = hub.subscribe_with(filter.into(), Replay::Last(2)).unwrap();
    hub.publish(deviation(5, Category::UnexpectedFlow, Severity::High));

    assert_eq!(sequences(&drain_ready(&mut subscription).await), vec![3, 4, 5]);
}

#[tokio::test]
async fn replay_since_compares_publish_time() {
    let hub = hub(16, 16);
    let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    for n in 1..=4 {
        hub.publish_from(Arc::from("a"), flow(n), base + Duration::from_secs(n));
    }
    let since = Replay::Since(base + Duration::from_secs(3));
    let mut subscription = hub.subscribe_with(FilterSet::all(), since).unwrap();

    assert_eq!(sequences(&drain_ready(&mut subscription).await), vec![3, 4]);
}

#[tokio::test]
async fn node_filter_uses_the_publishing_node() {
    let hub = DeviationHub::with_node(HubConfig::default(), "local");
    hub.publish(flow(1));
    hub.publish_from(Arc::from("b"), flow(2), SystemTime::now());
    let filter = DeviationFilter {
        nodes: vec!["local".into()],
        ..DeviationFilter::default()
    };
    let mut subscription = hub.subscribe(filter, Some(0)).unwrap();

    let messages = drain_ready(&mut subscription).await;
    assert_eq!(sequences(&messages), vec![1]);
    let HubMessage::Deviation { node, .. } = &messages[0] else {
        panic!("{messages:?}")
    };
    assert_eq!(&**node, "local");
}

#[tokio::test]
async fn node_gap_passes_every_filter() {
    let hub = hub(16, 16);
    let gap = NodeGap {
        node: Arc::from("b"),
        first_sequence: 4,
        last_sequence: 9,
    };
    hub.publish_node_gap(gap.clone(), SystemTime::now());
    let filter = DeviationFilter {
        nodes: vec!["a".into()],
        ..DeviationFilter::default()
    };
    let mut subscription = hub.subscribe(filter, Some(0)).unwrap();

    let messages = drain_ready(&mut subscription).await;
    assert_eq!(messages, vec![HubMessage::NodeGap { sequence: 1, gap }]);
}

#[tokio::test]
async fn restored_hub_continues_the_sequence() {
    let first = hub(4, 4);
    for n in 1..=6 {
        first.publish(flow(n));
    }
    let restored = DeviationHub::restore(first.config(), "", first.next_sequence(), first.retained());
    assert_eq!(restored.publish(flow(7)), 7);

    let mut subscription = restored.subscribe(FilterSet::all(), Some(1)).unwrap();
    let messages = drain_ready(&mut subscription).await;
    assert_eq!(sequences(&messages), vec![3, 4, 5, 6, 7]);
    assert!(matches!(messages[0], HubMessage::Loss(notice) if notice.last_sequence == 3));
}
