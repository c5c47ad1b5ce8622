//! A remote peer known only by its zone, the way the agent on a server's host resolves a client on
//! another host: declared flows from a component of that zone allow it, deny flows do not guess.

mod common;

use common::{at, flow, process};
use driftwatch_model::Engine;

const TWO_HOSTS: &str = r#"version: 1
zones:
  - id: front
    trust: 30
    match: { cidrs: ["198.18.77.2/32"] }
  - id: back
    trust: 60
    match: { cidrs: ["198.18.77.1/32"] }
components:
  - id: client
    zone: front
    match: { cgroup: ["/front/*"] }
  - id: server
    zone: back
    match: { cgroup: ["/back/*"] }
    listens: [{ port: 5000 }, { port: 5001 }, { port: 6000 }]
flows:
  - { from: client, to: server, port: 5000 }
  - { from: client, to: server, port: 6000, deny: true }
"#;

fn accepted_from_front(port: u16) -> driftwatch_model::observation::FlowObservation {
    let server = process(200, "/usr/bin/server", "/back/server.service");
    flow(at(0), None, "198.18.77.2:40000", Some(server), &format!("198.18.77.1:{port}"))
}

#[test]
fn declared_flow_from_peer_zone_raises_nothing() {
    let mut engine = Engine::new(common::model(TWO_HOSTS));
    let raised = engine.observe_flow(&accepted_from_front(5000));
    assert!(raised.is_empty(), "{raised:?}");
}

#[test]
fn undeclared_port_from_peer_zone_is_raised() {
    let mut engine = Engine::new(common::model(TWO_HOSTS));
    let raised = engine.observe_flow(&accepted_from_front(5001));
    let ids: Vec<&str> = raised.iter().map(|d| d.id.as_str()).collect();
    assert!(ids.contains(&"unexpected-flow@front@server@tcp/5001"), "{ids:?}");
}

#[test]
fn deny_flow_does_not_match_peer_zone() {
    let mut engine = Engine::new(common::model(TWO_HOSTS));
    let raised = engine.observe_flow(&accepted_from_front(6000));
    let categories: Vec<&str> = raised.iter().map(|d| d.category.as_str()).collect();
    assert!(!categories.contains(&"control-failed"), "{categories:?}");
    assert!(categories.contains(&"unexpected-flow"), "{categories:?}");
    assert_eq!(engine.stats().controls_failed, 0);
}
