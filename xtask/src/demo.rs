//! `cargo xtask demo`: a three-tier system in network namespaces, watched by the agent.

/// Options of `cargo xtask demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoOptions {}

pub fn run(_options: &DemoOptions) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
