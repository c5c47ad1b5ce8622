//! The agent under test: `driftwatch agent` started on a model and a scope cgroup.

use std::fs::{self, File};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::{driftwatch_bin, wait_until, Result};

/// How long the agent may take to load and attach its programs and start serving.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long drop waits after SIGTERM before it sends SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `driftwatch agent`, serving its API on a free loopback port; drop stops it by pid.
///
/// The kernel detaches the agent's programs when its last descriptor to them closes, so even a
/// SIGKILL leaves no hook behind.
#[derive(Debug)]
pub struct AgentUnderTest {
    child: Child,
    api_addr: SocketAddr,
    log_path: PathBuf,
    // Holds the ready file and the log; removed on drop unless `keep_logs` was called.
    workdir: Option<tempfile::TempDir>,
}

impl AgentUnderTest {
    /// Starts `$DRIFTWATCH_BIN agent` on `model`, observing only processes under `scope_cgroup`
    /// (a directory under the cgroup2 mount), and waits until it is ready.
    pub fn start(model: &Path, scope_cgroup: &Path) -> Result<AgentUnderTest> {
        AgentUnderTest::start_with(&driftwatch_bin()?, model, scope_cgroup, &[])
    }

    /// Starts `bin agent` with `extra_args` appended and waits until it writes its ready file.
    ///
    /// Fails when the agent exits first or is not ready within a minute, with its log in the error.
    pub fn start_with(
        bin: &Path,
        model: &Path,
        scope_cgroup: &Path,
        extra_args: &[&str],
    ) -> Result<AgentUnderTest> {
        let workdir = tempfile::Builder::new()
            .prefix("driftwatch-agent-")
            .tempdir()?;
        let ready_file = workdir.path().join("ready");
        let log_path = workdir.path().join("agent.log");
        let log = File::create(&log_path)?;

        let mut command = Command::new(bin);
        command
            .arg("agent")
            .arg("--model")
            .arg(model)
            .args(["--api", "127.0.0.1:0"])
            .arg("--ready-file")
            .arg(&ready_file)
            .arg("--scope-cgroup")
            .arg(scope_cgroup)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // A terminal's Ctrl-C then reaches only the caller, which stops the agent in order.
            .process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("failed to start {}", bin.display()))?;
        let mut agent = AgentUnderTest {
            child,
            api_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log_path,
            workdir: Some(workdir),
        };

        let mut exited = None;
        let ready = wait_until(READY_TIMEOUT, || {
            if let Ok(Some(status)) = agent.child.try_wait() {
                exited = Some(status);
                return Some(None);
            }
            // The agent writes the whole line at once; a line without its newline is not done yet.
            let contents = fs::read_to_string(&ready_file).ok()?;
            contents
                .ends_with('\n')
                .then(|| Some(contents.trim().to_string()))
        });
        let address = match (ready, exited) {
            (Some(Some(address)), _) => address,
            (_, Some(status)) => anyhow::bail!(
                "the agent exited with {status} before it was ready; its log:\n{}",
                agent.log()
            ),
            _ => anyhow::bail!(
                "the agent did not write {} within {READY_TIMEOUT:?}; its log:\n{}",
                ready_file.display(),
                agent.log()
            ),
        };
        agent.api_addr = address
            .parse()
            .with_context(|| format!("the ready file holds {address:?}, not an API address"))?;
        Ok(agent)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns the loopback address the API listens on.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// Returns the API address as `driftwatch watch --api` takes it.
    pub fn api_arg(&self) -> String {
        self.api_addr.to_string()
    }

    /// Returns the agent's stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path)
            .unwrap_or_else(|error| format!("(log unreadable: {error})"))
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Keeps the log after the agent stops, for a demo that points the user at it.
    pub fn keep_logs(&mut self) -> PathBuf {
        if let Some(workdir) = self.workdir.take() {
            let _ = workdir.keep();
        }
        self.log_path.clone()
    }

    /// Stops the agent: SIGTERM to its pid, then SIGKILL if it has not exited within ten seconds.
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child, so it
        // cannot have been reused.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let exited = wait_until(STOP_TIMEOUT, || self.child.try_wait().ok().flatten());
        if exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for AgentUnderTest {
    fn drop(&mut self) {
        self.stop();
    }
}
