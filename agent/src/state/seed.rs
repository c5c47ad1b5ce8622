//! Sockets that existed before the agent started, read from `/proc/<pid>/net/{tcp,tcp6,udp,udp6}`
//! once per network namespace and attributed to processes through the socket inodes in
//! `/proc/<pid>/fd`.
//!
//! Without this, a connection accepted on a listener opened before the agent has no owner: the
//! kernel reports accepts without a process, and the listen itself happened before any program
//! was attached. Listeners found here are also judged against the model like new ones.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

/// State of a seeded socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeededState {
    Listen,
    Established,
}

/// One socket found in /proc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeededSocket {
    pub state: SeededState,
    /// Network namespace inode.
    pub netns: u32,
    pub local: SocketAddr,
    /// Unspecified for a listener.
    pub remote: SocketAddr,
    /// Socket inode number.
    pub inode: u64,
    /// A process holding the socket open; 0 when no process does (a socket only the kernel
    /// holds, or one whose process the scan could not read).
    pub pid: u32,
}

// Socket states in /proc/net/tcp and udp, include/net/tcp_states.h. A UDP socket is
// established when connected and close otherwise.
const STATE_ESTABLISHED: u8 = 0x01;
const STATE_TIME_WAIT: u8 = 0x06;
const STATE_CLOSE: u8 = 0x07;
const STATE_LISTEN: u8 = 0x0a;

/// The sockets of [`scan_sockets`].
#[derive(Debug, Clone, Default)]
pub struct ScannedSockets {
    /// Listening and established TCP sockets.
    pub tcp: Vec<SeededSocket>,
    /// UDP sockets bound to a port and not connected, in state [`SeededState::Listen`]. A
    /// client's socket that took an ephemeral port to send looks the same in /proc.
    pub udp: Vec<SeededSocket>,
}

/// Reads the listening and established TCP sockets and the bound, unconnected UDP sockets of
/// every network namespace that a process under `proc_root` is in.
pub fn scan_sockets(proc_root: &Path) -> ScannedSockets {
    let mut scanned = ScannedSockets::default();
    let Ok(dir) = fs::read_dir(proc_root) else {
        tracing::warn!(path = %proc_root.display(), "cannot read /proc; sockets opened before the agent stay unattributed");
        return scanned;
    };
    let mut owners: HashMap<u64, u32> = HashMap::new();
    // One process per namespace is enough to read that namespace's tables.
    let mut namespaces: HashMap<u32, u32> = HashMap::new();
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
            continue;
        };
        let process_dir = entry.path();
        if let Some(netns) = fs::read_link(process_dir.join("ns/net")).ok().and_then(|link| bracketed_number(&link.to_string_lossy())) {
            namespaces.entry(netns as u32).or_insert(pid);
        }
        let Ok(fds) = fs::read_dir(process_dir.join("fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(link) = fs::read_link(fd.path()) else { continue };
            let link = link.to_string_lossy();
            if let Some(inode) = link.strip_prefix("socket:").and_then(bracketed_number) {
                // The lowest pid is the one that has held the socket longest in most cases.
                owners.entry(inode).and_modify(|owner| *owner = (*owner).min(pid)).or_insert(pid);
            }
        }
    }
    for (&netns, &pid) in &namespaces {
        for table in ["tcp", "tcp6", "udp", "udp6"] {
            let path = proc_root.join(pid.to_string()).join("net").join(table);
            let Ok(text) = fs::read_to_string(&path) else { continue };
            let udp = table.starts_with("udp");
            for line in text.lines().skip(1) {
                let parsed = if udp { parse_udp_line(line, netns) } else { parse_tcp_line(line, netns) };
                let Some(mut socket) = parsed else { continue };
                socket.pid = owners.get(&socket.inode).copied().unwrap_or(0);
                if udp {
                    scanned.udp.push(socket);
                } else {
                    scanned.tcp.push(socket);
                }
            }
        }
    }
    scanned
}

/// Returns the TCP connections that a process still has open, as (local, remote), in the
/// network namespace of process `pid`: every state from established to the last
/// acknowledgement. A socket that no process owns any more (inode 0, because its last owner
/// closed it and the kernel finishes the shutdown alone) or in TIME_WAIT is left out. `None` when the tables cannot be
/// read because the process is gone.
pub fn open_connections(proc_root: &Path, pid: u32) -> Option<HashSet<(SocketAddr, SocketAddr)>> {
    let mut connections = HashSet::new();
    let readable = for_each_tcp_socket(proc_root, pid, |fields| {
        let (Some(local), Some(remote), Some(state), Some(inode)) = (fields.get(1), fields.get(2), fields.get(3), fields.get(9))
        else {
            return;
        };
        let Ok(state) = u8::from_str_radix(state, 16) else { return };
        if matches!(state, STATE_LISTEN | STATE_CLOSE | STATE_TIME_WAIT) || *inode == "0" {
            return;
        }
        if let (Some(local), Some(remote)) = (parse_endpoint(local), parse_endpoint(remote)) {
            connections.insert((local, remote));
        }
    });
    readable.then_some(connections)
}

/// Returns the inode numbers of the listening TCP sockets in the network namespace of process
/// `pid`. `None` when the tables cannot be read because the process is gone.
pub fn listening_sockets(proc_root: &Path, pid: u32) -> Option<HashSet<u64>> {
    let mut inodes = HashSet::new();
    let readable = for_each_tcp_socket(proc_root, pid, |fields| {
        let (Some(state), Some(inode)) = (fields.get(3), fields.get(9)) else { return };
        if u8::from_str_radix(state, 16) == Ok(STATE_LISTEN) {
            inodes.extend(inode.parse::<u64>());
        }
    });
    readable.then_some(inodes)
}

/// Calls `visit` with the fields of each line of the IPv4 and IPv6 TCP tables in the network
/// namespace of process `pid`. Returns false when neither table could be read.
fn for_each_tcp_socket(proc_root: &Path, pid: u32, mut visit: impl FnMut(&[&str])) -> bool {
    let mut readable = false;
    for table in ["tcp", "tcp6"] {
        let Ok(text) = fs::read_to_string(proc_root.join(pid.to_string()).join("net").join(table)) else { continue };
        readable = true;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            visit(&fields);
        }
    }
    readable
}

/// Returns a process in the network namespace with inode `netns`, other than `except`, or `None`
/// when no process under `proc_root` is in it.
pub fn process_in_netns(proc_root: &Path, netns: u32, except: u32) -> Option<u32> {
    fs::read_dir(proc_root).ok()?.flatten().find_map(|entry| {
        let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
        let link = fs::read_link(entry.path().join("ns/net")).ok()?;
        (pid != except && bracketed_number(&link.to_string_lossy()) == Some(u64::from(netns))).then_some(pid)
    })
}

/// Parses the number in `[...]`, as in `socket:[123]` and `net:[4026531840]`.
fn bracketed_number(text: &str) -> Option<u64> {
    let start = text.find('[')? + 1;
    let end = text[start..].find(']')? + start;
    text[start..end].parse().ok()
}

/// Parses one line of `/proc/net/tcp` or `tcp6`; `None` for states other than listen and
/// established and for malformed lines.
fn parse_tcp_line(line: &str, netns: u32) -> Option<SeededSocket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let local = parse_endpoint(fields.get(1)?)?;
    let remote = parse_endpoint(fields.get(2)?)?;
    let state = match u8::from_str_radix(fields.get(3)?, 16).ok()? {
        STATE_LISTEN => SeededState::Listen,
        STATE_ESTABLISHED => SeededState::Established,
        _ => return None,
    };
    let inode = fields.get(9)?.parse().ok()?;
    Some(SeededSocket { state, netns, local, remote, inode, pid: 0 })
}

/// Parses one line of `/proc/net/udp` or `udp6`; `None` for connected sockets and malformed
/// lines.
fn parse_udp_line(line: &str, netns: u32) -> Option<SeededSocket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let local = parse_endpoint(fields.get(1)?)?;
    let remote = parse_endpoint(fields.get(2)?)?;
    if u8::from_str_radix(fields.get(3)?, 16).ok()? != STATE_CLOSE || remote.port() != 0 || local.port() == 0 {
        return None;
    }
    let inode = fields.get(9)?.parse().ok()?;
    Some(SeededSocket { state: SeededState::Listen, netns, local, remote, inode, pid: 0 })
}

/// Parses `ADDR:PORT` in the kernel's hex notation: the address as 32-bit words in host byte
/// order, the port in hex. IPv4-mapped IPv6 addresses come back as IPv4.
fn parse_endpoint(text: &str) -> Option<SocketAddr> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for chunk in address.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        16 => {
            let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(bytes.as_slice()).ok()?);
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipv4_and_ipv6_lines() {
        let v4 = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0";
        let socket = parse_tcp_line(v4, 7).unwrap();
        assert_eq!(socket.state, SeededState::Listen);
        assert_eq!(socket.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(socket.inode, 12345);
        let v6 = "   1: 00000000000000000000000001000000:01BB 0000000000000000FFFF00000200000A:C350 01 00000000:00000000 00:00000000 00000000     0        0 999 1 0000000000000000 20 4 30 10 -1";
        let socket = parse_tcp_line(v6, 7).unwrap();
        assert_eq!(socket.state, SeededState::Established);
        assert_eq!(socket.local, "[::1]:443".parse().unwrap());
        assert_eq!(socket.remote, "10.0.0.2:50000".parse().unwrap());
    }

    #[test]
    fn open_connections_keep_closing_states() {
        let root = tempfile::tempdir().unwrap();
        let net = root.path().join("42/net");
        fs::create_dir_all(&net).unwrap();
        let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";
        let line = |port: u16, state: &str, inode: u64| {
            format!("   0: 0100007F:1F90 0100007F:{port:04X} {state} 00000000:00000000 00:00000000 00000000     0        0 {inode} 1 0000000000000000 20 4 30 10 -1\n")
        };
        // Established, CLOSE_WAIT and LAST_ACK held by a process are open. TIME_WAIT, the
        // listener, and FIN_WAIT2 after the owner closed the socket (inode 0) are not.
        let table = [
            line(40001, "01", 7),
            line(40002, "08", 8),
            line(40003, "09", 9),
            line(40004, "06", 0),
            line(0, "0A", 10),
            line(40005, "05", 0),
        ]
        .concat();
        fs::write(net.join("tcp"), format!("{header}{table}")).unwrap();

        let open = open_connections(root.path(), 42).unwrap();
        let ports: std::collections::BTreeSet<u16> = open.iter().map(|(_, remote)| remote.port()).collect();
        assert_eq!(ports, [40001, 40002, 40003].into());
        assert!(open.contains(&("127.0.0.1:8080".parse().unwrap(), "127.0.0.1:40001".parse().unwrap())));
        assert_eq!(open_connections(root.path(), 43), None, "a process without tables");
    }

    #[test]
    fn parses_unconnected_udp_lines_only() {
        let bound = "  123: 00000000:0202 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4242 2 0000000000000000 0";
        let socket = parse_udp_line(bound, 7).unwrap();
        assert_eq!(socket.state, SeededState::Listen);
        assert_eq!(socket.local, "0.0.0.0:514".parse().unwrap());
        assert_eq!(socket.inode, 4242);
        let connected = "  124: 0100007F:A000 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 4243 2 0000000000000000 0";
        assert_eq!(parse_udp_line(connected, 7), None);
    }

    #[test]
    fn scan_finds_this_process_listener_and_its_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(server).unwrap();
        let client_addr = client.local_addr().unwrap();
        let netns = fs::read_link("/proc/self/ns/net").ok().and_then(|link| bracketed_number(&link.to_string_lossy())).unwrap() as u32;

        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_addr = udp.local_addr().unwrap();

        let scanned = scan_sockets(Path::new("/proc"));
        let sockets = &scanned.tcp;
        let me = std::process::id();
        assert!(
            sockets.iter().any(|socket| socket.state == SeededState::Listen && socket.local == server && socket.pid == me && socket.netns == netns),
            "{sockets:?}"
        );
        assert!(
            sockets.iter().any(|socket| socket.state == SeededState::Established && socket.local == client_addr && socket.remote == server && socket.pid == me),
            "{sockets:?}"
        );
        assert!(
            scanned.udp.iter().any(|socket| socket.local == udp_addr && socket.pid == me && socket.netns == netns),
            "{:?}",
            scanned.udp
        );
    }
}
