//! Reports of a `driftwatch check` run: what the command did, what the comparison with the model
//! found, and the verdict. One renderer per format: text for people, JSON, SARIF 2.1.0 and JUnit
//! XML for CI systems.

mod json;
mod junit;
mod location;
mod sarif;
mod text;

use std::collections::BTreeMap;
use std::fmt;

use driftwatch_model::deviation::{Deviation, Severity};

pub use location::{ModelLocations, Region};

/// Output formats of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Text,
    Json,
    Sarif,
    Junit,
}

/// The end of the observed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandOutcome {
    /// It exited with this status code.
    Exited(i32),
    /// A signal ended it.
    Signaled(i32),
    /// It could not be started, for the reason in the message.
    NotStarted(String),
}

impl CommandOutcome {
    pub fn succeeded(&self) -> bool {
        matches!(self, CommandOutcome::Exited(0))
    }
}

impl fmt::Display for CommandOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandOutcome::Exited(code) => write!(f, "exited with status {code}"),
            CommandOutcome::Signaled(signal) => write!(f, "was killed by signal {signal}"),
            CommandOutcome::NotStarted(reason) => write!(f, "could not be started: {reason}"),
        }
    }
}

/// The conclusion of a run. A failed command wins over findings, because a run that broke off
/// early observed only part of what the command would have done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Findings,
    CommandFailed,
}

/// Everything a renderer needs about one `driftwatch check` run.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// Path of the model file as given on the command line.
    pub model_path: String,
    /// The observed command and its arguments.
    pub command: Vec<String>,
    pub outcome: CommandOutcome,
    /// Deviations found, most severe first (see [`CheckReport::new`]).
    pub deviations: Vec<Deviation>,
    /// Deviations at or above this severity fail the run.
    pub fail_on: Severity,
    /// Places in the model file of components and flows, for SARIF locations.
    pub locations: ModelLocations,
}

impl CheckReport {
    /// Builds a report and sorts the deviations most severe first, then by id.
    pub fn new(
        model_path: String,
        command: Vec<String>,
        outcome: CommandOutcome,
        mut deviations: Vec<Deviation>,
        fail_on: Severity,
        locations: ModelLocations,
    ) -> CheckReport {
        deviations.sort_by(|a, b| b.severity.cmp(&a.severity).then_with(|| a.id.cmp(&b.id)));
        CheckReport { model_path, command, outcome, deviations, fail_on, locations }
    }

    /// Counts the deviations at or above `--fail-on`.
    pub fn failing_count(&self) -> usize {
        self.deviations.iter().filter(|deviation| self.fails(deviation)).count()
    }

    /// True when this deviation alone fails the run.
    pub fn fails(&self, deviation: &Deviation) -> bool {
        deviation.severity >= self.fail_on
    }

    pub fn verdict(&self) -> Verdict {
        if !self.outcome.succeeded() {
            Verdict::CommandFailed
        } else if self.failing_count() > 0 {
            Verdict::Findings
        } else {
            Verdict::Pass
        }
    }

    /// Counts deviations per severity, most severe first, leaving out severities with none.
    pub fn severity_counts(&self) -> Vec<(Severity, usize)> {
        let mut counts: BTreeMap<std::cmp::Reverse<Severity>, usize> = BTreeMap::new();
        for deviation in &self.deviations {
            *counts.entry(std::cmp::Reverse(deviation.severity)).or_default() += 1;
        }
        counts.into_iter().map(|(severity, count)| (severity.0, count)).collect()
    }

    /// Returns the one-line summary that ends the text report, such as
    /// `driftwatch check: 2 deviations (1 high, 1 medium) — failing at --fail-on high`.
    pub fn summary_line(&self) -> String {
        let total = self.deviations.len();
        let found = if total == 0 {
            "no deviations".to_string()
        } else {
            let counts: Vec<String> =
                self.severity_counts().iter().map(|(severity, count)| format!("{count} {}", severity.as_str())).collect();
            let noun = if total == 1 { "deviation" } else { "deviations" };
            format!("{total} {noun} ({})", counts.join(", "))
        };
        let verdict = match self.verdict() {
            Verdict::Pass => format!("passing at --fail-on {}", self.fail_on.as_str()),
            Verdict::Findings => format!("failing at --fail-on {}", self.fail_on.as_str()),
            Verdict::CommandFailed => format!("failing because the command {}", self.outcome),
        };
        format!("driftwatch check: {found} — {verdict}")
    }

    /// Renders the report in `format`; `colour` applies to text only.
    pub fn render(&self, format: ReportFormat, colour: bool) -> String {
        match format {
            ReportFormat::Text => text::render(self, colour),
            ReportFormat::Json => json::render(self),
            ReportFormat::Sarif => sarif::render(self),
            ReportFormat::Junit => junit::render(self),
        }
    }
}

#[cfg(test)]
mod tests;
