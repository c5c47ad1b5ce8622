//! The deviation table: deduplication by id, the repeat interval, exceptions and the bound.

mod common;

use std::time::Duration;

use common::{api, at, flow, listen, nginx, postgres, process};
use driftwatch_model::observation::{FlowObservation, Protocol};
use driftwatch_model::{Engine, EngineConfig};

fn web_to_db(seconds: u64) -> FlowObservation {
    flow(
        at(seconds),
        Some(nginx()),
        "127.0.0.1:40001",
        Some(postgres()),
        "127.0.0.1:5432",
    )
}

fn engine_with(config: EngineConfig) -> Engine {
    Engine::with_config(common::model(common::THREE_TIER), config)
}

#[test]
fn repeat_within_interval_is_counted_not_returned() {
    let mut engine = Engine::new(common::model(common::THREE_TIER));
    // unexpected-flow, trust-boundary-crossing, and new-attack-path for the new edge only.
    assert_eq!(engine.observe_flow(&web_to_db(0)).len(), 3);
    assert!(engine.observe_flow(&web_to_db(10)).is_empty());
    assert!(engine.observe_flow(&web_to_db(59)).is_empty());

    let table = engine.deviations();
    let unexpected = table
        .iter()
        .find(|d| d.id == "unexpected-flow@web@db@tcp/5432")
        .unwrap();
    assert_eq!(unexpected.count, 3);
    assert_eq!(unexpected.first_seen, at(0));
    assert_eq!(unexpected.last_seen, at(59));
    // Only the connection that made the edge found the attack path.
    let path = table.iter().find(|d| d.category.as_str() == "new-attack-path").unwrap();
    assert_eq!(path.count, 1);
    assert_eq!(path.last_seen, at(0));

    let stats = engine.stats();
    assert_eq!(stats.deviations_raised, 3);
    assert_eq!(stats.deviations_repeated, 0);
    assert_eq!(stats.flow_observations, 3);
}

#[test]
fn repeat_after_interval_is_returned_with_its_count() {
    let mut engine = Engine::new(common::model(common::THREE_TIER));
    engine.observe_flow(&web_to_db(0));
    engine.observe_flow(&web_to_db(30));
    let again = engine.observe_flow(&web_to_db(60));
    assert_eq!(again.len(), 2);
    assert_eq!(again[0].count, 3);
    assert_eq!(again[0].first_seen, at(0));
    assert_eq!(again[0].last_seen, at(60));

    // The interval restarts from the last return, not from the first sighting.
    assert!(engine.observe_flow(&web_to_db(100)).is_empty());
    assert_eq!(engine.observe_flow(&web_to_db(120)).len(), 2);
    assert_eq!(engine.stats().deviations_repeated, 4);
}

#[test]
fn repeat_interval_is_configurable() {
    let mut engine = engine_with(EngineConfig {
        repeat_interval: Duration::from_secs(5),
        ..EngineConfig::default()
    });
    engine.observe_flow(&web_to_db(0));
    assert!(engine.observe_flow(&web_to_db(4)).is_empty());
    assert_eq!(engine.observe_flow(&web_to_db(5)).len(), 2);
}

#[test]
fn late_observation_keeps_last_seen() {
    let mut engine = Engine::new(common::model(common::THREE_TIER));
    engine.observe_flow(&web_to_db(50));
    assert!(engine.observe_flow(&web_to_db(10)).is_empty());
    let table = engine.deviations();
    let unexpected = table
        .iter()
        .find(|d| d.id == "unexpected-flow@web@db@tcp/5432")
        .unwrap();
    assert_eq!(unexpected.last_seen, at(50));
    assert_eq!(unexpected.count, 2);
}

#[test]
fn exception_in_force_suppresses_and_counts() {
    let mut engine = Engine::new(common::model(common::THREE_TIER));
    // api -> internet udp/53 is covered by the "pip mirror" exception until 2030; the crossing is not.
    let dns = FlowObservation {
        protocol: Protocol::Udp,
        ..flow(at(0), Some(api()), "10.0.0.2:45000", None, "1.1.1.1:53")
    };
    let raised = engine.observe_flow(&dns);
    let ids: Vec<&str> = raised.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["trust-boundary-crossing@api@internet@udp/53"]);
    assert_eq!(engine.stats().deviations_suppressed, 1);
    assert!(engine
        .deviations()
        .iter()
        .all(|d| d.id != "unexpected-flow@api@internet@udp/53"));
}

#[test]
fn expired_exception_no_longer_suppresses() {
    let mut engine = Engine::new(common::model(common::THREE_TIER));
    let backup = process(400, "/usr/bin/restic", "/system.slice/backup.service");
    // The backup waiver expired on 2020-01-01; observations are in 2025.
    let raised = engine.observe_listen(&listen(at(0), backup, "0.0.0.0:9000"));
    assert_eq!(raised.len(), 1);
    assert_eq!(raised[0].id, "new-listener@backup@0.0.0.0@tcp/9000");
    assert_eq!(engine.stats().deviations_suppressed, 0);
}

#[test]
fn exception_expires_at_the_start_of_its_date() {
    // The sketch's resolver exception expires on 2027-03-01 (1803859200 s after the epoch).
    let without_catch_all =
        common::SKETCH.replace(r#"match: { cidrs: ["0.0.0.0/0", "::/0"] } "#, "");
    let mut engine = Engine::new(common::model(&without_catch_all));
    let resolver = |time| FlowObservation {
        protocol: Protocol::Udp,
        ..flow(time, Some(nginx()), "10.0.0.2:45000", None, "9.9.9.9:53")
    };
    let before = std::time::UNIX_EPOCH + Duration::from_secs(1_803_859_199);
    let after = std::time::UNIX_EPOCH + Duration::from_secs(1_803_859_200);

    let raised = engine.observe_flow(&resolver(before));
    assert!(
        raised
            .iter()
            .all(|d| d.category.as_str() != "unexpected-flow"),
        "{raised:?}"
    );
    assert_eq!(engine.stats().deviations_suppressed, 1);

    let raised = engine.observe_flow(&resolver(after));
    assert!(
        raised
            .iter()
            .any(|d| d.id == "unexpected-flow@web@external:9.9.9.9@udp/53"),
        "{raised:?}"
    );
}

#[test]
fn table_evicts_least_recently_seen_id() {
    let mut engine = engine_with(EngineConfig {
        max_deviations: 2,
        ..EngineConfig::default()
    });
    let listener = |seconds, port: u16| listen(at(seconds), nginx(), &format!("0.0.0.0:{port}"));
    engine.observe_listen(&listener(0, 8001));
    engine.observe_listen(&listener(1, 8002));
    // 8001 is seen again, so 8002 is now the least recently seen.
    engine.observe_listen(&listener(2, 8001));
    engine.observe_listen(&listener(3, 8003));

    let ids: Vec<String> = engine.deviations().into_iter().map(|d| d.id).collect();
    assert_eq!(ids.len(), 2);
    assert!(
        ids.contains(&"new-listener@web@0.0.0.0@tcp/8001".to_owned()),
        "{ids:?}"
    );
    assert!(
        ids.contains(&"new-listener@web@0.0.0.0@tcp/8003".to_owned()),
        "{ids:?}"
    );
    let stats = engine.stats();
    assert_eq!(stats.deviation_evictions, 1);
    assert_eq!(stats.deviations_tracked, 2);
}

#[test]
fn evicted_id_is_raised_as_new_again() {
    let mut engine = engine_with(EngineConfig {
        max_deviations: 1,
        ..EngineConfig::default()
    });
    engine.observe_listen(&listen(at(0), nginx(), "0.0.0.0:8001"));
    engine.observe_listen(&listen(at(1), nginx(), "0.0.0.0:8002"));
    let again = engine.observe_listen(&listen(at(2), nginx(), "0.0.0.0:8001"));
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].count, 1);
}

#[test]
fn repeat_of_an_evicted_id_is_raised_again() {
    let mut engine = engine_with(EngineConfig {
        max_deviations: 3,
        ..EngineConfig::default()
    });
    assert_eq!(engine.observe_flow(&web_to_db(0)).len(), 3);
    // The three ids of the edge were first seen together, unexpected-flow first; a listener's
    // deviation takes its place.
    assert_eq!(engine.observe_listen(&listen(at(1), nginx(), "0.0.0.0:8001")).len(), 1);
    assert_eq!(engine.stats().deviation_evictions, 1);

    // The repeat finds one of its ids gone, so it is judged in full and raises it as new (and,
    // the table being full, the insertion pushes out the edge's other id, raised again too).
    let again = engine.observe_flow(&web_to_db(2));
    let unexpected = again.iter().find(|d| d.id == "unexpected-flow@web@db@tcp/5432");
    assert_eq!(unexpected.map(|d| d.count), Some(1), "{again:?}");
    // With both back in the table, the next repeat is only counted.
    assert!(engine.observe_flow(&web_to_db(3)).is_empty());
}

#[test]
fn model_reload_rejudges_edges() {
    let mut engine = Engine::new(common::model(common::THREE_TIER));
    engine.observe_flow(&web_to_db(0));
    assert!(!engine.graph_snapshot().edges[0].declared);

    let widened = common::THREE_TIER.replace(
        "  - { from: api, to: db, port: 5432 }\n",
        "  - { from: api, to: db, port: 5432 }\n  - { from: web, to: db, port: 5432 }\n",
    );
    engine.replace_model(common::model(&widened));
    assert!(engine.deviations().is_empty());
    assert!(engine.graph_snapshot().edges[0].declared);
    assert!(engine.observe_flow(&web_to_db(1)).is_empty());
    assert_eq!(engine.stats().model_reloads, 1);
}

#[test]
fn model_reload_raises_edges_no_longer_declared() {
    let mut engine = Engine::new(common::model(common::THREE_TIER));
    let web_to_api = flow(
        at(0),
        Some(nginx()),
        "127.0.0.1:40000",
        Some(api()),
        "127.0.0.1:8080",
    );
    assert!(engine.observe_flow(&web_to_api).is_empty());
    engine.observe_flow(&flow(
        at(1),
        Some(nginx()),
        "127.0.0.1:40001",
        Some(api()),
        "127.0.0.1:8080",
    ));

    let narrowed = common::THREE_TIER.replace("  - { from: web, to: api, port: 8080 }\n", "");
    let raised = engine.replace_model(common::model(&narrowed));
    let ids: Vec<&str> = raised.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["unexpected-flow@web@api@tcp/8080"]);
    // The replayed connection is the latest one, with its own time and processes.
    assert_eq!(raised[0].first_seen, at(1));
    assert_eq!(raised[0].evidence.local_addr, Some(common::addr("127.0.0.1:40001")));

    let snapshot = engine.graph_snapshot();
    assert_eq!(snapshot.edges.len(), 1);
    let edge = &snapshot.edges[0];
    assert!(!edge.declared);
    assert_eq!(edge.connections, 2, "the edge keeps its count across the reload");
    assert_eq!(edge.first_seen, at(0));
    let stats = engine.stats();
    assert_eq!(stats.flow_observations, 2, "the replay is not an observation");
    assert_eq!(stats.model_reloads, 1);
}

#[test]
fn model_reload_reattributes_processes() {
    let model = common::THREE_TIER.replace(
        "  - id: backup\n",
        "  - id: worker\n    zone: core\n    match: { exe: [\"/usr/bin/worker\"] }\n  - id: backup\n",
    );
    let worker = process(900, "/usr/bin/worker", "/system.slice/worker.service");
    let to_db = flow(
        at(0),
        Some(worker),
        "10.20.0.9:40000",
        None,
        "10.20.0.5:5432",
    );
    let mut engine = Engine::new(common::model(common::THREE_TIER));
    let raised = engine.observe_flow(&to_db);
    assert_eq!(
        raised[0].id,
        "unknown-component@unknown:cgroup:/system.slice/worker.service@db@tcp/5432"
    );

    let widened = model.replace(
        "  - { from: api, to: db, port: 5432 }\n",
        "  - { from: api, to: db, port: 5432 }\n  - { from: worker, to: db, port: 5432 }\n",
    );
    assert!(engine.replace_model(common::model(&widened)).is_empty());
    let snapshot = engine.graph_snapshot();
    let edges: Vec<(&str, &str, bool)> = snapshot
        .edges
        .iter()
        .map(|e| (e.source.as_str(), e.destination.as_str(), e.declared))
        .collect();
    assert_eq!(edges, [("worker", "db", true)]);
    assert!(snapshot
        .nodes
        .iter()
        .all(|n| !n.id.starts_with("unknown:")));
}

#[test]
fn table_lists_most_severe_first() {
    let mut engine = Engine::new(common::model(common::THREE_TIER));
    engine.observe_listen(&listen(at(0), api(), "127.0.0.1:9100"));
    engine.observe_flow(&web_to_db(1));
    let severities: Vec<_> = engine.deviations().iter().map(|d| d.severity).collect();
    let mut sorted = severities.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(severities, sorted);
    assert_eq!(severities.len(), 4);
}

#[test]
fn burst_counts_like_single_connections() {
    // A new edge, repeats within the interval, and a burst after it that returns the deviations
    // again with every connection counted.
    let raised = common::assert_bursts_match_single_observations(
        common::THREE_TIER,
        &[(web_to_db(0), 40), (web_to_db(30), 5), (web_to_db(61), 10), (web_to_db(62), 0)],
    );
    let again = raised.iter().filter(|d| d.id == "unexpected-flow@web@db@tcp/5432").collect::<Vec<_>>();
    assert_eq!(again.len(), 2, "{raised:#?}");
    assert_eq!(again[1].count, 46);
}

#[test]
fn burst_counts_every_connection_on_the_edge() {
    let mut engine = Engine::new(common::model(common::THREE_TIER));
    engine.observe_flow_repeated(&web_to_db(0), 40);
    let graph = engine.graph_snapshot();
    let edge = graph.edges.iter().find(|edge| edge.destination == "db").unwrap();
    assert_eq!(edge.connections, 40);
    assert_eq!(engine.stats().flow_observations, 40);
}

#[test]
fn burst_under_exception_counts_like_single_connections() {
    // The exception suppresses unexpected-flow, and the trust boundary crossing is counted.
    let dns = |seconds| FlowObservation {
        protocol: Protocol::Udp,
        ..flow(at(seconds), Some(api()), "10.0.0.2:45000", None, "1.1.1.1:53")
    };
    common::assert_bursts_match_single_observations(common::THREE_TIER, &[(dns(0), 50), (dns(30), 7), (dns(61), 5)]);
    let mut engine = Engine::new(common::model(common::THREE_TIER));
    engine.observe_flow_repeated(&dns(0), 50);
    assert_eq!(engine.stats().deviations_suppressed, 50);
}

#[test]
fn burst_across_exception_expiry_counts_like_single_connections() {
    // The sketch's resolver exception expires on 2027-03-01 (1803859200 s after the epoch).
    let without_catch_all = common::SKETCH.replace(r#"match: { cidrs: ["0.0.0.0/0", "::/0"] } "#, "");
    let resolver = |seconds| FlowObservation {
        protocol: Protocol::Udp,
        ..flow(std::time::UNIX_EPOCH + Duration::from_secs(seconds), Some(nginx()), "10.0.0.2:45000", None, "9.9.9.9:53")
    };
    common::assert_bursts_match_single_observations(
        &without_catch_all,
        &[(resolver(1_803_859_100), 20), (resolver(1_803_859_200), 20), (resolver(1_803_859_230), 20)],
    );
}
