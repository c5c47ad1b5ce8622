//! Embeds the eBPF object into the agent.
//!
//! The object comes from `DRIFTWATCH_BPF_OBJECT` (set by `cargo xtask build`) or, when that is
//! unset, from `target/bpf/driftwatch.bpf.o` in the workspace. Without either the agent still
//! compiles with an empty object, so a plain `cargo build` or `cargo check` keeps working, and
//! telemetry fails at start-up with a message naming `cargo xtask build`.

use std::env;
use std::fs;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DRIFTWATCH_BPF_OBJECT");
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let default_object = manifest_dir.join("../target/bpf/driftwatch.bpf.o");
    println!("cargo:rerun-if-changed={}", default_object.display());

    let source = match env::var_os("DRIFTWATCH_BPF_OBJECT") {
        Some(path) => {
            let path = PathBuf::from(path);
            if !path.is_file() {
                panic!(
                    "DRIFTWATCH_BPF_OBJECT={} does not exist; run `cargo xtask build`",
                    path.display()
                );
            }
            println!("cargo:rerun-if-changed={}", path.display());
            Some(path)
        }
        None => default_object.is_file().then_some(default_object),
    };

    let contents = match &source {
        Some(path) => fs::read(path)
            .unwrap_or_else(|error| panic!("failed to read {}: {error}", path.display())),
        None => {
            println!("cargo:warning=no eBPF object found; this agent cannot load its kernel programs (build with `cargo xtask build`)");
            Vec::new()
        }
    };

    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("driftwatch.bpf.o");
    // Rewriting identical bytes would bump the mtime and recompile the crate for nothing.
    if fs::read(&out).ok().as_deref() != Some(contents.as_slice()) {
        fs::write(&out, &contents)
            .unwrap_or_else(|error| panic!("failed to write {}: {error}", out.display()));
    }
}
