//! The driftwatch agent: kernel telemetry, process and socket state, the pipeline into the model
//! engine, the gRPC API and the live view in the browser.

pub mod api;
pub mod commands;
pub mod pipeline;
pub mod report;
pub mod state;
pub mod telemetry;
pub mod terminal;
pub mod view;
pub mod web;
