//! The driftwatch agent: kernel telemetry, process and socket state, the pipeline into the model
//! engine, the gRPC API, pushing to a collector, the collector itself, and the live view in the
//! browser.

pub mod api;
pub mod collector;
pub mod commands;
pub mod dns;
pub mod errors;
pub mod events;
pub mod fleet;
pub mod jsonl;
pub mod labels;
pub mod metrics;
pub mod pipeline;
pub mod reload;
pub mod report;
pub mod state;
pub mod telemetry;
pub mod terminal;
pub mod view;
pub mod web;
