//! Shared pieces of the kernel telemetry tests: a cgroup per test, the telemetry started with
//! that cgroup as its scope, a recorder of decoded events, and forked workloads that make only raw
//! system calls (the test process has other threads).

#![allow(dead_code)]

use std::ffi::CString;
use std::fs;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use driftwatch::telemetry::event::{Event, TcpEvent};
use driftwatch::telemetry::{cgroup2_mount, TcpHook, Telemetry, TelemetryConfig};
use tokio::sync::mpsc;
/// How long to wait for one expected event.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A cgroup v2 directory for one test, removed on drop.
pub struct TestCgroup {
    pub path: PathBuf,
    pub procs: CString,
    pub id: u64,
}

impl TestCgroup {
    pub fn create(name: &str) -> Self {
        let mount = cgroup2_mount().expect("a cgroup2 mount is required");
        let path = mount.join(format!("driftwatch-e2e-{name}-{}", std::process::id()));
        fs::create_dir(&path)
            .unwrap_or_else(|error| panic!("failed to create {}: {error}", path.display()));
        let id = fs::metadata(&path).unwrap().ino();
        let procs = CString::new(
            path.join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        Self { path, procs, id }
    }
}

impl TestCgroup {
    /// Creates cgroup `name` below this one; drop it before its parent.
    pub fn child(&self, name: &str) -> Self {
        let path = self.path.join(name);
        fs::create_dir(&path)
            .unwrap_or_else(|error| panic!("failed to create {}: {error}", path.display()));
        let id = fs::metadata(&path).unwrap().ino();
        let procs = CString::new(
            path.join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        Self { path, procs, id }
    }
}

/// Nested cgroups, removed innermost first on drop.
pub struct NestedCgroups(pub Vec<TestCgroup>);

impl NestedCgroups {
    /// Creates the chain of `names` below `base`, each inside the previous one.
    pub fn create(base: &TestCgroup, names: &[&str]) -> Self {
        let mut levels: Vec<TestCgroup> = Vec::new();
        for name in names {
            let level = match levels.last() {
                Some(parent) => parent.child(name),
                None => base.child(name),
            };
            levels.push(level);
        }
        Self(levels)
    }

    pub fn innermost(&self) -> &TestCgroup {
        self.0.last().expect("at least one level")
    }
}

impl Drop for NestedCgroups {
    fn drop(&mut self) {
        while let Some(level) = self.0.pop() {
            drop(level);
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Every child was reaped before this point, so the cgroup is empty.
        if let Err(error) = fs::remove_dir(&self.path) {
            eprintln!("failed to remove {}: {error}", self.path.display());
        }
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs`. Only raw system
/// calls, so it is safe between `fork` and `exec`.
pub fn join_cgroup(procs: &CString) -> bool {
    // SAFETY: `procs` is a valid NUL-terminated path; the buffer is a 1-byte static.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return false;
        }
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        libc::close(fd);
        written == 1
    }
}

/// Decoded events with the ones seen so far, so later checks can look back.
pub struct Recorder {
    pub receiver: mpsc::Receiver<Event>,
    pub seen: Vec<Event>,
}

impl Recorder {
    /// Returns the first event, seen before or arriving within [`EVENT_TIMEOUT`], that matches.
    pub async fn wait_for(&mut self, what: &str, matches: impl Fn(&Event) -> bool) -> Event {
        if let Some(event) = self.seen.iter().find(|event| matches(event)) {
            return event.clone();
        }
        let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.receiver.recv()).await {
                Ok(Some(event)) => {
                    self.seen.push(event.clone());
                    if matches(&event) {
                        return event;
                    }
                }
                Ok(None) => panic!("event channel closed while waiting for {what}"),
                Err(_) => {
                    let recent: Vec<String> = self
                        .seen
                        .iter()
                        .rev()
                        .take(30)
                        .map(|event| format!("{event:?}"))
                        .collect();
                    panic!(
                        "timed out after {EVENT_TIMEOUT:?} waiting for {what}; last events:\n{}",
                        recent.join("\n")
                    );
                }
            }
        }
    }

    /// Waits until `done` holds for the events seen so far, for at most [`EVENT_TIMEOUT`].
    pub async fn wait_until(&mut self, what: &str, done: impl Fn(&[Event]) -> bool) {
        let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
        while !done(&self.seen) {
            match tokio::time::timeout_at(deadline, self.receiver.recv()).await {
                Ok(Some(event)) => self.seen.push(event),
                Ok(None) => panic!("event channel closed while waiting for {what}"),
                Err(_) => panic!("timed out after {EVENT_TIMEOUT:?} waiting for {what}; {} events seen", self.seen.len()),
            }
        }
    }

    pub async fn wait_for_tcp(&mut self, what: &str, matches: impl Fn(&TcpEvent) -> bool) -> TcpEvent {
        match self
            .wait_for(
                what,
                |event| matches!(event, Event::Tcp(tcp) if matches(tcp)),
            )
            .await
        {
            Event::Tcp(tcp) => tcp,
            other => unreachable!("matched a non-TCP event {other:?}"),
        }
    }
}

pub async fn start_scoped(cgroup: &TestCgroup) -> (Telemetry, Recorder) {
    start_scoped_with(cgroup, TcpHook::Auto).await
}

/// Starts telemetry like [`start_scoped`], with TCP state changes from `tcp_hook`.
pub async fn start_scoped_with(cgroup: &TestCgroup, tcp_hook: TcpHook) -> (Telemetry, Recorder) {
    start_telemetry(Some(cgroup), TelemetryConfig { tcp_hook, ..TelemetryConfig::default() }).await
}

/// Starts telemetry like [`start_scoped`], with `config` (its scope is replaced by `cgroup`).
pub async fn start_scoped_config(cgroup: &TestCgroup, config: TelemetryConfig) -> (Telemetry, Recorder) {
    start_telemetry(Some(cgroup), config).await
}

/// Starts telemetry like [`start_scoped`], with the fold epoch `fold_window` (zero reports every
/// connection).
pub async fn start_scoped_folding(cgroup: &TestCgroup, fold_window: std::time::Duration) -> (Telemetry, Recorder) {
    start_telemetry(Some(cgroup), TelemetryConfig { fold_window, ..TelemetryConfig::default() }).await
}

/// Starts telemetry that observes the whole host.
pub async fn start_unscoped() -> (Telemetry, Recorder) {
    start_telemetry(None, TelemetryConfig::default()).await
}

async fn start_telemetry(scope: Option<&TestCgroup>, config: TelemetryConfig) -> (Telemetry, Recorder) {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "telemetry tests need root; run them with `cargo xtask test`"
    );
    let config = TelemetryConfig { scope_cgroup: scope.map(|cgroup| cgroup.path.clone()), ..config };
    let (telemetry, receiver) = Telemetry::start(config).unwrap_or_else(|error| {
        let chain: Vec<String> = anyhow::Error::from(error)
            .chain()
            .map(ToString::to_string)
            .collect();
        panic!("telemetry failed to start: {}", chain.join(": "))
    });
    // Entries named `kind:` report what the kernel allows, not programs of the agent.
    for hook in telemetry.hooks().into_iter().filter(|hook| !hook.name.starts_with("kind:")) {
        assert!(
            hook.attached,
            "hook {} not attached: {:?}",
            hook.name, hook.error
        );
    }
    (
        telemetry,
        Recorder {
            receiver,
            seen: Vec::new(),
        },
    )
}

/// Runs `program args` to completion, inside the cgroup when `cgroup` is given; returns its pid.
pub fn run_program(cgroup: Option<&TestCgroup>, program: &str, args: &[&str]) -> u32 {
    let mut command = Command::new(program);
    command.args(args);
    if let Some(cgroup) = cgroup {
        let procs = cgroup.procs.clone();
        // SAFETY: the closure only makes raw system calls.
        unsafe {
            command.pre_exec(move || {
                if join_cgroup(&procs) {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let mut child = command
        .spawn()
        .unwrap_or_else(|error| panic!("failed to run {program}: {error}"));
    let pid = child.id();
    child.wait().unwrap();
    pid
}

/// A socket address in the raw form `bind` and `connect` take.
pub struct RawAddress {
    pub storage: libc::sockaddr_storage,
    pub len: libc::socklen_t,
    pub family: libc::c_int,
}

pub fn raw_address(address: SocketAddr) -> RawAddress {
    // SAFETY: sockaddr_storage is valid when zeroed and large enough for both address kinds.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let (len, family) = match address {
        SocketAddr::V4(v4) => {
            let raw = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), raw) };
            (size_of::<libc::sockaddr_in>(), libc::AF_INET)
        }
        SocketAddr::V6(v6) => {
            // SAFETY: sockaddr_in6 is valid when zeroed.
            let mut raw: libc::sockaddr_in6 = unsafe { zeroed() };
            raw.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            raw.sin6_port = v6.port().to_be();
            raw.sin6_addr.s6_addr = v6.ip().octets();
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), raw) };
            (size_of::<libc::sockaddr_in6>(), libc::AF_INET6)
        }
    };
    RawAddress {
        storage,
        len: len as libc::socklen_t,
        family,
    }
}

/// Local port of socket `fd`, from `getsockname`; 0 on failure.
pub fn local_port(fd: libc::c_int) -> u16 {
    // SAFETY: the storage outlives the call and `len` is its size.
    unsafe {
        let mut storage: libc::sockaddr_storage = zeroed();
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getsockname(
            fd,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        ) != 0
        {
            return 0;
        }
        // sin_port and sin6_port share the offset right after the family.
        let port = *((&storage as *const libc::sockaddr_storage)
            .cast::<u8>()
            .add(2)
            .cast::<u16>());
        u16::from_be(port)
    }
}

/// A forked child and the read end of a pipe on which it reports one port.
pub struct Child {
    pub pid: libc::pid_t,
    pub report: libc::c_int,
}

impl Child {
    /// Forks a child that joins `procs` (when given), then runs `body` with the pipe's write end
    /// and exits with its return value. `body` may only make raw system calls.
    pub fn fork(procs: Option<&CString>, body: impl FnOnce(libc::c_int) -> i32) -> Self {
        let mut pipe = [0; 2];
        // SAFETY: `pipe` has room for the two descriptors.
        assert_eq!(
            unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) },
            0
        );
        // SAFETY: the child only makes raw system calls and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let code = match procs {
                Some(procs) if !join_cgroup(procs) => 90,
                _ => body(pipe[1]),
            };
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        // SAFETY: closes the parent's copy of the write end, so a dead child reads as EOF.
        unsafe { libc::close(pipe[1]) };
        Self {
            pid,
            report: pipe[0],
        }
    }

    /// Reads the port the child reported; panics when it exited without reporting.
    pub fn read_port(&self) -> u16 {
        let mut bytes = [0u8; 2];
        // SAFETY: `bytes` has room for the 2 bytes read.
        let read = unsafe { libc::read(self.report, bytes.as_mut_ptr().cast(), 2) };
        assert_eq!(
            read, 2,
            "child {} exited before reporting its port",
            self.pid
        );
        u16::from_ne_bytes(bytes)
    }

    /// Waits for the child to exit and returns its exit status code.
    pub fn wait(self) -> i32 {
        let mut status = 0;
        // SAFETY: waits for our own child; `status` outlives the call.
        unsafe {
            libc::waitpid(self.pid, &mut status, 0);
            libc::close(self.report);
        }
        libc::WEXITSTATUS(status)
    }
}

pub fn report_port(report: libc::c_int, port: u16) {
    // SAFETY: writes 2 bytes from a local array.
    unsafe { libc::write(report, port.to_ne_bytes().as_ptr().cast(), 2) };
}

/// Child body: listens on `address` (port 0), reports the port, accepts one connection, reads it
/// to the end and closes it.
pub fn serve_one_connection(address: &RawAddress, report: libc::c_int) -> i32 {
    // SAFETY: raw socket calls on descriptors this function owns; `address` outlives them.
    unsafe {
        let listener = libc::socket(address.family, libc::SOCK_STREAM, 0);
        if listener < 0 {
            return 10;
        }
        if libc::bind(
            listener,
            (&address.storage as *const libc::sockaddr_storage).cast(),
            address.len,
        ) != 0
        {
            return 11;
        }
        if libc::listen(listener, 8) != 0 {
            return 12;
        }
        report_port(report, local_port(listener));
        let connection = libc::accept(listener, std::ptr::null_mut(), std::ptr::null_mut());
        if connection < 0 {
            return 13;
        }
        let mut buffer = [0u8; 64];
        while libc::read(connection, buffer.as_mut_ptr().cast(), buffer.len()) > 0 {}
        libc::close(connection);
        libc::close(listener);
    }
    0
}

/// Child body: connects to `address`, reports its local port, then closes the connection.
pub fn connect_once(address: &RawAddress, report: libc::c_int) -> i32 {
    // SAFETY: raw socket calls on a descriptor this function owns; `address` outlives them.
    unsafe {
        let socket = libc::socket(address.family, libc::SOCK_STREAM, 0);
        if socket < 0 {
            return 20;
        }
        if libc::connect(
            socket,
            (&address.storage as *const libc::sockaddr_storage).cast(),
            address.len,
        ) != 0
        {
            return 21;
        }
        report_port(report, local_port(socket));
        libc::close(socket);
    }
    0
}

pub fn own_netns() -> u32 {
    fs::metadata("/proc/self/ns/net").unwrap().ino() as u32
}


/// Real path of the Python interpreter on `PATH` (not a wrapper script), run outside the scope.
pub fn python() -> String {
    let output = Command::new("python3")
        .args([
            "-c",
            "import os, sys; print(os.path.realpath(sys.executable))",
        ])
        .output()
        .expect("these tests drive workloads with python3, which must be on PATH");
    assert!(output.status.success(), "python3 failed: {output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// A temporary directory for one test, removed on drop.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn create(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("driftwatch-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        Self { path }
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}
