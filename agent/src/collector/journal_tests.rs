use std::time::Duration;

use driftwatch_model::deviation::{Category, Evidence, Severity, Stride};

use super::*;

fn deviation(n: u64) -> Deviation {
    let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + n);
    Deviation {
        id: format!("unexpected-flow@web@db{n}@tcp/5432"),
        category: Category::UnexpectedFlow,
        severity: Severity::High,
        stride: Stride::Tampering,
        summary: format!("deviation {n}"),
        source: "web".into(),
        destination: format!("db{n}"),
        protocol: None,
        port: Some(5432),
        evidence: Evidence {
            process: None,
            peer_process: None,
            local_addr: Some("198.18.2.10:40000".parse().unwrap()),
            remote_addr: None,
            source_zone: Some("dmz".into()),
            destination_zone: None,
            netns: 0,
            remote_name: None,
        },
        first_seen: time,
        last_seen: time,
        count: 1,
        resolution: String::new(),
    }
}

fn entry(sequence: u64, node: &str, n: u64) -> Entry {
    Entry {
        sequence,
        published_at: SystemTime::UNIX_EPOCH + Duration::from_secs(n),
        item: EntryItem::Deviation {
            node: Arc::from(node),
            deviation: Arc::new(deviation(n)),
        },
    }
}

#[test]
fn reopened_journal_restores_sequence_history_and_cursors() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut journal, recovered) = Journal::open(dir.path(), 10).unwrap();
        assert_eq!(recovered.next_sequence, 1);
        journal.append_cursor("a", Cursor { run_id: 7, ..Cursor::default() }).unwrap();
        journal.append_entry(&entry(1, "a", 1), 7, 1).unwrap();
        journal.append_entry(&entry(2, "b", 2), 9, 4).unwrap();
        journal.append_entry(&entry(3, "a", 3), 7, 2).unwrap();
    }
    let (_, recovered) = Journal::open(dir.path(), 2).unwrap();
    assert_eq!(recovered.next_sequence, 4);
    let sequences: Vec<u64> = recovered.entries.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, vec![2, 3], "only the latest two are kept");
    assert_eq!(recovered.entries[1], entry(3, "a", 3));
    assert_eq!(
        recovered.cursors["a"],
        Cursor { run_id: 7, acknowledged: 2, received: 2, lost: 0 }
    );
    assert_eq!(
        recovered.cursors["b"],
        Cursor { run_id: 9, acknowledged: 4, received: 1, lost: 0 }
    );
}

#[test]
fn compaction_keeps_cursors_of_nodes_without_retained_entries() {
    let dir = tempfile::tempdir().unwrap();
    let (mut journal, _) = Journal::open(dir.path(), 10).unwrap();
    for n in 1..=5 {
        journal.append_entry(&entry(n, "a", n), 7, n).unwrap();
    }
    let cursors = BTreeMap::from([
        ("a".to_string(), Cursor { run_id: 7, acknowledged: 5, received: 5, lost: 0 }),
        ("gone".to_string(), Cursor { run_id: 3, acknowledged: 40, received: 40, lost: 2 }),
    ]);
    journal.compact(6, &cursors, &[entry(5, "a", 5)]).unwrap();
    assert_eq!(journal.lines_since_compaction(), 0);
    journal.append_entry(&entry(6, "a", 6), 7, 6).unwrap();
    drop(journal);

    let (_, recovered) = Journal::open(dir.path(), 10).unwrap();
    assert_eq!(recovered.next_sequence, 7);
    assert_eq!(recovered.cursors["gone"].acknowledged, 40);
    assert_eq!(recovered.cursors["a"].acknowledged, 6);
    assert_eq!(recovered.cursors["a"].received, 6);
    let sequences: Vec<u64> = recovered.entries.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, vec![5, 6]);
}

#[test]
fn new_run_resets_the_acknowledged_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let (mut journal, _) = Journal::open(dir.path(), 10).unwrap();
    journal.append_entry(&entry(1, "a", 1), 7, 30).unwrap();
    journal.append_entry(&entry(2, "a", 2), 8, 1).unwrap();
    drop(journal);
    let (_, recovered) = Journal::open(dir.path(), 10).unwrap();
    assert_eq!(recovered.cursors["a"].run_id, 8);
    assert_eq!(recovered.cursors["a"].acknowledged, 1);
}

#[test]
fn partial_last_line_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (mut journal, _) = Journal::open(dir.path(), 10).unwrap();
    journal.append_entry(&entry(1, "a", 1), 7, 1).unwrap();
    drop(journal);
    let path = dir.path().join(FILE_NAME);
    let mut text = fs::read_to_string(&path).unwrap();
    text.push_str("{\"kind\":\"entry\",\"seq");
    fs::write(&path, text).unwrap();

    let (_, recovered) = Journal::open(dir.path(), 10).unwrap();
    assert_eq!(recovered.next_sequence, 2);
}

#[test]
fn invalid_line_is_an_error_with_its_line_number() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    fs::write(&path, "{\"kind\":\"next\",\"sequence\":3}\nnot json\n{\"kind\":\"next\",\"sequence\":4}\n").unwrap();
    let Err(error) = Journal::open(dir.path(), 10) else {
        panic!("a corrupt journal opened");
    };
    let message = error.to_string();
    assert!(message.contains("journal.jsonl:2: invalid journal record"), "{message}");
}
