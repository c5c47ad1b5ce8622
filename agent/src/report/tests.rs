use std::time::{Duration, UNIX_EPOCH};

use driftwatch_model::deviation::{Category, Deviation, Evidence, Severity, Stride};
use driftwatch_model::Model;

use super::*;

const MODEL: &str = r#"version: 1
zones:
  - { id: ci, trust: 50 }
  - { id: local, trust: 80, match: { cidrs: ["127.0.0.0/8"] } }
components:
  - id: app
    zone: ci
    match: { exe: ["/usr/bin/app"] }
flows:
  - { from: app, to: local, port: 80 }
"#;

fn deviation(category: Category, severity: Severity, source: &str, destination: &str, port: Option<u16>) -> Deviation {
    let time = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    Deviation {
        id: format!("{}@{source}@{destination}@tcp/{}", category.as_str(), port.unwrap_or(0)),
        category,
        severity,
        stride: Stride::InformationDisclosure,
        summary: format!("{source} did something to {destination}"),
        source: source.to_string(),
        destination: destination.to_string(),
        protocol: None,
        port,
        evidence: Evidence {
            process: None,
            peer_process: None,
            local_addr: None,
            remote_addr: None,
            source_zone: None,
            destination_zone: None,
            netns: 0,
            remote_name: None,
        },
        first_seen: time,
        last_seen: time,
        count: 1,
        resolution: "flows:\n  - { from: app, to: local, port: 9 }\n".to_string(),
    }
}

fn report(outcome: CommandOutcome, deviations: Vec<Deviation>, fail_on: Severity) -> CheckReport {
    let model = Model::parse(MODEL, "model.yaml").unwrap();
    let locations = ModelLocations::new(&model, MODEL);
    CheckReport::new("model.yaml".into(), vec!["app".into(), "--run".into()], outcome, deviations, fail_on, locations)
}

fn two_findings() -> Vec<Deviation> {
    vec![
        deviation(Category::UnexpectedExecutable, Severity::Medium, "app", "/bin/sh", None),
        deviation(Category::UnexpectedFlow, Severity::High, "app", "local", Some(9)),
    ]
}

#[test]
fn summary_counts_severities_and_threshold() {
    let report = report(CommandOutcome::Exited(0), two_findings(), Severity::High);
    assert_eq!(report.summary_line(), "driftwatch check: 2 deviations (1 high, 1 medium) — failing at --fail-on high");
    assert_eq!(report.verdict(), Verdict::Findings);
}

#[test]
fn findings_below_threshold_pass() {
    let report = report(CommandOutcome::Exited(0), two_findings(), Severity::Critical);
    assert_eq!(report.verdict(), Verdict::Pass);
    assert_eq!(report.failing_count(), 0);
    assert!(report.summary_line().ends_with("passing at --fail-on critical"));
}

#[test]
fn failed_command_wins_over_findings() {
    let report = report(CommandOutcome::Exited(3), two_findings(), Severity::Low);
    assert_eq!(report.verdict(), Verdict::CommandFailed);
    assert!(report.summary_line().contains("failing because the command exited with status 3"), "{}", report.summary_line());
}

#[test]
fn clean_run_reports_no_deviations() {
    let report = report(CommandOutcome::Exited(0), Vec::new(), Severity::High);
    assert_eq!(report.verdict(), Verdict::Pass);
    assert_eq!(report.summary_line(), "driftwatch check: no deviations — passing at --fail-on high");
    let text = report.render(ReportFormat::Text, false);
    assert!(text.trim_end().ends_with(&report.summary_line()), "{text}");
}

#[test]
fn text_report_lists_most_severe_category_first() {
    let text = report(CommandOutcome::Exited(0), two_findings(), Severity::High).render(ReportFormat::Text, false);
    let flow = text.find("\nunexpected-flow\n").expect("a flow section");
    let executable = text.find("\nunexpected-executable\n").expect("an executable section");
    assert!(flow < executable, "{text}");
    assert!(text.contains("        - { from: app, to: local, port: 9 }"), "resolution YAML indented under the finding:\n{text}");
    assert!(!text.contains('\x1b'), "no colour when not asked:\n{text}");
}

#[test]
fn text_report_colours_only_on_request() {
    let text = report(CommandOutcome::Exited(0), two_findings(), Severity::High).render(ReportFormat::Text, true);
    assert!(text.contains("\x1b[1;31mHIGH"), "{text}");
}

#[test]
fn sarif_locates_component_and_flow_lines() {
    let deviations = vec![
        deviation(Category::UnexpectedExecutable, Severity::Medium, "app", "/bin/sh", None),
        deviation(Category::ControlFailed, Severity::High, "app", "local", Some(80)),
        deviation(Category::UnknownComponent, Severity::Low, "unknown:/bin/x", "external:1.2.3.4", Some(1)),
    ];
    let sarif: serde_json::Value =
        serde_json::from_str(&report(CommandOutcome::Exited(0), deviations, Severity::High).render(ReportFormat::Sarif, false)).unwrap();
    let run = &sarif["runs"][0];
    assert_eq!(sarif["version"], "2.1.0");
    assert_eq!(run["tool"]["driver"]["rules"].as_array().unwrap().len(), Category::ALL.len());
    let results = run["results"].as_array().unwrap();
    let region = |index: usize| results[index]["locations"][0]["physicalLocation"]["region"].clone();

    // Sorted most severe first: the flow (line 10), the component (line 6, `id` at column 5), then none.
    assert_eq!(results[0]["ruleId"], "control-failed");
    assert_eq!(results[0]["level"], "error");
    assert_eq!(region(0), serde_json::json!({ "startLine": 10, "startColumn": 5 }));
    assert_eq!(results[1]["level"], "warning");
    assert_eq!(region(1), serde_json::json!({ "startLine": 6, "startColumn": 5 }));
    assert_eq!(results[2]["level"], "note");
    assert!(region(2).is_null());
    let rule_index = results[0]["ruleIndex"].as_u64().unwrap() as usize;
    assert_eq!(run["tool"]["driver"]["rules"][rule_index]["id"], "control-failed");
}

#[test]
fn junit_fails_only_at_threshold() {
    let xml = report(CommandOutcome::Exited(0), two_findings(), Severity::High).render(ReportFormat::Junit, false);
    assert_eq!(xml.matches("<testcase ").count(), 3, "{xml}");
    assert_eq!(xml.matches("<failure ").count(), 1, "{xml}");
    assert!(xml.contains("failures=\"1\""), "{xml}");
}

#[test]
fn junit_marks_failed_command() {
    let xml = report(CommandOutcome::Signaled(9), Vec::new(), Severity::High).render(ReportFormat::Junit, false);
    assert!(xml.contains("<failure type=\"signal\""), "{xml}");
}

#[test]
fn json_report_carries_verdict_and_deviations() {
    let json: serde_json::Value =
        serde_json::from_str(&report(CommandOutcome::Exited(0), two_findings(), Severity::High).render(ReportFormat::Json, false)).unwrap();
    assert_eq!(json["verdict"], "findings");
    assert_eq!(json["failing"], 1);
    assert_eq!(json["deviations"][0]["severity"], "high");
    assert_eq!(json["deviations"][0]["fails"], true);
    assert_eq!(json["deviations"][1]["fails"], false);
    assert_eq!(json["command_status"]["exited"], 0);
}
