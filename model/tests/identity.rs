//! Identity: processes to components through selectors, addresses to zones through CIDRs.

mod common;

use std::net::IpAddr;

use common::{api, nginx, postgres, process};
use driftwatch_model::observation::{ProcessInfo, Protocol};
use driftwatch_model::Attribution;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn resolved(model: &driftwatch_model::Model, process: &ProcessInfo) -> Option<String> {
    model.resolve_process(process).map(|c| c.id.clone())
}

#[test]
fn exe_and_cgroup_must_both_match() {
    let model = common::model(common::THREE_TIER);
    assert_eq!(resolved(&model, &nginx()).as_deref(), Some("web"));
    let outside_unit = process(
        1,
        "/usr/sbin/nginx",
        "/user.slice/user-1000.slice/session-3.scope",
    );
    assert_eq!(resolved(&model, &outside_unit), None);
}

#[test]
fn exe_glob_star_matches_one_path_segment() {
    let model = common::model(common::THREE_TIER);
    assert_eq!(resolved(&model, &postgres()).as_deref(), Some("db"));
    let nested = process(1, "/usr/lib/postgresql/16/extra/bin/postgres", "/");
    assert_eq!(resolved(&model, &nested), None);
}

#[test]
fn cgroup_glob_selects_a_container() {
    let model = common::model(
        "version: 1
zones: [{ id: z, trust: 50 }]
components:
  - { id: app, zone: z, match: { cgroup: [\"/system.slice/docker-*.scope\"] } }
  - { id: pods, zone: z, match: { cgroup: [\"/kubepods.slice/**\"] } }
",
    );
    let container = process(1, "/app/server", "/system.slice/docker-4f2a9c.scope");
    assert_eq!(resolved(&model, &container).as_deref(), Some("app"));
    let pod = process(
        2,
        "/bin/pause",
        "/kubepods.slice/kubepods-besteffort.slice/pod1/cri-containerd-9.scope",
    );
    assert_eq!(resolved(&model, &pod).as_deref(), Some("pods"));
    assert_eq!(
        resolved(
            &model,
            &process(3, "/app/server", "/system.slice/ssh.service")
        ),
        None
    );
}

#[test]
fn user_selector_matches_name_or_uid() {
    let model = common::model(common::THREE_TIER);
    assert_eq!(resolved(&model, &api()).as_deref(), Some("api"));

    let by_uid = ProcessInfo {
        user: None,
        ..api()
    };
    assert_eq!(resolved(&model, &by_uid).as_deref(), Some("api"));

    let other_user = ProcessInfo {
        uid: 0,
        user: Some("root".to_owned()),
        ..api()
    };
    assert_eq!(resolved(&model, &other_user), None);
}

#[test]
fn component_without_match_matches_nothing() {
    let model = common::model("version: 1\nzones: [{ id: z, trust: 1 }]\ncomponents:\n  - { id: idle, zone: z }\n  - { id: empty, zone: z, match: {} }\n");
    assert_eq!(resolved(&model, &process(1, "/bin/true", "/")), None);
}

#[test]
fn first_matching_component_wins() {
    let model = common::model(
        "version: 1
zones: [{ id: z, trust: 1 }]
components:
  - { id: narrow, zone: z, match: { exe: [\"/usr/bin/python3\"], cgroup: [\"/system.slice/jobs.service\"] } }
  - { id: broad, zone: z, match: { exe: [\"/usr/bin/python3\"] } }
",
    );
    assert_eq!(
        resolved(
            &model,
            &process(1, "/usr/bin/python3", "/system.slice/jobs.service")
        )
        .as_deref(),
        Some("narrow")
    );
    assert_eq!(
        resolved(
            &model,
            &process(2, "/usr/bin/python3", "/system.slice/other.service")
        )
        .as_deref(),
        Some("broad")
    );
}

#[test]
fn shell_in_service_cgroup_is_attributed_by_cgroup() {
    let model = common::model(common::THREE_TIER);
    let shell = process(4242, "/bin/bash", "/system.slice/nginx.service");
    let (component, attribution) = model.attribute_process(&shell).unwrap();
    assert_eq!(component.id, "web");
    assert_eq!(attribution, Attribution::Cgroup);
}

#[test]
fn child_of_component_process_is_attributed_by_ancestor() {
    let model = common::model(common::THREE_TIER);
    let child = ProcessInfo {
        ancestry: vec![
            (210, "/bin/sh".to_owned()),
            (200, "/opt/api/bin/server".to_owned()),
            (1, "/sbin/init".to_owned()),
        ],
        ..process(4243, "/usr/bin/curl", "/system.slice/api.service")
    };
    let (component, attribution) = model.attribute_process(&child).unwrap();
    assert_eq!(component.id, "api");
    assert_eq!(attribution, Attribution::Ancestor(200));
}

#[test]
fn ancestor_outside_component_cgroup_does_not_attribute() {
    let model = common::model(common::THREE_TIER);
    // nginx is an ancestor, but web also requires its cgroup, which this process left.
    let escaped = ProcessInfo {
        ancestry: vec![(100, "/usr/sbin/nginx".to_owned())],
        ..process(4244, "/bin/bash", "/user.slice/session-1.scope")
    };
    assert!(model.attribute_process(&escaped).is_none());
}

#[test]
fn most_specific_cidr_wins() {
    let model = common::model(common::THREE_TIER);
    assert_eq!(
        model.resolve_endpoint(ip("198.51.100.7")).unwrap().id,
        "partners"
    );
    assert_eq!(model.resolve_endpoint(ip("10.20.3.4")).unwrap().id, "core");
    assert_eq!(
        model.resolve_endpoint(ip("10.21.0.1")).unwrap().id,
        "internet"
    );
    assert_eq!(
        model.resolve_endpoint(ip("2001:db8::1")).unwrap().id,
        "internet"
    );
}

#[test]
fn ipv4_mapped_address_resolves_as_ipv4() {
    let model = common::model(common::THREE_TIER);
    assert_eq!(
        model.resolve_endpoint(ip("::ffff:10.20.0.9")).unwrap().id,
        "core"
    );
}

#[test]
fn address_outside_every_cidr_resolves_to_nothing() {
    let model = common::model("version: 1\nzones:\n  - { id: lan, trust: 60, match: { cidrs: [\"192.168.0.0/16\", \"fd00::/8\"] } }\n");
    assert!(model.resolve_endpoint(ip("8.8.8.8")).is_none());
    assert_eq!(model.resolve_endpoint(ip("fd12::1")).unwrap().id, "lan");
}

#[test]
fn remote_service_resolves_to_the_only_listening_component() {
    let model = common::model(common::THREE_TIER);
    assert_eq!(
        model
            .resolve_remote_service(ip("10.20.0.5"), Protocol::Tcp, 5432)
            .unwrap()
            .id,
        "db"
    );
    assert!(model
        .resolve_remote_service(ip("10.20.0.5"), Protocol::Tcp, 22)
        .is_none());
    assert!(model
        .resolve_remote_service(ip("10.20.0.5"), Protocol::Udp, 5432)
        .is_none());
}
