//! Many live processes at once, for the agent's memory with a large process table.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct SleepersArgs {
    /// Children to start.
    #[arg(long, default_value_t = 10_000)]
    pub count: u32,
    /// The children are killed once this file exists.
    #[arg(long)]
    pub until_file: PathBuf,
}

/// Forks `count` children that sleep until killed, prints `ready` on stdout, waits until
/// `until_file` exists, then kills and reaps every child.
pub fn run(args: &SleepersArgs) -> anyhow::Result<String> {
    let mut children = Vec::with_capacity(args.count as usize);
    for _ in 0..args.count {
        // SAFETY: the child calls only pause and _exit, both async-signal-safe.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            let error = std::io::Error::last_os_error();
            kill_all(&children);
            bail!("fork failed after {} children: {error}", children.len());
        }
        if pid == 0 {
            unsafe {
                loop {
                    libc::pause();
                }
            }
        }
        children.push(pid);
    }
    println!("ready");

    while !args.until_file.exists() {
        std::thread::sleep(Duration::from_millis(100));
    }
    kill_all(&children);
    Ok(json!({ "children": children.len() }).to_string())
}

fn kill_all(children: &[libc::pid_t]) {
    for &pid in children {
        // SAFETY: each pid is our own unreaped child, so it cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for &pid in children {
        let mut status = 0;
        // SAFETY: waitpid writes one int to a valid pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
}
