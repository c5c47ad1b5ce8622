//! `driftwatch watch`: follow an agent's deviation stream in a terminal or as JSON lines.

use std::io::{self, IsTerminal, Write};
use std::time::SystemTime;

use anyhow::Context as _;
use driftwatch_model::deviation::{Category, Deviation, Severity};
use driftwatch_model::observation::ProcessInfo;
use driftwatch_proto::v1 as pb;
use pb::stream_deviations_response::Payload;
use serde_json::{json, Value};
use tonic::Code;

use super::watch_filter::parse_filter_spec;
use crate::api::convert::{self, category_to_proto, severity_to_proto};
use crate::terminal::escape_controls;
use crate::api::{connect, ListenAddr};

/// Arguments of `driftwatch watch`.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// Agent API address: unix:/path/to.sock, 127.0.0.1:PORT or [::1]:PORT.
    #[arg(long, value_name = "ADDR", default_value_t = ListenAddr::default())]
    pub api: ListenAddr,

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

    /// Output format: text for a terminal, or json for one JSON object per line.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    /// Print the model YAML that would declare each deviation (text output only, because JSON
    /// always carries it).
    #[arg(long)]
    pub show_resolution: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
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
    let mut client = connect(&args.api).await?;
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
    };
    let mut stream = client
        .stream_deviations(request)
        .await
        .with_context(|| format!("the agent at {} rejected the subscription", args.api))?
        .into_inner();

    let printer = Printer {
        format: args.output,
        colour: io::stdout().is_terminal(),
        show_resolution: args.show_resolution,
    };
    let mut stdout = io::stdout();
    loop {
        let response = match stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => {
                eprintln!("driftwatch: the agent at {} ended the stream", args.api);
                return Ok(());
            }
            Err(status) if agent_went_away(&status) => {
                // Non-zero, so that a supervisor can distinguish a lost agent from one that stopped cleanly.
                anyhow::bail!(
                    "lost the connection to the agent at {}: {}",
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
                    OutputFormat::Json => {
                        print_json_line(out, &deviation_json(sequence, &node, &deviation))
                    }
                },
                Err(err) => {
                    eprintln!("driftwatch: skipping deviation {sequence} that this build cannot read: {err}");
                    Ok(())
                }
            },
            Some(Payload::Loss(notice)) => match self.format {
                OutputFormat::Text => self.print_loss_text(out, &node, &notice),
                OutputFormat::Json => print_json_line(out, &loss_json(sequence, &node, &notice)),
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

fn print_process_lines(out: &mut impl Write, label: &str, process: &ProcessInfo) -> io::Result<()> {
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

fn deviation_json(sequence: u64, node: &str, deviation: &Deviation) -> Value {
    let mut deviation = serde_json::to_value(deviation).unwrap_or(Value::Null);
    times_to_rfc3339(&mut deviation);
    json!({ "sequence": sequence, "node": node, "deviation": deviation })
}

fn loss_json(sequence: u64, node: &str, notice: &pb::LossNotice) -> Value {
    let reason = match pb::LossReason::try_from(notice.reason) {
        Ok(pb::LossReason::SubscriberLagged) => "subscriber-lagged",
        Ok(pb::LossReason::HistoryEvicted) => "history-evicted",
        Ok(pb::LossReason::NodeBufferOverflow) => "node-buffer-overflow",
        _ => "unknown",
    };
    json!({
        "sequence": sequence,
        "node": node,
        "loss": {
            "missed": notice.missed,
            "first_sequence": notice.first_sequence,
            "last_sequence": notice.last_sequence,
            "reason": reason,
        }
    })
}

fn print_json_line(out: &mut impl Write, value: &Value) -> io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    writeln!(out)?;
    out.flush()
}

#[cfg(test)]
#[path = "watch_tests.rs"]
mod tests;
