//! Raw events in `driftwatch watch`: the `--events` list and how an event prints.

use std::io::{self, Write};

use driftwatch_proto::v1 as pb;

use super::watch::{format_time, print_process_lines};
use crate::events::{EventDetail, EventKind, EventKinds, Placement, RawEvent};
use crate::terminal::escape_controls;

/// Parses `--events`: comma-separated event kinds such as `process-exec,tcp-close`, the groups
/// `process`, `tcp`, `udp` and `dns`, or `all`.
///
/// # Errors
///
/// A message naming the unknown kind and listing the known ones.
pub fn parse_event_kinds(spec: &str) -> Result<EventKinds, String> {
    let mut kinds = EventKinds::NONE;
    for name in spec.split(',').map(str::trim) {
        if name == "all" {
            return Ok(EventKinds::all());
        }
        let group: Vec<EventKind> = EventKind::ALL
            .into_iter()
            .filter(|kind| kind.as_str().split('-').next() == Some(name))
            .collect();
        match EventKind::parse(name) {
            Some(kind) => kinds.insert(kind),
            None if !group.is_empty() => group.into_iter().for_each(|kind| kinds.insert(kind)),
            None => {
                let names: Vec<&str> = EventKind::ALL.iter().map(|kind| kind.as_str()).collect();
                return Err(format!(
                    "unknown event kind {name:?}; expected all, process, tcp, udp, dns or one of {}",
                    names.join(", ")
                ));
            }
        }
    }
    Ok(kinds)
}

/// Prints one event for a terminal: a header line, then the process and the kind's details.
pub fn print_event_text(out: &mut impl Write, sequence: u64, node: &str, event: &RawEvent) -> io::Result<()> {
    let node = if node.is_empty() { String::new() } else { format!("  node {}", escape_controls(node)) };
    writeln!(out, "{}  EVENT     {}  #e{sequence}{node}", format_time(event.time), event.kind.as_str())?;
    if let Some(process) = &event.process {
        print_process_lines(out, "process", process)?;
    }
    if !event.placement.component.is_empty() {
        writeln!(out, "    {:<10} {}", "component", placement_text(&event.placement))?;
    }
    match &event.detail {
        EventDetail::Exec => {}
        EventDetail::Fork { child_pid } => writeln!(out, "    {:<10} {child_pid}", "child")?,
        EventDetail::Exit { exit_code } => match exit_code {
            Some(code) => writeln!(out, "    {:<10} {code}", "exit code")?,
            None => writeln!(out, "    {:<10} unknown", "exit code")?,
        },
        EventDetail::Socket(socket) => {
            let endpoints = if socket.remote.ip().is_unspecified() {
                socket.local.to_string()
            } else {
                format!("{} -> {}", socket.local, socket.remote)
            };
            writeln!(out, "    {:<10} {endpoints} ({}), netns {}", "endpoints", socket.protocol.as_str(), socket.netns)?;
            if socket.received {
                writeln!(out, "    {:<10} received from {}", "direction", socket.remote)?;
            } else if socket.is_reply {
                writeln!(out, "    {:<10} reply to {}", "direction", socket.remote)?;
            }
            if let Some(name) = &socket.remote_name {
                writeln!(out, "    {:<10} {}", "name", escape_controls(name))?;
            }
            if !socket.remote_placement.component.is_empty() {
                writeln!(out, "    {:<10} {}", "remote", placement_text(&socket.remote_placement))?;
            }
            if event.kind == EventKind::TcpClose {
                writeln!(out, "    {:<10} sent {}, received {}", "bytes", socket.bytes_sent, socket.bytes_received)?;
            }
            if socket.error != 0 {
                let error = io::Error::from_raw_os_error(socket.error);
                writeln!(out, "    {:<10} {error}", "error")?;
            }
        }
        EventDetail::DnsAnswer { name, addresses, server } => {
            let addresses: Vec<String> = addresses.iter().map(ToString::to_string).collect();
            writeln!(out, "    {:<10} {} -> {}", "answer", escape_controls(name), addresses.join(", "))?;
            writeln!(out, "    {:<10} {server}", "server")?;
        }
    }
    writeln!(out)
}

/// Prints a gap in the event stream for a terminal.
pub fn event_loss_text(notice: &pb::LossNotice) -> String {
    let cause = match pb::LossReason::try_from(notice.reason) {
        Ok(pb::LossReason::SubscriberLagged) => "this client read too slowly and the agent dropped them",
        Ok(pb::LossReason::HistoryEvicted) => "the agent no longer retains them for resuming",
        _ => "the agent gave no known reason",
    };
    format!(
        "warning: missed {} event(s), event sequences {} to {}: {cause}",
        notice.missed, notice.first_sequence, notice.last_sequence
    )
}

fn placement_text(placement: &Placement) -> String {
    let component = escape_controls(&placement.component);
    match &placement.zone {
        Some(zone) => format!("{component} (zone {})", escape_controls(zone)),
        None => component.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_kinds_parse_names_and_groups() {
        let kinds = parse_event_kinds("process-exec,tcp").unwrap();
        let names: Vec<&str> = kinds.iter().map(EventKind::as_str).collect();
        assert_eq!(
            names,
            vec![
                "process-exec",
                "tcp-connect",
                "tcp-established",
                "tcp-connect-failed",
                "tcp-accept",
                "tcp-listen",
                "tcp-close"
            ]
        );
        assert_eq!(parse_event_kinds("all").unwrap(), EventKinds::all());
    }

    #[test]
    fn unknown_event_kind_is_named() {
        let error = parse_event_kinds("process-exec,tcp-open").unwrap_err();
        assert!(error.starts_with("unknown event kind \"tcp-open\"; expected all, process"), "{error}");
    }
}
