//! The agent's status as the API serves it, in plain Rust so that the pipeline fills it in without
//! knowing the protobuf types.

use std::path::PathBuf;
use std::time::SystemTime;

/// The agent's status for `GetStatus`, without the counters the API adds about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSnapshot {
    /// Agent version, such as `0.1.0`.
    pub version: String,
    pub started_at: SystemTime,
    /// Every kernel hook the agent tried to attach, attached or not.
    pub hooks: Vec<HookStatus>,
    /// Pipeline counters as (name, value), in the order the client should print them.
    pub counters: Vec<(String, u64)>,
    /// The model in force, `None` when none is loaded.
    pub model: Option<ModelInfo>,
}

/// The load and attach result of one kernel hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookStatus {
    /// Hook name, such as `sched_process_exec`.
    pub name: String,
    pub attached: bool,
    /// Reason the hook is not attached, `None` when it is.
    pub error: Option<String>,
}

/// The declared model in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// Path of the model file.
    pub path: PathBuf,
    pub loaded_at: SystemTime,
    pub zones: usize,
    pub components: usize,
    pub flows: usize,
}

/// A collector's view of one node that pushes to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub name: String,
    /// True while the node's push stream is open.
    pub connected: bool,
    /// Agent sequence of the latest deviation accepted from the node's current run.
    pub acknowledged_sequence: u64,
    /// Deviations accepted from the node over every run.
    pub received: u64,
    /// Deviations sent again after a reconnect and dropped.
    pub duplicates: u64,
    /// Deviations the node lost before pushing them.
    pub lost: u64,
    /// When the node's stream last opened, `None` before the first since the collector started.
    pub connected_at: Option<SystemTime>,
    /// Agent version the node reported.
    pub version: String,
}
