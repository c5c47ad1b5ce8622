//! Mutual TLS (rustls, ring provider) for every gRPC connection driftwatch makes or accepts: the
//! agent's API server, the command-line clients, and agents pushing to a collector.
//!
//! A server built from [`ServerTlsFiles`] accepts only clients whose certificate chains to the
//! client CA, so every peer is authenticated. A client built from [`ClientTlsFiles`] checks the
//! server's certificate against its CA and presents its own certificate when it has one.
//! Handshakes run outside the gRPC server in tasks of their own, bounded in number and time, so a
//! peer that never finishes its handshake takes no server slot. Failed handshakes are logged with
//! the peer address and the reason, and counted.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use driftwatch::api::tls::{ClientTls, ClientTlsFiles};
//! let tls = ClientTls::load(&ClientTlsFiles {
//!     ca: "/etc/driftwatch/tls/ca.pem".into(),
//!     cert: Some("/etc/driftwatch/tls/agent.pem".into()),
//!     key: Some("/etc/driftwatch/tls/agent-key.pem".into()),
//!     server_name: None,
//! })?;
//! let channel = tls.channel("collector.example:7443").await?;
//! # Ok(()) }
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long a peer may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait in the listen backlog.
const MAX_PENDING_HANDSHAKES: usize = 256;
/// How long a client waits for the TCP connection and the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// PEM files of a server that requires client certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that client certificates must chain to.
    pub client_ca: PathBuf,
}

/// PEM files of a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// CA certificates the server's certificate must chain to.
    pub ca: PathBuf,
    /// The client's certificate chain; without it, servers that require one reject the client.
    pub cert: Option<PathBuf>,
    /// The private key of the client certificate.
    pub key: Option<PathBuf>,
    /// Name the server's certificate must carry; by default the host or IP address dialled.
    pub server_name: Option<String>,
}

/// Errors from loading TLS files or building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("failed to read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} {} contains no PEM certificate (expected a \"BEGIN CERTIFICATE\" block)", path.display())]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("invalid PEM in {what} {}: {source}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{} contains no PEM private key (expected PKCS#8, PKCS#1 or SEC1)", path.display())]
    NoKey { path: PathBuf },
    #[error("CA certificate {index} in {} is not usable as a trust anchor: {source}", path.display())]
    InvalidCa {
        path: PathBuf,
        index: usize,
        source: rustls::Error,
    },
    #[error("the client CA {} is unusable: {source}", path.display())]
    ClientVerifier {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    #[error("the certificate {} and the key {} are not a usable pair: {source}", cert.display(), key.display())]
    KeyPair {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("a client certificate needs both --tls-cert and --tls-key; only {given} was given")]
    HalfClientIdentity { given: &'static str },
    #[error("invalid TLS server name {0:?}: expected a DNS name or an IP address")]
    InvalidServerName(String),
    #[error("invalid address {0:?}: expected HOST:PORT, IP:PORT or [IPv6]:PORT")]
    InvalidTarget(String),
}

/// Server side of mutual TLS: wraps accepted TCP connections in TLS, rejecting clients without a
/// certificate from the client CA.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    handshake_failures: Arc<AtomicU64>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("handshake_failures", &self.handshake_failures())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the certificate, key and client CA, and builds a configuration that requires a client
    /// certificate chaining to the client CA. It offers HTTP/2 only, as gRPC needs.
    ///
    /// # Errors
    ///
    /// A [`TlsError`] naming the file that is missing, unreadable, or without usable PEM, or the
    /// mismatch between certificate and key.
    pub fn load(files: &ServerTlsFiles) -> Result<ServerTls, TlsError> {
        let chain = read_certificates("certificate", &files.cert)?;
        let key = read_private_key(&files.key)?;
        let roots = read_roots(&files.client_ca)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|source| TlsError::ClientVerifier {
                path: files.client_ca.clone(),
                source,
            })?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|source| TlsError::KeyPair {
                cert: files.cert.clone(),
                key: files.key.clone(),
                source,
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ServerTls::from_config(Arc::new(config)))
    }

    /// Wraps a configuration built elsewhere.
    pub fn from_config(config: Arc<ServerConfig>) -> ServerTls {
        ServerTls {
            acceptor: TlsAcceptor::from(config),
            handshake_failures: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Returns the number of handshakes that failed or timed out since this value was created.
    pub fn handshake_failures(&self) -> u64 {
        self.handshake_failures.load(Ordering::Relaxed)
    }

    /// Accepts connections on `listener` until `shutdown` is cancelled and yields those that
    /// completed the TLS handshake, for `tonic::transport::Server::serve_with_incoming`.
    ///
    /// A failed handshake is logged at warn with the peer address and the cause, and counted. It
    /// never ends the stream. An accept error is logged and the loop goes on, because errors such
    /// as EMFILE pass once connections close.
    pub fn incoming(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> ReceiverStream<io::Result<tokio_rustls::server::TlsStream<TcpStream>>> {
        let (sender, receiver) = mpsc::channel(MAX_PENDING_HANDSHAKES);
        tokio::spawn(accept_tls(self.clone(), listener, sender, shutdown));
        ReceiverStream::new(receiver)
    }

    async fn handshake(&self, stream: TcpStream, peer: SocketAddr) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
        let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(stream)).await;
        let error = match result {
            Ok(Ok(stream)) => {
                tracing::debug!(%peer, "TLS client authenticated");
                return Some(stream);
            }
            Ok(Err(error)) => error,
            Err(_) => io::Error::new(io::ErrorKind::TimedOut, "the TLS handshake timed out"),
        };
        self.handshake_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, error = %error, cause = server_side_cause(&error), "rejected a TLS client");
        None
    }
}

async fn accept_tls(
    tls: ServerTls,
    listener: TcpListener,
    sender: mpsc::Sender<io::Result<tokio_rustls::server::TlsStream<TcpStream>>>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            permit = Arc::clone(&permits).acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "failed to accept an API connection");
                // Give descriptors a moment to free up instead of spinning on EMFILE.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let tls = tls.clone();
        let sender = sender.clone();
        tokio::spawn(async move {
            if let Some(stream) = tls.handshake(stream, peer).await {
                // The server stopped when the receiver is gone; the connection just closes.
                let _ = sender.send(Ok(stream)).await;
            }
            drop(permit);
        });
    }
}

/// Client side of mutual TLS.
#[derive(Clone)]
pub struct ClientTls {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Loads the CA and, when given, the client certificate and key.
    ///
    /// # Errors
    ///
    /// A [`TlsError`] naming the file at fault, or [`TlsError::HalfClientIdentity`] when only one
    /// of the certificate and the key is given.
    pub fn load(files: &ClientTlsFiles) -> Result<ClientTls, TlsError> {
        let roots = read_roots(&files.ca)?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default protocol versions")
            .with_root_certificates(roots);
        let mut config = match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => {
                let chain = read_certificates("certificate", cert)?;
                let private_key = read_private_key(key)?;
                builder
                    .with_client_auth_cert(chain, private_key)
                    .map_err(|source| TlsError::KeyPair {
                        cert: cert.clone(),
                        key: key.clone(),
                        source,
                    })?
            }
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => return Err(TlsError::HalfClientIdentity { given: "--tls-cert" }),
            (None, Some(_)) => return Err(TlsError::HalfClientIdentity { given: "--tls-key" }),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let server_name = files
            .server_name
            .as_deref()
            .map(|name| {
                ServerName::try_from(name.to_owned())
                    .map_err(|_| TlsError::InvalidServerName(name.to_owned()))
            })
            .transpose()?;
        Ok(ClientTls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// Opens a TLS connection to `target` (`HOST:PORT`, `IP:PORT` or `[IPv6]:PORT`). The server's
    /// certificate must name the configured server name, else the host of `target`.
    ///
    /// # Errors
    ///
    /// An I/O error when the name does not resolve, nothing accepts connections, or the handshake
    /// fails. A handshake error wraps the [`rustls::Error`], which [`explain`] turns into advice.
    pub async fn connect(&self, target: &str) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let (host, _) = split_target(target).map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
        let server_name = match &self.server_name {
            Some(name) => name.clone(),
            None => ServerName::try_from(host.to_owned())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, TlsError::InvalidServerName(host.to_owned())))?,
        };
        let stream = TcpStream::connect(target).await?;
        stream.set_nodelay(true)?;
        self.connector.connect(server_name, stream).await
    }

    /// Connects a gRPC channel to `target` over TLS, completing the TLS handshake before it
    /// returns. The channel reconnects with the same settings when the connection drops.
    ///
    /// # Errors
    ///
    /// Fails like [`ClientTls::connect`], or when the connection is not up within five seconds.
    pub async fn channel(&self, target: &str) -> Result<Channel, tonic::transport::Error> {
        let tls = self.clone();
        let target = target.to_owned();
        // The URI is required by the HTTP/2 layer but never resolved: the connector dials `target`.
        Endpoint::from_static("http://driftwatch.invalid")
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let tls = tls.clone();
                let target = target.clone();
                async move { tls.connect(&target).await.map(TokioIo::new) }
            }))
            .await
    }
}

/// Splits `HOST:PORT` or `[IPv6]:PORT` into the host (brackets removed) and the port.
fn split_target(target: &str) -> Result<(&str, u16), TlsError> {
    let invalid = || TlsError::InvalidTarget(target.to_owned());
    let (host, port) = target.rsplit_once(':').ok_or_else(invalid)?;
    let host = host
        .strip_prefix('[')
        .and_then(|host| host.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(invalid());
    }
    let port = port.parse().map_err(|_| invalid())?;
    Ok((host, port))
}

#[expect(
    deprecated,
    reason = "rustls 0.23.48 deprecates ring for lacking post-quantum key exchange; aws-lc-rs has it \
              but needs cmake and a long C build, so ring stays until that is acceptable"
)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn read_certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(what, path)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certificates)
}

fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file("private key", path)?;
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(key) => Ok(key),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => Err(TlsError::NoKey {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(TlsError::Pem {
            what: "private key",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for (index, certificate) in read_certificates("CA certificate", path)?.into_iter().enumerate() {
        roots.add(certificate).map_err(|source| TlsError::InvalidCa {
            path: path.to_path_buf(),
            index,
            source,
        })?;
    }
    Ok(roots)
}

/// Returns the TLS error somewhere in `error`'s source chain, if there is one. rustls errors reach
/// callers wrapped in `io::Error`, hyper and tonic errors.
pub fn find_tls_error<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = error
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        current = error.source();
    }
    None
}

/// Explains a client's failed TLS connection in terms of the driftwatch flags that fix it, or
/// returns `None` when `error` contains no TLS error.
pub fn explain(error: &(dyn StdError + 'static)) -> Option<&'static str> {
    if let Some(tls) = find_tls_error(error) {
        return advice(tls);
    }
    // rustls reports an alert that arrives after the handshake, such as a TLS 1.3 server rejecting
    // the client certificate, as an io::Error with the message text only, so the text is matched
    // against what the same errors display.
    let mut current = Some(error);
    while let Some(error) = current {
        let text = error.to_string();
        if let Some(tls) = text_matched_errors().into_iter().find(|tls| text.contains(&tls.to_string())) {
            return advice(&tls);
        }
        current = error.source();
    }
    None
}

fn text_matched_errors() -> Vec<rustls::Error> {
    use rustls::{AlertDescription, CertificateError};
    vec![
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
        rustls::Error::AlertReceived(AlertDescription::UnknownCA),
        rustls::Error::AlertReceived(AlertDescription::BadCertificate),
        rustls::Error::AlertReceived(AlertDescription::DecryptError),
        rustls::Error::AlertReceived(AlertDescription::CertificateExpired),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
        rustls::Error::InvalidCertificate(CertificateError::Expired),
    ]
}

fn advice(error: &rustls::Error) -> Option<&'static str> {
    use rustls::{AlertDescription, CertificateError};
    let advice = match error {
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => {
            "the server requires a client certificate: pass --tls-cert and --tls-key"
        }
        rustls::Error::AlertReceived(
            AlertDescription::UnknownCA | AlertDescription::BadCertificate | AlertDescription::DecryptError,
        ) => {
            "the server rejected this client's certificate: it must be signed by a CA in the \
             server's --tls-client-ca"
        }
        rustls::Error::AlertReceived(AlertDescription::CertificateExpired) => {
            "the server rejected this client's certificate because it has expired"
        }
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the server's certificate is not signed by a CA in --tls-ca"
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "the server's certificate does not name the address dialled: pass --tls-server-name",
        rustls::Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            "the server's certificate has expired"
        }
        rustls::Error::InvalidMessage(_) => {
            "the server did not answer with TLS: it may serve plaintext, so drop --tls-ca"
        }
        _ => return None,
    };
    Some(advice)
}

/// Names the usual cause of a failed handshake on the server, for the log line.
fn server_side_cause(error: &io::Error) -> &'static str {
    use rustls::CertificateError;
    if error.kind() == io::ErrorKind::TimedOut {
        return "the client did not finish the handshake in time";
    }
    match find_tls_error(error) {
        Some(rustls::Error::NoCertificatesPresented) => "the client presented no certificate",
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            "the client certificate is not signed by the client CA"
        }
        Some(rustls::Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. })) => {
            "the client certificate has expired"
        }
        Some(rustls::Error::InvalidCertificate(_)) => "the client certificate is invalid",
        Some(rustls::Error::InvalidMessage(_)) => {
            "the client did not speak TLS; plaintext clients are not accepted here"
        }
        Some(rustls::Error::AlertReceived(_)) => "the client aborted the handshake; it may not trust this server's certificate",
        Some(_) => "the handshake failed",
        None => "the connection failed during the handshake",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_target_accepts_names_and_addresses() {
        assert_eq!(split_target("collector:7443").unwrap(), ("collector", 7443));
        assert_eq!(split_target("10.0.0.1:7443").unwrap(), ("10.0.0.1", 7443));
        assert_eq!(split_target("[::1]:7443").unwrap(), ("::1", 7443));
    }

    #[test]
    fn split_target_rejects_missing_port() {
        for target in ["collector", ":7443", "collector:port"] {
            let error = split_target(target).unwrap_err();
            assert!(matches!(error, TlsError::InvalidTarget(_)), "{target}: {error}");
        }
    }

    #[test]
    fn missing_file_error_names_the_path() {
        let error = ServerTls::load(&ServerTlsFiles {
            cert: "/nonexistent/driftwatch/cert.pem".into(),
            key: "/nonexistent/driftwatch/key.pem".into(),
            client_ca: "/nonexistent/driftwatch/ca.pem".into(),
        })
        .unwrap_err();
        assert_eq!(
            error.to_string().split(':').next().unwrap(),
            "failed to read certificate /nonexistent/driftwatch/cert.pem"
        );
    }

    #[test]
    fn file_without_pem_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let error = ClientTls::load(&ClientTlsFiles {
            ca: path.clone(),
            cert: None,
            key: None,
            server_name: None,
        })
        .unwrap_err();
        assert!(matches!(error, TlsError::NoCertificate { .. }), "{error}");
        assert!(error.to_string().contains(path.to_str().unwrap()), "{error}");
    }

    #[test]
    fn client_certificate_without_key_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = rcgen::CertificateParams::new(vec!["ca".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&ca, certificate.pem()).unwrap();
        let error = ClientTls::load(&ClientTlsFiles {
            ca: ca.clone(),
            cert: Some(ca),
            key: None,
            server_name: None,
        })
        .unwrap_err();
        assert!(matches!(error, TlsError::HalfClientIdentity { given: "--tls-cert" }), "{error}");
    }
}
