//! Certificates generated in the test run (rcgen): a CA, and server and client identities it
//! signs, written to PEM files for the `--tls-*` flags.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::Result;

/// A certificate authority that lives for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// A certificate and its private key, as PEM.
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Paths of an identity's PEM files.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// Creates a CA whose certificate names it `name`.
    pub fn new(name: &str) -> Result<TestCa> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(TestCa {
            issuer: Issuer::new(params, key),
            cert_pem,
        })
    }

    /// Returns the CA certificate as PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes the CA certificate to `dir/<file_name>` and returns the path.
    pub fn write_cert(&self, dir: &Path, file_name: &str) -> Result<PathBuf> {
        let path = dir.join(file_name);
        fs::write(&path, &self.cert_pem)?;
        Ok(path)
    }

    /// Issues a certificate for both server and client use with `names` as subject alternative
    /// names (IP addresses become IP SANs).
    pub fn issue(&self, common_name: &str, names: &[&str]) -> Result<Identity> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.iter().map(|name| name.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl Identity {
    /// Writes the certificate and key to `dir/<stem>.pem` and `dir/<stem>-key.pem`.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<IdentityFiles> {
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}-key.pem"));
        fs::write(&cert, &self.cert_pem)?;
        fs::write(&key, &self.key_pem)?;
        Ok(IdentityFiles { cert, key })
    }
}
