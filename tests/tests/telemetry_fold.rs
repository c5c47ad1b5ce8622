//! Repeated TCP connections that the kernel counts instead of reporting, on real connections: a
//! process in scope that connects to a server in scope again and again (also an IPv4 client of a
//! dual-stack listener, and a server that accepts through io_uring), a client outside the scope
//! whose connections fold on the accepting end only, and a zero fold epoch that reports every
//! connection.

mod telemetry_common;

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use driftwatch::telemetry::event::{Event, FoldEvent, FoldedFlow, TcpEvent, TcpEventKind};
use driftwatch::telemetry::TelemetryConfig;
use telemetry_common::{
    own_netns, raw_address, report_port, start_scoped_config, start_scoped_folding, Child, RawAddress, Recorder, TestCgroup,
};

const CONNECTIONS: usize = 40;

/// How a test server takes its connections off the listener.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Acceptor {
    /// `accept()`, whose exit runs the accept programs.
    Syscall,
    /// io_uring `IORING_OP_ACCEPT` run by an io-wq worker thread, which runs no accept program.
    IoUring,
}

/// Takes the next connection off `listener` with `ring`, or with `accept()` when there is none;
/// returns its descriptor, negative on failure.
fn accept_next(listener: libc::c_int, ring: Option<&mut io_uring::IoUring>) -> libc::c_int {
    use io_uring::{opcode, squeue, types};

    let Some(ring) = ring else {
        // SAFETY: null address arguments ask for no peer address.
        return unsafe { libc::accept(listener, std::ptr::null_mut(), std::ptr::null_mut()) };
    };
    let entry = opcode::Accept::new(types::Fd(listener), std::ptr::null_mut(), std::ptr::null_mut())
        .build()
        .flags(squeue::Flags::ASYNC);
    // SAFETY: the entry points to no buffer.
    if unsafe { ring.submission().push(&entry) }.is_err() || ring.submit_and_wait(1).is_err() {
        return -1;
    }
    ring.completion().next().map_or(-1, |completion| completion.result())
}

/// Child body: listens on `address` (port 0), reports the port, then accepts `count` connections
/// and closes each at once.
fn serve_and_close(address: &RawAddress, count: usize, report: libc::c_int) -> i32 {
    serve_and_close_with(address, count, Acceptor::Syscall, report)
}

/// [`serve_and_close`], taking the connections with `acceptor`.
fn serve_and_close_with(address: &RawAddress, count: usize, acceptor: Acceptor, report: libc::c_int) -> i32 {
    let mut ring = match acceptor {
        Acceptor::Syscall => None,
        Acceptor::IoUring => match io_uring::IoUring::new(4) {
            Ok(ring) => Some(ring),
            Err(_) => return 14,
        },
    };
    // SAFETY: raw socket calls on descriptors this function owns; `address` outlives them.
    unsafe {
        let listener = libc::socket(address.family, libc::SOCK_STREAM, 0);
        if listener < 0 {
            return 10;
        }
        // A later server takes the port while this one's closed connections wait in TIME_WAIT.
        let on: libc::c_int = 1;
        libc::setsockopt(listener, libc::SOL_SOCKET, libc::SO_REUSEADDR, (&on as *const libc::c_int).cast(), 4);
        if libc::bind(listener, (&address.storage as *const libc::sockaddr_storage).cast(), address.len) != 0 {
            return 11;
        }
        if libc::listen(listener, 64) != 0 {
            return 12;
        }
        report_port(report, telemetry_common::local_port(listener));
        for _ in 0..count {
            let connection = accept_next(listener, ring.as_mut());
            if connection < 0 {
                return 13;
            }
            libc::close(connection);
        }
        libc::close(listener);
    }
    0
}

/// Child body: connects to `address` `count` times, one after another, each time reading until
/// the server closes.
fn connect_times(address: &RawAddress, count: usize, report: libc::c_int) -> i32 {
    let code = connect_repeatedly(address, count);
    report_port(report, 1);
    code
}

/// Connects to `address` `count` times, one after another, each time reading until the server
/// closes; returns 0, or the step that failed.
fn connect_repeatedly(address: &RawAddress, count: usize) -> i32 {
    // SAFETY: as above.
    unsafe {
        for _ in 0..count {
            let socket = libc::socket(address.family, libc::SOCK_STREAM, 0);
            if socket < 0 {
                return 20;
            }
            if libc::connect(socket, (&address.storage as *const libc::sockaddr_storage).cast(), address.len) != 0 {
                return 21;
            }
            let mut buffer = [0u8; 16];
            while libc::read(socket, buffer.as_mut_ptr().cast(), buffer.len()) > 0 {}
            libc::close(socket);
        }
    }
    0
}

/// Connects once to each of `targets` and keeps every connection open, then reports port 1 to the
/// parent and reads each connection until the peer ends it. Returns the child's exit code: 42 when
/// a socket fails, 43 when a connect fails.
fn connect_and_hold<'a>(targets: impl Iterator<Item = &'a RawAddress>, report: libc::c_int) -> i32 {
    let mut sockets = Vec::new();
    // SAFETY: raw socket calls on descriptors this function owns; each address outlives its call.
    unsafe {
        for address in targets {
            let socket = libc::socket(address.family, libc::SOCK_STREAM, 0);
            if socket < 0 {
                return 42;
            }
            if libc::connect(socket, (&address.storage as *const libc::sockaddr_storage).cast(), address.len) != 0 {
                return 43;
            }
            sockets.push(socket);
        }
        report_port(report, 1);
        let mut buffer = [0u8; 16];
        for socket in sockets {
            while libc::read(socket, buffer.as_mut_ptr().cast(), buffer.len()) > 0 {}
            libc::close(socket);
        }
    }
    0
}

/// Starts a server in `cgroup` that listens on `listen` and accepts `CONNECTIONS` connections
/// with `acceptor`; returns it and the IPv4 loopback address that reaches it.
fn start_server_on(cgroup: &TestCgroup, listen: IpAddr, acceptor: Acceptor) -> (Child, SocketAddr) {
    let listen_address = raw_address(SocketAddr::new(listen, 0));
    let server =
        Child::fork(Some(&cgroup.procs), |report| serve_and_close_with(&listen_address, CONNECTIONS, acceptor, report));
    let address = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), server.read_port());
    (server, address)
}

fn start_server(cgroup: &TestCgroup) -> (Child, SocketAddr) {
    start_server_on(cgroup, IpAddr::V4(Ipv4Addr::LOCALHOST), Acceptor::Syscall)
}

fn tcp_events<'a>(seen: &'a [Event], kind: TcpEventKind) -> impl Iterator<Item = &'a TcpEvent> {
    seen.iter().filter_map(move |event| match event {
        Event::Tcp(tcp) if tcp.kind == kind => Some(tcp),
        _ => None,
    })
}

/// Sums the counts read for `flow`.
fn folded(seen: &[Event], flow: FoldedFlow) -> FoldEvent {
    let mut total = FoldEvent { flow, connects: 0, taken_back: 0, established: 0, failed: 0, closes: 0, bytes_sent: 0, bytes_received: 0, ktime_ns: 0 };
    for event in seen {
        let Event::Fold(fold) = event else { continue };
        if fold.flow == flow {
            total.connects += fold.connects;
            total.taken_back += fold.taken_back;
            total.established += fold.established;
            total.failed += fold.failed;
            total.closes += fold.closes;
        }
    }
    total
}

fn connected_to(seen: &[Event], client_pid: u32, server: SocketAddr) -> Vec<TcpEvent> {
    tcp_events(seen, TcpEventKind::Connected).filter(|tcp| tcp.pid == client_pid && tcp.remote == server).cloned().collect()
}

fn accepted_on(seen: &[Event], server: SocketAddr) -> Vec<TcpEvent> {
    tcp_events(seen, TcpEventKind::Accepted).filter(|tcp| tcp.local == server).cloned().collect()
}

async fn wait_for_all(events: &mut Recorder, what: &str, done: impl Fn(&[Event]) -> bool) {
    events.wait_until(what, done).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_connections_in_scope_fold_on_both_ends() {
    both_ends_fold("fold-both", IpAddr::V4(Ipv4Addr::LOCALHOST), Acceptor::Syscall).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_uring_server_folds_both_ends() {
    // No accept system call returns these connections. The programs on io_uring's submissions and
    // completions take the folded connections' accepted ends out of the kernel's map of waiting
    // sockets, as the accept system call's program does, and the counts are the same.
    both_ends_fold("fold-uring", IpAddr::V4(Ipv4Addr::LOCALHOST), Acceptor::IoUring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_listener_folds_both_ends() {
    // The accepted socket is IPv6 with the client's IPv4-mapped address, the client's is IPv4.
    both_ends_fold("fold-dual", IpAddr::V6(Ipv6Addr::UNSPECIFIED), Acceptor::Syscall).await;
}

/// Connects `CONNECTIONS` times from one process in scope to a server in scope listening on
/// `listen` and accepting with `acceptor`, and checks that both ends of each connection are
/// reported or both folded.
async fn both_ends_fold(tag: &str, listen: IpAddr, acceptor: Acceptor) {
    let cgroup = TestCgroup::create(tag);
    let (telemetry, mut events) = start_scoped_folding(&cgroup, Duration::from_secs(1)).await;
    assert!(telemetry.tcp_from_sock_ops(), "{:#?}", telemetry.hooks());

    let (server, server_address) = start_server_on(&cgroup, listen, acceptor);
    let connect_address = raw_address(server_address);
    let client = Child::fork(Some(&cgroup.procs), |report| connect_times(&connect_address, CONNECTIONS, report));
    let client_pid = client.pid as u32;
    assert_eq!(client.wait(), 0, "client failed");
    assert_eq!(server.wait(), 0, "server failed");

    let out = FoldedFlow::Out { netns: own_netns(), pid: client_pid, server: server_address };
    wait_for_all(&mut events, "every connection reported or counted", |seen| {
        connected_to(seen, client_pid, server_address).len() as u64 + folded(seen, out).closes == CONNECTIONS as u64
    })
    .await;
    let seen = &events.seen;
    let reported = connected_to(seen, client_pid, server_address);
    let counted = folded(seen, out);
    // Each epoch of a second reports the flow's first connection; the loop takes well under one,
    // so it crosses at most one epoch boundary.
    assert!((1..=2).contains(&reported.len()), "reported {} of {CONNECTIONS}", reported.len());
    assert_eq!(
        (counted.connects, counted.established, counted.failed, counted.closes),
        (CONNECTIONS as u64 - reported.len() as u64, CONNECTIONS as u64 - reported.len() as u64, 0, CONNECTIONS as u64 - reported.len() as u64),
        "{counted:?}"
    );
    // The accepting end follows the connecting end: each reported connection has its accepted
    // end, and no folded one is counted on the accepting side.
    let accepted = accepted_on(seen, server_address);
    assert_eq!(accepted.len(), reported.len(), "{accepted:#?}");
    for connected in &reported {
        assert!(
            accepted.iter().any(|end| end.remote == connected.local),
            "no accepted end for {}; accepted: {accepted:#?}",
            connected.local
        );
    }
    let incoming = FoldedFlow::In { netns: own_netns(), server: server_address, client: IpAddr::V4(Ipv4Addr::LOCALHOST) };
    assert_eq!(folded(seen, incoming).connects, 0);
    // The accept programs know the folded connections' accepted ends and report none of them,
    // whether a system call or io_uring accepted them.
    let accepts = seen.iter().filter(|event| matches!(event, Event::Accept(accept) if accept.local == server_address)).count();
    assert_eq!(accepts, reported.len(), "accept records for {CONNECTIONS} connections, {} reported", reported.len());
    // Nothing of a folded connection reaches the ring buffer: neither its connect nor its closes.
    let connects = tcp_events(seen, TcpEventKind::Connect).filter(|tcp| tcp.pid == client_pid).count();
    assert_eq!(connects, reported.len());
    let reported_socks: Vec<u64> = reported.iter().chain(&accepted).map(|tcp| tcp.sock).collect();
    let closes: Vec<&TcpEvent> = tcp_events(seen, TcpEventKind::Close)
        .filter(|tcp| tcp.local.port() == server_address.port() || tcp.remote == server_address)
        .collect();
    assert!(closes.iter().all(|close| reported_socks.contains(&close.sock)), "{closes:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_server_on_port_is_reported() {
    let cgroup = TestCgroup::create("fold-swap");
    // A long epoch, so that both servers' connections fall in one.
    let (telemetry, mut events) = start_scoped_folding(&cgroup, Duration::from_secs(5)).await;
    assert!(telemetry.tcp_from_sock_ops(), "{:#?}", telemetry.hooks());

    let (first, server_address) = start_server(&cgroup);
    let connect_address = raw_address(server_address);
    let mut go = [0 as libc::c_int; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe(go.as_mut_ptr()) }, 0);
    // One client process connects to the first server, waits, then connects to the second.
    let client = Child::fork(Some(&cgroup.procs), |report| {
        let code = connect_repeatedly(&connect_address, CONNECTIONS / 2);
        report_port(report, 1);
        let mut byte = [0u8; 1];
        // SAFETY: reads one byte into a local array.
        unsafe { libc::read(go[0], byte.as_mut_ptr().cast(), 1) };
        let second = connect_repeatedly(&connect_address, CONNECTIONS / 2);
        if code != 0 { code } else { second }
    });
    let client_pid = client.pid as u32;
    client.read_port();
    // The first server accepted its share and stopped; it takes CONNECTIONS in all, so end it.
    // SAFETY: the signal goes to the child this test forked.
    unsafe { libc::kill(first.pid, libc::SIGKILL) };
    first.wait();
    let second_listen = raw_address(server_address);
    let second = Child::fork(Some(&cgroup.procs), |report| serve_and_close(&second_listen, CONNECTIONS / 2, report));
    let second_pid = second.pid as u32;
    assert_eq!(second.read_port(), server_address.port());
    // SAFETY: writes one byte from a local array to the pipe this test made.
    unsafe { libc::write(go[1], [1u8].as_ptr().cast(), 1) };
    assert_eq!(client.wait(), 0, "client failed");
    assert_eq!(second.wait(), 0, "second server failed");

    let listen = events
        .wait_for_tcp("the second server's listen", |tcp| tcp.kind == TcpEventKind::Listen && tcp.pid == second_pid)
        .await;
    // The second server's first connection is reported, with the folded client's process.
    let accepted = events
        .wait_for_tcp("a connection accepted by the second server", |tcp| {
            tcp.kind == TcpEventKind::Accepted && tcp.local == server_address && tcp.ktime_ns > listen.ktime_ns
        })
        .await;
    let joined = accepted.folded_client.is_some_and(|(pid, netns)| pid == client_pid && netns == own_netns())
        || connected_to(&events.seen, client_pid, server_address).iter().any(|tcp| tcp.local == accepted.remote);
    assert!(joined, "the accepted end names no client: {accepted:#?}");
    // SAFETY: closes the descriptors pipe returned.
    unsafe {
        libc::close(go[0]);
        libc::close(go[1]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_outside_scope_folds_on_the_accepting_end() {
    let cgroup = TestCgroup::create("fold-in");
    let (telemetry, mut events) = start_scoped_folding(&cgroup, Duration::from_secs(1)).await;
    assert!(telemetry.tcp_from_sock_ops(), "{:#?}", telemetry.hooks());

    let (server, server_address) = start_server(&cgroup);
    let server_pid = server.pid as u32;
    // This test process is outside the scope.
    let client = std::thread::spawn(move || {
        for _ in 0..CONNECTIONS {
            let mut stream = std::net::TcpStream::connect(server_address).expect("connect");
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).expect("read until the server closes");
        }
    });
    client.join().expect("client thread");
    assert_eq!(server.wait(), 0, "server failed");

    let incoming = FoldedFlow::In { netns: own_netns(), server: server_address, client: IpAddr::V4(Ipv4Addr::LOCALHOST) };
    wait_for_all(&mut events, "every accepted connection reported or counted", |seen| {
        accepted_on(seen, server_address).len() as u64 + folded(seen, incoming).closes == CONNECTIONS as u64
    })
    .await;
    let seen = &events.seen;
    let reported = accepted_on(seen, server_address);
    let counted = folded(seen, incoming);
    assert!((1..=2).contains(&reported.len()), "reported {} of {CONNECTIONS}", reported.len());
    let folded_count = CONNECTIONS as u64 - reported.len() as u64;
    assert_eq!((counted.connects, counted.closes, counted.established, counted.failed), (folded_count, folded_count, 0, 0));
    // Only the reported connections have an accept record naming the server.
    let accepts: Vec<_> = seen
        .iter()
        .filter_map(|event| match event {
            Event::Accept(accept) if accept.local == server_address => Some(accept),
            _ => None,
        })
        .collect();
    assert_eq!(accepts.len(), reported.len(), "{accepts:#?}");
    assert!(accepts.iter().all(|accept| accept.pid == server_pid), "{accepts:#?}");
    // The client is not in scope: no connecting end of it, reported or counted.
    assert!(tcp_events(seen, TcpEventKind::Connected).all(|tcp| tcp.remote != server_address));
    assert!(!seen.iter().any(|event| matches!(event, Event::Fold(fold) if matches!(fold.flow, FoldedFlow::Out { .. }))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_fold_window_reports_every_connection() {
    let cgroup = TestCgroup::create("fold-off");
    let (telemetry, mut events) = start_scoped_folding(&cgroup, Duration::ZERO).await;
    assert!(telemetry.tcp_from_sock_ops(), "{:#?}", telemetry.hooks());

    let (server, server_address) = start_server(&cgroup);
    let connect_address = raw_address(server_address);
    let client = Child::fork(Some(&cgroup.procs), |report| connect_times(&connect_address, CONNECTIONS, report));
    let client_pid = client.pid as u32;
    assert_eq!(client.wait(), 0, "client failed");
    assert_eq!(server.wait(), 0, "server failed");

    let client_closes = |seen: &[Event]| tcp_events(seen, TcpEventKind::Close).filter(|tcp| tcp.pid == client_pid).count();
    wait_for_all(&mut events, "every connection, its accepted end and its close", |seen| {
        connected_to(seen, client_pid, server_address).len() == CONNECTIONS
            && accepted_on(seen, server_address).len() == CONNECTIONS
            && client_closes(seen) == CONNECTIONS
    })
    .await;
    let connects = tcp_events(&events.seen, TcpEventKind::Connect).filter(|tcp| tcp.pid == client_pid).count();
    assert_eq!(connects, CONNECTIONS);
}

/// Child body: connects once to each of `count` closed ports on 127.1.0.0/16, so that each
/// attempt is a flow of its own and is refused at once.
fn connect_to_closed_ports(count: usize, report: libc::c_int) -> i32 {
    for index in 0..count {
        let address = Ipv4Addr::new(127, 1, (index / 256) as u8, (index % 256) as u8);
        let raw = raw_address(SocketAddr::new(IpAddr::V4(address), DISCARD_PORT));
        // SAFETY: raw socket calls on a descriptor this function owns; `raw` outlives them.
        unsafe {
            let socket = libc::socket(raw.family, libc::SOCK_STREAM, 0);
            if socket < 0 {
                return 30;
            }
            let refused = libc::connect(socket, (&raw.storage as *const libc::sockaddr_storage).cast(), raw.len) != 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECONNREFUSED);
            libc::close(socket);
            if !refused {
                return 31;
            }
        }
    }
    report_port(report, 1);
    0
}

/// A port that nothing in the test listens on.
const DISCARD_PORT: u16 = 9;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_fold_map_is_counted() {
    let cgroup = TestCgroup::create("fold-full");
    // An epoch longer than the test, so that no entry of the flow map goes idle and leaves it.
    let (telemetry, mut events) = start_scoped_folding(&cgroup, Duration::from_secs(60)).await;
    assert!(telemetry.tcp_from_sock_ops(), "{:#?}", telemetry.hooks());

    let beyond = 64;
    let attempts = agent_common::FOLDS_MAX_ENTRIES as usize + beyond;
    let client = Child::fork(Some(&cgroup.procs), |report| connect_to_closed_ports(attempts, report));
    let client_pid = client.pid as u32;
    // The events are taken while the client runs, so that they do not fill the event channel.
    // The last attempt's record is written after all the others.
    let last = Ipv4Addr::new(127, 1, ((attempts - 1) / 256) as u8, ((attempts - 1) % 256) as u8);
    let last = SocketAddr::new(IpAddr::V4(last), DISCARD_PORT);
    events
        .wait_for_tcp("the last attempt refused", |tcp| tcp.kind == TcpEventKind::ConnectFailed && tcp.remote == last)
        .await;
    assert_eq!(client.wait(), 0, "client failed");
    // Flows the full map could not take are reported one by one, like every first attempt.
    let refused = tcp_events(&events.seen, TcpEventKind::ConnectFailed).filter(|tcp| tcp.pid == client_pid).count();
    assert_eq!(refused, attempts);
    let counters = telemetry.counters();
    let full = counters.kernel.iter().find(|drops| drops.reason == "fold_map_full").expect("a fold map counter");
    assert_eq!(full.total, beyond as u64, "{full:?}");
    assert!(!full.loses_events);
    assert_eq!(counters.kernel_drops(), 0, "{:?}", counters.kernel);
}

/// Listeners of `more_waiting_accepts_than_paired_map`, each with a listen queue of this many
/// connections, below the default `net.core.somaxconn` of 4096.
const QUEUED_PER_LISTENER: usize = 1_800;
const QUEUED_LISTENERS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_waiting_accepts_than_paired_map() {
    let cgroup = TestCgroup::create("fold-queue");
    let (telemetry, mut events) = start_scoped_folding(&cgroup, Duration::from_secs(60)).await;
    assert!(telemetry.tcp_from_sock_ops(), "{:#?}", telemetry.hooks());
    // More accepted ends of folded pairs wait in listen queues than the kernel's map of them
    // holds: the rest are tracked as other sockets, and none is reported twice.
    assert!(QUEUED_PER_LISTENER * QUEUED_LISTENERS > agent_common::PAIRED_ACCEPTS_MAX_ENTRIES as usize);

    let mut go = [0 as libc::c_int; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe(go.as_mut_ptr()) }, 0);
    let server = Child::fork(Some(&cgroup.procs), |report| {
        let mut listeners = [0; QUEUED_LISTENERS];
        let loopback = raw_address(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0));
        // SAFETY: raw socket calls on descriptors this function owns.
        unsafe {
            for listener in &mut listeners {
                *listener = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                if libc::bind(*listener, (&loopback.storage as *const libc::sockaddr_storage).cast(), loopback.len) != 0
                    || libc::listen(*listener, QUEUED_PER_LISTENER as libc::c_int + 100) != 0
                {
                    return 40;
                }
                report_port(report, telemetry_common::local_port(*listener));
            }
            // Nothing is accepted before every connection waits in a queue.
            let mut byte = [0u8; 1];
            libc::read(go[0], byte.as_mut_ptr().cast(), 1);
            for listener in listeners {
                for _ in 0..QUEUED_PER_LISTENER {
                    let connection = libc::accept(listener, std::ptr::null_mut(), std::ptr::null_mut());
                    if connection < 0 {
                        return 41;
                    }
                    libc::close(connection);
                }
            }
        }
        0
    });
    let ports: Vec<u16> = (0..QUEUED_LISTENERS).map(|_| server.read_port()).collect();
    let addresses: Vec<RawAddress> =
        ports.iter().map(|port| raw_address(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), *port))).collect();
    let client = Child::fork(Some(&cgroup.procs), |report| {
        // SAFETY: raises this child's own descriptor limit to its hard limit.
        unsafe {
            let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
        // Each connection ends when the server has accepted and closed it.
        connect_and_hold(addresses.iter().flat_map(|address| std::iter::repeat_n(address, QUEUED_PER_LISTENER)), report)
    });
    let client_pid = client.pid as u32;
    client.read_port();
    // SAFETY: writes one byte from a local array to the pipe this test made.
    unsafe { libc::write(go[1], [1u8].as_ptr().cast(), 1) };
    assert_eq!(server.wait(), 0, "server failed");
    assert_eq!(client.wait(), 0, "client failed");
    // SAFETY: closes the descriptors pipe returned.
    unsafe {
        libc::close(go[0]);
        libc::close(go[1]);
    }

    let on_ports = |port: u16| ports.contains(&port);
    let flows: Vec<FoldedFlow> = ports
        .iter()
        .map(|port| FoldedFlow::Out { netns: own_netns(), pid: client_pid, server: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), *port) })
        .collect();
    let total = QUEUED_PER_LISTENER * QUEUED_LISTENERS;
    wait_for_all(&mut events, "every connection reported or counted", |seen| {
        let reported = tcp_events(seen, TcpEventKind::Connected).filter(|tcp| tcp.pid == client_pid).count();
        let counted: u64 = flows.iter().map(|flow| folded(seen, *flow).closes).sum();
        reported as u64 + counted == total as u64
    })
    .await;
    // Accept records come at the server's accept, after the client's closes: take what arrives in
    // the next second and a half.
    let _ = tokio::time::timeout(Duration::from_millis(1500), events.wait_until("no more events", |_| false)).await;
    let seen = &events.seen;
    let reported = tcp_events(seen, TcpEventKind::Connected).filter(|tcp| tcp.pid == client_pid).count();
    let accepted = tcp_events(seen, TcpEventKind::Accepted).filter(|tcp| on_ports(tcp.local.port())).count();
    let accepts = seen.iter().filter(|event| matches!(event, Event::Accept(accept) if on_ports(accept.local.port()))).count();
    assert!(reported < total, "nothing was folded: {reported} of {total} reported");
    assert_eq!(accepted, reported, "accepted ends of {reported} reported connections");
    assert_eq!(accepts, reported, "accept records of {reported} reported connections");
    assert_eq!(telemetry.counters().kernel_drops(), 0, "{:?}", telemetry.counters().kernel);
}

/// Connections of `unaccepted_waiting_sockets_are_swept`, below the listen queue's length.
const UNACCEPTED: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unaccepted_waiting_sockets_are_swept() {
    let cgroup = TestCgroup::create("fold-sweep");
    // One epoch for the whole test, and waiting accepted ends removed after a second.
    let config = TelemetryConfig {
        fold_window: Duration::from_secs(60),
        paired_accept_max_age: Duration::from_secs(1),
        ..TelemetryConfig::default()
    };
    let (telemetry, mut events) = start_scoped_config(&cgroup, config).await;
    assert!(telemetry.tcp_from_sock_ops(), "{:#?}", telemetry.hooks());

    let mut go = [0 as libc::c_int; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe(go.as_mut_ptr()) }, 0);
    // The server listens and, once the test writes to the pipe, closes its listener without
    // accepting anything. Until then every connection's accepted end waits in the queue.
    let server = Child::fork(Some(&cgroup.procs), |report| {
        let loopback = raw_address(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0));
        // SAFETY: raw socket calls on a descriptor this function owns.
        unsafe {
            let listener = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            if libc::bind(listener, (&loopback.storage as *const libc::sockaddr_storage).cast(), loopback.len) != 0
                || libc::listen(listener, UNACCEPTED as libc::c_int + 50) != 0
            {
                return 50;
            }
            report_port(report, telemetry_common::local_port(listener));
            let mut byte = [0u8; 1];
            libc::read(go[0], byte.as_mut_ptr().cast(), 1);
            libc::close(listener);
        }
        0
    });
    let server_address = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), server.read_port());
    let connect_address = raw_address(server_address);
    // The server's listener closes: each connection ends with a reset.
    let client = Child::fork(Some(&cgroup.procs), |report| {
        connect_and_hold(std::iter::repeat_n(&connect_address, UNACCEPTED), report)
    });
    let client_pid = client.pid as u32;
    client.read_port();

    let out = FoldedFlow::Out { netns: own_netns(), pid: client_pid, server: server_address };
    wait_for_all(&mut events, "every connection reported or counted", |seen| {
        connected_to(seen, client_pid, server_address).len() as u64 + folded(seen, out).connects == UNACCEPTED as u64
    })
    .await;
    let reported = connected_to(&events.seen, client_pid, server_address).len();
    assert!((1..=2).contains(&reported), "reported {reported} of {UNACCEPTED}");
    // The accepted end of a folded connection is reported too when it reached the server before
    // that of the epoch's reported one, which is rare. Every other accepted end waits for an
    // accept that does not come. The sweep, every tenth read of the counts, removes each of them
    // once. They stay queued meanwhile: once freed, a socket that another process accepts at one
    // of their addresses would take that entry out first.
    let accepted = accepted_on(&events.seen, server_address).len();
    assert!(accepted >= reported, "{accepted} accepted ends for {reported} reported connections");
    let waiting = (UNACCEPTED - accepted) as u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while telemetry.counters().paired_accepts_swept < waiting && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(telemetry.counters().paired_accepts_swept, waiting);

    // SAFETY: writes one byte from a local array to the pipe this test made.
    unsafe { libc::write(go[1], [1u8].as_ptr().cast(), 1) };
    assert_eq!(server.wait(), 0, "server failed");
    assert_eq!(client.wait(), 0, "client failed");
    // SAFETY: closes the descriptors pipe returned.
    unsafe {
        libc::close(go[0]);
        libc::close(go[1]);
    }
}
