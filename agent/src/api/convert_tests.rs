use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::*;
use crate::api::status::{HookStatus, ModelInfo};

fn process() -> ProcessInfo {
    ProcessInfo {
        pid: 4242,
        ppid: 1,
        exe: "/usr/bin/curl".into(),
        argv: vec!["curl".into(), "http://10.0.0.2:5432".into()],
        argv_truncated: true,
        uid: 33,
        gid: 33,
        user: Some("www-data".into()),
        cgroup: "/system.slice/nginx.service".into(),
        comm: "curl".into(),
        ancestry: vec![(4000, "/bin/bash".into()), (1, "/sbin/init".into())],
        container: None,
        exec: ExecFacts {
            fileless: false,
            exe_deleted: true,
            from_descriptor: false,
            interpreter: Some("/usr/bin/python3".into()),
            namespace_pid: Some(7),
            pid_namespace_level: 1,
            systemd_unit: Some("docker-0123.scope".into()),
        },
    }
}

fn full_deviation() -> Deviation {
    Deviation {
        id: "unexpected-flow@web@db@tcp/5432".into(),
        category: Category::UnexpectedFlow,
        severity: Severity::High,
        stride: Stride::InformationDisclosure,
        summary: "web connected to db on tcp/5432, which no declared flow allows".into(),
        source: "web".into(),
        destination: "db".into(),
        protocol: Some(Protocol::Tcp),
        port: Some(5432),
        evidence: Evidence {
            process: Some(process()),
            peer_process: None,
            local_addr: Some("[fd00::1]:43210".parse().unwrap()),
            remote_addr: Some("10.0.0.2:5432".parse().unwrap()),
            source_zone: Some("dmz".into()),
            destination_zone: Some("core".into()),
            netns: 4026531840,
            remote_name: Some("db.internal.test".into()),
        },
        first_seen: SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
        last_seen: SystemTime::UNIX_EPOCH + Duration::new(1_700_000_100, 0),
        count: 7,
        resolution: "flows:\n  - { from: web, to: db, port: 5432 }\n".into(),
    }
}

#[test]
fn deviation_round_trips_through_proto() {
    let original = full_deviation();
    let message = deviation_to_proto(&original);
    assert_eq!(
        message.evidence.as_ref().unwrap().local_addr,
        "[fd00::1]:43210"
    );
    assert_eq!(
        message.evidence.as_ref().unwrap().remote_addr,
        "10.0.0.2:5432"
    );
    assert_eq!(message.port, Some(5432));
    assert_eq!(
        message.evidence.as_ref().unwrap().remote_name.as_deref(),
        Some("db.internal.test")
    );
    assert_eq!(deviation_from_proto(message), Ok(original));
}

#[test]
fn deviation_without_protocol_or_addresses_round_trips() {
    let mut original = full_deviation();
    original.category = Category::UnexpectedExecutable;
    original.protocol = None;
    original.port = None;
    original.evidence.local_addr = None;
    original.evidence.remote_addr = None;
    original.evidence.peer_process = Some(process());
    let message = deviation_to_proto(&original);
    assert_eq!(message.protocol, pb::Protocol::Unspecified as i32);
    assert_eq!(deviation_from_proto(message), Ok(original));
}

#[test]
fn proto_enum_names_match_model_names() {
    for category in Category::ALL {
        let expected = format!(
            "CATEGORY_{}",
            category.as_str().replace('-', "_").to_uppercase()
        );
        assert_eq!(category_to_proto(category).as_str_name(), expected);
        assert_eq!(
            category_from_proto(category_to_proto(category) as i32),
            Ok(category)
        );
    }
    for severity in Severity::ALL {
        let expected = format!("SEVERITY_{}", severity.as_str().to_uppercase());
        assert_eq!(severity_to_proto(severity).as_str_name(), expected);
        assert_eq!(
            severity_from_proto(severity_to_proto(severity) as i32),
            Ok(severity)
        );
    }
}

#[test]
fn unknown_category_is_an_error() {
    let mut message = deviation_to_proto(&full_deviation());
    message.category = 99;
    assert_eq!(
        deviation_from_proto(message),
        Err(ConvertError::UnknownEnumValue {
            field: "category",
            value: 99
        })
    );
}

#[test]
fn malformed_fields_name_the_field() {
    let mut message = deviation_to_proto(&full_deviation());
    message.evidence.as_mut().unwrap().remote_addr = "10.0.0.2".into();
    assert_eq!(
        deviation_from_proto(message),
        Err(ConvertError::InvalidAddress {
            field: "evidence.remote_addr",
            value: "10.0.0.2".into()
        })
    );

    let mut message = deviation_to_proto(&full_deviation());
    message.port = Some(70_000);
    assert_eq!(
        deviation_from_proto(message),
        Err(ConvertError::PortOutOfRange {
            field: "port",
            value: 70_000
        })
    );

    let mut message = deviation_to_proto(&full_deviation());
    message.last_seen = None;
    assert_eq!(
        deviation_from_proto(message),
        Err(ConvertError::MissingField("last_seen"))
    );
}

#[test]
fn graph_round_trips_through_proto() {
    let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let graph = GraphSnapshot {
        nodes: vec![
            NodeSnapshot {
                id: "web".into(),
                kind: NodeKind::Declared,
                zone: Some("dmz".into()),
                processes: Vec::new(),
            },
            NodeSnapshot {
                id: "unknown:/usr/bin/curl".into(),
                kind: NodeKind::Discovered,
                zone: None,
                processes: Vec::new(),
            },
            NodeSnapshot {
                id: "internet".into(),
                kind: NodeKind::External,
                zone: Some("internet".into()),
                processes: Vec::new(),
            },
        ],
        edges: vec![EdgeSnapshot {
            source: "internet".into(),
            destination: "web".into(),
            protocol: Protocol::Udp,
            port: 53,
            declared: true,
            first_seen: time,
            last_seen: time + Duration::from_secs(5),
            connections: 12,
            examples: vec![(7, "/usr/sbin/nginx".into())],
            remote_names: vec![],
        }],
    };
    let message = graph_to_proto(&graph, time);
    assert_eq!(message.taken_at, Some(time.into()));
    assert_eq!(graph_from_proto(message), Ok(graph));
}

#[test]
fn status_appends_hub_counters_after_pipeline_counters() {
    let started_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
    let loaded_at = started_at + Duration::from_secs(1);
    let status = StatusSnapshot {
        version: "0.1.0".into(),
        started_at,
        hooks: vec![
            HookStatus {
                name: "sched_process_exec".into(),
                attached: true,
                error: None,
            },
            HookStatus {
                name: "cgroup_connect4".into(),
                attached: false,
                error: Some("no cgroup2".into()),
            },
        ],
        counters: vec![("events".into(), 5)],
        model: Some(ModelInfo {
            path: PathBuf::from("/etc/driftwatch/model.yaml"),
            loaded_at,
            zones: 3,
            components: 4,
            flows: 5,
        }),
    };
    let hub = HubCounters {
        published: 9,
        evicted: 1,
        dropped_slow: 2,
        subscribers: 3,
        last_sequence: 9,
        oldest_retained_sequence: 2,
    };
    let message = status_to_proto(&status, &hub, started_at + Duration::from_secs(90));

    let counters: Vec<(&str, u64)> = message
        .counters
        .iter()
        .map(|c| (c.name.as_str(), c.value))
        .collect();
    assert_eq!(
        counters,
        vec![
            ("events", 5),
            ("api_published", 9),
            ("api_history_evicted", 1),
            ("api_dropped_slow_subscriber", 2),
            ("api_subscribers", 3),
        ]
    );
    assert_eq!(
        message.uptime,
        Some(prost_types::Duration {
            seconds: 90,
            nanos: 0
        })
    );
    assert_eq!(message.hooks[1].error, "no cgroup2");
    assert_eq!(message.hooks[0].error, "");
    let model = message.model.unwrap();
    assert_eq!(
        (
            model.path.as_str(),
            model.zones,
            model.components,
            model.flows
        ),
        ("/etc/driftwatch/model.yaml", 3, 4, 5)
    );
    assert_eq!(model.loaded_at, Some(loaded_at.into()));
    assert_eq!(
        (message.last_sequence, message.oldest_retained_sequence),
        (9, 2)
    );
}
