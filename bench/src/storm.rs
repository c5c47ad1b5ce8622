//! The two storms whose wall time the overhead comparison measures.
//!
//! Both run their operations one after the other from one small process, so the time is the
//! kernel's fork, exec and TCP paths plus whatever the observers add, not a shell's own cost.

use std::ffi::CString;
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct ExecStormArgs {
    /// Fork and exec operations to run.
    #[arg(long, default_value_t = 20_000)]
    pub count: u64,
    /// Program to exec, with no arguments.
    #[arg(long, default_value = "/bin/true")]
    pub program: String,
}

#[derive(clap::Args, Debug)]
pub struct ConnectStormArgs {
    /// Connections to open, accept and close.
    #[arg(long, default_value_t = 50_000)]
    pub count: u64,
}

/// Runs `count` fork + execve + waitpid cycles and returns the elapsed time as JSON.
pub fn exec_storm(args: &ExecStormArgs) -> anyhow::Result<String> {
    let program = CString::new(args.program.as_str()).context("--program contains a NUL byte")?;
    let argv = [program.as_ptr(), std::ptr::null()];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];

    let started = Instant::now();
    for done in 0..args.count {
        // SAFETY: the child calls only execve and _exit, both async-signal-safe, on pointers
        // prepared before the fork.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            bail!("fork failed after {done} execs: {}", std::io::Error::last_os_error());
        }
        if pid == 0 {
            unsafe {
                libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
        }
        let mut status = 0;
        // SAFETY: waitpid writes one int to a valid pointer.
        if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
            bail!("waitpid failed: {}", std::io::Error::last_os_error());
        }
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            bail!("{} exited with wait status {status} (is it executable?)", args.program);
        }
    }
    let elapsed = started.elapsed();
    Ok(json!({ "count": args.count, "elapsed_ns": elapsed.as_nanos() as u64 }).to_string())
}

/// Runs `count` connect/accept/close cycles on 127.0.0.1 and returns the elapsed time as JSON.
///
/// The server closes first and the client waits for that end of file, so every connection is
/// fully opened and closed before the next starts. The TIME_WAIT sockets then sit on the server
/// side, where they do not hold the client's ephemeral ports.
pub fn connect_storm(args: &ConnectStormArgs) -> anyhow::Result<String> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("failed to listen on 127.0.0.1")?;
    let address = listener.local_addr()?;
    let count = args.count;
    let acceptor = std::thread::spawn(move || -> std::io::Result<()> {
        for _ in 0..count {
            let (stream, _) = listener.accept()?;
            drop(stream);
        }
        Ok(())
    });

    let started = Instant::now();
    let mut byte = [0u8; 1];
    for done in 0..count {
        let mut stream = TcpStream::connect(address)
            .with_context(|| format!("connect to {address} failed after {done} connections"))?;
        let read = stream.read(&mut byte).context("failed to read the server's close")?;
        if read != 0 {
            bail!("the server sent data instead of closing");
        }
    }
    let elapsed = started.elapsed();
    acceptor
        .join()
        .map_err(|_| anyhow::anyhow!("the acceptor thread panicked"))?
        .context("accept failed")?;
    Ok(json!({ "count": count, "elapsed_ns": elapsed.as_nanos() as u64 }).to_string())
}
