//! Findings about a model that loads but may not mean what its author intended: selectors that
//! the same process could match, and exceptions that have expired.
//!
//! These are warnings rather than load errors, because the model is still usable: the first
//! matching component wins, and an expired exception only stops suppressing deviations.

use std::fmt;
use std::time::SystemTime;

use crate::error::{Location, ModelErrorKind};
use crate::model::{Component, GlobList, Model, Selectors, UserSelector};
use crate::pattern::format_date;

/// A problem that does not stop the model from loading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelWarning {
    pub location: Location,
    pub message: String,
    pub hint: String,
}

impl fmt::Display for ModelWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: warning: {}", self.location, self.message)
    }
}

impl Model {
    /// Lists overlapping component selectors and exceptions expired at `now`, in file order.
    pub fn warnings(&self, now: SystemTime) -> Vec<ModelWarning> {
        let mut warnings = Vec::new();
        for (i, first) in self.components.iter().enumerate() {
            for second in &self.components[i + 1..] {
                if components_overlap(first, second) {
                    warnings.push(ModelWarning {
                        location: self.location(second.line, second.column),
                        message: format!(
                            "the selectors of component {} overlap those of component {} (line {}), so a process could match both",
                            second.id, first.id, first.line
                        ),
                        hint: format!(
                            "the first match wins, so such a process belongs to {}; narrow one of the two match blocks (add a cgroup, unit or user selector)",
                            first.id
                        ),
                    });
                }
            }
        }
        for exception in &self.exceptions {
            if let Some(expires) = exception.expires.filter(|_| exception.is_expired(now)) {
                warnings.push(ModelWarning {
                    location: self.location(exception.line, exception.column),
                    message: format!(
                        "exception \"{}\" expired on {} and no longer suppresses deviations",
                        exception.id.text,
                        format_date(expires)
                    ),
                    hint: "renew its expires date if the reason still holds, or remove it"
                        .to_owned(),
                });
            }
        }
        warnings.sort_by_key(|w| (w.location.line, w.location.column));
        warnings
    }

    fn location(&self, line: usize, column: usize) -> Location {
        Location {
            source: self.source.clone(),
            line,
            column,
        }
    }
}

/// True when some process could satisfy the selectors of both components.
///
/// Each selector kind is compared only when both components declare it, since a missing selector
/// accepts everything. NOTE: two globs are judged to overlap when either matches the other's
/// text, which catches a glob that covers a literal path and identical patterns but can miss two
/// wildcards that intersect only partly (`/opt/a*` and `/opt/*b`).
fn components_overlap(first: &Component, second: &Component) -> bool {
    let (Some(a), Some(b)) = (&first.selectors, &second.selectors) else {
        return false;
    };
    if a.is_empty() || b.is_empty() {
        return false;
    }
    globs_overlap(a.exe.as_ref(), b.exe.as_ref())
        && globs_overlap(a.cgroup.as_ref(), b.cgroup.as_ref())
        && globs_overlap(a.unit.as_ref(), b.unit.as_ref())
        && users_overlap(a, b)
        && labels_overlap(&a.container, &b.container)
        && labels_overlap(&a.pod, &b.pod)
}

fn globs_overlap(a: Option<&GlobList>, b: Option<&GlobList>) -> bool {
    let (Some(a), Some(b)) = (a, b) else {
        return true;
    };
    a.patterns.iter().any(|pa| {
        b.patterns
            .iter()
            .any(|pb| pa == pb || a.matches(pb) || b.matches(pa))
    })
}

fn users_overlap(a: &Selectors, b: &Selectors) -> bool {
    let (Some(a), Some(b)) = (&a.user, &b.user) else {
        return true;
    };
    a.iter().any(|ua| {
        b.iter().any(|ub| match (ua, ub) {
            // A name and a uid may be the same account; only the host's passwd can tell.
            (UserSelector::Name(_), UserSelector::Uid(_))
            | (UserSelector::Uid(_), UserSelector::Name(_)) => true,
            _ => ua == ub,
        })
    })
}

/// Two label requirements conflict only when they demand different values for one label.
fn labels_overlap(
    a: &Option<std::collections::BTreeMap<String, String>>,
    b: &Option<std::collections::BTreeMap<String, String>>,
) -> bool {
    let (Some(a), Some(b)) = (a, b) else {
        return true;
    };
    a.iter()
        .all(|(key, value)| b.get(key).is_none_or(|other| other == value))
}

impl ModelErrorKind {
    /// Suggests how to fix the error, for `driftwatch model validate`.
    pub fn hint(&self) -> Option<String> {
        let hint = match self {
            ModelErrorKind::Io(_) => "check the path and its permissions".to_owned(),
            ModelErrorKind::Syntax(_) => {
                "check the indentation and quoting near this position".to_owned()
            }
            ModelErrorKind::Type { expected, .. } => format!("write {expected} here"),
            ModelErrorKind::UnknownKey { key, expected, .. } => match closest(key, expected) {
                Some(near) => format!("did you mean \"{near}\"?"),
                None => "remove the key; the schema lists every allowed key".to_owned(),
            },
            ModelErrorKind::MissingField { field, .. } => format!("add \"{field}:\""),
            ModelErrorKind::InvalidValue { .. } => return None,
            ModelErrorKind::UnknownReference {
                id, known, target, ..
            } => {
                let known: Vec<&str> = known.iter().map(String::as_str).collect();
                match closest(id, &known) {
                    Some(near) => format!("did you mean \"{near}\"?"),
                    None => format!("declare a {target} with id \"{id}\""),
                }
            }
            ModelErrorKind::DuplicateId { .. } => {
                "zone and component ids share one namespace: rename one of them".to_owned()
            }
            ModelErrorKind::InvalidGlob { .. } => {
                "escape a literal [, ], { or } with [...] brackets, as in [[]".to_owned()
            }
            ModelErrorKind::InvalidCidr { .. } => {
                "write an address such as 10.0.0.0/8 or 2001:db8::/32".to_owned()
            }
        };
        Some(hint)
    }
}

/// Returns the candidate nearest to `word` by edit distance, if it is close enough to be a typo.
fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(distance, c)| *distance <= 2.max(c.len() / 4))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("cidr", "cidrs"), 1);
        assert_eq!(edit_distance("exe", "exe"), 0);
        assert_eq!(edit_distance("listen", "listens"), 1);
        assert_eq!(edit_distance("zone", "trust"), 5);
    }

    #[test]
    fn closest_suggests_only_near_words() {
        assert_eq!(closest("listen", &["listens", "match"]), Some("listens"));
        assert_eq!(closest("banana", &["listens", "match"]), None);
    }
}
