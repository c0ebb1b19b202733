//! `[issuance]`: the server-to-server API that mints tokens, checked against
//! `[tokens]` so that what it issues is accepted.

use std::path::PathBuf;

use serde::Deserialize;

use super::issues::{Issues, Paths};
use crate::secret::Secret;
use crate::token::ValidationPolicy;

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

/// `[issuance]`: its `iss`, `aud` and lifetime must pass `policy`.
pub(super) fn validate_issuance(
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
