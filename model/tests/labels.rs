//! Container and pod label selectors, and the graph nodes of unmatched containers.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use common::{at, process};
use driftwatch_model::observation::{
    ContainerIdentity, FlowObservation, LabelsState, PodIdentity, ProcessInfo, Protocol,
};
use driftwatch_model::Engine;

const ID: &str = "4f1c3b2a9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a";

const MODEL: &str = "version: 1
zones:
  - { id: internet, trust: 0, match: { cidrs: [\"0.0.0.0/0\"] } }
  - { id: apps, trust: 50 }
components:
  - { id: checkout, zone: apps, match: { pod: { app: checkout, tier: back } } }
  - { id: web, zone: apps, match: { container: { role: web } } }
";

fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
}

fn in_container(container_labels: Option<BTreeMap<String, String>>, pod: Option<PodIdentity>) -> ProcessInfo {
    let labels_state = if container_labels.is_some() { LabelsState::Resolved } else { LabelsState::Pending };
    ProcessInfo {
        container: Some(Arc::new(ContainerIdentity {
            id: ID.to_owned(),
            runtime: "containerd".to_owned(),
            name: "server".to_owned(),
            labels: container_labels,
            labels_state,
            pod,
        })),
        ..process(10, "/app/server", "/kubepods.slice/x.scope")
    }
}

fn pod(pod_labels: Option<BTreeMap<String, String>>) -> Option<PodIdentity> {
    Some(PodIdentity {
        uid: "0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d".to_owned(),
        namespace: "shop".to_owned(),
        name: "checkout-5d8f7".to_owned(),
        labels: pod_labels,
    })
}

fn resolved(process: &ProcessInfo) -> Option<String> {
    let model = common::model(MODEL);
    model.resolve_process(process).map(|c| c.id.clone())
}

#[test]
fn pod_selector_needs_every_label() {
    let all = in_container(labels(&[]), pod(labels(&[("app", "checkout"), ("tier", "back"), ("x", "y")])));
    assert_eq!(resolved(&all).as_deref(), Some("checkout"));
    let one_missing = in_container(labels(&[]), pod(labels(&[("app", "checkout")])));
    assert_eq!(resolved(&one_missing), None);
}

#[test]
fn label_values_compare_exactly() {
    let other_value = in_container(labels(&[]), pod(labels(&[("app", "checkout"), ("tier", "back*")])));
    assert_eq!(resolved(&other_value), None);
    let glob_like = in_container(labels(&[("role", "w*")]), None);
    assert_eq!(resolved(&glob_like), None);
}

#[test]
fn container_selector_reads_container_labels() {
    let web = in_container(labels(&[("role", "web")]), None);
    assert_eq!(resolved(&web).as_deref(), Some("web"));
    // Pod labels do not satisfy a container selector.
    let only_pod = in_container(labels(&[]), pod(labels(&[("role", "web")])));
    assert_eq!(resolved(&only_pod), None);
}

#[test]
fn unknown_labels_match_no_label_selector() {
    let pending = in_container(None, pod(None));
    assert_eq!(resolved(&pending), None);
    let outside = process(11, "/app/server", "/system.slice/app.service");
    assert_eq!(resolved(&outside), None);
}

#[test]
fn label_selector_combines_with_others() {
    let model = common::model(
        "version: 1
zones: [{ id: apps, trust: 50 }]
components:
  - { id: web-root, zone: apps, match: { container: { role: web }, user: [root] } }
",
    );
    let mut web = in_container(labels(&[("role", "web")]), None);
    assert_eq!(model.resolve_process(&web).map(|c| c.id.as_str()), Some("web-root"));
    web.user = Some("nobody".to_owned());
    assert_eq!(model.resolve_process(&web).map(|c| c.id.as_str()), None);
}

fn discovered_node(process: ProcessInfo) -> String {
    let model = common::model(
        "version: 1
zones:
  - { id: internet, trust: 0, match: { cidrs: [\"0.0.0.0/0\"] } }
components: []
",
    );
    let mut engine = Engine::new(model);
    let client: SocketAddr = "10.0.0.1:40000".parse().unwrap();
    let server: SocketAddr = "198.51.100.7:443".parse().unwrap();
    engine.observe_flow(&FlowObservation {
        time: at(1),
        protocol: Protocol::Tcp,
        client: Some(Arc::new(process)),
        server: None,
        client_addr: client,
        server_addr: server,
        netns: 0,
        remote_name: None,
    });
    let snapshot = engine.graph_snapshot();
    let edge = snapshot.edges.first().expect("one edge");
    edge.source.clone()
}

#[test]
fn discovered_pod_node_is_namespace_and_app() {
    let with_app = in_container(labels(&[]), pod(labels(&[("app", "checkout")])));
    assert_eq!(discovered_node(with_app), "unknown:k8s:shop/checkout/server");
    let without_labels = in_container(labels(&[]), pod(labels(&[])));
    assert_eq!(discovered_node(without_labels), "unknown:k8s:shop/checkout-5d8f7/server");
}

#[test]
fn discovered_container_node_uses_name_or_id() {
    let mut compose = in_container(labels(&[("com.docker.compose.service", "cache")]), None);
    Arc::make_mut(compose.container.as_mut().unwrap()).runtime = "docker".to_owned();
    assert_eq!(discovered_node(compose), "unknown:docker:cache");

    let named = in_container(labels(&[]), None);
    assert_eq!(discovered_node(named), "unknown:containerd:server");

    let mut pending = in_container(None, None);
    Arc::make_mut(pending.container.as_mut().unwrap()).name = String::new();
    assert_eq!(discovered_node(pending), "unknown:container:4f1c3b2a9d8e");

    let plain = process(12, "/usr/bin/curl", "/user.slice/session-1.scope");
    assert_eq!(discovered_node(plain), "unknown:/usr/bin/curl");
}

#[test]
fn unknown_pod_resolution_selects_by_label() {
    let model = common::model(
        "version: 1
zones:
  - { id: internet, trust: 0, match: { cidrs: [\"0.0.0.0/0\"] } }
components: []
",
    );
    let mut engine = Engine::new(model);
    let process = in_container(labels(&[]), pod(labels(&[("app", "checkout")])));
    let deviations = engine.observe_flow(&FlowObservation {
        time: at(1),
        protocol: Protocol::Tcp,
        client: Some(Arc::new(process)),
        server: None,
        client_addr: "10.0.0.1:40000".parse().unwrap(),
        server_addr: "198.51.100.7:443".parse().unwrap(),
        netns: 0,
        remote_name: None,
    });
    let unknown = deviations
        .iter()
        .find(|d| d.id == "unknown-component@unknown:k8s:shop/checkout/server@internet@tcp/443")
        .unwrap_or_else(|| panic!("no unknown-component deviation: {deviations:#?}"));
    assert!(
        unknown.resolution.contains(r#"match: { exe: ["/app/server"], pod: { "app": "checkout" } }"#),
        "{}",
        unknown.resolution
    );
    assert!(!unknown.resolution.contains("cgroup:"), "{}", unknown.resolution);
}
