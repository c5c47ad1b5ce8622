//! The `driftwatch` subcommands, one module each; `main.rs` only parses and dispatches.

pub mod agent;
pub mod check;
pub mod collector;
pub mod diff;
pub mod graph;
pub mod model;
pub mod reload;
pub mod status;
pub mod watch;
mod watch_events;
mod watch_filter;
