//! Places in the model file that a deviation concerns, for SARIF results.
//!
//! The model crate records the line of each component and flow but no column, so the column is
//! found in the file text. It is the `id` key of a component on that line, or else the first
//! character of the entry after its `- ` marker.

use std::collections::HashMap;

use driftwatch_model::deviation::Deviation;
use driftwatch_model::Model;

/// A line and column in the model file, both counting from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub line: usize,
    pub column: usize,
}

/// The declaration places of a model's components and flows.
#[derive(Debug, Clone, Default)]
pub struct ModelLocations {
    components: HashMap<String, Region>,
    /// Keyed by (from, to, port); the protocol is left out because deviations of one flow share it.
    flows: HashMap<(String, String, u16), Region>,
}

impl ModelLocations {
    /// Indexes the components and flows of `model`, whose file content is `text`.
    pub fn new(model: &Model, text: &str) -> ModelLocations {
        let lines: Vec<&str> = text.lines().collect();
        let region = |line: usize, key: Option<&str>| Region { line, column: column_on(&lines, line, key) };
        let components = model
            .components
            .iter()
            .filter(|component| component.line > 0)
            .map(|component| (component.id.clone(), region(component.line, Some("id"))))
            .collect();
        let flows = model
            .flows
            .iter()
            .filter(|flow| flow.line > 0)
            .flat_map(|flow| {
                flow.ports.iter().map(move |port| ((flow.from.clone(), flow.to.clone(), *port), region(flow.line, None)))
            })
            .collect();
        ModelLocations { components, flows }
    }

    /// Returns the declaration a deviation concerns: the flow between its two ends when the model
    /// declares one, else its source component, else its destination component.
    pub fn for_deviation(&self, deviation: &Deviation) -> Option<Region> {
        if let Some(port) = deviation.port {
            let key = (deviation.source.clone(), deviation.destination.clone(), port);
            if let Some(region) = self.flows.get(&key) {
                return Some(*region);
            }
        }
        self.components.get(&deviation.source).or_else(|| self.components.get(&deviation.destination)).copied()
    }

    /// Returns where the component `id` is declared.
    pub fn component(&self, id: &str) -> Option<Region> {
        self.components.get(id).copied()
    }
}

/// Finds the column of `key:` on a 1-based line, else the first character after indentation and
/// a sequence marker; 1 when the line is not in the text.
fn column_on(lines: &[&str], line: usize, key: Option<&str>) -> usize {
    let Some(text) = line.checked_sub(1).and_then(|index| lines.get(index)) else {
        return 1;
    };
    if let Some(key) = key {
        let pattern = format!("{key}:");
        if let Some(byte) = text.find(&pattern) {
            return text[..byte].chars().count() + 1;
        }
    }
    let entry = text.trim_start().trim_start_matches('-').trim_start();
    text.chars().count() - entry.chars().count() + 1
}
