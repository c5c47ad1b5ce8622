//! The SARIF 2.1.0 report: one rule per deviation category, one result per deviation, located at
//! the component or flow of the model file that the deviation concerns.

use driftwatch_model::deviation::{Category, Deviation, Severity};
use serde_json::{json, Value};

use super::{CheckReport, CommandOutcome};

/// The published location of the SARIF 2.1.0 schema (OASIS, errata 01).
const SCHEMA: &str = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json";

pub(super) fn render(report: &CheckReport) -> String {
    let rules: Vec<Value> = Category::ALL.iter().map(|&category| rule(category)).collect();
    let artifact_uri = path_to_uri(&report.model_path);
    let results: Vec<Value> = report.deviations.iter().map(|deviation| result(report, deviation, &artifact_uri)).collect();
    let command_status = match &report.outcome {
        CommandOutcome::Exited(code) => json!({ "exited": code }),
        CommandOutcome::Signaled(signal) => json!({ "signal": signal }),
        CommandOutcome::NotStarted(reason) => json!({ "notStarted": reason }),
    };
    let document = json!({
        "$schema": SCHEMA,
        "version": "2.1.0",
        "runs": [{
            "tool": {
                "driver": {
                    "name": "driftwatch",
                    "version": env!("CARGO_PKG_VERSION"),
                    "rules": rules,
                }
            },
            "artifacts": [{ "location": { "uri": artifact_uri } }],
            "invocations": [{
                // True because driftwatch itself ran to the end; the command's status is below.
                "executionSuccessful": true,
                "commandLine": report.command.join(" "),
                "properties": {
                    "commandStatus": command_status,
                    "failOn": report.fail_on.as_str(),
                    "summary": report.summary_line(),
                }
            }],
            "results": results,
        }]
    });
    let mut text = serde_json::to_string_pretty(&document).expect("a JSON value always serialises");
    text.push('\n');
    text
}

fn rule(category: Category) -> Value {
    json!({
        "id": category.as_str(),
        "name": rule_name(category),
        "shortDescription": { "text": description(category) },
        "properties": {
            "tags": ["security", "threat-model", stride_tag(category)],
        }
    })
}

fn result(report: &CheckReport, deviation: &Deviation, artifact_uri: &str) -> Value {
    let rule_index = Category::ALL.iter().position(|&category| category == deviation.category).unwrap_or(0);
    let mut physical = json!({ "artifactLocation": { "uri": artifact_uri, "index": 0 } });
    if let Some(region) = report.locations.for_deviation(deviation) {
        physical["region"] = json!({ "startLine": region.line, "startColumn": region.column });
    }
    let message = if deviation.resolution.trim().is_empty() {
        deviation.summary.clone()
    } else {
        format!("{}\nDeclare it in the model if it is intended:\n{}", deviation.summary, deviation.resolution.trim_end())
    };
    json!({
        "ruleId": deviation.category.as_str(),
        "ruleIndex": rule_index,
        "level": level(deviation.severity),
        "message": { "text": message },
        "locations": [{ "physicalLocation": physical }],
        "partialFingerprints": { "deviationId/v1": deviation.id },
        "properties": {
            "deviationId": deviation.id,
            "severity": deviation.severity.as_str(),
            "failsRun": report.fails(deviation),
            "count": deviation.count,
            "source": deviation.source,
            "destination": deviation.destination,
            "evidence": serde_json::to_value(&deviation.evidence).expect("evidence always serialises"),
            "resolution": deviation.resolution,
        }
    })
}

/// Maps the five severities onto SARIF's three result levels.
fn level(severity: Severity) -> &'static str {
    match severity {
        Severity::Critical | Severity::High => "error",
        Severity::Elevated | Severity::Medium => "warning",
        Severity::Low => "note",
    }
}

fn rule_name(category: Category) -> String {
    category
        .as_str()
        .split('-')
        .map(|word| {
            let mut chars = word.chars();
            chars.next().map(|first| first.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
        })
        .collect()
}

fn description(category: Category) -> &'static str {
    match category {
        Category::UnexpectedFlow => "An observed flow matches no declared flow.",
        Category::TrustBoundaryCrossing => "An undeclared flow crosses from one trust zone into another.",
        Category::UnexpectedExecutable => "A program runs in a component that does not list it.",
        Category::NewListener => "A component listens on a port it does not declare.",
        Category::UnknownComponent => "A process that matches no component used the network.",
        Category::UnattributedEndpoint => "A remote endpoint matches no component or zone.",
        Category::NewAttackPath => "Observed edges open a path from an exposed component to a critical one.",
        Category::DeclaredFlowUnused => "A declared flow was not seen.",
        Category::ControlFailed => "A flow the model declares as denied was attempted and connected.",
        Category::TelemetryGap => "Kernel events were lost, so findings of this run may be incomplete.",
    }
}

fn stride_tag(category: Category) -> &'static str {
    use driftwatch_model::deviation::Stride;
    match category.stride() {
        Stride::Spoofing => "stride:spoofing",
        Stride::Tampering => "stride:tampering",
        Stride::Repudiation => "stride:repudiation",
        Stride::InformationDisclosure => "stride:information-disclosure",
        Stride::DenialOfService => "stride:denial-of-service",
        Stride::ElevationOfPrivilege => "stride:elevation-of-privilege",
    }
}

/// Turns a file path into a URI reference: relative paths stay relative (SARIF viewers resolve
/// them against the repository root), absolute ones become `file://` URIs.
fn path_to_uri(path: &str) -> String {
    let mut encoded = String::with_capacity(path.len());
    for byte in path.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    if path.starts_with('/') {
        format!("file://{encoded}")
    } else {
        encoded.trim_start_matches("./").to_string()
    }
}
