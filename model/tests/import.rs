//! Importing the public Threagile and OTM example models, read in place from the shared data
//! directory, and checking the result against the loader and the JSON Schema.

mod common;

use std::path::PathBuf;

use driftwatch_model::import::{import, yaml_to_json, ImportFormat};
use driftwatch_model::Model;

/// Finds `shared/data/models/<name>` in the nearest ancestor of the crate that has it, so the
/// tests run from the main checkout and from a worktree nested one level deeper.
fn shared_model(name: &str) -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .map(|dir| dir.join("shared/data/models").join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found in shared/data/models above {}",
                manifest.display()
            )
        })
}

fn read(name: &str) -> String {
    std::fs::read_to_string(shared_model(name)).expect("readable example model")
}

const THREAGILE_OVERLAY: &str = r#"
zones:
  web-dmz: { trust: 40, cidrs: ["192.0.2.0/24"] }
components:
  apache-webserver:
    match: { exe: ["/usr/sbin/apache2"], unit: ["apache2.service"] }
    listens: [{ port: 443 }]
flows:
  "erp-system/Database Traffic": { ports: [5432] }
"#;

#[test]
fn threagile_example_converts_to_loadable_model() {
    let imported = import(
        ImportFormat::Threagile,
        &read("threagile-example.yaml"),
        "threagile-example.yaml",
        Some(THREAGILE_OVERLAY),
    )
    .expect("conversion succeeds");
    let model = Model::parse(&imported.yaml, "converted.yaml").expect("converted model loads");

    // The internet client becomes the internet zone; boundaries become nested zones.
    assert!(model.component("customer-client").is_none());
    assert_eq!(model.zone("internet").unwrap().trust, 0);
    assert_eq!(model.zone("web-dmz").unwrap().trust, 40);
    assert_eq!(
        model.zone("web-dmz").unwrap().parent.as_deref(),
        Some("application-network")
    );

    let web = model
        .component("apache-webserver")
        .expect("apache-webserver");
    assert_eq!(web.zone, "web-dmz");
    assert_eq!(web.listens.len(), 1);
    assert!(web.selectors.as_ref().unwrap().unit.is_some());
    let lb = model.component("load-balancer").expect("load-balancer");
    assert!(lb.exposed, "the internet reaches the load balancer");
    assert_eq!(
        model.component("erp-system").unwrap().criticality.as_str(),
        "critical"
    );
    assert!(model
        .component("sql-database")
        .unwrap()
        .data
        .contains(&"customer-accounts".to_owned()));

    let has_flow = |from: &str, to: &str, port: u16| {
        model
            .flows
            .iter()
            .any(|f| f.from == from && f.to == to && f.ports.contains(&port))
    };
    assert!(has_flow("internet", "load-balancer", 443));
    assert!(has_flow("load-balancer", "apache-webserver", 80));
    assert!(has_flow("backend-admin-client", "sql-database", 22));
    assert!(
        has_flow("erp-system", "sql-database", 5432),
        "overlay gives the jdbc link its port"
    );
    assert!(imported
        .notes
        .iter()
        .any(|n| n.starts_with("load-balancer: no selectors")));
}

#[test]
fn otm_example_converts_with_overlay_ports() {
    let overlay = r#"
components:
  customer-database: { match: { exe: ["/usr/lib/postgresql/*/bin/postgres"] } }
flows:
  webclient-to-webservice: { ports: [443] }
  cc-store-in-db: { port: 5432 }
"#;
    let imported = import(
        ImportFormat::Otm,
        &read("otm-example.yaml"),
        "otm-example.yaml",
        Some(overlay),
    )
    .expect("conversion succeeds");
    let model = Model::parse(&imported.yaml, "converted.yaml").expect("converted model loads");

    assert_eq!(model.zone("internet").unwrap().trust, 20);
    assert_eq!(model.zone("private").unwrap().trust, 100);
    assert_eq!(model.component("web-client").unwrap().zone, "internet");
    let service = model.component("web-service").unwrap();
    assert_eq!(service.zone, "private");
    assert!(service.exposed);
    assert_eq!(service.criticality.as_str(), "critical");
    assert_eq!(service.data, vec!["cc-data", "public-info"]);
    assert!(model
        .component("customer-database")
        .unwrap()
        .selectors
        .is_some());

    assert_eq!(model.flows.len(), 2);
    assert_eq!(model.flows[0].from, "web-client");
    assert_eq!(model.flows[0].to, "web-service");
    assert_eq!(model.flows[0].ports, vec![443]);
    assert_eq!(model.flows[0].direction, driftwatch_model::Direction::Both);
    assert_eq!(model.flows[1].to, "customer-database");
    assert_eq!(model.flows[1].ports, vec![5432]);
}

#[test]
fn otm_flows_without_ports_are_left_out_and_noted() {
    let imported = import(
        ImportFormat::Otm,
        &read("otm-example.yaml"),
        "otm-example.yaml",
        None,
    )
    .expect("conversion succeeds");
    let model = Model::parse(&imported.yaml, "converted.yaml").unwrap();
    assert!(model.flows.is_empty());
    assert!(imported
        .notes
        .iter()
        .any(|n| n.starts_with("flow \"cc-store-in-db\"")));
}

#[test]
fn wrong_format_is_rejected() {
    let error = import(
        ImportFormat::Otm,
        &read("threagile-example.yaml"),
        "t.yaml",
        None,
    )
    .expect_err("a Threagile file is not OTM");
    assert!(error.to_string().contains("has no otmVersion"));
}

fn schema() -> jsonschema::Validator {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schema/driftwatch-model.schema.json");
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("schema file"))
            .expect("schema is JSON");
    jsonschema::draft202012::new(&schema).expect("schema compiles")
}

fn schema_errors(text: &str) -> Vec<String> {
    let instance = yaml_to_json(text).expect("YAML");
    schema()
        .iter_errors(&instance)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect()
}

#[test]
fn schema_accepts_sketch_demo_and_imports() {
    let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../demo/model.yaml");
    let demo = std::fs::read_to_string(demo).expect("demo model");
    let threagile = import(
        ImportFormat::Threagile,
        &read("threagile-example.yaml"),
        "t.yaml",
        Some(THREAGILE_OVERLAY),
    )
    .unwrap()
    .yaml;
    for (name, text) in [
        ("sketch", common::SKETCH),
        ("demo", demo.as_str()),
        ("threagile", threagile.as_str()),
    ] {
        assert_eq!(schema_errors(text), Vec::<String>::new(), "{name}");
        Model::parse(text, name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn schema_rejects_what_loader_rejects() {
    let cases = [
        "version: 2\n",
        "version: 1\nzones: [{ id: z, trust: 101 }]\n",
        "version: 1\nzones: [{ id: z, trust: 1, colour: red }]\n",
        "version: 1\nflows: [{ from: a, to: b, port: 1, ports: [2] }]\n",
        "version: 1\ncomponents: [{ id: c, zone: z, criticality: severe }]\n",
    ];
    for text in cases {
        assert!(!schema_errors(text).is_empty(), "schema accepted {text:?}");
        assert!(
            Model::parse(text, "t.yaml").is_err(),
            "loader accepted {text:?}"
        );
    }
}
