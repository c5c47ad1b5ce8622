//! The driftwatch.v1 gRPC API: the messages and the client and server traits that tonic generates
//! for `AgentService` (`proto/driftwatch/v1/agent.proto`), which agents and the collector serve,
//! and for `CollectorService` (`proto/driftwatch/v1/collector.proto`), which agents push to.

/// Version 1 of the API, package `driftwatch.v1`.
#[allow(
    clippy::large_enum_variant,
    reason = "prost generates the oneof enums unboxed"
)]
pub mod v1 {
    tonic::include_proto!("driftwatch.v1");
}
