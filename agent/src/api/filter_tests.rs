use std::time::SystemTime;

use driftwatch_model::deviation::{Evidence, Stride};
use driftwatch_model::observation::ProcessInfo;

use super::*;

fn process(exe: &str) -> ProcessInfo {
    ProcessInfo {
        pid: 10,
        ppid: 1,
        exe: exe.into(),
        argv: vec![exe.into()],
        argv_truncated: false,
        uid: 0,
        gid: 0,
        user: None,
        cgroup: String::new(),
        comm: String::new(),
        ancestry: Vec::new(),
        container: None,
        exec: Default::default(),
    }
}

/// A deviation from `source` in `source_zone` to `destination` in `destination_zone`, raised for
/// a process running `exe`.
fn deviation(
    category: Category,
    severity: Severity,
    (source, source_zone): (&str, &str),
    (destination, destination_zone): (&str, &str),
    exe: &str,
) -> Deviation {
    Deviation {
        id: format!("{}@{source}@{destination}@tcp/80", category.as_str()),
        category,
        severity,
        stride: Stride::Tampering,
        summary: String::new(),
        source: source.into(),
        destination: destination.into(),
        protocol: None,
        port: None,
        evidence: Evidence {
            process: Some(process(exe)),
            peer_process: None,
            local_addr: None,
            remote_addr: None,
            source_zone: Some(source_zone.into()),
            destination_zone: Some(destination_zone.into()),
            netns: 0,
            remote_name: None,
        },
        first_seen: SystemTime::UNIX_EPOCH,
        last_seen: SystemTime::UNIX_EPOCH,
        count: 1,
        resolution: String::new(),
    }
}

fn web_to_db() -> Deviation {
    deviation(
        Category::UnexpectedFlow,
        Severity::High,
        ("web", "dmz"),
        ("db", "core"),
        "/usr/bin/bash",
    )
}

fn glob(pattern: &str) -> ExecutableGlob {
    ExecutableGlob::new(pattern).unwrap()
}

#[test]
fn empty_filter_matches_everything() {
    assert!(DeviationFilter::default().matches("a", &web_to_db()));
    assert!(FilterSet::all().matches("a", &web_to_db()));
}

#[test]
fn conditions_in_one_filter_combine_with_and() {
    let filter = DeviationFilter {
        categories: vec![Category::UnexpectedFlow],
        min_severity: Some(Severity::High),
        components: vec!["db".into()],
        zones: vec!["dmz".into()],
        executables: vec![glob("/usr/bin/*")],
        nodes: vec!["a".into()],
        event_kinds: Vec::new(),
    };
    assert!(filter.matches("a", &web_to_db()));
    assert!(!filter.matches("b", &web_to_db()), "node differs");

    let mut low = web_to_db();
    low.severity = Severity::Elevated;
    assert!(!filter.matches("a", &low), "severity below the minimum");

    let mut listener = web_to_db();
    listener.category = Category::NewListener;
    assert!(!filter.matches("a", &listener), "category differs");
}

#[test]
fn values_of_one_condition_combine_with_or() {
    let filter = DeviationFilter {
        components: vec!["api".into(), "web".into()],
        zones: vec!["internet".into(), "core".into()],
        ..DeviationFilter::default()
    };
    assert!(filter.matches("a", &web_to_db()));

    let other = deviation(
        Category::UnexpectedFlow,
        Severity::High,
        ("cache", "core"),
        ("db", "core"),
        "/usr/bin/redis",
    );
    assert!(!filter.matches("a", &other), "neither end is api or web");
}

#[test]
fn component_matches_source_or_destination() {
    for component in ["web", "db"] {
        let filter = DeviationFilter {
            components: vec![component.into()],
            ..DeviationFilter::default()
        };
        assert!(filter.matches("a", &web_to_db()), "{component}");
    }
}

#[test]
fn executable_glob_keeps_star_within_a_segment() {
    let star = DeviationFilter {
        executables: vec![glob("/usr/*")],
        ..DeviationFilter::default()
    };
    assert!(!star.matches("a", &web_to_db()));
    let double = DeviationFilter {
        executables: vec![glob("/usr/**")],
        ..DeviationFilter::default()
    };
    assert!(double.matches("a", &web_to_db()));
}

#[test]
fn executable_glob_checks_the_peer_process_too() {
    let mut deviation = web_to_db();
    deviation.evidence.process = None;
    deviation.evidence.peer_process = Some(process("/usr/sbin/nginx"));
    let filter = DeviationFilter {
        executables: vec![glob("**/nginx")],
        ..DeviationFilter::default()
    };
    assert!(filter.matches("a", &deviation));
}

#[test]
fn executable_filter_rejects_deviation_without_process() {
    let mut deviation = web_to_db();
    deviation.evidence.process = None;
    let filter = DeviationFilter {
        executables: vec![glob("**")],
        ..DeviationFilter::default()
    };
    assert!(!filter.matches("a", &deviation));
}

#[test]
fn zone_filter_rejects_deviation_without_zones() {
    let mut deviation = web_to_db();
    deviation.evidence.source_zone = None;
    deviation.evidence.destination_zone = None;
    let filter = DeviationFilter {
        zones: vec!["dmz".into()],
        ..DeviationFilter::default()
    };
    assert!(!filter.matches("a", &deviation));
}

#[test]
fn allow_filters_combine_with_or() {
    let set = FilterSet {
        allow: vec![
            DeviationFilter {
                categories: vec![Category::NewListener],
                ..DeviationFilter::default()
            },
            DeviationFilter {
                nodes: vec!["a".into()],
                ..DeviationFilter::default()
            },
        ],
        ..FilterSet::default()
    };
    assert!(set.matches("a", &web_to_db()), "second filter matches");
    assert!(!set.matches("b", &web_to_db()), "neither filter matches");
    let mut listener = web_to_db();
    listener.category = Category::NewListener;
    assert!(set.matches("b", &listener), "first filter matches");
}

#[test]
fn deny_wins_over_allow() {
    let set = FilterSet {
        allow: vec![DeviationFilter {
            components: vec!["web".into()],
            ..DeviationFilter::default()
        }],
        deny: vec![
            DeviationFilter {
                nodes: vec!["z".into()],
                ..DeviationFilter::default()
            },
            DeviationFilter {
                min_severity: Some(Severity::Critical),
                ..DeviationFilter::default()
            },
        ],
        required: None,
    };
    assert!(set.matches("a", &web_to_db()));
    assert!(!set.matches("z", &web_to_db()), "first deny filter matches");
    let mut critical = web_to_db();
    critical.severity = Severity::Critical;
    assert!(!set.matches("a", &critical), "second deny filter matches");
}

#[test]
fn deny_only_set_allows_the_rest() {
    let set = FilterSet {
        deny: vec![DeviationFilter {
            categories: vec![Category::UnexpectedFlow],
            ..DeviationFilter::default()
        }],
        ..FilterSet::default()
    };
    assert!(!set.matches("a", &web_to_db()));
    let mut listener = web_to_db();
    listener.category = Category::NewListener;
    assert!(set.matches("a", &listener));
}

#[test]
fn required_filter_applies_on_top_of_the_lists() {
    let set = FilterSet {
        allow: vec![DeviationFilter::default()],
        deny: Vec::new(),
        required: Some(DeviationFilter {
            min_severity: Some(Severity::Critical),
            ..DeviationFilter::default()
        }),
    };
    assert!(!set.matches("a", &web_to_db()));
}

#[test]
fn malformed_glob_is_an_error() {
    assert!(ExecutableGlob::new("/usr/[bin").is_err());
}

#[test]
fn event_only_filters_leave_deviations_alone() {
    let events_only = DeviationFilter {
        event_kinds: vec![crate::events::EventKind::ProcessExec],
        ..DeviationFilter::default()
    };
    assert!(!events_only.matches("a", &web_to_db()), "an event filter never matches a deviation");
    let set = FilterSet {
        allow: vec![events_only.clone()],
        deny: vec![events_only],
        required: None,
    };
    assert!(set.matches("a", &web_to_db()), "event filters neither allow nor deny deviations");
}
