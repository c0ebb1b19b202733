//! `[vnc]`: the native VNC listener (vnc-direct: VeNCrypt X509Plain with a ticket).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::issues::{Issues, Paths, secs_within};
use super::tls::{CertFiles, TlsListener, cert_files, tls_listener, tls_min_version};

/// Where the native VNC listener binds on embedded defaults.
pub const DEFAULT_VNC_ADDR: &str = "127.0.0.1:6085";

/// `[vnc]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVnc {
    /// Listener for native VNC clients (vnc-direct): RFB, then VeNCrypt
    /// X509Plain with a ticket. Off when absent.
    pub listen: Option<String>,
    /// Its certificate chain and key. Default: the SPICE listener's, else `listen.tls_*`.
    pub tls_cert: Option<PathBuf>,
    /// Lowest TLS version: `"1.2"` or `"1.3"`. Default: `listen.tls_min_version`.
    pub tls_min_version: Option<String>,
    /// See `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Port clients connect to (behind NAT). Default: the listener's.
    pub public_port: Option<u16>,
    /// Deadline for a connection's handshakes (RFB, TLS, hypervisor), seconds. Default 10.
    pub handshake_timeout_secs: Option<u64>,
    /// Connections from `listen.trusted_proxies` start with a PROXY protocol
    /// header (v1 or v2) naming the client. Default false.
    pub proxy_protocol: Option<bool>,
}

/// `[vnc]`, validated.
#[derive(Debug, Clone)]
pub struct VncConfig {
    /// The native listener (VeNCrypt X509Plain), if on.
    pub listen: Option<TlsListener>,
    /// Port clients connect to, when it differs from the listener's.
    pub public_port: Option<u16>,
    /// Deadline for a connection's handshakes.
    pub handshake_timeout: Duration,
    /// Trusted proxies announce each client with a PROXY header.
    pub proxy_protocol: bool,
}

/// `[vnc]`; its certificate defaults to `spice_cert`, its TLS floor to `tls13_default`.
pub(super) fn validate_vnc(
    v: RawVnc,
    spice_cert: Option<CertFiles>,
    tls13_default: bool,
    issues: &mut Issues,
    paths: Paths<'_>,
) -> VncConfig {
    let cert = cert_files(issues, "vnc", v.tls_cert, v.tls_key, paths, spice_cert);
    let tls13_only = tls_min_version(
        issues,
        "vnc.tls_min_version",
        v.tls_min_version.as_deref(),
        tls13_default,
    );
    VncConfig {
        listen: tls_listener(
            issues,
            "vnc.listen",
            v.listen,
            cert,
            tls13_only,
            "vnc.tls_cert and tls_key, spice.tls_*, or listen.tls_*",
        ),
        public_port: v.public_port,
        handshake_timeout: Duration::from_secs(secs_within(
            issues,
            "vnc.handshake_timeout_secs",
            v.handshake_timeout_secs,
            10,
            1,
            300,
        )),
        proxy_protocol: v.proxy_protocol.unwrap_or(false),
    }
}
