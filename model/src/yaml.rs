//! Typed reading of a located YAML tree that records every problem instead of stopping at the first.
//!
//! serde stops at the first error, so the loader walks saphyr's [`MarkedYaml`] tree itself: each
//! accessor either returns the value or records a [`ModelError`] at the node's position and returns
//! `None`, and the caller carries on with the next field.

use saphyr::{MarkedYaml, Scalar, YamlData};
use saphyr_parser::Span;

use crate::error::{Location, ModelError, ModelErrorKind};

pub(crate) type Node<'input> = MarkedYaml<'input>;

/// Collects errors against one source file.
pub(crate) struct Reader {
    pub source: String,
    pub errors: Vec<ModelError>,
}

/// The entries of a YAML mapping whose keys are all strings from the allowed set.
pub(crate) struct Fields<'n, 'input> {
    pub span: Span,
    pub path: String,
    entries: Vec<(&'n str, &'n Node<'input>)>,
}

impl<'n, 'input> Fields<'n, 'input> {
    /// Returns the value under `key`. An explicit null counts as absent.
    pub fn get(&self, key: &str) -> Option<&'n Node<'input>> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .filter(|v| !matches!(scalar(v), Some(Scalar::Null)))
    }

    pub fn field_path(&self, key: &str) -> String {
        format!("{}.{key}", self.path)
    }
}

/// Returns where a node starts, as 1-based line and column.
pub(crate) fn position(span: &Span) -> (usize, usize) {
    (span.start.line(), span.start.col() + 1)
}

fn untagged<'n, 'input>(node: &'n Node<'input>) -> &'n Node<'input> {
    match &node.data {
        YamlData::Tagged(_, inner) => untagged(inner),
        _ => node,
    }
}

fn scalar<'n, 'input>(node: &'n Node<'input>) -> Option<&'n Scalar<'input>> {
    match &untagged(node).data {
        YamlData::Value(value) => Some(value),
        _ => None,
    }
}

/// Names the kind of a node in the words of an error message.
pub(crate) fn describe(node: &Node<'_>) -> &'static str {
    match &untagged(node).data {
        YamlData::Mapping(_) => "a mapping",
        YamlData::Sequence(_) => "a list",
        YamlData::Value(Scalar::String(_)) => "a string",
        YamlData::Value(Scalar::Integer(_)) => "an integer",
        YamlData::Value(Scalar::FloatingPoint(_)) => "a floating-point number",
        YamlData::Value(Scalar::Boolean(_)) => "a boolean",
        YamlData::Value(Scalar::Null) => "null",
        _ => "an unsupported YAML node",
    }
}

impl Reader {
    pub fn new(source: &str) -> Reader {
        Reader {
            source: source.to_owned(),
            errors: Vec::new(),
        }
    }

    pub fn error_at(&mut self, line: usize, column: usize, kind: ModelErrorKind) {
        let location = Location {
            source: self.source.clone(),
            line,
            column,
        };
        self.errors.push(ModelError { location, kind });
    }

    pub fn error(&mut self, span: &Span, kind: ModelErrorKind) {
        let (line, column) = position(span);
        self.error_at(line, column, kind);
    }

    pub fn type_error(&mut self, node: &Node<'_>, path: &str, expected: &'static str) {
        let kind = ModelErrorKind::Type {
            path: path.to_owned(),
            expected,
            found: describe(node),
        };
        self.error(&node.span, kind);
    }

    pub fn invalid(
        &mut self,
        span: &Span,
        path: &str,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) {
        let kind = ModelErrorKind::InvalidValue {
            path: path.to_owned(),
            value: value.into(),
            reason: reason.into(),
        };
        self.error(span, kind);
    }

    /// Reads a mapping, reporting non-string keys and keys outside `allowed`.
    pub fn mapping<'n, 'input>(
        &mut self,
        node: &'n Node<'input>,
        path: &str,
        allowed: &'static [&'static str],
    ) -> Option<Fields<'n, 'input>> {
        let YamlData::Mapping(map) = &untagged(node).data else {
            self.type_error(node, path, "a mapping");
            return None;
        };
        let mut entries = Vec::with_capacity(map.len());
        for (key, value) in map {
            let Some(Scalar::String(name)) = scalar(key) else {
                self.type_error(key, &format!("a key in {path}"), "a string");
                continue;
            };
            let Some(&known) = allowed.iter().find(|a| **a == name.as_ref()) else {
                let kind = ModelErrorKind::UnknownKey {
                    path: path.to_owned(),
                    key: name.to_string(),
                    expected: allowed,
                };
                self.error(&key.span, kind);
                continue;
            };
            entries.push((known, value));
        }
        Some(Fields {
            span: node.span,
            path: path.to_owned(),
            entries,
        })
    }

    pub fn sequence<'n, 'input>(
        &mut self,
        node: &'n Node<'input>,
        path: &str,
    ) -> Option<&'n [Node<'input>]> {
        match &untagged(node).data {
            YamlData::Sequence(items) => Some(items),
            _ => {
                self.type_error(node, path, "a list");
                None
            }
        }
    }

    pub fn missing(&mut self, fields: &Fields<'_, '_>, field: &'static str) {
        let kind = ModelErrorKind::MissingField {
            path: fields.path.clone(),
            field,
        };
        self.error(&fields.span, kind);
    }

    pub fn string(&mut self, node: &Node<'_>, path: &str) -> Option<String> {
        match scalar(node) {
            Some(Scalar::String(s)) => Some(s.to_string()),
            _ => {
                self.type_error(node, path, "a string");
                None
            }
        }
    }

    /// Reads a required string field, with the span of its value.
    pub fn required_string(
        &mut self,
        fields: &Fields<'_, '_>,
        key: &'static str,
    ) -> Option<(String, Span)> {
        let Some(node) = fields.get(key) else {
            self.missing(fields, key);
            return None;
        };
        self.string(node, &fields.field_path(key))
            .map(|s| (s, node.span))
    }

    pub fn optional_string(
        &mut self,
        fields: &Fields<'_, '_>,
        key: &'static str,
    ) -> Option<(String, Span)> {
        let node = fields.get(key)?;
        self.string(node, &fields.field_path(key))
            .map(|s| (s, node.span))
    }

    pub fn optional_bool(&mut self, fields: &Fields<'_, '_>, key: &'static str) -> Option<bool> {
        let node = fields.get(key)?;
        match scalar(node) {
            Some(Scalar::Boolean(b)) => Some(*b),
            _ => {
                self.type_error(node, &fields.field_path(key), "a boolean (true or false)");
                None
            }
        }
    }

    /// Reads an integer within `range`, reporting a value outside it as invalid.
    pub fn integer_in(
        &mut self,
        node: &Node<'_>,
        path: &str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Option<i64> {
        let Some(Scalar::Integer(value)) = scalar(node) else {
            self.type_error(node, path, "an integer");
            return None;
        };
        if !range.contains(value) {
            let reason = format!("must be between {} and {}", range.start(), range.end());
            self.invalid(&node.span, path, value.to_string(), reason);
            return None;
        }
        Some(*value)
    }

    /// Reads a list of strings. A single string is read as a list of one.
    pub fn string_list(&mut self, node: &Node<'_>, path: &str) -> Option<Vec<(String, Span)>> {
        if let Some(Scalar::String(s)) = scalar(node) {
            return Some(vec![(s.to_string(), node.span)]);
        }
        let YamlData::Sequence(items) = &untagged(node).data else {
            self.type_error(node, path, "a list of strings");
            return None;
        };
        let mut values = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.string(item, &format!("{path}[{i}]")) {
                Some(s) => values.push((s, item.span)),
                None => ok = false,
            }
        }
        ok.then_some(values)
    }

    /// Reads a scalar that is either a string or an integer, as `match.user` entries are.
    pub fn string_or_integer(
        &mut self,
        node: &Node<'_>,
        path: &str,
    ) -> Option<Result<String, i64>> {
        match scalar(node) {
            Some(Scalar::String(s)) => Some(Ok(s.to_string())),
            Some(Scalar::Integer(i)) => Some(Err(*i)),
            _ => {
                self.type_error(node, path, "a user name or a numeric uid");
                None
            }
        }
    }
}
