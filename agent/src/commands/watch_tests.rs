use std::time::Duration;

use driftwatch_model::deviation::{Evidence, Stride};
use driftwatch_model::observation::Protocol;

use super::*;
use crate::api::convert::deviation_to_proto;

fn sample() -> Deviation {
    let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
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
            process: Some(ProcessInfo {
                pid: 4242,
                ppid: 1,
                exe: "/usr/bin/curl".into(),
                argv: vec!["curl".into(), "db:5432".into()],
                argv_truncated: false,
                uid: 33,
                gid: 33,
                user: Some("www-data".into()),
                cgroup: "/system.slice/nginx.service".into(),
                comm: "curl".into(),
                ancestry: vec![(4000, "/bin/bash".into())],
                container: None,
                exec: Default::default(),
            }),
            peer_process: None,
            local_addr: Some("10.0.0.1:43210".parse().unwrap()),
            remote_addr: Some("10.0.0.2:5432".parse().unwrap()),
            source_zone: Some("dmz".into()),
            destination_zone: Some("core".into()),
            netns: 0,
            remote_name: None,
        },
        first_seen: time,
        last_seen: time + Duration::from_secs(60),
        count: 2,
        resolution: "flows:\n  - { from: web, to: db, port: 5432 }".into(),
    }
}

fn render(printer: &Printer, response: pb::StreamDeviationsResponse) -> String {
    let mut out = Vec::new();
    printer.print(&mut out, response).unwrap();
    String::from_utf8(out).unwrap()
}

fn deviation_response(sequence: u64) -> pb::StreamDeviationsResponse {
    pb::StreamDeviationsResponse {
        sequence,
        payload: Some(Payload::Deviation(deviation_to_proto(&sample()))),
        node: String::new(),
    }
}

#[test]
fn text_block_shows_header_evidence_and_resolution() {
    let printer = Printer {
        format: OutputFormat::Text,
        colour: false,
        show_resolution: true,
    };
    let text = render(&printer, deviation_response(42));
    let expected = "\
2023-11-14T22:14:20Z  HIGH      unexpected-flow  #42
  web connected to db on tcp/5432, which no declared flow allows
    id         unexpected-flow@web@db@tcp/5432
    process    pid 4242 (ppid 1) /usr/bin/curl
    argv       curl db:5432
    user       www-data (uid 33, gid 33)
    cgroup     /system.slice/nginx.service
    ancestry   4000 /bin/bash
    endpoints  10.0.0.1:43210 -> 10.0.0.2:5432 (tcp)
    zones      dmz -> core
    seen       2 time(s), first 2023-11-14T22:13:20Z
    resolution
      flows:
        - { from: web, to: db, port: 5432 }

";
    assert_eq!(text, expected);
}

#[test]
fn text_colours_severity_only_when_asked() {
    let plain = Printer {
        format: OutputFormat::Text,
        colour: false,
        show_resolution: false,
    };
    let coloured = Printer {
        colour: true,
        ..plain
    };
    assert!(!render(&plain, deviation_response(1)).contains('\x1b'));
    assert!(!render(&plain, deviation_response(1)).contains("resolution"));
    assert!(render(&coloured, deviation_response(1)).contains("\x1b[31mHIGH    \x1b[0m"));
}

#[test]
fn loss_notice_prints_warning_line() {
    let printer = Printer {
        format: OutputFormat::Text,
        colour: false,
        show_resolution: false,
    };
    let response = pb::StreamDeviationsResponse {
        sequence: 9,
        payload: Some(Payload::Loss(pb::LossNotice {
            missed: 4,
            first_sequence: 6,
            last_sequence: 9,
            reason: pb::LossReason::SubscriberLagged as i32,
        })),
        node: String::new(),
    };
    assert_eq!(
        render(&printer, response),
        "warning: missed 4 deviation(s), sequences 6 to 9: this client read too slowly and the \
         agent dropped them\n\n"
    );
}

#[test]
fn json_output_is_one_object_per_line() {
    let printer = Printer {
        format: OutputFormat::Jsonl,
        colour: false,
        show_resolution: false,
    };
    let text = render(&printer, deviation_response(42));
    assert_eq!(text.lines().count(), 1);
    let value: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value["type"], "deviation");
    assert_eq!(value["sequence"], 42);
    assert_eq!(value["category"], "unexpected-flow");
    assert_eq!(value["severity"], "high");
    assert_eq!(value["last_seen"], "2023-11-14T22:14:20.000000000Z");
    assert_eq!(value["process"]["pid"], 4242);
    assert_eq!(value["remote_addr"], "10.0.0.2:5432");

    let loss = pb::StreamDeviationsResponse {
        sequence: 3,
        payload: Some(Payload::Loss(pb::LossNotice {
            missed: 3,
            first_sequence: 1,
            last_sequence: 3,
            reason: pb::LossReason::HistoryEvicted as i32,
        })),
        node: String::new(),
    };
    let value: Value = serde_json::from_str(&render(&printer, loss)).unwrap();
    assert_eq!(value["type"], "loss");
    assert_eq!(value["missed"], 3);
    assert_eq!(value["reason"], "history-evicted");
}

#[test]
fn severity_and_category_arguments_parse_model_names() {
    assert_eq!(parse_severity("elevated"), Ok(Severity::Elevated));
    assert!(parse_severity("severe")
        .unwrap_err()
        .contains("low, medium, elevated, high, critical"));
    assert_eq!(parse_category("new-listener"), Ok(Category::NewListener));
    assert!(parse_category("flow").is_err());
}

#[derive(Debug, clap::Parser)]
struct WatchCli {
    #[command(flatten)]
    args: WatchArgs,
}

#[test]
fn command_line_parses_repeated_categories() {
    use clap::Parser as _;

    let cli = WatchCli::try_parse_from([
        "watch",
        "--api",
        "127.0.0.1:7070",
        "--min-severity",
        "high",
        "--category",
        "new-listener",
        "--category",
        "unexpected-flow",
        "--replay",
        "--output",
        "json",
    ])
    .unwrap();
    assert_eq!(
        cli.args.api,
        ListenAddr::Tcp("127.0.0.1:7070".parse().unwrap())
    );
    assert_eq!(cli.args.min_severity, Some(Severity::High));
    assert_eq!(
        cli.args.categories,
        vec![Category::NewListener, Category::UnexpectedFlow]
    );
    assert!(cli.args.replay);
    assert_eq!(cli.args.format, OutputFormat::Jsonl);
}

#[test]
fn command_line_defaults_and_conflicts() {
    use clap::Parser as _;

    let cli = WatchCli::try_parse_from(["watch"]).unwrap();
    assert_eq!(cli.args.api, ListenAddr::default());
    assert_eq!(cli.args.format, OutputFormat::Text);
    assert!(!cli.args.replay);

    let conflict = WatchCli::try_parse_from(["watch", "--replay", "--from-sequence", "5"]);
    assert!(conflict.is_err());
    let remote = WatchCli::try_parse_from(["watch", "--api", "10.1.2.3:7070"]).unwrap();
    assert!(!remote.args.api.is_local());
    let half_identity = WatchCli::try_parse_from(["watch", "--tls-ca", "ca.pem", "--tls-cert", "c.pem"]);
    assert!(half_identity.is_err(), "--tls-cert needs --tls-key");
    let both = WatchCli::try_parse_from(["watch", "--tls-ca", "ca.pem", "--insecure"]);
    assert!(both.is_err(), "--insecure conflicts with --tls-ca");
}

#[test]
fn text_block_shows_how_the_program_started() {
    let printer = Printer {
        format: OutputFormat::Text,
        colour: false,
        show_resolution: false,
    };
    let mut response = deviation_response(43);
    let Some(Payload::Deviation(deviation)) = response.payload.as_mut() else {
        panic!("not a deviation response")
    };
    let process = deviation.evidence.as_mut().unwrap().process.as_mut().unwrap();
    process.exe_deleted = true;
    process.interpreter = Some("/usr/bin/perl".into());
    process.namespace_pid = Some(7);
    process.pid_namespace_level = 1;
    process.systemd_unit = Some("docker-0123.scope".into());
    process.container_runtime = "docker".into();
    process.container_id = "0123".into();
    let text = render(&printer, response);
    assert!(text.contains("\n    exec       deleted binary, script run by /usr/bin/perl\n"), "{text}");
    assert!(text.contains("\n    pidns      pid 7 in its pid namespace (level 1)\n"), "{text}");
    assert!(text.contains("\n    unit       docker-0123.scope\n"), "{text}");
    assert!(text.contains("\n    container  docker 0123\n"), "{text}");
}

#[test]
fn command_line_parses_filters_and_replay() {
    use clap::Parser as _;

    let cli = WatchCli::try_parse_from([
        "watch",
        "--allow",
        "category=unexpected-flow,node=a",
        "--allow",
        "component=db",
        "--deny",
        "exe=/usr/bin/curl",
        "--last",
        "20",
    ])
    .unwrap();
    assert_eq!(cli.args.allow.len(), 2);
    assert_eq!(cli.args.allow[0].nodes, vec!["a".to_string()]);
    assert_eq!(cli.args.deny[0].executables, vec!["/usr/bin/curl".to_string()]);
    assert_eq!(cli.args.last, Some(20));

    let conflict = WatchCli::try_parse_from(["watch", "--last", "5", "--since", "10m"]);
    assert!(conflict.is_err());
    let bad = WatchCli::try_parse_from(["watch", "--allow", "colour=red"]).unwrap_err();
    assert!(bad.to_string().contains("unknown key \"colour\""), "{bad}");
}

#[test]
fn node_overflow_notice_names_the_node() {
    let printer = Printer {
        format: OutputFormat::Text,
        colour: false,
        show_resolution: false,
    };
    let response = pb::StreamDeviationsResponse {
        sequence: 12,
        payload: Some(Payload::Loss(pb::LossNotice {
            missed: 5,
            first_sequence: 40,
            last_sequence: 44,
            reason: pb::LossReason::NodeBufferOverflow as i32,
        })),
        node: "db-1".into(),
    };
    assert_eq!(
        render(&printer, response),
        "warning: missed 5 deviation(s), sequences 40 to 44: node db-1 overflowed its buffer \
         before pushing them to the collector (node sequences)\n\n"
    );
}
