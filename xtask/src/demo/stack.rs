//! Everything the demo runs: the demo system from the test harness, and `driftwatch watch`
//! printing its deviations to the terminal, stopped first on drop.

use std::ops::{Deref, DerefMut};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};

use anyhow::Context;
pub use driftwatch_e2e::demo::ADDRESSES;
use driftwatch_e2e::demo::DemoSystem;

/// The cgroup the agent observes; the model's component selectors name its children.
pub const DEMO_CGROUP: &str = "/driftwatch-demo";

/// The running demo. Fields drop in declaration order, so `driftwatch watch` stops before the
/// agent it reads from.
pub struct DemoStack {
    watch: Option<WatchGuard>,
    system: DemoSystem,
}

impl DemoStack {
    /// Starts the demo system on `model` and `driftwatch watch` on its agent.
    ///
    /// On error, everything created so far is removed again as the locals drop.
    pub fn start(agent_bin: &Path, service_bin: &Path, model: &Path) -> anyhow::Result<DemoStack> {
        let system = DemoSystem::start(agent_bin, service_bin, model, DEMO_CGROUP, "", &[])?;
        let watch = WatchGuard::start(agent_bin, &system.agent.api_arg())?;
        Ok(DemoStack {
            watch: Some(watch),
            system,
        })
    }

    /// Describes what dropping the stack removes; call it before the drop.
    pub fn cleanup_summary(&self) -> String {
        format!(
            "{}; stopped `driftwatch watch`",
            self.system.cleanup_summary()
        )
    }
}

impl Deref for DemoStack {
    type Target = DemoSystem;

    fn deref(&self) -> &DemoSystem {
        &self.system
    }
}

impl DerefMut for DemoStack {
    fn deref_mut(&mut self) -> &mut DemoSystem {
        &mut self.system
    }
}

impl Drop for DemoStack {
    fn drop(&mut self) {
        self.watch.take();
    }
}

/// `driftwatch watch` printing to the terminal; drop stops it by pid.
struct WatchGuard(Child);

impl WatchGuard {
    fn start(bin: &Path, api: &str) -> anyhow::Result<WatchGuard> {
        let child = Command::new(bin)
            .args(["watch", "--api", api, "--replay"])
            // Ctrl-C goes to the demo alone, which then stops this in order.
            .process_group(0)
            .spawn()
            .with_context(|| format!("failed to start {} watch", bin.display()))?;
        Ok(WatchGuard(child))
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
