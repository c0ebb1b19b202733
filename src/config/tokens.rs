//! `[tokens]`: the claim policy, the verification keys (`[[tokens.keys]]`)
//! and the reuse policy per console type (`[tokens.reuse]`).

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::issues::{Issues, Paths};
use crate::token::{ConsoleType, KeySource, ReusePolicy, ValidationPolicy};

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

/// `[tokens]` and its `[[tokens.keys]]`.
pub(super) fn validate_tokens(t: RawTokens, paths: Paths<'_>, issues: &mut Issues) -> TokenConfig {
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
