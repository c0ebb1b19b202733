//! `[listen]`: the public and admin listeners, the public base URL and the
//! origins allowed to open WebSockets, trusted proxies, and the cap on
//! connections not admitted yet.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::issues::{Issues, Paths, parse_addr, parse_each, parse_net, within};
use super::tls::{CertFiles, cert_files, tls_min_version};

/// The default public listener (noVNC proxy's customary port).
pub const DEFAULT_PUBLIC_ADDR: &str = "127.0.0.1:6080";
/// The default admin listener: loopback only.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:6090";

/// `[listen]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    /// Public listener (console pages, WebSockets). Default `127.0.0.1:6080`.
    pub public: Option<String>,
    /// Admin listener (health, metrics, issuance). Default `127.0.0.1:6090`.
    pub admin: Option<String>,
    /// The URL users reach the public listener at; console URLs are built from
    /// it. Default `http://` + the public address.
    pub public_base_url: Option<String>,
    /// More public addresses (e.g. `"[::1]:6080"` beside an IPv4 `public`).
    #[serde(default)]
    pub public_extra: Vec<String>,
    /// PEM certificate chain: the public listener speaks TLS when set (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Proxies (CIDR) whose `X-Forwarded-For` (and PROXY protocol header,
    /// where a listener expects one) is believed; from anyone else it is ignored.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Connections to the public listeners from `trusted_proxies` start with a
    /// PROXY protocol header (v1 or v2) naming the client: a TCP-mode balancer
    /// in front. Default false.
    pub proxy_protocol: Option<bool>,
    /// Origins allowed to open WebSockets besides the public base URL's own
    /// (e.g. a dashboard embedding the console). Fixed at start; no request changes it.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Accept WebSockets without an `Origin` header (non-browser clients; browsers
    /// always send one). Default true.
    pub allow_missing_origin: Option<bool>,
    /// Lowest TLS version every listener accepts: `"1.2"` (default) or `"1.3"`.
    pub tls_min_version: Option<String>,
    /// Most connections, over every public and native listener, that are
    /// not admitted yet (no session: a page load, a handshake); more wait in
    /// the kernel's backlog. Default 1024.
    pub max_pending_connections: Option<usize>,
    /// Most of those from one client address (`trusted_proxies` excepted);
    /// more are closed at once. Default 32.
    pub max_pending_per_address: Option<usize>,
}

/// Validated `[listen]`.
#[derive(Debug, Clone)]
pub struct ListenConfig {
    /// Public listener address.
    pub public: SocketAddr,
    /// Admin listener address.
    pub admin: SocketAddr,
    /// Public base URL, without a trailing slash.
    pub public_base_url: String,
    /// More public addresses.
    pub public_extra: Vec<SocketAddr>,
    /// Certificate chain and key of the public listeners, which speak TLS when set.
    pub tls: Option<CertFiles>,
    /// Proxies whose `X-Forwarded-For` (and PROXY header) is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Trusted proxies announce each client with a PROXY header on the public listeners.
    pub proxy_protocol: bool,
    /// Origins allowed to open WebSockets: the base URL's, then the configured ones.
    pub allowed_origins: Vec<String>,
    /// Accept WebSockets without an `Origin` header.
    pub allow_missing_origin: bool,
    /// The public listeners accept TLS 1.3 only (and, by default, the others).
    pub tls13_only: bool,
    /// Most connections not admitted yet, over every public and native listener.
    pub max_pending_connections: usize,
    /// Most of those from one address (trusted proxies excepted).
    pub max_pending_per_address: usize,
}

/// `[listen]`.
pub(super) fn validate_listen(
    raw: RawListen,
    paths: Paths<'_>,
    issues: &mut Issues,
) -> ListenConfig {
    let public = parse_addr(
        issues,
        "listen.public",
        raw.public.as_deref(),
        DEFAULT_PUBLIC_ADDR,
    );
    let admin = parse_addr(
        issues,
        "listen.admin",
        raw.admin.as_deref(),
        DEFAULT_ADMIN_ADDR,
    );
    let public_base_url = match raw.public_base_url {
        Some(url) => {
            let trimmed = url.trim_end_matches('/').to_string();
            if !(trimmed.starts_with("http://") || trimmed.starts_with("https://"))
                || trimmed.contains(['?', '#', ' '])
            {
                issues.push(
                    "listen.public_base_url",
                    "must be an http:// or https:// URL without query or fragment",
                );
            }
            trimmed
        }
        None => format!("http://{public}"),
    };
    let public_extra = parse_each(
        issues,
        "listen.public_extra",
        &raw.public_extra,
        |a| a.parse::<SocketAddr>().ok(),
        "an address:port",
    );
    let trusted_proxies = parse_each(
        issues,
        "listen.trusted_proxies",
        &raw.trusted_proxies,
        parse_net,
        "a CIDR range or address",
    );
    let allowed_origins = allowed_origins(issues, &public_base_url, &raw.allowed_origins);
    let max_pending_connections = within(
        issues,
        "listen.max_pending_connections",
        raw.max_pending_connections.unwrap_or(1024),
        1,
        1_000_000,
    );
    let max_pending_per_address = within(
        issues,
        "listen.max_pending_per_address",
        raw.max_pending_per_address.unwrap_or(32),
        1,
        max_pending_connections,
    );
    ListenConfig {
        public,
        admin,
        public_base_url,
        public_extra,
        tls: cert_files(issues, "listen", raw.tls_cert, raw.tls_key, paths, None),
        trusted_proxies,
        proxy_protocol: raw.proxy_protocol.unwrap_or(false),
        allowed_origins,
        allow_missing_origin: raw.allow_missing_origin.unwrap_or(true),
        tls13_only: tls_min_version(
            issues,
            "listen.tls_min_version",
            raw.tls_min_version.as_deref(),
            false,
        ),
        max_pending_connections,
        max_pending_per_address,
    }
}

/// The origins allowed to open WebSockets: the public base URL's, then `configured`.
fn allowed_origins(
    issues: &mut Issues,
    public_base_url: &str,
    configured: &[String],
) -> Vec<String> {
    let mut allowed = Vec::new();
    match origin_of(public_base_url) {
        Some(o) => allowed.push(o),
        None => issues.push(
            "listen.public_base_url",
            "has no usable origin (scheme://host[:port])",
        ),
    }
    for (i, o) in configured.iter().enumerate() {
        match origin_of(o) {
            Some(origin) if bare_origin(o) => allowed.push(origin),
            _ => issues.push(
                format!("listen.allowed_origins[{i}]"),
                format!("`{o}` is not an origin (scheme://host[:port])"),
            ),
        }
    }
    allowed
}

/// The origin (`scheme://host[:port]`, lower case, default port dropped) of a URL,
/// in the form browsers send in the `Origin` header.
pub fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return None,
    };
    let authority = rest.split(['/', '?', '#']).next()?.to_ascii_lowercase();
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let authority = authority.strip_suffix(default_port).unwrap_or(&authority);
    Some(format!("{scheme}://{authority}"))
}

/// Whether a configured origin has no path, query or fragment.
fn bare_origin(o: &str) -> bool {
    o.split_once("://")
        .is_some_and(|(_, rest)| !rest.trim_end_matches('/').contains(['/', '?', '#']))
}
