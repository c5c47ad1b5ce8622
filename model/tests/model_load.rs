//! Loading models: the example model parses, and every kind of error is located exactly.

mod common;

use std::time::{Duration, UNIX_EPOCH};

use driftwatch_model::observation::Protocol;
use driftwatch_model::{Criticality, Model, ModelErrorKind, ModelErrors};

fn errors(text: &str) -> ModelErrors {
    match Model::parse(text, "web.yaml") {
        Ok(_) => panic!("model should be rejected"),
        Err(errors) => errors,
    }
}

/// Returns each error's (line, column), for exact comparisons.
fn positions(errors: &ModelErrors) -> Vec<(usize, usize)> {
    errors
        .iter()
        .map(|e| (e.location.line, e.location.column))
        .collect()
}

#[test]
fn sketch_model_parses() {
    let model = common::model(common::SKETCH);

    assert_eq!(model.version, 1);
    let zone_ids: Vec<&str> = model.zones.iter().map(|z| z.id.as_str()).collect();
    assert_eq!(zone_ids, ["internet", "dmz", "core"]);
    assert_eq!(model.zone("dmz").unwrap().trust, 40);
    assert_eq!(model.zone("internet").unwrap().cidrs.len(), 2);

    let web = model.component("web").unwrap();
    assert_eq!(web.zone, "dmz");
    assert!(web.exposed);
    assert_eq!(web.criticality, Criticality::Medium);
    assert_eq!(web.listens.len(), 1);
    assert_eq!(web.listens[0].port, 443);
    assert_eq!(web.executables.patterns, ["/usr/sbin/nginx"]);

    let db = model.component("db").unwrap();
    assert_eq!(db.criticality, Criticality::High);
    assert!(!db.exposed);
    assert_eq!(db.listens[0].protocol, Protocol::Tcp);

    assert_eq!(model.flows.len(), 2);
    assert_eq!(
        (
            model.flows[1].from.as_str(),
            model.flows[1].to.as_str(),
            model.flows[1].ports[0]
        ),
        ("web", "db", 5432)
    );
    assert_eq!(model.exceptions.len(), 1);
    assert_eq!(model.exceptions[0].reason, "resolver");
    assert_eq!(
        model.exceptions[0].expires,
        Some(UNIX_EPOCH + Duration::from_secs(1_803_859_200))
    );
}

#[test]
fn three_tier_model_parses() {
    let model = common::model(common::THREE_TIER);
    assert_eq!(model.components.len(), 4);
    assert_eq!(model.flows[3].protocol, Protocol::Udp);
    assert_eq!(
        model.component("api").unwrap().listens[0].address,
        Some("127.0.0.1".parse().unwrap())
    );
}

#[test]
fn load_names_file_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, common::SKETCH).unwrap();
    assert_eq!(Model::load(&good).unwrap().components.len(), 2);

    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "version: 2\n").unwrap();
    let errors = Model::load(&bad).unwrap_err();
    assert_eq!(
        errors.to_string(),
        format!(
            "{}:1:10: invalid value 2 for version: this build reads version 1",
            bad.display()
        )
    );
}

#[test]
fn load_of_missing_file_is_an_io_error() {
    let errors = Model::load("/nonexistent/driftwatch.yaml").unwrap_err();
    assert_eq!(errors.len(), 1);
    assert!(matches!(errors.errors[0].kind, ModelErrorKind::Io(_)));
    assert!(
        errors
            .to_string()
            .starts_with("/nonexistent/driftwatch.yaml: failed to read the model: "),
        "{errors}"
    );
}

#[test]
fn syntax_error_is_located() {
    let errors = errors("version: 1\nzones:\n  - { id: dmz, trust: 40\n");
    assert_eq!(errors.len(), 1);
    assert!(matches!(errors.errors[0].kind, ModelErrorKind::Syntax(_)));
    assert_eq!(positions(&errors), [(4, 1)]);
}

#[test]
fn duplicate_key_is_a_syntax_error_at_the_second_key() {
    let errors = errors("version: 1\nzones: []\nzones: []\n");
    assert_eq!(positions(&errors), [(3, 1)]);
    assert_eq!(
        errors.to_string(),
        "web.yaml:3:1: invalid YAML: duplicated key in mapping"
    );
}

#[test]
fn type_error_points_at_the_value() {
    let errors = errors("version: 1\nzones:\n  - id: dmz\n    trust: high\n");
    assert_eq!(positions(&errors), [(4, 12)]);
    assert_eq!(
        errors.to_string(),
        "web.yaml:4:12: expected an integer for zones[0].trust, found a string"
    );
}

#[test]
fn unknown_key_points_at_the_key() {
    let errors = errors("version: 1\nzones:\n  - id: dmz\n    trust: 40\n    trusted: true\n");
    assert_eq!(positions(&errors), [(5, 5)]);
    assert!(errors.to_string().starts_with(
        "web.yaml:5:5: unknown key \"trusted\" in zones[0] (expected one of: id, trust"
    ));
}

#[test]
fn missing_field_points_at_the_mapping() {
    let errors = errors(
        "version: 1\nzones:\n  - { id: dmz, trust: 40 }\nflows:\n  - { from: dmz, port: 22 }\n",
    );
    assert_eq!(positions(&errors), [(5, 5)]);
    assert_eq!(
        errors.to_string(),
        "web.yaml:5:5: missing field \"to\" in flows[0]"
    );
}

#[test]
fn missing_version_is_reported() {
    let errors = errors("zones: []\n");
    assert_eq!(
        errors.to_string(),
        "web.yaml:1:1: missing field \"version\" in the model"
    );
}

#[test]
fn bad_values_are_invalid() {
    let text = "version: 1
zones:
  - { id: dmz, trust: 101 }
components:
  - id: web
    zone: dmz
    criticality: severe
    listens: [{ port: 0 }, { port: 80, proto: sctp }, { port: 81, address: localhost }]
exceptions:
  - { id: \"nope@web@*\", reason: r }
  - { id: \"new-listener@web@*\", reason: r, expires: 2027-02-30 }
";
    let errors = errors(text);
    assert_eq!(
        positions(&errors),
        [
            (3, 23),
            (7, 18),
            (8, 23),
            (8, 47),
            (8, 76),
            (10, 11),
            (11, 53)
        ]
    );
    let messages: Vec<String> = errors.iter().map(|e| e.kind.to_string()).collect();
    assert_eq!(
        messages[0],
        "invalid value 101 for zones[0].trust: must be between 0 and 100"
    );
    assert_eq!(messages[1], "invalid value \"severe\" for components[0].criticality: expected low, medium, high or critical");
    assert_eq!(
        messages[2],
        "invalid value 0 for components[0].listens[0].port: must be between 1 and 65535"
    );
    assert_eq!(
        messages[3],
        "invalid value \"sctp\" for components[0].listens[1].proto: expected tcp or udp"
    );
    assert_eq!(
        messages[4],
        "invalid value \"localhost\" for components[0].listens[2].address: expected an IP address"
    );
    assert!(
        messages[5].starts_with("invalid value \"nope@web@*\" for exceptions[0].id"),
        "{}",
        messages[5]
    );
    assert_eq!(
        messages[6],
        "invalid value \"2027-02-30\" for exceptions[1].expires: day 30 does not exist in 2027-02"
    );
}

#[test]
fn dangling_flow_reference_lists_known_ids() {
    let text = "version: 1
zones:
  - { id: dmz, trust: 40 }
components:
  - { id: web, zone: dmz }
  - { id: api, zone: dmz }
  - { id: db, zone: dmz }
flows:
  - { from: web, to: dbb, port: 5432 }
";
    let errors = errors(text);
    assert_eq!(
        errors.to_string(),
        "web.yaml:9:22: unknown component or zone \"dbb\" in flows[0].to (known: web, api, db, dmz)"
    );
}

#[test]
fn component_in_unknown_zone_is_reported() {
    let errors = errors("version: 1\nzones:\n  - { id: dmz, trust: 40 }\ncomponents:\n  - id: web\n    zone: dmzz\n");
    assert_eq!(
        errors.to_string(),
        "web.yaml:6:11: unknown zone \"dmzz\" in components[0].zone (known: dmz)"
    );
}

#[test]
fn duplicate_ids_across_zones_and_components_are_reported() {
    let text = "version: 1
zones:
  - { id: dmz, trust: 40 }
  - { id: dmz, trust: 50 }
components:
  - { id: web, zone: dmz }
  - { id: web, zone: dmz }
  - { id: dmz, zone: dmz }
";
    let errors = errors(text);
    assert_eq!(positions(&errors), [(4, 11), (7, 11), (8, 11)]);
    assert_eq!(
        errors.errors[0].kind.to_string(),
        "duplicate id \"dmz\" in zones[1].id, first defined at line 3"
    );
    assert_eq!(
        errors.errors[1].kind.to_string(),
        "duplicate id \"web\" in components[1].id, first defined at line 6"
    );
    assert_eq!(
        errors.errors[2].kind.to_string(),
        "duplicate id \"dmz\" in components[2].id, first defined at line 3"
    );
}

#[test]
fn bad_glob_is_located_at_the_pattern() {
    let errors = errors("version: 1\nzones: [{ id: dmz, trust: 1 }]\ncomponents:\n  - id: web\n    zone: dmz\n    match: { exe: [\"/usr/sbin/nginx\", \"/usr/sbin/[nginx\"] }\n");
    assert_eq!(positions(&errors), [(6, 39)]);
    assert!(
        matches!(&errors.errors[0].kind, ModelErrorKind::InvalidGlob { pattern, .. } if pattern == "/usr/sbin/[nginx")
    );
    assert!(errors.to_string().starts_with(
        "web.yaml:6:39: invalid glob \"/usr/sbin/[nginx\" in components[0].match.exe[1]: "
    ));
}

#[test]
fn bad_cidr_is_located_at_the_entry() {
    let errors = errors("version: 1\nzones:\n  - id: core\n    trust: 80\n    match:\n      cidrs:\n        - 10.0.0.0/8\n        - 10.0.0.0/33\n");
    assert_eq!(positions(&errors), [(8, 11)]);
    assert!(
        matches!(&errors.errors[0].kind, ModelErrorKind::InvalidCidr { value, .. } if value == "10.0.0.0/33")
    );
}

#[test]
fn all_errors_are_collected_in_file_order() {
    let text = "version: 1
zones:
  - { id: dmz, trust: 140 }
  - { id: core, trust: 80, match: { cidrs: [\"10.0.0.0/33\"] } }
components:
  - id: web
    zone: dmzz
    exposd: true
  - id: api
    zone: core
flows:
  - { from: web, to: dbb, port: 5432 }
  - { from: api, to: web, port: \"80\" }
";
    let errors = errors(text);
    assert_eq!(
        positions(&errors),
        [(3, 23), (4, 45), (7, 11), (8, 5), (12, 22), (13, 33)]
    );
    let rendered = errors.to_string();
    assert_eq!(rendered.lines().count(), 6);
    assert!(
        rendered.lines().all(|line| line.starts_with("web.yaml:")),
        "{rendered}"
    );
}

#[test]
fn invalid_item_does_not_make_references_to_it_dangle() {
    // web has a bad criticality; flows naming it must not also report "unknown component web".
    let text = "version: 1
zones: [{ id: dmz, trust: 40 }]
components:
  - { id: web, zone: dmz, criticality: huge }
flows:
  - { from: dmz, to: web, port: 443 }
";
    let errors = errors(text);
    assert_eq!(errors.len(), 1, "{errors}");
    assert_eq!(positions(&errors), [(4, 40)]);
}

#[test]
fn optional_fields_take_defaults() {
    let model = common::model("version: 1\nzones: [{ id: z, trust: 5 }]\ncomponents:\n  - { id: c, zone: z, listens: [{ port: 53, proto: udp }] }\nflows:\n  - { from: c, to: z, port: 53 }\n");
    let c = model.component("c").unwrap();
    assert!(!c.exposed);
    assert_eq!(c.criticality, Criticality::Medium);
    assert!(c.selectors.is_none());
    assert_eq!(c.listens[0].protocol, Protocol::Udp);
    assert_eq!(model.flows[0].protocol, Protocol::Tcp);
}

#[test]
fn two_documents_are_rejected() {
    let errors = errors("version: 1\n---\nversion: 1\n");
    assert_eq!(errors.len(), 1);
    // The second document's content starts on the line after the `---` marker.
    assert_eq!(positions(&errors), [(3, 1)]);
}

const NESTED: &str = r#"version: 1
zones:
  - { id: corp, trust: 60, match: { cidrs: ["10.0.0.0/8"] } }
  - { id: lab, trust: 50, parent: corp, match: { cidrs: ["10.9.0.0/16"] } }
components:
  - id: web
    zone: corp
    data: [pii, sessions]
    match: { unit: ["nginx.service"], container: { app: web } }
  - id: worker
    zone: corp
    match: { exe: ["/usr/bin/*"] }
  - id: curl
    zone: lab
    match: { exe: ["/usr/bin/curl"] }
flows:
  - { from: corp, to: web, ports: [443, 80, 443], proto: tcp, direction: both }
  - { from: lab, to: web, port: 22, deny: true }
exceptions:
  - { id: "unexpected-flow@*", reason: "migration", expires: 2024-01-01 }
"#;

#[test]
fn extended_schema_loads() {
    let model = Model::parse(NESTED, "nested.yaml").expect("valid model");
    assert_eq!(model.zones[1].parent.as_deref(), Some("corp"));
    assert_eq!(model.components[0].data, vec!["pii", "sessions"]);
    let selectors = model.components[0].selectors.as_ref().unwrap();
    assert_eq!(
        selectors.unit.as_ref().unwrap().patterns,
        vec!["nginx.service"]
    );
    assert_eq!(selectors.container.as_ref().unwrap()["app"], "web");
    assert_eq!(model.flows[0].ports, vec![80, 443]);
    assert_eq!(model.flows[0].direction, driftwatch_model::Direction::Both);
    assert!(model.flows[1].deny);
    assert!(model.zone_within("lab", "corp"));
    assert!(!model.zone_within("corp", "lab"));
}

#[test]
fn flow_naming_parent_zone_covers_nested_zone() {
    let model = Model::parse(NESTED, "nested.yaml").unwrap();
    let tcp = driftwatch_model::observation::Protocol::Tcp;
    assert!(model.flow_declared(("curl", Some("lab")), ("web", Some("corp")), tcp, 80));
    assert!(model.flow_declared(("web", Some("corp")), ("curl", Some("lab")), tcp, 443));
    assert!(!model.flow_declared(("curl", Some("lab")), ("web", Some("corp")), tcp, 22));
    assert_eq!(
        model.matching_flow(("curl", Some("lab")), ("web", Some("corp")), tcp, 22, true),
        Some(1)
    );
}

#[test]
fn zone_parent_cycle_is_rejected() {
    let text = r#"version: 1
zones:
  - { id: a, trust: 10, parent: b }
  - { id: b, trust: 10, parent: a }
  - { id: c, trust: 10, parent: nowhere }
"#;
    let errors = errors(text);
    let messages: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(messages.len(), 3, "{messages:#?}");
    assert!(messages[0].contains("zone a would be nested in itself"));
    assert!(messages[1].contains("zone b would be nested in itself"));
    assert!(messages[2].contains("unknown zone \"nowhere\" in zones[2].parent"));
}

#[test]
fn port_and_ports_together_are_rejected() {
    let text = "version: 1\nzones: [{ id: z, trust: 1 }]\nflows:\n  - { from: z, to: z, port: 1, ports: [2] }\n";
    let errors = errors(text);
    assert_eq!(errors.len(), 1);
    assert!(errors
        .to_string()
        .contains("a flow takes port or ports, not both"));
}

#[test]
fn warnings_list_overlaps_and_expired_exceptions() {
    let model = Model::parse(NESTED, "nested.yaml").unwrap();
    let now = driftwatch_model::pattern::parse_date("2025-01-01").unwrap();
    let warnings = model.warnings(now);
    let text: Vec<String> = warnings.iter().map(|w| w.to_string()).collect();
    // web selects by unit and labels, worker and curl by executable: a process could satisfy
    // both kinds at once, so each pair overlaps.
    assert_eq!(text.len(), 4, "{text:#?}");
    assert!(text[0].starts_with("nested.yaml:10:5: warning: the selectors of component worker overlap those of component web (line 6)"));
    assert!(text[2].starts_with("nested.yaml:13:5: warning: the selectors of component curl overlap those of component worker (line 10)"));
    assert!(text[3].starts_with(
        "nested.yaml:20:5: warning: exception \"unexpected-flow@*\" expired on 2024-01-01"
    ));
    assert!(warnings[3].hint.contains("renew"));
}

#[test]
fn disjoint_selectors_raise_no_overlap_warning() {
    let text = r#"version: 1
zones: [{ id: z, trust: 1 }]
components:
  - { id: a, zone: z, match: { exe: ["/usr/bin/a"], user: [alice] } }
  - { id: b, zone: z, match: { exe: ["/usr/bin/*"], user: [bob] } }
  - { id: c, zone: z, match: { exe: ["/opt/c"], unit: ["c.service"] } }
  - { id: d, zone: z, match: { exe: ["/opt/d"], unit: ["c.service"] } }
"#;
    let model = Model::parse(text, "t.yaml").unwrap();
    assert!(model.warnings(std::time::SystemTime::UNIX_EPOCH).is_empty());
}

#[test]
fn error_hint_suggests_near_key() {
    let errors = errors("version: 1\nzones: [{ id: z, trust: 1, parnet: q }]\n");
    assert_eq!(
        errors.errors[0].kind.hint().as_deref(),
        Some("did you mean \"parent\"?")
    );
}

#[test]
fn ids_with_separators_are_rejected() {
    let errors = errors(
        r#"version: 1
zones:
  - { id: "a@b", trust: 10 }
components:
  - { id: "", zone: "a@b" }
  - { id: "web*", zone: "a@b" }
"#,
    );
    assert_eq!(positions(&errors), vec![(3, 11), (5, 11), (6, 11)]);
    for error in errors.iter() {
        assert!(
            matches!(error.kind, ModelErrorKind::InvalidValue { .. }),
            "{error}"
        );
    }
}

#[test]
fn unknown_reference_lists_at_most_twenty_ids() {
    let mut text = String::from("version: 1\nzones:\n");
    for index in 0..100 {
        text.push_str(&format!("  - {{ id: z{index}, trust: 10 }}\n"));
    }
    text.push_str("flows:\n  - { from: z0, to: nowhere, port: 1 }\n");
    let errors = errors(&text);
    let message = errors.to_string();
    assert!(message.contains("(known: z0, z1,"), "{message}");
    assert!(message.contains("z19 and 80 more)"), "{message}");
}
