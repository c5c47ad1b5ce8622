//! The Host check of the live view, which keeps pages of other origins out.
//!
//! The page has no authentication and listens on loopback only. A page from another origin can
//! still reach it by DNS rebinding. Its name first resolves to the attacker's server, then to
//! 127.0.0.1. The browser treats both as one origin, so that page can read the graph and the
//! deviations. The browser still sends the attacker's name in the Host header, so the live view
//! serves only requests whose Host is an IP literal, `localhost`, or a name given with
//! `--web-allow-host`.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Host names the live view serves besides IP literals and `localhost`, lowercase and without a
/// trailing dot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedHosts {
    names: Vec<String>,
}

impl AllowedHosts {
    pub fn new(names: &[String]) -> AllowedHosts {
        AllowedHosts { names: names.iter().map(|name| normalize(name)).collect() }
    }

    /// Checks the authority of a request, `host` or `host:port` as a Host header carries it.
    ///
    /// # Errors
    ///
    /// The reason the request is rejected, naming the host and the flag that allows it.
    pub fn check(&self, authority: Option<&str>) -> Result<(), String> {
        let Some(authority) = authority else {
            return Err("the request has no Host header".to_owned());
        };
        let host = strip_port(authority);
        if host.starts_with('[') {
            let literal = host.strip_prefix('[').and_then(|rest| rest.strip_suffix(']'));
            if literal.is_some_and(|literal| literal.parse::<Ipv6Addr>().is_ok()) {
                return Ok(());
            }
            return Err(format!("the Host header {authority:?} is not a valid IPv6 literal"));
        }
        if host.parse::<Ipv4Addr>().is_ok() {
            return Ok(());
        }
        let name = normalize(host);
        if name == "localhost" || self.names.contains(&name) {
            return Ok(());
        }
        Err(format!(
            "the host {host:?} is not allowed: the live view serves IP addresses, localhost and the \
             names given with --web-allow-host, which keeps pages of other origins out"
        ))
    }
}

/// Parses a `--web-allow-host` value: a DNS name, without a port.
///
/// # Errors
///
/// A message naming the value when it is empty or contains a character a host name cannot have.
pub fn parse_allowed_host(text: &str) -> Result<String, String> {
    let valid = !text.is_empty()
        && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
    if !valid {
        return Err(format!(
            "invalid host name {text:?}: expected a DNS name such as driftwatch.example.internal, without a port"
        ));
    }
    Ok(normalize(text))
}

/// Rejects with 403 and a plain-text reason a request whose host [`AllowedHosts::check`] rejects.
pub(super) async fn require_allowed_host(
    State(allowed): State<Arc<AllowedHosts>>,
    request: Request,
    next: Next,
) -> Response {
    // An absolute-form request target carries the authority, which then takes the Host header's
    // place (RFC 9112, section 3.2.2).
    let authority = match request.uri().authority() {
        Some(authority) => Some(authority.as_str().to_owned()),
        None => request.headers().get(header::HOST).and_then(|value| value.to_str().ok()).map(str::to_owned),
    };
    match allowed.check(authority.as_deref()) {
        Ok(()) => next.run(request).await,
        Err(reason) => {
            tracing::debug!(host = ?authority, path = %request.uri().path(), "live view rejected a request for its Host");
            let mut response = (StatusCode::FORBIDDEN, format!("{reason}\n")).into_response();
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            response
        }
    }
}

/// Removes the port from `host:port`; an IPv6 literal keeps its brackets.
fn strip_port(authority: &str) -> &str {
    if let Some(end) = authority.find(']') {
        return &authority[..=end];
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => authority,
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_literals_and_localhost_are_allowed() {
        let allowed = AllowedHosts::default();

        for host in ["127.0.0.1:9180", "127.0.0.1", "[::1]:9180", "[::1]", "localhost:9180", "LOCALHOST", "localhost."] {
            assert_eq!(allowed.check(Some(host)), Ok(()), "{host}");
        }
    }

    #[test]
    fn other_names_are_rejected() {
        let allowed = AllowedHosts::default();

        let error = allowed.check(Some("rebind.attacker.example:9180")).unwrap_err();

        assert!(error.starts_with("the host \"rebind.attacker.example\" is not allowed"), "{error}");
        assert!(error.contains("--web-allow-host"), "{error}");
        for host in ["localhost.attacker.example", "127.0.0.1.nip.io:9180", "[::1", "[localhost]:80", ""] {
            assert!(allowed.check(Some(host)).is_err(), "{host}");
        }
        assert_eq!(allowed.check(None), Err("the request has no Host header".to_owned()));
    }

    #[test]
    fn names_given_are_allowed_in_any_case() {
        let allowed = AllowedHosts::new(&["Driftwatch.Internal".to_owned()]);

        assert_eq!(allowed.check(Some("driftwatch.internal:9180")), Ok(()));
        assert_eq!(allowed.check(Some("DRIFTWATCH.internal.")), Ok(()));
        assert!(allowed.check(Some("other.internal")).is_err());
    }

    #[test]
    fn allowed_host_flag_takes_names_only() {
        assert_eq!(parse_allowed_host("Dash.Example"), Ok("dash.example".to_owned()));
        for text in ["", "dash.example:9180", "dash example", "http://dash.example"] {
            assert!(parse_allowed_host(text).is_err(), "{text:?}");
        }
    }
}
