//! The collector under test: `driftwatch collector` on a loopback port with a data directory.

use std::fs::{self, File};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::{driftwatch_bin, wait_until, Result};

/// How long the collector may take to read its journal and start serving.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `driftwatch collector`; drop kills it by pid. Its data directory and log live in a
/// temporary directory that outlives restarts and is removed on drop.
#[derive(Debug)]
pub struct CollectorUnderTest {
    child: Option<Child>,
    addr: SocketAddr,
    workdir: tempfile::TempDir,
    starts: u32,
    /// Arguments added to every start, such as the TLS flags.
    extra_args: Vec<String>,
}

impl CollectorUnderTest {
    /// Starts a collector on a free loopback port and waits until it serves.
    pub fn start() -> Result<CollectorUnderTest> {
        CollectorUnderTest::start_with(&[])
    }

    /// Like [`Self::start`], with `extra_args` after the collector's own on every start.
    pub fn start_with(extra_args: &[&str]) -> Result<CollectorUnderTest> {
        let workdir = tempfile::Builder::new().prefix("driftwatch-collector-").tempdir()?;
        let mut collector = CollectorUnderTest {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            workdir,
            starts: 0,
            extra_args: extra_args.iter().map(|arg| arg.to_string()).collect(),
        };
        collector.launch("127.0.0.1:0")?;
        Ok(collector)
    }

    /// Starts the collector again on the same address and data directory, after [`Self::kill`].
    pub fn restart(&mut self) -> Result<()> {
        anyhow::ensure!(self.child.is_none(), "the collector still runs; kill it first");
        self.launch(&self.addr.to_string())
    }

    fn launch(&mut self, listen: &str) -> Result<()> {
        let bin = driftwatch_bin()?;
        self.starts += 1;
        let ready_file = self.workdir.path().join(format!("ready-{}", self.starts));
        let log = File::create(self.log_path())?;
        let child = Command::new(&bin)
            .arg("collector")
            .args(["--listen", listen])
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--ready-file")
            .arg(&ready_file)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("failed to start {}", bin.display()))?;
        self.child = Some(child);

        let mut exited = None;
        let address = wait_until(READY_TIMEOUT, || {
            if let Some(status) = self.child.as_mut().and_then(|child| child.try_wait().ok().flatten()) {
                exited = Some(status);
                return Some(None);
            }
            let contents = fs::read_to_string(&ready_file).ok()?;
            contents.ends_with('\n').then(|| Some(contents.trim().to_string()))
        });
        let address = match (address, exited) {
            (Some(Some(address)), _) => address,
            (_, Some(status)) => {
                self.child = None;
                anyhow::bail!("the collector exited with {status} before it was ready; its log:\n{}", self.log())
            }
            _ => anyhow::bail!("the collector was not ready within {READY_TIMEOUT:?}; its log:\n{}", self.log()),
        };
        self.addr = address
            .parse()
            .with_context(|| format!("the ready file holds {address:?}, not an address"))?;
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn data_dir(&self) -> PathBuf {
        self.workdir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.workdir.path().join("collector.log")
    }

    /// Returns the log of every run so far (each run truncates it, so the latest run).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_else(|error| format!("(log unreadable: {error})"))
    }

    /// Sends SIGKILL to the collector's pid and reaps it, as a crash would end it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }
}

impl Drop for CollectorUnderTest {
    fn drop(&mut self) {
        self.kill();
    }
}
