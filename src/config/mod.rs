//! Configuration: a TOML file read into [`RawConfig`], validated into [`Config`].
//!
//! [`RawConfig`] mirrors the file: every section denies unknown keys and
//! documents its defaults (`porthole.example.toml` lists them all). [`Config`]
//! is what the rest of Porthole uses: checked, with paths resolved against the
//! config file's folder, and nothing optional that must be present at run time.
//! Validation reports *every* problem at once, each with its key path and, when
//! the key is in the file, its line and column. One function per section
//! validates it into its type, all adding to one collector of problems and
//! warnings (names that moved still work, and say where they went).
//!
//! Each section has a file holding its raw struct, its validated type and its
//! validator, so a setting is read, documented and checked in one place;
//! `issues` holds the collector and the checks the sections share. This file
//! composes them: [`RawConfig::validate`] runs every section's validator and
//! the checks that span sections.

mod audit;
mod backends;
mod issuance;
mod issues;
mod listen;
mod node;
mod nova;
mod recording;
mod sessions;
mod spice;
mod store;
mod tls;
mod tokens;
mod vnc;
mod web;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::hypervisor::AllowList;
pub use crate::hypervisor::{SpiceBackendConfig, VncBackendConfig};
use crate::token::nova::NovaSettings;

pub use audit::RawAudit;
pub use backends::{RawBackend, RawSpiceBackend, RawVncBackend};
pub use issuance::{IssuanceConfig, RawIssuance, SigningKey};
pub use issues::{ConfigError, ConfigIssue};
use issues::{Issues, Paths, line_col, place};
pub use listen::{DEFAULT_ADMIN_ADDR, DEFAULT_PUBLIC_ADDR, ListenConfig, RawListen, origin_of};
pub use node::RawNode;
pub use nova::RawNova;
pub use recording::RawRecording;
pub use sessions::{RawSessions, RawWebSocket, SessionsConfig, WebSocketConfig};
pub use spice::{DEFAULT_SPICE_TLS_ADDR, RawSpice, SpiceConfig};
pub use store::{RawStore, StoreConfig};
pub use tls::{CertFiles, TlsListener};
pub use tokens::{RawKey, RawTokens, TokenConfig};
pub use vnc::{DEFAULT_VNC_ADDR, RawVnc, VncConfig};
pub use web::{DEBIAN_XTERM_DIR, RawWeb, WebConfig};

use audit::validate_audit;
use backends::validate_backends;
use issuance::validate_issuance;
use listen::validate_listen;
use node::validate_node;
use nova::validate_nova;
use recording::validate_recording;
use sessions::{validate_sessions, validate_websocket};
use spice::validate_spice;
use store::validate_store;
use tokens::validate_tokens;
use vnc::validate_vnc;
use web::validate_web;

/// The file as written. Field docs give the defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Where first-start material (development keys, CA) is written.
    /// Default: `$PORTHOLE_STATE_DIR`, else `$XDG_STATE_HOME/porthole`, else `~/.local/state/porthole`.
    pub state_dir: Option<PathBuf>,
    /// Listeners.
    #[serde(default)]
    pub listen: RawListen,
    /// Token validation.
    #[serde(default)]
    pub tokens: RawTokens,
    /// The server-to-server issuance API; off unless present.
    pub issuance: Option<RawIssuance>,
    /// Hypervisor networks Porthole may connect to; none means nothing is reachable.
    #[serde(default)]
    pub backends: Vec<RawBackend>,
    /// Caps and timers of every session.
    #[serde(default)]
    pub sessions: RawSessions,
    /// Browser sessions' WebSocket limits and timers.
    #[serde(default)]
    pub websocket: RawWebSocket,
    /// Console pages and client libraries.
    #[serde(default)]
    pub web: RawWeb,
    /// SPICE: the native-client listener and ticket exchange.
    #[serde(default)]
    pub spice: RawSpice,
    /// Native VNC clients (vnc-direct).
    #[serde(default)]
    pub vnc: RawVnc,
    /// The shared store (several nodes); absent: in memory.
    pub store: Option<RawStore>,
    /// The audit trail.
    #[serde(default)]
    pub audit: RawAudit,
    /// This node's identity among several behind a balancer.
    #[serde(default)]
    pub node: RawNode,
    /// Nova's console tokens, looked up in Nova; off unless present.
    pub nova: Option<RawNova>,
    /// Recordings of sessions; off unless present.
    pub recording: Option<RawRecording>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where audit events go (a JSON-lines file), if not to the log.
    pub audit_path: Option<PathBuf>,
    /// VNC credentials by backend network name.
    pub vnc_backends: HashMap<String, VncBackendConfig>,
    /// Native VNC listener and tickets.
    pub vnc: VncConfig,
    /// SPICE listener and tickets.
    pub spice: SpiceConfig,
    /// SPICE credentials by backend network name.
    pub spice_backends: HashMap<String, SpiceBackendConfig>,
    /// Folder for first-start material.
    pub state_dir: PathBuf,
    /// Listeners.
    pub listen: ListenConfig,
    /// Token validation.
    pub tokens: TokenConfig,
    /// Issuance API, if enabled.
    pub issuance: Option<IssuanceConfig>,
    /// Allowed hypervisor networks.
    pub allow: AllowList,
    /// Caps and timers of every session.
    pub sessions: SessionsConfig,
    /// Browser sessions' WebSocket limits and timers.
    pub websocket: WebSocketConfig,
    /// Console pages and client libraries.
    pub web: WebConfig,
    /// The shared store, if several nodes share state.
    pub store: Option<StoreConfig>,
    /// This node's name.
    pub node_name: String,
    /// Nova's console tokens, when `[nova]` is configured.
    pub nova: Option<NovaSettings>,
    /// Recordings, when `[recording]` is configured.
    pub recording: Option<crate::recording::RecordingSettings>,
    /// What the file does that still works but should change (deprecated
    /// names), located like issues. Whoever loads the file shows them: `serve`
    /// and reloads log them, `config check` prints them.
    pub warnings: Vec<ConfigIssue>,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with(path, |_| {})
    }

    /// Reads a config file, lets `adjust` change it as read (command-line
    /// overrides, validated like the file's own settings), then validates it.
    pub fn load_with(
        path: &Path,
        adjust: impl FnOnce(&mut RawConfig),
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_path_buf()),
            issues: vec![ConfigIssue {
                key: "(file)".into(),
                at: None,
                message: format!("cannot read: {e}"),
            }],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml_with(&text, base, adjust).map_err(|mut e| {
            e.file = Some(path.to_path_buf());
            e
        })
    }

    /// Parses and validates TOML text; relative paths resolve against `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Config, ConfigError> {
        Self::from_toml_with(text, base, |_| {})
    }

    /// [`Config::from_toml`], with `adjust` applied to the file as parsed.
    pub fn from_toml_with(
        text: &str,
        base: &Path,
        adjust: impl FnOnce(&mut RawConfig),
    ) -> Result<Config, ConfigError> {
        let mut raw: RawConfig = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| line_col(text, s.start));
            ConfigError {
                file: None,
                issues: vec![ConfigIssue {
                    key: "(syntax)".into(),
                    at,
                    message: e.message().trim().to_string(),
                }],
            }
        })?;
        adjust(&mut raw);
        match raw.validate(base) {
            Ok(mut config) => {
                place(text, &mut config.warnings);
                Ok(config)
            }
            Err(mut issues) => {
                place(text, &mut issues);
                Err(ConfigError { file: None, issues })
            }
        }
    }
}

/// Listener addresses given on the command line, which win over the file's,
/// at start and at every reload (so a reload does not see them as changes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenOverrides {
    /// `listen.admin`.
    pub admin: Option<SocketAddr>,
    /// `listen.public` (the base URL keeps following the file's).
    pub public: Option<SocketAddr>,
    /// `spice.listen_tls`.
    pub spice_tls: Option<SocketAddr>,
    /// `vnc.listen`.
    pub vnc: Option<SocketAddr>,
}

impl ListenOverrides {
    /// The native listeners' addresses go into the file as read: a listener
    /// is validated together with its certificate.
    pub fn adjust_raw(&self, raw: &mut RawConfig) {
        if let Some(addr) = self.spice_tls {
            raw.spice.listen_tls = Some(addr.to_string());
        }
        if let Some(addr) = self.vnc {
            raw.vnc.listen = Some(addr.to_string());
        }
    }

    /// The admin and public addresses are bare addresses, set after validation.
    pub fn adjust(&self, config: &mut Config) {
        if let Some(addr) = self.admin {
            config.listen.admin = addr;
        }
        if let Some(addr) = self.public {
            config.listen.public = addr;
        }
    }
}

/// Where a running Porthole's configuration comes from: its file, and the
/// command-line settings that win over it. A reload reads it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSource {
    /// The config file.
    pub path: PathBuf,
    /// Command-line listener addresses.
    pub overrides: ListenOverrides,
}

impl ConfigSource {
    /// The file alone.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            overrides: ListenOverrides::default(),
        }
    }

    /// Reads and validates the file, with the overrides applied.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = Config::load_with(&self.path, |raw| self.overrides.adjust_raw(raw))?;
        self.overrides.adjust(&mut config);
        Ok(config)
    }
}

/// The default state folder (see [`RawConfig::state_dir`]).
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PORTHOLE_STATE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(dir).join("porthole");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/state/porthole"),
        None => PathBuf::from(".porthole"),
    }
}

impl RawConfig {
    /// Validates into a [`Config`], collecting every problem; deprecated names
    /// still in use end up in [`Config::warnings`].
    pub fn validate(self, base: &Path) -> Result<Config, Vec<ConfigIssue>> {
        let mut issues = Issues::default();
        let paths = Paths(base);
        let listen = validate_listen(self.listen, paths, &mut issues);
        let sessions = validate_sessions(&self.sessions, &self.websocket, &mut issues);
        let websocket = validate_websocket(&self.websocket, &sessions, &mut issues);
        let web = validate_web(self.web, paths);
        let tokens = validate_tokens(self.tokens, paths, &mut issues);
        let issuance = self
            .issuance
            .map(|raw| validate_issuance(raw, &tokens.policy, paths, &mut issues));
        let backends = validate_backends(self.backends, paths, &mut issues);
        let (spice, spice_cert) = validate_spice(self.spice, &listen, paths, &mut issues);
        let vnc = validate_vnc(self.vnc, spice_cert, listen.tls13_only, &mut issues, paths);
        let store = self
            .store
            .map(|raw| validate_store(raw, paths, &mut issues));
        proxy_protocol_needs_proxies(&listen, &spice, &vnc, &mut issues);
        let node_name = validate_node(self.node, &mut issues);
        let nova = self
            .nova
            .map(|raw| validate_nova(raw, tokens.store_capacity, paths, &mut issues));
        let recording = self
            .recording
            .and_then(|raw| validate_recording(raw, &backends.networks, paths, &mut issues));
        if !issues.problems.is_empty() {
            return Err(issues.problems);
        }
        Ok(Config {
            recording,
            audit_path: validate_audit(self.audit, paths),
            vnc,
            vnc_backends: backends.vnc,
            spice,
            spice_backends: backends.spice,
            state_dir: self
                .state_dir
                .map(|p| paths.resolve(&p))
                .unwrap_or_else(default_state_dir),
            listen,
            sessions,
            websocket,
            web,
            store,
            tokens,
            issuance,
            allow: AllowList::new(backends.networks),
            node_name,
            nova,
            warnings: issues.warnings,
        })
    }
}

/// A PROXY header is believed only from `listen.trusted_proxies`: a listener
/// that expects one with no proxy trusted would never see one.
fn proxy_protocol_needs_proxies(
    listen: &ListenConfig,
    spice: &SpiceConfig,
    vnc: &VncConfig,
    issues: &mut Issues,
) {
    if !listen.trusted_proxies.is_empty() {
        return;
    }
    for (key, on) in [
        ("listen.proxy_protocol", listen.proxy_protocol),
        ("spice.proxy_protocol", spice.proxy_protocol),
        ("vnc.proxy_protocol", vnc.proxy_protocol),
    ] {
        if on {
            issues.push(
                key,
                "needs `listen.trusted_proxies`: only those may send a PROXY header",
            );
        }
    }
}
