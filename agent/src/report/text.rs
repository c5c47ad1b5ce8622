//! The text report: deviations grouped by category, then by component, most severe first. Each
//! comes with its evidence and the YAML that would declare it, and the one-line summary is last.

use std::fmt::Write as _;
use driftwatch_model::deviation::{Deviation, Severity};
use driftwatch_model::observation::ProcessInfo;

use crate::terminal::escape_controls;
use super::CheckReport;

const RESET: &str = "\x1b[0m";
const BOLD: &str = "\x1b[1m";
const DIM: &str = "\x1b[2m";

/// Renders the report; `colour` adds ANSI colours, for a terminal.
pub(super) fn render(report: &CheckReport, colour: bool) -> String {
    let paint = Paint { colour };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} {} under the model {}",
        paint.bold("driftwatch check:"),
        shell_words(&report.command),
        report.model_path
    );
    let _ = writeln!(out, "the command {}", report.outcome);

    for (category, components) in group(&report.deviations) {
        let _ = writeln!(out);
        let _ = writeln!(out, "{}", paint.bold(category));
        for (component, deviations) in components {
            let _ = writeln!(out, "  {component}");
            for deviation in deviations {
                write_deviation(&mut out, report, deviation, &paint);
            }
        }
    }

    let _ = writeln!(out);
    let _ = writeln!(out, "{}", paint.bold(&report.summary_line()));
    out
}

/// Groups deviations by category and then by source component. The input is sorted most severe
/// first, so keeping the order of first appearance puts the most severe group first at each level.
fn group(deviations: &[Deviation]) -> Vec<(&str, Vec<(&str, Vec<&Deviation>)>)> {
    let mut groups: Vec<(&str, Vec<(&str, Vec<&Deviation>)>)> = Vec::new();
    for deviation in deviations {
        let category = deviation.category.as_str();
        let index = match groups.iter().position(|(name, _)| *name == category) {
            Some(index) => index,
            None => {
                groups.push((category, Vec::new()));
                groups.len() - 1
            }
        };
        let components = &mut groups[index].1;
        match components.iter_mut().find(|(name, _)| *name == deviation.source) {
            Some((_, list)) => list.push(deviation),
            None => components.push((deviation.source.as_str(), vec![deviation])),
        }
    }
    groups
}

fn write_deviation(out: &mut String, report: &CheckReport, deviation: &Deviation, paint: &Paint) {
    let marker = if report.fails(deviation) { "FAIL" } else { "note" };
    let times = if deviation.count == 1 { "1 time".to_string() } else { format!("{} times", deviation.count) };
    let _ = writeln!(
        out,
        "    {} {} {} (seen {times})",
        paint.severity(deviation.severity),
        paint.dim(marker),
        deviation.id,
    );
    let _ = writeln!(out, "      {}", escape_controls(&deviation.summary));
    let evidence = &deviation.evidence;
    if let Some(process) = &evidence.process {
        let _ = writeln!(out, "      process: {}", describe_process(process));
    }
    if let Some(peer) = &evidence.peer_process {
        let _ = writeln!(out, "      peer: {}", describe_process(peer));
    }
    match (evidence.local_addr, evidence.remote_addr) {
        (Some(local), Some(remote)) => {
            let _ = writeln!(out, "      connection: {local} -> {remote}{}", zones(deviation));
        }
        (Some(local), None) => {
            let _ = writeln!(out, "      address: {local}");
        }
        _ => {}
    }
    let _ = writeln!(out, "      first seen: {}", humantime::format_rfc3339_seconds(deviation.first_seen));
    if !deviation.resolution.trim().is_empty() {
        let _ = writeln!(out, "      {}", paint.dim("declare it in the model if it is intended:"));
        for line in deviation.resolution.trim_end().lines() {
            let _ = writeln!(out, "        {line}");
        }
    }
}

fn zones(deviation: &Deviation) -> String {
    match (&deviation.evidence.source_zone, &deviation.evidence.destination_zone) {
        (Some(from), Some(to)) => format!(" (zone {from} -> zone {to})"),
        (Some(from), None) => format!(" (from zone {from})"),
        (None, Some(to)) => format!(" (to zone {to})"),
        (None, None) => String::new(),
    }
}

fn describe_process(process: &ProcessInfo) -> String {
    let user = process.user.clone().unwrap_or_else(|| format!("uid {}", process.uid));
    let mut text = format!(
        "pid {} {} [{}] user {user}",
        process.pid,
        escape_controls(&process.exe),
        escape_controls(&shell_words(&process.argv))
    );
    if process.argv_truncated {
        text.push_str(" (argv truncated)");
    }
    if !process.cgroup.is_empty() {
        let _ = write!(text, " cgroup {}", process.cgroup);
    }
    if !process.ancestry.is_empty() {
        let chain: Vec<String> = process.ancestry.iter().map(|(pid, exe)| format!("{exe} ({pid})")).collect();
        let _ = write!(text, ", started by {}", chain.join(" <- "));
    }
    text
}

/// Joins arguments with spaces, quoting those a shell would split.
fn shell_words(words: &[String]) -> String {
    let quoted: Vec<String> = words
        .iter()
        .map(|word| {
            if !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:@,+%".contains(c)) {
                word.clone()
            } else {
                format!("'{}'", word.replace('\'', r"'\''"))
            }
        })
        .collect();
    quoted.join(" ")
}

struct Paint {
    colour: bool,
}

impl Paint {
    fn wrap(&self, code: &str, text: &str) -> String {
        if self.colour {
            format!("{code}{text}{RESET}")
        } else {
            text.to_string()
        }
    }

    fn bold(&self, text: &str) -> String {
        self.wrap(BOLD, text)
    }

    fn dim(&self, text: &str) -> String {
        self.wrap(DIM, text)
    }

    /// Pads the severity to the longest name so ids line up.
    fn severity(&self, severity: Severity) -> String {
        let label = format!("{:<8}", severity.as_str().to_uppercase());
        let code = match severity {
            Severity::Critical => "\x1b[1;35m",
            Severity::High => "\x1b[1;31m",
            Severity::Elevated => "\x1b[33m",
            Severity::Medium => "\x1b[36m",
            Severity::Low => "\x1b[2m",
        };
        self.wrap(code, &label)
    }
}
