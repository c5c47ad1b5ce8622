//! The driftwatch agent: kernel telemetry, process and socket state, the pipeline into the model
//! engine, and the gRPC API.

pub mod api;
pub mod commands;
pub mod pipeline;
pub mod reload;
pub mod report;
pub mod state;
pub mod telemetry;
pub mod terminal;
pub mod view;
