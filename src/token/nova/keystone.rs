//! The Keystone side of Nova lookups: a project-scoped token for the
//! service user (password or application credential), and the compute
//! endpoint from its catalog. One token is shared by every lookup and
//! renewed before it expires, or at once when Nova answers 401.

use std::time::Duration;

use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::LookupError;
use crate::secret::Secret;

/// Keystone's token answer, its service catalog included (a large cloud's
/// is some hundreds of KiB).
const MAX_TOKEN_BODY: usize = 4 << 20;

/// How Porthole authenticates to Keystone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A service user's password, scoped to a project.
    Password {
        /// User name.
        username: String,
        /// The user's domain name (`Default`).
        user_domain: String,
        /// The password, read from a file.
        password: Secret<String>,
        /// The project the token is scoped to (`service`).
        project: String,
        /// The project's domain name (`Default`).
        project_domain: String,
    },
    /// An application credential (scoped and role-restricted by Keystone).
    ApplicationCredential {
        /// Its id.
        id: String,
        /// Its secret, read from a file.
        secret: Secret<String>,
    },
}

/// Where and how to find the compute API.
#[derive(Debug, Clone)]
pub(super) struct KeystoneSettings {
    pub(super) auth_url: String,
    pub(super) credential: Credential,
    pub(super) region: Option<String>,
    pub(super) interface: String,
    pub(super) compute_url: Option<String>,
}

/// A Keystone token in force and the compute endpoint it found.
#[derive(Clone)]
pub(super) struct Session {
    pub(super) token: Secret<String>,
    pub(super) compute: String,
    renew_at: Instant,
}

/// Keystone tokens, one at a time: the lock is held across an
/// authentication so concurrent lookups wait for one instead of each
/// sending their own.
#[derive(Debug)]
pub(super) struct Keystone {
    settings: KeystoneSettings,
    current: Mutex<Option<Session>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("compute", &self.compute)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenBody {
    token: TokenInfo,
}

#[derive(Deserialize)]
struct TokenInfo {
    expires_at: String,
    issued_at: Option<String>,
    #[serde(default)]
    catalog: Vec<Service>,
}

#[derive(Deserialize)]
struct Service {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    endpoints: Vec<Endpoint>,
}

#[derive(Deserialize)]
struct Endpoint {
    interface: String,
    url: String,
    #[serde(default)]
    region_id: Option<String>,
    #[serde(default)]
    region: Option<String>,
}

impl Keystone {
    pub(super) fn new(settings: KeystoneSettings) -> Self {
        Self {
            settings,
            current: Mutex::new(None),
        }
    }

    /// The token in force, authenticating first when there is none or it is
    /// about to expire.
    pub(super) async fn session(&self, http: &reqwest::Client) -> Result<Session, LookupError> {
        let mut current = self.current.lock().await;
        if let Some(s) = current.as_ref()
            && Instant::now() < s.renew_at
        {
            return Ok(s.clone());
        }
        let fresh = self.authenticate(http).await;
        crate::metrics::keystone_auth(if fresh.is_ok() { "ok" } else { "failed" });
        let fresh = fresh?;
        *current = Some(fresh.clone());
        Ok(fresh)
    }

    /// Forgets `stale` (Nova refused it), unless another lookup replaced it already.
    pub(super) async fn invalidate(&self, stale: &Session) {
        let mut current = self.current.lock().await;
        if current
            .as_ref()
            .is_some_and(|s| s.token.expose() == stale.token.expose())
        {
            *current = None;
        }
    }

    fn auth_body(&self) -> serde_json::Value {
        match &self.settings.credential {
            Credential::Password {
                username,
                user_domain,
                password,
                project,
                project_domain,
            } => serde_json::json!({"auth": {
                "identity": {"methods": ["password"], "password": {"user": {
                    "name": username, "domain": {"name": user_domain},
                    "password": password.expose()}}},
                "scope": {"project": {"name": project, "domain": {"name": project_domain}}}
            }}),
            Credential::ApplicationCredential { id, secret } => serde_json::json!({"auth": {
                "identity": {"methods": ["application_credential"],
                    "application_credential": {"id": id, "secret": secret.expose()}}
            }}),
        }
    }

    async fn authenticate(&self, http: &reqwest::Client) -> Result<Session, LookupError> {
        let url = format!(
            "{}/auth/tokens",
            self.settings.auth_url.trim_end_matches('/')
        );
        let started = Instant::now();
        let response = http
            .post(&url)
            .json(&self.auth_body())
            .send()
            .await
            .map_err(|e| LookupError::Keystone(super::describe(e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(LookupError::Keystone(match status.as_u16() {
                401 => "HTTP 401: Keystone refused the credentials ([nova] user/password or application credential)".into(),
                s => format!("HTTP {s} from {url}"),
            }));
        }
        let token = response
            .headers()
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| LookupError::Keystone("no X-Subject-Token in its answer".into()))?;
        let body: TokenBody = super::json_within(response, MAX_TOKEN_BODY)
            .await
            .map_err(LookupError::Keystone)?;
        let compute = match &self.settings.compute_url {
            Some(u) => u.clone(),
            None => self.compute_from(&body.token.catalog)?,
        };
        let lifetime = lifetime(&body.token)?;
        // Renew well before the end, so a lookup never carries a token that
        // expires on its way (a quarter of its life, at most 5 minutes).
        let margin = (lifetime / 4).min(Duration::from_secs(300));
        Ok(Session {
            token: Secret::new(token),
            compute: compute.trim_end_matches('/').to_string(),
            renew_at: started + lifetime.saturating_sub(margin),
        })
    }

    /// The compute endpoint of the configured interface (and region).
    fn compute_from(&self, catalog: &[Service]) -> Result<String, LookupError> {
        let s = &self.settings;
        let region_ok = |e: &Endpoint| match &s.region {
            None => true,
            Some(r) => e.region_id.as_deref() == Some(r) || e.region.as_deref() == Some(r),
        };
        catalog
            .iter()
            .filter(|svc| svc.kind == "compute")
            .flat_map(|svc| &svc.endpoints)
            .find(|e| e.interface == s.interface && region_ok(e))
            .map(|e| e.url.clone())
            .ok_or_else(|| {
                LookupError::Keystone(format!(
                    "the catalog has no compute endpoint with interface {}{} (set [nova] compute_url, interface or region_name)",
                    s.interface,
                    s.region.as_deref().map(|r| format!(" in region {r}")).unwrap_or_default()
                ))
            })
    }
}

/// How long a token lives, from Keystone's own clock (`expires_at - issued_at`),
/// so a skewed local clock does not matter.
fn lifetime(t: &TokenInfo) -> Result<Duration, LookupError> {
    use time::format_description::well_known::Rfc3339;
    let parse = |s: &str| {
        time::OffsetDateTime::parse(s, &Rfc3339)
            .map_err(|e| LookupError::Keystone(format!("unreadable token time {s:?}: {e}")))
    };
    let expires = parse(&t.expires_at)?;
    let issued = match &t.issued_at {
        Some(i) => parse(i)?,
        None => time::OffsetDateTime::now_utc(),
    };
    let secs = (expires - issued).whole_seconds().max(0) as u64;
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_lives_from_issue_to_expiry_on_keystones_clock() {
        let t = TokenInfo {
            expires_at: "2026-12-01T13:00:00.000000Z".into(),
            issued_at: Some("2026-12-01T12:00:00.000000Z".into()),
            catalog: vec![],
        };
        assert_eq!(lifetime(&t).unwrap(), Duration::from_secs(3600));
    }
}
