//! Building the kernel programs into one BPF object.
//!
//! A stable toolchain cannot build `core` for `bpfel-unknown-none` (that needs `rust-src` and
//! `-Z build-std`), so the eBPF crate is compiled for the host target as a staticlib of LLVM
//! bitcode (`-C linker-plugin-lto` on every crate) and bpf-linker retargets the bitcode to BPF.
//! The bitcode build uses its own target directory so its RUSTFLAGS do not invalidate the
//! userspace build.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use super::{cargo, host_triple, run};

/// Builds `agent-ebpf` and links it into `<target>/bpf/driftwatch.bpf.o`; returns that path.
pub fn build_object(root: &Path, target_dir: &Path, linker: &Path) -> anyhow::Result<PathBuf> {
    let host = host_triple()?;
    let bitcode_dir = target_dir.join("ebpf");
    println!("building the eBPF crate (bitcode for {host})");
    let mut compile = Command::new(cargo());
    compile
        .current_dir(root.join("agent-ebpf"))
        .args(["build", "--release", "--target", &host, "--target-dir"])
        .arg(&bitcode_dir)
        .env("RUSTFLAGS", "-C linker-plugin-lto -C debuginfo=2")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTC_WRAPPER");
    run(&mut compile).context("failed to compile the eBPF crate")?;

    let archive = bitcode_dir
        .join(&host)
        .join("release")
        .join("libagent_ebpf.a");
    let out_dir = target_dir.join("bpf");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("failed to create {}", out_dir.display()))?;
    let object = out_dir.join("driftwatch.bpf.o");
    let fresh = out_dir.join("driftwatch.bpf.o.new");
    let exports: Vec<&str> = agent_common::export_names().collect();
    println!(
        "linking {} with {} ({} exported symbols)",
        object.display(),
        linker.display(),
        exports.len()
    );
    let mut link = Command::new(linker);
    link.args(["--target", "bpfel", "--btf", "--export"])
        .arg(exports.join(","))
        .arg("-o")
        .arg(&fresh)
        .arg(&archive);
    run(&mut link).context("failed to link the eBPF object")?;

    // The agent's build script watches the object, so an unchanged object keeps its mtime and the
    // agent is not recompiled.
    let unchanged = std::fs::read(&object).ok() == Some(std::fs::read(&fresh)?);
    if unchanged {
        std::fs::remove_file(&fresh)?;
    } else {
        std::fs::rename(&fresh, &object)
            .with_context(|| format!("failed to move the object to {}", object.display()))?;
    }
    Ok(object)
}
