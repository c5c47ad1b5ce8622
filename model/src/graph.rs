//! The observed-communication graph.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::observation::Protocol;

/// How a graph node came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    /// A component declared in the model.
    Declared,
    /// Processes that match no declared component, grouped by executable.
    Discovered,
    /// A remote endpoint, by zone or by address.
    External,
}

/// A point-in-time copy of the graph, for the API, `driftwatch graph` and recordings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GraphSnapshot {
    pub nodes: Vec<NodeSnapshot>,
    pub edges: Vec<EdgeSnapshot>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSnapshot {
    /// Component id, `unknown:<exe>` for a discovered node, or a zone id or address for an external one.
    pub id: String,
    pub kind: NodeKind,
    pub zone: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeSnapshot {
    pub source: String,
    pub destination: String,
    pub protocol: Protocol,
    /// Server port.
    pub port: u16,
    /// True when a declared flow allows this edge.
    pub declared: bool,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    /// Connections observed on this edge.
    pub connections: u64,
    /// A few processes that used the edge, as (pid, executable).
    pub examples: Vec<(u32, String)>,
}
