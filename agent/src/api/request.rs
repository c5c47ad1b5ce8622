//! Reading a `StreamDeviationsRequest` into a [`FilterSet`] and a [`Replay`], with errors that
//! name the field and the filter at fault.

use std::time::SystemTime;

use driftwatch_proto::v1 as pb;

use super::convert::{self, ConvertError};
use super::convert_events::event_kind_from_proto;
use super::filter::{DeviationFilter, ExecutableGlob, FilterSet};
use super::hub::Replay;
use crate::events::{EventKind, EventKinds};

/// Errors in a subscription request; the server returns them as INVALID_ARGUMENT.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("{field}: {source}")]
    Convert {
        field: String,
        source: ConvertError,
    },
    #[error("{field}: invalid executable glob {pattern:?}: {reason}")]
    InvalidGlob {
        field: String,
        pattern: String,
        reason: String,
    },
    #[error("{field}: an empty string matches nothing; leave the list out to accept any value")]
    EmptyValue { field: String },
    #[error("since: invalid timestamp: {reason}")]
    InvalidSince { reason: String },
    #[error(
        "set at most one of from_sequence, since and last; the request sets {0}"
    )]
    ConflictingReplay(String),
    #[error(
        "{field}: a filter concerns deviations (categories, min_severity) or events (event_kinds), \
         not both; split it into two filters"
    )]
    MixedFilter { field: String },
    #[error("from_event_sequence is set but events is empty; list the event kinds to resume")]
    EventResumeWithoutEvents,
}

/// The raw events a subscription requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRequest {
    pub kinds: EventKinds,
    /// Event sequence to replay retained events from, when the client resumes.
    pub from_sequence: Option<u64>,
}

/// Reads the request's `events` and `from_event_sequence`, or returns `None` when it requests no
/// event.
///
/// # Errors
///
/// A [`RequestError`] for an unknown or unspecified kind, naming its index, and for
/// `from_event_sequence` without any kind.
pub fn events_from_request(request: &pb::StreamDeviationsRequest) -> Result<Option<EventRequest>, RequestError> {
    let kinds: EventKinds = event_kinds_from_proto("events", &request.events)?.into_iter().collect();
    if kinds.is_empty() {
        if request.from_event_sequence.is_some() {
            return Err(RequestError::EventResumeWithoutEvents);
        }
        return Ok(None);
    }
    Ok(Some(EventRequest {
        kinds,
        from_sequence: request.from_event_sequence,
    }))
}

fn event_kinds_from_proto(field: &str, values: &[i32]) -> Result<Vec<EventKind>, RequestError> {
    values
        .iter()
        .enumerate()
        .map(|(index, value)| {
            event_kind_from_proto(*value).map_err(|source| RequestError::Convert {
                field: format!("{field}[{index}]"),
                source,
            })
        })
        .collect()
}

/// Builds the filter set and the replay start of a subscription.
///
/// # Errors
///
/// A [`RequestError`] for the first invalid field: an unknown enum value, a malformed glob, an
/// empty string in a list, an invalid `since`, or more than one replay start.
pub fn subscription_from_request(
    request: &pb::StreamDeviationsRequest,
) -> Result<(FilterSet, Replay), RequestError> {
    let allow = filters_from_proto("allow", &request.allow)?;
    let deny = filters_from_proto("deny", &request.deny)?;
    let required = legacy_filter(request)?;
    let mut deny = deny;
    #[allow(deprecated, reason = "the older fields are still honoured")]
    for (index, value) in request.exclude_categories.iter().enumerate() {
        let category = convert::category_from_proto(*value).map_err(|source| RequestError::Convert {
            field: format!("exclude_categories[{index}]"),
            source,
        })?;
        deny.push(DeviationFilter {
            categories: vec![category],
            ..DeviationFilter::default()
        });
    }

    let replay = replay_from_request(request)?;
    Ok((FilterSet { allow, deny, required }, replay))
}

fn replay_from_request(request: &pb::StreamDeviationsRequest) -> Result<Replay, RequestError> {
    let mut set = Vec::new();
    if request.from_sequence.is_some() {
        set.push("from_sequence");
    }
    if request.since.is_some() {
        set.push("since");
    }
    if request.last.is_some() {
        set.push("last");
    }
    if set.len() > 1 {
        return Err(RequestError::ConflictingReplay(set.join(" and ")));
    }
    if let Some(from) = request.from_sequence {
        return Ok(Replay::FromSequence(from));
    }
    if let Some(since) = request.since {
        let since = SystemTime::try_from(since).map_err(|err| RequestError::InvalidSince {
            reason: err.to_string(),
        })?;
        return Ok(Replay::Since(since));
    }
    Ok(request.last.map_or(Replay::None, Replay::Last))
}

/// The fields that predate the filter lists, as one filter every deviation must also match.
fn legacy_filter(request: &pb::StreamDeviationsRequest) -> Result<Option<DeviationFilter>, RequestError> {
    #[allow(deprecated, reason = "the older fields are still honoured")]
    let (min_severity, categories) = (request.min_severity, &request.categories);
    if min_severity == 0 && categories.is_empty() {
        return Ok(None);
    }
    let min_severity = severity("min_severity".to_string(), min_severity)?;
    let categories = categories_from_proto("categories", categories)?;
    Ok(Some(DeviationFilter {
        categories,
        min_severity,
        ..DeviationFilter::default()
    }))
}

fn filters_from_proto(
    list: &str,
    filters: &[pb::DeviationFilter],
) -> Result<Vec<DeviationFilter>, RequestError> {
    filters
        .iter()
        .enumerate()
        .map(|(index, filter)| filter_from_proto(&format!("{list}[{index}]"), filter))
        .collect()
}

/// Converts one filter; `place` names it in errors, such as `allow[1]`.
pub fn filter_from_proto(place: &str, filter: &pb::DeviationFilter) -> Result<DeviationFilter, RequestError> {
    let executables = filter
        .executables
        .iter()
        .enumerate()
        .map(|(index, pattern)| {
            let field = format!("{place}.executables[{index}]");
            non_empty(&field, pattern)?;
            ExecutableGlob::new(pattern).map_err(|err| RequestError::InvalidGlob {
                field,
                pattern: pattern.clone(),
                reason: err.kind().to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let converted = DeviationFilter {
        categories: categories_from_proto(&format!("{place}.categories"), &filter.categories)?,
        min_severity: severity(format!("{place}.min_severity"), filter.min_severity)?,
        components: strings(&format!("{place}.components"), &filter.components)?,
        zones: strings(&format!("{place}.zones"), &filter.zones)?,
        executables,
        nodes: strings(&format!("{place}.nodes"), &filter.nodes)?,
        event_kinds: event_kinds_from_proto(&format!("{place}.event_kinds"), &filter.event_kinds)?,
    };
    if !converted.concerns_deviations() && !converted.concerns_events() {
        return Err(RequestError::MixedFilter { field: place.to_owned() });
    }
    Ok(converted)
}

fn severity(field: String, value: i32) -> Result<Option<driftwatch_model::deviation::Severity>, RequestError> {
    if value == 0 {
        return Ok(None);
    }
    convert::severity_from_proto(value)
        .map(Some)
        .map_err(|source| RequestError::Convert { field, source })
}

fn categories_from_proto(
    field: &str,
    values: &[i32],
) -> Result<Vec<driftwatch_model::deviation::Category>, RequestError> {
    values
        .iter()
        .enumerate()
        .map(|(index, value)| {
            convert::category_from_proto(*value).map_err(|source| RequestError::Convert {
                field: format!("{field}[{index}]"),
                source,
            })
        })
        .collect()
}

fn strings(field: &str, values: &[String]) -> Result<Vec<String>, RequestError> {
    for (index, value) in values.iter().enumerate() {
        non_empty(&format!("{field}[{index}]"), value)?;
    }
    Ok(values.to_vec())
}

fn non_empty(field: &str, value: &str) -> Result<(), RequestError> {
    if value.is_empty() {
        return Err(RequestError::EmptyValue {
            field: field.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_glob_names_the_filter_and_index() {
        let request = pb::StreamDeviationsRequest {
            deny: vec![
                pb::DeviationFilter::default(),
                pb::DeviationFilter {
                    executables: vec!["/usr/bin/*".into(), "/usr/[bin".into()],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let error = subscription_from_request(&request).unwrap_err();
        assert!(
            error.to_string().starts_with("deny[1].executables[1]: invalid executable glob \"/usr/[bin\""),
            "{error}"
        );
    }

    #[test]
    fn unknown_category_names_the_field() {
        let request = pb::StreamDeviationsRequest {
            allow: vec![pb::DeviationFilter {
                categories: vec![1, 99],
                ..Default::default()
            }],
            ..Default::default()
        };
        let error = subscription_from_request(&request).unwrap_err();
        assert_eq!(
            error.to_string(),
            "allow[0].categories[1]: field category has value 99, which this build does not know"
        );
    }

    #[test]
    fn filter_for_deviations_and_events_is_rejected() {
        let request = pb::StreamDeviationsRequest {
            allow: vec![pb::DeviationFilter {
                min_severity: pb::Severity::High as i32,
                event_kinds: vec![pb::EventKind::ProcessExec as i32],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            subscription_from_request(&request).unwrap_err(),
            RequestError::MixedFilter { field: "allow[0]".into() }
        );
    }

    #[test]
    fn unspecified_event_kind_names_its_index() {
        let request = pb::StreamDeviationsRequest {
            events: vec![pb::EventKind::TcpClose as i32, pb::EventKind::Unspecified as i32],
            ..Default::default()
        };
        assert_eq!(
            events_from_request(&request).unwrap_err().to_string(),
            "events[1]: field event_kind has value 0, which this build does not know"
        );
    }

    #[test]
    fn event_resume_without_kinds_is_rejected() {
        let request = pb::StreamDeviationsRequest {
            from_event_sequence: Some(4),
            ..Default::default()
        };
        assert_eq!(
            events_from_request(&request).unwrap_err(),
            RequestError::EventResumeWithoutEvents
        );
    }

    #[test]
    fn events_request_reads_kinds_and_resume() {
        let request = pb::StreamDeviationsRequest {
            events: vec![pb::EventKind::ProcessExec as i32, pb::EventKind::TcpClose as i32],
            from_event_sequence: Some(7),
            ..Default::default()
        };
        let events = events_from_request(&request).unwrap().unwrap();
        assert_eq!(events.kinds.iter().collect::<Vec<_>>(), vec![EventKind::ProcessExec, EventKind::TcpClose]);
        assert_eq!(events.from_sequence, Some(7));
        assert_eq!(events_from_request(&pb::StreamDeviationsRequest::default()).unwrap(), None);
    }

    #[test]
    fn two_replay_starts_are_rejected() {
        let request = pb::StreamDeviationsRequest {
            from_sequence: Some(3),
            last: Some(10),
            ..Default::default()
        };
        assert_eq!(
            subscription_from_request(&request).unwrap_err(),
            RequestError::ConflictingReplay("from_sequence and last".into())
        );
    }

    #[test]
    fn empty_component_is_rejected() {
        let request = pb::StreamDeviationsRequest {
            allow: vec![pb::DeviationFilter {
                components: vec![String::new()],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            subscription_from_request(&request).unwrap_err(),
            RequestError::EmptyValue {
                field: "allow[0].components[0]".into()
            }
        );
    }

    #[test]
    #[allow(deprecated, reason = "checks that the older fields are still honoured")]
    fn older_fields_become_required_and_deny_filters() {
        let request = pb::StreamDeviationsRequest {
            min_severity: pb::Severity::High as i32,
            exclude_categories: vec![pb::Category::NewListener as i32],
            ..Default::default()
        };
        let (set, replay) = subscription_from_request(&request).unwrap();
        assert_eq!(replay, Replay::None);
        assert_eq!(set.allow, Vec::new());
        assert_eq!(
            set.required.unwrap().min_severity,
            Some(driftwatch_model::deviation::Severity::High)
        );
        assert_eq!(
            set.deny[0].categories,
            vec![driftwatch_model::deviation::Category::NewListener]
        );
    }
}
