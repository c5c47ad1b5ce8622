//! The collector as the source of the live view: the merged graph, the fleet's model and the
//! nodes behind each component.

use std::collections::BTreeMap;

use driftwatch_model::graph::GraphSnapshot;

use super::Collector;
use crate::web::{DeclaredModel, LiveSource};

impl LiveSource for Collector {
    fn graph(&self) -> GraphSnapshot {
        self.merged_graph().0
    }

    /// Without `--model` the page draws no declared flows, and every observed edge that no agent
    /// judged declared shows as undeclared.
    fn declared(&self) -> DeclaredModel {
        self.model().map(DeclaredModel::from_model).unwrap_or_default()
    }

    fn hosts(&self) -> BTreeMap<String, Vec<String>> {
        self.hosts_by_graph_node()
    }
}
