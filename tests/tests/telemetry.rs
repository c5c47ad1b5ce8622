//! Kernel telemetry against real processes and sockets: the eBPF programs attached through
//! `driftwatch::telemetry::Telemetry`, scoped to a cgroup each test creates.
//!
//! Needs root and an agent built with its eBPF object (`cargo xtask test` does both). Workloads
//! are forked children that move themselves into the test cgroup before they act. They use only
//! raw system calls after `fork`, because the test process has other threads. Absence of events is
//! checked against a sentinel exec started afterwards: the ring buffer hands out records in the
//! order they were reserved, so once the sentinel arrives, earlier events would have too.

mod telemetry_common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use driftwatch::telemetry::event::{Event, FoldedFlow, TcpEventKind};
use telemetry_common::{
    own_netns, raw_address, run_program, serve_one_connection, connect_once, start_scoped, Child,
    Recorder, TestCgroup,
};

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
            Event::Credentials(change) => outside_pids.contains(&change.pid),
            Event::Udp(udp) => outside_pids.contains(&udp.pid),
            // Answers carry no pid; the cgroup hook sees only sockets created in scope.
            Event::Dns(_) => false,
            Event::Accept(accept) => {
                outside_pids.contains(&accept.pid) || accept.local.port() == server_port
            }
            Event::Fold(fold) => match fold.flow {
                FoldedFlow::Out { pid, server, .. } => outside_pids.contains(&pid) || server.port() == server_port,
                FoldedFlow::In { server, .. } => server.port() == server_port,
            },
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_hook_kinds_listed_with_hooks() {
    let cgroup = TestCgroup::create("kinds");
    let (telemetry, _events) = start_scoped(&cgroup).await;

    let hooks = telemetry.hooks();
    let kind = |name: &str| {
        hooks
            .iter()
            .find(|hook| hook.name == format!("kind:{name}"))
            .unwrap_or_else(|| panic!("no kind:{name} among {hooks:#?}"))
    };
    // The agent's own programs are tracepoints, so that kind must load wherever they attached.
    assert!(kind("tracepoint").attached, "{hooks:#?}");
    // A kprobe is usable exactly when the kernel offers the kprobe event source.
    let kprobe_source = std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists();
    assert_eq!(kind("kprobe").attached, kprobe_source, "{hooks:#?}");
    for name in ["raw_tracepoint", "tp_btf", "cgroup_sock_addr", "sock_ops", "fentry", "lsm"] {
        let hook = kind(name);
        assert_eq!(hook.attached, hook.error.is_none(), "{hook:?}");
    }
    assert_eq!(telemetry.hook_support().len(), 8);
}
