//! Denied flows, attack paths over the observed graph, unused declared flows and expired
//! exceptions.

mod common;

use std::time::Duration;

use common::{at, flow, nginx, postgres, process};
use driftwatch_model::deviation::{Category, Deviation, Severity};
use driftwatch_model::observation::ProcessInfo;
use driftwatch_model::{Engine, EngineConfig};

/// Web in a DMZ, an api and a cache in the app zone, a critical db in core. Web may not reach
/// the db directly (a deny flow standing for a firewall rule).
const GUARDED: &str = r#"version: 1
zones:
  - { id: internet, trust: 0, match: { cidrs: ["0.0.0.0/0"] } }
  - { id: dmz, trust: 40, match: { cidrs: ["192.0.2.0/24"] } }
  - { id: app, trust: 60 }
  - { id: core, trust: 80, match: { cidrs: ["10.20.0.0/16"] } }
components:
  - id: web
    zone: dmz
    exposed: true
    match: { exe: ["/usr/sbin/nginx"] }
  - id: api
    zone: app
    match: { exe: ["/opt/api/bin/server"] }
  - id: cache
    zone: app
    match: { exe: ["/usr/bin/redis-server"] }
  - id: db
    zone: core
    criticality: critical
    match: { exe: ["/usr/lib/postgresql/*/bin/postgres"] }
    listens: [{ port: 5432 }]
flows:
  - { from: internet, to: web, port: 443 }
  - { from: web, to: api, ports: [8080, 8443] }
  - { from: api, to: db, port: 5432 }
  - { from: web, to: db, port: 5432, deny: true }
  - { from: api, to: cache, port: 6379, direction: both }
"#;

fn engine() -> Engine {
    Engine::new(common::model(GUARDED))
}

fn api() -> ProcessInfo {
    process(200, "/opt/api/bin/server", "/system.slice/api.service")
}

fn cache() -> ProcessInfo {
    process(500, "/usr/bin/redis-server", "/system.slice/redis.service")
}

fn categories(deviations: &[Deviation]) -> Vec<Category> {
    deviations.iter().map(|d| d.category).collect()
}

#[test]
fn denied_flow_that_connects_is_control_failed() {
    let mut engine = engine();
    let raised = engine.observe_flow(&flow(
        at(0),
        Some(nginx()),
        "127.0.0.1:40000",
        Some(postgres()),
        "127.0.0.1:5432",
    ));
    let failed: Vec<&Deviation> = raised
        .iter()
        .filter(|d| d.category == Category::ControlFailed)
        .collect();
    assert_eq!(failed.len(), 1, "{raised:#?}");
    assert_eq!(failed[0].id, "control-failed@web@db@tcp/5432");
    assert_eq!(failed[0].severity, Severity::Critical);
    assert!(
        failed[0].summary.contains("deny flow web -> db at line 27"),
        "{}",
        failed[0].summary
    );
    assert!(failed[0]
        .resolution
        .contains("delete the deny flow at line 27"));
    assert!(failed[0]
        .resolution
        .contains("  - { from: web, to: db, port: 5432 }"));
    assert!(!categories(&raised).contains(&Category::UnexpectedFlow));
    assert_eq!(engine.stats().controls_failed, 1);
    assert_eq!(engine.control_checks()[0].failed, 1);
    assert_eq!(engine.control_checks()[0].held, 0);
}

#[test]
fn refused_attempt_records_control_held() {
    let mut engine = engine();
    let attempt = flow(
        at(5),
        Some(nginx()),
        "127.0.0.1:40000",
        None,
        "10.20.0.5:5432",
    );
    engine.observe_failed_connect(&attempt);
    let other = flow(
        at(6),
        Some(nginx()),
        "127.0.0.1:40001",
        None,
        "10.20.0.5:22",
    );
    engine.observe_failed_connect(&other);

    assert!(engine.deviations().is_empty());
    assert_eq!(engine.graph_snapshot().edges.len(), 0);
    let stats = engine.stats();
    assert_eq!(stats.failed_connect_observations, 2);
    assert_eq!(stats.controls_held, 1);
    assert_eq!(engine.control_checks()[0].held, 1);
    assert_eq!(engine.control_checks()[0].last_held, Some(at(5)));
}

#[test]
fn declared_chain_raises_no_attack_path() {
    let mut engine = engine();
    let mut raised = engine.observe_flow(&flow(
        at(0),
        None,
        "203.0.113.9:50000",
        Some(nginx()),
        "192.0.2.10:443",
    ));
    raised.extend(engine.observe_flow(&flow(
        at(1),
        Some(nginx()),
        "127.0.0.1:40000",
        Some(api()),
        "127.0.0.1:8443",
    )));
    raised.extend(engine.observe_flow(&flow(
        at(2),
        Some(api()),
        "127.0.0.1:40001",
        Some(postgres()),
        "127.0.0.1:5432",
    )));
    assert!(raised.is_empty(), "{raised:#?}");
}

#[test]
fn undeclared_hop_opens_attack_path_to_critical_component() {
    let mut engine = engine();
    engine.observe_flow(&flow(
        at(0),
        None,
        "203.0.113.9:50000",
        Some(nginx()),
        "192.0.2.10:443",
    ));
    // web -> cache is undeclared, cache -> db is undeclared too; together with internet -> web
    // they lead from the internet to the critical db.
    engine.observe_flow(&flow(
        at(1),
        Some(nginx()),
        "127.0.0.1:40000",
        Some(cache()),
        "127.0.0.1:6379",
    ));
    let raised = engine.observe_flow(&flow(
        at(2),
        Some(cache()),
        "127.0.0.1:40001",
        Some(postgres()),
        "127.0.0.1:5432",
    ));

    let paths: Vec<&Deviation> = raised
        .iter()
        .filter(|d| d.category == Category::NewAttackPath)
        .collect();
    assert_eq!(paths.len(), 1, "{raised:#?}");
    let path = paths[0];
    // The nearest entry is the exposed web component, one hop before the new edge.
    assert_eq!(path.id, "new-attack-path@web@db@tcp/6379");
    assert_eq!(path.severity, Severity::Critical);
    assert!(path
        .summary
        .contains("1. web -> cache on tcp/6379 (undeclared, by /usr/sbin/nginx (pid 100))"));
    assert!(path
        .summary
        .contains("2. cache -> db on tcp/5432 (undeclared, by /usr/bin/redis-server (pid 500))"));
    assert!(path
        .resolution
        .contains("  - { from: web, to: cache, port: 6379 }"));
    assert!(path
        .resolution
        .contains("  - { from: cache, to: db, port: 5432 }"));

    let structured = engine.attack_path(&path.id).expect("path is kept");
    assert_eq!(structured.hops.len(), 2);
    assert!(!structured.hops[0].declared);
    assert_eq!(
        structured.hops[1].examples,
        vec![(500, "/usr/bin/redis-server".to_owned())]
    );
}

#[test]
fn attack_path_independent_of_order() {
    // The hops of the test above, observed from the db backwards: cache -> db first reaches no
    // entry, web -> cache then opens the path from the exposed web, and the internet's declared
    // hop to web only lengthens that path.
    let mut engine = engine();
    let db = engine.observe_flow(&flow(
        at(0),
        Some(cache()),
        "127.0.0.1:40001",
        Some(postgres()),
        "127.0.0.1:5432",
    ));
    assert!(
        !categories(&db).contains(&Category::NewAttackPath),
        "{db:#?}"
    );
    let web = engine.observe_flow(&flow(
        at(1),
        Some(nginx()),
        "127.0.0.1:40000",
        Some(cache()),
        "127.0.0.1:6379",
    ));
    let paths: Vec<&str> = web
        .iter()
        .filter(|d| d.category == Category::NewAttackPath)
        .map(|d| d.id.as_str())
        .collect();
    assert_eq!(paths, ["new-attack-path@web@db@tcp/6379"]);
    let internet = engine.observe_flow(&flow(
        at(2),
        None,
        "203.0.113.9:50000",
        Some(nginx()),
        "192.0.2.10:443",
    ));
    assert!(internet.is_empty(), "{internet:#?}");
}

#[test]
fn undeclared_hop_into_entry_opens_path() {
    // web -> api and api -> db are declared, so no path exists until the internet reaches web
    // on a port no flow allows.
    let mut engine = engine();
    engine.observe_flow(&flow(
        at(0),
        Some(nginx()),
        "127.0.0.1:40000",
        Some(api()),
        "127.0.0.1:8080",
    ));
    engine.observe_flow(&flow(
        at(1),
        Some(api()),
        "127.0.0.1:40001",
        Some(postgres()),
        "127.0.0.1:5432",
    ));
    let raised = engine.observe_flow(&flow(
        at(2),
        None,
        "203.0.113.9:50000",
        Some(nginx()),
        "192.0.2.10:8081",
    ));
    let paths: Vec<&str> = raised
        .iter()
        .filter(|d| d.category == Category::NewAttackPath)
        .map(|d| d.id.as_str())
        .collect();
    assert_eq!(
        paths,
        ["new-attack-path@internet@db@tcp/8081"],
        "{raised:#?}"
    );
}

/// Two exposed components, web and admin, may both reach the api; the api may not reach the db.
const TWO_ENTRIES: &str = r#"version: 1
zones:
  - { id: dmz, trust: 40, match: { cidrs: ["192.0.2.0/24"] } }
  - { id: app, trust: 60 }
components:
  - { id: web, zone: dmz, exposed: true, match: { exe: ["/usr/sbin/nginx"] } }
  - { id: admin, zone: dmz, exposed: true, match: { exe: ["/usr/sbin/apache2"] } }
  - { id: api, zone: app, match: { exe: ["/opt/api/bin/server"] } }
  - { id: db, zone: app, criticality: critical, match: { exe: ["/usr/lib/postgresql/*/bin/postgres"] } }
flows:
  - { from: web, to: api, port: 8080 }
  - { from: admin, to: api, port: 8080 }
"#;

#[test]
fn attack_paths_from_two_entries_in_any_order() {
    let admin = process(400, "/usr/sbin/apache2", "/system.slice/apache2.service");
    let hops = [
        flow(at(0), Some(nginx()), "127.0.0.1:40000", Some(api()), "127.0.0.1:8080"),
        flow(at(1), Some(admin), "127.0.0.1:40001", Some(api()), "127.0.0.1:8080"),
        flow(at(2), Some(api()), "127.0.0.1:40002", Some(postgres()), "127.0.0.1:5432"),
    ];
    // The undeclared hop last, first, and in the middle.
    for order in [[0, 1, 2], [2, 0, 1], [0, 2, 1]] {
        let mut engine = Engine::new(common::model(TWO_ENTRIES));
        let mut paths: Vec<String> = order
            .iter()
            .flat_map(|&i| engine.observe_flow(&hops[i]))
            .filter(|d| d.category == Category::NewAttackPath)
            .map(|d| d.id)
            .collect();
        paths.sort();
        assert_eq!(paths, ["new-attack-path@admin@db@tcp/8080", "new-attack-path@web@db@tcp/8080"], "order {order:?}");
    }
}

#[test]
fn attack_path_search_respects_hop_bound() {
    let config = EngineConfig {
        max_path_hops: 1,
        ..EngineConfig::default()
    };
    let mut engine = Engine::with_config(common::model(GUARDED), config);
    engine.observe_flow(&flow(
        at(1),
        Some(nginx()),
        "127.0.0.1:40000",
        Some(cache()),
        "127.0.0.1:6379",
    ));
    let raised = engine.observe_flow(&flow(
        at(2),
        Some(cache()),
        "127.0.0.1:40001",
        Some(postgres()),
        "127.0.0.1:5432",
    ));
    assert!(!categories(&raised).contains(&Category::NewAttackPath));
}

#[test]
fn both_direction_flow_allows_reverse_connection() {
    let mut engine = engine();
    let raised = engine.observe_flow(&flow(
        at(0),
        Some(cache()),
        "127.0.0.1:40000",
        Some(api()),
        "127.0.0.1:6379",
    ));
    assert!(raised.is_empty(), "{raised:#?}");
}

#[test]
fn second_port_of_flow_is_declared() {
    let mut engine = engine();
    let raised = engine.observe_flow(&flow(
        at(0),
        Some(nginx()),
        "127.0.0.1:40000",
        Some(api()),
        "127.0.0.1:8443",
    ));
    assert!(raised.is_empty());
    let raised = engine.observe_flow(&flow(
        at(1),
        Some(nginx()),
        "127.0.0.1:40000",
        Some(api()),
        "127.0.0.1:9000",
    ));
    assert!(categories(&raised).contains(&Category::UnexpectedFlow));
}

#[test]
fn tick_reports_flows_unused_for_window() {
    let config = EngineConfig {
        unused_flow_window: Duration::from_secs(3600),
        ..EngineConfig::default()
    };
    let mut engine = Engine::with_config(common::model(GUARDED), config);
    engine.observe_flow(&flow(
        at(0),
        Some(nginx()),
        "127.0.0.1:40000",
        Some(api()),
        "127.0.0.1:8080",
    ));
    assert!(engine.tick(at(1800)).is_empty());

    let raised = engine.tick(at(3600));
    let mut ids: Vec<&str> = raised.iter().map(|d| d.id.as_str()).collect();
    ids.sort();
    // web -> api was seen at 0, exactly one window ago, so it is unused too; the deny flow is
    // never reported.
    assert_eq!(
        ids,
        vec![
            "declared-flow-unused@api@cache@tcp/6379",
            "declared-flow-unused@api@db@tcp/5432",
            "declared-flow-unused@internet@web@tcp/443",
            "declared-flow-unused@web@api@tcp/8080",
        ]
    );
    assert!(raised.iter().all(|d| d.severity == Severity::Low));
    assert!(raised.iter().all(|d| d.resolution.contains("# flows:")));
}

#[test]
fn recently_used_flow_is_not_unused() {
    let config = EngineConfig {
        unused_flow_window: Duration::from_secs(3600),
        ..EngineConfig::default()
    };
    let mut engine = Engine::with_config(common::model(GUARDED), config);
    engine.tick(at(0));
    engine.observe_flow(&flow(
        at(3000),
        Some(nginx()),
        "127.0.0.1:40000",
        Some(api()),
        "127.0.0.1:8080",
    ));
    let raised = engine.tick(at(3600));
    assert_eq!(raised.len(), 3);
    assert!(raised
        .iter()
        .all(|d| d.id != "declared-flow-unused@web@api@tcp/8080"));
}

#[test]
fn expired_exception_is_reported_with_deviation() {
    let text = format!(
        "{GUARDED}exceptions:\n  - {{ id: \"unexpected-flow@web@api@tcp/9000\", reason: \"migration\", expires: 2024-06-01 }}\n"
    );
    let mut engine = Engine::new(common::model(&text));
    let raised = engine.observe_flow(&flow(
        at(0),
        Some(nginx()),
        "127.0.0.1:40000",
        Some(api()),
        "127.0.0.1:9000",
    ));
    let flow = raised
        .iter()
        .find(|d| d.category == Category::UnexpectedFlow)
        .expect("an expired exception does not suppress");
    assert!(
        flow.summary.contains("expired on 2024-06-01"),
        "{}",
        flow.summary
    );
    assert_eq!(engine.stats().expired_exception_matches, 1);
}

#[test]
fn deviations_list_in_priority_order() {
    let mut engine = engine();
    engine.observe_flow(&flow(
        at(0),
        Some(nginx()),
        "127.0.0.1:40000",
        Some(postgres()),
        "127.0.0.1:5432",
    ));
    engine.observe_flow(&flow(
        at(1),
        Some(api()),
        "127.0.0.1:40000",
        Some(nginx()),
        "127.0.0.1:443",
    ));
    let all = engine.deviations();
    assert_eq!(all[0].category, Category::ControlFailed);
    for pair in all.windows(2) {
        assert!(pair[0].severity >= pair[1].severity, "{all:#?}");
        if pair[0].severity == pair[1].severity {
            assert!(pair[0].category.priority_rank() <= pair[1].category.priority_rank());
        }
    }
}

#[test]
fn denied_burst_fails_the_control_once_per_connection() {
    let denied = |seconds| flow(at(seconds), Some(nginx()), "127.0.0.1:40000", Some(postgres()), "127.0.0.1:5432");
    // Repeats within the repeat interval, then a burst after it that returns the deviation again.
    let raised = common::assert_bursts_match_single_observations(GUARDED, &[(denied(0), 5), (denied(30), 3), (denied(61), 4)]);
    let failed: Vec<&Deviation> = raised.iter().filter(|d| d.category == Category::ControlFailed).collect();
    assert_eq!(failed.len(), 2, "{raised:#?}");
    assert_eq!(failed[1].count, 9);
    let mut engine = engine();
    let denied = flow(at(0), Some(nginx()), "127.0.0.1:40000", Some(postgres()), "127.0.0.1:5432");
    engine.observe_flow_repeated(&denied, 8);
    assert_eq!(engine.control_checks().iter().map(|check| check.failed).sum::<u64>(), 8);
}

#[test]
fn excepted_denied_burst_counts_like_single_connections() {
    let excepted = format!(
        "{GUARDED}exceptions:\n  - {{ id: \"control-failed@web@db@tcp/5432\", reason: \"firewall change pending\", expires: 2030-01-01 }}\n"
    );
    let denied = |seconds| flow(at(seconds), Some(nginx()), "127.0.0.1:40000", Some(postgres()), "127.0.0.1:5432");
    common::assert_bursts_match_single_observations(&excepted, &[(denied(0), 40), (denied(61), 10)]);
    let mut engine = Engine::new(common::model(&excepted));
    engine.observe_flow_repeated(&denied(0), 40);
    assert_eq!(engine.stats().deviations_suppressed, 40);
    assert_eq!(engine.control_checks().iter().map(|check| check.failed).sum::<u64>(), 40);
}
