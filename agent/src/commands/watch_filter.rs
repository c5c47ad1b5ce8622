//! The `--allow` and `--deny` filter specs of `driftwatch watch`.
//!
//! A spec is comma-separated `key=value` conditions, all of which must hold; a key given more than
//! once accepts any of its values. Keys: `category`, `min-severity`, `component`, `zone`, `exe`
//! (a glob on the executable of the process or its peer), `node` and `event` (an event kind, which
//! makes the filter concern raw events only). Example:
//! `category=unexpected-flow,category=new-listener,min-severity=high,exe=/usr/bin/*`.

use driftwatch_model::deviation::{Category, Severity};
use driftwatch_proto::v1 as pb;

use crate::api::convert::{category_to_proto, severity_to_proto};
use crate::api::convert_events::{event_kind_from_proto, event_kind_to_proto};
use crate::api::filter::ExecutableGlob;
use crate::events::EventKind;

/// Parses one spec into the filter message the API takes.
///
/// # Errors
///
/// A message naming the condition that is malformed, an unknown key or value, or a malformed glob.
pub fn parse_filter_spec(spec: &str) -> Result<pb::DeviationFilter, String> {
    let mut filter = pb::DeviationFilter::default();
    if spec.trim().is_empty() {
        return Err("empty filter; give conditions such as category=unexpected-flow,min-severity=high".into());
    }
    for condition in spec.split(',') {
        let Some((key, value)) = condition.split_once('=') else {
            return Err(format!("condition {condition:?} is not key=value"));
        };
        let (key, value) = (key.trim(), value.trim());
        if value.is_empty() {
            return Err(format!("condition {condition:?} has no value"));
        }
        match key {
            "category" => {
                let category = Category::parse(value).ok_or_else(|| {
                    let names: Vec<&str> = Category::ALL.iter().map(|c| c.as_str()).collect();
                    format!("unknown category {value:?}; expected one of {}", names.join(", "))
                })?;
                filter.categories.push(category_to_proto(category) as i32);
            }
            "min-severity" => {
                if filter.min_severity != 0 {
                    return Err("min-severity is given twice".into());
                }
                let severity = Severity::parse(value).ok_or_else(|| {
                    let names: Vec<&str> = Severity::ALL.iter().map(|s| s.as_str()).collect();
                    format!("unknown severity {value:?}; expected one of {}", names.join(", "))
                })?;
                filter.min_severity = severity_to_proto(severity) as i32;
            }
            "component" => filter.components.push(value.to_owned()),
            "zone" => filter.zones.push(value.to_owned()),
            "exe" => {
                ExecutableGlob::new(value).map_err(|err| format!("invalid exe glob {value:?}: {}", err.kind()))?;
                filter.executables.push(value.to_owned());
            }
            "node" => filter.nodes.push(value.to_owned()),
            "event" => {
                let kind = EventKind::parse(value).ok_or_else(|| {
                    let names: Vec<&str> = EventKind::ALL.iter().map(|kind| kind.as_str()).collect();
                    format!("unknown event kind {value:?}; expected one of {}", names.join(", "))
                })?;
                filter.event_kinds.push(event_kind_to_proto(kind) as i32);
            }
            other => {
                return Err(format!(
                    "unknown key {other:?}; expected category, min-severity, component, zone, exe, node or event"
                ))
            }
        }
    }
    Ok(filter)
}

/// Rejects `event=KIND` conditions in `--allow` or `--deny` when `--events` was not given. Such
/// a filter concerns raw events only, and without `--events` the stream carries none, so the
/// filter would silently match nothing.
///
/// # Errors
///
/// A message naming the flag and the event kind, and saying to add `--events`.
pub fn check_event_conditions(
    allow: &[pb::DeviationFilter],
    deny: &[pb::DeviationFilter],
    events_requested: bool,
) -> Result<(), String> {
    if events_requested {
        return Ok(());
    }
    for (flag, filters) in [("--allow", allow), ("--deny", deny)] {
        let Some(&kind) = filters.iter().flat_map(|filter| &filter.event_kinds).next() else {
            continue;
        };
        let name = event_kind_from_proto(kind).map_or_else(|_| kind.to_string(), |kind| kind.as_str().to_owned());
        return Err(format!(
            "{flag} event={name} concerns raw events, but watch receives none without --events; \
             add --events {name} (or a group such as --events all)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_with_repeated_keys_parses() {
        let filter =
            parse_filter_spec("category=unexpected-flow,category=new-listener,min-severity=high,component=web,zone=dmz,exe=/usr/bin/*,node=a").unwrap();
        assert_eq!(
            filter,
            pb::DeviationFilter {
                categories: vec![pb::Category::UnexpectedFlow as i32, pb::Category::NewListener as i32],
                min_severity: pb::Severity::High as i32,
                components: vec!["web".into()],
                zones: vec!["dmz".into()],
                executables: vec!["/usr/bin/*".into()],
                nodes: vec!["a".into()],
                event_kinds: Vec::new(),
            }
        );
    }

    #[test]
    fn malformed_specs_name_the_condition() {
        let cases = [
            ("category", "condition \"category\" is not key=value"),
            ("zone=", "condition \"zone=\" has no value"),
            ("colour=red", "unknown key \"colour\""),
            ("category=flow", "unknown category \"flow\""),
            ("min-severity=low,min-severity=high", "min-severity is given twice"),
            ("exe=/usr/[bin", "invalid exe glob \"/usr/[bin\""),
        ];
        for (spec, expected) in cases {
            let error = parse_filter_spec(spec).unwrap_err();
            assert!(error.starts_with(expected), "{spec}: {error}");
        }
    }

    #[test]
    fn event_condition_without_events_is_rejected() {
        let allow = [parse_filter_spec("event=tcp-connect").unwrap()];
        let deny = [parse_filter_spec("event=dns-answer").unwrap()];

        assert_eq!(
            check_event_conditions(&allow, &[], false).unwrap_err(),
            "--allow event=tcp-connect concerns raw events, but watch receives none without --events; \
             add --events tcp-connect (or a group such as --events all)"
        );
        assert!(check_event_conditions(&[], &deny, false).unwrap_err().starts_with("--deny event=dns-answer "));
        assert_eq!(check_event_conditions(&allow, &deny, true), Ok(()));
        let deviations_only = [parse_filter_spec("category=new-listener").unwrap()];
        assert_eq!(check_event_conditions(&deviations_only, &deviations_only, false), Ok(()));
    }
}
