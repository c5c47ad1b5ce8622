//! The address an agent pushes to: a unix socket, an IP address, or a DNS name such as a
//! Kubernetes Service.

use std::fmt;
use std::str::FromStr;

use crate::api::ListenAddr;

/// A collector address: `unix:/path/to.sock`, `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CollectorAddr {
    /// A unix socket or an IP address with a port.
    Addr(ListenAddr),
    /// A DNS name with a port, resolved again at every connect, so that a collector that moves
    /// to another address is found after the next reconnect.
    Host { host: String, port: u16 },
}

/// Errors from parsing a [`CollectorAddr`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid collector address {0:?}: expected unix:/path/to.sock, IP:PORT, [IPv6]:PORT or HOST:PORT")]
pub struct CollectorAddrError(String);

impl FromStr for CollectorAddr {
    type Err = CollectorAddrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Ok(addr) = text.parse::<ListenAddr>() {
            return Ok(CollectorAddr::Addr(addr));
        }
        let invalid = || CollectorAddrError(text.to_owned());
        if text.starts_with("unix:") {
            return Err(invalid());
        }
        let (host, port) = text.rsplit_once(':').ok_or_else(invalid)?;
        let port: u16 = port.parse().map_err(|_| invalid())?;
        if !is_dns_name(host) {
            return Err(invalid());
        }
        Ok(CollectorAddr::Host { host: host.to_owned(), port })
    }
}

/// Returns true for a host name of letters, digits, hyphens and dots, with no empty label.
fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

impl CollectorAddr {
    /// Returns true for a unix socket, a loopback IP address or `localhost`, which only this host
    /// can reach.
    pub fn is_local(&self) -> bool {
        match self {
            CollectorAddr::Addr(addr) => addr.is_local(),
            CollectorAddr::Host { host, .. } => host.eq_ignore_ascii_case("localhost"),
        }
    }
}

impl fmt::Display for CollectorAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CollectorAddr::Addr(addr) => addr.fmt(f),
            CollectorAddr::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_addr_accepts_ip_socket_and_name() {
        assert_eq!(
            "127.0.0.1:7443".parse::<CollectorAddr>(),
            Ok(CollectorAddr::Addr(ListenAddr::Tcp("127.0.0.1:7443".parse().unwrap())))
        );
        assert_eq!(
            "unix:/run/c.sock".parse::<CollectorAddr>(),
            Ok(CollectorAddr::Addr(ListenAddr::Unix("/run/c.sock".into())))
        );
        let name = "driftwatch-collector.driftwatch.svc:7443".parse::<CollectorAddr>().unwrap();
        assert_eq!(
            name,
            CollectorAddr::Host { host: "driftwatch-collector.driftwatch.svc".into(), port: 7443 }
        );
        assert_eq!(name.to_string(), "driftwatch-collector.driftwatch.svc:7443");
        assert!(!name.is_local());
        assert!("localhost:7443".parse::<CollectorAddr>().unwrap().is_local());
    }

    #[test]
    fn collector_addr_rejects_malformed() {
        for text in ["collector", "collector:", "collector:99999", "bad_name:7443", "-x.svc:1", "a..b:1", "unix:relative.sock", ":7443"] {
            let error = text.parse::<CollectorAddr>().unwrap_err();
            assert_eq!(
                error.to_string(),
                format!("invalid collector address {text:?}: expected unix:/path/to.sock, IP:PORT, [IPv6]:PORT or HOST:PORT")
            );
        }
    }
}
