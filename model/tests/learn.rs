//! Learning a model, or a patch to one, from a recorded graph: the learned model must accept the
//! recorded traffic and still flag what was not recorded.

mod common;

use common::{at, exec, flow, nginx, postgres, process};
use driftwatch_model::deviation::Category;
use driftwatch_model::graph::{EdgeSnapshot, GraphSnapshot, NodeKind, NodeSnapshot};
use driftwatch_model::import::yaml_to_json;
use driftwatch_model::learn::learn;
use driftwatch_model::observation::{FlowObservation, Protocol};
use driftwatch_model::{Engine, Model};
use serde_json::Value;

const BASE: &str = r#"version: 1
zones:
  - { id: internet, trust: 0, match: { cidrs: ["0.0.0.0/0"] } }
  - { id: dmz, trust: 40 }
  - { id: core, trust: 80 }
components:
  - id: web
    zone: dmz
    exposed: true
    match: { exe: ["/usr/sbin/nginx"], cgroup: ["/system.slice/nginx.service"] }
  - id: db
    zone: core
    criticality: high
    match: { exe: ["/usr/lib/postgresql/*/bin/postgres"] }
flows:
  - { from: internet, to: web, port: 443 }
"#;

fn normal_traffic(start: u64) -> Vec<FlowObservation> {
    let curl = process(700, "/usr/bin/curl", "/user.slice/cron.service");
    vec![
        flow(
            at(start),
            None,
            "203.0.113.9:50000",
            Some(nginx()),
            "192.0.2.10:443",
        ),
        flow(
            at(start + 1),
            Some(nginx()),
            "127.0.0.1:40000",
            Some(postgres()),
            "127.0.0.1:5432",
        ),
        flow(
            at(start + 2),
            Some(curl.clone()),
            "192.0.2.10:41000",
            None,
            "198.51.100.7:443",
        ),
        flow(
            at(start + 3),
            Some(curl),
            "192.0.2.10:41001",
            None,
            "198.51.100.7:8443",
        ),
    ]
}

/// Appends each list of `patch` to the same list of `base`. JSON is YAML, so the result loads.
fn merge(base: &str, patch: &str) -> String {
    let mut base = yaml_to_json(base).unwrap();
    let patch = yaml_to_json(patch).unwrap();
    for key in ["zones", "components", "flows"] {
        let extra = patch[key].as_array().cloned().unwrap_or_default();
        match base[key].as_array_mut() {
            Some(list) => list.extend(extra),
            None => base[key] = Value::from(extra),
        }
    }
    base.to_string()
}

#[test]
fn learned_patch_accepts_recorded_traffic_and_flags_intrusion() {
    let base = common::model(BASE);
    let mut recorder = Engine::new(base.clone());
    for observation in normal_traffic(0) {
        recorder.observe_flow(&observation);
    }
    let learned = learn(&recorder.graph_snapshot(), Some(&base));
    assert_eq!(learned.components, 1, "{}", learned.yaml);
    // curl ran in cron.service, so the unit is the component and curl one of its programs.
    assert!(
        learned.yaml.contains(
            "  - id: \"cron\"\n    zone: \"learned\"\n    match: { unit: [\"cron.service\"] }\n    executables: [\"/usr/bin/curl\"]\n"
        ),
        "{}",
        learned.yaml
    );
    assert!(learned
        .yaml
        .contains("{ from: \"web\", to: \"db\", ports: [5432] }"));
    assert!(learned
        .yaml
        .contains("{ from: \"cron\", to: \"internet\", ports: [443, 8443] }"));
    assert!(
        !learned.yaml.contains("to: \"web\""),
        "declared flows stay out of the patch"
    );

    let merged =
        Model::parse(&merge(BASE, &learned.yaml), "merged.json").expect("merged model loads");
    let mut engine = Engine::new(merged);
    for observation in normal_traffic(100) {
        let raised = engine.observe_flow(&observation);
        assert!(raised.is_empty(), "{raised:#?}");
    }

    let shell = process(4242, "/bin/bash", "/system.slice/nginx.service");
    let raised = engine.observe_exec(&exec(at(200), shell.clone()));
    assert_eq!(raised[0].category, Category::UnexpectedExecutable);
    let raised = engine.observe_flow(&flow(
        at(201),
        Some(shell),
        "192.0.2.10:42000",
        None,
        "198.51.100.66:4444",
    ));
    assert!(
        raised
            .iter()
            .any(|d| d.category == Category::UnexpectedFlow),
        "{raised:#?}"
    );
}

#[test]
fn learned_model_without_base_loads() {
    let time = at(0);
    let snapshot = GraphSnapshot {
        nodes: vec![
            NodeSnapshot {
                id: "external:198.51.100.7".into(),
                kind: NodeKind::External,
                zone: None,
                processes: Vec::new(),
            },
            NodeSnapshot {
                id: "unknown:/usr/bin/curl".into(),
                kind: NodeKind::Discovered,
                zone: None,
                processes: Vec::new(),
            },
            NodeSnapshot {
                id: "unknown:/opt/x/curl".into(),
                kind: NodeKind::Discovered,
                zone: None,
                processes: Vec::new(),
            },
        ],
        edges: vec![
            EdgeSnapshot {
                source: "unknown:/usr/bin/curl".into(),
                destination: "external:198.51.100.7".into(),
                protocol: Protocol::Udp,
                port: 53,
                declared: false,
                first_seen: time,
                last_seen: time,
                connections: 3,
                examples: vec![(7, "/usr/bin/curl".into())],
                remote_names: vec![],
            },
            EdgeSnapshot {
                source: "unknown:/opt/x/curl".into(),
                destination: "unknown:/usr/bin/curl".into(),
                protocol: Protocol::Tcp,
                port: 9000,
                declared: false,
                first_seen: time,
                last_seen: time,
                connections: 1,
                examples: vec![],
                remote_names: vec![],
            },
        ],
    };
    let learned = learn(&snapshot, None);
    let model = Model::parse(&learned.yaml, "learned.yaml")
        .unwrap_or_else(|e| panic!("{e}\n{}", learned.yaml));
    assert_eq!(model.component("curl").unwrap().zone, "learned");
    assert!(
        model.component("curl-2").is_some(),
        "a second executable named curl gets its own id"
    );
    let zone = model.zone("net-198-51-100-7").expect("single-address zone");
    assert_eq!(zone.cidrs[0].to_string(), "198.51.100.7/32");
    assert_eq!(model.flows.len(), 2);
    assert!(model
        .flows
        .iter()
        .any(|f| f.from == "curl" && f.to == "net-198-51-100-7" && f.protocol == Protocol::Udp));
}

#[test]
fn learned_workloads_split_one_executable() {
    let model = common::model("version: 1\nzones: []\ncomponents: []\nflows: []\n");
    let service = "/opt/demo/bin/service";
    let web = process(10, service, "/demo/web");
    let api = process(20, service, "/demo/api");
    let mut recorder = Engine::new(model);
    recorder.observe_flow(&flow(at(0), None, "198.18.1.10:50000", Some(web.clone()), "198.18.2.10:8080"));
    recorder.observe_flow(&flow(at(1), Some(web), "198.18.2.10:41000", Some(api), "198.18.3.10:8081"));
    let snapshot = recorder.graph_snapshot();
    let web_node = snapshot.nodes.iter().find(|n| n.id == "unknown:cgroup:/demo/web").unwrap();
    assert_eq!(web_node.processes.len(), 1);
    assert_eq!(web_node.processes[0].cgroup, "/demo/web");

    let learned = learn(&snapshot, None);
    assert_eq!((learned.zones, learned.components, learned.flows), (3, 2, 2), "{}", learned.yaml);
    let expected_web = "  - id: \"web\"\n    zone: \"learned-exposed\"\n    exposed: true\n    match: { cgroup: [\"/demo/web\"] }\n    listens: [{ port: 8080 }]\n    executables: [\"/opt/demo/bin/service\"]\n";
    assert!(learned.yaml.contains(expected_web), "{}", learned.yaml);
    let expected_api = "  - id: \"api\"\n    zone: \"learned\"\n    match: { cgroup: [\"/demo/api\"] }\n    listens: [{ port: 8081 }]\n    executables: [\"/opt/demo/bin/service\"]\n";
    assert!(learned.yaml.contains(expected_api), "{}", learned.yaml);

    let learned_model = Model::parse(&learned.yaml, "learned.yaml").unwrap_or_else(|e| panic!("{e}\n{}", learned.yaml));
    let mut engine = Engine::new(learned_model);
    let shell = process(30, "/bin/bash", "/demo/web");
    let raised = engine.observe_exec(&exec(at(2), shell.clone()));
    assert_eq!(raised[0].id, "unexpected-executable@web@/bin/bash");
    let raised = engine.observe_flow(&flow(at(3), Some(shell), "198.18.2.10:42000", Some(process(40, service, "/demo/api")), "198.18.3.10:9000"));
    assert_eq!(raised[0].id, "unexpected-flow@web@api@tcp/9000");
    // The exposed web trusts less than api, so the undeclared flow inward also crosses a boundary.
    assert!(
        raised.iter().any(|d| d.id.starts_with("trust-boundary-crossing@web@api")),
        "{:#?}",
        raised.iter().map(|d| &d.id).collect::<Vec<_>>()
    );
}
