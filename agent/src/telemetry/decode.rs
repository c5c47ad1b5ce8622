//! Ring buffer record bytes to [`Event`]s.
//!
//! Records are `#[repr(C)]` structs from `agent_common`, header first. The header's `kind` is
//! converted with `TryFrom`, and every record is length-checked before it is read, so a record
//! from a mismatched kernel object is an error, never undefined behaviour.

use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use agent_common::{
    AcceptRecord, CredRecord, CredSyscall, DnsRecord, ExecRecord, ExitRecord, ForkRecord, RecordHeader, RecordKind,
    FoldKey, TcpKind, TcpRecord, FOLD_IN, FOLD_OUT,
    ARGV_CAPTURE_BYTES, EXEC_FLAG_ARGV_TRUNCATED, EXEC_FLAG_EXE_UNKNOWN, EXEC_FLAG_EXE_UNLINKED,
    EXEC_FLAG_LINEAGE_UNKNOWN, EXE_NAME_BYTES, FAMILY_INET, FAMILY_INET6, FILENAME_BYTES,
    TCP_FLAG_EXE_UNLINKED, DNS_CAPTURE_BYTES, UdpKind, UdpRecord,
};

use super::event::{
    AcceptEvent, FoldedFlow, CredChange, CredEvent, Credentials, DnsEvent, Event, ExecEvent, ExitEvent, ForkEvent, Lineage,
    TcpEvent, TcpEventKind, UdpEvent, UdpEventKind,
};

/// Failure to decode a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than the {expected}-byte {what}")]
    Short {
        what: &'static str,
        len: usize,
        expected: usize,
    },
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
    #[error("unknown credential system call {0}")]
    UnknownCredSyscall(u32),
    #[error("unknown TCP event {0}")]
    UnknownTcpEvent(u32),
    #[error("unknown address family {0} in a TCP or accept record")]
    UnknownFamily(u16),
    #[error("unknown UDP event {0}")]
    UnknownUdpEvent(u32),
    #[error("unknown address family {family} in a {what}")]
    UnknownFamilyIn { family: u16, what: &'static str },
}

/// Decodes one ring buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let header: RecordHeader = read_record(bytes, "record header")?;
    let kind =
        RecordKind::try_from(header.kind).map_err(|unknown| DecodeError::UnknownKind(unknown.0))?;
    match kind {
        RecordKind::Exec => decode_exec(bytes),
        RecordKind::Fork => decode_fork(bytes),
        RecordKind::Exit => decode_exit(bytes),
        RecordKind::Tcp => decode_tcp(bytes),
        RecordKind::Credentials => decode_cred(bytes),
        RecordKind::Udp => decode_udp(bytes),
        RecordKind::Dns => decode_dns(bytes),
        RecordKind::Accept => decode_accept(bytes),
    }
}

fn decode_udp(bytes: &[u8]) -> Result<Event, DecodeError> {
    let record: UdpRecord = read_record(bytes, "UDP record")?;
    let kind = match UdpKind::try_from(record.event)
        .map_err(|unknown| DecodeError::UnknownUdpEvent(unknown.0))?
    {
        UdpKind::Send => UdpEventKind::Send,
        UdpKind::Connect => UdpEventKind::Connect,
        UdpKind::Receive => UdpEventKind::Receive,
        UdpKind::Bind => UdpEventKind::Bind,
    };
    let (local, remote) = match record.family {
        // An IPv4 destination on an IPv6 socket (dual stack) leaves the bound address in IPv6
        // form, which `ipv6` turns back into IPv4 when it is mapped.
        FAMILY_INET if record.saddr[4..].iter().any(|&byte| byte != 0) => {
            (ipv6(record.saddr), ipv4(&record.daddr))
        }
        FAMILY_INET => (ipv4(&record.saddr), ipv4(&record.daddr)),
        FAMILY_INET6 => (ipv6(record.saddr), ipv6(record.daddr)),
        family => return Err(DecodeError::UnknownFamilyIn { family, what: "UDP record" }),
    };
    Ok(Event::Udp(UdpEvent {
        ktime_ns: record.header.ktime_ns,
        kind,
        pid: record.header.pid,
        tid: record.header.tid,
        netns: record.netns,
        cookie: record.cookie,
        local: SocketAddr::new(local, record.sport),
        remote: SocketAddr::new(remote, record.dport),
        cgroup_id: record.header.cgroup_id,
    }))
}

fn decode_dns(bytes: &[u8]) -> Result<Event, DecodeError> {
    let record: DnsRecord = read_record(bytes, "DNS record")?;
    let server = match record.family {
        FAMILY_INET => ipv4(&record.saddr),
        FAMILY_INET6 => ipv6(record.saddr),
        family => return Err(DecodeError::UnknownFamilyIn { family, what: "DNS record" }),
    };
    let captured = (record.captured_len as usize).min(DNS_CAPTURE_BYTES);
    Ok(Event::Dns(DnsEvent {
        ktime_ns: record.header.ktime_ns,
        cookie: record.cookie,
        server: SocketAddr::new(server, record.sport),
        local_port: record.dport,
        message: record.data[..captured].to_vec(),
        message_len: record.message_len,
    }))
}

fn decode_accept(bytes: &[u8]) -> Result<Event, DecodeError> {
    let record: AcceptRecord = read_record(bytes, "accept record")?;
    let (local, remote) = match record.family {
        FAMILY_INET => (ipv4(&record.saddr), ipv4(&record.daddr)),
        FAMILY_INET6 => (ipv6(record.saddr), ipv6(record.daddr)),
        other => return Err(DecodeError::UnknownFamily(other)),
    };
    Ok(Event::Accept(AcceptEvent {
        ktime_ns: record.header.ktime_ns,
        pid: record.header.pid,
        tid: record.header.tid,
        cgroup_id: record.header.cgroup_id,
        sock: record.skaddr,
        fd: record.fd,
        netns: record.netns,
        local: SocketAddr::new(local, record.sport),
        remote: SocketAddr::new(remote, record.dport),
        lineage: lineage(&record.lineage),
        exe_unlinked: record.flags & TCP_FLAG_EXE_UNLINKED != 0,
    }))
}

fn decode_cred(bytes: &[u8]) -> Result<Event, DecodeError> {
    let record: CredRecord = read_record(bytes, "credential record")?;
    let change = match CredSyscall::try_from(record.syscall)
        .map_err(|unknown| DecodeError::UnknownCredSyscall(unknown.0))?
    {
        CredSyscall::Setuid => CredChange::Setuid,
        CredSyscall::Setgid => CredChange::Setgid,
        CredSyscall::Setreuid => CredChange::Setreuid,
        CredSyscall::Setregid => CredChange::Setregid,
        CredSyscall::Setresuid => CredChange::Setresuid,
        CredSyscall::Setresgid => CredChange::Setresgid,
        CredSyscall::Capset => CredChange::Capset,
    };
    Ok(Event::Credentials(CredEvent {
        ktime_ns: record.header.ktime_ns,
        pid: record.header.pid,
        tid: record.header.tid,
        change,
        after: (record.read != 0).then_some(Credentials {
            uid: record.uid,
            euid: record.euid,
            gid: record.gid,
            egid: record.egid,
            cap_effective: record.cap_effective,
        }),
    }))
}

/// Copies a `T` out of the front of `bytes`.
fn read_record<T: Copy>(bytes: &[u8], what: &'static str) -> Result<T, DecodeError> {
    let expected = size_of::<T>();
    if bytes.len() < expected {
        return Err(DecodeError::Short {
            what,
            len: bytes.len(),
            expected,
        });
    }
    // SAFETY: `bytes` contains at least `size_of::<T>()` bytes, the read is unaligned, and every `T`
    // used here is a `#[repr(C)]` record of integers and byte arrays, valid for any bit pattern.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Text up to the first NUL (or `limit` bytes), with invalid UTF-8 replaced.
fn c_string(bytes: &[u8], limit: usize) -> String {
    let bytes = &bytes[..limit.min(bytes.len())];
    let end = bytes
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn decode_exec(bytes: &[u8]) -> Result<Event, DecodeError> {
    let record: ExecRecord = read_record(bytes, "exec record")?;
    let filename_len = (record.filename_len as usize).min(FILENAME_BYTES);
    let argv_len = (record.argv_len as usize).min(ARGV_CAPTURE_BYTES);
    let argv = split_argv(&record.argv[..argv_len]);

    Ok(Event::Exec(ExecEvent {
        ktime_ns: record.header.ktime_ns,
        pid: record.header.pid,
        tid: record.header.tid,
        filename: c_string(&record.filename, filename_len),
        argv,
        argv_truncated: record.flags & EXEC_FLAG_ARGV_TRUNCATED != 0,
        uid: record.uid,
        gid: record.gid,
        cgroup_id: record.header.cgroup_id,
        comm: c_string(&record.comm, record.comm.len()),
        lineage: if record.flags & EXEC_FLAG_LINEAGE_UNKNOWN != 0 {
            None
        } else {
            lineage(&record.lineage)
        },
        exe_name: c_string(
            &record.exe_name,
            (record.exe_name_len as usize).min(EXE_NAME_BYTES),
        ),
        exe_unlinked: (record.flags & EXEC_FLAG_EXE_UNKNOWN == 0)
            .then_some(record.flags & EXEC_FLAG_EXE_UNLINKED != 0),
        namespace_pid: (record.ns_pid != 0).then_some((record.ns_pid, record.ns_level)),
    }))
}

/// Converts the raw lineage, or returns `None` when the kernel program left it empty: every real
/// process has a parent and a start time.
fn lineage(raw: &agent_common::Lineage) -> Option<Lineage> {
    (raw.parent_tgid != 0 || raw.start_boottime_ns != 0).then_some(Lineage {
        parent_pid: raw.parent_tgid,
        start_boottime_ns: raw.start_boottime_ns,
        parent_start_boottime_ns: raw.parent_start_boottime_ns,
    })
}

/// Splits NUL-terminated arguments. The last one has no NUL when argv was cut inside it.
fn split_argv(bytes: &[u8]) -> Vec<String> {
    if bytes.is_empty() {
        return Vec::new();
    }
    let body = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    body.split(|&byte| byte == 0)
        .map(|piece| String::from_utf8_lossy(piece).into_owned())
        .collect()
}

fn decode_fork(bytes: &[u8]) -> Result<Event, DecodeError> {
    let record: ForkRecord = read_record(bytes, "fork record")?;
    Ok(Event::Fork(ForkEvent {
        ktime_ns: record.header.ktime_ns,
        parent_pid: record.header.pid,
        child_pid: record.child_pid,
        cgroup_id: record.header.cgroup_id,
    }))
}

fn decode_exit(bytes: &[u8]) -> Result<Event, DecodeError> {
    let record: ExitRecord = read_record(bytes, "exit record")?;
    Ok(Event::Exit(ExitEvent {
        ktime_ns: record.header.ktime_ns,
        pid: record.header.pid,
        tid: record.header.tid,
        exit_code: (record.has_exit_code != 0).then_some(record.exit_code),
        lineage: lineage(&record.lineage),
    }))
}

fn decode_tcp(bytes: &[u8]) -> Result<Event, DecodeError> {
    let record: TcpRecord = read_record(bytes, "TCP record")?;
    let kind = match TcpKind::try_from(record.event)
        .map_err(|unknown| DecodeError::UnknownTcpEvent(unknown.0))?
    {
        TcpKind::Connect => TcpEventKind::Connect,
        TcpKind::Connected => TcpEventKind::Connected,
        TcpKind::ConnectFailed => TcpEventKind::ConnectFailed,
        TcpKind::Listen => TcpEventKind::Listen,
        TcpKind::Accepted => TcpEventKind::Accepted,
        TcpKind::Close => TcpEventKind::Close,
    };
    let (local, remote) = match record.family {
        FAMILY_INET => (ipv4(&record.saddr), ipv4(&record.daddr)),
        FAMILY_INET6 => (ipv6(record.saddr), ipv6(record.daddr)),
        other => return Err(DecodeError::UnknownFamily(other)),
    };
    Ok(Event::Tcp(TcpEvent {
        ktime_ns: record.header.ktime_ns,
        kind,
        pid: record.header.pid,
        netns: record.netns,
        local: SocketAddr::new(local, record.sport),
        remote: SocketAddr::new(remote, record.dport),
        sock: record.skaddr,
        bytes_sent: record.bytes_sent,
        bytes_received: record.bytes_received,
        error: record.sk_err,
        lineage: lineage(&record.lineage),
        exe_unlinked: record.flags & TCP_FLAG_EXE_UNLINKED != 0,
        cgroup_id: record.header.cgroup_id,
        folded_client: (kind == TcpEventKind::Accepted && record.header.tid != 0)
            .then_some((record.header.tid, record.header._reserved)),
    }))
}

/// Names the flow of a [`MAP_FOLDS`](agent_common::MAP_FOLDS) entry with the addresses the TCP
/// records of its connections carry, or `None` for an unknown family or direction.
pub fn folded_flow(key: &FoldKey) -> Option<FoldedFlow> {
    let address = |raw: &[u8; 16]| match key.family {
        FAMILY_INET => Some(ipv4(raw)),
        FAMILY_INET6 => Some(ipv6(*raw)),
        _ => None,
    };
    let remote = address(&key.remote_addr)?;
    match key.direction {
        FOLD_OUT => Some(FoldedFlow::Out { netns: key.netns, pid: key.pid, server: SocketAddr::new(remote, key.remote_port) }),
        FOLD_IN => Some(FoldedFlow::In {
            netns: key.netns,
            server: SocketAddr::new(address(&key.local_addr)?, key.local_port),
            client: remote,
        }),
        _ => None,
    }
}

/// Converts an IPv6 address, returning the IPv4 address it carries when it is IPv4-mapped
/// (`::ffff:a.b.c.d`). A dual-stack socket reports an IPv4 peer that way, and one endpoint should
/// have one spelling.
fn ipv6(address: [u8; 16]) -> IpAddr {
    let address = Ipv6Addr::from(address);
    match address.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(address),
    }
}

fn ipv4(address: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        address[0], address[1], address[2], address[3],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::{RecordHeader, COMM_BYTES};

    fn tcp_record(family: u16, saddr: [u8; 16], daddr: [u8; 16]) -> TcpRecord {
        TcpRecord {
            header: header(RecordKind::Tcp as u32),
            event: TcpKind::Connected as u32,
            netns: 4026531840,
            skaddr: 0xffff_0000_1234,
            family,
            sport: 40000,
            dport: 8080,
            _reserved: 0,
            saddr,
            daddr,
            bytes_sent: 0,
            bytes_received: 0,
            sk_err: 0,
            flags: 0,
            lineage: agent_common::Lineage::default(),
        }
    }

    fn bytes_of<T>(record: &T) -> Vec<u8> {
        // SAFETY: records are plain `#[repr(C)]` data without padding.
        unsafe { std::slice::from_raw_parts((record as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    fn header(kind: u32) -> RecordHeader {
        RecordHeader {
            kind,
            pid: 42,
            tid: 43,
            _reserved: 0,
            ktime_ns: 7,
            cgroup_id: 99,
        }
    }

    fn exec_record(argv: &[u8], flags: u32) -> ExecRecord {
        let mut record = ExecRecord {
            header: header(RecordKind::Exec as u32),
            uid: 1000,
            gid: 1001,
            flags,
            filename_len: 9,
            argv_len: argv.len() as u32,
            _reserved: 0,
            comm: [0; COMM_BYTES],
            filename: [0; FILENAME_BYTES],
            argv: [0; ARGV_CAPTURE_BYTES],
            lineage: agent_common::Lineage {
                parent_tgid: 41,
                _reserved: 0,
                start_boottime_ns: 5,
                parent_start_boottime_ns: 4,
            },
            exe_name_len: 0,
            _reserved2: 0,
            exe_name: [0; EXE_NAME_BYTES],
            ns_pid: 0,
            ns_level: 0,
        };
        record.comm[..4].copy_from_slice(b"true");
        record.filename[..9].copy_from_slice(b"/bin/true");
        record.argv[..argv.len()].copy_from_slice(argv);
        record
    }

    #[test]
    fn exec_record_decodes_argv_and_identity() {
        let record = exec_record(b"/bin/true\0--flag\0\0last\0", 0);
        let Event::Exec(event) = decode(&bytes_of(&record)).unwrap() else {
            panic!("not exec")
        };
        assert_eq!(event.argv, ["/bin/true", "--flag", "", "last"]);
        assert_eq!(event.filename, "/bin/true");
        assert_eq!(event.comm, "true");
        assert_eq!(
            (event.pid, event.tid, event.uid, event.gid),
            (42, 43, 1000, 1001)
        );
        assert_eq!(event.cgroup_id, 99);
        assert!(!event.argv_truncated);
    }

    #[test]
    fn exec_record_keeps_cut_last_argument() {
        let record = exec_record(b"cmd\0partial", EXEC_FLAG_ARGV_TRUNCATED);
        let Event::Exec(event) = decode(&bytes_of(&record)).unwrap() else {
            panic!("not exec")
        };
        assert_eq!(event.argv, ["cmd", "partial"]);
        assert!(event.argv_truncated);
    }

    #[test]
    fn exec_record_with_empty_argv() {
        let record = exec_record(b"", 0);
        let Event::Exec(event) = decode(&bytes_of(&record)).unwrap() else {
            panic!("not exec")
        };
        assert!(event.argv.is_empty(), "{:?}", event.argv);
    }

    #[test]
    fn tcp_record_decodes_ipv6_tuple() {
        let mut saddr = [0u8; 16];
        saddr[15] = 1;
        let record = tcp_record(FAMILY_INET6, saddr, saddr);
        let Event::Tcp(event) = decode(&bytes_of(&record)).unwrap() else {
            panic!("not tcp")
        };
        assert_eq!(event.kind, TcpEventKind::Connected);
        assert_eq!(event.local, "[::1]:40000".parse().unwrap());
        assert_eq!(event.remote, "[::1]:8080".parse().unwrap());
        assert_eq!(event.netns, 4026531840);
    }

    #[test]
    fn tcp_record_decodes_ipv4_tuple() {
        let mut saddr = [0u8; 16];
        saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let mut daddr = [0u8; 16];
        daddr[..4].copy_from_slice(&[10, 1, 2, 3]);
        let record = tcp_record(FAMILY_INET, saddr, daddr);
        let Event::Tcp(event) = decode(&bytes_of(&record)).unwrap() else {
            panic!("not tcp")
        };
        assert_eq!(event.local, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(event.remote, "10.1.2.3:8080".parse().unwrap());
    }

    #[test]
    fn tcp_record_shows_ipv4_mapped_ipv6_as_ipv4() {
        let mut mapped = [0u8; 16];
        mapped[10..12].copy_from_slice(&[0xff, 0xff]);
        mapped[12..].copy_from_slice(&[192, 0, 2, 7]);
        let mut plain = [0u8; 16];
        plain[15] = 1;
        let record = tcp_record(FAMILY_INET6, mapped, plain);
        let Event::Tcp(event) = decode(&bytes_of(&record)).unwrap() else {
            panic!("not tcp")
        };
        assert_eq!(event.local, "192.0.2.7:40000".parse().unwrap());
        assert_eq!(event.remote, "[::1]:8080".parse().unwrap());
    }

    #[test]
    fn exec_record_carries_lineage_and_exe_flags() {
        let mut record = exec_record(b"x\0", EXEC_FLAG_EXE_UNLINKED);
        record.exe_name[..10].copy_from_slice(b"memfd:evil");
        record.exe_name_len = 10;
        let Event::Exec(event) = decode(&bytes_of(&record)).unwrap() else {
            panic!("not exec")
        };
        assert_eq!(
            event.lineage,
            Some(Lineage {
                parent_pid: 41,
                start_boottime_ns: 5,
                parent_start_boottime_ns: 4
            })
        );
        assert_eq!(event.exe_unlinked, Some(true));
        assert!(event.fileless());

        let unknown = exec_record(b"x\0", EXEC_FLAG_EXE_UNKNOWN | EXEC_FLAG_LINEAGE_UNKNOWN);
        let Event::Exec(event) = decode(&bytes_of(&unknown)).unwrap() else {
            panic!("not exec")
        };
        assert_eq!((event.exe_unlinked, event.lineage), (None, None));
    }

    fn udp_record(family: u16, saddr: [u8; 16], daddr: [u8; 16]) -> UdpRecord {
        UdpRecord {
            header: header(RecordKind::Udp as u32),
            event: UdpKind::Send as u32,
            netns: 4026531840,
            cookie: 77,
            family,
            sport: 40000,
            dport: 53,
            _reserved: 0,
            saddr,
            daddr,
        }
    }

    #[test]
    fn udp_record_decodes_ipv4_tuple() {
        let mut saddr = [0u8; 16];
        saddr[..4].copy_from_slice(&[198, 18, 1, 10]);
        let mut daddr = [0u8; 16];
        daddr[..4].copy_from_slice(&[198, 18, 3, 53]);
        let Event::Udp(event) = decode(&bytes_of(&udp_record(FAMILY_INET, saddr, daddr))).unwrap() else {
            panic!("not udp")
        };
        assert_eq!(event.kind, UdpEventKind::Send);
        assert_eq!((event.pid, event.tid, event.cookie, event.netns), (42, 43, 77, 4026531840));
        assert_eq!(event.local, "198.18.1.10:40000".parse().unwrap());
        assert_eq!(event.remote, "198.18.3.53:53".parse().unwrap());
    }

    #[test]
    fn udp_record_from_dual_stack_socket_shows_ipv4() {
        // An IPv4 destination from an IPv6 socket bound to an IPv4-mapped address.
        let mut saddr = [0u8; 16];
        saddr[10..12].copy_from_slice(&[0xff, 0xff]);
        saddr[12..].copy_from_slice(&[198, 18, 1, 10]);
        let mut daddr = [0u8; 16];
        daddr[..4].copy_from_slice(&[198, 18, 3, 53]);
        let Event::Udp(event) = decode(&bytes_of(&udp_record(FAMILY_INET, saddr, daddr))).unwrap() else {
            panic!("not udp")
        };
        assert_eq!(event.local, "198.18.1.10:40000".parse().unwrap());
        assert_eq!(event.remote, "198.18.3.53:53".parse().unwrap());
    }

    #[test]
    fn udp_bind_record_is_listener_address() {
        let mut saddr = [0u8; 16];
        saddr[..4].copy_from_slice(&[198, 18, 1, 10]);
        let mut record = udp_record(FAMILY_INET, saddr, [0; 16]);
        record.event = UdpKind::Bind as u32;
        record.sport = 514;
        record.dport = 0;
        let Event::Udp(event) = decode(&bytes_of(&record)).unwrap() else { panic!("not udp") };
        assert_eq!(event.kind, UdpEventKind::Bind);
        assert_eq!(event.local, "198.18.1.10:514".parse().unwrap());
        assert_eq!(event.remote, "0.0.0.0:0".parse().unwrap());
    }

    #[test]
    fn udp_record_with_unknown_event_is_rejected() {
        let mut record = udp_record(FAMILY_INET, [0; 16], [0; 16]);
        record.event = 9;
        assert_eq!(decode(&bytes_of(&record)).unwrap_err(), DecodeError::UnknownUdpEvent(9));
        record.event = UdpKind::Connect as u32;
        record.family = 1;
        assert_eq!(
            decode(&bytes_of(&record)).unwrap_err(),
            DecodeError::UnknownFamilyIn { family: 1, what: "UDP record" }
        );
    }

    #[test]
    fn dns_record_keeps_captured_bytes_only() {
        let mut record = DnsRecord {
            header: header(RecordKind::Dns as u32),
            cookie: 77,
            family: FAMILY_INET6,
            sport: 53,
            dport: 40000,
            _reserved: 0,
            message_len: 5000,
            captured_len: 5000,
            saddr: [0; 16],
            data: [7; DNS_CAPTURE_BYTES],
        };
        record.saddr[15] = 1;
        let Event::Dns(event) = decode(&bytes_of(&record)).unwrap() else { panic!("not dns") };
        assert_eq!(event.message.len(), DNS_CAPTURE_BYTES);
        assert_eq!(event.message_len, 5000);
        assert_eq!(event.server, "[::1]:53".parse().unwrap());
        assert_eq!((event.cookie, event.local_port), (77, 40000));
    }

    #[test]
    fn accept_record_decodes_acceptor_and_tuple() {
        let mut mapped = [0u8; 16];
        mapped[10..12].copy_from_slice(&[0xff, 0xff]);
        mapped[12..].copy_from_slice(&[198, 18, 0, 3]);
        let mut remote = [0u8; 16];
        remote[..4].copy_from_slice(&[198, 18, 0, 2]);
        let record = AcceptRecord {
            header: header(RecordKind::Accept as u32),
            skaddr: 0xffff_0000_5678,
            fd: 5,
            flags: TCP_FLAG_EXE_UNLINKED,
            netns: 4026531841,
            family: FAMILY_INET6,
            sport: 443,
            dport: 50000,
            _reserved: 0,
            _reserved2: 0,
            saddr: mapped,
            daddr: [0; 16],
            lineage: agent_common::Lineage { parent_tgid: 40, _reserved: 0, start_boottime_ns: 9, parent_start_boottime_ns: 8 },
        };
        let Event::Accept(event) = decode(&bytes_of(&record)).unwrap() else {
            panic!("not accept")
        };
        assert_eq!((event.pid, event.tid, event.fd), (42, 43, 5));
        assert_eq!(event.sock, 0xffff_0000_5678);
        assert_eq!(event.netns, 4026531841);
        assert_eq!(event.local, "198.18.0.3:443".parse().unwrap());
        assert_eq!(event.remote, "[::]:50000".parse().unwrap());
        assert_eq!(event.lineage.map(|lineage| lineage.parent_pid), Some(40));
        assert!(event.exe_unlinked);

        let ipv4 = AcceptRecord { family: FAMILY_INET, saddr: remote, daddr: remote, ..record };
        let Event::Accept(event) = decode(&bytes_of(&ipv4)).unwrap() else {
            panic!("not accept")
        };
        assert_eq!(event.remote, "198.18.0.2:50000".parse().unwrap());
    }

    #[test]
    fn short_record_is_rejected() {
        let bytes = bytes_of(&exec_record(b"x\0", 0));
        let error = decode(&bytes[..100]).unwrap_err();
        assert_eq!(
            error,
            DecodeError::Short {
                what: "exec record",
                len: 100,
                expected: size_of::<ExecRecord>()
            }
        );
    }

    #[test]
    fn unknown_kind_is_rejected() {
        let bytes = bytes_of(&ForkRecord {
            header: header(77),
            child_pid: 1,
            _reserved: 0,
        });
        assert_eq!(decode(&bytes).unwrap_err(), DecodeError::UnknownKind(77));
    }

    #[test]
    fn header_shorter_than_32_bytes_is_rejected() {
        assert!(matches!(
            decode(&[1, 0, 0, 0]),
            Err(DecodeError::Short { .. })
        ));
    }
}
