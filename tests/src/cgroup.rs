//! cgroup v2 directories for test workloads.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::{wait_until, Result};

/// Finds the cgroup v2 mount in /proc/self/mountinfo.
///
/// Hybrid hosts mount it at /sys/fs/cgroup/unified next to the v1 controllers, unified ones at
/// /sys/fs/cgroup, so the path is never assumed.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .context("failed to read /proc/self/mountinfo")?;
    for line in mountinfo.lines() {
        // Fields: id parent major:minor root mount-point options [optional...] - fstype source ...
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        if after.split_whitespace().next() == Some("cgroup2") {
            if let Some(mount_point) = before.split_whitespace().nth(4) {
                return Ok(PathBuf::from(mount_point));
            }
        }
    }
    bail!("no cgroup2 file system is mounted; mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`")
}

/// A cgroup v2 directory created for a test, removed on drop.
///
/// Drop kills nothing: the [`crate::ProcessGuard`]s kill the processes they started, and drop
/// then waits for the cgroup to empty before removing it. Call [`Cgroup::kill_remaining`] first
/// when a workload may have started children of its own.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    relative: String,
}

/// How long drop waits for the processes of a cgroup to exit before giving up on removing it.
const EMPTY_TIMEOUT: Duration = Duration::from_secs(5);

impl Cgroup {
    /// Creates `relative` (such as `/dw1a2b3`) under the cgroup2 mount; its parent must exist.
    pub fn create(relative: &str) -> Result<Cgroup> {
        let relative = format!("/{}", relative.trim_matches('/'));
        let path = cgroup2_mount()?.join(relative.trim_start_matches('/'));
        fs::create_dir(&path)
            .with_context(|| format!("failed to create cgroup {}", path.display()))?;
        Ok(Cgroup { path, relative })
    }

    /// Creates `relative` like [`Cgroup::create`], first removing a leftover directory of that
    /// name from an earlier run, provided no process is left in it.
    pub fn create_replacing_stale(relative: &str) -> Result<Cgroup> {
        let path = cgroup2_mount()?.join(relative.trim_matches('/'));
        if path.exists() {
            let mut pids = Vec::new();
            collect_pids(&path, &mut pids)?;
            if !pids.is_empty() {
                bail!(
                    "cgroup {} from an earlier run still holds pids {pids:?}; stop that run first",
                    path.display()
                );
            }
            remove_tree(&path)?;
        }
        Cgroup::create(relative)
    }

    /// Creates a child cgroup `name` inside this one.
    pub fn child(&self, name: &str) -> Result<Cgroup> {
        Cgroup::create(&format!("{}/{name}", self.relative))
    }

    /// Returns the directory under the cgroup2 mount, as `--scope-cgroup` expects it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the path relative to the cgroup2 mount, as /proc/PID/cgroup shows it and model selectors
    /// match it, such as `/dw1a2b3/web`.
    pub fn relative_path(&self) -> &str {
        &self.relative
    }

    /// Returns the pids in this cgroup and every cgroup below it.
    pub fn pids(&self) -> Result<Vec<u32>> {
        let mut pids = Vec::new();
        collect_pids(&self.path, &mut pids)?;
        Ok(pids)
    }

    /// Sends SIGKILL to every process still in this cgroup or below it and returns their pids.
    ///
    /// Only processes started into a cgroup that a test created can be there, so this ends only
    /// what the test started, directly or through its children.
    pub fn kill_remaining(&self) -> Result<Vec<u32>> {
        let pids = self.pids()?;
        for &pid in &pids {
            // SAFETY: kill has no memory-safety preconditions; a pid that already exited yields ESRCH.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        Ok(pids)
    }

    /// Waits until no process is left in this cgroup or below it.
    pub fn wait_empty(&self, timeout: Duration) -> Result<()> {
        let mut last = Vec::new();
        let emptied = wait_until(timeout, || match self.pids() {
            Ok(pids) if pids.is_empty() => Some(()),
            Ok(pids) => {
                last = pids;
                None
            }
            Err(_) => None,
        });
        emptied.with_context(|| {
            format!(
                "cgroup {} still holds pids {last:?} after {timeout:?}",
                self.path.display()
            )
        })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if !self.path.exists() {
            return;
        }
        if let Err(error) = self.wait_empty(EMPTY_TIMEOUT) {
            eprintln!("warning: not removing cgroup: {error:#}");
            return;
        }
        if let Err(error) = remove_tree(&self.path) {
            eprintln!(
                "warning: failed to remove cgroup {}: {error:#}",
                self.path.display()
            );
        }
    }
}

fn collect_pids(dir: &Path, pids: &mut Vec<u32>) -> Result<()> {
    let procs = match fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(procs) => procs,
        // A child cgroup removed while we walk is simply gone.
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(()),
        Err(error) => {
            return Err(error)
                .with_context(|| format!("failed to read {}/cgroup.procs", dir.display()))
        }
    };
    pids.extend(
        procs
            .lines()
            .filter_map(|line| line.trim().parse::<u32>().ok()),
    );
    for child in child_cgroups(dir)? {
        collect_pids(&child, pids)?;
    }
    Ok(())
}

fn child_cgroups(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => {
            return Err(error).with_context(|| format!("failed to list {}", dir.display()))
        }
    };
    let mut children = Vec::new();
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            children.push(entry.path());
        }
    }
    Ok(children)
}

/// Removes a cgroup and its children, deepest first: rmdir is the only way to delete a cgroup,
/// and it fails while the cgroup has children or processes.
fn remove_tree(dir: &Path) -> Result<()> {
    for child in child_cgroups(dir)? {
        remove_tree(&child)?;
    }
    match fs::remove_dir(dir) {
        Err(error) if error.kind() != ErrorKind::NotFound => {
            Err(error).with_context(|| format!("failed to remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}
