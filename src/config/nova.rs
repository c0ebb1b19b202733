//! `[nova]`: Nova's console tokens, looked up in Nova through Keystone.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::issues::{Issues, Paths, host_of, secs_within, within};
use crate::secret::Secret;
use crate::token::nova::{Credential, NovaSettings};

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

/// `[nova]`: the Keystone URL, one credential (its secret read now), and
/// the lookup's timers and bounds.
pub(super) fn validate_nova(
    raw: RawNova,
    capacity: usize,
    paths: Paths<'_>,
    issues: &mut Issues,
) -> NovaSettings {
    check_urls(&raw, issues);
    let credential = credential(&raw, paths, issues);
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
        auth_url: raw.auth_url.unwrap_or_default(),
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

/// Keystone's URL is required; a compute URL, when given, must be one too.
fn check_urls(raw: &RawNova, issues: &mut Issues) {
    if raw.auth_url.as_deref().and_then(host_of).is_none() {
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
}

/// Exactly one credential: a user with a password, or an application
/// credential with its secret. Its secret is read now, so a missing file is
/// a problem of the config, not a failed lookup later.
fn credential(raw: &RawNova, paths: Paths<'_>, issues: &mut Issues) -> Credential {
    match (&raw.username, &raw.application_credential_id) {
        (Some(username), None) => Credential::Password {
            password: secret(issues, paths, "password_file", raw.password_file.as_deref()),
            username: username.clone(),
            user_domain: raw
                .user_domain_name
                .clone()
                .unwrap_or_else(|| "Default".into()),
            project: raw.project_name.clone().unwrap_or_else(|| "service".into()),
            project_domain: raw
                .project_domain_name
                .clone()
                .unwrap_or_else(|| "Default".into()),
        },
        (None, Some(id)) => Credential::ApplicationCredential {
            secret: secret(
                issues,
                paths,
                "application_credential_secret_file",
                raw.application_credential_secret_file.as_deref(),
            ),
            id: id.clone(),
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
    }
}

/// The secret in the file at `nova.{key}`, without its line end; a problem
/// (and an empty secret) when it is not given, cannot be read or is empty.
fn secret(issues: &mut Issues, paths: Paths<'_>, key: &str, file: Option<&Path>) -> Secret<String> {
    let Some(file) = file else {
        issues.push(format!("nova.{key}"), "required with it");
        return Secret::default();
    };
    let path = paths.resolve(file);
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
}
