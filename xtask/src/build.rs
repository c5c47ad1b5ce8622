//! Building bpf-linker, the eBPF object and the agent; running the tests.

use std::path::PathBuf;

/// Options of `cargo xtask build`.
#[derive(clap::Args, Debug, Clone)]
pub struct BuildOptions {
    /// Build the agent in debug mode (the eBPF object is always optimised).
    #[arg(long)]
    pub debug: bool,
}

/// Options of `cargo xtask test`.
#[derive(clap::Args, Debug, Clone)]
pub struct TestOptions {
    /// Extra arguments passed to `cargo test` (a filter, `--nocapture`).
    #[arg(trailing_var_arg = true)]
    pub cargo_args: Vec<String>,
}

/// Paths of what `build_all` produced.
pub struct Artifacts {
    /// The `driftwatch` binary with the eBPF object embedded.
    pub agent: PathBuf,
}

pub fn build_all(_options: &BuildOptions) -> anyhow::Result<Artifacts> {
    anyhow::bail!("not built yet")
}

pub fn test(_options: &TestOptions) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
