//! Errors found while reading a model file, each with the place in the file it refers to.

use std::fmt;

use thiserror::Error;

/// A place in a model file. `line` and `column` count from 1; both are 0 when the error concerns
/// the file as a whole (it could not be read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// File path or the name given to [`crate::Model::parse`].
    pub source: String,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.source)
        } else {
            write!(f, "{}:{}:{}", self.source, self.line, self.column)
        }
    }
}

/// One problem in a model file.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{location}: {kind}")]
pub struct ModelError {
    pub location: Location,
    pub kind: ModelErrorKind,
}

/// The kind of problem. `path` fields name the node the way a reader finds it, such as
/// `components[1].match.exe[0]`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ModelErrorKind {
    #[error("failed to read the model: {0}")]
    Io(String),
    /// The text is not valid YAML; the parser stops at the first such error.
    #[error("invalid YAML: {0}")]
    Syntax(String),
    #[error("expected {expected} for {path}, found {found}")]
    Type {
        path: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("unknown key \"{key}\" in {path} (expected one of: {})", expected.join(", "))]
    UnknownKey {
        path: String,
        key: String,
        expected: &'static [&'static str],
    },
    #[error("missing field \"{field}\" in {path}")]
    MissingField { path: String, field: &'static str },
    #[error("invalid value {value} for {path}: {reason}")]
    InvalidValue {
        path: String,
        value: String,
        reason: String,
    },
    #[error("unknown {target} \"{id}\" in {path} (known: {})", known_list(known))]
    UnknownReference {
        path: String,
        target: &'static str,
        id: String,
        known: Vec<String>,
    },
    #[error("duplicate id \"{id}\" in {path}, first defined at line {first_line}")]
    DuplicateId {
        path: String,
        id: String,
        first_line: usize,
    },
    #[error("invalid glob \"{pattern}\" in {path}: {reason}")]
    InvalidGlob {
        path: String,
        pattern: String,
        reason: String,
    },
    #[error("invalid CIDR \"{value}\" in {path}: {reason}")]
    InvalidCidr {
        path: String,
        value: String,
        reason: String,
    },
}

/// Names the known ids, at most `KNOWN_LISTED` of them, so that a large model does not turn one
/// error into a line of hundreds of kilobytes.
fn known_list(known: &[String]) -> String {
    const KNOWN_LISTED: usize = 20;
    if known.is_empty() {
        return "none".to_owned();
    }
    let listed = known[..known.len().min(KNOWN_LISTED)].join(", ");
    match known.len().checked_sub(KNOWN_LISTED) {
        Some(more) if more > 0 => format!("{listed} and {more} more"),
        _ => listed,
    }
}

/// Every problem found in a model file, in the order of the file.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub struct ModelErrors {
    pub errors: Vec<ModelError>,
}

impl ModelErrors {
    pub fn len(&self) -> usize {
        self.errors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, ModelError> {
        self.errors.iter()
    }
}

impl fmt::Display for ModelErrors {
    /// Prints one error per line, so an editor or CI log can jump to each.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl<'a> IntoIterator for &'a ModelErrors {
    type Item = &'a ModelError;
    type IntoIter = std::slice::Iter<'a, ModelError>;

    fn into_iter(self) -> Self::IntoIter {
        self.errors.iter()
    }
}
