//! Kernel telemetry against real processes and sockets: the eBPF programs attached through
//! `driftwatch::telemetry::Telemetry`, scoped to a cgroup each test creates.
//!
//! Needs root and an agent built with its eBPF object (`cargo xtask test` does both). Workloads
//! are forked children that move themselves into the test cgroup before they act. They use only
//! raw system calls after `fork`, because the test process has other threads. Absence of events is
//! checked against a sentinel exec started afterwards: the ring buffer hands out records in the
//! order they were reserved, so once the sentinel arrives, earlier events would have too.

use std::ffi::CString;
use std::fs;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use driftwatch::telemetry::event::{Event, TcpEvent, TcpEventKind};
use driftwatch::telemetry::{cgroup2_mount, Telemetry, TelemetryConfig};
use tokio::sync::mpsc;

/// How long to wait for one expected event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A cgroup v2 directory for one test, removed on drop.
struct TestCgroup {
    path: PathBuf,
    procs: CString,
    id: u64,
}

impl TestCgroup {
    fn create(name: &str) -> Self {
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
fn join_cgroup(procs: &CString) -> bool {
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
struct Recorder {
    receiver: mpsc::Receiver<Event>,
    seen: Vec<Event>,
}

impl Recorder {
    /// Returns the first event, seen before or arriving within [`EVENT_TIMEOUT`], that matches.
    async fn wait_for(&mut self, what: &str, matches: impl Fn(&Event) -> bool) -> Event {
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

    async fn wait_for_tcp(&mut self, what: &str, matches: impl Fn(&TcpEvent) -> bool) -> TcpEvent {
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

async fn start_scoped(cgroup: &TestCgroup) -> (Telemetry, Recorder) {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "telemetry tests need root; run them with `cargo xtask test`"
    );
    let config = TelemetryConfig {
        scope_cgroup: Some(cgroup.path.clone()),
        ..TelemetryConfig::default()
    };
    let (telemetry, receiver) = Telemetry::start(config).unwrap_or_else(|error| {
        let chain: Vec<String> = anyhow::Error::from(error)
            .chain()
            .map(ToString::to_string)
            .collect();
        panic!("telemetry failed to start: {}", chain.join(": "))
    });
    for hook in telemetry.hooks() {
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
fn run_program(cgroup: Option<&TestCgroup>, program: &str, args: &[&str]) -> u32 {
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
struct RawAddress {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
    family: libc::c_int,
}

fn raw_address(address: SocketAddr) -> RawAddress {
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
fn local_port(fd: libc::c_int) -> u16 {
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
struct Child {
    pid: libc::pid_t,
    report: libc::c_int,
}

impl Child {
    /// Forks a child that joins `procs` (when given), then runs `body` with the pipe's write end
    /// and exits with its return value. `body` may only make raw system calls.
    fn fork(procs: Option<&CString>, body: impl FnOnce(libc::c_int) -> i32) -> Self {
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
    fn read_port(&self) -> u16 {
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
    fn wait(self) -> i32 {
        let mut status = 0;
        // SAFETY: waits for our own child; `status` outlives the call.
        unsafe {
            libc::waitpid(self.pid, &mut status, 0);
            libc::close(self.report);
        }
        libc::WEXITSTATUS(status)
    }
}

fn report_port(report: libc::c_int, port: u16) {
    // SAFETY: writes 2 bytes from a local array.
    unsafe { libc::write(report, port.to_ne_bytes().as_ptr().cast(), 2) };
}

/// Child body: listens on `address` (port 0), reports the port, accepts one connection, reads it
/// to the end and closes it.
fn serve_one_connection(address: &RawAddress, report: libc::c_int) -> i32 {
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
fn connect_once(address: &RawAddress, report: libc::c_int) -> i32 {
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

fn own_netns() -> u32 {
    fs::metadata("/proc/self/ns/net").unwrap().ino() as u32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_in_scope_reports_path_argv_and_identity() {
    let cgroup = TestCgroup::create("exec");
    let (_telemetry, mut events) = start_scoped(&cgroup).await;

    let pid = run_program(
        Some(&cgroup),
        "/bin/true",
        &["driftwatch-exec-probe", "two words", ""],
    );

    let Event::Exec(exec) = events
        .wait_for(
            "exec of /bin/true",
            |event| matches!(event, Event::Exec(exec) if exec.pid == pid),
        )
        .await
    else {
        unreachable!()
    };
    assert_eq!(exec.filename, "/bin/true");
    assert_eq!(
        exec.argv,
        ["/bin/true", "driftwatch-exec-probe", "two words", ""]
    );
    assert!(!exec.argv_truncated);
    assert_eq!(exec.tid, pid);
    // SAFETY: getuid and getgid have no preconditions.
    assert_eq!(exec.uid, unsafe { libc::getuid() });
    assert_eq!(exec.gid, unsafe { libc::getgid() });
    assert_eq!(exec.cgroup_id, cgroup.id);
    assert_eq!(exec.comm, "true");

    let Event::Exit(exit) = events
        .wait_for(
            "exit of /bin/true",
            |event| matches!(event, Event::Exit(exit) if exit.pid == pid),
        )
        .await
    else {
        unreachable!()
    };
    assert_eq!(exit.exit_code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_with_long_argv_is_truncated_and_flagged() {
    let cgroup = TestCgroup::create("argv");
    let (_telemetry, mut events) = start_scoped(&cgroup).await;

    let many: Vec<String> = (0..40)
        .map(|index| format!("argument-{index:02}"))
        .collect();
    let args: Vec<&str> = many.iter().map(String::as_str).collect();
    let pid = run_program(Some(&cgroup), "/bin/true", &args);

    let Event::Exec(exec) = events
        .wait_for(
            "exec with 40 arguments",
            |event| matches!(event, Event::Exec(exec) if exec.pid == pid),
        )
        .await
    else {
        unreachable!()
    };
    assert!(exec.argv_truncated);
    assert_eq!(exec.argv.len(), agent_common::ARGV_MAX_ARGS as usize);
    assert_eq!(exec.argv[1], "argument-00");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_and_exit_status_reported() {
    let cgroup = TestCgroup::create("fork");
    let (_telemetry, mut events) = start_scoped(&cgroup).await;

    // The shell forks for the first command, so it cannot simply exec it.
    let shell = run_program(Some(&cgroup), "/bin/sh", &["-c", "/bin/true; exit 3"]);

    let Event::Fork(fork) = events
        .wait_for(
            "fork by the shell",
            |event| matches!(event, Event::Fork(fork) if fork.parent_pid == shell),
        )
        .await
    else {
        unreachable!()
    };
    assert_eq!(fork.cgroup_id, cgroup.id);
    events
        .wait_for("exec of the forked child", |event| {
            matches!(event, Event::Exec(exec) if exec.pid == fork.child_pid && exec.filename == "/bin/true")
        })
        .await;
    let Event::Exit(exit) = events
        .wait_for(
            "exit of the shell",
            |event| matches!(event, Event::Exit(exit) if exit.pid == shell),
        )
        .await
    else {
        unreachable!()
    };
    assert_eq!(exit.exit_code, Some(3 << 8));
}

/// Runs a server and a client in the cgroup over `loopback` and checks every TCP event of the
/// connection.
async fn check_loopback_connection(cgroup: &TestCgroup, events: &mut Recorder, loopback: IpAddr) {
    let listen_address = raw_address(SocketAddr::new(loopback, 0));
    let server = Child::fork(Some(&cgroup.procs), |report| {
        serve_one_connection(&listen_address, report)
    });
    let server_port = server.read_port();
    let server_address = SocketAddr::new(loopback, server_port);

    let connect_address = raw_address(server_address);
    let client = Child::fork(Some(&cgroup.procs), |report| {
        connect_once(&connect_address, report)
    });
    let client_port = client.read_port();
    let client_address = SocketAddr::new(loopback, client_port);
    let (server_pid, client_pid) = (server.pid as u32, client.pid as u32);
    assert_eq!(client.wait(), 0, "client failed");
    assert_eq!(server.wait(), 0, "server failed");
    let netns = own_netns();

    let listen = events
        .wait_for_tcp("listen", |tcp| {
            tcp.kind == TcpEventKind::Listen && tcp.local.port() == server_port
        })
        .await;
    assert_eq!(listen.pid, server_pid);
    assert_eq!(listen.local, server_address);
    assert_eq!(listen.netns, netns);

    let connect = events
        .wait_for_tcp("connect", |tcp| {
            tcp.kind == TcpEventKind::Connect && tcp.remote == server_address
        })
        .await;
    assert_eq!(connect.pid, client_pid);

    let connected = events
        .wait_for_tcp("connected", |tcp| {
            tcp.kind == TcpEventKind::Connected && tcp.sock == connect.sock
        })
        .await;
    assert_eq!(connected.pid, client_pid);
    assert_eq!(connected.local, client_address);
    assert_eq!(connected.remote, server_address);
    assert_eq!(connected.netns, netns);

    let accepted = events
        .wait_for_tcp("accepted", |tcp| {
            tcp.kind == TcpEventKind::Accepted && tcp.remote == client_address
        })
        .await;
    assert_eq!(accepted.local, server_address);
    assert_eq!(accepted.pid, 0);
    assert_eq!(accepted.netns, netns);

    let close = events
        .wait_for_tcp("close of the client socket", |tcp| {
            tcp.kind == TcpEventKind::Close && tcp.sock == connect.sock
        })
        .await;
    assert_eq!(close.pid, client_pid);
    assert_eq!(close.local, client_address);
    events
        .wait_for_tcp("close of the accepted socket", |tcp| {
            tcp.kind == TcpEventKind::Close && tcp.sock == accepted.sock
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_ipv4_loopback_connection_reported() {
    let cgroup = TestCgroup::create("tcp4");
    let (_telemetry, mut events) = start_scoped(&cgroup).await;
    check_loopback_connection(&cgroup, &mut events, IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_ipv6_loopback_connection_reported() {
    let cgroup = TestCgroup::create("tcp6");
    let (_telemetry, mut events) = start_scoped(&cgroup).await;
    check_loopback_connection(&cgroup, &mut events, IpAddr::V6(Ipv6Addr::LOCALHOST)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_outside_scope_not_reported() {
    let cgroup = TestCgroup::create("outside");
    let (telemetry, mut events) = start_scoped(&cgroup).await;

    let outside_exec = run_program(None, "/bin/true", &["driftwatch-outside-probe"]);

    // A server outside the scope, and a client outside connecting to it.
    let listen_address = raw_address(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0));
    let server = Child::fork(None, |report| serve_one_connection(&listen_address, report));
    let server_port = server.read_port();
    let connect_address = raw_address(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        server_port,
    ));
    let client = Child::fork(None, |report| connect_once(&connect_address, report));
    client.read_port();
    let outside_pids = [outside_exec, server.pid as u32, client.pid as u32];
    assert_eq!(client.wait(), 0, "client failed");
    assert_eq!(server.wait(), 0, "server failed");

    let sentinel = run_program(Some(&cgroup), "/bin/true", &["driftwatch-sentinel"]);
    events
        .wait_for(
            "sentinel exec",
            |event| matches!(event, Event::Exec(exec) if exec.pid == sentinel),
        )
        .await;

    let leaked: Vec<&Event> = events
        .seen
        .iter()
        .filter(|event| match event {
            Event::Exec(exec) => outside_pids.contains(&exec.pid),
            Event::Fork(fork) => {
                outside_pids.contains(&fork.parent_pid) || outside_pids.contains(&fork.child_pid)
            }
            Event::Exit(exit) => outside_pids.contains(&exit.pid),
            Event::Tcp(tcp) => {
                outside_pids.contains(&tcp.pid)
                    || tcp.local.port() == server_port
                    || tcp.remote.port() == server_port
            }
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "events from outside the scope: {leaked:#?}"
    );

    let counters = telemetry.counters();
    assert_eq!(counters.kernel_drops(), 0, "{counters:?}");
    assert_eq!(counters.decode_errors, 0, "{counters:?}");
    assert!(counters.records_read >= 1, "{counters:?}");
}
