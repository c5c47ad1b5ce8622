//! Typed stream filters: allow and deny lists of [`DeviationFilter`]s.
//!
//! A filter is a conjunction of optional conditions: category, minimum severity, component, zone,
//! executable glob and node. A condition that lists several values holds when any of them does.
//! A [`FilterSet`] sends a deviation when it matches any allow filter (or the allow list is empty)
//! and no deny filter, so deny always wins.

use driftwatch_model::deviation::{Category, Deviation, Severity};
use globset::GlobMatcher;

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
    }
}

impl Eq for DeviationFilter {}

impl DeviationFilter {
    /// Returns true when `deviation`, raised on `node`, meets every condition that is set.
    pub fn matches(&self, node: &str, deviation: &Deviation) -> bool {
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
        let allowed =
            self.allow.is_empty() || self.allow.iter().any(|f| f.matches(node, deviation));
        allowed && !self.deny.iter().any(|f| f.matches(node, deviation))
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
