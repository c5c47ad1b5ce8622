//! JSON lines for SIEMs and log shippers: one object per deviation or loss notice, with field names
//! that stay stable across releases (docs/jsonl.md lists them), written by `driftwatch agent
//! --jsonl` and `driftwatch watch --format jsonl`.
//!
//! A file output rotates by size: when the next line would pass the limit, `FILE` is renamed to
//! `FILE.1` (older ones shift to `FILE.2` up to the number kept) and a new `FILE` is started. Lines
//! are never split across files.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use driftwatch_model::deviation::Deviation;
use driftwatch_model::observation::ProcessInfo;
use serde_json::{json, Value};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::api::hub::{HubMessage, LossNotice, LossReason, Subscription};
use crate::events::{EventDetail, RawEvent};

/// Version of the record layout, in every record's `version` field. It changes only when a field
/// is removed or changes meaning; new fields keep it.
pub const RECORD_VERSION: u64 = 1;

/// Builds the record for one deviation with its stream sequence number.
pub fn deviation_record(sequence: u64, deviation: &Deviation) -> Value {
    let evidence = &deviation.evidence;
    json!({
        "type": "deviation",
        "version": RECORD_VERSION,
        "sequence": sequence,
        "id": deviation.id,
        "category": deviation.category.as_str(),
        "severity": deviation.severity.as_str(),
        "stride": serde_json::to_value(deviation.stride).unwrap_or(Value::Null),
        "summary": deviation.summary,
        "source": deviation.source,
        "destination": deviation.destination,
        "protocol": deviation.protocol.map(|protocol| protocol.as_str()),
        "port": deviation.port,
        "first_seen": rfc3339(deviation.first_seen),
        "last_seen": rfc3339(deviation.last_seen),
        "count": deviation.count,
        "process": evidence.process.as_ref().map(process_record),
        "peer_process": evidence.peer_process.as_ref().map(process_record),
        "local_addr": evidence.local_addr.map(|addr| addr.to_string()),
        "remote_addr": evidence.remote_addr.map(|addr| addr.to_string()),
        "remote_name": evidence.remote_name,
        "source_zone": evidence.source_zone,
        "destination_zone": evidence.destination_zone,
        "netns": evidence.netns,
        "resolution": deviation.resolution,
    })
}

/// Builds the record for one raw event with its event sequence number. Fields that belong to
/// other kinds are left out, so a process event has no addresses and a socket event no exit code.
pub fn event_record(sequence: u64, event: &RawEvent) -> Value {
    let mut record = json!({
        "type": "event",
        "version": RECORD_VERSION,
        "sequence": sequence,
        "kind": event.kind.as_str(),
        "time": rfc3339(event.time),
        "process": event.process.as_deref().map(process_record),
        "component": event.placement.component,
        "zone": event.placement.zone,
    });
    let detail = match &event.detail {
        EventDetail::Exec => json!({}),
        EventDetail::Fork { child_pid } => json!({ "child_pid": child_pid }),
        EventDetail::Exit { exit_code } => json!({ "exit_code": exit_code }),
        EventDetail::Socket(socket) => json!({
            "protocol": socket.protocol.as_str(),
            "local_addr": socket.local.to_string(),
            "remote_addr": (!socket.remote.ip().is_unspecified()).then(|| socket.remote.to_string()),
            "netns": socket.netns,
            "bytes_sent": socket.bytes_sent,
            "bytes_received": socket.bytes_received,
            "error": socket.error,
            "remote_name": socket.remote_name,
            "remote_component": socket.remote_placement.component,
            "remote_zone": socket.remote_placement.zone,
            "is_reply": socket.is_reply,
            "received": socket.received,
        }),
        EventDetail::DnsAnswer { name, addresses, server } => json!({
            "dns_name": name,
            "dns_addresses": addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "dns_server": server.to_string(),
        }),
    };
    if let (Value::Object(fields), Value::Object(extra)) = (&mut record, detail) {
        fields.extend(extra);
    }
    record
}

/// Builds the record for a range of event sequences a reader did not receive; `reason` as in
/// [`loss_range_record`].
pub fn event_loss_record(first_sequence: u64, last_sequence: u64, reason: &str) -> Value {
    let mut record = loss_range_record(first_sequence, last_sequence, reason);
    record["type"] = Value::String("event-loss".to_string());
    record
}

/// Builds the record for a range of sequence numbers a reader did not receive.
pub fn loss_record(notice: &LossNotice) -> Value {
    let reason = match notice.reason {
        LossReason::SubscriberLagged => "subscriber-lagged",
        LossReason::HistoryEvicted => "history-evicted",
    };
    loss_range_record(notice.first_sequence, notice.last_sequence, reason)
}

/// Builds the record for the sequences `first_sequence` to `last_sequence`, both included, missed
/// for `reason` (`subscriber-lagged`, `history-evicted` or `unknown`).
pub fn loss_range_record(first_sequence: u64, last_sequence: u64, reason: &str) -> Value {
    json!({
        "type": "loss",
        "version": RECORD_VERSION,
        "sequence": last_sequence,
        "first_sequence": first_sequence,
        "last_sequence": last_sequence,
        "missed": last_sequence.saturating_sub(first_sequence) + 1,
        "reason": reason,
        "time": rfc3339(SystemTime::now()),
    })
}

fn process_record(process: &ProcessInfo) -> Value {
    let ancestry: Vec<Value> = process
        .ancestry
        .iter()
        .map(|(pid, exe)| json!({ "pid": pid, "exe": exe }))
        .collect();
    json!({
        "pid": process.pid,
        "ppid": process.ppid,
        "exe": process.exe,
        "argv": process.argv,
        "argv_truncated": process.argv_truncated,
        "uid": process.uid,
        "gid": process.gid,
        "user": process.user,
        "cgroup": process.cgroup,
        "comm": process.comm,
        "ancestry": ancestry,
        "exec": serde_json::to_value(&process.exec).unwrap_or(Value::Null),
        "container": serde_json::to_value(process.container.as_deref()).unwrap_or(Value::Null),
    })
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_nanos(time).to_string()
}

/// Destination of `--jsonl`: standard output, or a file rotated by size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonlTarget {
    Stdout,
    File {
        path: PathBuf,
        /// Size in bytes a file may reach before it is rotated.
        max_bytes: u64,
        /// Rotated files kept besides the current one; 0 truncates in place.
        keep: u32,
    },
}

/// A line-oriented writer for [`JsonlTarget`].
pub struct JsonlWriter {
    target: JsonlTarget,
    output: Box<dyn Write + Send>,
    /// Bytes in the current file.
    written: u64,
    rotations: u64,
}

impl JsonlWriter {
    /// Opens the target; a file is appended to, so a restart continues it.
    ///
    /// # Errors
    ///
    /// Fails when the file cannot be opened or its size read.
    pub fn open(target: JsonlTarget) -> io::Result<JsonlWriter> {
        let (output, written): (Box<dyn Write + Send>, u64) = match &target {
            JsonlTarget::Stdout => (Box::new(io::stdout()), 0),
            JsonlTarget::File { path, .. } => {
                let file = open_append(path)?;
                let size = file.metadata()?.len();
                (Box::new(io::BufWriter::new(file)), size)
            }
        };
        Ok(JsonlWriter {
            target,
            output,
            written,
            rotations: 0,
        })
    }

    /// Returns how many times the file was rotated since it was opened.
    pub fn rotations(&self) -> u64 {
        self.rotations
    }

    /// Writes `record` as one line and flushes it, rotating the file first when the line would
    /// take it past its size limit. A file that is still empty takes any line, however long.
    ///
    /// # Errors
    ///
    /// Fails when writing, flushing, renaming or reopening fails.
    pub fn write_record(&mut self, record: &Value) -> io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
        line.push(b'\n');
        if let JsonlTarget::File { max_bytes, .. } = &self.target {
            if self.written > 0 && self.written + line.len() as u64 > *max_bytes {
                self.rotate()?;
            }
        }
        self.output.write_all(&line)?;
        self.output.flush()?;
        self.written += line.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let JsonlTarget::File { path, keep, .. } = &self.target else { return Ok(()) };
        self.output.flush()?;
        if *keep == 0 {
            self.output = Box::new(io::BufWriter::new(File::create(path)?));
        } else {
            // Shift FILE.(n-1) to FILE.n from the oldest down, so nothing is overwritten that is
            // still kept; the oldest, FILE.keep, is replaced.
            for index in (1..*keep).rev() {
                let from = numbered(path, index);
                if from.exists() {
                    fs::rename(&from, numbered(path, index + 1))?;
                }
            }
            fs::rename(path, numbered(path, 1))?;
            self.output = Box::new(io::BufWriter::new(open_append(path)?));
        }
        self.written = 0;
        self.rotations += 1;
        tracing::info!(path = %path.display(), keep, "rotated the JSON lines file");
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn numbered(path: &Path, index: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{index}"));
    PathBuf::from(name)
}

/// Writes every message of `subscription` to `writer` until `cancel` fires or the hub goes away.
///
/// A write error is logged once per run of failures and the message is counted as lost. The
/// writer keeps going, so a full disk loses lines instead of stopping the agent.
pub async fn run_writer(mut subscription: Subscription, mut writer: JsonlWriter, cancel: CancellationToken) {
    let mut failing = false;
    let mut failed_lines = 0u64;
    loop {
        let message = tokio::select! {
            _ = cancel.cancelled() => break,
            message = subscription.next() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let record = match &message {
            HubMessage::Deviation { sequence, deviation, .. } => deviation_record(*sequence, deviation),
            HubMessage::Loss(notice) => {
                tracing::warn!(missed = notice.missed(), "the JSON lines writer fell behind; it wrote a loss record");
                loss_record(notice)
            }
            // Only a collector's hub carries node gaps; the range is in the node's numbering.
            HubMessage::NodeGap { gap, .. } => {
                let mut record = loss_range_record(gap.first_sequence, gap.last_sequence, "node-buffer-overflow");
                record["node"] = Value::String(gap.node.to_string());
                record
            }
        };
        // NOTE: the write blocks this runtime worker. One line to a local file or stdout is short,
        // but a stalled stdout reader or NFS mount holds the worker until the write returns.
        match writer.write_record(&record) {
            Ok(()) => {
                if failing {
                    tracing::info!(failed_lines, "the JSON lines output recovered");
                    failing = false;
                }
            }
            Err(error) => {
                failed_lines += 1;
                if !failing {
                    tracing::error!(%error, sequence = message.sequence(), "failed to write a JSON line; lines are lost until writes succeed again");
                    failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "jsonl_tests.rs"]
mod tests;
