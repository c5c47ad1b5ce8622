//! Servers and a client for the accept attribution tests: each server replies to a connection with
//! the pid of the process that accepted it, so a test knows which process the agent must name.
//!
//! ```text
//! driftwatch-accept-probe prefork WORKERS           listen, then fork WORKERS processes that accept
//! driftwatch-accept-probe reuseport PORT            listen with SO_REUSEPORT (PORT 0: any) and accept
//! driftwatch-accept-probe reuseport-on ADDR         the same on an IPv4 ADDR
//! driftwatch-accept-probe listen ADDR               listen on ADDR and accept
//! driftwatch-accept-probe listen-v6only PORT        listen on [::]:PORT with IPV6_V6ONLY and accept
//! driftwatch-accept-probe pass-listener UNIX_PATH   listen, send the socket to UNIX_PATH, close it
//! driftwatch-accept-probe receive-listener UNIX_PATH  receive a listening socket there and accept
//! driftwatch-accept-probe renamed-listen COMM       rename the task to COMM, then listen
//! driftwatch-accept-probe uring-listen              listen and accept through io_uring only
//! driftwatch-accept-probe uring-receive-listener UNIX_PATH  receive a listening socket there and
//!                                                   accept with one multishot io_uring accept
//! driftwatch-accept-probe uring-listen-two          listen twice and accept both through one ring,
//!                                                   every accept with user data 0
//! driftwatch-accept-probe connect ADDR              connect once and print who served it
//! driftwatch-accept-probe hold ADDR                 connect, print who served it, keep it open
//! ```
//!
//! Every listener but `listen` and `reuseport-on` binds 127.0.0.1; each prints `listening <addr>`; the connect mode prints
//! `served <pid> <local addr> <peer addr>`. Servers run until they are killed.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::mem::{size_of, zeroed};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["prefork", workers] => parse(workers).and_then(prefork),
        ["reuseport", port] => parse(port).and_then(|port| reuseport(std::net::SocketAddrV4::new([127, 0, 0, 1].into(), port))),
        ["reuseport-on", addr] => parse(addr).and_then(reuseport),
        ["listen", addr] => parse(addr).and_then(listen_on),
        ["listen-v6only", port] => parse(port).and_then(listen_v6_only),
        ["pass-listener", path] => pass_listener(path),
        ["receive-listener", path] => receive_listener(path),
        ["renamed-listen", comm] => renamed_listen(comm),
        ["uring-listen"] => listen_loopback().and_then(|listener| serve_uring(&listener, false)),
        ["uring-listen-two"] => uring_listen_two(),
        ["uring-receive-listener", path] => receive_listener_at(path).and_then(|listener| serve_uring(&listener, true)),
        ["connect", addr] => parse(addr).and_then(|addr| connect(addr).map(drop)),
        ["hold", addr] => parse(addr).and_then(|addr| {
            let _open = connect(addr)?;
            wait_forever()
        }),
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, format!("invalid arguments {args:?}; see the file's header for the modes"))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("driftwatch-accept-probe: {error}");
            ExitCode::FAILURE
        }
    }
}

fn parse<T: std::str::FromStr>(text: &str) -> io::Result<T> {
    text.parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("invalid value {text:?}")))
}

/// Prints one line and flushes it at once, because the test reads the pipe line by line.
fn say(line: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

fn check(result: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if result < 0 {
        let error = io::Error::last_os_error();
        return Err(io::Error::new(error.kind(), format!("{what} failed: {error}")));
    }
    Ok(result)
}

fn listen_loopback() -> io::Result<TcpListener> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    say(&format!("listening {}", listener.local_addr()?))?;
    Ok(listener)
}

/// Replies to every connection with this process's pid, then waits for the client to close.
fn serve(listener: &TcpListener) -> io::Result<()> {
    let pid = std::process::id();
    loop {
        let (mut stream, _) = listener.accept()?;
        stream.write_all(format!("{pid}\n").as_bytes())?;
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    }
}

fn listen_on(addr: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    say(&format!("listening {}", listener.local_addr()?))?;
    serve(&listener)
}

fn listen_v6_only(port: u16) -> io::Result<()> {
    // SAFETY: plain system calls on a descriptor this function owns; the address is a valid
    // sockaddr_in6 of the size passed.
    let listener = unsafe {
        let fd = check(libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0), "socket")?;
        let listener = TcpListener::from_raw_fd(fd);
        let one: libc::c_int = 1;
        check(
            libc::setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, (&one as *const libc::c_int).cast(), size_of::<libc::c_int>() as u32),
            "setsockopt(IPV6_V6ONLY)",
        )?;
        let mut address: libc::sockaddr_in6 = zeroed();
        address.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        address.sin6_port = port.to_be();
        check(libc::bind(fd, (&address as *const libc::sockaddr_in6).cast(), size_of::<libc::sockaddr_in6>() as u32), "bind")?;
        check(libc::listen(fd, 128), "listen")?;
        listener
    };
    say(&format!("listening {}", listener.local_addr()?))?;
    serve(&listener)
}

fn wait_forever() -> io::Result<()> {
    loop {
        // SAFETY: pause has no arguments and returns only after a signal handler ran.
        unsafe { libc::pause() };
    }
}

fn prefork(workers: u32) -> io::Result<()> {
    let listener = listen_loopback()?;
    for _ in 0..workers {
        // SAFETY: the process has a single thread, so the child may run any code after fork.
        let pid = check(unsafe { libc::fork() }, "fork")?;
        if pid == 0 {
            // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and no pointers.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            let result = serve(&listener);
            std::process::exit(i32::from(result.is_err()));
        }
        say(&format!("worker {pid}"))?;
    }
    wait_forever()
}

fn reuseport(on: std::net::SocketAddrV4) -> io::Result<()> {
    // SAFETY: plain system calls on a descriptor this function owns; the address is a valid
    // sockaddr_in of the size passed.
    let listener = unsafe {
        let fd = check(libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0), "socket")?;
        let listener = TcpListener::from_raw_fd(fd);
        let one: libc::c_int = 1;
        check(
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, (&one as *const libc::c_int).cast(), size_of::<libc::c_int>() as u32),
            "setsockopt(SO_REUSEPORT)",
        )?;
        let mut address: libc::sockaddr_in = zeroed();
        address.sin_family = libc::AF_INET as libc::sa_family_t;
        address.sin_port = on.port().to_be();
        address.sin_addr.s_addr = u32::from_be_bytes(on.ip().octets()).to_be();
        check(libc::bind(fd, (&address as *const libc::sockaddr_in).cast(), size_of::<libc::sockaddr_in>() as u32), "bind")?;
        check(libc::listen(fd, 128), "listen")?;
        listener
    };
    say(&format!("listening {}", listener.local_addr()?))?;
    serve(&listener)
}

fn pass_listener(path: &str) -> io::Result<()> {
    let listener = listen_loopback()?;
    let channel = UnixStream::connect(path)?;
    send_fd(&channel, listener.as_raw_fd())?;
    // From here on only the receiver has the listening socket open.
    drop(listener);
    say("passed")?;
    wait_forever()
}

fn receive_listener(path: &str) -> io::Result<()> {
    serve(&receive_listener_at(path)?)
}

/// Binds a Unix socket at `path` and returns the listening socket the first peer sends there.
fn receive_listener_at(path: &str) -> io::Result<TcpListener> {
    let unix = UnixListener::bind(path)?;
    say("ready")?;
    let (channel, _) = unix.accept()?;
    let fd = receive_fd(&channel)?;
    // SAFETY: the descriptor arrived with SCM_RIGHTS and nothing else owns it.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    say(&format!("received {}", listener.local_addr()?))?;
    Ok(listener)
}

fn renamed_listen(comm: &str) -> io::Result<()> {
    let name = std::ffi::CString::new(comm).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "COMM contains a NUL byte"))?;
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes; longer names are cut.
    check(unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) }, "prctl(PR_SET_NAME)")?;
    let listener = listen_loopback()?;
    let _keep = listener;
    wait_forever()
}

/// Takes each connection of `listener` with io_uring, so that no `accept` system call of this
/// process returns it. Without `multishot`, each is an `IORING_OP_ACCEPT` of its own run by an
/// io-wq worker thread (`IOSQE_ASYNC`). With it, one multishot accept takes them all, its
/// completions posted by this thread. Replies and waits for the close as [`serve`] does.
fn serve_uring(listener: &TcpListener, multishot: bool) -> io::Result<()> {
    use io_uring::{cqueue, opcode, squeue, types, IoUring};

    let mut ring = IoUring::new(4)?;
    let pid = std::process::id();
    let socket = types::Fd(listener.as_raw_fd());
    let mut armed = false;
    loop {
        if !armed {
            let entry = if multishot {
                opcode::AcceptMulti::new(socket).flags(libc::SOCK_CLOEXEC).build()
            } else {
                opcode::Accept::new(socket, std::ptr::null_mut(), std::ptr::null_mut())
                    .flags(libc::SOCK_CLOEXEC)
                    .build()
                    .flags(squeue::Flags::ASYNC)
            };
            // SAFETY: the entry points to no buffer; the address arguments are null.
            unsafe { ring.submission().push(&entry) }
                .map_err(|error| io::Error::other(format!("the submission queue is full: {error}")))?;
            armed = multishot;
        }
        ring.submit_and_wait(1)?;
        let completion = ring.completion().next().ok_or_else(|| io::Error::other("io_uring returned no completion"))?;
        armed &= cqueue::more(completion.flags());
        let fd = completion.result();
        if fd < 0 {
            let error = io::Error::from_raw_os_error(-fd);
            return Err(io::Error::new(error.kind(), format!("io_uring accept failed: {error}")));
        }
        // SAFETY: the completion carries a new descriptor that nothing else owns.
        let mut stream = unsafe { TcpStream::from_raw_fd(fd) };
        stream.write_all(format!("{pid}\n").as_bytes())?;
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    }
}

/// Listens on two loopback ports and keeps an io_uring accept waiting on each, both with user data
/// 0 as many servers leave it, armed in the order the ports are printed. The local port of a
/// completion's socket names its listener, which is armed again.
fn uring_listen_two() -> io::Result<()> {
    use io_uring::{opcode, types, IoUring};

    let listeners = [listen_loopback()?, listen_loopback()?];
    let mut ring = IoUring::new(4)?;
    let pid = std::process::id();
    let arm = |ring: &mut IoUring, listener: &TcpListener| -> io::Result<()> {
        let entry = opcode::Accept::new(types::Fd(listener.as_raw_fd()), std::ptr::null_mut(), std::ptr::null_mut())
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(0);
        // SAFETY: the entry points to no buffer; the address arguments are null.
        unsafe { ring.submission().push(&entry) }
            .map_err(|error| io::Error::other(format!("the submission queue is full: {error}")))?;
        ring.submit().map(drop)
    };
    for listener in &listeners {
        arm(&mut ring, listener)?;
    }
    loop {
        ring.submit_and_wait(1)?;
        let completion = ring.completion().next().ok_or_else(|| io::Error::other("io_uring returned no completion"))?;
        let fd = completion.result();
        if fd < 0 {
            let error = io::Error::from_raw_os_error(-fd);
            return Err(io::Error::new(error.kind(), format!("io_uring accept failed: {error}")));
        }
        // SAFETY: the completion carries a new descriptor that nothing else owns.
        let mut stream = unsafe { TcpStream::from_raw_fd(fd) };
        let port = stream.local_addr()?.port();
        if let Some(listener) = listeners.iter().find(|listener| listener.local_addr().is_ok_and(|addr| addr.port() == port)) {
            arm(&mut ring, listener)?;
        }
        stream.write_all(format!("{pid}\n").as_bytes())?;
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    }
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    say(&format!("served {} {} {}", line.trim(), stream.local_addr()?, stream.peer_addr()?))?;
    Ok(stream)
}

/// Sends `fd` over `channel` as SCM_RIGHTS ancillary data with one byte of payload.
fn send_fd(channel: &UnixStream, fd: RawFd) -> io::Result<()> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: the message header points at `iov` and `control`, which outlive the sendmsg call,
    // and the control buffer has room for exactly one header with one descriptor.
    unsafe {
        let mut message: libc::msghdr = zeroed();
        message.msg_iov = &mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = space;
        let header = libc::CMSG_FIRSTHDR(&message);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<RawFd>(), fd);
        check(libc::sendmsg(channel.as_raw_fd(), &message, 0) as libc::c_int, "sendmsg")?;
    }
    Ok(())
}

/// Receives one descriptor sent by [`send_fd`].
fn receive_fd(channel: &UnixStream) -> io::Result<RawFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: as in `send_fd`; the header is read only when the kernel filled one in.
    unsafe {
        let mut message: libc::msghdr = zeroed();
        message.msg_iov = &mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = space;
        check(libc::recvmsg(channel.as_raw_fd(), &mut message, libc::MSG_CMSG_CLOEXEC) as libc::c_int, "recvmsg")?;
        let header = libc::CMSG_FIRSTHDR(&message);
        if header.is_null() || (*header).cmsg_type != libc::SCM_RIGHTS {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "no descriptor arrived with the message"));
        }
        Ok(std::ptr::read_unaligned(libc::CMSG_DATA(header).cast::<RawFd>()))
    }
}
