//! Starting a program inside a test host's network namespace and a cgroup.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::{Cgroup, NetNs, Result};

/// How long [`ProcessGuard::wait_exit`] waits for output still in the pipes after the exit.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts `command` with its stdout and stderr captured, inside `netns` and `cgroup` when given.
///
/// The child joins the cgroup and the namespace between fork and exec, then runs the program
/// directly. Going through `ip netns exec` instead would add an exec of `ip` inside the cgroup,
/// which the agent would report as a program of the component. The child also gets a process
/// group of its own, so a Ctrl-C in the terminal reaches only the caller, which then cleans up.
pub fn spawn_in(
    netns: Option<&NetNs>,
    cgroup: Option<&Cgroup>,
    mut command: Command,
) -> Result<ProcessGuard> {
    // Opened before fork because the child may only make async-signal-safe calls; std opens
    // both with O_CLOEXEC, so the program never inherits them.
    let netns_file = netns
        .map(|netns| {
            File::open(netns.path())
                .with_context(|| format!("failed to open {}", netns.path().display()))
        })
        .transpose()?;
    let procs_file = cgroup
        .map(|cgroup| {
            let procs = cgroup.path().join("cgroup.procs");
            OpenOptions::new()
                .write(true)
                .open(&procs)
                .with_context(|| format!("failed to open {}", procs.display()))
        })
        .transpose()?;

    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: the closure runs in the forked child, where only async-signal-safe calls are allowed.
    // It calls write(2) and setns(2) on descriptors opened before the fork and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if let Some(procs) = &procs_file {
                // "0" moves the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(netns) = &netns_file {
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }

    let description = format!("{command:?}");
    let mut child = command
        .spawn()
        .with_context(|| format!("failed to start {description}"))?;
    let output = Arc::new(Captured::default());
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let stdout_reader = {
        let output = Arc::clone(&output);
        thread::spawn(move || output.read_lines(stdout, Stream::Stdout))
    };
    let stderr_reader = {
        let output = Arc::clone(&output);
        thread::spawn(move || output.read_lines(stderr, Stream::Stderr))
    };
    Ok(ProcessGuard {
        pid: child.id(),
        child,
        description,
        output,
        readers: vec![stdout_reader, stderr_reader],
        status: None,
    })
}

/// A process started by [`spawn_in`]; drop sends SIGKILL to its pid if it still runs.
#[derive(Debug)]
pub struct ProcessGuard {
    pid: u32,
    child: Child,
    description: String,
    output: Arc<Captured>,
    readers: Vec<thread::JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl ProcessGuard {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Stdout lines so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.output
            .state
            .lock()
            .expect("capture lock")
            .stdout
            .clone()
    }

    /// Stderr so far.
    pub fn stderr(&self) -> String {
        self.output
            .state
            .lock()
            .expect("capture lock")
            .stderr
            .clone()
    }

    /// Waits for a stdout line that satisfies `accept`, such as a server's `listening ...` line.
    ///
    /// Fails when `timeout` passes or the process closes stdout first, with everything it printed.
    pub fn wait_for_line(
        &self,
        timeout: Duration,
        accept: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.output.state.lock().expect("capture lock");
        loop {
            if let Some(line) = state.stdout.iter().find(|line| accept(line)) {
                return Ok(line.clone());
            }
            let now = Instant::now();
            if state.stdout_closed || now >= deadline {
                let reason = if state.stdout_closed {
                    "closed stdout"
                } else {
                    "timed out"
                };
                anyhow::bail!(
                    "{} (pid {}) {reason} before printing the expected line\nstdout:\n{}\nstderr:\n{}",
                    self.description,
                    self.pid,
                    state.stdout.join("\n"),
                    state.stderr
                );
            }
            state = self
                .output
                .changed
                .wait_timeout(state, deadline - now)
                .expect("capture lock")
                .0;
        }
    }

    /// Waits for the process to exit and for its output to be read to the end.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let mut error = None;
        let status = crate::wait_until(timeout, || match self.child.try_wait() {
            Ok(status) => status,
            Err(wait_error) => {
                error = Some(wait_error);
                Some(ExitStatus::default())
            }
        });
        if let Some(error) = error {
            return Err(error).with_context(|| format!("failed to wait for pid {}", self.pid));
        }
        let status = status.with_context(|| {
            format!(
                "{} (pid {}) still runs after {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                self.description,
                self.pid,
                self.stdout_lines().join("\n"),
                self.stderr()
            )
        })?;
        self.status = Some(status);
        // The pipes close at exit unless a child of the process still has them open, as a
        // background job does, so wait for the rest of the output, but not forever.
        crate::wait_until(OUTPUT_DRAIN_TIMEOUT, || {
            self.readers
                .iter()
                .all(|reader| reader.is_finished())
                .then_some(())
        });
        for reader in std::mem::take(&mut self.readers) {
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
        Ok(status)
    }

    /// Waits for a successful exit and returns the stdout lines; fails with the output otherwise.
    pub fn wait_success(&mut self, timeout: Duration) -> Result<Vec<String>> {
        let status = self.wait_exit(timeout)?;
        let stdout = self.stdout_lines();
        anyhow::ensure!(
            status.success(),
            "{} (pid {}) failed with {status}\nstdout:\n{}\nstderr:\n{}",
            self.description,
            self.pid,
            stdout.join("\n"),
            self.stderr()
        );
        Ok(stdout)
    }

    /// Sends SIGKILL to the pid if the process has not been reaped yet, then reaps it.
    pub fn kill(&mut self) {
        if self.status.is_some() {
            return;
        }
        if let Ok(Some(status)) = self.child.try_wait() {
            self.status = Some(status);
            return;
        }
        // Child::kill signals this child's pid only, never a group or a name.
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Default)]
struct Captured {
    state: Mutex<CapturedState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct CapturedState {
    stdout: Vec<String>,
    stdout_closed: bool,
    stderr: String,
}

impl Captured {
    fn read_lines(&self, pipe: impl Read, stream: Stream) {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let mut state = self.state.lock().expect("capture lock");
            match stream {
                Stream::Stdout => state.stdout.push(line),
                Stream::Stderr => {
                    state.stderr.push_str(&line);
                    state.stderr.push('\n');
                }
            }
            self.changed.notify_all();
        }
        if let Stream::Stdout = stream {
            self.state.lock().expect("capture lock").stdout_closed = true;
            self.changed.notify_all();
        }
    }
}
