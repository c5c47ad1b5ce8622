//! `driftwatch watch`: follow an agent's deviation stream in a terminal or as JSON lines.

use std::io::{self, IsTerminal, Write};
use std::time::SystemTime;

use anyhow::Context as _;
use driftwatch_model::deviation::{Category, Deviation, Severity};
use driftwatch_model::observation::ProcessInfo;
use driftwatch_proto::v1 as pb;
use pb::stream_deviations_response::Payload;
use serde_json::Value;
use tonic::Code;

use super::watch_events::{event_loss_text, parse_event_kinds, print_event_text};
use super::watch_filter::{check_event_conditions, parse_filter_spec};
use crate::api::convert_events::{event_kind_to_proto, raw_event_from_proto};
use crate::events::EventKinds;
use crate::api::convert::{self, category_to_proto, severity_to_proto};
use crate::jsonl;
use crate::terminal::escape_controls;
use crate::api::client::with_tls_advice;
use crate::api::{connect_with, ClientTlsArgs, ListenAddr};

/// Arguments of `driftwatch watch`.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// Agent API address: unix:/path/to.sock, IP:PORT or [IPv6]:PORT.
    #[arg(long, value_name = "ADDR", default_value_t = ListenAddr::default())]
    pub api: ListenAddr,

    #[command(flatten)]
    pub tls: ClientTlsArgs,

    /// Show only deviations at this severity or above: low, medium, elevated, high or critical.
    #[arg(long, value_name = "SEVERITY", value_parser = parse_severity)]
    pub min_severity: Option<Severity>,

    /// Show only deviations in this category, such as unexpected-flow. Repeat for several.
    #[arg(long = "category", value_name = "CATEGORY", value_parser = parse_category)]
    pub categories: Vec<Category>,

    /// Hide deviations in this category. Repeat for several.
    #[arg(long = "exclude-category", value_name = "CATEGORY", value_parser = parse_category)]
    pub exclude_categories: Vec<Category>,

    /// Print every deviation the agent still retains before following new ones.
    #[arg(long, conflicts_with = "from_sequence")]
    pub replay: bool,

    /// Resume a stream: print retained deviations from this sequence number on, then follow.
    #[arg(long, value_name = "SEQUENCE", conflicts_with_all = ["since", "last"])]
    pub from_sequence: Option<u64>,

    /// Output format: text for a terminal, or jsonl for one JSON object per deviation or loss
    /// notice, with the fields docs/jsonl.md lists (`--output json` is an older spelling).
    #[arg(long = "format", visible_alias = "output", value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,

    /// Print retained deviations published since this time, then follow: an RFC 3339 time such as
    /// 2026-01-31T12:00:00Z, or a duration before now such as 15m or 2h.
    #[arg(long, value_name = "TIME", value_parser = parse_since, conflicts_with_all = ["replay", "last"])]
    pub since: Option<SystemTime>,

    /// Print the latest N retained deviations that pass the filters, then follow.
    #[arg(long, value_name = "N", conflicts_with = "replay")]
    pub last: Option<u64>,

    /// Show deviations that match this filter; repeat for several, which combine with OR. A filter
    /// is comma-separated key=value conditions that must all hold, with the keys category,
    /// min-severity, component, zone, exe (a glob) and node; a key given twice accepts either
    /// value. Example: --allow category=unexpected-flow,min-severity=high,node=web-1
    #[arg(long = "allow", value_name = "FILTER", value_parser = parse_filter_spec)]
    pub allow: Vec<pb::DeviationFilter>,

    /// Hide deviations that match this filter, even when an --allow filter matches them; repeat
    /// for several. Same syntax as --allow.
    #[arg(long = "deny", value_name = "FILTER", value_parser = parse_filter_spec)]
    pub deny: Vec<pb::DeviationFilter>,

    /// Print the model YAML that would declare each deviation (text output only, because JSON
    /// lines always carry it).
    #[arg(long)]
    pub show_resolution: bool,

    /// Also print raw events of these kinds, comma-separated: process-exec, process-fork,
    /// process-exit, tcp-connect, tcp-established, tcp-connect-failed, tcp-accept, tcp-listen,
    /// tcp-close, udp-flow, udp-listen, dns-answer, the groups process, tcp, udp and dns, or all. --allow and
    /// --deny apply to them too; an `event=KIND` condition makes a filter concern events only.
    #[arg(long, value_name = "KINDS", value_parser = parse_event_kinds)]
    pub events: Option<EventKinds>,

    /// Resume events: print retained events from this event sequence on (the `#eN` or the
    /// `sequence` of an event record), then follow. Needs --events.
    #[arg(long, value_name = "SEQUENCE", requires = "events")]
    pub from_event_sequence: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    #[value(alias = "json")]
    Jsonl,
}

fn parse_severity(text: &str) -> Result<Severity, String> {
    Severity::parse(text).ok_or_else(|| {
        let names: Vec<_> = Severity::ALL
            .iter()
            .map(|severity| severity.as_str())
            .collect();
        format!("expected one of {}", names.join(", "))
    })
}

/// Parses an RFC 3339 time, or a duration before now such as `15m`.
fn parse_since(text: &str) -> Result<SystemTime, String> {
    if let Ok(time) = humantime::parse_rfc3339_weak(text) {
        return Ok(time);
    }
    let ago = humantime::parse_duration(text).map_err(|_| {
        "expected an RFC 3339 time such as 2026-01-31T12:00:00Z or a duration such as 15m".to_string()
    })?;
    SystemTime::now()
        .checked_sub(ago)
        .ok_or_else(|| format!("{text} before now is before the epoch"))
}

fn parse_category(text: &str) -> Result<Category, String> {
    Category::parse(text).ok_or_else(|| {
        let names: Vec<_> = Category::ALL
            .iter()
            .map(|category| category.as_str())
            .collect();
        format!("expected one of {}", names.join(", "))
    })
}

/// Follows the deviation stream until the agent ends it or goes away.
///
/// # Errors
///
/// Fails when the agent cannot be reached or rejects the request, or when writing to stdout fails
/// for another reason than a closed pipe.
pub async fn run(args: WatchArgs) -> anyhow::Result<()> {
    check_event_conditions(&args.allow, &args.deny, args.events.is_some()).map_err(anyhow::Error::msg)?;
    let mut client = connect_with(&args.api, &args.tls).await?;
    #[allow(deprecated, reason = "these flags map to the fields that predate the filter lists")]
    let request = pb::StreamDeviationsRequest {
        min_severity: args
            .min_severity
            .map_or(0, |severity| severity_to_proto(severity) as i32),
        categories: args
            .categories
            .iter()
            .map(|c| category_to_proto(*c) as i32)
            .collect(),
        exclude_categories: args
            .exclude_categories
            .iter()
            .map(|c| category_to_proto(*c) as i32)
            .collect(),
        from_sequence: if args.replay {
            Some(0)
        } else {
            args.from_sequence
        },
        allow: args.allow.clone(),
        deny: args.deny.clone(),
        since: args.since.map(Into::into),
        last: args.last,
        events: args
            .events
            .unwrap_or_default()
            .iter()
            .map(|kind| event_kind_to_proto(kind) as i32)
            .collect(),
        from_event_sequence: args.from_event_sequence,
    };
    let mut stream = client
        .stream_deviations(request)
        .await
        .with_context(|| format!("the server at {} rejected the subscription", args.api))
        .map_err(|error| with_tls_advice(error, &args.api))?
        .into_inner();

    let printer = Printer {
        format: args.format,
        colour: io::stdout().is_terminal(),
        show_resolution: args.show_resolution,
    };
    let mut stdout = io::stdout();
    loop {
        let response = match stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => {
                eprintln!("driftwatch: the server at {} ended the stream", args.api);
                return Ok(());
            }
            Err(status) if agent_went_away(&status) => {
                // Non-zero, so that a supervisor can distinguish a lost server from one that stopped
                // cleanly. The server may be an agent or a collector, and the stream does not say which.
                anyhow::bail!(
                    "lost the connection to the server at {}: {}",
                    args.api,
                    status.message()
                );
            }
            Err(status) => {
                return Err(anyhow::Error::new(status))
                    .with_context(|| format!("the deviation stream from {} failed", args.api));
            }
        };

        match printer.print(&mut stdout, response) {
            Ok(()) => {}
            // A reader such as `head` that closed the pipe wants no more, which is not an error.
            Err(err) if err.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            Err(err) => return Err(err).context("failed to write to stdout"),
        }
    }
}

/// Returns true for the errors a stream ends with when the agent stops or the connection drops.
fn agent_went_away(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted
    )
}

struct Printer {
    format: OutputFormat,
    colour: bool,
    show_resolution: bool,
}

impl Printer {
    fn print(
        &self,
        out: &mut impl Write,
        response: pb::StreamDeviationsResponse,
    ) -> io::Result<()> {
        let sequence = response.sequence;
        let node = response.node;
        match response.payload {
            Some(Payload::Deviation(deviation)) => match convert::deviation_from_proto(deviation) {
                Ok(deviation) => match self.format {
                    OutputFormat::Text => {
                        self.print_deviation_text(out, sequence, &node, &deviation)
                    }
                    OutputFormat::Jsonl => {
                        print_json_line(out, &with_node(jsonl::deviation_record(sequence, &deviation), &node))
                    }
                },
                Err(err) => {
                    eprintln!("driftwatch: skipping deviation {sequence} that this build cannot read: {err}");
                    Ok(())
                }
            },
            Some(Payload::Loss(notice)) => match self.format {
                OutputFormat::Text => self.print_loss_text(out, &node, &notice),
                OutputFormat::Jsonl => print_json_line(out, &with_node(loss_record(&notice), &node)),
            },
            Some(Payload::Event(event)) => match raw_event_from_proto(event) {
                Ok(event) => match self.format {
                    OutputFormat::Text => print_event_text(out, sequence, &node, &event),
                    OutputFormat::Jsonl => print_json_line(out, &with_node(jsonl::event_record(sequence, &event), &node)),
                },
                Err(err) => {
                    eprintln!("driftwatch: skipping event {sequence} that this build cannot read: {err}");
                    Ok(())
                }
            },
            Some(Payload::EventLoss(notice)) => match self.format {
                OutputFormat::Text => writeln!(out, "{}\n", self.paint(YELLOW, &event_loss_text(&notice))),
                OutputFormat::Jsonl => {
                    let reason = loss_record(&notice)["reason"].as_str().unwrap_or("unknown").to_string();
                    print_json_line(out, &jsonl::event_loss_record(notice.first_sequence, notice.last_sequence, &reason))
                }
            },
            None => {
                eprintln!("driftwatch: skipping message {sequence} with a payload this build does not know");
                Ok(())
            }
        }
    }

    fn print_deviation_text(
        &self,
        out: &mut impl Write,
        sequence: u64,
        node: &str,
        deviation: &Deviation,
    ) -> io::Result<()> {
        let severity = deviation.severity.as_str().to_uppercase();
        let severity = self.paint(
            severity_colour(deviation.severity),
            &format!("{severity:<8}"),
        );
        let node = if node.is_empty() {
            String::new()
        } else {
            format!("  node {}", escape_controls(node))
        };
        writeln!(
            out,
            "{}  {}  {}  #{}{node}",
            format_time(deviation.last_seen),
            severity,
            deviation.category.as_str(),
            sequence
        )?;
        writeln!(out, "  {}", escape_controls(&deviation.summary))?;
        writeln!(out, "    id         {}", escape_controls(&deviation.id))?;

        let evidence = &deviation.evidence;
        if let Some(process) = &evidence.process {
            print_process_lines(out, "process", process)?;
        }
        if let Some(peer) = &evidence.peer_process {
            print_process_lines(out, "peer", peer)?;
        }
        let endpoints = match (evidence.local_addr, evidence.remote_addr) {
            (Some(local), Some(remote)) => Some(format!("{local} -> {remote}")),
            (Some(local), None) => Some(local.to_string()),
            (None, Some(remote)) => Some(format!("-> {remote}")),
            (None, None) => None,
        };
        if let Some(endpoints) = endpoints {
            let protocol = deviation
                .protocol
                .map(|p| format!(" ({})", p.as_str()))
                .unwrap_or_default();
            writeln!(out, "    endpoints  {endpoints}{protocol}")?;
        }
        match (&evidence.source_zone, &evidence.destination_zone) {
            (Some(source), Some(destination)) => {
                writeln!(out, "    zones      {source} -> {destination}")?
            }
            (Some(zone), None) | (None, Some(zone)) => writeln!(out, "    zone       {zone}")?,
            (None, None) => {}
        }
        writeln!(
            out,
            "    seen       {} time(s), first {}",
            deviation.count,
            format_time(deviation.first_seen)
        )?;
        if self.show_resolution && !deviation.resolution.is_empty() {
            writeln!(out, "    resolution")?;
            for line in deviation.resolution.lines() {
                writeln!(out, "      {}", escape_controls(line))?;
            }
        }
        writeln!(out)
    }

    fn print_loss_text(
        &self,
        out: &mut impl Write,
        node: &str,
        notice: &pb::LossNotice,
    ) -> io::Result<()> {
        let overflow;
        let cause = match pb::LossReason::try_from(notice.reason) {
            Ok(pb::LossReason::SubscriberLagged) => {
                "this client read too slowly and the agent dropped them"
            }
            Ok(pb::LossReason::HistoryEvicted) => "the agent no longer retains them for replay",
            Ok(pb::LossReason::NodeBufferOverflow) => {
                overflow = format!(
                    "node {} overflowed its buffer before pushing them to the collector (node sequences)",
                    escape_controls(node)
                );
                &overflow
            }
            _ => "the agent gave no known reason",
        };
        let line = format!(
            "warning: missed {} deviation(s), sequences {} to {}: {cause}",
            notice.missed, notice.first_sequence, notice.last_sequence
        );
        writeln!(out, "{}\n", self.paint(YELLOW, &line))
    }

    fn paint(&self, colour: &str, text: &str) -> String {
        if self.colour {
            format!("{colour}{text}{RESET}")
        } else {
            text.to_owned()
        }
    }
}

const RESET: &str = "\x1b[0m";
const YELLOW: &str = "\x1b[33m";

fn severity_colour(severity: Severity) -> &'static str {
    match severity {
        Severity::Critical => "\x1b[1;31m",
        Severity::High => "\x1b[31m",
        Severity::Elevated => YELLOW,
        Severity::Medium => "\x1b[36m",
        Severity::Low => "\x1b[2m",
    }
}

pub(super) fn print_process_lines(out: &mut impl Write, label: &str, process: &ProcessInfo) -> io::Result<()> {
    writeln!(
        out,
        "    {label:<10} pid {} (ppid {}) {}",
        process.pid,
        process.ppid,
        escape_controls(&process.exe)
    )?;
    if !process.argv.is_empty() {
        let truncated = if process.argv_truncated { " ..." } else { "" };
        writeln!(
            out,
            "    {:<10} {}{truncated}",
            "argv",
            escape_controls(&process.argv.join(" "))
        )?;
    }
    let user = escape_controls(process.user.as_deref().unwrap_or("?"));
    writeln!(
        out,
        "    {:<10} {user} (uid {}, gid {})",
        "user", process.uid, process.gid
    )?;
    if !process.cgroup.is_empty() {
        writeln!(out, "    {:<10} {}", "cgroup", escape_controls(&process.cgroup))?;
    }
    print_exec_lines(out, process)?;
    if !process.ancestry.is_empty() {
        let ancestry: Vec<String> = process
            .ancestry
            .iter()
            .map(|(pid, exe)| format!("{pid} {}", escape_controls(exe)))
            .collect();
        writeln!(out, "    {:<10} {}", "ancestry", ancestry.join(" <- "))?;
    }
    Ok(())
}

/// Prints how the program was started and where it runs, one line per kind of fact, and skips
/// the kinds that have no facts.
fn print_exec_lines(out: &mut impl Write, process: &ProcessInfo) -> io::Result<()> {
    let exec = &process.exec;
    let mut started = Vec::new();
    if exec.fileless {
        started.push("fileless (memfd)".to_string());
    }
    if exec.exe_deleted && !exec.fileless {
        started.push("deleted binary".to_string());
    }
    if exec.from_descriptor {
        started.push("from a file descriptor".to_string());
    }
    if let Some(interpreter) = &exec.interpreter {
        started.push(format!("script run by {}", escape_controls(interpreter)));
    }
    if !started.is_empty() {
        writeln!(out, "    {:<10} {}", "exec", started.join(", "))?;
    }

    if let (Some(pid), true) = (exec.namespace_pid, exec.pid_namespace_level > 0) {
        writeln!(out, "    {:<10} pid {pid} in its pid namespace (level {})", "pidns", exec.pid_namespace_level)?;
    }
    if let Some(unit) = &exec.systemd_unit {
        writeln!(out, "    {:<10} {}", "unit", escape_controls(unit))?;
    }

    if let Some(container) = &process.container {
        let mut placement = Vec::new();
        if !container.id.is_empty() {
            placement.push(format!("{} {}", escape_controls(&container.runtime), escape_controls(&container.id)));
        }
        if let Some(pod) = &container.pod {
            placement.push(format!("pod {}", escape_controls(&pod.uid)));
        }
        if !placement.is_empty() {
            writeln!(out, "    {:<10} {}", "container", placement.join(", "))?;
        }
    }
    Ok(())
}

/// Formats a time as RFC 3339 in UTC, to the second.
pub(crate) fn format_time(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// Replaces every serialized `SystemTime` in `value` (an object with exactly `secs_since_epoch`
/// and `nanos_since_epoch`) by an RFC 3339 string, which JSON consumers parse without help.
pub(crate) fn times_to_rfc3339(value: &mut Value) {
    match value {
        Value::Object(map) => {
            let secs = map.get("secs_since_epoch").and_then(Value::as_u64);
            let nanos = map.get("nanos_since_epoch").and_then(Value::as_u64);
            if let (2, Some(secs), Some(nanos)) = (map.len(), secs, nanos) {
                let time = SystemTime::UNIX_EPOCH
                    + std::time::Duration::new(secs, u32::try_from(nanos).unwrap_or(0));
                *value = Value::String(humantime::format_rfc3339_nanos(time).to_string());
                return;
            }
            map.values_mut().for_each(times_to_rfc3339);
        }
        Value::Array(items) => items.iter_mut().for_each(times_to_rfc3339),
        _ => {}
    }
}

/// Adds the node that raised a record to it, when the stream names one (a collector's does).
fn with_node(mut record: Value, node: &str) -> Value {
    if !node.is_empty() {
        if let Value::Object(fields) = &mut record {
            fields.insert("node".to_string(), Value::String(node.to_string()));
        }
    }
    record
}

/// Builds the JSON lines record of a loss notice from the stream; a reason this build does not
/// know is written as `unknown` rather than dropping the record.
fn loss_record(notice: &pb::LossNotice) -> Value {
    let reason = match pb::LossReason::try_from(notice.reason) {
        Ok(pb::LossReason::SubscriberLagged) => "subscriber-lagged",
        Ok(pb::LossReason::HistoryEvicted) => "history-evicted",
        Ok(pb::LossReason::NodeBufferOverflow) => "node-buffer-overflow",
        _ => "unknown",
    };
    jsonl::loss_range_record(notice.first_sequence, notice.last_sequence, reason)
}

fn print_json_line(out: &mut impl Write, value: &Value) -> io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    writeln!(out)?;
    out.flush()
}

#[cfg(test)]
#[path = "watch_tests.rs"]
mod tests;
