//! The declared threat model and its comparison with what a system does.
//!
//! This crate knows nothing of the kernel, gRPC or the command line. The agent feeds it
//! [`observation`]s built from kernel events; it resolves each process and endpoint to a component
//! of the declared model, folds flows into the observed graph and returns [`deviation::Deviation`]s.
//! The collector and CI mode reuse it unchanged, and benchmarks feed it recorded observations.

pub mod deviation;
pub mod engine;
pub mod error;
pub mod fleet;
pub mod graph;
pub mod import;
pub mod learn;
mod load;
pub mod model;
pub mod observation;
pub mod pattern;
mod recency;
pub mod severity;
mod validate;
pub mod workload;
mod yaml;

pub use engine::{Engine, EngineConfig, EngineStats};

/// A hash map for the tables the engine touches on every connection, with a hasher much faster
/// than the standard library's on short string keys, seeded per map.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub use error::{Location, ModelError, ModelErrorKind, ModelErrors};
pub use load::MODEL_VERSION;
pub use model::{
    Attribution, Component, Criticality, Direction, Exception, Flow, Listen, Model, Zone,
};
pub use validate::ModelWarning;
