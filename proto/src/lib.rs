//! The driftwatch.v1 gRPC API.
