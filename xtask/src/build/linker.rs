//! Finding bpf-linker, or building it against the Rust toolchain's own LLVM.
//!
//! The eBPF crate is compiled to LLVM bitcode by the installed stable rustc, so the linker must
//! read that LLVM's bitcode. Building bpf-linker against the `libLLVM` shipped in the toolchain's
//! sysroot guarantees the match and needs neither a nightly toolchain, `rust-src`, nor a system
//! LLVM.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use super::{cargo, run, rustc};

/// Version installed when no bpf-linker is found; 0.13 is the release verified with LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Returns a usable bpf-linker: `$DRIFTWATCH_BPF_LINKER`, then `bpf-linker` on `PATH`, then
/// `<target>/tools/bin/bpf-linker`; builds the last one when none exists.
pub fn ensure_bpf_linker(target_dir: &Path) -> anyhow::Result<PathBuf> {
    if let Some(path) = env::var_os("DRIFTWATCH_BPF_LINKER") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("DRIFTWATCH_BPF_LINKER={} does not exist", path.display());
        }
        return Ok(path);
    }
    if let Some(path) = find_on_path("bpf-linker") {
        return Ok(path);
    }
    let tools = target_dir.join("tools");
    let local = tools.join("bin").join("bpf-linker");
    if local.is_file() {
        return Ok(local);
    }
    install_bpf_linker(&tools)?;
    if !local.is_file() {
        bail!(
            "cargo install finished but {} does not exist",
            local.display()
        );
    }
    Ok(local)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|directory| directory.join(name))
        .find(|candidate| candidate.is_file())
}

fn install_bpf_linker(root: &Path) -> anyhow::Result<()> {
    let sysroot = command_output(Command::new(rustc()).args(["--print", "sysroot"]))
        .context("failed to find the Rust sysroot (is rustc installed?)")?;
    let sysroot_lib = PathBuf::from(sysroot.trim()).join("lib");
    let llvm_library = find_llvm_library(&sysroot_lib)?;
    let version = command_output(Command::new(rustc()).args(["--version", "--verbose"]))
        .context("failed to run `rustc --version --verbose`")?;
    let llvm_major = parse_llvm_major(&version)
        .context("`rustc --version --verbose` printed no \"LLVM version\" line")?;

    println!(
        "bpf-linker not found: building bpf-linker {BPF_LINKER_VERSION} against {} (LLVM {llvm_major}) into {}",
        sysroot_lib.join(format!("lib{llvm_library}.so")).display(),
        root.display()
    );
    let rustflags = format!(
        "-L {lib} -l dylib={llvm_library} -C link-arg=-Wl,-rpath,{lib}",
        lib = sysroot_lib.display()
    );
    let mut install = Command::new(cargo());
    install
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
        ])
        .arg("--features")
        .arg(format!("llvm-{llvm_major},no-llvm-linking"))
        .arg("--root")
        .arg(root)
        .env("RUSTFLAGS", rustflags)
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    run(&mut install).context("failed to build bpf-linker (needs crates.io and a C toolchain)")
}

/// Finds `libLLVM-<version>.so` in the sysroot and returns the name to link (`LLVM-<version>`).
fn find_llvm_library(sysroot_lib: &Path) -> anyhow::Result<String> {
    let entries = std::fs::read_dir(sysroot_lib)
        .with_context(|| format!("failed to list {}", sysroot_lib.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name
            .strip_prefix("libLLVM-")
            .and_then(|rest| rest.strip_suffix(".so"))
        {
            return Ok(format!("LLVM-{stem}"));
        }
    }
    bail!(
        "no libLLVM-*.so in {}: this Rust toolchain does not ship its LLVM as a shared library, \
         so bpf-linker cannot be built against it; install bpf-linker yourself and set \
         DRIFTWATCH_BPF_LINKER",
        sysroot_lib.display()
    )
}

fn parse_llvm_major(version_output: &str) -> Option<u32> {
    version_output
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|version| version.split('.').next())
        .and_then(|major| major.trim().parse().ok())
}

fn command_output(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .output()
        .with_context(|| format!("failed to start {:?}", command.get_program()))?;
    if !output.status.success() {
        bail!("{:?} failed with {}", command.get_program(), output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_read_from_rustc_verbose_version() {
        let output = "rustc 1.95.0 (59807616e 2026-04-14)\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.2\n";
        assert_eq!(parse_llvm_major(output), Some(22));
    }

    #[test]
    fn llvm_major_absent_without_llvm_line() {
        assert_eq!(parse_llvm_major("rustc 1.95.0\n"), None);
    }
}
