//! Configuration: a TOML file read into [`RawConfig`], validated into [`Config`].
//!
//! [`RawConfig`] mirrors the file: every section denies unknown keys and
//! documents its defaults (`porthole.example.toml` lists them all). [`Config`]
//! is what the rest of Porthole uses: checked, with paths resolved against the
//! config file's folder, and nothing optional that must be present at run time.
//! Validation reports *every* problem at once, each with its key path and, when
//! the key is in the file, its line and column.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::hypervisor::{AllowList, BackendNetwork, PortRange};
use crate::secret::Secret;
use crate::token::{ConsoleType, KeySource, ReusePolicy, ValidationPolicy};

/// The default public listener (noVNC proxy's customary port).
pub const DEFAULT_PUBLIC_ADDR: &str = "127.0.0.1:6080";
/// The default admin listener: loopback only.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:6090";

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
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
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
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_path_buf()),
            issues: vec![ConfigIssue {
                key: "(file)".into(),
                at: None,
                message: format!("cannot read: {e}"),
            }],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml(&text, base).map_err(|mut e| {
            e.file = Some(path.to_path_buf());
            e
        })
    }

    /// Parses and validates TOML text; relative paths resolve against `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
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
        raw.validate(base).map_err(|mut issues| {
            let doc = toml::de::DeTable::parse(text).ok();
            for issue in &mut issues {
                issue.at = doc
                    .as_ref()
                    .and_then(|d| locate(d.get_ref(), &issue.key))
                    .map(|offset| line_col(text, offset));
            }
            issues.sort_by_key(|i| i.at.unwrap_or((usize::MAX, 0)));
            ConfigError { file: None, issues }
        })
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

struct Issues(Vec<ConfigIssue>);

impl Issues {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigIssue {
            key: key.into(),
            at: None,
            message: message.into(),
        });
    }
}

impl RawConfig {
    /// Validates into a [`Config`], collecting every problem.
    pub fn validate(self, base: &Path) -> Result<Config, Vec<ConfigIssue>> {
        let mut issues = Issues(Vec::new());
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };

        let parse_addr = |issues: &mut Issues, key: &str, value: Option<&str>, default: &str| {
            let text = value.unwrap_or(default);
            text.parse::<SocketAddr>().unwrap_or_else(|_| {
                issues.push(key, format!("`{text}` is not an address:port"));
                default.parse().expect("default address parses")
            })
        };
        let public = parse_addr(
            &mut issues,
            "listen.public",
            self.listen.public.as_deref(),
            DEFAULT_PUBLIC_ADDR,
        );
        let admin = parse_addr(
            &mut issues,
            "listen.admin",
            self.listen.admin.as_deref(),
            DEFAULT_ADMIN_ADDR,
        );
        let public_base_url = match self.listen.public_base_url {
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

        let t = self.tokens;
        let non_empty = |issues: &mut Issues, key: &str, v: Option<Vec<String>>| {
            let v = v.unwrap_or_else(|| vec!["porthole".to_string()]);
            if v.is_empty() || v.iter().any(|s| s.is_empty()) {
                issues.push(key, "must list at least one non-empty value");
            }
            v
        };
        let issuers = non_empty(&mut issues, "tokens.issuers", t.issuers);
        let audiences = non_empty(&mut issues, "tokens.audiences", t.audiences);
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
        let mut reuse = HashMap::new();
        for (name, policy) in t.reuse {
            let key = format!("tokens.reuse.{name}");
            let console = name.parse::<ConsoleType>();
            let policy = match policy.as_str() {
                "reconnect" => Ok(ReusePolicy::Reconnect),
                "single-use" => Ok(ReusePolicy::SingleUse),
                other => Err(format!("unknown policy `{other}` (reconnect, single-use)")),
            };
            match (console, policy) {
                (Ok(c), Ok(p)) => {
                    reuse.insert(c, p);
                }
                (Err(e), _) | (_, Err(e)) => issues.push(key, e),
            }
        }
        let mut keys = Vec::new();
        for (i, k) in t.keys.into_iter().enumerate() {
            let key = format!("tokens.keys[{i}]");
            let kid = k.kid.filter(|s| !s.is_empty());
            match (k.public_key, k.jwks, k.secret_file) {
                (Some(path), None, None) => match k.algorithm.as_deref().map(str::parse::<jsonwebtoken::Algorithm>) {
                    Some(Ok(algorithm)) if crate::token::keys::is_supported_algorithm(algorithm) => {
                        if format!("{algorithm:?}").starts_with("HS") {
                            issues.push(format!("{key}.algorithm"), "HMAC keys use `secret_file`");
                        }
                        keys.push(KeySource::PublicKeyPem { kid, algorithm, path: resolve(&path) });
                    }
                    Some(_) => issues.push(format!("{key}.algorithm"), "unknown algorithm (EdDSA, ES256, ES384, RS256, RS384, RS512, PS256, PS384, PS512)"),
                    None => issues.push(key, "`public_key` needs `algorithm`: the algorithm is pinned per key, never taken from the token"),
                },
                (None, Some(path), None) => {
                    if kid.is_some() || k.algorithm.is_some() {
                        issues.push(key, "a `jwks` entry takes `kid` and `alg` from the JWK set");
                    }
                    keys.push(KeySource::Jwks { path: resolve(&path) });
                }
                (None, None, Some(path)) => {
                    if !allow_hmac {
                        issues.push(format!("{key}.secret_file"), "shared-secret keys need `tokens.allow_hmac = true`");
                    }
                    if k.algorithm.as_deref().is_some_and(|a| a != "HS256") {
                        issues.push(format!("{key}.algorithm"), "shared secrets are HS256");
                    }
                    keys.push(KeySource::SharedSecret { kid, path: resolve(&path) });
                }
                _ => issues.push(key, "give exactly one of `public_key`, `jwks` or `secret_file`"),
            }
        }

        let issuance = self.issuance.map(|raw| {
            if raw.bearer_key_files.is_empty() {
                issues.push(
                    "issuance.bearer_key_files",
                    "list at least one bearer key file: the API is never open",
                );
            }
            let mut bearer_keys = Vec::new();
            for (i, path) in raw.bearer_key_files.iter().enumerate() {
                let path = resolve(path);
                match std::fs::read_to_string(&path) {
                    Ok(s) if s.trim().len() >= 16 => {
                        bearer_keys.push(Secret::new(s.trim().to_string()))
                    }
                    Ok(_) => issues.push(
                        format!("issuance.bearer_key_files[{i}]"),
                        format!(
                            "{}: a bearer key must be at least 16 characters",
                            path.display()
                        ),
                    ),
                    Err(e) => issues.push(
                        format!("issuance.bearer_key_files[{i}]"),
                        format!("cannot read {}: {e}", path.display()),
                    ),
                }
            }
            let signing_key = match raw.signing_key {
                Some(p) if raw.signing_secret.unwrap_or(false) => SigningKey::Secret(resolve(&p)),
                Some(p) => SigningKey::PrivatePem(resolve(&p)),
                None => {
                    issues.push(
                        "issuance.signing_key",
                        "required: the key issued tokens are signed with",
                    );
                    SigningKey::PrivatePem(PathBuf::new())
                }
            };
            let ttl_secs = raw.ttl_secs.unwrap_or(120);
            if ttl_secs == 0 || ttl_secs > max_ttl_secs {
                issues.push(
                    "issuance.ttl_secs",
                    format!("between 1 and tokens.max_ttl_secs ({max_ttl_secs})"),
                );
            }
            let issuer = raw.issuer.unwrap_or_else(|| issuers[0].clone());
            if !issuers.contains(&issuer) {
                issues.push(
                    "issuance.issuer",
                    "must be one of tokens.issuers, or its tokens would be refused",
                );
            }
            let audience = raw.audience.unwrap_or_else(|| audiences[0].clone());
            if !audiences.contains(&audience) {
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
        });

        let mut backends = Vec::new();
        for (i, b) in self.backends.into_iter().enumerate() {
            let key = format!("backends[{i}]");
            let name = b.name.unwrap_or_else(|| format!("backend-{i}"));
            let mut networks = Vec::new();
            for (j, n) in b.networks.iter().enumerate() {
                match n
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| n.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                {
                    Ok(net) => networks.push(net),
                    Err(_) => issues.push(
                        format!("{key}.networks[{j}]"),
                        format!("`{n}` is not a CIDR range or address"),
                    ),
                }
            }
            if networks.is_empty() && b.hostnames.is_empty() {
                issues.push(key.clone(), "list at least one network or hostname");
            }
            let mut ports = Vec::new();
            for (j, p) in b
                .ports
                .unwrap_or_else(|| vec!["5900-65535".into()])
                .iter()
                .enumerate()
            {
                match p.parse::<PortRange>() {
                    Ok(r) => ports.push(r),
                    Err(e) => issues.push(format!("{key}.ports[{j}]"), e),
                }
            }
            backends.push(BackendNetwork {
                name,
                networks,
                hostnames: b.hostnames,
                ports,
            });
        }

        if !issues.0.is_empty() {
            return Err(issues.0);
        }
        Ok(Config {
            state_dir: self
                .state_dir
                .map(|p| resolve(&p))
                .unwrap_or_else(default_state_dir),
            listen: ListenConfig {
                public,
                admin,
                public_base_url,
            },
            tokens: TokenConfig {
                policy: ValidationPolicy {
                    issuers,
                    audiences,
                    leeway_secs,
                    max_ttl_secs,
                    max_token_bytes,
                },
                keys,
                allow_hmac,
                reuse,
                store_capacity,
            },
            issuance,
            allow: AllowList::new(backends),
        })
    }
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

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, col)
}
