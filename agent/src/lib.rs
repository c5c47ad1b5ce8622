//! The driftwatch agent: kernel telemetry, process and socket state, the pipeline into the model
//! engine, and the gRPC API.

pub mod telemetry;
