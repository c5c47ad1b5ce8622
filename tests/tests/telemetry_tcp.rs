//! TCP on real kernel events: a connect refused by the peer kept apart from one that timed out
//! without a reply, a non-blocking connect, the bytes each side moved, an IPv4 client of a
//! dual-stack listener shown with IPv4 addresses, and the close of a connection opened before
//! the telemetry started. The connection and the close before the telemetry run twice: with TCP
//! state changes from the `sock_ops` program, and from the tracepoint that replaces it on kernels
//! that refuse it.

mod telemetry_common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use driftwatch::state::seed::{scan_sockets, SeededState};
use driftwatch::telemetry::event::TcpEventKind;
use driftwatch::telemetry::{Telemetry, TcpHook};
use telemetry_common::{
    connect_once, local_port, own_netns, raw_address, report_port, run_program, serve_one_connection,
    start_scoped, start_scoped_with, start_unscoped, Child, RawAddress, TestCgroup,
};

const REQUEST_BYTES: usize = 1000;
const RESPONSE_BYTES: usize = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connect_reports_connection_refused() {
    let cgroup = TestCgroup::create("refused");
    // A port with no listener: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (_telemetry, mut events) = start_scoped(&cgroup).await;

    let target = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let address = raw_address(target);
    let client = Child::fork(Some(&cgroup.procs), |report| connect_once(&address, report));
    let pid = client.pid as u32;
    assert_eq!(client.wait(), 21, "the connect should fail");

    let failed = events
        .wait_for_tcp("failed connect", |tcp| {
            tcp.kind == TcpEventKind::ConnectFailed && tcp.remote == target
        })
        .await;
    assert_eq!(failed.pid, pid);
    assert!(failed.refused(), "{failed:?}");
    assert!(!failed.timed_out(), "{failed:?}");
    assert_eq!(failed.error, libc::ECONNREFUSED);
}

/// Connects from a network namespace of its own to a neighbour behind a veth pair where no host
/// replies. The neighbour entry is permanent, so no ARP failure turns into "no route to host".
/// With one SYN retry the attempt times out after about 3 s.
const TIMEOUT_CONNECT: &str = "ip link add dw0 type veth peer name dw1 \
    && ip addr add 198.18.255.1/24 dev dw0 && ip link set dw0 up && ip link set dw1 up \
    && ip neigh add 198.18.255.2 lladdr 02:00:00:00:00:01 dev dw0 nud permanent && exec perl -e 'use Socket; socket(S, PF_INET, SOCK_STREAM, 0) or die; \
    setsockopt(S, 6, 7, 1) or die; connect(S, pack_sockaddr_in(9, inet_aton(q(198.18.255.2)))) \
    and exit 1; exit 0' driftwatch-timeout-probe";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_without_answer_reports_timed_out() {
    let cgroup = TestCgroup::create("timeout");
    let (_telemetry, mut events) = start_scoped(&cgroup).await;

    // The namespace lives only as long as the process, so nothing is left behind.
    let pid = run_program(
        Some(&cgroup),
        "/usr/bin/unshare",
        &["--net", "/bin/sh", "-c", TIMEOUT_CONNECT],
    );
    let target: SocketAddr = "198.18.255.2:9".parse().unwrap();
    let connect = events
        .wait_for_tcp("connect into the void", |tcp| {
            tcp.kind == TcpEventKind::Connect && tcp.remote == target
        })
        .await;
    assert_eq!(connect.pid, pid);
    let failed = events
        .wait_for_tcp("timed-out connect", |tcp| {
            tcp.kind == TcpEventKind::ConnectFailed && tcp.sock == connect.sock
        })
        .await;
    assert_eq!(failed.pid, pid);
    assert!(failed.timed_out(), "{failed:?}");
    assert!(!failed.refused(), "{failed:?}");
    assert_eq!(failed.netns, connect.netns);
    assert_ne!(connect.netns, own_netns(), "the connect ran in the namespace of its own");
}

/// Server body: accepts one connection, reads the request, sends the response, then waits for
/// the client's close.
fn serve_request(address: &RawAddress, report: libc::c_int) -> i32 {
    // SAFETY: raw socket calls on descriptors this function owns; buffers outlive the calls.
    unsafe {
        let listener = libc::socket(address.family, libc::SOCK_STREAM, 0);
        if listener < 0
            || libc::bind(
                listener,
                (&address.storage as *const libc::sockaddr_storage).cast(),
                address.len,
            ) != 0
            || libc::listen(listener, 8) != 0
        {
            return 30;
        }
        report_port(report, local_port(listener));
        let connection = libc::accept(listener, std::ptr::null_mut(), std::ptr::null_mut());
        if connection < 0 {
            return 31;
        }
        let mut buffer = [0u8; REQUEST_BYTES];
        let mut got = 0;
        while got < REQUEST_BYTES {
            let read = libc::read(
                connection,
                buffer.as_mut_ptr().add(got).cast(),
                REQUEST_BYTES - got,
            );
            if read <= 0 {
                return 32;
            }
            got += read as usize;
        }
        if libc::write(connection, buffer.as_ptr().cast(), RESPONSE_BYTES) != RESPONSE_BYTES as isize
        {
            return 33;
        }
        while libc::read(connection, buffer.as_mut_ptr().cast(), buffer.len()) > 0 {}
        libc::close(connection);
        libc::close(listener);
    }
    0
}

/// Client body: a non-blocking connect completed with poll, then one request and its response.
fn request_nonblocking(address: &RawAddress, report: libc::c_int) -> i32 {
    // SAFETY: raw socket calls on a descriptor this function owns; buffers outlive the calls.
    unsafe {
        let socket = libc::socket(address.family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
        if socket < 0 {
            return 40;
        }
        let started = libc::connect(
            socket,
            (&address.storage as *const libc::sockaddr_storage).cast(),
            address.len,
        );
        if started == 0 || *libc::__errno_location() != libc::EINPROGRESS {
            return 41;
        }
        let mut poll = libc::pollfd {
            fd: socket,
            events: libc::POLLOUT,
            revents: 0,
        };
        if libc::poll(&mut poll, 1, 5000) != 1 {
            return 42;
        }
        let mut error: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        libc::getsockopt(
            socket,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut error as *mut libc::c_int).cast(),
            &mut len,
        );
        if error != 0 {
            return 43;
        }
        libc::fcntl(socket, libc::F_SETFL, 0);
        report_port(report, local_port(socket));
        let request = [7u8; REQUEST_BYTES];
        if libc::write(socket, request.as_ptr().cast(), REQUEST_BYTES) != REQUEST_BYTES as isize {
            return 44;
        }
        let mut answer = [0u8; RESPONSE_BYTES];
        let mut got = 0;
        while got < RESPONSE_BYTES {
            let read = libc::read(
                socket,
                answer.as_mut_ptr().add(got).cast(),
                RESPONSE_BYTES - got,
            );
            if read <= 0 {
                return 45;
            }
            got += read as usize;
        }
        libc::close(socket);
    }
    0
}

/// Checks that `telemetry` takes TCP state changes from the hook that `expected` selects: the
/// `sock_ops` program, which this kernel accepts, or the tracepoint.
fn assert_tcp_hook(telemetry: &Telemetry, expected: TcpHook) {
    let attached = |name: &str| telemetry.hooks().iter().any(|hook| hook.name == name && hook.attached);
    let sock_ops = expected == TcpHook::Auto;
    assert_eq!(telemetry.tcp_from_sock_ops(), sock_ops, "{:#?}", telemetry.hooks());
    assert_eq!(attached("tcp_sock_ops"), sock_ops, "{:#?}", telemetry.hooks());
    assert_eq!(attached("inet_sock_set_state"), !sock_ops, "{:#?}", telemetry.hooks());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonblocking_connect_reports_bytes_at_close() {
    connection_with_bytes("bytes", TcpHook::Auto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracepoint_reports_bytes_at_close() {
    connection_with_bytes("bytes-tp", TcpHook::Tracepoint).await;
}

/// Runs a non-blocking connect, one request and its response, and checks the connect, listen,
/// accept and both closes with the bytes each side moved.
async fn connection_with_bytes(tag: &str, tcp_hook: TcpHook) {
    let cgroup = TestCgroup::create(tag);
    let (telemetry, mut events) = start_scoped_with(&cgroup, tcp_hook).await;
    assert_tcp_hook(&telemetry, tcp_hook);

    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let listen_address = raw_address(SocketAddr::new(loopback, 0));
    let server = Child::fork(Some(&cgroup.procs), |report| {
        serve_request(&listen_address, report)
    });
    let server_address = SocketAddr::new(loopback, server.read_port());
    let connect_address = raw_address(server_address);
    let client = Child::fork(Some(&cgroup.procs), |report| {
        request_nonblocking(&connect_address, report)
    });
    let client_address = SocketAddr::new(loopback, client.read_port());
    let (server_pid, client_pid) = (server.pid as u32, client.pid as u32);
    assert_eq!(client.wait(), 0, "client failed");
    assert_eq!(server.wait(), 0, "server failed");

    let connected = events
        .wait_for_tcp("connected", |tcp| {
            tcp.kind == TcpEventKind::Connected && tcp.local == client_address
        })
        .await;
    assert_eq!(connected.pid, client_pid);
    assert_eq!(connected.remote, server_address);
    let client_close = events
        .wait_for_tcp("close of the client socket", |tcp| {
            tcp.kind == TcpEventKind::Close && tcp.sock == connected.sock
        })
        .await;
    assert_eq!(client_close.pid, client_pid);
    assert_eq!(
        (client_close.bytes_sent, client_close.bytes_received),
        (REQUEST_BYTES as u64, RESPONSE_BYTES as u64)
    );

    let accepted = events
        .wait_for_tcp("accepted", |tcp| {
            tcp.kind == TcpEventKind::Accepted && tcp.remote == client_address
        })
        .await;
    assert_eq!(accepted.local, server_address);
    let listen = events
        .wait_for_tcp("listen", |tcp| {
            tcp.kind == TcpEventKind::Listen && tcp.local == server_address
        })
        .await;
    assert_eq!(listen.pid, server_pid);
    let server_close = events
        .wait_for_tcp("close of the accepted socket", |tcp| {
            tcp.kind == TcpEventKind::Close && tcp.sock == accepted.sock
        })
        .await;
    assert_eq!(
        (server_close.bytes_sent, server_close.bytes_received),
        (RESPONSE_BYTES as u64, REQUEST_BYTES as u64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_listener_shows_ipv4_client() {
    let cgroup = TestCgroup::create("mapped");
    let (_telemetry, mut events) = start_scoped(&cgroup).await;

    let listen_address = raw_address(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0));
    let server = Child::fork(Some(&cgroup.procs), |report| {
        serve_request(&listen_address, report)
    });
    let port = server.read_port();
    let server_address = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let connect_address = raw_address(server_address);
    let client = Child::fork(Some(&cgroup.procs), |report| {
        request_nonblocking(&connect_address, report)
    });
    let client_address = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), client.read_port());
    assert_eq!(client.wait(), 0, "client failed");
    assert_eq!(server.wait(), 0, "server failed");

    let accepted = events
        .wait_for_tcp("accepted on the dual-stack listener", |tcp| {
            tcp.kind == TcpEventKind::Accepted && tcp.local.port() == port
        })
        .await;
    assert_eq!(accepted.local, server_address);
    assert_eq!(accepted.remote, client_address);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_connection_close_names_its_owner() {
    seeded_connection_close("hD-seeded-close", TcpHook::Auto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracepoint_seeded_close_names_owner() {
    seeded_connection_close("hD-seeded-close-tp", TcpHook::Tracepoint).await;
}

/// Seeds a connection accepted before the telemetry started with its owner, closes it, and
/// checks that its close names the owner.
async fn seeded_connection_close(tag: &str, tcp_hook: TcpHook) {
    let cgroup = TestCgroup::create(tag);
    let address = raw_address("127.0.0.1:0".parse().unwrap());
    let server = Child::fork(Some(&cgroup.procs), |report| serve_one_connection(&address, report));
    let port = server.read_port();
    // This test process is outside the scope, so only the server's end is reported.
    let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let client_addr = client.local_addr().unwrap();
    let server_pid = server.pid as u32;
    let proc_root = std::path::Path::new("/proc");
    let accepted = driftwatch_e2e::wait_until(std::time::Duration::from_secs(10), || {
        scan_sockets(proc_root).tcp.into_iter().find(|socket| {
            socket.state == SeededState::Established && socket.remote == client_addr && socket.pid == server_pid
        })
    })
    .expect("the server never accepted the connection");

    let (mut telemetry, mut events) = start_scoped_with(&cgroup, tcp_hook).await;
    assert_tcp_hook(&telemetry, tcp_hook);
    let seeded = telemetry
        .seed_connections(&[(accepted.netns, accepted.local, accepted.remote, accepted.pid)])
        .unwrap();
    assert_eq!(seeded, 1);
    drop(client);

    let close = events
        .wait_for_tcp("close of the seeded connection", |tcp| {
            tcp.kind == TcpEventKind::Close && tcp.local.port() == port
        })
        .await;
    assert_eq!(close.pid, server_pid);
    assert_eq!(close.remote, client_addr);
    assert_eq!(close.local, SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    assert_eq!(close.netns, own_netns());
    assert_eq!(server.wait(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unseen_socket_close_not_reported() {
    let cgroup = TestCgroup::create("flagged");
    let (_first, _first_events) = start_scoped(&cgroup).await;
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let listen_address = raw_address(SocketAddr::new(loopback, 0));

    // The first telemetry requests the state changes of the server's accepted socket. A second
    // one, for the whole host, starts after the connection and must not report its close.
    let server = Child::fork(Some(&cgroup.procs), |report| serve_one_connection(&listen_address, report));
    let port = server.read_port();
    let client = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    let (_second, mut events) = start_unscoped().await;
    drop(client);
    assert_eq!(server.wait(), 0);

    // A connection the second telemetry saw start: its close comes after the first one's.
    let control = Child::fork(Some(&cgroup.procs), |report| serve_one_connection(&listen_address, report));
    let control_port = control.read_port();
    drop(std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, control_port)).unwrap());
    let control_pid = control.pid as u32;
    assert_eq!(control.wait(), 0);
    let close = events
        .wait_for_tcp("close of the connection seen from its start", |tcp| {
            tcp.kind == TcpEventKind::Close && tcp.local.port() == control_port
        })
        .await;
    assert_eq!(close.pid, control_pid);

    let unseen: Vec<_> = events
        .seen
        .iter()
        .filter(|event| matches!(event, driftwatch::telemetry::Event::Tcp(tcp) if tcp.local.port() == port || tcp.remote.port() == port))
        .collect();
    assert!(unseen.is_empty(), "events of a connection opened before the telemetry: {unseen:#?}");
}

