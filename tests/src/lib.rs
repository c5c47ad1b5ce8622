//! Test hosts for the end-to-end tests and the demo: network namespaces joined by a router,
//! cgroup v2 directories, processes started inside both, the agent under test and a client of its
//! deviation stream, and a WebDriver client for the browser tests.
//!
//! Everything here needs root. Each helper owns what it creates and removes it on drop, so a failing
//! test leaves no namespace, cgroup or process behind. Names carry a per-run suffix from
//! [`unique_suffix`], so concurrent tests and leftovers of a crashed run do not collide.
//!
//! Waiting is always on a condition with a deadline ([`wait_until`]), never a fixed sleep.

pub mod agent;
pub mod cgroup;
pub mod collector;
pub mod demo;
pub mod netns;
pub mod pki;
pub mod process;
pub mod stream;
pub mod webdriver;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use agent::AgentUnderTest;
pub use cgroup::{cgroup2_mount, Cgroup};
pub use collector::CollectorUnderTest;
pub use netns::{Host, NetNs, Topology};
pub use process::{spawn_in, ProcessGuard};
pub use stream::{graph, DeviationWatcher, EventEntry};
pub use webdriver::WebDriver;

pub type Result<T, E = anyhow::Error> = std::result::Result<T, E>;

/// Checks that the process runs as root, which namespaces, cgroups and the agent all need.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    anyhow::ensure!(
        euid == 0,
        "these tests create network namespaces and cgroups and load eBPF programs, which needs \
         root (effective uid is {euid}); run them with `sudo -E cargo xtask test`"
    );
    Ok(())
}

/// Returns the `driftwatch` binary named by `DRIFTWATCH_BIN`, which `cargo xtask test` sets after
/// building the agent with its eBPF object.
pub fn driftwatch_bin() -> Result<PathBuf> {
    let path = std::env::var_os("DRIFTWATCH_BIN")
        .map(PathBuf::from)
        .ok_or_else(|| {
            anyhow::anyhow!(
            "DRIFTWATCH_BIN is not set: run the end-to-end tests with `cargo xtask test`, which \
             builds the agent with its eBPF object and sets it"
        )
        })?;
    anyhow::ensure!(
        path.is_file(),
        "DRIFTWATCH_BIN={} does not exist",
        path.display()
    );
    Ok(path)
}

/// Returns the `driftwatch-demo-service` binary: `DRIFTWATCH_DEMO_BIN` when set, else the one
/// cargo built into the same profile directory as the running test executable.
pub fn demo_service_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("DRIFTWATCH_DEMO_BIN") {
        return Ok(PathBuf::from(path));
    }
    // Test executables live in target/<profile>/deps, binaries in target/<profile>.
    let exe = std::env::current_exe()?;
    let candidate = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("driftwatch-demo-service"));
    match candidate {
        Some(path) if path.is_file() => Ok(path),
        _ => anyhow::bail!(
            "driftwatch-demo-service not found next to {}: build it with \
             `cargo build -p driftwatch-demo` in the same profile, or set DRIFTWATCH_DEMO_BIN",
            exe.display()
        ),
    }
}

/// Returns a short lowercase hex suffix, different for every call in this process and, with high
/// probability, from any earlier run: it mixes the pid, the clock and a counter.
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mixed = std::process::id().wrapping_mul(2_654_435_761) ^ nanos ^ count.wrapping_mul(40_503);
    // Five hex digits keep names such as "dw1a2b3-client" within the 15 bytes of an interface name.
    format!("{:05x}", mixed & 0xf_ffff)
}

/// Calls `probe` every few milliseconds until it returns `Some` or `timeout` passes.
///
/// Returns `None` on timeout, because only the caller has what a useful error message needs.
pub fn wait_until<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut interval = Duration::from_millis(5);
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(interval);
        interval = (interval * 2).min(Duration::from_millis(100));
    }
}
