//! Building bpf-linker, the eBPF object and the agent; running the tests.

mod ebpf;
mod linker;

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};

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
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub cargo_args: Vec<String>,
}

/// Paths of what `build_all` produced.
pub struct Artifacts {
    /// The `driftwatch` binary with the eBPF object embedded.
    pub agent: PathBuf,
}

/// Builds (or finds) bpf-linker, the eBPF object, then the agent with the object embedded.
pub fn build_all(options: &BuildOptions) -> anyhow::Result<Artifacts> {
    let started = Instant::now();
    let root = workspace_root();
    let target_dir = target_dir(&root);

    let linker = linker::ensure_bpf_linker(&target_dir)?;
    let object = ebpf::build_object(&root, &target_dir, &linker)?;

    let profile = if options.debug { "debug" } else { "release" };
    println!(
        "building the agent ({profile}) with {} embedded",
        object.display()
    );
    let mut agent_build = Command::new(cargo());
    agent_build
        .current_dir(&root)
        .args(["build", "-p", "driftwatch"]);
    if !options.debug {
        agent_build.arg("--release");
    }
    agent_build.env("DRIFTWATCH_BPF_OBJECT", &object);
    run(&mut agent_build).context("failed to build the agent")?;

    let agent = target_dir.join(profile).join("driftwatch");
    if !agent.is_file() {
        bail!(
            "the agent build succeeded but {} does not exist",
            agent.display()
        );
    }
    println!(
        "built {} in {:.1} s",
        agent.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(Artifacts { agent })
}

/// Builds everything, then runs `cargo test --workspace --release` with `DRIFTWATCH_BIN` set.
pub fn test(options: &TestOptions) -> anyhow::Result<()> {
    require_root("the tests load eBPF programs and create cgroups and network namespaces")?;
    crate::prereq::ensure_test_tools()?;
    let artifacts = build_all(&BuildOptions { debug: false })?;
    // Built here too so that `cargo xtask test --test NAME`, which builds one target only, finds it.
    let demo_service = crate::demo::build_demo_service()?;
    let root = workspace_root();
    let object = target_dir(&root).join("bpf").join("driftwatch.bpf.o");

    let mut cargo_test = Command::new(cargo());
    cargo_test
        .current_dir(&root)
        .args(["test", "--workspace", "--release"])
        .args(&options.cargo_args)
        .env("DRIFTWATCH_BIN", &artifacts.agent)
        .env("DRIFTWATCH_DEMO_BIN", &demo_service)
        // The same value as the agent build, so the test build reuses it instead of recompiling.
        .env("DRIFTWATCH_BPF_OBJECT", &object);
    run(&mut cargo_test).context("tests failed")
}

/// Fails unless the effective user is root, naming what needs it.
pub fn require_root(why: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!("this command needs root because {why} (effective uid is {euid}); run it with sudo");
    }
    Ok(())
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

pub fn target_dir(root: &Path) -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

pub fn cargo() -> PathBuf {
    env::var_os("CARGO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("cargo"))
}

fn rustc() -> PathBuf {
    env::var_os("RUSTC")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("rustc"))
}

/// Target triple of the host, from `rustc --version --verbose`.
fn host_triple() -> anyhow::Result<String> {
    let output = Command::new(rustc())
        .args(["--version", "--verbose"])
        .output()
        .context("failed to run rustc (is a Rust toolchain installed?)")?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .map(str::to_string)
        .context("`rustc --version --verbose` printed no host line")
}

/// Runs `command` with inherited output; fails on a non-zero exit.
fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("failed to start {:?}", command.get_program()))?;
    if !status.success() {
        bail!("{:?} exited with {status}", command.get_program());
    }
    Ok(())
}
