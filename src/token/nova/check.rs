//! `porthole nova check`: what an operator runs before pointing Nova at
//! Porthole. It does what a lookup does, one step at a time, and says which
//! step fails in words that name the setting, role or policy to change:
//! authenticate to Keystone, find the compute endpoint, check that Nova
//! serves the configured microversion, and look up a random UUID (404: the
//! policy lets Porthole's user look tokens up; 403: it does not).

use rand::RngCore as _;

use super::{LOOKUP_POLICY, LookupError, NovaResolver, describe};

/// One step's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckStep {
    /// What was checked (`keystone`, `compute endpoint`, `microversion`, `policy`).
    pub what: &'static str,
    /// What was found, or what is wrong and what to change.
    pub outcome: Result<String, String>,
}

impl CheckStep {
    fn ok(what: &'static str, text: String) -> Self {
        Self {
            what,
            outcome: Ok(text),
        }
    }

    fn failed(what: &'static str, text: String) -> Self {
        Self {
            what,
            outcome: Err(text),
        }
    }
}

/// A random, canonical, version-4 UUID: a token Nova never issued.
fn random_uuid() -> String {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// `"2.99"` as (2, 99), for comparing microversions.
fn version(v: &str) -> Option<(u32, u32)> {
    let (major, minor) = v.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

#[derive(serde::Deserialize)]
struct VersionDoc {
    version: VersionInfo,
}

#[derive(serde::Deserialize)]
struct VersionInfo {
    /// The highest microversion served.
    version: String,
    /// The lowest.
    min_version: String,
}

impl NovaResolver {
    /// Runs every step while the previous ones pass; the steps, in order.
    pub async fn check(&self) -> Vec<CheckStep> {
        let mut steps = Vec::new();
        let session = match self.keystone.session(&self.http).await {
            Ok(s) => s,
            Err(e) => {
                steps.push(CheckStep::failed("keystone", keystone_words(&e)));
                return steps;
            }
        };
        steps.push(CheckStep::ok(
            "keystone",
            format!("authenticated at {}", self.settings.auth_url),
        ));
        steps.push(CheckStep::ok(
            "compute endpoint",
            match &self.settings.compute_url {
                Some(_) => format!("{} (from [nova] compute_url)", session.compute),
                None => format!(
                    "{} (the catalog's {} endpoint)",
                    session.compute, self.settings.interface
                ),
            },
        ));
        let served = self.served_versions(&session.compute).await;
        let mv = &self.settings.microversion;
        steps.push(match &served {
            Err(e) => CheckStep::failed(
                "microversion",
                format!("cannot read Nova's version document at {}: {e}", session.compute),
            ),
            Ok((min, max)) => match (version(mv), version(min), version(max)) {
                (Some(want), Some(lo), Some(hi)) if want < lo || want > hi => CheckStep::failed(
                    "microversion",
                    format!(
                        "Nova serves {min} to {max}, not [nova] microversion = {mv}: set it to one Nova serves (2.31 or later; 2.99 or later for spice-direct tokens)"
                    ),
                ),
                (Some(want), ..) if want < (2, 31) => CheckStep::failed(
                    "microversion",
                    format!("[nova] microversion = {mv}: token lookups need 2.31 or later"),
                ),
                (Some(want), ..) if want < (2, 99) => CheckStep::ok(
                    "microversion",
                    format!("{mv} (Nova serves {min} to {max}); spice-direct tokens need 2.99"),
                ),
                _ => CheckStep::ok("microversion", format!("{mv} (Nova serves {min} to {max})")),
            },
        });
        if steps.iter().any(|s| s.outcome.is_err()) {
            return steps;
        }
        steps.push(self.check_policy().await);
        steps
    }

    /// The microversions the compute endpoint serves (its version document).
    async fn served_versions(&self, compute: &str) -> Result<(String, String), String> {
        let response = self
            .http
            .get(format!("{compute}/"))
            .header("Accept", "application/json")
            .send()
            .await
            .map_err(describe)?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status().as_u16()));
        }
        let doc: VersionDoc = response
            .json()
            .await
            .map_err(|e| format!("unreadable: {}", e.without_url()))?;
        Ok((doc.version.min_version, doc.version.version))
    }

    /// A lookup of a token Nova never issued: 404 means the policy let
    /// Porthole ask.
    async fn check_policy(&self) -> CheckStep {
        match self.ask(&random_uuid()).await {
            Ok(_) => CheckStep::ok(
                "policy",
                format!(
                    "`{LOOKUP_POLICY}` lets Porthole's user look console tokens up (a random token: 404)"
                ),
            ),
            Err(LookupError::Policy) => CheckStep::failed(
                "policy",
                format!(
                    "Nova answered 403: its policy `{LOOKUP_POLICY}` (admin-only by default) refuses Porthole's user. Either give the user the admin role, or (least privilege) add to Nova's policy file `\"{LOOKUP_POLICY}\": \"rule:context_is_admin or role:console_auth\"` and grant the user the `console_auth` role in its project (`openstack role add --user <user> --project <project> console_auth`)"
                ),
            ),
            Err(e @ LookupError::Keystone(_)) => CheckStep::failed("policy", keystone_words(&e)),
            Err(e) => CheckStep::failed("policy", e.to_string()),
        }
    }
}

/// A Keystone failure, with what to check.
fn keystone_words(e: &LookupError) -> String {
    format!(
        "{e} (check [nova] auth_url, the user or application credential, its project and domain, and ca_file)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_random_uuid_is_a_nova_token() {
        let u = random_uuid();
        assert!(super::super::is_nova_token(&u), "{u}");
        assert_ne!(u, random_uuid());
    }

    #[test]
    fn microversions_compare_as_numbers() {
        assert!(version("2.100").unwrap() > version("2.99").unwrap());
        assert!(version("2.31").unwrap() < version("2.99").unwrap());
        assert_eq!(version("junk"), None);
    }
}
