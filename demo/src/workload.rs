//! Workloads for the end-to-end tests of UDP, DNS and io_uring: each sends exactly the traffic a
//! test asserts on, then exits 0, and prints one line on stdout that says what it did.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};

/// Applied to every socket read, so a silent server ends the run.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Record type A.
const TYPE_A: u16 = 1;

/// Binds a UDP socket to `bind`, or to the unspecified address of the target's family.
fn udp_socket(target: SocketAddr, bind: Option<SocketAddr>) -> Result<UdpSocket, String> {
    let local = bind.unwrap_or_else(|| match target {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("constant address"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("constant address"),
    });
    UdpSocket::bind(local).map_err(|error| format!("failed to bind a UDP socket to {local}: {error}"))
}

/// Sends `count` datagrams to `target` with `sendto`, without connecting.
pub fn udp_send(target: SocketAddr, bind: Option<SocketAddr>, count: u32) -> Result<(), String> {
    let socket = udp_socket(target, bind)?;
    for index in 0..count {
        socket
            .send_to(format!("datagram {index}").as_bytes(), target)
            .map_err(|error| format!("sendto {target} failed: {error}"))?;
    }
    println!("udp-send: {count} datagrams from {} to {target}", local_of(&socket));
    Ok(())
}

/// Connects a UDP socket to `target`, then sends `count` datagrams with `send`.
pub fn udp_connect(target: SocketAddr, bind: Option<SocketAddr>, count: u32) -> Result<(), String> {
    let socket = udp_socket(target, bind)?;
    socket
        .connect(target)
        .map_err(|error| format!("UDP connect to {target} failed: {error}"))?;
    for index in 0..count {
        match socket.send(format!("datagram {index}").as_bytes()) {
            Ok(_) => {}
            // A port unreachable reply to an earlier datagram fails the next send on a connected
            // socket; the datagrams still left, and no listener is needed.
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(error) => return Err(format!("send to {target} failed: {error}")),
        }
    }
    println!("udp-connect: {count} datagrams from {} to {target}", local_of(&socket));
    Ok(())
}

/// Sends every datagram that arrives on `listen` back to its sender, from the bound port, until
/// the process is killed. Prints `listening ADDR` once bound and `echoed N to PEER` after each
/// reply, so a test can wait for both.
pub fn udp_echo(listen: SocketAddr) -> Result<(), String> {
    let socket = UdpSocket::bind(listen).map_err(|error| format!("failed to bind a UDP socket to {listen}: {error}"))?;
    println!("listening {}", local_of(&socket));
    let mut buffer = [0u8; 2048];
    let mut echoed = 0u64;
    loop {
        let (length, peer) =
            socket.recv_from(&mut buffer).map_err(|error| format!("recvfrom on {listen} failed: {error}"))?;
        socket
            .send_to(&buffer[..length], peer)
            .map_err(|error| format!("sendto {peer} failed: {error}"))?;
        echoed += 1;
        println!("echoed {echoed} to {peer}");
    }
}

/// Reads every datagram that arrives on any address of `listen` with its sender's address and
/// replies to none, until the process is killed. Prints `listening ADDR,ADDR...` once every socket
/// is bound, and `received N from PEER on PORT` after each datagram, N counting over all sockets.
pub fn udp_sink(listen: &[SocketAddr]) -> Result<(), String> {
    let sockets = listen
        .iter()
        .map(|addr| UdpSocket::bind(addr).map_err(|error| format!("failed to bind a UDP socket to {addr}: {error}")))
        .collect::<Result<Vec<_>, _>>()?;
    let bound: Vec<String> = sockets.iter().map(local_of).collect();
    println!("listening {}", bound.join(","));
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|socket| {
            let received = received.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let mut buffer = [0u8; 2048];
                loop {
                    let (_, peer) = socket
                        .recv_from(&mut buffer)
                        .map_err(|error| format!("recvfrom on {} failed: {error}", local_of(&socket)))?;
                    let count = received.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    let port = socket.local_addr().map_or(0, |addr| addr.port());
                    println!("received {count} from {peer} on {port}");
                }
            })
        })
        .collect();
    for reader in readers {
        reader.join().map_err(|_| "a reader thread panicked".to_string())??;
    }
    Ok(())
}

fn local_of(socket: &UdpSocket) -> String {
    socket.local_addr().map_or_else(|error| format!("<{error}>"), |addr| addr.to_string())
}

/// Asks `server` for the A record of `name` over a connected UDP socket (as the C library's
/// resolver does), then connects over TCP to the first address on `port`.
pub fn resolve_connect(server: SocketAddr, name: &str, port: u16) -> Result<(), String> {
    let socket = udp_socket(server, None)?;
    socket
        .connect(server)
        .map_err(|error| format!("UDP connect to {server} failed: {error}"))?;
    socket.set_read_timeout(Some(IO_TIMEOUT)).map_err(|error| error.to_string())?;
    let id = std::process::id() as u16;
    socket
        .send(&dns_query(id, name)?)
        .map_err(|error| format!("sending the query to {server} failed: {error}"))?;
    let mut buffer = [0u8; 1500];
    let length = socket
        .recv(&mut buffer)
        .map_err(|error| format!("no answer from {server}: {error}"))?;
    let address = first_a_record(&buffer[..length], id)
        .ok_or_else(|| format!("the answer from {server} has no A record for {name}"))?;
    let address = std::net::Ipv4Addr::from(address);
    let target = SocketAddr::new(IpAddr::V4(address), port);
    TcpStream::connect_timeout(&target, IO_TIMEOUT)
        .map_err(|error| format!("failed to connect to {target}: {error}"))?;
    println!("resolve-connect: {name} is {address}, connected to {target}");
    Ok(())
}

/// Builds a query for the A record of `name` with recursion desired.
fn dns_query(id: u16, name: &str) -> Result<Vec<u8>, String> {
    let mut query = Vec::with_capacity(32 + name.len());
    query.extend(id.to_be_bytes());
    query.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("invalid DNS name {name:?}: empty or overlong label"));
        }
        query.push(label.len() as u8);
        query.extend(label.as_bytes());
    }
    query.push(0);
    query.extend(TYPE_A.to_be_bytes());
    query.extend(1u16.to_be_bytes());
    Ok(query)
}

/// Returns the first A record of an answer to query `id`. Names are skipped, not decoded: this
/// client trusts the test's server and only needs the address.
fn first_a_record(message: &[u8], id: u16) -> Option<[u8; 4]> {
    if message.get(..2)? != id.to_be_bytes() {
        return None;
    }
    let questions = u16::from_be_bytes([*message.get(4)?, *message.get(5)?]);
    let answers = u16::from_be_bytes([*message.get(6)?, *message.get(7)?]);
    let mut position = 12;
    for _ in 0..questions {
        position = skip_name(message, position)? + 4;
    }
    for _ in 0..answers {
        position = skip_name(message, position)?;
        let header = message.get(position..position + 10)?;
        let record_type = u16::from_be_bytes([header[0], header[1]]);
        let length = usize::from(u16::from_be_bytes([header[8], header[9]]));
        let data = message.get(position + 10..position + 10 + length)?;
        if record_type == TYPE_A && length == 4 {
            return Some([data[0], data[1], data[2], data[3]]);
        }
        position += 10 + length;
    }
    None
}

fn skip_name(message: &[u8], mut position: usize) -> Option<usize> {
    loop {
        let length = *message.get(position)?;
        if length & 0xc0 == 0xc0 {
            return Some(position + 2);
        }
        if length == 0 {
            return Some(position + 1);
        }
        position += 1 + usize::from(length);
    }
}

/// Connects over TCP with one io_uring `IORING_OP_CONNECT`, run by an io-wq worker thread
/// (`IOSQE_ASYNC`) rather than by this thread.
pub fn uring_connect(target: SocketAddr) -> Result<(), String> {
    let socket = new_socket(target, libc::SOCK_STREAM)?;
    let address = SocketAddress::from(target);
    let entry = opcode::Connect::new(types::Fd(socket.as_raw_fd()), address.as_ptr(), address.len)
        .build()
        .flags(squeue::Flags::ASYNC)
        .user_data(1);
    let result = submit_one(entry)?;
    if result < 0 {
        return Err(format!(
            "io_uring connect to {target} failed: {}",
            io::Error::from_raw_os_error(-result)
        ));
    }
    println!("uring-connect: connected to {target}");
    Ok(())
}

/// Sends one datagram with one io_uring `IORING_OP_SENDMSG` that carries the destination, run by
/// an io-wq worker thread (`IOSQE_ASYNC`).
pub fn uring_udp(target: SocketAddr, bind: Option<SocketAddr>) -> Result<(), String> {
    let socket = udp_socket(target, bind)?;
    let mut address = SocketAddress::from(target);
    let payload = b"io_uring datagram";
    let mut iov = libc::iovec { iov_base: payload.as_ptr() as *mut libc::c_void, iov_len: payload.len() };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_name = (&mut address.storage as *mut libc::sockaddr_storage).cast();
    header.msg_namelen = address.len;
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    let entry = opcode::SendMsg::new(types::Fd(socket.as_raw_fd()), &header)
        .build()
        .flags(squeue::Flags::ASYNC)
        .user_data(2);
    let result = submit_one(entry)?;
    if result < 0 {
        return Err(format!(
            "io_uring sendmsg to {target} failed: {}",
            io::Error::from_raw_os_error(-result)
        ));
    }
    println!("uring-udp: {result} bytes from {} to {target}", local_of(&socket));
    Ok(())
}

/// Submits one entry to a new ring and waits for its completion; returns the result field.
fn submit_one(entry: squeue::Entry) -> Result<i32, String> {
    let mut ring = IoUring::new(4).map_err(|error| format!("io_uring_setup failed: {error}"))?;
    // SAFETY: every buffer the entry points to lives on the caller's stack until this returns,
    // after the completion arrived.
    unsafe { ring.submission().push(&entry) }
        .map_err(|error| format!("the submission queue is full: {error}"))?;
    ring.submit_and_wait(1).map_err(|error| format!("io_uring_enter failed: {error}"))?;
    let completion = ring
        .completion()
        .next()
        .ok_or_else(|| "io_uring returned no completion".to_string())?;
    Ok(completion.result())
}

/// A socket of `kind` for the family of `target`, closed on drop.
fn new_socket(target: SocketAddr, kind: libc::c_int) -> Result<std::os::fd::OwnedFd, String> {
    let family = match target {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: socket(2) has no memory arguments.
    let fd = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket failed: {}", io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// A socket address in the form the kernel takes.
struct SocketAddress {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl SocketAddress {
    fn as_ptr(&self) -> *const libc::sockaddr {
        (&self.storage as *const libc::sockaddr_storage).cast()
    }
}

impl From<SocketAddr> for SocketAddress {
    fn from(address: SocketAddr) -> Self {
        // SAFETY: sockaddr_storage is plain data; all-zero is valid.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match address {
            SocketAddr::V4(v4) => {
                // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in.
                let sin = unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = v4.port().to_be();
                sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(v6) => {
                // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in6.
                let sin6 = unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = v6.port().to_be();
                sin6.sin6_addr.s6_addr = v6.ip().octets();
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        SocketAddress { storage, len: len as libc::socklen_t }
    }
}
