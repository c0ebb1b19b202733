//! `[store]`: the shared Redis store several nodes keep their state in.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::issues::{Issues, Paths, secs_within};
use crate::secret::Secret;

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

/// `[store]`.
pub(super) fn validate_store(raw: RawStore, paths: Paths<'_>, issues: &mut Issues) -> StoreConfig {
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
    // Glob characters too: the prefix starts the patterns Porthole scans
    // for, where they would match other deployments' keys.
    if key_prefix.is_empty()
        || key_prefix
            .chars()
            .any(|c| c.is_control() || matches!(c, ' ' | '*' | '?' | '[' | ']' | '\\'))
    {
        issues.push(
            "store.key_prefix",
            "must be non-empty, without spaces, control characters or glob characters (* ? [ ] \\)",
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
