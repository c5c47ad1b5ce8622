//! Command-line flags for TLS, shared by the agent, its clients and the collector, so that every
//! command spells them the same way.

use std::path::PathBuf;

use super::addr::ListenAddr;
use super::tls::{ClientTls, ClientTlsFiles, ServerTls, ServerTlsFiles, TlsError};

/// Command-line flags of a server that requires client certificates.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerTlsArgs {
    /// Server certificate chain (PEM); with --tls-key and --tls-client-ca, turns mutual TLS on.
    #[arg(long, value_name = "FILE", requires = "tls_key", requires = "tls_client_ca")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of the server certificate.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// CA certificates (PEM) that client certificates must chain to; clients without one are
    /// rejected.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Serve plaintext on a TCP address that is not loopback, so that anyone who reaches the port
    /// can read every deviation and the graph.
    #[arg(long, conflicts_with = "tls_cert")]
    pub insecure: bool,
}

impl ServerTlsArgs {
    /// Loads the TLS files, or returns `None` when `--tls-cert` is not given.
    ///
    /// # Errors
    ///
    /// Fails with the file at fault when a file is missing or contains no usable PEM.
    pub fn load(&self) -> Result<Option<ServerTls>, TlsError> {
        let (Some(cert), Some(key), Some(client_ca)) = (&self.tls_cert, &self.tls_key, &self.tls_client_ca) else {
            return Ok(None);
        };
        let files = ServerTlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: client_ca.clone(),
        };
        ServerTls::load(&files).map(Some)
    }

    /// Checks that serving `addr` without TLS is allowed: a unix socket and loopback always are,
    /// other TCP addresses only with `--insecure`.
    ///
    /// # Errors
    ///
    /// Fails for a TCP address that is not loopback when neither TLS nor `--insecure` is given.
    pub fn check_plaintext_allowed(&self, addr: &ListenAddr) -> anyhow::Result<()> {
        if addr.is_local() || self.insecure {
            return Ok(());
        }
        anyhow::bail!(
            "refusing to serve the API in plaintext on {addr}, which is not a loopback address: pass \
             --tls-cert, --tls-key and --tls-client-ca for mutual TLS, or --insecure"
        )
    }
}

/// Command-line flags of a TLS client, shared by every command that connects to an agent or a
/// collector.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTlsArgs {
    /// CA certificate (PEM) the server's certificate must chain to; turns TLS on.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,

    /// Client certificate chain (PEM) to present to the server.
    #[arg(long, value_name = "FILE", requires = "tls_ca", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of the client certificate.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Name the server's certificate must carry, when it differs from the address dialled.
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    pub tls_server_name: Option<String>,

    /// Allow plaintext to a TCP address that is not loopback.
    #[arg(long, conflicts_with = "tls_ca")]
    pub insecure: bool,
}

impl ClientTlsArgs {
    /// Loads the TLS files, or returns `None` when `--tls-ca` is not given.
    ///
    /// # Errors
    ///
    /// Fails with the file at fault when a file is missing or contains no usable PEM.
    pub fn load(&self) -> Result<Option<ClientTls>, TlsError> {
        let Some(ca) = &self.tls_ca else { return Ok(None) };
        let files = ClientTlsFiles {
            ca: ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            server_name: self.tls_server_name.clone(),
        };
        ClientTls::load(&files).map(Some)
    }
}

