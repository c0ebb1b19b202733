//! What Porthole presents to the VNC servers of each backend network: the
//! VNC password (never sent to clients), the CA that signs their VeNCrypt
//! certificates, and a client certificate for servers that verify peers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;

use super::CredentialError;
use crate::protocol::rfb::upstream::UpstreamAuth;
use crate::protocol::rfb::vnc_auth::MAX_PASSWORD_LEN;
use crate::secret::Secret;

/// VNC credentials of one backend network (paths; loaded at start).
#[derive(Debug, Clone)]
pub struct VncBackendConfig {
    /// Password file.
    pub password_file: Option<PathBuf>,
    /// CA of the hypervisors' VeNCrypt certificates.
    pub ca: Option<PathBuf>,
    /// Name checked in their certificates.
    pub tls_name: Option<String>,
    /// Client certificate and key (mTLS).
    pub client_identity: Option<(PathBuf, PathBuf)>,
    /// Schemes, most preferred first.
    pub auth: Vec<UpstreamAuth>,
    /// Send the shared flag upstream whatever the client asks.
    pub force_shared: bool,
}

impl Default for VncBackendConfig {
    fn default() -> Self {
        Self {
            password_file: None,
            ca: None,
            tls_name: None,
            client_identity: None,
            auth: vec![
                UpstreamAuth::X509Vnc,
                UpstreamAuth::X509None,
                UpstreamAuth::VncPassword,
                UpstreamAuth::None,
            ],
            force_shared: true,
        }
    }
}

/// One backend network's VNC credentials, loaded.
#[derive(Debug, Clone)]
pub struct VncUpstream {
    /// The VNC password (VNC authentication uses 8 bytes of it).
    pub password: Secret<Vec<u8>>,
    /// TLS for VeNCrypt x509, when a CA is configured.
    pub tls: Option<Arc<ClientConfig>>,
    /// Name checked in the certificate, when not the token's host.
    pub tls_name: Option<String>,
    /// Schemes, most preferred first (x509 ones only with a CA).
    pub auth: Vec<UpstreamAuth>,
    /// Send the shared flag upstream whatever the client asks.
    pub force_shared: bool,
}

impl Default for VncUpstream {
    fn default() -> Self {
        Self::from_config(&VncBackendConfig::default(), Secret::default(), None)
    }
}

impl VncUpstream {
    fn from_config(
        c: &VncBackendConfig,
        password: Secret<Vec<u8>>,
        tls: Option<Arc<ClientConfig>>,
    ) -> Self {
        let auth = c
            .auth
            .iter()
            .copied()
            .filter(|a| {
                tls.is_some() || !matches!(a, UpstreamAuth::X509None | UpstreamAuth::X509Vnc)
            })
            .collect();
        Self {
            password,
            tls,
            tls_name: c.tls_name.clone(),
            auth,
            force_shared: c.force_shared,
        }
    }

    /// The name to verify for a target `host`.
    pub fn server_name(&self, host: &str) -> Option<ServerName<'static>> {
        super::tls_server_name(self.tls_name.as_deref(), host)
    }
}

/// Every backend network's VNC credentials, by network name.
#[derive(Debug, Clone, Default)]
pub struct VncUpstreams(HashMap<String, VncUpstream>);

impl VncUpstreams {
    /// Loads password files, CAs and client identities; an error names the file.
    pub fn load(config: &HashMap<String, VncBackendConfig>) -> Result<Self, CredentialError> {
        super::load_each(config, |c| {
            let password = super::password(c.password_file.as_deref(), |file, pw| {
                if pw.len() > MAX_PASSWORD_LEN {
                    tracing::warn!(
                        "{}: VNC authentication uses only the first {MAX_PASSWORD_LEN} bytes",
                        file.display()
                    );
                }
                Ok(())
            })?;
            let tls = match &c.ca {
                None => None,
                Some(ca) => Some(Arc::new(client_config(ca, c.client_identity.as_ref())?)),
            };
            Ok(VncUpstream::from_config(c, password, tls))
        })
        .map(Self)
    }

    /// The credentials for backend network `name` (none configured: no
    /// password, no TLS; None or VNC authentication with an empty password).
    pub fn get(&self, name: &str) -> VncUpstream {
        self.0.get(name).cloned().unwrap_or_default()
    }
}

fn client_config(
    ca: &Path,
    identity: Option<&(PathBuf, PathBuf)>,
) -> Result<ClientConfig, CredentialError> {
    let builder = super::spice::tls_builder(ca)?;
    let Some((cert, key)) = identity else {
        return Ok(builder.with_no_client_auth());
    };
    let chain = crate::transport::pem::certificates(cert)?;
    let key = crate::transport::pem::private_key(key)?;
    builder
        .with_client_auth_cert(chain, key)
        .map_err(CredentialError::ClientIdentity)
}
