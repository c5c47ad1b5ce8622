//! The JSON report: the run, the verdict and every deviation with the model crate's own field
//! names, so a script reads the same deviation shape as in a recorded stream.

use serde_json::{json, Value};

use super::{CheckReport, CommandOutcome, Verdict};

pub(super) fn render(report: &CheckReport) -> String {
    let command_status = match &report.outcome {
        CommandOutcome::Exited(code) => json!({ "exited": code }),
        CommandOutcome::Signaled(signal) => json!({ "signal": signal }),
        CommandOutcome::NotStarted(reason) => json!({ "not_started": reason }),
    };
    let verdict = match report.verdict() {
        Verdict::Pass => "pass",
        Verdict::Findings => "findings",
        Verdict::CommandFailed => "command-failed",
    };
    let counts: serde_json::Map<String, Value> = report
        .severity_counts()
        .into_iter()
        .map(|(severity, count)| (severity.as_str().to_string(), json!(count)))
        .collect();
    let deviations: Vec<Value> = report
        .deviations
        .iter()
        .map(|deviation| {
            let mut value = serde_json::to_value(deviation).expect("a deviation always serialises");
            value["fails"] = json!(report.fails(deviation));
            value
        })
        .collect();
    let document = json!({
        "model": report.model_path,
        "command": report.command,
        "command_status": command_status,
        "fail_on": report.fail_on.as_str(),
        "verdict": verdict,
        "failing": report.failing_count(),
        "severity_counts": counts,
        "summary": report.summary_line(),
        "deviations": deviations,
    });
    let mut text = serde_json::to_string_pretty(&document).expect("a JSON value always serialises");
    text.push('\n');
    text
}
