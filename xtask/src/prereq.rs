//! Host tools that the demo and the tests run, installed from Debian's packages when missing.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

/// A program the demo or the tests run, and the Debian package that provides it.
struct Tool {
    program: &'static str,
    package: &'static str,
}

/// `ip` builds the test hosts (network namespaces, veth pairs); `bash` plays the intrusion.
const TOOLS: [Tool; 2] = [Tool { program: "ip", package: "iproute2" }, Tool { program: "bash", package: "bash" }];

/// The live view's test drives a headless chromium through chromedriver.
const BROWSER_TOOLS: [Tool; 2] =
    [Tool { program: "chromium", package: "chromium" }, Tool { program: "chromedriver", package: "chromium-driver" }];

/// Checks for the tools the demo runs; installs the missing ones with apt-get where it exists,
/// and otherwise fails naming each missing package.
pub fn ensure_tools() -> anyhow::Result<()> {
    ensure(&TOOLS.iter().collect::<Vec<_>>())
}

/// Like [`ensure_tools`], plus the browser that the tests of the live view drive.
pub fn ensure_test_tools() -> anyhow::Result<()> {
    ensure(&TOOLS.iter().chain(BROWSER_TOOLS.iter()).collect::<Vec<_>>())
}

fn ensure(tools: &[&Tool]) -> anyhow::Result<()> {
    let missing: Vec<&Tool> = tools.iter().copied().filter(|tool| find_in_path(tool.program).is_none()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let packages: Vec<&str> = missing.iter().map(|tool| tool.package).collect();
    if find_in_path("apt-get").is_none() {
        bail!("missing programs: {}; install the packages {} with your package manager", programs(&missing), packages.join(" "));
    }
    eprintln!("installing {} with apt-get (needed for {})", packages.join(" "), programs(&missing));
    let update = Command::new("apt-get").arg("update").status().context("failed to run apt-get update")?;
    if !update.success() {
        bail!("apt-get update failed ({update}); install {} by hand", packages.join(" "));
    }
    let install = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("failed to run apt-get install")?;
    if !install.success() {
        bail!("apt-get install {} failed ({install}); install it by hand", packages.join(" "));
    }
    Ok(())
}

fn programs(tools: &[&Tool]) -> String {
    tools.iter().map(|tool| tool.program).collect::<Vec<_>>().join(", ")
}

pub fn find_in_path(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([Path::new("/usr/sbin").to_path_buf(), Path::new("/sbin").to_path_buf()])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}
