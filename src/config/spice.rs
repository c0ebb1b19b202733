//! `[spice]`: the native SPICE listeners (TLS, and the plain one that only
//! asks for TLS), what clients are told to connect to, and the ticket, link
//! key and display drain timers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::issues::{Issues, Paths, host_of, parse_listener_addr, secs_within};
use super::listen::ListenConfig;
use super::tls::{CertFiles, TlsListener, cert_files, tls_listener, tls_min_version};

/// Where the native SPICE TLS listener binds on embedded defaults.
pub const DEFAULT_SPICE_TLS_ADDR: &str = "127.0.0.1:6084";

/// `[spice]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpice {
    /// TLS listener for native SPICE clients (spice-direct). Off when absent.
    pub listen_tls: Option<String>,
    /// Plain listener that answers every link with NEED_SECURED. Off when absent.
    pub listen_plain: Option<String>,
    /// Certificate chain and key of the TLS listener. Default: `listen.tls_cert`/`tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// Lowest TLS version: `"1.2"` or `"1.3"`. Default: `listen.tls_min_version`.
    pub tls_min_version: Option<String>,
    /// See `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// CA certificate (PEM) that clients are told to trust in connection details.
    pub ca: Option<PathBuf>,
    /// The certificate's subject as virt-viewer's `host-subject` wants it.
    pub host_subject: Option<String>,
    /// Host name clients connect to. Default: the public base URL's host.
    pub public_host: Option<String>,
    /// TLS port clients connect to (behind NAT). Default: the listener's port.
    pub public_tls_port: Option<u16>,
    /// Seconds a fresh ticket may wait for its first link. Default 120.
    pub ticket_ttl_secs: Option<u64>,
    /// Deadline for a channel's TLS and link handshake, seconds. Default 10.
    pub handshake_timeout_secs: Option<u64>,
    /// How often a new RSA link key replaces the oldest, seconds. Default 30.
    pub key_rotation_secs: Option<u64>,
    /// How long a dropped display channel is drained after its session
    /// ended, seconds, before Porthole closes it. Default 5.
    pub drain_grace_secs: Option<u64>,
    /// The longest a dropped display channel is drained, seconds. Default 3600.
    pub drain_max_secs: Option<u64>,
    /// Connections to `listen_tls` and `listen_plain` from
    /// `listen.trusted_proxies` start with a PROXY protocol header. Default false.
    pub proxy_protocol: Option<bool>,
}

/// `[spice]`, validated.
#[derive(Debug, Clone)]
pub struct SpiceConfig {
    /// Native TLS listener, if on.
    pub listen_tls: Option<TlsListener>,
    /// NEED_SECURED-only plain listener, if on.
    pub listen_plain: Option<SocketAddr>,
    /// CA clients are told to trust.
    pub ca: Option<PathBuf>,
    /// `host-subject` for clients.
    pub host_subject: Option<String>,
    /// Host clients connect to.
    pub public_host: String,
    /// TLS port clients connect to, when it differs from the listener's.
    pub public_tls_port: Option<u16>,
    /// Unused tickets die after this long.
    pub ticket_ttl_secs: u64,
    /// Deadline for a channel's handshakes.
    pub handshake_timeout: Duration,
    /// Trusted proxies announce each client with a PROXY header.
    pub proxy_protocol: bool,
    /// RSA link key rotation period.
    pub key_rotation: Duration,
    /// A dropped display channel's drain outlives its session by this much at most.
    pub drain_grace: Duration,
    /// A dropped display channel is drained this long at most.
    pub drain_max: Duration,
}

/// `[spice]`, and the certificate it settled on (its own, else the public
/// listener's), which the VNC listener defaults to.
pub(super) fn validate_spice(
    sp: RawSpice,
    listen: &ListenConfig,
    paths: Paths<'_>,
    issues: &mut Issues,
) -> (SpiceConfig, Option<CertFiles>) {
    let cert = cert_files(
        issues,
        "spice",
        sp.tls_cert,
        sp.tls_key,
        paths,
        listen.tls.clone(),
    );
    let tls13_only = tls_min_version(
        issues,
        "spice.tls_min_version",
        sp.tls_min_version.as_deref(),
        listen.tls13_only,
    );
    let listen_tls = tls_listener(
        issues,
        "spice.listen_tls",
        sp.listen_tls,
        cert.clone(),
        tls13_only,
        "spice.tls_cert and tls_key, or listen.tls_cert and tls_key",
    );
    let listen_plain = sp
        .listen_plain
        .and_then(|text| parse_listener_addr(issues, "spice.listen_plain", &text));
    let public_host = sp
        .public_host
        .unwrap_or_else(|| host_of(&listen.public_base_url).unwrap_or_else(|| "localhost".into()));
    let spice = SpiceConfig {
        listen_tls,
        listen_plain,
        ca: sp.ca.map(|p| paths.resolve(&p)),
        host_subject: sp.host_subject,
        public_host,
        public_tls_port: sp.public_tls_port,
        ticket_ttl_secs: secs_within(
            issues,
            "spice.ticket_ttl_secs",
            sp.ticket_ttl_secs,
            120,
            5,
            3600,
        ),
        handshake_timeout: Duration::from_secs(secs_within(
            issues,
            "spice.handshake_timeout_secs",
            sp.handshake_timeout_secs,
            10,
            1,
            300,
        )),
        proxy_protocol: sp.proxy_protocol.unwrap_or(false),
        key_rotation: Duration::from_secs(secs_within(
            issues,
            "spice.key_rotation_secs",
            sp.key_rotation_secs,
            30,
            1,
            86_400,
        )),
        drain_grace: Duration::from_secs(secs_within(
            issues,
            "spice.drain_grace_secs",
            sp.drain_grace_secs,
            5,
            1,
            300,
        )),
        drain_max: Duration::from_secs(secs_within(
            issues,
            "spice.drain_max_secs",
            sp.drain_max_secs,
            3600,
            10,
            86_400,
        )),
    };
    (spice, cert)
}
