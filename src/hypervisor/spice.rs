//! What Porthole presents to the SPICE servers of each backend network: the
//! ticket they expect (never sent to clients) and how to trust their TLS port.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;

use super::CredentialError;
use crate::secret::Secret;

/// SPICE credentials of one backend network (paths; loaded at start).
#[derive(Debug, Clone, Default)]
pub struct SpiceBackendConfig {
    /// Ticket file.
    pub password_file: Option<PathBuf>,
    /// CA of the hypervisors' TLS ports.
    pub ca: Option<PathBuf>,
    /// Name checked in their certificates.
    pub tls_name: Option<String>,
    /// Link on the plain port first, TLS only when the hypervisor asks.
    pub prefer_plain: bool,
    /// The channel types clients may link (`None`: every one).
    pub channels: Option<Vec<u8>>,
}

/// One backend network's SPICE credentials, loaded.
#[derive(Debug, Clone, Default)]
pub struct SpiceUpstream {
    /// The ticket the hypervisors expect (empty: ticketing off).
    pub password: Secret<Vec<u8>>,
    /// TLS to the hypervisors' TLS ports, when a CA is configured.
    pub tls: Option<Arc<ClientConfig>>,
    /// Name checked in their certificates, when not the token's host.
    pub tls_name: Option<String>,
    /// Link on the plain port first; TLS only on NEED_SECURED.
    pub prefer_plain: bool,
    /// The channel types clients may link, one bit each (`None`: every one).
    pub channels: Option<u32>,
}

impl SpiceUpstream {
    /// Whether a client may link a channel of type `kind`.
    pub fn permits(&self, kind: u8) -> bool {
        self.channels
            .is_none_or(|bits| kind < 32 && bits & (1 << kind) != 0)
    }

    /// The name to verify for a target `host`.
    pub fn server_name(&self, host: &str) -> Option<ServerName<'static>> {
        super::tls_server_name(self.tls_name.as_deref(), host)
    }
}

/// Every backend network's SPICE credentials, by network name.
#[derive(Debug, Clone, Default)]
pub struct SpiceUpstreams(HashMap<String, SpiceUpstream>);

impl SpiceUpstreams {
    /// Loads password files and CAs; an error names the file.
    pub fn load(config: &HashMap<String, SpiceBackendConfig>) -> Result<Self, CredentialError> {
        super::load_each(config, |c| {
            let password = super::password(c.password_file.as_deref(), |file, pw| {
                if pw.len() > crate::protocol::spice::crypto::MAX_PASSWORD_LEN {
                    return Err(CredentialError::SpicePasswordTooLong {
                        file: file.to_path_buf(),
                    });
                }
                Ok(())
            })?;
            Ok(SpiceUpstream {
                password,
                tls: c
                    .ca
                    .as_deref()
                    .map(client_config)
                    .transpose()?
                    .map(Arc::new),
                tls_name: c.tls_name.clone(),
                prefer_plain: c.prefer_plain,
                channels: c
                    .channels
                    .as_ref()
                    .map(|kinds| kinds.iter().fold(0, |bits, &k| bits | 1u32 << (k % 32))),
            })
        })
        .map(Self)
    }

    /// The credentials for backend network `name` (none configured: no
    /// ticket, plain port only).
    pub fn get(&self, name: &str) -> SpiceUpstream {
        self.0.get(name).cloned().unwrap_or_default()
    }

    /// Whether backend network `name` lets a client link a channel of type
    /// `kind` (`[backends.spice] channels`).
    pub fn permits(&self, name: &str, kind: u8) -> bool {
        self.0.get(name).is_none_or(|up| up.permits(kind))
    }
}

/// A TLS client trusting only `ca`.
pub fn client_config(ca: &Path) -> Result<ClientConfig, CredentialError> {
    Ok(tls_builder(ca)?.with_no_client_auth())
}

/// The start of a TLS client config that trusts only `ca`.
pub(crate) fn tls_builder(
    ca: &Path,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, CredentialError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in crate::transport::pem::certificates(ca)? {
        roots.add(c).map_err(|error| CredentialError::BadCa {
            file: ca.to_path_buf(),
            error,
        })?;
    }
    Ok(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(CredentialError::Versions)?
            .with_root_certificates(roots),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::spice::messages::channel;

    #[test]
    fn a_channel_list_permits_its_channels_and_no_other() {
        let config = |channels: Option<Vec<u8>>| {
            let mut map = HashMap::new();
            map.insert(
                "lab".to_string(),
                SpiceBackendConfig {
                    channels,
                    ..SpiceBackendConfig::default()
                },
            );
            SpiceUpstreams::load(&map).unwrap()
        };
        let some = config(Some(vec![channel::MAIN, channel::DISPLAY]));
        assert!(some.permits("lab", channel::MAIN) && some.permits("lab", channel::DISPLAY));
        for refused in [channel::USBREDIR, channel::INPUTS, 7, 40, 255] {
            assert!(!some.permits("lab", refused), "{refused}");
        }
        // No list, or no [backends.spice] at all: every channel.
        let all = config(None);
        assert!((0..=255).all(|kind| all.permits("lab", kind) && all.permits("elsewhere", kind)));
    }

    #[test]
    fn channel_names_and_types_go_both_ways() {
        for kind in 0..=255u8 {
            let name = channel::name(kind);
            assert_eq!(channel::by_name(name), (name != "other").then_some(kind));
        }
        assert_eq!(channel::by_name("usb"), None);
    }
}
