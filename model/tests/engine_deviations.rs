//! Each deviation category is raised by the observation that should raise it and not by a
//! declared one; severities follow the direction and the stakes.

mod common;

use common::{api, at, exec, flow, listen, nginx, postgres, process};
use driftwatch_model::deviation::{Category, Deviation, Severity, Stride};
use driftwatch_model::observation::{FlowObservation, ProcessInfo, Protocol};
use driftwatch_model::Engine;

fn engine() -> Engine {
    Engine::new(common::model(common::THREE_TIER))
}

fn ids(deviations: &[Deviation]) -> Vec<&str> {
    deviations.iter().map(|d| d.id.as_str()).collect()
}

fn udp(mut observation: FlowObservation) -> FlowObservation {
    observation.protocol = Protocol::Udp;
    observation
}

fn backup() -> ProcessInfo {
    process(400, "/usr/bin/restic", "/system.slice/backup.service")
}

#[test]
fn declared_local_flow_raises_nothing() {
    let mut engine = engine();
    let raised = engine.observe_flow(&flow(
        at(0),
        Some(nginx()),
        "127.0.0.1:40000",
        Some(api()),
        "127.0.0.1:8080",
    ));
    assert_eq!(ids(&raised), Vec::<&str>::new());
    assert!(engine.deviations().is_empty());
}

#[test]
fn declared_zone_flows_raise_nothing() {
    let mut engine = engine();
    // internet -> web, declared with a zone as source.
    let inbound = engine.observe_flow(&flow(
        at(0),
        None,
        "203.0.113.9:51000",
        Some(nginx()),
        "10.0.0.2:443",
    ));
    assert!(inbound.is_empty(), "{inbound:?}");
    // core -> internet udp/53, declared between two zones.
    let dns = engine.observe_flow(&udp(flow(
        at(1),
        Some(backup()),
        "10.20.0.3:40000",
        None,
        "9.9.9.9:53",
    )));
    assert!(dns.is_empty(), "{dns:?}");
    // api -> db where db is remote, singled out by its zone and listening port.
    let remote_db = engine.observe_flow(&flow(
        at(2),
        Some(api()),
        "10.0.0.2:41000",
        None,
        "10.20.0.5:5432",
    ));
    assert!(remote_db.is_empty(), "{remote_db:?}");
}

#[test]
fn undeclared_flow_raises_unexpected_flow_and_crossing() {
    let mut engine = engine();
    let shell = process(4242, "/bin/bash", "/system.slice/nginx.service");
    let raised = engine.observe_flow(&flow(
        at(0),
        Some(shell),
        "127.0.0.1:40001",
        Some(postgres()),
        "127.0.0.1:5432",
    ));

    assert_eq!(
        ids(&raised),
        [
            "unexpected-flow@web@db@tcp/5432",
            "trust-boundary-crossing@web@db@tcp/5432",
            // web is an entry point and db is critical, so the one edge is an attack path.
            "new-attack-path@web@db@tcp/5432"
        ]
    );
    let unexpected = &raised[0];
    assert_eq!(unexpected.category, Category::UnexpectedFlow);
    assert_eq!(unexpected.stride, Stride::InformationDisclosure);
    assert_eq!(
        unexpected.summary,
        "/bin/bash (pid 4242) in component web (by its cgroup /system.slice/nginx.service) connected to db on tcp/5432; no declared web -> db flow allows tcp/5432"
    );
    assert_eq!(
        unexpected.resolution,
        "flows:\n  - { from: web, to: db, port: 5432 }\n"
    );
    // web is exposed and db is more trusted: high likelihood; db is critical.
    assert_eq!(unexpected.severity, Severity::Critical);
    assert_eq!(
        (unexpected.source.as_str(), unexpected.destination.as_str()),
        ("web", "db")
    );
    assert_eq!(
        (unexpected.protocol, unexpected.port),
        (Some(Protocol::Tcp), Some(5432))
    );

    let crossing = &raised[1];
    assert_eq!(crossing.category, Category::TrustBoundaryCrossing);
    assert_eq!(crossing.stride, Stride::ElevationOfPrivilege);
    assert!(
        crossing.summary.contains("in zone dmz (trust 40)"),
        "{}",
        crossing.summary
    );
    assert!(
        crossing
            .summary
            .ends_with("an undeclared flow toward a more trusted zone"),
        "{}",
        crossing.summary
    );
}

#[test]
fn flow_evidence_names_processes_addresses_and_zones() {
    let mut engine = engine();
    let raised = engine.observe_flow(&flow(
        at(0),
        Some(nginx()),
        "127.0.0.1:40001",
        Some(postgres()),
        "127.0.0.1:5432",
    ));
    let evidence = &raised[0].evidence;
    assert_eq!(evidence.process.as_ref().unwrap().exe, "/usr/sbin/nginx");
    assert_eq!(evidence.peer_process.as_ref().unwrap().pid, 300);
    assert_eq!(evidence.local_addr, Some(common::addr("127.0.0.1:40001")));
    assert_eq!(evidence.remote_addr, Some(common::addr("127.0.0.1:5432")));
    assert_eq!(evidence.source_zone.as_deref(), Some("dmz"));
    assert_eq!(evidence.destination_zone.as_deref(), Some("core"));
    assert_eq!(evidence.netns, 4026531840);
}

#[test]
fn inbound_flow_source_is_zone() {
    let mut engine = engine();
    let raised = engine.observe_flow(&flow(
        at(0),
        None,
        "203.0.113.9:51000",
        Some(postgres()),
        "10.20.0.5:5432",
    ));
    assert_eq!(
        ids(&raised),
        [
            "unexpected-flow@internet@db@tcp/5432",
            "trust-boundary-crossing@internet@db@tcp/5432",
            // internet is an entry point and db is critical, so the one edge is an attack path.
            "new-attack-path@internet@db@tcp/5432"
        ]
    );
    assert!(
        raised[0]
            .summary
            .starts_with("203.0.113.9 in zone internet connected to db on tcp/5432"),
        "{}",
        raised[0].summary
    );
    assert_eq!(raised[0].severity, Severity::Critical);
}

#[test]
fn crossing_toward_more_trusted_zone_is_more_severe() {
    let mut engine = engine();
    // api (dmz, trust 40, not exposed) -> db (core, trust 80) on an undeclared port.
    let up = engine.observe_flow(&flow(
        at(0),
        Some(api()),
        "127.0.0.1:40002",
        Some(postgres()),
        "127.0.0.1:22",
    ));
    // db (core) -> api (dmz) on an undeclared port.
    let down = engine.observe_flow(&flow(
        at(1),
        Some(postgres()),
        "127.0.0.1:40003",
        Some(api()),
        "127.0.0.1:9000",
    ));
    let up = up
        .iter()
        .find(|d| d.category == Category::TrustBoundaryCrossing)
        .unwrap();
    let down = down
        .iter()
        .find(|d| d.category == Category::TrustBoundaryCrossing)
        .unwrap();
    assert!(
        up.severity > down.severity,
        "{:?} vs {:?}",
        up.severity,
        down.severity
    );
    assert_eq!(up.severity, Severity::High);
    // Toward less trust the source's criticality counts: the db holds what would leak.
    assert_eq!(down.severity, Severity::Elevated);
    assert!(
        down.summary.ends_with("toward a less trusted zone"),
        "{}",
        down.summary
    );
}

#[test]
fn flow_within_one_zone_is_not_a_crossing() {
    let mut engine = engine();
    // api -> web, both in dmz, undeclared.
    let raised = engine.observe_flow(&flow(
        at(0),
        Some(api()),
        "127.0.0.1:40004",
        Some(nginx()),
        "127.0.0.1:443",
    ));
    assert_eq!(ids(&raised), ["unexpected-flow@api@web@tcp/443"]);
}

#[test]
fn component_talking_to_itself_is_allowed() {
    let mut engine = engine();
    let worker = ProcessInfo {
        pid: 101,
        ..nginx()
    };
    let raised = engine.observe_flow(&flow(
        at(0),
        Some(worker),
        "127.0.0.1:40005",
        Some(nginx()),
        "127.0.0.1:9999",
    ));
    assert!(raised.is_empty(), "{raised:?}");
}

#[test]
fn unlisted_program_raises_unexpected_executable() {
    let mut engine = engine();
    let shell = ProcessInfo {
        ancestry: vec![(100, "/usr/sbin/nginx".to_owned())],
        ..process(4242, "/bin/bash", "/system.slice/nginx.service")
    };
    let raised = engine.observe_exec(&exec(at(0), shell));
    assert_eq!(ids(&raised), ["unexpected-executable@web@/bin/bash"]);
    let deviation = &raised[0];
    assert_eq!(deviation.stride, Stride::ElevationOfPrivilege);
    assert_eq!((deviation.protocol, deviation.port), (None, None));
    assert_eq!(
        deviation.summary,
        "/bin/bash (pid 4242) in component web (by its cgroup /system.slice/nginx.service) ran a program that component web does not list among its executables (/usr/sbin/nginx)"
    );
    assert_eq!(
        deviation.resolution,
        "components:\n  - id: web\n    executables: [\"/usr/sbin/nginx\", \"/bin/bash\"]\n"
    );
    // web is exposed (high likelihood) with medium criticality.
    assert_eq!(deviation.severity, Severity::Elevated);
}

#[test]
fn listed_programs_raise_nothing() {
    let mut engine = engine();
    assert!(engine.observe_exec(&exec(at(0), nginx())).is_empty());
    let python = ProcessInfo {
        exe: "/usr/bin/python3.12".to_owned(),
        ..api()
    };
    assert!(engine.observe_exec(&exec(at(1), python)).is_empty());
    // A program outside every component is left to the network checks.
    assert!(engine
        .observe_exec(&exec(
            at(2),
            process(9, "/usr/bin/vim", "/user.slice/session-2.scope")
        ))
        .is_empty());
}

#[test]
fn unlisted_program_in_child_raised() {
    let mut engine = engine();
    let curl = ProcessInfo {
        ancestry: vec![(200, "/opt/api/bin/server".to_owned())],
        ..process(4300, "/usr/bin/curl", "/system.slice/api.service")
    };
    let raised = engine.observe_exec(&exec(at(0), curl));
    assert_eq!(ids(&raised), ["unexpected-executable@api@/usr/bin/curl"]);
    assert!(
        raised[0]
            .summary
            .contains("(started by /opt/api/bin/server, pid 200)"),
        "{}",
        raised[0].summary
    );
}

#[test]
fn undeclared_port_raises_new_listener() {
    let mut engine = engine();
    let raised = engine.observe_listen(&listen(at(0), nginx(), "0.0.0.0:8443"));
    assert_eq!(ids(&raised), ["new-listener@web@0.0.0.0@tcp/8443"]);
    assert_eq!(raised[0].stride, Stride::Tampering);
    assert_eq!(
        raised[0].summary,
        "/usr/sbin/nginx (pid 100) in component web listens on tcp/8443 at 0.0.0.0; the model declares no such listener for web"
    );
    assert_eq!(
        raised[0].resolution,
        "components:\n  - id: web\n    listens: [{ port: 443 }, { port: 8443 }]\n"
    );
}

#[test]
fn declared_listeners_raise_nothing() {
    let mut engine = engine();
    assert!(engine
        .observe_listen(&listen(at(0), nginx(), "0.0.0.0:443"))
        .is_empty());
    assert!(engine
        .observe_listen(&listen(at(1), nginx(), "[::]:443"))
        .is_empty());
    assert!(engine
        .observe_listen(&listen(at(2), api(), "127.0.0.1:8080"))
        .is_empty());
}

#[test]
fn wider_bind_than_declared_is_a_new_listener() {
    let mut engine = engine();
    let raised = engine.observe_listen(&listen(at(0), api(), "0.0.0.0:8080"));
    assert_eq!(ids(&raised), ["new-listener@api@0.0.0.0@tcp/8080"]);
    assert!(
        raised[0]
            .resolution
            .contains("{ port: 8080, address: \"127.0.0.1\" }, { port: 8080 }"),
        "{}",
        raised[0].resolution
    );
}

#[test]
fn unknown_process_flow_raises_unknown_component_only() {
    let mut engine = engine();
    let curl = process(
        5000,
        "/usr/bin/curl",
        "/user.slice/user-1000.slice/session-4.scope",
    );
    let raised = engine.observe_flow(&flow(
        at(0),
        Some(curl),
        "10.0.0.2:42000",
        None,
        "10.20.0.5:5432",
    ));
    assert_eq!(
        ids(&raised),
        ["unknown-component@unknown:/usr/bin/curl@db@tcp/5432"]
    );
    let deviation = &raised[0];
    assert_eq!(deviation.stride, Stride::Spoofing);
    assert_eq!(deviation.summary, "/usr/bin/curl (pid 5000) matches no component and connected to db at 10.20.0.5 on tcp/5432");
    assert!(deviation.resolution.starts_with("components:\n  - id: curl\n    zone: <zone>  # one of: internet, partners, dmz, core\n"), "{}", deviation.resolution);
    assert!(deviation.resolution.contains("match: { exe: [\"/usr/bin/curl\"], cgroup: [\"/user.slice/user-1000.slice/session-4.scope\"] }"));
    assert!(
        deviation
            .resolution
            .ends_with("flows:\n  - { from: curl, to: db, port: 5432 }\n"),
        "{}",
        deviation.resolution
    );
}

#[test]
fn unknown_process_listening_raises_unknown_component() {
    let mut engine = engine();
    let nc = process(5001, "/usr/bin/nc", "/user.slice/session-5.scope");
    let raised = engine.observe_listen(&listen(at(0), nc, "0.0.0.0:4444"));
    assert_eq!(
        ids(&raised),
        ["unknown-component@unknown:/usr/bin/nc@0.0.0.0@tcp/4444"]
    );
    assert!(
        raised[0]
            .resolution
            .contains("    listens: [{ port: 4444 }]\n"),
        "{}",
        raised[0].resolution
    );
}

#[test]
fn address_in_no_zone_raises_unattributed_endpoint() {
    let model = common::model(
        common::SKETCH
            .replace(r#"match: { cidrs: ["0.0.0.0/0", "::/0"] } "#, "")
            .as_str(),
    );
    let mut engine = Engine::new(model);
    let raised = engine.observe_flow(&flow(
        at(0),
        Some(nginx()),
        "10.0.0.2:43000",
        None,
        "203.0.113.50:443",
    ));
    assert_eq!(
        ids(&raised),
        [
            "unexpected-flow@web@external:203.0.113.50@tcp/443",
            "unattributed-endpoint@web@external:203.0.113.50@tcp/443"
        ]
    );
    let unattributed = &raised[1];
    assert_eq!(unattributed.category, Category::UnattributedEndpoint);
    assert!(
        unattributed
            .summary
            .ends_with("and 203.0.113.50 is in no declared zone"),
        "{}",
        unattributed.summary
    );
    assert_eq!(
        unattributed.resolution,
        "zones:\n  - { id: net-203-0-113-50, trust: 0, match: { cidrs: [\"203.0.113.50/32\"] } }\nflows:\n  - { from: web, to: net-203-0-113-50, port: 443 }\n"
    );
}

#[test]
fn address_in_a_zone_is_not_unattributed() {
    let mut engine = engine();
    let raised = engine.observe_flow(&flow(
        at(0),
        Some(nginx()),
        "10.0.0.2:43000",
        None,
        "203.0.113.50:443",
    ));
    assert!(
        !raised
            .iter()
            .any(|d| d.category == Category::UnattributedEndpoint),
        "{:?}",
        ids(&raised)
    );
    assert!(
        raised
            .iter()
            .any(|d| d.id == "unexpected-flow@web@internet@tcp/443"),
        "{:?}",
        ids(&raised)
    );
}
