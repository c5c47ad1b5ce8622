//! The driftwatch.v1 gRPC API: the messages and the client and server traits that tonic generates
//! for `AgentService` (`proto/driftwatch/v1/agent.proto`), which agents and the collector serve,
//! and for `CollectorService` (`proto/driftwatch/v1/collector.proto`), which agents push to. Also
//! the subset of the Kubernetes CRI that the agent reads container and pod labels with
//! (`proto/cri/runtime/v1/labels.proto`).

/// Version 1 of the API, package `driftwatch.v1`.
#[allow(
    clippy::large_enum_variant,
    reason = "prost generates the oneof enums unboxed"
)]
pub mod v1 {
    tonic::include_proto!("driftwatch.v1");
}

/// The subset of the Kubernetes Container Runtime Interface, package `runtime.v1`, that the
/// agent's CRI label source calls and that tests serve from a fake runtime.
pub mod cri {
    tonic::include_proto!("runtime.v1");
}
