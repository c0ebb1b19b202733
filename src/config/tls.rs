//! What a TLS listener presents: certificate files, and the listener that
//! cannot be configured without them. Every section with a listener settles
//! its certificate and TLS floor through these.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::issues::{Issues, Paths, parse_listener_addr};

/// A PEM certificate chain and its private key: what a TLS listener presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// A TLS listener: where it listens and what it presents. One value, so a
/// listener without a certificate cannot be configured (validation refuses it
/// at the listener's key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListener {
    /// Address to bind.
    pub addr: SocketAddr,
    /// Its certificate chain and key.
    pub cert: CertFiles,
    /// It accepts TLS 1.3 only.
    pub tls13_only: bool,
}

/// A section's `tls_cert` and `tls_key`: both give the pair, neither gives
/// `fallback`, and one alone is a problem (at `{section}.tls_cert`) and gives none.
pub(super) fn cert_files(
    issues: &mut Issues,
    section: &str,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    paths: Paths<'_>,
    fallback: Option<CertFiles>,
) -> Option<CertFiles> {
    match (cert, key) {
        (Some(cert), Some(key)) => Some(CertFiles {
            cert: paths.resolve(&cert),
            key: paths.resolve(&key),
        }),
        (None, None) => fallback,
        _ => {
            issues.push(
                format!("{section}.tls_cert"),
                "set both `tls_cert` and `tls_key`, or neither",
            );
            None
        }
    }
}

/// A TLS listener at `key` from its address and the certificate its section
/// settled on. An address without a certificate is a problem at `key`;
/// `hint` says where a certificate can come from.
pub(super) fn tls_listener(
    issues: &mut Issues,
    key: &str,
    addr: Option<String>,
    cert: Option<CertFiles>,
    tls13_only: bool,
    hint: &str,
) -> Option<TlsListener> {
    let addr = parse_listener_addr(issues, key, &addr?)?;
    match cert {
        Some(cert) => Some(TlsListener {
            addr,
            cert,
            tls13_only,
        }),
        None => {
            issues.push(key, format!("needs a certificate: {hint}"));
            None
        }
    }
}

/// `"1.2"` or `"1.3"` (true: 1.3 only); absent: `default`.
pub(super) fn tls_min_version(
    issues: &mut Issues,
    key: &str,
    v: Option<&str>,
    default: bool,
) -> bool {
    match v {
        None => default,
        Some("1.2") => false,
        Some("1.3") => true,
        Some(other) => {
            issues.push(key, format!("`{other}` is not \"1.2\" or \"1.3\""));
            default
        }
    }
}
