//! The observed graph: edges with counts and examples, the declared flag, the bound, DOT and JSON.

mod common;

use common::{api, at, flow, nginx, postgres, process};
use driftwatch_model::graph::{GraphSnapshot, NodeKind};
use driftwatch_model::{Engine, EngineConfig};

#[test]
fn repeated_flow_is_one_edge_with_counts() {
    let mut engine = Engine::new(common::model(common::THREE_TIER));
    engine.observe_flow(&flow(
        at(0),
        Some(nginx()),
        "127.0.0.1:40000",
        Some(api()),
        "127.0.0.1:8080",
    ));
    let second_worker = common::ProcessInfoExt::with_pid(nginx(), 101);
    engine.observe_flow(&flow(
        at(5),
        Some(second_worker),
        "127.0.0.1:40001",
        Some(api()),
        "127.0.0.1:8080",
    ));

    let snapshot = engine.graph_snapshot();
    assert_eq!(snapshot.edges.len(), 1);
    let edge = &snapshot.edges[0];
    assert_eq!(
        (edge.source.as_str(), edge.destination.as_str(), edge.port),
        ("web", "api", 8080)
    );
    assert!(edge.declared);
    assert_eq!(edge.connections, 2);
    assert_eq!(edge.first_seen, at(0));
    assert_eq!(edge.last_seen, at(5));
    assert_eq!(
        edge.examples,
        [
            (100, "/usr/sbin/nginx".to_owned()),
            (101, "/usr/sbin/nginx".to_owned())
        ]
    );
}

#[test]
fn empty_graph_has_declared_nodes() {
    let engine = Engine::new(common::model(common::THREE_TIER));
    let snapshot = engine.graph_snapshot();
    let ids: Vec<&str> = snapshot.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids, ["api", "backup", "db", "web"]);
    assert!(snapshot.nodes.iter().all(|n| n.kind == NodeKind::Declared));
    assert!(snapshot.edges.is_empty());
}

#[test]
fn discovered_and_external_nodes_are_added() {
    let mut engine = Engine::new(common::model(common::THREE_TIER));
    let curl = process(5000, "/usr/bin/curl", "/user.slice/session-4.scope");
    engine.observe_flow(&flow(
        at(0),
        Some(curl),
        "10.0.0.2:42000",
        None,
        "10.20.0.5:5432",
    ));
    engine.observe_flow(&flow(
        at(1),
        None,
        "203.0.113.9:51000",
        Some(nginx()),
        "10.0.0.2:443",
    ));

    let snapshot = engine.graph_snapshot();
    let curl_node = snapshot
        .nodes
        .iter()
        .find(|n| n.id == "unknown:/usr/bin/curl")
        .unwrap();
    assert_eq!(curl_node.kind, NodeKind::Discovered);
    let internet = snapshot.nodes.iter().find(|n| n.id == "internet").unwrap();
    assert_eq!(internet.kind, NodeKind::External);
    assert_eq!(internet.zone.as_deref(), Some("internet"));

    let declared: Vec<(&str, bool)> = snapshot
        .edges
        .iter()
        .map(|e| (e.source.as_str(), e.declared))
        .collect();
    assert_eq!(
        declared,
        [("internet", true), ("unknown:/usr/bin/curl", false)]
    );
}

#[test]
fn edge_bound_evicts_the_longest_idle_edge() {
    let config = EngineConfig {
        max_edges: 2,
        ..EngineConfig::default()
    };
    let mut engine = Engine::with_config(common::model(common::THREE_TIER), config);
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
    // web -> api is used again, so api -> db becomes the longest idle edge.
    engine.observe_flow(&flow(
        at(2),
        Some(nginx()),
        "127.0.0.1:40002",
        Some(api()),
        "127.0.0.1:8080",
    ));
    let curl = process(5000, "/usr/bin/curl", "/user.slice/session-4.scope");
    engine.observe_flow(&flow(
        at(3),
        Some(curl),
        "127.0.0.1:40003",
        Some(postgres()),
        "127.0.0.1:5432",
    ));

    let snapshot = engine.graph_snapshot();
    let edges: Vec<(&str, &str)> = snapshot
        .edges
        .iter()
        .map(|e| (e.source.as_str(), e.destination.as_str()))
        .collect();
    assert_eq!(edges, [("unknown:/usr/bin/curl", "db"), ("web", "api")]);
    let stats = engine.stats();
    assert_eq!(stats.edge_evictions, 1);
    assert_eq!(stats.graph_edges, 2);
}

#[test]
fn evicted_edge_takes_its_orphan_nodes_along() {
    let config = EngineConfig {
        max_edges: 1,
        ..EngineConfig::default()
    };
    let mut engine = Engine::with_config(common::model(common::THREE_TIER), config);
    let curl = process(5000, "/usr/bin/curl", "/user.slice/session-4.scope");
    engine.observe_flow(&flow(
        at(0),
        Some(curl),
        "127.0.0.1:40003",
        Some(postgres()),
        "127.0.0.1:5432",
    ));
    engine.observe_flow(&flow(
        at(1),
        Some(nginx()),
        "127.0.0.1:40000",
        Some(api()),
        "127.0.0.1:8080",
    ));

    let snapshot = engine.graph_snapshot();
    assert!(snapshot
        .nodes
        .iter()
        .all(|n| n.id != "unknown:/usr/bin/curl"));
    assert_eq!(snapshot.nodes.len(), 4);
}

#[test]
fn dot_output_contains_nodes_and_edges() {
    let mut engine = Engine::new(common::model(common::THREE_TIER));
    engine.observe_flow(&flow(
        at(0),
        Some(nginx()),
        "127.0.0.1:40000",
        Some(api()),
        "127.0.0.1:8080",
    ));
    engine.observe_flow(&flow(
        at(1),
        Some(nginx()),
        "127.0.0.1:40001",
        Some(postgres()),
        "127.0.0.1:5432",
    ));
    let dot = engine.graph_snapshot().to_dot();

    assert!(dot.starts_with("digraph driftwatch {\n"), "{dot}");
    assert!(dot.trim_end().ends_with('}'), "{dot}");
    assert!(
        dot.contains("  \"web\" [shape=box, label=\"web\\n[dmz]\"];\n"),
        "{dot}"
    );
    assert!(
        dot.contains("  \"web\" -> \"api\" [label=\"tcp/8080 x1\", color=black];\n"),
        "{dot}"
    );
    assert!(
        dot.contains("  \"web\" -> \"db\" [label=\"tcp/5432 x1\", color=red];\n"),
        "{dot}"
    );
}

#[test]
fn snapshot_round_trips_through_json() {
    let mut engine = Engine::new(common::model(common::THREE_TIER));
    engine.observe_flow(&flow(
        at(0),
        Some(nginx()),
        "127.0.0.1:40000",
        Some(api()),
        "127.0.0.1:8080",
    ));
    let snapshot = engine.graph_snapshot();
    let json = snapshot.to_json();
    assert!(json.contains("\"destination\": \"api\""), "{json}");
    let parsed: GraphSnapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed, snapshot);
}
