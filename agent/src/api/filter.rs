//! Typed stream filters: allow and deny lists of [`DeviationFilter`]s.
//!
//! A filter is a conjunction of optional conditions: category, minimum severity, component, zone,
//! executable glob and node. A condition that lists several values holds when any of them does.
//! A [`FilterSet`] sends a deviation when it matches any allow filter (or the allow list is empty)
//! and no deny filter, so deny always wins.
//!
//! Raw events pass the same lists. A filter that sets a category or a minimum severity concerns
//! deviations only, and one that sets event kinds concerns events only. Each message is judged by
//! the filters that concern its type, so an allow filter on categories narrows deviations and
//! leaves events alone.

use driftwatch_model::deviation::{Category, Deviation, Severity};
use globset::GlobMatcher;

use crate::events::{EventDetail, EventKind, RawEvent};

/// One filter; every condition that is set must hold. The default matches everything.
#[derive(Debug, Clone, Default)]
pub struct DeviationFilter {
    /// Categories accepted; empty accepts every category.
    pub categories: Vec<Category>,
    /// Lowest severity accepted; `None` accepts every severity.
    pub min_severity: Option<Severity>,
    /// Component ids accepted as the source or the destination; empty accepts any.
    pub components: Vec<String>,
    /// Zone ids accepted as the source or the destination zone; empty accepts any.
    pub zones: Vec<String>,
    /// Globs on the executable of the process or the peer process; empty accepts any.
    pub executables: Vec<ExecutableGlob>,
    /// Node names accepted; empty accepts any.
    pub nodes: Vec<String>,
    /// Event kinds accepted; setting any makes the filter concern events only.
    pub event_kinds: Vec<EventKind>,
}

/// A compiled executable glob that keeps its text for messages and equality.
#[derive(Debug, Clone)]
pub struct ExecutableGlob {
    text: String,
    matcher: GlobMatcher,
}

impl ExecutableGlob {
    /// Compiles `pattern`; `*` stays within one path segment and `**` crosses segments.
    ///
    /// # Errors
    ///
    /// The glob parser's reason when the pattern is malformed, such as an unclosed `[`.
    pub fn new(pattern: &str) -> Result<ExecutableGlob, globset::Error> {
        let glob = globset::GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()?;
        Ok(ExecutableGlob {
            text: pattern.to_owned(),
            matcher: glob.compile_matcher(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn is_match(&self, path: &str) -> bool {
        self.matcher.is_match(path)
    }
}

impl PartialEq for ExecutableGlob {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for ExecutableGlob {}

impl PartialEq for DeviationFilter {
    fn eq(&self, other: &Self) -> bool {
        self.categories == other.categories
            && self.min_severity == other.min_severity
            && self.components == other.components
            && self.zones == other.zones
            && self.executables == other.executables
            && self.nodes == other.nodes
            && self.event_kinds == other.event_kinds
    }
}

impl Eq for DeviationFilter {}

impl DeviationFilter {
    /// Returns true when the filter can match deviations: it sets no event kind.
    pub fn concerns_deviations(&self) -> bool {
        self.event_kinds.is_empty()
    }

    /// Returns true when the filter can match events: it sets no category and no minimum severity.
    pub fn concerns_events(&self) -> bool {
        self.categories.is_empty() && self.min_severity.is_none()
    }

    /// Returns true when `event`, recorded on `node`, meets every condition that is set. A filter
    /// that concerns deviations only never matches an event.
    pub fn matches_event(&self, node: &str, event: &RawEvent) -> bool {
        if !self.concerns_events() {
            return false;
        }
        if !self.event_kinds.is_empty() && !self.event_kinds.contains(&event.kind) {
            return false;
        }
        let remote = match &event.detail {
            EventDetail::Socket(socket) => Some(&socket.remote_placement),
            _ => None,
        };
        let placements = [Some(&event.placement), remote];
        if !self.components.is_empty() {
            let matched = placements
                .iter()
                .flatten()
                .any(|placement| !placement.component.is_empty() && self.components.contains(&placement.component));
            if !matched {
                return false;
            }
        }
        if !self.zones.is_empty() {
            let matched = placements
                .iter()
                .flatten()
                .filter_map(|placement| placement.zone.as_ref())
                .any(|zone| self.zones.contains(zone));
            if !matched {
                return false;
            }
        }
        if !self.executables.is_empty() {
            let Some(process) = &event.process else { return false };
            if !self.executables.iter().any(|glob| glob.is_match(&process.exe)) {
                return false;
            }
        }
        self.nodes.is_empty() || self.nodes.iter().any(|name| name == node)
    }

    /// Returns true when `deviation`, raised on `node`, meets every condition that is set. A
    /// filter that concerns events only never matches a deviation.
    pub fn matches(&self, node: &str, deviation: &Deviation) -> bool {
        if !self.concerns_deviations() {
            return false;
        }
        if self
            .min_severity
            .is_some_and(|min| deviation.severity < min)
        {
            return false;
        }
        if !self.categories.is_empty() && !self.categories.contains(&deviation.category) {
            return false;
        }
        if !self.components.is_empty()
            && !self
                .components
                .iter()
                .any(|id| *id == deviation.source || *id == deviation.destination)
        {
            return false;
        }
        if !self.zones.is_empty() {
            let evidence = &deviation.evidence;
            let zones = [&evidence.source_zone, &evidence.destination_zone];
            let in_zone = zones
                .into_iter()
                .flatten()
                .any(|zone| self.zones.contains(zone));
            if !in_zone {
                return false;
            }
        }
        if !self.executables.is_empty() {
            let evidence = &deviation.evidence;
            let processes = [&evidence.process, &evidence.peer_process];
            let matched = processes.into_iter().flatten().any(|process| {
                self.executables
                    .iter()
                    .any(|glob| glob.is_match(&process.exe))
            });
            if !matched {
                return false;
            }
        }
        self.nodes.is_empty() || self.nodes.iter().any(|name| name == node)
    }
}

/// Allow and deny lists: a deviation passes when it matches any allow filter (or `allow` is
/// empty) and no deny filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterSet {
    pub allow: Vec<DeviationFilter>,
    pub deny: Vec<DeviationFilter>,
    /// A filter every deviation must also match, from the request fields that predate the lists.
    pub required: Option<DeviationFilter>,
}

impl FilterSet {
    /// Returns a set that lets every deviation through.
    pub fn all() -> FilterSet {
        FilterSet::default()
    }

    /// Returns true when `deviation`, raised on `node`, passes the set.
    pub fn matches(&self, node: &str, deviation: &Deviation) -> bool {
        if let Some(required) = &self.required {
            if !required.matches(node, deviation) {
                return false;
            }
        }
        let mut allow = self.allow.iter().filter(|filter| filter.concerns_deviations()).peekable();
        let allowed = allow.peek().is_none() || allow.any(|f| f.matches(node, deviation));
        allowed && !self.deny.iter().any(|f| f.matches(node, deviation))
    }

    /// Returns true when `event`, recorded on `node`, passes the set: no allow filter concerns
    /// events or one matches it, and no deny filter matches it. The filter from the older request
    /// fields concerns deviations only.
    pub fn matches_event(&self, node: &str, event: &RawEvent) -> bool {
        let mut allow = self.allow.iter().filter(|filter| filter.concerns_events()).peekable();
        let allowed = allow.peek().is_none() || allow.any(|f| f.matches_event(node, event));
        allowed && !self.deny.iter().any(|f| f.matches_event(node, event))
    }
}

impl From<DeviationFilter> for FilterSet {
    fn from(filter: DeviationFilter) -> Self {
        FilterSet {
            allow: vec![filter],
            ..FilterSet::default()
        }
    }
}

#[cfg(test)]
#[path = "filter_tests.rs"]
mod tests;
