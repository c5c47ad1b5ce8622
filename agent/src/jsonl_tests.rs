use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use driftwatch_model::deviation::{Category, Deviation, Evidence, Severity, Stride};
use driftwatch_model::observation::{ProcessInfo, Protocol};

use super::*;
use crate::api::hub::{DeviationFilter, DeviationHub, HubConfig};

fn deviation(port: u16) -> Deviation {
    let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    Deviation {
        id: format!("unexpected-flow@web@db@tcp/{port}"),
        category: Category::UnexpectedFlow,
        severity: Severity::High,
        stride: Stride::InformationDisclosure,
        summary: "web connected to db".into(),
        source: "web".into(),
        destination: "db".into(),
        protocol: Some(Protocol::Tcp),
        port: Some(port),
        evidence: Evidence {
            process: Some(ProcessInfo {
                pid: 4242,
                ppid: 1,
                exe: "/usr/bin/curl".into(),
                argv: vec!["curl".into(), "db".into()],
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
            local_addr: Some("10.0.0.2:40000".parse::<SocketAddr>().unwrap()),
            remote_addr: Some("10.0.0.3:5432".parse::<SocketAddr>().unwrap()),
            source_zone: Some("dmz".into()),
            destination_zone: Some("core".into()),
            netns: 4026531840,
            remote_name: None,
        },
        first_seen: time,
        last_seen: time,
        count: 1,
        resolution: "flows:\n  - { from: web, to: db, port: 5432 }\n".into(),
    }
}

#[test]
fn deviation_record_has_documented_fields() {
    let record = deviation_record(7, &deviation(5432));
    assert_eq!(record["type"], "deviation");
    assert_eq!(record["version"], 1);
    assert_eq!(record["sequence"], 7);
    assert_eq!(record["id"], "unexpected-flow@web@db@tcp/5432");
    assert_eq!(record["category"], "unexpected-flow");
    assert_eq!(record["severity"], "high");
    assert_eq!(record["stride"], "information-disclosure");
    assert_eq!(record["protocol"], "tcp");
    assert_eq!(record["port"], 5432);
    assert_eq!(record["first_seen"], "2027-01-15T08:00:00.000000000Z");
    assert_eq!(record["process"]["pid"], 4242);
    assert_eq!(record["process"]["user"], "www-data");
    assert_eq!(record["process"]["ancestry"][0]["exe"], "/bin/bash");
    assert_eq!(record["peer_process"], Value::Null);
    assert_eq!(record["local_addr"], "10.0.0.2:40000");
    assert_eq!(record["remote_addr"], "10.0.0.3:5432");
    assert_eq!(record["source_zone"], "dmz");
    assert_eq!(record["netns"], 4026531840u64);
}

#[test]
fn loss_record_counts_the_range() {
    let record = loss_record(&LossNotice {
        first_sequence: 10,
        last_sequence: 14,
        reason: LossReason::SubscriberLagged,
    });
    assert_eq!(record["type"], "loss");
    assert_eq!(record["sequence"], 14);
    assert_eq!(record["missed"], 5);
    assert_eq!(record["reason"], "subscriber-lagged");
}

fn lines(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn file_rotates_before_passing_the_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deviations.jsonl");
    let line_bytes = serde_json::to_vec(&deviation_record(1, &deviation(1000))).unwrap().len() as u64 + 1;
    // Room for two lines per file.
    let mut writer = JsonlWriter::open(JsonlTarget::File {
        path: path.clone(),
        max_bytes: line_bytes * 2,
        keep: 2,
    })
    .unwrap();
    for sequence in 1..=7 {
        writer.write_record(&deviation_record(sequence, &deviation(1000))).unwrap();
    }

    assert_eq!(writer.rotations(), 3);
    let sequences = |path: &Path| -> Vec<u64> { lines(path).iter().map(|line| line["sequence"].as_u64().unwrap()).collect() };
    assert_eq!(sequences(&path), vec![7]);
    assert_eq!(sequences(&numbered(&path, 1)), vec![5, 6]);
    assert_eq!(sequences(&numbered(&path, 2)), vec![3, 4]);
    assert!(!numbered(&path, 3).exists(), "only two rotated files are kept");
}

#[test]
fn reopened_file_counts_its_existing_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deviations.jsonl");
    let record = deviation_record(1, &deviation(1000));
    let line_bytes = serde_json::to_vec(&record).unwrap().len() as u64 + 1;
    let target = JsonlTarget::File {
        path: path.clone(),
        max_bytes: line_bytes,
        keep: 1,
    };
    JsonlWriter::open(target.clone()).unwrap().write_record(&record).unwrap();

    let mut reopened = JsonlWriter::open(target).unwrap();
    reopened.write_record(&record).unwrap();
    assert_eq!(reopened.rotations(), 1);
    assert_eq!(lines(&path).len(), 1);
    assert_eq!(lines(&numbered(&path, 1)).len(), 1);
}

#[tokio::test]
async fn writer_task_writes_every_published_deviation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deviations.jsonl");
    let hub = DeviationHub::new(HubConfig::default());
    let subscription = hub.subscribe(DeviationFilter::default(), None).unwrap();
    let writer = JsonlWriter::open(JsonlTarget::File {
        path: path.clone(),
        max_bytes: 1 << 20,
        keep: 1,
    })
    .unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run_writer(subscription, writer, cancel.clone()));

    for port in [1, 2, 3] {
        hub.publish(deviation(port));
    }
    // The hub ends subscriptions when it is dropped, so the task drains all three and returns.
    drop(hub);
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();

    let written = lines(&path);
    let ids: Vec<&str> = written.iter().map(|line| line["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["unexpected-flow@web@db@tcp/1", "unexpected-flow@web@db@tcp/2", "unexpected-flow@web@db@tcp/3"]);
}
