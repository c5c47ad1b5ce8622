//! API addresses: a unix socket, or a TCP port on a loopback address.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

/// Socket path used when no address is given.
pub const DEFAULT_SOCKET_PATH: &str = "/run/driftwatch/api.sock";

/// An API address: `unix:/path/to.sock`, `127.0.0.1:PORT` or `[::1]:PORT`.
///
/// TCP addresses must be loopback because the API has no TLS yet, so anyone who can reach the
/// port could read the deviations and the graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// Errors from parsing a [`ListenAddr`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ListenAddrError {
    #[error(
        "invalid API address {0:?}: expected unix:/path/to.sock, 127.0.0.1:PORT or [::1]:PORT"
    )]
    Invalid(String),
    #[error("invalid API address {0:?}: the unix socket path must be absolute")]
    RelativeSocketPath(String),
    #[error(
        "API address {0} is not a loopback address; the API has no TLS yet, so listen on a unix \
         socket, 127.0.0.1 or [::1]"
    )]
    NotLoopback(SocketAddr),
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
        if !addr.ip().is_loopback() {
            return Err(ListenAddrError::NotLoopback(addr));
        }
        Ok(ListenAddr::Tcp(addr))
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
    fn rejects_non_loopback_tcp() {
        for text in ["0.0.0.0:7070", "192.168.1.4:7070", "[::]:7070"] {
            let err = text.parse::<ListenAddr>().unwrap_err();
            assert!(
                matches!(err, ListenAddrError::NotLoopback(_)),
                "{text}: {err}"
            );
            assert!(err.to_string().contains("no TLS"), "{err}");
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
