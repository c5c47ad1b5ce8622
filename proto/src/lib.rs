//! The driftwatch.v1 gRPC API: the messages, the `AgentService` client and server traits that
//! tonic generates from `proto/driftwatch/v1/agent.proto`.

/// Version 1 of the API, package `driftwatch.v1`.
#[allow(
    clippy::large_enum_variant,
    reason = "prost generates the oneof enums unboxed"
)]
pub mod v1 {
    tonic::include_proto!("driftwatch.v1");
}
