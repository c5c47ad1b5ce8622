//! API addresses: a unix socket or a TCP address.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

/// Socket path used when no address is given.
pub const DEFAULT_SOCKET_PATH: &str = "/run/driftwatch/api.sock";

/// An API address: `unix:/path/to.sock`, `IP:PORT` or `[IPv6]:PORT`.
///
/// Any TCP address parses. Whether plaintext is allowed on it is the caller's decision
/// ([`ListenAddr::is_local`]): the agent requires TLS on non-loopback addresses unless told
/// otherwise, because anyone who reaches the port could read the deviations and the graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// Errors from parsing a [`ListenAddr`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ListenAddrError {
    #[error(
        "invalid API address {0:?}: expected unix:/path/to.sock, IP:PORT or [IPv6]:PORT"
    )]
    Invalid(String),
    #[error("invalid API address {0:?}: the unix socket path must be absolute")]
    RelativeSocketPath(String),
}

impl Default for ListenAddr {
    fn default() -> Self {
        ListenAddr::Unix(PathBuf::from(DEFAULT_SOCKET_PATH))
    }
}

impl FromStr for ListenAddr {
    type Err = ListenAddrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(path) = text.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(ListenAddrError::RelativeSocketPath(text.to_owned()));
            }
            return Ok(ListenAddr::Unix(path));
        }

        let addr: SocketAddr = text
            .parse()
            .map_err(|_| ListenAddrError::Invalid(text.to_owned()))?;
        Ok(ListenAddr::Tcp(addr))
    }
}

impl ListenAddr {
    /// Returns true for a unix socket or a loopback TCP address, which only this host can reach.
    pub fn is_local(&self) -> bool {
        match self {
            ListenAddr::Unix(_) => true,
            ListenAddr::Tcp(addr) => addr.ip().is_loopback(),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_socket_path() {
        let addr: ListenAddr = "unix:/tmp/x/api.sock".parse().unwrap();
        assert_eq!(addr, ListenAddr::Unix(PathBuf::from("/tmp/x/api.sock")));
        assert_eq!(addr.to_string(), "unix:/tmp/x/api.sock");
    }

    #[test]
    fn parses_loopback_tcp_addresses() {
        let v4: ListenAddr = "127.0.0.1:7070".parse().unwrap();
        assert_eq!(v4, ListenAddr::Tcp("127.0.0.1:7070".parse().unwrap()));
        let v6: ListenAddr = "[::1]:7070".parse().unwrap();
        assert_eq!(v6.to_string(), "[::1]:7070");
    }

    #[test]
    fn only_unix_and_loopback_are_local() {
        for text in ["0.0.0.0:7070", "192.168.1.4:7070", "[::]:7070"] {
            let addr: ListenAddr = text.parse().unwrap();
            assert!(!addr.is_local(), "{text}");
        }
        for text in ["unix:/run/x.sock", "127.0.0.1:7070", "127.3.4.5:1", "[::1]:7070"] {
            let addr: ListenAddr = text.parse().unwrap();
            assert!(addr.is_local(), "{text}");
        }
    }

    #[test]
    fn rejects_relative_socket_and_garbage() {
        assert_eq!(
            "unix:api.sock".parse::<ListenAddr>(),
            Err(ListenAddrError::RelativeSocketPath("unix:api.sock".into()))
        );
        assert_eq!(
            "localhost".parse::<ListenAddr>(),
            Err(ListenAddrError::Invalid("localhost".into()))
        );
    }

    #[test]
    fn default_is_run_socket() {
        assert_eq!(
            ListenAddr::default().to_string(),
            "unix:/run/driftwatch/api.sock"
        );
    }
}
