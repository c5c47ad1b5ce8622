//! Which end of a UDP flow is the server.
//!
//! The kernel reports a UDP flow from the socket that sent the first datagram, so a server's
//! reply is reported as a flow from the server to the client's ephemeral port. Like conntrack,
//! the agent distinguishes the two by ports: a datagram from a fixed port to a port in the kernel's
//! ephemeral range is a reply, and the flow it belongs to goes from the client to the fixed port.

use std::collections::VecDeque;
use std::fmt;
use std::hash::Hash;
use std::net::SocketAddr;
use std::path::Path;

use driftwatch_model::FastMap;

/// The file that contains the kernel's ephemeral port range for the reader's network namespace.
pub const LOCAL_PORT_RANGE_PATH: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// The range of ports the kernel picks local ports from when a socket binds to port 0 or sends
/// unbound (`net.ipv4.ip_local_port_range`), with both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EphemeralPorts {
    first: u16,
    last: u16,
}

/// An error reading the ephemeral port range.
#[derive(Debug, thiserror::Error)]
pub enum PortRangeError {
    #[error("failed to read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid port range {text:?} in {path}: expected two ports, the first not above the second")]
    Invalid { path: String, text: String },
}

impl EphemeralPorts {
    /// The kernel's default range, 32768-60999.
    pub const LINUX_DEFAULT: EphemeralPorts = EphemeralPorts { first: 32768, last: 60999 };

    /// Returns the range `first..=last`, or `None` when `first` is above `last`.
    pub fn new(first: u16, last: u16) -> Option<EphemeralPorts> {
        (first <= last).then_some(EphemeralPorts { first, last })
    }

    /// Reads the range of the agent's own network namespace, or returns
    /// [`EphemeralPorts::LINUX_DEFAULT`] with a warning when the file is missing or invalid.
    // NOTE: each network namespace has its own range, and a container that changed its range
    // has its UDP flows judged by the agent's range.
    pub fn read_or_default() -> EphemeralPorts {
        match EphemeralPorts::read(Path::new(LOCAL_PORT_RANGE_PATH)) {
            Ok(range) => {
                tracing::info!(range = %range, "read the ephemeral port range for UDP replies");
                range
            }
            Err(error) => {
                tracing::warn!(
                    error = %error,
                    fallback = %EphemeralPorts::LINUX_DEFAULT,
                    "using the default ephemeral port range; UDP replies to ports outside it are reported as flows from the server"
                );
                EphemeralPorts::LINUX_DEFAULT
            }
        }
    }

    /// Reads a range in the format of `ip_local_port_range`: two ports separated by whitespace.
    pub fn read(path: &Path) -> Result<EphemeralPorts, PortRangeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| PortRangeError::Read { path: path.display().to_string(), source })?;
        EphemeralPorts::parse(&text).ok_or_else(|| PortRangeError::Invalid {
            path: path.display().to_string(),
            text: text.trim().to_string(),
        })
    }

    fn parse(text: &str) -> Option<EphemeralPorts> {
        let mut ports = text.split_whitespace().map(str::parse::<u16>);
        let (Some(Ok(first)), Some(Ok(last)), None) = (ports.next(), ports.next(), ports.next()) else {
            return None;
        };
        EphemeralPorts::new(first, last)
    }

    pub fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl Default for EphemeralPorts {
    fn default() -> Self {
        EphemeralPorts::LINUX_DEFAULT
    }
}

impl fmt::Display for EphemeralPorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// Returns true when a datagram sent from `local_port` to `remote_port` is a server's reply to
/// a client: the local port is fixed (bound, and outside the ephemeral range) and the remote
/// port is ephemeral. Port 0 is a socket not bound yet, which the kernel binds to an ephemeral
/// port as it sends, so it is a client.
///
/// Two fixed ports (NTP from 123 to 123, syslog from a bound port to 514) and two ephemeral
/// ports (peer-to-peer media) keep the direction the datagram took.
// NOTE: a client that binds a fixed port below the range is taken for a server when it talks
// to a service on a port inside the range (a game or media server on 50000, say). Its flow is
// then reported in the wrong direction, to its own fixed port.
pub fn is_udp_reply(local_port: u16, remote_port: u16, ephemeral: EphemeralPorts) -> bool {
    local_port != 0 && !ephemeral.contains(local_port) && ephemeral.contains(remote_port)
}

/// A process and a peer it read datagrams from: (pid, network namespace, peer address).
pub type ReceivedPeer = (u32, u32, SocketAddr);

/// The peers each process read datagrams from, so that a server's reply to a peer is not taken
/// as a second observation of the flow its receive already reported. A reply to a forgotten peer
/// is observed as a reply again.
pub type ReceivedPeers = RecentSet<ReceivedPeer>;

/// A set that keeps the last `capacity` keys inserted: the oldest goes first when it is full.
pub struct RecentSet<K> {
    keys: FastMap<K, ()>,
    order: VecDeque<K>,
    capacity: usize,
}

impl<K: Copy + Eq + Hash> RecentSet<K> {
    pub fn new(capacity: usize) -> RecentSet<K> {
        RecentSet { keys: FastMap::default(), order: VecDeque::new(), capacity: capacity.max(1) }
    }

    pub fn insert(&mut self, key: K) {
        if self.keys.contains_key(&key) {
            return;
        }
        if self.order.len() >= self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.keys.remove(&oldest);
            }
        }
        self.keys.insert(key, ());
        self.order.push_back(key);
    }

    pub fn contains(&self, key: &K) -> bool {
        self.keys.contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_peers_forget_the_oldest_first() {
        let peer = |port: u16| SocketAddr::from(([198, 18, 1, 10], port));
        let mut peers = ReceivedPeers::new(2);
        peers.insert((7, 1, peer(40000)));
        peers.insert((7, 1, peer(40000)));
        peers.insert((7, 1, peer(40001)));
        assert!(peers.contains(&(7, 1, peer(40000))));
        assert!(!peers.contains(&(8, 1, peer(40000))), "another process");
        assert!(!peers.contains(&(7, 2, peer(40000))), "another namespace");
        peers.insert((7, 1, peer(40002)));
        assert!(!peers.contains(&(7, 1, peer(40000))), "the oldest entry goes first");
        assert!(peers.contains(&(7, 1, peer(40001))));
        assert!(peers.contains(&(7, 1, peer(40002))));
    }

    const RANGE: EphemeralPorts = EphemeralPorts::LINUX_DEFAULT;

    #[test]
    fn server_reply_to_ephemeral_port() {
        // A DNS server on 53 answers a client on 55418.
        assert!(is_udp_reply(53, 55418, RANGE));
        assert!(is_udp_reply(5353, 32768, RANGE));
        assert!(is_udp_reply(514, 60999, RANGE));
    }

    #[test]
    fn client_from_ephemeral_port_stays_sent() {
        assert!(!is_udp_reply(55418, 53, RANGE));
        assert!(!is_udp_reply(40000, 7000, RANGE));
    }

    #[test]
    fn two_fixed_ports_stay_sent() {
        assert!(!is_udp_reply(123, 123, RANGE));
        assert!(!is_udp_reply(1514, 514, RANGE));
        // Just outside the range on either side.
        assert!(!is_udp_reply(53, 32767, RANGE));
        assert!(!is_udp_reply(53, 61000, RANGE));
    }

    #[test]
    fn two_ephemeral_ports_stay_sent() {
        assert!(!is_udp_reply(40000, 50000, RANGE));
    }

    #[test]
    fn unbound_local_port_stays_sent() {
        assert!(!is_udp_reply(0, 55418, RANGE));
        assert!(!is_udp_reply(0, 53, RANGE));
    }

    #[test]
    fn fixed_client_to_high_port_flips() {
        // The known mistake: a client bound to 5000 talking to a service on 50000.
        assert!(is_udp_reply(5000, 50000, RANGE));
    }

    #[test]
    fn reply_follows_configured_range() {
        let narrow = EphemeralPorts::new(10000, 20000).unwrap();
        assert!(is_udp_reply(53, 15000, narrow));
        assert!(!is_udp_reply(53, 55418, narrow));
        assert!(!is_udp_reply(15000, 53, narrow));
    }

    #[test]
    fn parse_accepts_kernel_format() {
        assert_eq!(EphemeralPorts::parse("32768\t60999\n"), Some(RANGE));
        assert_eq!(EphemeralPorts::parse("1024 1024"), EphemeralPorts::new(1024, 1024));
    }

    #[test]
    fn parse_rejects_invalid_ranges() {
        for text in ["", "32768", "32768 60999 1", "60999 32768", "0x10 20", "32768 70000", "-1 5"] {
            assert_eq!(EphemeralPorts::parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn read_names_path_of_invalid_file() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "60999 32768\n").unwrap();
        let error = EphemeralPorts::read(file.path()).unwrap_err().to_string();
        assert!(error.contains(&file.path().display().to_string()), "{error}");
        assert!(error.contains("\"60999 32768\""), "{error}");
    }

    #[test]
    fn read_reports_missing_file() {
        let error = EphemeralPorts::read(Path::new("/nonexistent/ip_local_port_range")).unwrap_err();
        assert!(matches!(error, PortRangeError::Read { .. }), "{error}");
    }
}
