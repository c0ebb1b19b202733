//! Hypervisor targets and what Porthole may connect to.
//!
//! A token names a target (host and ports). The operator's allow-list of
//! hypervisor networks decides whether Porthole will ever connect there, so a
//! token, even a validly signed one, can never point Porthole at an arbitrary
//! host. Each allow-list entry is a *backend network*: later it also carries
//! the credentials Porthole holds for the consoles in it (VNC passwords, CAs,
//! client certificates), which never travel in a token.

mod allowlist;
pub mod spice;
pub mod vnc;

pub use allowlist::{AllowList, BackendNetwork, PortRange, TargetError};
pub use spice::{SpiceBackendConfig, SpiceUpstream, SpiceUpstreams};
pub use vnc::{VncBackendConfig, VncUpstream, VncUpstreams};

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::secret::Secret;

/// Where a console lives: the hypervisor host and its console ports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleTarget {
    /// An IP address, or a host name that the operator listed by name.
    pub host: String,
    /// The plain console port (VNC, SPICE, serial chardev).
    pub port: u16,
    /// The SPICE TLS port, where the console has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_port: Option<u16>,
}

/// A target as [`ConsoleTarget`]'s `Display` writes it (`host:port`,
/// `[v6]:port`, then ` (tls N)` when it has a TLS port): how the registry
/// keeps a session's target.
impl std::str::FromStr for ConsoleTarget {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, tls_port) = match s.split_once(" (tls ") {
            Some((addr, tls)) => {
                let tls = tls.strip_suffix(')').ok_or("no closing parenthesis")?;
                (addr, Some(tls.parse().map_err(|_| "not a TLS port")?))
            }
            None => (s, None),
        };
        let (host, port) = addr.rsplit_once(':').ok_or("no port")?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err("no host");
        }
        Ok(ConsoleTarget {
            host: host.to_string(),
            port: port.parse().map_err(|_| "not a port")?,
            tls_port,
        })
    }
}

impl ConsoleTarget {
    /// The console's own address, `host:port` (`[host]:port` for IPv6),
    /// without its TLS port: what names one console server whichever of its
    /// ports a token gives (SPICE's plain and TLS ports are one server).
    pub fn address(&self) -> String {
        Self::address_in(&self.to_string()).to_owned()
    }

    /// [`address`](Self::address) of a target as [`Display`](fmt::Display)
    /// shows it (what a session records).
    pub fn address_in(shown: &str) -> &str {
        shown
            .split_once(" (tls ")
            .map_or(shown, |(address, _)| address)
    }
}

impl fmt::Display for ConsoleTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)?;
        } else {
            write!(f, "{}:{}", self.host, self.port)?;
        }
        if let Some(tls) = self.tls_port {
            write!(f, " (tls {tls})")?;
        }
        Ok(())
    }
}

/// The TLS name to verify for a hypervisor `host`: the configured name, or the host itself.
pub(crate) fn tls_server_name(
    configured: Option<&str>,
    host: &str,
) -> Option<rustls::pki_types::ServerName<'static>> {
    let name = configured.unwrap_or(host);
    let name = name.trim_start_matches('[').trim_end_matches(']');
    rustls::pki_types::ServerName::try_from(name.to_string()).ok()
}

/// Why a backend network's credentials (password files, CAs, client
/// certificates) could not be loaded. Every message names the file; each
/// carries its cause in its text (logs print `{e}`), so none has a `source`
/// that `{:#}` would print twice.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// A password file could not be read.
    #[error("{file}: {error}")]
    Read {
        /// The password file.
        file: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A PEM file (CA, client certificate or key) is unusable.
    #[error(transparent)]
    File(#[from] crate::transport::pem::PemFileError),
    /// A CA certificate rustls will not trust.
    #[error("{file}: {error}")]
    BadCa {
        /// The CA file.
        file: PathBuf,
        /// Why.
        error: rustls::Error,
    },
    /// A SPICE ticket longer than the protocol's password field.
    #[error("{file}: longer than SPICE's 60 bytes")]
    SpicePasswordTooLong {
        /// The password file.
        file: PathBuf,
    },
    /// rustls refused the protocol versions asked for.
    #[error("{0}")]
    Versions(rustls::Error),
    /// The client certificate and key do not belong together.
    #[error("client certificate and key do not match: {0}")]
    ClientIdentity(rustls::Error),
}

/// Each backend network's credentials, loaded by `load` from its settings;
/// the first error (it names the file) stops the load.
pub(crate) fn load_each<C, U>(
    config: &HashMap<String, C>,
    load: impl Fn(&C) -> Result<U, CredentialError>,
) -> Result<HashMap<String, U>, CredentialError> {
    config
        .iter()
        .map(|(name, c)| Ok((name.clone(), load(c)?)))
        .collect()
}

/// An optional password file's content (none: empty), once `check` (the
/// protocol's limit) has passed it.
pub(crate) fn password(
    file: Option<&Path>,
    check: impl FnOnce(&Path, &[u8]) -> Result<(), CredentialError>,
) -> Result<Secret<Vec<u8>>, CredentialError> {
    let Some(file) = file else {
        return Ok(Secret::default());
    };
    let pw = read_password_file(file)?;
    check(file, &pw)?;
    Ok(Secret::new(pw))
}

/// A password file's content, without the trailing newline `echo pw > file` adds.
pub(crate) fn read_password_file(path: &Path) -> Result<Vec<u8>, CredentialError> {
    let mut pw = std::fs::read(path).map_err(|error| CredentialError::Read {
        file: path.to_path_buf(),
        error,
    })?;
    while pw.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        pw.pop();
    }
    Ok(pw)
}

#[cfg(test)]
mod tests {
    use super::ConsoleTarget;

    #[test]
    fn a_target_reads_back_as_it_is_written() {
        for t in [
            ConsoleTarget {
                host: "10.0.3.17".into(),
                port: 5901,
                tls_port: None,
            },
            ConsoleTarget {
                host: "fd00::17".into(),
                port: 5930,
                tls_port: Some(5931),
            },
            ConsoleTarget {
                host: "compute-1.example".into(),
                port: 10000,
                tls_port: None,
            },
        ] {
            // What a session records names the same console as the target.
            assert_eq!(ConsoleTarget::address_in(&t.to_string()), t.address());
            assert_eq!(t.to_string().parse::<ConsoleTarget>(), Ok(t));
        }
        assert!("5900".parse::<ConsoleTarget>().is_err());
        assert!(":5900".parse::<ConsoleTarget>().is_err());
    }

    #[test]
    fn one_spice_server_has_one_address_whichever_ports_a_token_gives() {
        let plain = ConsoleTarget {
            host: "fd00::17".into(),
            port: 5930,
            tls_port: None,
        };
        let both = ConsoleTarget {
            tls_port: Some(5931),
            ..plain.clone()
        };
        assert_eq!(plain.address(), "[fd00::17]:5930");
        assert_eq!(both.address(), plain.address());
        assert_eq!(
            ConsoleTarget::address_in("[fd00::17]:5930 (tls 5931)"),
            "[fd00::17]:5930"
        );
    }
}
