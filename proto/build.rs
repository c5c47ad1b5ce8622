//! Compiles the .proto files with protox, a protobuf compiler written in Rust, so that building
//! needs no system `protoc`.

use std::path::Path;

const PROTO_ROOT: &str = "proto";
const PROTOS: &[&str] = &["driftwatch/v1/agent.proto", "driftwatch/v1/collector.proto", "cri/runtime/v1/labels.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!(
            "cargo:rerun-if-changed={}",
            Path::new(PROTO_ROOT).join(proto).display()
        );
    }

    let descriptors = protox::compile(PROTOS, [PROTO_ROOT])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
