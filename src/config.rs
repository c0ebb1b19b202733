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

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::hypervisor::{AllowList, BackendNetwork, PortRange};
pub use crate::hypervisor::{SpiceBackendConfig, VncBackendConfig};
use crate::secret::Secret;
use crate::token::nova::{Credential, NovaSettings};
use crate::token::{ConsoleType, KeySource, ReusePolicy, ValidationPolicy};

/// The default public listener (noVNC proxy's customary port).
pub const DEFAULT_PUBLIC_ADDR: &str = "127.0.0.1:6080";
/// The default admin listener: loopback only.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:6090";

/// Where the native VNC listener binds on embedded defaults.
pub const DEFAULT_VNC_ADDR: &str = "127.0.0.1:6085";

/// Where the native SPICE TLS listener binds on embedded defaults.
pub const DEFAULT_SPICE_TLS_ADDR: &str = "127.0.0.1:6084";

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
}

/// `[node]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    /// This node's name in logs, metrics, the audit trail and the session
    /// list: letters, digits, `.`, `-`, `_`, at most 63. Default: the host name.
    pub name: Option<String>,
}

/// `[store]`: the shared store several nodes keep their state in.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// `redis://host:port[/db]` or `rediss://…` (TLS). Absent: in-memory
    /// stores (one node).
    pub url: Option<String>,
    /// ACL user name. Absent: the default user.
    pub username: Option<String>,
    /// File holding the password. Absent: none.
    pub password_file: Option<PathBuf>,
    /// Prefix of every key, so that deployments can share one Redis.
    /// Default `"porthole:"`.
    pub key_prefix: Option<String>,
    /// Deadline of one store operation, milliseconds. Default 1000.
    pub timeout_ms: Option<u64>,
    /// A session's hold on its token expires this long after its node last
    /// renewed it (a node that died frees its tokens then), seconds. Default 30.
    pub lease_secs: Option<u64>,
    /// How often a node renews its sessions' leases, seconds. Default 10.
    pub renew_secs: Option<u64>,
}

/// Validated `[store]`.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The Redis URL (it may hold no password: that comes from `password`).
    pub url: String,
    /// ACL user name.
    pub username: Option<String>,
    /// The password.
    pub password: Option<Secret<String>>,
    /// Prefix of every key.
    pub key_prefix: String,
    /// Deadline of one store operation.
    pub timeout: Duration,
    /// Lease on a running session's token.
    pub lease: Duration,
    /// Lease renewal period.
    pub renew: Duration,
}

/// `[nova]`: Porthole as a drop-in for Nova's console proxies. Exactly one
/// of `username` (with `password_file`) and `application_credential_id`
/// (with `application_credential_secret_file`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNova {
    /// Keystone v3 URL, e.g. `https://keystone.example.com:5000/v3`. Required.
    pub auth_url: Option<String>,
    /// The service user.
    pub username: Option<String>,
    /// File holding its password.
    pub password_file: Option<PathBuf>,
    /// The user's domain name. Default `Default`.
    pub user_domain_name: Option<String>,
    /// The project the token is scoped to. Default `service`.
    pub project_name: Option<String>,
    /// The project's domain name. Default `Default`.
    pub project_domain_name: Option<String>,
    /// An application credential's id, instead of a user and password.
    pub application_credential_id: Option<String>,
    /// File holding the application credential's secret.
    pub application_credential_secret_file: Option<PathBuf>,
    /// Catalog region of the compute endpoint. Default: any.
    pub region_name: Option<String>,
    /// Catalog interface: `public`, `internal` (default) or `admin`.
    pub interface: Option<String>,
    /// The compute endpoint (`…/v2.1`), instead of the catalog's.
    pub compute_url: Option<String>,
    /// CA bundle (PEM) for Keystone and Nova, instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// The longest a client waits for a lookup (the queue for a place in
    /// flight, Keystone, Nova and a retry together), seconds. Default 5, 1..=60.
    pub timeout_secs: Option<u64>,
    /// Nova's `[consoleauth] token_ttl`: how long a token lives after Porthole
    /// first sees it, seconds. Default 600.
    pub token_ttl_secs: Option<u64>,
    /// How long a found token is remembered, seconds (0: never). Default 5, at most 60.
    pub cache_secs: Option<u64>,
    /// How long a token Nova does not know is remembered, seconds. Default 30, at most 600.
    pub negative_cache_secs: Option<u64>,
    /// Lookups in flight at most (four times as many may wait; more are
    /// refused at once as unavailable). Default 32.
    pub max_in_flight: Option<usize>,
    /// Lookups per second of tokens this node has never seen. Default 50, 1..=10000.
    pub unseen_lookups_per_sec: Option<usize>,
    /// How many of those may go at once; half of it is kept for addresses
    /// that brought no unknown token lately. Default 100, 2..=100000.
    pub unseen_lookup_burst: Option<usize>,
    /// `OpenStack-API-Version: compute <this>`. Default `2.99` (spice-direct);
    /// `2.31` or later for a Nova older than 2025.1.
    pub microversion: Option<String>,
}

/// `[audit]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    /// JSON-lines file the audit trail is appended to. Absent: the log.
    pub path: Option<PathBuf>,
}

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

/// `[backends.spice]`: what Porthole presents to the SPICE servers of a backend network.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpiceBackend {
    /// File holding the SPICE ticket (password) the hypervisors expect. Absent: none.
    pub password_file: Option<PathBuf>,
    /// CA (PEM) that signs the hypervisors' SPICE TLS certificates. Without
    /// it Porthole uses the plain port only.
    pub ca: Option<PathBuf>,
    /// Name to check in the hypervisor's certificate. Default: the token's host.
    pub tls_name: Option<String>,
    /// Which port to link on first, `"tls"` (default, when `ca` is set and the
    /// token has a `tls_port`) or `"plain"` (then TLS only on NEED_SECURED).
    pub prefer: Option<String>,
}

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

/// `[sessions]`: caps and timers of every console session, browser or native.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSessions {
    /// Most concurrent sessions; more get 503 (or a SPICE / RFB error). Default 5000.
    pub max_sessions: Option<usize>,
    /// Most concurrent connections from one client address (a SPICE session
    /// counts each channel). Default 64.
    pub max_sessions_per_client: Option<usize>,
    /// Most concurrent connections with one token (SPICE: its channels). Default 16.
    pub max_sessions_per_token: Option<usize>,
    /// Deadline for connecting to the hypervisor, seconds. Default 5.
    pub connect_timeout_secs: Option<u64>,
    /// A session ends after this long with no byte either way, seconds (0: off). Default 3600.
    pub idle_timeout_secs: Option<u64>,
    /// End every session after this long, seconds (0: never). Default 0.
    pub max_session_age_secs: Option<u64>,
    /// Grace period for open sessions at shutdown, seconds. Default 10.
    pub shutdown_grace_secs: Option<u64>,
}

/// `[websocket]`: limits and timers of browser sessions' WebSockets.
///
/// The session caps and timers that are not about WebSockets moved to
/// [`RawSessions`]; their old names here are still read (with a warning) while
/// the new ones are unset, and setting both is an error.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebSocket {
    /// Largest message a client may send, bytes. Default 1048576.
    pub max_message_bytes: Option<usize>,
    /// Largest frame a client may send, bytes. Default 1048576.
    pub max_frame_bytes: Option<usize>,
    /// Read buffer per session, bytes. Default 4096.
    pub read_buffer_bytes: Option<usize>,
    /// Outgoing bytes buffered before a flush, bytes. Default 65536.
    pub write_buffer_bytes: Option<usize>,
    /// Hard cap on buffered outgoing bytes (in practice: the largest single message, as Porthole waits for the client at `write_buffer_bytes`), bytes. Default 4194304.
    pub max_write_buffer_bytes: Option<usize>,
    /// Deadline for the HTTP upgrade request, seconds. Default 10.
    pub upgrade_timeout_secs: Option<u64>,
    /// WebSocket ping interval, seconds (0: off). Default 20.
    pub ping_interval_secs: Option<u64>,
    /// A browser session ends after this long with no byte either way,
    /// seconds (0: off). Default: `sessions.idle_timeout_secs`. While that is
    /// unset this also ends idle native sessions, as it did before `[sessions]`.
    pub idle_timeout_secs: Option<u64>,
    /// End sessions when their token expires. Default false (the token only opens the session).
    pub end_at_token_expiry: Option<bool>,
    /// Deprecated: `sessions.connect_timeout_secs`.
    pub connect_timeout_secs: Option<u64>,
    /// Deprecated: `sessions.max_sessions`.
    pub max_sessions: Option<usize>,
    /// Deprecated: `sessions.max_sessions_per_client`.
    pub max_sessions_per_client: Option<usize>,
    /// Deprecated: `sessions.max_sessions_per_token`.
    pub max_sessions_per_token: Option<usize>,
    /// Deprecated: `sessions.shutdown_grace_secs`.
    pub shutdown_grace_secs: Option<u64>,
    /// Deprecated: `sessions.max_session_age_secs`.
    pub max_session_age_secs: Option<u64>,
}

/// `[web]`: where the console pages and client libraries are.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWeb {
    /// Porthole's pages (`pages/`, `static/`). Default: `web` in the working
    /// folder, else the source tree's.
    pub root: Option<PathBuf>,
    /// noVNC (the folder holding `core/rfb.js`). Default `/usr/share/novnc` (Debian's `novnc`).
    pub novnc_dir: Option<PathBuf>,
    /// xterm.js: npm's build (the folder holding `lib/xterm.mjs`) or Debian's
    /// `node-xterm` (`/usr/share/nodejs/xterm`). Default `<root>/node_modules/@xterm/xterm`,
    /// or Debian's where that is missing and `node-xterm` is installed.
    pub xterm_dir: Option<PathBuf>,
    /// spice-html5 (the folder holding `main.js`). Default `/usr/share/spice-html5` (Debian's `spice-html5`).
    pub spice_html5_dir: Option<PathBuf>,
}

/// `[tokens]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokens {
    /// Accepted `iss` values. Default `["porthole"]`.
    pub issuers: Option<Vec<String>>,
    /// Accepted `aud` values. Default `["porthole"]`.
    pub audiences: Option<Vec<String>>,
    /// Clock skew allowed on `exp`/`nbf`/`iat`, seconds. Default 5, at most 300.
    pub leeway_secs: Option<u64>,
    /// Longest accepted token lifetime (`exp - iat`), seconds. Default 600, at most 86400.
    pub max_ttl_secs: Option<u64>,
    /// Longest accepted token in bytes. Default 4096.
    pub max_token_bytes: Option<usize>,
    /// Allow HS256 shared-secret keys. Default false.
    pub allow_hmac: Option<bool>,
    /// Tokens remembered for reuse checks. Default 100000.
    pub store_capacity: Option<usize>,
    /// Reuse policy per console type: `reconnect` (default) or `single-use`.
    #[serde(default)]
    pub reuse: HashMap<String, String>,
    /// Verification keys.
    #[serde(default)]
    pub keys: Vec<RawKey>,
}

/// One `[[tokens.keys]]` entry: exactly one of `public_key`, `jwks`, `secret_file`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    /// Key id tokens name in their header.
    pub kid: Option<String>,
    /// Pinned algorithm for `public_key`: EdDSA, ES256, ES384, RS256, PS256, ...
    pub algorithm: Option<String>,
    /// SPKI PEM public key file.
    pub public_key: Option<PathBuf>,
    /// JWK set file.
    pub jwks: Option<PathBuf>,
    /// HS256 shared secret file.
    pub secret_file: Option<PathBuf>,
}

/// `[issuance]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIssuance {
    /// Files, each holding one bearer key that may call the API.
    #[serde(default)]
    pub bearer_key_files: Vec<PathBuf>,
    /// PKCS#8 PEM private key (or HS256 secret file with `signing_secret = true`).
    pub signing_key: Option<PathBuf>,
    /// `signing_key` is an HS256 secret file. Default false.
    pub signing_secret: Option<bool>,
    /// `kid` written into tokens.
    pub signing_kid: Option<String>,
    /// `iss` of issued tokens. Default: the first of `tokens.issuers`.
    pub issuer: Option<String>,
    /// `aud` of issued tokens. Default: the first of `tokens.audiences`.
    pub audience: Option<String>,
    /// Lifetime of issued tokens, seconds. Default 120.
    pub ttl_secs: Option<u64>,
}

/// One `[[backends]]` entry: a hypervisor network.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    /// Name for logs (and, later, credentials).
    pub name: Option<String>,
    /// CIDR ranges hypervisor hosts live in.
    #[serde(default)]
    pub networks: Vec<String>,
    /// Host names accepted verbatim.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Console port ranges, e.g. `"5900-6923"`. Default `["5900-65535"]`.
    pub ports: Option<Vec<String>>,
    /// `[backends.ports_by_type]`: console type to its own port ranges
    /// (replacing `ports` for that type), e.g. `serial = ["10000-20000"]`.
    #[serde(default)]
    pub ports_by_type: HashMap<String, Vec<String>>,
    /// SPICE credentials for this network.
    pub spice: Option<RawSpiceBackend>,
    /// VNC credentials for this network.
    pub vnc: Option<RawVncBackend>,
}

/// `[backends.vnc]`: how Porthole authenticates to the VNC servers of a backend network.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVncBackend {
    /// File holding the VNC password (VNC authentication uses its first 8 bytes).
    pub password_file: Option<PathBuf>,
    /// CA (PEM) that signs the hypervisors' VeNCrypt x509 certificates.
    pub ca: Option<PathBuf>,
    /// Name to check in the hypervisor's certificate. Default: the token's host.
    pub tls_name: Option<String>,
    /// Client certificate chain (PEM) for hypervisors that verify peers.
    pub client_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub client_key: Option<PathBuf>,
    /// Schemes, most preferred first: `x509-vnc`, `x509-none`, `vnc`, `none`.
    pub auth: Option<Vec<String>>,
    /// Ask hypervisors to share the console with other viewers, whatever the
    /// client asks (QEMU disconnects the others for an exclusive client). Default true.
    pub force_shared: Option<bool>,
}

/// A PEM certificate chain and its private key: what a TLS listener presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// A TLS listener: where it listens and what it presents. One value, so a
/// listener without a certificate cannot be configured (validation refuses it
/// at the listener's key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListener {
    /// Address to bind.
    pub addr: SocketAddr,
    /// Its certificate chain and key.
    pub cert: CertFiles,
    /// It accepts TLS 1.3 only.
    pub tls13_only: bool,
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

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where audit events go (a JSON-lines file), if not to the log.
    pub audit_path: Option<PathBuf>,
    /// VNC credentials by backend network name.
    pub vnc_backends: std::collections::HashMap<String, VncBackendConfig>,
    /// Native VNC listener and tickets.
    pub vnc: VncConfig,
    /// SPICE listener and tickets.
    pub spice: SpiceConfig,
    /// SPICE credentials by backend network name.
    pub spice_backends: std::collections::HashMap<String, SpiceBackendConfig>,
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
    /// What the file does that still works but should change (deprecated
    /// names), located like issues. Whoever loads the file shows them: `serve`
    /// and reloads log them, `config check` prints them.
    pub warnings: Vec<ConfigIssue>,
}

/// Validated `[sessions]` (with the old `[websocket]` names read into it).
#[derive(Debug, Clone)]
pub struct SessionsConfig {
    /// Most concurrent sessions.
    pub max_sessions: usize,
    /// Concurrent connections per client address.
    pub max_sessions_per_client: usize,
    /// Concurrent connections per token.
    pub max_sessions_per_token: usize,
    /// Hypervisor connect deadline.
    pub connect_timeout: Duration,
    /// Idle timeout of native sessions, and of browser sessions unless
    /// `[websocket]` gives them their own; `None` is off.
    pub idle_timeout: Option<Duration>,
    /// End every session after this long.
    pub max_session_age: Option<Duration>,
    /// Shutdown grace period.
    pub shutdown_grace: Duration,
}

/// Validated `[websocket]`.
#[derive(Debug, Clone)]
pub struct WebSocketConfig {
    /// Largest client message.
    pub max_message_bytes: usize,
    /// Largest client frame.
    pub max_frame_bytes: usize,
    /// Read buffer per session.
    pub read_buffer_bytes: usize,
    /// Write buffer before a flush.
    pub write_buffer_bytes: usize,
    /// Hard cap on buffered outgoing bytes.
    pub max_write_buffer_bytes: usize,
    /// HTTP upgrade deadline.
    pub upgrade_timeout: Duration,
    /// Ping interval; `None` is off.
    pub ping_interval: Option<Duration>,
    /// Browser sessions' idle timeout; `None` is off.
    pub idle_timeout: Option<Duration>,
    /// End sessions at token expiry.
    pub end_at_token_expiry: bool,
}

/// Validated `[web]`.
#[derive(Debug, Clone)]
pub struct WebConfig {
    /// Porthole's pages and static files.
    pub root: PathBuf,
    /// noVNC.
    pub novnc_dir: PathBuf,
    /// xterm.js.
    pub xterm_dir: PathBuf,
    /// spice-html5.
    pub spice_html5_dir: PathBuf,
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

/// Validated `[tokens]`.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// Claim checks.
    pub policy: ValidationPolicy,
    /// Where keys come from.
    pub keys: Vec<KeySource>,
    /// HS256 opted into.
    pub allow_hmac: bool,
    /// Reuse policy per console type.
    pub reuse: HashMap<ConsoleType, ReusePolicy>,
    /// Capacity of the in-memory token store.
    pub store_capacity: usize,
}

impl TokenConfig {
    /// The reuse policy for `console`.
    pub fn reuse_for(&self, console: ConsoleType) -> ReusePolicy {
        self.reuse
            .get(&console)
            .copied()
            .unwrap_or(ReusePolicy::Reconnect)
    }
}

/// How the issuance API signs.
#[derive(Debug, Clone)]
pub enum SigningKey {
    /// PKCS#8 PEM private key file.
    PrivatePem(PathBuf),
    /// HS256 shared secret file.
    Secret(PathBuf),
}

/// Validated `[issuance]`.
#[derive(Debug, Clone)]
pub struct IssuanceConfig {
    /// Keys allowed to call the API.
    pub bearer_keys: Vec<Secret<String>>,
    /// The signing key.
    pub signing_key: SigningKey,
    /// `kid` in issued tokens.
    pub signing_kid: Option<String>,
    /// `iss` of issued tokens.
    pub issuer: String,
    /// `aud` of issued tokens.
    pub audience: String,
    /// Lifetime of issued tokens.
    pub ttl_secs: u64,
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key path, e.g. `tokens.keys[1].algorithm`.
    pub key: String,
    /// 1-based line and column of the key in the file, when it is there.
    pub at: Option<(usize, usize)>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some((line, col)) => write!(
                f,
                "line {line}, column {col}: `{}`: {}",
                self.key, self.message
            ),
            None => write!(f, "`{}`: {}", self.key, self.message),
        }
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    /// The file, when read from one.
    pub file: Option<PathBuf>,
    /// The problems, in file order where known.
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self
            .file
            .as_ref()
            .map_or_else(|| "configuration".to_string(), |p| p.display().to_string());
        write!(f, "{name}: {} problem(s)", self.issues.len())?;
        for issue in &self.issues {
            write!(f, "\n  {issue}")?;
        }
        Ok(())
    }
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

/// Gives each issue its line and column in `text`, and sorts them into file order.
fn place(text: &str, issues: &mut [ConfigIssue]) {
    if issues.is_empty() {
        return;
    }
    let doc = toml::de::DeTable::parse(text).ok();
    for issue in issues.iter_mut() {
        issue.at = doc
            .as_ref()
            .and_then(|d| locate(d.get_ref(), &issue.key))
            .map(|offset| line_col(text, offset));
    }
    issues.sort_by_key(|i| i.at.unwrap_or((usize::MAX, 0)));
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

/// What validation found: problems (the file is refused) and warnings (it is
/// taken, but should change). Every section's validator adds to the one collector.
#[derive(Default)]
struct Issues {
    problems: Vec<ConfigIssue>,
    warnings: Vec<ConfigIssue>,
}

impl Issues {
    /// A problem at `key`. The same problem found twice is reported once
    /// (two settings can share one message).
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        let issue = ConfigIssue {
            key: key.into(),
            at: None,
            message: message.into(),
        };
        if !self.problems.contains(&issue) {
            self.problems.push(issue);
        }
    }

    /// A warning at `key`.
    fn warn(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(ConfigIssue {
            key: key.into(),
            at: None,
            message: message.into(),
        });
    }
}

/// Resolves the file's relative paths against its folder.
#[derive(Debug, Clone, Copy)]
struct Paths<'a>(&'a Path);

impl Paths<'_> {
    fn resolve(self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.0.join(p)
        }
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
        if !issues.problems.is_empty() {
            return Err(issues.problems);
        }
        Ok(Config {
            audit_path: self.audit.path.map(|p| paths.resolve(&p)),
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

/// `[store]`.
fn validate_store(raw: RawStore, paths: Paths<'_>, issues: &mut Issues) -> StoreConfig {
    let url = raw.url.unwrap_or_default();
    match url.split_once("://") {
        Some(("redis" | "rediss", rest)) if !rest.is_empty() => {
            if rest
                .split('/')
                .next()
                .is_some_and(|auth| auth.contains('@'))
            {
                issues.push(
                    "store.url",
                    "holds credentials: put the password in store.password_file",
                );
            }
        }
        _ => issues.push("store.url", "must be a redis:// or rediss:// URL"),
    }
    let password = raw.password_file.and_then(|p| {
        let p = paths.resolve(&p);
        match std::fs::read_to_string(&p) {
            Ok(s) if !s.trim().is_empty() => Some(Secret::new(s.trim().to_string())),
            Ok(_) => {
                issues.push("store.password_file", format!("{} is empty", p.display()));
                None
            }
            Err(e) => {
                issues.push(
                    "store.password_file",
                    format!("cannot read {}: {e}", p.display()),
                );
                None
            }
        }
    });
    let key_prefix = raw.key_prefix.unwrap_or_else(|| "porthole:".into());
    if key_prefix.is_empty() || key_prefix.chars().any(|c| c.is_control() || c == ' ') {
        issues.push(
            "store.key_prefix",
            "must be non-empty, without spaces or control characters",
        );
    }
    let timeout_ms = raw.timeout_ms.unwrap_or(1000);
    if !(10..=60_000).contains(&timeout_ms) {
        issues.push("store.timeout_ms", "between 10 and 60000");
    }
    let lease = secs_within(issues, "store.lease_secs", raw.lease_secs, 30, 2, 3600);
    let renew = secs_within(issues, "store.renew_secs", raw.renew_secs, 10, 1, 1800);
    if renew * 2 > lease {
        issues.push(
            "store.renew_secs",
            "at most half of store.lease_secs: a lease must survive a missed renewal",
        );
    }
    StoreConfig {
        url,
        username: raw.username,
        password,
        key_prefix,
        timeout: Duration::from_millis(timeout_ms),
        lease: Duration::from_secs(lease),
        renew: Duration::from_secs(renew),
    }
}

/// `[listen]`.
fn validate_listen(raw: RawListen, paths: Paths<'_>, issues: &mut Issues) -> ListenConfig {
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

/// The section a moved session setting was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadFrom {
    /// `[sessions]` (or neither: the default).
    Sessions,
    /// Its old name in `[websocket]`.
    WebSocket,
}

impl ReadFrom {
    /// The setting's key where it was read, for its problems.
    fn key(self, name: &str) -> String {
        match self {
            ReadFrom::Sessions => format!("sessions.{name}"),
            ReadFrom::WebSocket => format!("websocket.{name}"),
        }
    }
}

/// A session setting that used to live in `[websocket]`: the value given, and
/// where it was read from. The old name is read, with a warning, while the new
/// one is unset; both set is a problem, since no reading of the file could
/// tell which one the operator meant.
fn moved<T>(
    issues: &mut Issues,
    name: &str,
    new: Option<T>,
    old: Option<T>,
) -> (Option<T>, ReadFrom) {
    match (new, old) {
        (None, Some(v)) => {
            issues.warn(
                format!("websocket.{name}"),
                format!(
                    "deprecated: moved to `sessions.{name}` (read from here while that is unset)"
                ),
            );
            (Some(v), ReadFrom::WebSocket)
        }
        (new, old) => {
            if new.is_some() && old.is_some() {
                issues.push(
                    format!("websocket.{name}"),
                    format!("moved to `sessions.{name}`, which is also set: remove this one"),
                );
            }
            (new, ReadFrom::Sessions)
        }
    }
}

/// What `[websocket]` has always said about its deadlines being zero.
const DEADLINES_POSITIVE: &str =
    "upgrade_timeout_secs and connect_timeout_secs must be positive: every wait has a deadline";

/// `[sessions]`, reading the old names in `[websocket]` (`old`) while the new ones are unset.
fn validate_sessions(raw: &RawSessions, old: &RawWebSocket, issues: &mut Issues) -> SessionsConfig {
    let mut cap = |name: &str, new: Option<usize>, old: Option<usize>, default, max| {
        let (v, from) = moved(issues, name, new, old);
        within(issues, &from.key(name), v.unwrap_or(default), 1, max)
    };
    let max_sessions = cap(
        "max_sessions",
        raw.max_sessions,
        old.max_sessions,
        5000,
        1_000_000,
    );
    let max_sessions_per_client = cap(
        "max_sessions_per_client",
        raw.max_sessions_per_client,
        old.max_sessions_per_client,
        64,
        1_000_000,
    );
    let max_sessions_per_token = cap(
        "max_sessions_per_token",
        raw.max_sessions_per_token,
        old.max_sessions_per_token,
        16,
        1_000,
    );
    let mut secs = |name: &str, new: Option<u64>, old: Option<u64>, default: u64| {
        let (v, from) = moved(issues, name, new, old);
        (Duration::from_secs(v.unwrap_or(default)), from)
    };
    let (connect_timeout, from) = secs(
        "connect_timeout_secs",
        raw.connect_timeout_secs,
        old.connect_timeout_secs,
        5,
    );
    let (max_age, _) = secs(
        "max_session_age_secs",
        raw.max_session_age_secs,
        old.max_session_age_secs,
        0,
    );
    let (shutdown_grace, _) = secs(
        "shutdown_grace_secs",
        raw.shutdown_grace_secs,
        old.shutdown_grace_secs,
        10,
    );
    if connect_timeout.is_zero() {
        match from {
            ReadFrom::WebSocket => issues.push("websocket", DEADLINES_POSITIVE),
            ReadFrom::Sessions => issues.push(
                from.key("connect_timeout_secs"),
                "must be positive: every wait has a deadline",
            ),
        }
    }
    // `websocket.idle_timeout_secs` keeps a meaning of its own (browser
    // sessions), so it is no error beside this one; alone, it still ends idle
    // native sessions too, as it always did.
    let idle_secs = match (raw.idle_timeout_secs, old.idle_timeout_secs) {
        (Some(v), _) => v,
        (None, Some(v)) => {
            issues.warn(
                "websocket.idle_timeout_secs",
                "also ends idle native SPICE and VNC sessions while `sessions.idle_timeout_secs` \
                 is unset: set that one (this one then applies to browser sessions only)",
            );
            v
        }
        (None, None) => 3600,
    };
    SessionsConfig {
        max_sessions,
        max_sessions_per_client,
        max_sessions_per_token,
        connect_timeout,
        idle_timeout: nonzero_secs(idle_secs),
        max_session_age: Some(max_age).filter(|d| !d.is_zero()),
        shutdown_grace,
    }
}

/// `[websocket]`; its idle timeout defaults to the sessions' one.
fn validate_websocket(
    w: &RawWebSocket,
    sessions: &SessionsConfig,
    issues: &mut Issues,
) -> WebSocketConfig {
    let mut bytes = |name: &str, v: Option<usize>, default, min, max| {
        within(
            issues,
            &format!("websocket.{name}"),
            v.unwrap_or(default),
            min,
            max,
        )
    };
    let max_message_bytes = bytes(
        "max_message_bytes",
        w.max_message_bytes,
        1 << 20,
        1024,
        64 << 20,
    );
    let max_frame_bytes = bytes(
        "max_frame_bytes",
        w.max_frame_bytes,
        1 << 20,
        1024,
        64 << 20,
    );
    let read_buffer_bytes = bytes("read_buffer_bytes", w.read_buffer_bytes, 4096, 512, 1 << 20);
    let write_buffer_bytes = bytes(
        "write_buffer_bytes",
        w.write_buffer_bytes,
        64 << 10,
        0,
        16 << 20,
    );
    let max_write_buffer_bytes = bytes(
        "max_write_buffer_bytes",
        w.max_write_buffer_bytes,
        4 << 20,
        1,
        256 << 20,
    );
    if max_write_buffer_bytes <= write_buffer_bytes + (16 << 10) {
        issues.push(
            "websocket.max_write_buffer_bytes",
            "must exceed write_buffer_bytes by more than 16 KiB",
        );
    }
    let upgrade_timeout = Duration::from_secs(w.upgrade_timeout_secs.unwrap_or(10));
    if upgrade_timeout.is_zero() {
        issues.push("websocket", DEADLINES_POSITIVE);
    }
    WebSocketConfig {
        max_message_bytes,
        max_frame_bytes,
        read_buffer_bytes,
        write_buffer_bytes,
        max_write_buffer_bytes,
        upgrade_timeout,
        ping_interval: nonzero_secs(w.ping_interval_secs.unwrap_or(20)),
        idle_timeout: w
            .idle_timeout_secs
            .map_or(sessions.idle_timeout, nonzero_secs),
        end_at_token_expiry: w.end_at_token_expiry.unwrap_or(false),
    }
}

/// `[web]`: nothing to refuse; missing folders are warned about at start.
fn validate_web(raw: RawWeb, paths: Paths<'_>) -> WebConfig {
    let root = raw
        .root
        .map(|p| paths.resolve(&p))
        .unwrap_or_else(default_web_root);
    let dir = |v: Option<PathBuf>, default: PathBuf| v.map_or(default, |p| paths.resolve(&p));
    WebConfig {
        novnc_dir: dir(raw.novnc_dir, PathBuf::from("/usr/share/novnc")),
        xterm_dir: dir(raw.xterm_dir, default_xterm_dir(&root)),
        spice_html5_dir: dir(raw.spice_html5_dir, PathBuf::from("/usr/share/spice-html5")),
        root,
    }
}

/// `[tokens]` and its `[[tokens.keys]]`.
fn validate_tokens(t: RawTokens, paths: Paths<'_>, issues: &mut Issues) -> TokenConfig {
    let mut non_empty = |key: &str, v: Option<Vec<String>>| {
        let v = v.unwrap_or_else(|| vec!["porthole".to_string()]);
        if v.is_empty() || v.iter().any(|s| s.is_empty()) {
            issues.push(key, "must list at least one non-empty value");
        }
        v
    };
    let issuers = non_empty("tokens.issuers", t.issuers);
    let audiences = non_empty("tokens.audiences", t.audiences);
    let leeway_secs = t.leeway_secs.unwrap_or(5);
    if leeway_secs > 300 {
        issues.push("tokens.leeway_secs", "at most 300 seconds");
    }
    let max_ttl_secs = t.max_ttl_secs.unwrap_or(600);
    if max_ttl_secs == 0 || max_ttl_secs > 86_400 {
        issues.push("tokens.max_ttl_secs", "between 1 and 86400 seconds");
    }
    let max_token_bytes = t.max_token_bytes.unwrap_or(4096);
    if !(256..=65_536).contains(&max_token_bytes) {
        issues.push("tokens.max_token_bytes", "between 256 and 65536");
    }
    let store_capacity = t.store_capacity.unwrap_or(100_000);
    if store_capacity == 0 {
        issues.push("tokens.store_capacity", "must be positive");
    }
    let allow_hmac = t.allow_hmac.unwrap_or(false);
    let keys = t
        .keys
        .into_iter()
        .enumerate()
        .filter_map(|(i, k)| {
            validate_key(&format!("tokens.keys[{i}]"), k, allow_hmac, paths, issues)
        })
        .collect();
    TokenConfig {
        policy: ValidationPolicy {
            issuers,
            audiences,
            leeway_secs,
            max_ttl_secs,
            max_token_bytes,
        },
        keys,
        allow_hmac,
        reuse: validate_reuse(t.reuse, issues),
        store_capacity,
    }
}

/// `[tokens.reuse]`: console type to policy.
fn validate_reuse(
    raw: HashMap<String, String>,
    issues: &mut Issues,
) -> HashMap<ConsoleType, ReusePolicy> {
    let mut reuse = HashMap::new();
    for (name, policy) in raw {
        let key = format!("tokens.reuse.{name}");
        let console = name.parse::<ConsoleType>().map_err(|e| e.to_string());
        let policy = match policy.as_str() {
            "reconnect" => Ok(ReusePolicy::Reconnect),
            "single-use" => Ok(ReusePolicy::SingleUse),
            "takeover" => Ok(ReusePolicy::Takeover),
            other => Err(format!(
                "unknown policy `{other}` (reconnect, single-use, takeover)"
            )),
        };
        match (console, policy) {
            (Ok(c), Ok(p)) => {
                reuse.insert(c, p);
            }
            (Err(e), _) | (_, Err(e)) => issues.push(key, e),
        }
    }
    reuse
}

/// One `[[tokens.keys]]` entry (`key`: its path, `tokens.keys[i]`).
fn validate_key(
    key: &str,
    k: RawKey,
    allow_hmac: bool,
    paths: Paths<'_>,
    issues: &mut Issues,
) -> Option<KeySource> {
    let kid = k.kid.filter(|s| !s.is_empty());
    match (k.public_key, k.jwks, k.secret_file) {
        (Some(path), None, None) => {
            match k
                .algorithm
                .as_deref()
                .map(str::parse::<jsonwebtoken::Algorithm>)
            {
                Some(Ok(algorithm)) if crate::token::keys::is_supported_algorithm(algorithm) => {
                    if format!("{algorithm:?}").starts_with("HS") {
                        issues.push(format!("{key}.algorithm"), "HMAC keys use `secret_file`");
                    }
                    Some(KeySource::PublicKeyPem {
                        kid,
                        algorithm,
                        path: paths.resolve(&path),
                    })
                }
                Some(_) => {
                    issues.push(
                        format!("{key}.algorithm"),
                        "unknown algorithm (EdDSA, ES256, ES384, RS256, RS384, RS512, PS256, PS384, PS512)",
                    );
                    None
                }
                None => {
                    issues.push(
                        key,
                        "`public_key` needs `algorithm`: the algorithm is pinned per key, never taken from the token",
                    );
                    None
                }
            }
        }
        (None, Some(path), None) => {
            if kid.is_some() || k.algorithm.is_some() {
                issues.push(key, "a `jwks` entry takes `kid` and `alg` from the JWK set");
            }
            Some(KeySource::Jwks {
                path: paths.resolve(&path),
            })
        }
        (None, None, Some(path)) => {
            if !allow_hmac {
                issues.push(
                    format!("{key}.secret_file"),
                    "shared-secret keys need `tokens.allow_hmac = true`",
                );
            }
            if k.algorithm.as_deref().is_some_and(|a| a != "HS256") {
                issues.push(format!("{key}.algorithm"), "shared secrets are HS256");
            }
            Some(KeySource::SharedSecret {
                kid,
                path: paths.resolve(&path),
            })
        }
        _ => {
            issues.push(
                key,
                "give exactly one of `public_key`, `jwks` or `secret_file`",
            );
            None
        }
    }
}

/// `[issuance]`: its `iss`, `aud` and lifetime must pass `policy`.
fn validate_issuance(
    raw: RawIssuance,
    policy: &ValidationPolicy,
    paths: Paths<'_>,
    issues: &mut Issues,
) -> IssuanceConfig {
    let bearer_keys = read_bearer_keys(&raw.bearer_key_files, paths, issues);
    let signing_key = match raw.signing_key {
        Some(p) if raw.signing_secret.unwrap_or(false) => SigningKey::Secret(paths.resolve(&p)),
        Some(p) => SigningKey::PrivatePem(paths.resolve(&p)),
        None => {
            issues.push(
                "issuance.signing_key",
                "required: the key issued tokens are signed with",
            );
            SigningKey::PrivatePem(PathBuf::new())
        }
    };
    let max_ttl_secs = policy.max_ttl_secs;
    let ttl_secs = raw.ttl_secs.unwrap_or(120);
    if ttl_secs == 0 || ttl_secs > max_ttl_secs {
        issues.push(
            "issuance.ttl_secs",
            format!("between 1 and tokens.max_ttl_secs ({max_ttl_secs})"),
        );
    }
    let issuer = raw.issuer.unwrap_or_else(|| policy.issuers[0].clone());
    if !policy.issuers.contains(&issuer) {
        issues.push(
            "issuance.issuer",
            "must be one of tokens.issuers, or its tokens would be refused",
        );
    }
    let audience = raw.audience.unwrap_or_else(|| policy.audiences[0].clone());
    if !policy.audiences.contains(&audience) {
        issues.push(
            "issuance.audience",
            "must be one of tokens.audiences, or its tokens would be refused",
        );
    }
    IssuanceConfig {
        bearer_keys,
        signing_key,
        signing_kid: raw.signing_kid,
        issuer,
        audience,
        ttl_secs,
    }
}

/// Reads `issuance.bearer_key_files`: at least one, each at least 16 characters.
fn read_bearer_keys(
    files: &[PathBuf],
    paths: Paths<'_>,
    issues: &mut Issues,
) -> Vec<Secret<String>> {
    if files.is_empty() {
        issues.push(
            "issuance.bearer_key_files",
            "list at least one bearer key file: the API is never open",
        );
    }
    let mut keys = Vec::new();
    for (i, path) in files.iter().enumerate() {
        let path = paths.resolve(path);
        let key = format!("issuance.bearer_key_files[{i}]");
        match std::fs::read_to_string(&path) {
            Ok(s) if s.trim().len() >= 16 => keys.push(Secret::new(s.trim().to_string())),
            Ok(_) => issues.push(
                key,
                format!(
                    "{}: a bearer key must be at least 16 characters",
                    path.display()
                ),
            ),
            Err(e) => issues.push(key, format!("cannot read {}: {e}", path.display())),
        }
    }
    keys
}

/// `[nova]`: the Keystone URL, one credential (its secret read now), and
/// the lookup's timers and bounds.
fn validate_nova(
    raw: RawNova,
    capacity: usize,
    paths: Paths<'_>,
    issues: &mut Issues,
) -> NovaSettings {
    let auth_url = raw.auth_url.unwrap_or_default();
    if host_of(&auth_url).is_none() {
        issues.push(
            "nova.auth_url",
            "required: Keystone's v3 URL, e.g. https://keystone.example.com:5000/v3",
        );
    }
    if let Some(u) = &raw.compute_url
        && host_of(u).is_none()
    {
        issues.push("nova.compute_url", "an http(s) URL ending in /v2.1");
    }
    let mut secret = |key: &str, file: Option<PathBuf>| -> Secret<String> {
        let Some(file) = file else {
            issues.push(format!("nova.{key}"), "required with it");
            return Secret::default();
        };
        let path = paths.resolve(&file);
        match std::fs::read_to_string(&path) {
            Ok(s) if !s.trim_end_matches(['\n', '\r']).is_empty() => {
                Secret::new(s.trim_end_matches(['\n', '\r']).to_string())
            }
            Ok(_) => {
                issues.push(
                    format!("nova.{key}"),
                    format!("{} is empty", path.display()),
                );
                Secret::default()
            }
            Err(e) => {
                issues.push(
                    format!("nova.{key}"),
                    format!("cannot read {}: {e}", path.display()),
                );
                Secret::default()
            }
        }
    };
    let credential = match (raw.username, raw.application_credential_id) {
        (Some(username), None) => Credential::Password {
            password: secret("password_file", raw.password_file),
            username,
            user_domain: raw.user_domain_name.unwrap_or_else(|| "Default".into()),
            project: raw.project_name.unwrap_or_else(|| "service".into()),
            project_domain: raw.project_domain_name.unwrap_or_else(|| "Default".into()),
        },
        (None, Some(id)) => Credential::ApplicationCredential {
            secret: secret(
                "application_credential_secret_file",
                raw.application_credential_secret_file,
            ),
            id,
        },
        _ => {
            issues.push(
                "nova.username",
                "exactly one of username (with password_file) and application_credential_id (with application_credential_secret_file)",
            );
            Credential::ApplicationCredential {
                id: String::new(),
                secret: Secret::default(),
            }
        }
    };
    let interface = raw.interface.unwrap_or_else(|| "internal".into());
    if !["public", "internal", "admin"].contains(&interface.as_str()) {
        issues.push("nova.interface", "one of public, internal, admin");
    }
    let microversion = raw.microversion.unwrap_or_else(|| "2.99".into());
    let minor = microversion
        .strip_prefix("2.")
        .and_then(|m| m.parse::<u32>().ok());
    if minor.is_none_or(|m| m < 31) {
        issues.push(
            "nova.microversion",
            "2.31 or later (earlier ones refuse the lookup); 2.99 for spice-direct",
        );
    }
    let timeout = secs_within(issues, "nova.timeout_secs", raw.timeout_secs, 5, 1, 60);
    NovaSettings {
        auth_url,
        credential,
        region: raw.region_name,
        interface,
        compute_url: raw.compute_url,
        ca_file: raw.ca_file.map(|p| paths.resolve(&p)),
        timeout: Duration::from_secs(timeout),
        token_ttl_secs: secs_within(
            issues,
            "nova.token_ttl_secs",
            raw.token_ttl_secs,
            600,
            1,
            86400,
        ),
        cache_secs: secs_within(issues, "nova.cache_secs", raw.cache_secs, 5, 0, 60),
        negative_cache_secs: secs_within(
            issues,
            "nova.negative_cache_secs",
            raw.negative_cache_secs,
            30,
            0,
            600,
        ),
        max_in_flight: within(
            issues,
            "nova.max_in_flight",
            raw.max_in_flight.unwrap_or(32),
            1,
            4096,
        ),
        // Bounded above, so the casts are exact.
        unseen_per_sec: within(
            issues,
            "nova.unseen_lookups_per_sec",
            raw.unseen_lookups_per_sec.unwrap_or(50),
            1,
            10_000,
        ) as u32,
        unseen_burst: within(
            issues,
            "nova.unseen_lookup_burst",
            raw.unseen_lookup_burst.unwrap_or(100),
            2,
            100_000,
        ) as u32,
        capacity,
        microversion,
    }
}

/// `[[backends]]`, validated: the allow-list and each network's credentials.
struct Backends {
    networks: Vec<BackendNetwork>,
    spice: HashMap<String, SpiceBackendConfig>,
    vnc: HashMap<String, VncBackendConfig>,
}

/// Every `[[backends]]` entry.
fn validate_backends(raw: Vec<RawBackend>, paths: Paths<'_>, issues: &mut Issues) -> Backends {
    let mut out = Backends {
        networks: Vec::new(),
        spice: HashMap::new(),
        vnc: HashMap::new(),
    };
    for (i, b) in raw.into_iter().enumerate() {
        let key = format!("backends[{i}]");
        let name = b.name.unwrap_or_else(|| format!("backend-{i}"));
        let networks = parse_each(
            issues,
            &format!("{key}.networks"),
            &b.networks,
            parse_net,
            "a CIDR range or address",
        );
        if networks.is_empty() && b.hostnames.is_empty() {
            issues.push(key.clone(), "list at least one network or hostname");
        }
        let ports = port_ranges(
            issues,
            &format!("{key}.ports"),
            &b.ports.unwrap_or_else(|| vec!["5900-65535".into()]),
        );
        let mut ports_by_type = HashMap::new();
        for (console, ranges) in &b.ports_by_type {
            let at = format!("{key}.ports_by_type.{console}");
            match console.parse::<ConsoleType>() {
                Ok(c) if ranges.is_empty() => {
                    issues.push(at, format!("list at least one port range for {c} consoles"));
                }
                Ok(c) => {
                    ports_by_type.insert(c, port_ranges(issues, &at, ranges));
                }
                Err(e) => issues.push(at, e.to_string()),
            }
        }
        if let Some(sp) = b.spice {
            let c = validate_spice_backend(&key, sp, paths, issues);
            out.spice.insert(name.clone(), c);
        }
        if let Some(v) = b.vnc {
            let c = validate_vnc_backend(&key, v, paths, issues);
            out.vnc.insert(name.clone(), c);
        }
        out.networks.push(BackendNetwork {
            name,
            networks,
            hostnames: b.hostnames,
            ports,
            ports_by_type,
        });
    }
    out
}

/// Port ranges at `key` (`"5900-6923"`, `"10000"`), each located when bad.
fn port_ranges(issues: &mut Issues, key: &str, raw: &[String]) -> Vec<PortRange> {
    let mut ports = Vec::new();
    for (j, p) in raw.iter().enumerate() {
        match p.parse::<PortRange>() {
            Ok(r) => ports.push(r),
            Err(e) => issues.push(format!("{key}[{j}]"), e),
        }
    }
    ports
}

/// A TLS name to check in hypervisor certificates, at `key`.
fn check_tls_name(issues: &mut Issues, key: String, name: Option<&str>) {
    if let Some(name) = name
        && rustls::pki_types::ServerName::try_from(name).is_err()
    {
        issues.push(key, format!("`{name}` is not a DNS name or IP address"));
    }
}

/// `[backends.spice]` of the backend at `key`.
fn validate_spice_backend(
    key: &str,
    sp: RawSpiceBackend,
    paths: Paths<'_>,
    issues: &mut Issues,
) -> SpiceBackendConfig {
    check_tls_name(
        issues,
        format!("{key}.spice.tls_name"),
        sp.tls_name.as_deref(),
    );
    let prefer_plain = match sp.prefer.as_deref() {
        None | Some("tls") => false,
        Some("plain") => true,
        Some(other) => {
            issues.push(
                format!("{key}.spice.prefer"),
                format!("`{other}` is not \"tls\" or \"plain\""),
            );
            false
        }
    };
    SpiceBackendConfig {
        password_file: sp.password_file.map(|p| paths.resolve(&p)),
        ca: sp.ca.map(|p| paths.resolve(&p)),
        tls_name: sp.tls_name,
        prefer_plain,
    }
}

/// `[backends.vnc]` of the backend at `key`.
fn validate_vnc_backend(
    key: &str,
    v: RawVncBackend,
    paths: Paths<'_>,
    issues: &mut Issues,
) -> VncBackendConfig {
    check_tls_name(issues, format!("{key}.vnc.tls_name"), v.tls_name.as_deref());
    let mut c = VncBackendConfig {
        password_file: v.password_file.map(|p| paths.resolve(&p)),
        ca: v.ca.map(|p| paths.resolve(&p)),
        tls_name: v.tls_name,
        force_shared: v.force_shared.unwrap_or(true),
        ..VncBackendConfig::default()
    };
    c.client_identity = match (v.client_cert, v.client_key) {
        (Some(cert), Some(k)) => Some((paths.resolve(&cert), paths.resolve(&k))),
        (None, None) => None,
        _ => {
            issues.push(
                format!("{key}.vnc.client_cert"),
                "set both `client_cert` and `client_key`, or neither",
            );
            None
        }
    };
    if let Some(list) = v.auth {
        c.auth.clear();
        for (j, a) in list.iter().enumerate() {
            match crate::protocol::rfb::upstream::UpstreamAuth::parse(a) {
                Some(x) => c.auth.push(x),
                None => issues.push(
                    format!("{key}.vnc.auth[{j}]"),
                    format!("`{a}` is not one of x509-vnc, x509-none, vnc, none"),
                ),
            }
        }
        if c.auth.is_empty() {
            issues.push(format!("{key}.vnc.auth"), "name at least one scheme");
        }
    }
    c
}

/// `[spice]`, and the certificate it settled on (its own, else the public
/// listener's), which the VNC listener defaults to.
fn validate_spice(
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

/// `[vnc]`; its certificate defaults to `spice_cert`, its TLS floor to `tls13_default`.
fn validate_vnc(
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

/// Longest node name: one DNS label.
const NODE_NAME_MAX: usize = 63;

/// `[node] name`, or the host name (its first label when the host name
/// will not do as it is), or `porthole`.
fn validate_node(raw: RawNode, issues: &mut Issues) -> String {
    let valid = |n: &str| {
        !n.is_empty()
            && n.len() <= NODE_NAME_MAX
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    };
    match raw.name {
        Some(name) if valid(&name) => name,
        Some(_) => {
            issues.push(
                "node.name",
                "must be 1 to 63 letters, digits, `.`, `-` or `_`",
            );
            String::new()
        }
        None => {
            let host = gethostname::gethostname().to_string_lossy().into_owned();
            let short = host.split('.').next().unwrap_or_default().to_string();
            [host, short]
                .into_iter()
                .find(|n| valid(n))
                .unwrap_or_else(|| "porthole".into())
        }
    }
}

/// A section's `tls_cert` and `tls_key`: both give the pair, neither gives
/// `fallback`, and one alone is a problem (at `{section}.tls_cert`) and gives none.
fn cert_files(
    issues: &mut Issues,
    section: &str,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    paths: Paths<'_>,
    fallback: Option<CertFiles>,
) -> Option<CertFiles> {
    match (cert, key) {
        (Some(cert), Some(key)) => Some(CertFiles {
            cert: paths.resolve(&cert),
            key: paths.resolve(&key),
        }),
        (None, None) => fallback,
        _ => {
            issues.push(
                format!("{section}.tls_cert"),
                "set both `tls_cert` and `tls_key`, or neither",
            );
            None
        }
    }
}

/// A TLS listener at `key` from its address and the certificate its section
/// settled on. An address without a certificate is a problem at `key`;
/// `hint` says where a certificate can come from.
fn tls_listener(
    issues: &mut Issues,
    key: &str,
    addr: Option<String>,
    cert: Option<CertFiles>,
    tls13_only: bool,
    hint: &str,
) -> Option<TlsListener> {
    let addr = parse_listener_addr(issues, key, &addr?)?;
    match cert {
        Some(cert) => Some(TlsListener {
            addr,
            cert,
            tls13_only,
        }),
        None => {
            issues.push(key, format!("needs a certificate: {hint}"));
            None
        }
    }
}

/// An optional listener's address; a problem at `key` when it does not parse.
fn parse_listener_addr(issues: &mut Issues, key: &str, text: &str) -> Option<SocketAddr> {
    let addr = text.parse::<SocketAddr>().ok();
    if addr.is_none() {
        issues.push(key, format!("`{text}` is not an address:port"));
    }
    addr
}

/// A listener's address, `default` when absent (and, after a problem, when it does not parse).
fn parse_addr(issues: &mut Issues, key: &str, value: Option<&str>, default: &str) -> SocketAddr {
    let text = value.unwrap_or(default);
    text.parse::<SocketAddr>().unwrap_or_else(|_| {
        issues.push(key, format!("`{text}` is not an address:port"));
        default.parse().expect("default address parses")
    })
}

/// Every item of the list at `key` that parses; a problem at `key[i]` for each
/// that does not (saying it is not `what`).
fn parse_each<T>(
    issues: &mut Issues,
    key: &str,
    items: &[String],
    parse: impl Fn(&str) -> Option<T>,
    what: &str,
) -> Vec<T> {
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match parse(item) {
            Some(v) => out.push(v),
            None => issues.push(format!("{key}[{i}]"), format!("`{item}` is not {what}")),
        }
    }
    out
}

/// `v`, with a problem at `key` unless it is within `min..=max`.
fn within(issues: &mut Issues, key: &str, v: usize, min: usize, max: usize) -> usize {
    if !(min..=max).contains(&v) {
        issues.push(key, format!("between {min} and {max}"));
    }
    v
}

/// Seconds at `key` (`default` when absent), with a problem unless within `min..=max`.
fn secs_within(
    issues: &mut Issues,
    key: &str,
    v: Option<u64>,
    default: u64,
    min: u64,
    max: u64,
) -> u64 {
    let v = v.unwrap_or(default);
    if !(min..=max).contains(&v) {
        issues.push(key, format!("must be within {min}..={max}"));
    }
    v
}

/// Seconds as a duration, where 0 means off.
fn nonzero_secs(secs: u64) -> Option<Duration> {
    Some(Duration::from_secs(secs)).filter(|d| !d.is_zero())
}

/// `"1.2"` or `"1.3"` (true: 1.3 only); absent: `default`.
fn tls_min_version(issues: &mut Issues, key: &str, v: Option<&str>, default: bool) -> bool {
    match v {
        None => default,
        Some("1.2") => false,
        Some("1.3") => true,
        Some(other) => {
            issues.push(key, format!("`{other}` is not \"1.2\" or \"1.3\""));
            default
        }
    }
}

/// The host of an http(s) URL, without brackets or port.
fn host_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    (!host.is_empty()).then(|| host.to_string())
}

/// Finds the byte offset of a dotted key path like `tokens.keys[1].kid`,
/// falling back to the nearest enclosing key that exists.
fn locate(doc: &toml::de::DeTable<'_>, key: &str) -> Option<usize> {
    use toml::de::DeValue;
    let mut best = None;
    let mut table = Some(doc);
    let mut value: Option<&toml::Spanned<DeValue<'_>>> = None;
    for segment in key.split('.') {
        let (name, index) = match segment.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        let t = match (table, value.map(|v| v.get_ref())) {
            (Some(t), _) => t,
            (None, Some(DeValue::Table(t))) => t,
            _ => break,
        };
        let Some((k, v)) = t.iter().find(|(k, _)| k.get_ref().as_ref() == name) else {
            break;
        };
        best = Some(k.span().start);
        value = Some(v);
        table = None;
        if let Some(i) = index {
            match v.get_ref() {
                DeValue::Array(items) if i < items.len() => {
                    best = Some(items[i].span().start);
                    value = Some(&items[i]);
                }
                _ => break,
            }
        }
    }
    best
}

fn parse_net(s: &str) -> Option<ipnet::IpNet> {
    s.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
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

/// npm's copy under the web root (`npm ci` in `web/`); where that was never
/// run, Debian's `node-xterm` if installed, so a first run without npm still
/// has a serial console; else npm's path again, which start-up warns about.
fn default_xterm_dir(root: &Path) -> PathBuf {
    let npm = root.join("node_modules/@xterm/xterm");
    let debian = PathBuf::from(DEBIAN_XTERM_DIR);
    if !npm.join("lib/xterm.mjs").is_file() && debian.join("lib/public/Terminal.js").is_file() {
        return debian;
    }
    npm
}

/// Where Debian's `node-xterm` installs xterm.js (3.8, CommonJS files).
pub const DEBIAN_XTERM_DIR: &str = "/usr/share/nodejs/xterm";

/// `web` in the working folder if it has the pages, else the source tree's
/// (so `cargo run` works from anywhere in a checkout).
fn default_web_root() -> PathBuf {
    let here = PathBuf::from("web");
    if here.join("pages").is_dir() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("web")
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, col)
}
