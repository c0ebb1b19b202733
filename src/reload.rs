//! Reloading without a restart (SIGHUP, or `POST /v1/reload` on the admin
//! listener): token keys, TLS certificates of every listener, and the
//! backend networks (allow-list and hypervisor credentials) from the config
//! file.
//!
//! Everything new is loaded first; only if all of it loads is it swapped in,
//! so a broken file leaves the running configuration as it was. Live sessions
//! are never touched: they hold what they started with. A session whose key,
//! certificate or backend entry was removed keeps running until it ends (or
//! an operator ends it); new connections see only the new settings.
//! Listener addresses, TLS minimum versions, limits and timers need a restart.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{CertFiles, Config, ConfigError, ConfigIssue, TlsListener};
use crate::hypervisor::{CredentialError, SpiceUpstreams, VncUpstreams};
use crate::token::{KeyError, TokenValidator};
use crate::transport::listener::{self, TlsError, TlsSlot};

/// A TLS slot and the files it was loaded from.
#[derive(Debug, Clone)]
struct TlsFiles {
    slot: TlsSlot,
    files: CertFiles,
    /// Console listeners speak no ALPN.
    console: bool,
    /// TLS 1.3 only.
    tls13_only: bool,
}

/// What a reload can swap.
#[derive(Debug)]
pub struct Reloader {
    /// The config file, when Porthole runs from one.
    pub config_path: Option<PathBuf>,
    validator: Arc<TokenValidator>,
    public_tls: Option<TlsFiles>,
    spice_tls: Option<TlsFiles>,
    vnc_tls: Option<TlsFiles>,
    spice_upstreams: Arc<ArcSwap<SpiceUpstreams>>,
    vnc_upstreams: Arc<ArcSwap<VncUpstreams>>,
}

/// What a reload changed.
#[derive(Debug, Default, serde::Serialize)]
pub struct Reloaded {
    /// Token keys now loaded.
    pub keys: usize,
    /// Listeners whose certificate was reloaded.
    pub certificates: Vec<&'static str>,
    /// Whether backend networks were reloaded from the config file.
    pub backends: bool,
    /// Deprecated names the reloaded file still uses (logged, not answered).
    #[serde(skip)]
    pub warnings: Vec<ConfigIssue>,
}

/// Why a reload changed nothing. The messages are what the log and the admin
/// API's `422` have always said.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The config file is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener's certificate did not load.
    #[error("{listener} certificate: {error}")]
    Certificate {
        /// `public`, `spice` or `vnc`.
        listener: &'static str,
        /// Why.
        error: TlsError,
    },
    /// SPICE credentials of a backend network did not load.
    #[error("backends.spice: {0}")]
    SpiceBackends(CredentialError),
    /// VNC credentials of a backend network did not load.
    #[error("backends.vnc: {0}")]
    VncBackends(CredentialError),
    /// The token keys did not load.
    #[error("token keys: {0}")]
    Keys(KeyError),
}

/// What a reload may swap, as the composition root built it.
#[derive(Debug, Clone)]
pub struct Swappable {
    /// Token keys (and the allow-list).
    pub validator: Arc<TokenValidator>,
    /// The public listener's certificate.
    pub public_tls: Option<TlsSlot>,
    /// The native SPICE listener's certificate.
    pub spice_tls: Option<TlsSlot>,
    /// The native VNC listener's certificate.
    pub vnc_tls: Option<TlsSlot>,
    /// SPICE credentials by backend network.
    pub spice_upstreams: Arc<ArcSwap<SpiceUpstreams>>,
    /// VNC credentials by backend network.
    pub vnc_upstreams: Arc<ArcSwap<VncUpstreams>>,
}

/// The certificate files of a native console listener, if it is on.
fn console_files(l: &Option<TlsListener>) -> Option<CertFiles> {
    l.as_ref().map(|l| l.cert.clone())
}

impl Reloader {
    /// A reloader over `parts`, loaded from `config` (read anew from
    /// `config_path` at each reload, when there is one).
    pub fn new(config: &Config, parts: Swappable, config_path: Option<PathBuf>) -> Self {
        let files = |slot: &Option<TlsSlot>, files: Option<CertFiles>, console, tls13_only| match (
            slot, files,
        ) {
            (Some(slot), Some(files)) => Some(TlsFiles {
                slot: slot.clone(),
                files,
                console,
                tls13_only,
            }),
            _ => None,
        };
        let tls13 = |l: &Option<TlsListener>| l.as_ref().is_some_and(|l| l.tls13_only);
        Self {
            config_path,
            validator: parts.validator,
            public_tls: files(
                &parts.public_tls,
                config.listen.tls.clone(),
                false,
                config.listen.tls13_only,
            ),
            spice_tls: files(
                &parts.spice_tls,
                console_files(&config.spice.listen_tls),
                true,
                tls13(&config.spice.listen_tls),
            ),
            vnc_tls: files(
                &parts.vnc_tls,
                console_files(&config.vnc.listen),
                true,
                tls13(&config.vnc.listen),
            ),
            spice_upstreams: parts.spice_upstreams,
            vnc_upstreams: parts.vnc_upstreams,
        }
    }

    /// Loads everything anew and swaps it in, or changes nothing.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let config = match &self.config_path {
            Some(p) => Some(Config::load(p)?),
            None => None,
        };
        // Certificates: the (possibly new) paths from the file, else the old ones.
        let mut certs = Vec::new();
        for (name, tls, new_files) in [
            (
                "public",
                &self.public_tls,
                config.as_ref().and_then(|c| c.listen.tls.clone()),
            ),
            (
                "spice",
                &self.spice_tls,
                config
                    .as_ref()
                    .and_then(|c| console_files(&c.spice.listen_tls)),
            ),
            (
                "vnc",
                &self.vnc_tls,
                config.as_ref().and_then(|c| console_files(&c.vnc.listen)),
            ),
        ] {
            let Some(t) = tls else { continue };
            let files = new_files.unwrap_or_else(|| t.files.clone());
            let load = if t.console {
                listener::load_tls_without_alpn
            } else {
                listener::load_tls
            };
            let loaded = load(&files.cert, &files.key, t.tls13_only).map_err(|error| {
                ReloadError::Certificate {
                    listener: name,
                    error,
                }
            })?;
            certs.push((name, t.slot.clone(), loaded));
        }
        let backends = match &config {
            Some(c) => Some((
                c.allow.clone(),
                SpiceUpstreams::load(&c.spice_backends).map_err(ReloadError::SpiceBackends)?,
                VncUpstreams::load(&c.vnc_backends).map_err(ReloadError::VncBackends)?,
            )),
            None => None,
        };
        // Keys last: reload() swaps only when every key loads.
        let keys = self.validator.reload().map_err(ReloadError::Keys)?;
        let mut done = Reloaded {
            keys,
            warnings: config.map(|c| c.warnings).unwrap_or_default(),
            ..Reloaded::default()
        };
        for (name, slot, loaded) in certs {
            slot.store(Arc::new(loaded));
            done.certificates.push(name);
        }
        if let Some((allow, spice, vnc)) = backends {
            self.validator.set_allow_list(allow);
            self.spice_upstreams.store(Arc::new(spice));
            self.vnc_upstreams.store(Arc::new(vnc));
            done.backends = true;
        }
        Ok(done)
    }

    /// Reloads and logs and counts the outcome (`why`: what asked for it).
    pub fn reload_logged(&self, why: &str) -> Result<Reloaded, ReloadError> {
        let r = self.reload();
        match &r {
            Ok(done) => {
                crate::metrics::key_reload(true);
                for w in &done.warnings {
                    tracing::warn!("{why}: config: {w}");
                }
                tracing::info!(keys = done.keys, certificates = ?done.certificates, backends = done.backends, "{why}: reloaded");
                crate::audit::AuditEvent::new("reloaded")
                    .field("by", Some(why.to_string()))
                    .emit();
            }
            Err(e) => {
                crate::metrics::key_reload(false);
                tracing::warn!("{why}: reload failed, the running configuration is kept: {e}");
            }
        }
        r
    }
}
