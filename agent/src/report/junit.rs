//! The JUnit XML report, for CI systems that show test results: one test case for the command and
//! one per deviation. Deviations at or above `--fail-on` are failures; the others pass with their
//! details in `system-out`, so they stay visible without failing the build.

use std::fmt::Write as _;

use driftwatch_model::deviation::Deviation;

use super::{CheckReport, CommandOutcome};

pub(super) fn render(report: &CheckReport) -> String {
    let tests = report.deviations.len() + 1;
    let command_failed = !report.outcome.succeeded();
    let failures = report.failing_count() + usize::from(command_failed);
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(out, "<testsuites name=\"driftwatch check\" tests=\"{tests}\" failures=\"{failures}\">");
    let _ = writeln!(
        out,
        "  <testsuite name=\"driftwatch check {}\" tests=\"{tests}\" failures=\"{failures}\" errors=\"0\" skipped=\"0\">",
        escape(&report.model_path)
    );

    let command = escape(&report.command.join(" "));
    let _ = writeln!(out, "    <testcase classname=\"driftwatch.command\" name=\"{command}\">");
    if command_failed {
        let kind = match report.outcome {
            CommandOutcome::Exited(_) => "exit-status",
            CommandOutcome::Signaled(_) => "signal",
            CommandOutcome::NotStarted(_) => "not-started",
        };
        let message = escape(&format!("the command {}", report.outcome));
        let _ = writeln!(out, "      <failure type=\"{kind}\" message=\"{message}\">{message}</failure>");
    }
    let _ = writeln!(out, "    </testcase>");

    for deviation in &report.deviations {
        write_deviation(&mut out, report, deviation);
    }
    let _ = writeln!(out, "    <system-out>{}</system-out>", escape(&report.summary_line()));
    out.push_str("  </testsuite>\n</testsuites>\n");
    out
}

fn write_deviation(out: &mut String, report: &CheckReport, deviation: &Deviation) {
    let _ = writeln!(
        out,
        "    <testcase classname=\"driftwatch.{}\" name=\"{}\">",
        escape(deviation.category.as_str()),
        escape(&deviation.id)
    );
    let details = format!(
        "{}\nseverity: {}\nseen: {} times\n\nDeclare it in the model if it is intended:\n{}",
        deviation.summary,
        deviation.severity.as_str(),
        deviation.count,
        deviation.resolution.trim_end()
    );
    if report.fails(deviation) {
        let _ = writeln!(
            out,
            "      <failure type=\"{}\" message=\"{}\">{}</failure>",
            deviation.severity.as_str(),
            escape(&deviation.summary),
            escape(&details)
        );
    } else {
        let _ = writeln!(out, "      <system-out>{}</system-out>", escape(&details));
    }
    let _ = writeln!(out, "    </testcase>");
}

/// Escapes text for XML attributes and content, dropping the control characters XML 1.0 forbids.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&apos;"),
            '\n' | '\t' | '\r' => escaped.push(c),
            c if (c as u32) < 0x20 => {}
            c => escaped.push(c),
        }
    }
    escaped
}
