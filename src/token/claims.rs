//! The console token claim schema, version 1.
//!
//! This is the contract with API servers; `docs/tokens.md` documents it. The
//! types here are strict where a mistake would be a security problem (the
//! `console` object rejects unknown fields, so a `password` can never ride in a
//! token unnoticed) and lenient where API servers legitimately differ (extra
//! top-level claims are ignored; `aud` may be a string or a list).

use serde::{Deserialize, Serialize};

pub use crate::console::ConsoleType;
use crate::hypervisor::ConsoleTarget;

/// The claim schema version this build understands.
pub const SCHEMA_VERSION: u32 = 1;

/// The `console` claim: what to open, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleClaim {
    /// The console type the user asked for.
    #[serde(rename = "type")]
    pub kind: ConsoleType,
    /// Hypervisor host (IP address or allow-listed name).
    pub host: String,
    /// Console port on the hypervisor.
    pub port: u16,
    /// SPICE TLS port on the hypervisor, where it applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_port: Option<u16>,
    /// The user may watch and not act: Porthole drops what the client sends
    /// that would reach the VM (keys, pointer, clipboard, power), per
    /// protocol. Optional; absent is `false`. A Porthole older than this
    /// field refuses such a token (`deny_unknown_fields`): a view-only
    /// token never opens a console that can be typed into.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub view_only: bool,
    /// The session must be recorded (`[recording]`): a session that cannot
    /// be, or whose recording stops, is refused or ended, whatever its
    /// backend network's setting. Optional; absent is `false` (then the
    /// backend network decides). A Porthole older than this field refuses
    /// such a token: an issuer that asks for a recording never gets an
    /// unrecorded session.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub record: bool,
}

impl ConsoleClaim {
    /// The hypervisor target this claim names.
    pub fn target(&self) -> ConsoleTarget {
        ConsoleTarget {
            host: self.host.clone(),
            port: self.port,
            tls_port: self.tls_port,
        }
    }
}

/// `aud` may be one string or a list of strings (RFC 7519 §4.1.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// A single audience.
    One(String),
    /// Several audiences.
    Many(Vec<String>),
}

impl Audience {
    /// Whether `aud` names any of `accepted`.
    pub fn matches_any(&self, accepted: &[String]) -> bool {
        match self {
            Audience::One(a) => accepted.contains(a),
            Audience::Many(list) => list.iter().any(|a| accepted.contains(a)),
        }
    }
}

/// Longest `user` claim, in bytes.
pub const MAX_USER_BYTES: usize = 255;

/// Whether `user` may stand in a token's `user` claim: 1 to
/// [`MAX_USER_BYTES`] bytes, no control characters (it reaches log lines).
/// The validator refuses a token whose `user` does not fit; the issuance
/// API and `token mint` refuse to mint one.
pub fn user_fits(user: &str) -> bool {
    (1..=MAX_USER_BYTES).contains(&user.len()) && !user.chars().any(char::is_control)
}

/// The full claim set of a console token (schema version 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleClaims {
    /// Issuer: who minted the token (the API server).
    pub iss: String,
    /// Audience: the Porthole deployment the token is for.
    pub aud: Audience,
    /// Subject: the instance (VM) id.
    pub sub: String,
    /// The user the console was issued to (the API server's user id), for
    /// the audit trail and the session list: who, not only which token.
    /// Optional, 1 to 255 characters; Porthole grants nothing by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Not before, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// Unique token id: the key for reuse and revocation.
    pub jti: String,
    /// Claim schema version; absent means 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ver: Option<u32>,
    /// What to open, and where.
    pub console: ConsoleClaim,
    /// A shadow: the live session (its id) this token watches. Porthole
    /// mints these itself (`POST /v1/sessions/{id}/shadow`), view-only and
    /// single-use; the shadow ends when that session does. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_of: Option<String>,
    /// A playback's token: the recording (its session id) it plays.
    /// Porthole mints these itself (`POST /v1/recordings/{id}/playback`);
    /// such a token opens no console, only `/playback`. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub playback: Option<String>,
}
