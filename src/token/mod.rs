//! Console tokens: signed JWTs in, a [`Grant`] or a named [`Refusal`] out.
//!
//! The API server signs; Porthole verifies with public keys from its
//! [`KeyRing`]. [`TokenValidator::validate`] checks, in order: size, header
//! shape, key selection by `kid`, the algorithm pinned to that key, the
//! signature, the registered claims (`exp`, `nbf`, `iat`, `iss`, `aud` with a
//! small leeway, and a maximum lifetime), the console type the caller expects,
//! and the target against the operator's allow-list. Reuse (`jti`) is decided
//! separately, by the [`redemption`] store, when a session actually starts.
//!
//! Nothing here knows about HTTP; front ends map a [`Refusal`] to a status
//! code with [`RefusalReason::client_code`] and [`RefusalReason::http_status`].

pub mod claims;
pub mod keys;
pub mod nova;
pub mod redemption;
pub mod revocation;
pub mod signing;
pub mod ticket;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};

use claims::MAX_USER_BYTES;
pub use claims::{ConsoleClaims, ConsoleType};
pub use keys::{KeyError, KeyRing, KeySource, LoadedKeys};
pub use redemption::{MemoryRedemptions, Redemption, RedemptionStore, ReusePolicy};
pub use ticket::{ChannelRole, MemoryTickets, TicketRefusal, TicketStore};

use crate::hypervisor::{AllowList, ConsoleTarget};
use keys::{Selected, VerifyingKey};

/// Every reason a token is refused. Each has a stable name for logs and the
/// `porthole_token_refusals_total{reason}` counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// Longer than the configured cap; refused before any parsing.
    TooLarge,
    /// Not a JWT, bad JSON, a claim missing or of the wrong type, a forbidden header.
    Malformed,
    /// No loaded key matches the token's `kid`.
    UnknownKey,
    /// The header's `alg` is not the algorithm pinned to the selected key.
    WrongAlgorithm,
    /// The signature does not verify.
    BadSignature,
    /// Past `exp` (plus leeway).
    Expired,
    /// Before `nbf` or `iat` (minus leeway).
    NotYetValid,
    /// `exp - iat` exceeds the configured maximum lifetime.
    LifetimeTooLong,
    /// `aud` names no audience this gateway accepts.
    WrongAudience,
    /// `iss` is not a configured issuer.
    WrongIssuer,
    /// The token is for another console type than the endpoint serves.
    WrongConsoleType,
    /// The target is outside every allowed hypervisor network or port range.
    TargetNotAllowed,
    /// The token is in use by another session, or was single-use and spent.
    Replayed,
    /// The token was revoked, or its session was killed.
    Revoked,
    /// Porthole cannot decide right now (store full or unreachable).
    Unavailable,
    /// The token store that issued it (Nova) does not know it: never
    /// issued, expired or deleted.
    UnknownToken,
}

impl RefusalReason {
    /// Every reason, for metrics initialisation and docs.
    pub const ALL: [RefusalReason; 16] = [
        RefusalReason::TooLarge,
        RefusalReason::Malformed,
        RefusalReason::UnknownKey,
        RefusalReason::WrongAlgorithm,
        RefusalReason::BadSignature,
        RefusalReason::Expired,
        RefusalReason::NotYetValid,
        RefusalReason::LifetimeTooLong,
        RefusalReason::WrongAudience,
        RefusalReason::WrongIssuer,
        RefusalReason::WrongConsoleType,
        RefusalReason::TargetNotAllowed,
        RefusalReason::Replayed,
        RefusalReason::Revoked,
        RefusalReason::Unavailable,
        RefusalReason::UnknownToken,
    ];

    /// The stable name used in logs, metrics and `token inspect`.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::TooLarge => "too_large",
            RefusalReason::Malformed => "malformed",
            RefusalReason::UnknownKey => "unknown_key",
            RefusalReason::WrongAlgorithm => "wrong_algorithm",
            RefusalReason::BadSignature => "bad_signature",
            RefusalReason::Expired => "expired",
            RefusalReason::NotYetValid => "not_yet_valid",
            RefusalReason::LifetimeTooLong => "lifetime_too_long",
            RefusalReason::WrongAudience => "wrong_audience",
            RefusalReason::WrongIssuer => "wrong_issuer",
            RefusalReason::WrongConsoleType => "wrong_console_type",
            RefusalReason::TargetNotAllowed => "target_not_allowed",
            RefusalReason::Replayed => "replayed",
            RefusalReason::Revoked => "revoked",
            RefusalReason::Unavailable => "unavailable",
            RefusalReason::UnknownToken => "unknown_token",
        }
    }

    /// What a client (a console page) is told: `expired`, `unavailable` or
    /// `refused`. Everything else stays in the log.
    pub fn client_code(self) -> &'static str {
        match self {
            RefusalReason::Expired => "expired",
            RefusalReason::Unavailable => "unavailable",
            // An operator ended it: the page says so rather than "not valid".
            RefusalReason::Revoked => "revoked",
            _ => "refused",
        }
    }

    /// The HTTP status a front end answers with.
    pub fn http_status(self) -> u16 {
        match self {
            RefusalReason::Expired => 401,
            RefusalReason::Unavailable => 503,
            RefusalReason::TooLarge | RefusalReason::Malformed => 400,
            _ => 403,
        }
    }
}

impl std::fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused token: the named reason, and a detail for the log (never for the
/// client, and never containing the token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Refusal {
    /// The named reason.
    pub reason: RefusalReason,
    /// What exactly was wrong, for operators.
    pub detail: String,
    /// The token's `jti`, when it got far enough to know it.
    pub jti: Option<String>,
}

impl Refusal {
    fn new(reason: RefusalReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            jti: None,
        }
    }
}

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grant {
    /// The token id: key for reuse and revocation.
    pub jti: String,
    /// The instance (VM) id, from `sub`.
    pub instance: String,
    /// The console type the token was minted for.
    pub console: ConsoleType,
    /// The hypervisor target.
    pub target: ConsoleTarget,
    /// The allow-list entry (backend network) that admits the target.
    pub backend: String,
    /// `exp`, seconds since the epoch.
    pub expires_at: u64,
    /// `iss`.
    pub issuer: String,
    /// The key that verified it.
    pub kid: Option<String>,
    /// The full claim set, for `token inspect`.
    pub claims: ConsoleClaims,
}

impl Grant {
    /// Whether its client may only watch: Porthole drops what would reach
    /// the VM (the token's `console.view_only`).
    pub fn view_only(&self) -> bool {
        self.claims.console.view_only || self.claims.shadow_of.is_some()
    }

    /// Whether its issuer requires the session to be recorded (the
    /// token's `console.record`).
    pub fn record(&self) -> bool {
        self.claims.console.record
    }

    /// The recording this grant plays, if it is a playback's.
    pub fn playback(&self) -> Option<&str> {
        self.claims.playback.as_deref()
    }

    /// The live session this grant watches, if it is a shadow's.
    pub fn shadow_of(&self) -> Option<&str> {
        self.claims.shadow_of.as_deref()
    }

    /// The user it was issued to (the token's `user`), if it names one.
    pub fn user(&self) -> Option<&str> {
        self.claims.user.as_deref()
    }
}

/// The checks every token goes through, besides its signature.
#[derive(Debug, Clone)]
pub struct ValidationPolicy {
    /// Accepted `iss` values.
    pub issuers: Vec<String>,
    /// Accepted `aud` values.
    pub audiences: Vec<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`, in seconds.
    pub leeway_secs: u64,
    /// Longest accepted `exp - iat`, in seconds.
    pub max_ttl_secs: u64,
    /// Longest accepted token, in bytes, checked before any parsing.
    pub max_token_bytes: usize,
}

impl ValidationPolicy {
    /// The jsonwebtoken settings for a key pinned to `alg`. Its defaults are
    /// not what we want (60 s leeway, `nbf` and `iss` unchecked), so every knob
    /// is set here explicitly.
    pub(crate) fn jsonwebtoken_validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.algorithms = vec![alg];
        v.leeway = self.leeway_secs;
        v.validate_exp = true;
        v.validate_nbf = true;
        v.validate_aud = true;
        v.reject_tokens_expiring_in_less_than = 0;
        v.set_audience(&self.audiences);
        v.set_issuer(&self.issuers);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v
    }

    /// The checks on `claims` (of a token whose signature verified) for a
    /// console of type `expect` at `now`: what jsonwebtoken does not check,
    /// and the audience again. A refusal names the token's `jti`.
    fn check_claims(
        &self,
        claims: &ConsoleClaims,
        expect: Option<ConsoleType>,
        now: u64,
    ) -> Result<(), Refusal> {
        let refuse = |reason, detail: String| Refusal {
            reason,
            detail,
            jti: Some(claims.jti.clone()),
        };

        // What jsonwebtoken does not check, we do.
        if claims.playback.is_some() {
            return Err(refuse(
                RefusalReason::Malformed,
                "a playback's token opens no console".into(),
            ));
        }
        if claims.ver.is_some_and(|v| v != claims::SCHEMA_VERSION) {
            return Err(refuse(
                RefusalReason::Malformed,
                format!("unsupported schema version {:?}", claims.ver),
            ));
        }
        if claims.jti.is_empty() || claims.jti.len() > 128 {
            return Err(refuse(
                RefusalReason::Malformed,
                "jti must be 1 to 128 characters".into(),
            ));
        }
        if claims.sub.is_empty() || claims.sub.len() > 255 {
            return Err(refuse(
                RefusalReason::Malformed,
                "sub must be 1 to 255 characters".into(),
            ));
        }
        if claims
            .user
            .as_ref()
            .is_some_and(|u| u.is_empty() || u.len() > MAX_USER_BYTES)
        {
            return Err(refuse(
                RefusalReason::Malformed,
                "user must be 1 to 255 characters".into(),
            ));
        }
        if let Some(name) = with_control_characters(claims) {
            return Err(refuse(
                RefusalReason::Malformed,
                format!("{name} holds control characters"),
            ));
        }
        if claims.iat > now + self.leeway_secs {
            return Err(refuse(
                RefusalReason::NotYetValid,
                "iat is in the future".into(),
            ));
        }
        let lifetime = claims.exp.saturating_sub(claims.iat);
        // `exp - now` is checked as well: an old `iat` must not stretch the window.
        if lifetime > self.max_ttl_secs || claims.exp > now + self.max_ttl_secs + self.leeway_secs {
            return Err(refuse(
                RefusalReason::LifetimeTooLong,
                format!(
                    "token lives {lifetime} s, the limit is {} s",
                    self.max_ttl_secs
                ),
            ));
        }
        // jsonwebtoken checks these too; the explicit check keeps the reason
        // right whatever the library's order of checks.
        if !claims.aud.matches_any(&self.audiences) {
            return Err(refuse(
                RefusalReason::WrongAudience,
                "aud is not accepted".into(),
            ));
        }
        if let Some(want) = expect
            && claims.console.kind != want
        {
            return Err(refuse(
                RefusalReason::WrongConsoleType,
                format!(
                    "token is for {}, this endpoint serves {want}",
                    claims.console.kind
                ),
            ));
        }
        Ok(())
    }
}

/// Seconds since the epoch, from the system clock.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Verifies console tokens. Shared by every front end; keys swap atomically on reload.
#[derive(Debug)]
pub struct TokenValidator {
    policy: ValidationPolicy,
    /// The keys in force, with the sources they came from; a reload swaps them.
    keys: ArcSwap<LoadedKeys>,
    allow: ArcSwap<AllowList>,
    revocations: Arc<dyn revocation::RevocationStore>,
}

/// Header parameters that would make a verifier fetch or trust keys named by
/// the token itself, or that demand semantics we do not implement (`crit`).
const FORBIDDEN_HEADERS: [&str; 5] = ["crit", "jku", "x5u", "jwk", "x5c"];

impl TokenValidator {
    /// Loads the keys and builds a validator.
    pub fn new(
        policy: ValidationPolicy,
        sources: Vec<KeySource>,
        allow_hmac: bool,
        allow: Arc<AllowList>,
    ) -> Result<Self, KeyError> {
        let keys = LoadedKeys::load(sources, allow_hmac, &policy)?;
        Ok(Self::with_keys(policy, keys, allow))
    }

    /// A validator over keys already loaded (for `policy`).
    pub fn with_keys(policy: ValidationPolicy, keys: LoadedKeys, allow: Arc<AllowList>) -> Self {
        Self {
            policy,
            keys: ArcSwap::from_pointee(keys),
            allow: ArcSwap::new(allow),
            revocations: Arc::new(revocation::Revocations::default()),
        }
    }

    /// This validator, with its deny-lists kept in `store` (a shared one).
    pub fn with_revocations(mut self, store: Arc<dyn revocation::RevocationStore>) -> Self {
        self.revocations = store;
        self
    }

    /// The deny-lists every resolution checks.
    pub fn revocations(&self) -> &dyn revocation::RevocationStore {
        self.revocations.as_ref()
    }

    /// Re-reads the key sources in force (their files may have changed) and
    /// swaps the new ring in. On any error the old ring stays and the error
    /// is returned. A changed key *list* comes from the config file:
    /// [`TokenValidator::load_keys`] and [`TokenValidator::replace_keys`].
    pub fn reload(&self) -> Result<usize, KeyError> {
        let now = self.keys.load();
        let keys = self.load_keys(now.sources.clone(), now.allow_hmac)?;
        let n = keys.ring.len();
        self.keys.store(Arc::new(keys));
        Ok(n)
    }

    /// Loads `sources` for this validator's policy, without swapping them in.
    pub fn load_keys(
        &self,
        sources: Vec<KeySource>,
        allow_hmac: bool,
    ) -> Result<LoadedKeys, KeyError> {
        LoadedKeys::load(sources, allow_hmac, &self.policy)
    }

    /// Swaps `keys` in (loaded for this validator's policy); returns the ones
    /// they replace. Sessions already running keep going.
    pub fn replace_keys(&self, keys: LoadedKeys) -> Arc<LoadedKeys> {
        self.keys.swap(Arc::new(keys))
    }

    /// Key ids currently loaded.
    pub fn kids(&self) -> Vec<String> {
        self.keys.load().ring.kids()
    }

    /// Number of keys currently loaded.
    pub fn key_count(&self) -> usize {
        self.keys.load().ring.len()
    }

    /// The policy in force.
    pub fn policy(&self) -> &ValidationPolicy {
        &self.policy
    }

    /// The allow-list targets are checked against now.
    pub fn allow_list(&self) -> Arc<AllowList> {
        self.allow.load_full()
    }

    /// Swaps in a new allow-list (a config reload); sessions already running keep going.
    pub fn set_allow_list(&self, allow: AllowList) {
        self.allow.store(Arc::new(allow));
    }

    /// Checks `token`'s signature and claims for a console of type `expect`
    /// (any type if `None`) now; revocations are the resolver's next step
    /// ([`GrantResolver::resolve`]). Refusals are returned, not recorded:
    /// the session layer records what it refuses.
    pub fn validate(&self, token: &str, expect: Option<ConsoleType>) -> Result<Grant, Refusal> {
        self.check(token, expect, unix_now())
    }

    /// Like [`TokenValidator::validate`], at time `now`.
    pub fn check(
        &self,
        token: &str,
        expect: Option<ConsoleType>,
        now: u64,
    ) -> Result<Grant, Refusal> {
        let keys = self.keys.load();
        let (claims, key) = self.verify(token, &keys)?;
        self.policy.check_claims(&claims, expect, now)?;
        let target = claims.console.target();
        let backend = match self.allow.load().check(&target, claims.console.kind) {
            Ok(b) => b.name.clone(),
            Err(e) => {
                return Err(Refusal {
                    reason: RefusalReason::TargetNotAllowed,
                    detail: e.to_string(),
                    jti: Some(claims.jti.clone()),
                });
            }
        };
        Ok(Grant {
            jti: claims.jti.clone(),
            instance: claims.sub.clone(),
            console: claims.console.kind,
            target,
            backend,
            expires_at: claims.exp,
            issuer: claims.iss.clone(),
            kid: key.kid.clone(),
            claims,
        })
    }

    /// The recording a playback's token plays, if its signature and times
    /// verify (`POST /v1/recordings/{id}/playback` minted it).
    pub fn playback_of(&self, token: &str) -> Result<String, Refusal> {
        let keys = self.keys.load();
        let (claims, _) = self.verify(token, &keys)?;
        claims
            .playback
            .ok_or_else(|| Refusal::new(RefusalReason::Malformed, "not a playback's token"))
    }

    /// A playback's token as a grant for a native SPICE client's ticket
    /// (`GET /playback/vv`): its console is spice-direct, its backend
    /// `playback` (on no allow-list: it reaches no hypervisor), its
    /// recording in `claims.playback`.
    pub fn playback_grant(&self, token: &str) -> Result<Grant, Refusal> {
        let keys = self.keys.load();
        let (claims, key) = self.verify(token, &keys)?;
        if claims.playback.is_none() {
            return Err(Refusal::new(
                RefusalReason::Malformed,
                "not a playback's token",
            ));
        }
        Ok(Grant {
            jti: claims.jti.clone(),
            instance: claims.sub.clone(),
            console: ConsoleType::SpiceDirect,
            target: claims.console.target(),
            backend: "playback".into(),
            expires_at: claims.exp,
            issuer: claims.iss.clone(),
            kid: key.kid.clone(),
            claims,
        })
    }

    /// The `jti` of `token` if its signature verifies, however long ago it
    /// expired: a console outlives its token by hours, and its page proves
    /// with the token that it holds the session (`GET /watched`).
    pub fn holder_of(&self, token: &str) -> Option<String> {
        let keys = self.keys.load();
        self.verify_within(token, &keys, false)
            .ok()
            .map(|(claims, _)| claims.jti)
    }

    fn verify<'k>(
        &self,
        token: &str,
        keys: &'k LoadedKeys,
    ) -> Result<(ConsoleClaims, &'k VerifyingKey), Refusal> {
        self.verify_within(token, keys, true)
    }

    /// The claims of `token` once its size, header and signature pass, and
    /// the key (of `keys`, chosen by the header's `kid`) that verified it;
    /// its times (`exp`, `nbf`) too when `timely`.
    /// The key's pinned algorithm must be the header's: a token never picks
    /// how it is verified.
    fn verify_within<'k>(
        &self,
        token: &str,
        keys: &'k LoadedKeys,
        timely: bool,
    ) -> Result<(ConsoleClaims, &'k VerifyingKey), Refusal> {
        let p = &self.policy;
        if token.len() > p.max_token_bytes {
            return Err(Refusal::new(
                RefusalReason::TooLarge,
                format!("{} bytes, the limit is {}", token.len(), p.max_token_bytes),
            ));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Refusal::new(RefusalReason::Malformed, format!("bad header: {e}")))?;
        if let Some(name) = forbidden_header(&header) {
            return Err(Refusal::new(
                RefusalReason::Malformed,
                format!("header parameter `{name}` is not accepted"),
            ));
        }
        let key = match keys.ring.select(header.kid.as_deref()) {
            Selected::Key(k) => k,
            Selected::Unknown(why) => return Err(Refusal::new(RefusalReason::UnknownKey, why)),
        };
        if header.alg != key.algorithm {
            return Err(Refusal::new(
                RefusalReason::WrongAlgorithm,
                format!(
                    "header says {:?}, the key is pinned to {:?}",
                    header.alg, key.algorithm
                ),
            ));
        }
        let untimed;
        let validation = if timely {
            &key.validation
        } else {
            let mut v = key.validation.clone();
            v.validate_exp = false;
            v.validate_nbf = false;
            untimed = v;
            &untimed
        };
        let data = jsonwebtoken::decode::<ConsoleClaims>(token, &key.key, validation)
            .map_err(|e| map_jwt_error(e.kind()))?;
        Ok((data.claims, key))
    }
}

fn forbidden_header(header: &jsonwebtoken::Header) -> Option<&'static str> {
    let present = [
        header.crit.is_some(),
        header.jku.is_some(),
        header.x5u.is_some(),
        header.jwk.is_some(),
        header.x5c.is_some(),
    ];
    FORBIDDEN_HEADERS
        .iter()
        .zip(present)
        .find_map(|(name, p)| p.then_some(*name))
}

/// The first claim that log lines carry and that holds a control character
/// (a CR/LF in `sub` would forge a log line): such a token is malformed.
fn with_control_characters(claims: &ConsoleClaims) -> Option<&'static str> {
    let bad = |s: &str| s.chars().any(char::is_control);
    [
        ("jti", claims.jti.as_str()),
        ("sub", claims.sub.as_str()),
        ("iss", claims.iss.as_str()),
        ("console.host", claims.console.host.as_str()),
        ("user", claims.user.as_deref().unwrap_or_default()),
    ]
    .into_iter()
    .find(|(_, v)| bad(v))
    .map(|(name, _)| name)
}

fn map_jwt_error(kind: &ErrorKind) -> Refusal {
    let (reason, detail) = match kind {
        ErrorKind::InvalidSignature => (
            RefusalReason::BadSignature,
            "signature does not verify".to_string(),
        ),
        ErrorKind::InvalidAlgorithm => (
            RefusalReason::WrongAlgorithm,
            "algorithm not allowed for this key".into(),
        ),
        ErrorKind::ExpiredSignature => (RefusalReason::Expired, "exp has passed".into()),
        ErrorKind::ImmatureSignature => (RefusalReason::NotYetValid, "nbf is in the future".into()),
        ErrorKind::InvalidAudience => (RefusalReason::WrongAudience, "aud is not accepted".into()),
        ErrorKind::InvalidIssuer => (RefusalReason::WrongIssuer, "iss is not accepted".into()),
        ErrorKind::MissingRequiredClaim(c) => {
            (RefusalReason::Malformed, format!("claim `{c}` is missing"))
        }
        ErrorKind::InvalidClaimFormat(c) => (
            RefusalReason::Malformed,
            format!("claim `{c}` has the wrong type"),
        ),
        // A signature that is not even well-formed for the algorithm is a bad signature.
        ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidEddsaKey | ErrorKind::InvalidRsaKey(_) => (
            RefusalReason::BadSignature,
            "signature does not verify".into(),
        ),
        ErrorKind::Json(e) => (RefusalReason::Malformed, format!("claims: {e}")),
        other => (RefusalReason::Malformed, format!("{other:?}")),
    };
    Refusal::new(reason, detail)
}

/// Turns the token a client brings into a [`Grant`], or a refusal. The
/// signed-JWT validator is one; a resolver that asks an API server (Nova's
/// console-auth-tokens) is another, hence the future.
pub trait GrantResolver: Send + Sync + std::fmt::Debug {
    /// Resolves `token` for a console of type `expect` (any, if `None`).
    fn resolve<'a>(
        &'a self,
        token: &'a str,
        expect: Option<ConsoleType>,
    ) -> futures_util::future::BoxFuture<'a, Result<Grant, Refusal>>;

    /// [`GrantResolver::resolve`] for a caller of `standing`: a resolver
    /// that asks another service (Nova) budgets its lookups by it.
    fn resolve_for<'a>(
        &'a self,
        token: &'a str,
        expect: Option<ConsoleType>,
        _standing: nova::Standing,
    ) -> futures_util::future::BoxFuture<'a, Result<Grant, Refusal>> {
        self.resolve(token, expect)
    }

    /// The `jti` of the grant `token` was (or is) for, if the token is
    /// genuine, even expired; `None` if it is not one this resolver knows.
    fn holder(&self, _token: &str) -> Option<String> {
        None
    }
}

impl GrantResolver for TokenValidator {
    /// The signature and claims (at once), then the revocation store.
    fn resolve<'a>(
        &'a self,
        token: &'a str,
        expect: Option<ConsoleType>,
    ) -> futures_util::future::BoxFuture<'a, Result<Grant, Refusal>> {
        Box::pin(async move {
            let grant = self.validate(token, expect)?;
            check_revoked(self.revocations.as_ref(), grant).await
        })
    }

    fn holder(&self, token: &str) -> Option<String> {
        self.holder_of(token)
    }
}

/// `grant`, unless its token, its instance or its issue time is revoked.
pub(crate) async fn check_revoked(
    revocations: &dyn revocation::RevocationStore,
    grant: Grant,
) -> Result<Grant, Refusal> {
    let revoked = revocations
        .check(&grant.jti, &grant.instance, grant.claims.iat)
        .await;
    match revoked {
        Ok(Some(why)) => Err(Refusal {
            reason: RefusalReason::Revoked,
            detail: why.to_string(),
            jti: Some(grant.jti),
        }),
        Ok(None) => Ok(grant),
        // Fail closed: a token is never let in because the list could not
        // be read.
        Err(e) => Err(Refusal {
            reason: RefusalReason::Unavailable,
            detail: e.to_string(),
            jti: Some(grant.jti),
        }),
    }
}
