//! Loading what a config file names, and reloading it without a restart
//! (SIGHUP, `POST /v1/reload` or `POST /v1/keys/reload` on the admin listener).
//!
//! [`Reloadable::load`] is the one check of a file: it validates it and loads
//! everything it names (token keys, the issuance signing key, every
//! listener's certificate, backend credentials, the CA clients are told to
//! trust). `config check` runs it, the composition root starts from it, and a
//! reload installs what it made, or, when anything fails, changes nothing.
//!
//! A reload applies the file's key list (`[[tokens.keys]]`, `allow_hmac`),
//! the issuance signing key and kid, the listeners' certificates and TLS
//! minimum versions, and the backend networks with their credentials. Live
//! sessions are never touched: they hold what they started with; new
//! connections see only the new settings. Everything else is read only at
//! start: a reload compares it with what Porthole started with and names each
//! setting that differs in [`Reloaded::restart_required`], without applying it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use rustls::ServerConfig;

use crate::config::{
    CertFiles, Config, ConfigError, ConfigIssue, ConfigSource, IssuanceConfig, SigningKey,
    TlsListener,
};
use crate::hypervisor::{CredentialError, SpiceUpstreams, VncUpstreams};
use crate::token::claims::ConsoleClaim;
use crate::token::signing::{MintRequest, Signer, SigningError};
use crate::token::{ConsoleType, KeyError, LoadedKeys, TokenValidator, ValidationPolicy, unix_now};
use crate::transport::listener::{self, TlsError, TlsSlot};

/// Everything a valid config file makes that a running Porthole uses, loaded:
/// what `config check` validates, what the composition root starts from and
/// what a reload installs.
#[derive(Debug)]
pub struct Reloadable {
    /// The validated file.
    pub config: Config,
    /// Token verification keys (`[[tokens.keys]]`).
    pub keys: LoadedKeys,
    /// The issuance API's signing key, when `[issuance]` is on.
    pub signer: Option<Signer>,
    /// The public listeners' TLS config, when they speak TLS.
    pub public_tls: Option<ServerConfig>,
    /// The native SPICE listener's TLS config, when it is on.
    pub spice_tls: Option<ServerConfig>,
    /// The native VNC listener's TLS config, when it is on.
    pub vnc_tls: Option<ServerConfig>,
    /// SPICE credentials by backend network.
    pub spice_upstreams: SpiceUpstreams,
    /// VNC credentials by backend network.
    pub vnc_upstreams: VncUpstreams,
    /// The CA native clients are told to trust (`spice.ca`), read.
    pub spice_ca_pem: Option<String>,
}

/// Something a valid file names that did not load.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A listener's certificate or key.
    #[error("{key}: {error}")]
    Certificate {
        /// `listen.tls_cert`, `spice.tls_cert` or `vnc.tls_cert`.
        key: &'static str,
        /// Why.
        error: TlsError,
    },
    /// SPICE credentials of a backend network.
    #[error("backends.spice: {0}")]
    SpiceBackends(CredentialError),
    /// VNC credentials of a backend network.
    #[error("backends.vnc: {0}")]
    VncBackends(CredentialError),
    /// The token verification keys.
    #[error("token keys: {0}")]
    Keys(KeyError),
    /// The issuance signing key.
    #[error("issuance.signing_key: {0}")]
    SigningKey(SigningError),
    /// The issuance signing key signs tokens no verification key accepts.
    #[error(
        "issuance.signing_key: the tokens it signs would be refused ({0}); list its public key in [[tokens.keys]]"
    )]
    SignerNotVerified(String),
    /// The CA clients are told to trust.
    #[error("spice.ca: cannot read {path}: {error}")]
    SpiceCa {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
}

/// Why a file was refused; a refused reload changes nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file is unreadable or invalid (every problem, located).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The file is valid, but what it names did not load (every failure).
    #[error("{}", list(.0))]
    Load(Vec<LoadError>),
}

fn list(problems: &[LoadError]) -> String {
    match problems {
        [one] => one.to_string(),
        many => {
            let lines: Vec<String> = many.iter().map(|p| format!("\n  {p}")).collect();
            format!("{} problems:{}", many.len(), lines.concat())
        }
    }
}

impl ReloadError {
    /// Each problem on its own, for the admin API's answer.
    pub fn problems(&self) -> Vec<String> {
        match self {
            ReloadError::Config(e) => e.issues.iter().map(ToString::to_string).collect(),
            ReloadError::Load(p) => p.iter().map(ToString::to_string).collect(),
        }
    }
}

/// Keeps the value, or records why there is none.
fn keep<T>(problems: &mut Vec<LoadError>, r: Result<T, LoadError>) -> Option<T> {
    r.map_err(|e| problems.push(e)).ok()
}

impl Reloadable {
    /// Reads `path` and loads everything it names: what `config check` does.
    pub fn check(path: &Path) -> Result<Reloadable, ReloadError> {
        Self::load(Config::load(path)?)
    }

    /// Loads everything `config` names, for its own token policy.
    pub fn load(config: Config) -> Result<Reloadable, ReloadError> {
        let policy = config.tokens.policy.clone();
        Self::load_for(config, &policy)
    }

    /// Loads everything `config` names, with its keys built for `policy` (the
    /// policy in force: a reload does not change it). Reports every failure.
    pub fn load_for(config: Config, policy: &ValidationPolicy) -> Result<Reloadable, ReloadError> {
        let mut problems = Vec::new();
        let p = &mut problems;
        let keys = LoadedKeys::load(config.tokens.keys.clone(), config.tokens.allow_hmac, policy)
            .map_err(LoadError::Keys);
        let keys = keep(p, keys);
        let signer = match &config.issuance {
            None => Some(None),
            Some(iss) => keep(p, load_signer(iss).map(Some)),
        };
        if let (Some(keys), Some(Some(signer)), Some(iss)) = (&keys, &signer, &config.issuance) {
            keep(p, signer_is_verified(signer, iss, keys));
        }
        let tls = |files: Option<(&CertFiles, bool)>, key, console: bool| {
            let Some((f, tls13_only)) = files else {
                return Ok(None);
            };
            let load = if console {
                listener::load_tls_without_alpn
            } else {
                listener::load_tls
            };
            load(&f.cert, &f.key, tls13_only)
                .map(Some)
                .map_err(|error| LoadError::Certificate { key, error })
        };
        let l = &config.listen;
        let public_tls = tls(
            l.tls.as_ref().map(|f| (f, l.tls13_only)),
            "listen.tls_cert",
            false,
        );
        let public_tls = keep(p, public_tls);
        let spice_tls = keep(
            p,
            tls(console(&config.spice.listen_tls), "spice.tls_cert", true),
        );
        let vnc_tls = keep(p, tls(console(&config.vnc.listen), "vnc.tls_cert", true));
        let spice_upstreams = keep(
            p,
            SpiceUpstreams::load(&config.spice_backends).map_err(LoadError::SpiceBackends),
        );
        let vnc_upstreams = keep(
            p,
            VncUpstreams::load(&config.vnc_backends).map_err(LoadError::VncBackends),
        );
        let spice_ca_pem = match &config.spice.ca {
            None => Some(None),
            Some(path) => keep(
                p,
                std::fs::read_to_string(path)
                    .map(Some)
                    .map_err(|error| LoadError::SpiceCa {
                        path: path.clone(),
                        error,
                    }),
            ),
        };
        match (
            keys,
            signer,
            public_tls,
            spice_tls,
            vnc_tls,
            (spice_upstreams, vnc_upstreams),
            spice_ca_pem,
        ) {
            (
                Some(keys),
                Some(signer),
                Some(public_tls),
                Some(spice_tls),
                Some(vnc_tls),
                (Some(spice_upstreams), Some(vnc_upstreams)),
                Some(spice_ca_pem),
            ) if problems.is_empty() => Ok(Reloadable {
                config,
                keys,
                signer,
                public_tls,
                spice_tls,
                vnc_tls,
                spice_upstreams,
                vnc_upstreams,
                spice_ca_pem,
            }),
            _ => Err(ReloadError::Load(problems)),
        }
    }
}

/// A native console listener's certificate files and TLS floor, when it is on.
fn console(t: &Option<TlsListener>) -> Option<(&CertFiles, bool)> {
    t.as_ref().map(|t| (&t.cert, t.tls13_only))
}

/// The issuance API's signing key.
fn load_signer(iss: &IssuanceConfig) -> Result<Signer, LoadError> {
    let kid = iss.signing_kid.clone();
    match &iss.signing_key {
        SigningKey::PrivatePem(path) => Signer::from_private_pem_file(path, kid),
        SigningKey::Secret(path) => std::fs::read(path)
            .map(|secret| Signer::from_secret(&secret, kid))
            .map_err(|error| SigningError::Read {
                path: path.clone(),
                error,
            }),
    }
    .map_err(LoadError::SigningKey)
}

/// A token the signing key signs must verify with the key its kid selects:
/// otherwise every issuance fails (a rotated signing key whose public key
/// was not published, a kid that names another key).
fn signer_is_verified(
    signer: &Signer,
    iss: &IssuanceConfig,
    keys: &LoadedKeys,
) -> Result<(), LoadError> {
    let probe = MintRequest {
        issuer: iss.issuer.clone(),
        audience: iss.audience.clone(),
        instance: "config-check".into(),
        user: None,
        console: ConsoleClaim {
            kind: ConsoleType::Novnc,
            host: "config-check.invalid".into(),
            port: 5900,
            tls_port: None,
            view_only: false,
            record: false,
        },
        ttl_secs: 1,
    }
    .claims(unix_now());
    let token = signer.sign(&probe).map_err(LoadError::SigningKey)?;
    keys.ring()
        .verifies_signature(token.expose())
        .map_err(LoadError::SignerNotVerified)
}

/// What a reload may swap, as the composition root built it.
#[derive(Debug, Clone)]
pub struct Swappable {
    /// Token keys and the allow-list.
    pub validator: Arc<TokenValidator>,
    /// The issuance API's signing key, when `[issuance]` is on.
    pub signer: Option<Arc<ArcSwap<Signer>>>,
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

/// Reloads from the config file (or, without one, the files the running
/// configuration names) into the running parts.
#[derive(Debug)]
pub struct Reloader {
    /// The config file and command-line overrides; `None` on embedded defaults.
    source: Option<ConfigSource>,
    /// The configuration Porthole started with: what settings that need a
    /// restart are compared with.
    started: Config,
    parts: Swappable,
    /// One reload at a time: two at once could interleave their swaps.
    one_at_a_time: Mutex<()>,
}

/// An issuance `kid` that a reload changed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KidChange {
    /// The kid issued tokens carried before.
    pub before: Option<String>,
    /// The kid they carry now.
    pub after: Option<String>,
}

/// What a reload did: the admin API's answer (`{"reloaded": ...}`) and the
/// SIGHUP log line.
#[derive(Debug, Default, serde::Serialize)]
pub struct Reloaded {
    /// Number of token verification keys now loaded.
    pub keys: usize,
    /// Their kids, sorted (a lone key without a kid is counted, not named).
    pub kids: Vec<String>,
    /// Kids loaded now that were not before, sorted.
    pub keys_added: Vec<String>,
    /// Kids no longer loaded: their tokens are refused from now on, sorted.
    pub keys_removed: Vec<String>,
    /// The issuance API's kid, when the reload changed it; else `null`.
    pub issuance_kid: Option<KidChange>,
    /// Listeners whose certificate (and TLS minimum version) was reloaded.
    pub certificates: Vec<&'static str>,
    /// Number of backend networks now in force.
    pub backends: usize,
    /// Settings the file changes that apply only at the next start (dotted
    /// names as in the file); they were not applied.
    pub restart_required: Vec<&'static str>,
    /// Deprecated names the reloaded file still uses (logged, not answered).
    #[serde(skip)]
    pub warnings: Vec<ConfigIssue>,
}

impl Reloader {
    /// A reloader into `parts`, which were built from `started`; it reads
    /// `source` at each reload (without one, `started` names the files).
    pub fn new(started: Config, parts: Swappable, source: Option<ConfigSource>) -> Self {
        Self {
            source,
            started,
            parts,
            one_at_a_time: Mutex::new(()),
        }
    }

    /// Validates and loads everything anew, as `config check` does, and
    /// swaps it in; or, when anything fails, changes nothing.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let _one = self
            .one_at_a_time
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let config = match &self.source {
            Some(source) => source.load()?,
            None => self.started.clone(),
        };
        // Keys are built for the token policy in force: changing it needs a restart.
        let ready = Reloadable::load_for(config, self.parts.validator.policy())?;
        let restart_required = restart_required(&self.started, &ready.config);
        Ok(self.install(ready, restart_required))
    }

    /// Swaps in what `r` loaded.
    fn install(&self, r: Reloadable, restart_required: Vec<&'static str>) -> Reloaded {
        let p = &self.parts;
        let before: BTreeSet<String> = p
            .validator
            .replace_keys(r.keys)
            .ring()
            .kids()
            .into_iter()
            .collect();
        let now: BTreeSet<String> = p.validator.kids().into_iter().collect();
        let issuance_kid = match (&p.signer, r.signer) {
            (Some(slot), Some(signer)) => {
                let after = signer.kid().map(str::to_string);
                let before = slot.swap(Arc::new(signer)).kid().map(str::to_string);
                (before != after).then_some(KidChange { before, after })
            }
            // `[issuance]` switched on or off: `restart_required` says so.
            _ => None,
        };
        let mut certificates = Vec::new();
        for (name, slot, tls) in [
            ("public", &p.public_tls, r.public_tls),
            ("spice", &p.spice_tls, r.spice_tls),
            ("vnc", &p.vnc_tls, r.vnc_tls),
        ] {
            // A listener switched on or off: `restart_required` says so.
            if let (Some(slot), Some(tls)) = (slot, tls) {
                slot.store(Arc::new(tls));
                certificates.push(name);
            }
        }
        let backends = r.config.allow.backends().len();
        p.validator.set_allow_list(r.config.allow);
        p.spice_upstreams.store(Arc::new(r.spice_upstreams));
        p.vnc_upstreams.store(Arc::new(r.vnc_upstreams));
        Reloaded {
            keys: p.validator.key_count(),
            keys_added: now.difference(&before).cloned().collect(),
            keys_removed: before.difference(&now).cloned().collect(),
            kids: now.into_iter().collect(),
            issuance_kid,
            certificates,
            backends,
            restart_required,
            warnings: r.config.warnings,
        }
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
                tracing::info!(
                    keys_added = ?done.keys_added,
                    keys_removed = ?done.keys_removed,
                    kids = ?done.kids,
                    issuance_kid = ?done.issuance_kid,
                    certificates = ?done.certificates,
                    backends = done.backends,
                    restart_required = ?done.restart_required,
                    "{why}: reloaded"
                );
                if !done.restart_required.is_empty() {
                    tracing::warn!(
                        "{why}: not applied, these need a restart: {}",
                        done.restart_required.join(", ")
                    );
                }
                let joined = |v: &[String]| (!v.is_empty()).then(|| v.join(","));
                crate::audit::AuditEvent::new("reloaded")
                    .field("by", Some(why.to_string()))
                    .field("keys_added", joined(&done.keys_added))
                    .field("keys_removed", joined(&done.keys_removed))
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

/// The settings read only at start that `new` sets otherwise than `started`.
fn restart_required(started: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut differs = |name: &'static str, differ: bool| {
        if differ {
            out.push(name);
        }
    };
    let (a, b) = (&started.listen, &new.listen);
    differs("listen.public", a.public != b.public);
    differs("listen.public_extra", a.public_extra != b.public_extra);
    differs("listen.admin", a.admin != b.admin);
    differs(
        "listen.public_base_url",
        a.public_base_url != b.public_base_url,
    );
    // Switching TLS on or off; new files for a listener that has TLS apply.
    differs("listen.tls_cert", a.tls.is_some() != b.tls.is_some());
    differs(
        "listen.trusted_proxies",
        a.trusted_proxies != b.trusted_proxies,
    );
    differs(
        "listen.proxy_protocol",
        a.proxy_protocol != b.proxy_protocol,
    );
    // The first allowed origin is the base URL's own, reported above.
    differs(
        "listen.allowed_origins",
        a.allowed_origins.get(1..) != b.allowed_origins.get(1..),
    );
    differs(
        "listen.allow_missing_origin",
        a.allow_missing_origin != b.allow_missing_origin,
    );
    differs(
        "listen.max_pending_connections",
        a.max_pending_connections != b.max_pending_connections,
    );
    differs(
        "listen.max_pending_per_address",
        a.max_pending_per_address != b.max_pending_per_address,
    );
    let (a, b) = (&started.tokens, &new.tokens);
    differs("tokens.issuers", a.policy.issuers != b.policy.issuers);
    differs("tokens.audiences", a.policy.audiences != b.policy.audiences);
    differs(
        "tokens.leeway_secs",
        a.policy.leeway_secs != b.policy.leeway_secs,
    );
    differs(
        "tokens.max_ttl_secs",
        a.policy.max_ttl_secs != b.policy.max_ttl_secs,
    );
    differs(
        "tokens.max_token_bytes",
        a.policy.max_token_bytes != b.policy.max_token_bytes,
    );
    differs("tokens.reuse", a.reuse != b.reuse);
    differs(
        "tokens.store_capacity",
        a.store_capacity != b.store_capacity,
    );
    issuance_changes(
        started.issuance.as_ref(),
        new.issuance.as_ref(),
        &mut differs,
    );
    let (a, b) = (&started.sessions, &new.sessions);
    differs("sessions.max_sessions", a.max_sessions != b.max_sessions);
    differs(
        "sessions.max_sessions_per_client",
        a.max_sessions_per_client != b.max_sessions_per_client,
    );
    differs(
        "sessions.max_sessions_per_token",
        a.max_sessions_per_token != b.max_sessions_per_token,
    );
    differs(
        "sessions.connect_timeout_secs",
        a.connect_timeout != b.connect_timeout,
    );
    differs(
        "sessions.hypervisor_keepalive_secs",
        a.hypervisor_keepalive != b.hypervisor_keepalive,
    );
    differs(
        "sessions.client_keepalive_secs",
        a.client_keepalive != b.client_keepalive,
    );
    differs(
        "sessions.idle_timeout_secs",
        a.idle_timeout != b.idle_timeout,
    );
    differs(
        "sessions.max_session_age_secs",
        a.max_session_age != b.max_session_age,
    );
    differs(
        "sessions.shutdown_grace_secs",
        a.shutdown_grace != b.shutdown_grace,
    );
    websocket_changes(started, new, &mut differs);
    console_changes(started, new, &mut differs);
    differs("state_dir", started.state_dir != new.state_dir);
    differs("audit.path", started.audit_path != new.audit_path);
    differs("node.name", started.node_name != new.node_name);
    out
}

/// `[issuance]` settings read at start (its signing key and kid are applied).
fn issuance_changes(
    a: Option<&IssuanceConfig>,
    b: Option<&IssuanceConfig>,
    differs: &mut impl FnMut(&'static str, bool),
) {
    let (Some(a), Some(b)) = (a, b) else {
        differs("issuance", a.is_some() != b.is_some());
        return;
    };
    let bearer = |i: &IssuanceConfig| -> Vec<String> {
        i.bearer_keys.iter().map(|k| k.expose().clone()).collect()
    };
    differs("issuance.bearer_key_files", bearer(a) != bearer(b));
    differs("issuance.issuer", a.issuer != b.issuer);
    differs("issuance.audience", a.audience != b.audience);
    differs("issuance.ttl_secs", a.ttl_secs != b.ttl_secs);
}

/// `[websocket]` and `[web]`, all read at start.
fn websocket_changes(started: &Config, new: &Config, differs: &mut impl FnMut(&'static str, bool)) {
    let (a, b) = (&started.websocket, &new.websocket);
    differs(
        "websocket.max_message_bytes",
        a.max_message_bytes != b.max_message_bytes,
    );
    differs(
        "websocket.max_frame_bytes",
        a.max_frame_bytes != b.max_frame_bytes,
    );
    differs(
        "websocket.read_buffer_bytes",
        a.read_buffer_bytes != b.read_buffer_bytes,
    );
    differs(
        "websocket.write_buffer_bytes",
        a.write_buffer_bytes != b.write_buffer_bytes,
    );
    differs(
        "websocket.max_write_buffer_bytes",
        a.max_write_buffer_bytes != b.max_write_buffer_bytes,
    );
    differs(
        "websocket.upgrade_timeout_secs",
        a.upgrade_timeout != b.upgrade_timeout,
    );
    differs(
        "websocket.ping_interval_secs",
        a.ping_interval != b.ping_interval,
    );
    differs(
        "websocket.idle_timeout_secs",
        a.idle_timeout != b.idle_timeout,
    );
    differs(
        "websocket.end_at_token_expiry",
        a.end_at_token_expiry != b.end_at_token_expiry,
    );
    let (a, b) = (&started.web, &new.web);
    differs("web.root", a.root != b.root);
    differs("web.novnc_dir", a.novnc_dir != b.novnc_dir);
    differs("web.xterm_dir", a.xterm_dir != b.xterm_dir);
    differs(
        "web.spice_html5_dir",
        a.spice_html5_dir != b.spice_html5_dir,
    );
}

/// `[spice]` and `[vnc]` settings read at start (certificates and TLS
/// minimum versions of listeners that are on are applied).
fn console_changes(started: &Config, new: &Config, differs: &mut impl FnMut(&'static str, bool)) {
    let (a, b) = (&started.spice, &new.spice);
    let addr = |l: &Option<TlsListener>| l.as_ref().map(|l| l.addr);
    differs(
        "spice.listen_tls",
        addr(&a.listen_tls) != addr(&b.listen_tls),
    );
    differs("spice.listen_plain", a.listen_plain != b.listen_plain);
    differs("spice.ca", a.ca != b.ca);
    differs("spice.host_subject", a.host_subject != b.host_subject);
    differs("spice.public_host", a.public_host != b.public_host);
    differs(
        "spice.public_tls_port",
        a.public_tls_port != b.public_tls_port,
    );
    differs(
        "spice.ticket_ttl_secs",
        a.ticket_ttl_secs != b.ticket_ttl_secs,
    );
    differs(
        "spice.handshake_timeout_secs",
        a.handshake_timeout != b.handshake_timeout,
    );
    differs("spice.key_rotation_secs", a.key_rotation != b.key_rotation);
    differs("spice.proxy_protocol", a.proxy_protocol != b.proxy_protocol);
    let (a, b) = (&started.vnc, &new.vnc);
    differs("vnc.listen", addr(&a.listen) != addr(&b.listen));
    differs("vnc.public_port", a.public_port != b.public_port);
    differs(
        "vnc.handshake_timeout_secs",
        a.handshake_timeout != b.handshake_timeout,
    );
    differs("vnc.proxy_protocol", a.proxy_protocol != b.proxy_protocol);
}
