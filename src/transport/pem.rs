//! Certificates and keys from PEM files, for every TLS config Porthole
//! builds (its listeners, and its client side towards hypervisors). Errors
//! name the file.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A PEM file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PemFileError {
    /// It could not be read or parsed.
    #[error("{file}: {error}")]
    Unreadable {
        /// The file.
        file: PathBuf,
        /// Why.
        error: rustls::pki_types::pem::Error,
    },
    /// It holds no certificate.
    #[error("{file}: no certificate")]
    NoCertificate {
        /// The file.
        file: PathBuf,
    },
}

fn unreadable(file: &Path) -> impl Fn(rustls::pki_types::pem::Error) -> PemFileError {
    let file = file.to_path_buf();
    move |error| PemFileError::Unreadable {
        file: file.clone(),
        error,
    }
}

/// Every certificate in `file` (a chain, or CAs); at least one.
pub fn certificates(file: &Path) -> Result<Vec<CertificateDer<'static>>, PemFileError> {
    let certs = CertificateDer::pem_file_iter(file)
        .map_err(unreadable(file))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(unreadable(file))?;
    if certs.is_empty() {
        return Err(PemFileError::NoCertificate {
            file: file.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The private key in `file`.
pub fn private_key(file: &Path) -> Result<PrivateKeyDer<'static>, PemFileError> {
    PrivateKeyDer::from_pem_file(file).map_err(unreadable(file))
}
