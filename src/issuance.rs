//! Issuing console tokens on behalf of API servers that hold no signing key.
//!
//! The issuance API (served by `frontend::admin`) takes the instance, the
//! console type the user asked for and the hypervisor target, and answers with
//! a signed token and the console URL for it, in the shape of Nova's
//! remote-console response. Issued tokens go through the same schema,
//! allow-list and validator as any other: a token Porthole issues and would
//! then refuse is an internal error, never a response.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::hypervisor::ConsoleTarget;
use crate::secret::Secret;
use crate::session::registry::SessionView;
use crate::token::claims::{ConsoleClaim, ConsoleClaims};
use crate::token::signing::{MintRequest, Signer};
use crate::token::{ConsoleType, TokenValidator, unix_now};

/// The URL a user opens (or a native client exchanges) for a token.
pub fn console_url(public_base_url: &str, console: ConsoleType, token: &str) -> String {
    let path = match console {
        ConsoleType::Novnc | ConsoleType::SpiceHtml5 | ConsoleType::Serial => "console",
        ConsoleType::SpiceDirect => "spice-direct",
        ConsoleType::VncDirect => "vnc-direct",
    };
    // JWTs are base64url and dots only: nothing to percent-encode.
    format!("{public_base_url}/{path}?token={token}")
}

/// A request to issue a token.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The instance (VM) id.
    pub instance: String,
    /// The console type the user asked for.
    pub console: ConsoleType,
    /// The hypervisor target.
    pub target: ConsoleTarget,
    /// Requested lifetime; capped by configuration.
    pub ttl_secs: Option<u64>,
    /// The user may watch and not act.
    pub view_only: bool,
    /// The session must be recorded (the token's `console.record`).
    pub record: bool,
    /// The live session the token shadows (Porthole's own shadow grants).
    pub shadow_of: Option<String>,
    /// Who the console is for (the token's `user`), if the caller says.
    pub user: Option<String>,
}

/// The issuance API's request body (`POST /v1/consoles`), before its
/// console type is known to be one.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueBody {
    /// Instance (VM) id.
    instance: String,
    /// Console type, as a string so an unknown one gets its own error.
    #[serde(rename = "type")]
    console: String,
    /// Hypervisor target.
    target: ConsoleTarget,
    /// Requested lifetime in seconds.
    #[serde(default)]
    ttl_secs: Option<u64>,
    /// A view-only console (the token's `console.view_only`).
    #[serde(default)]
    view_only: bool,
    /// A session that must be recorded (the token's `console.record`).
    #[serde(default)]
    record: bool,
    /// Who the console is for (the token's `user`).
    #[serde(default)]
    user: Option<String>,
}

impl IssueBody {
    /// The request it makes, if its console type is one.
    pub fn into_request(self) -> Result<IssueRequest, crate::console::UnknownConsoleType> {
        Ok(IssueRequest {
            instance: self.instance,
            console: self.console.parse()?,
            target: self.target,
            ttl_secs: self.ttl_secs,
            view_only: self.view_only,
            record: self.record,
            shadow_of: None,
            user: self.user,
        })
    }
}

/// An issued token.
#[derive(Debug)]
pub struct Issued {
    /// The signed token.
    pub token: Secret<String>,
    /// Its `jti`.
    pub jti: String,
    /// Its `exp`.
    pub expires_at: u64,
    /// The console URL carrying it.
    pub url: Secret<String>,
}

/// Why a token was not issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The request is unusable (empty instance, bad lifetime).
    #[error("{0}")]
    BadRequest(String),
    /// The target is outside the allow-list.
    #[error("target not allowed: {0}")]
    TargetNotAllowed(String),
    /// Porthole failed: signing broke, or its own validator refused the result.
    #[error("internal: {0}")]
    Internal(String),
}

/// How long a playback's link works.
pub const PLAYBACK_TTL_SECS: u64 = 300;

/// How long a shadow's link may wait to be opened.
pub const SHADOW_TTL_SECS: u64 = 60;

/// Why no shadow was issued.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// The session is itself a shadow.
    #[error("the session is a shadow: watch the session it watches")]
    OfAShadow,
    /// spice-server serves one client per VM.
    #[error(
        "a SPICE session cannot be shadowed: spice-server serves one client per VM, and a second client would disconnect this session's user"
    )]
    Spice,
    /// Issuing failed.
    #[error(transparent)]
    Issue(IssueError),
}

/// Mints tokens with the configured signing key.
#[derive(Debug)]
pub struct Issuer {
    /// The signing key; a reload swaps it (`[issuance]` `signing_key`, `signing_kid`).
    signer: Arc<ArcSwap<Signer>>,
    issuer: String,
    audience: String,
    default_ttl_secs: u64,
    public_base_url: String,
    validator: Arc<TokenValidator>,
}

impl Issuer {
    /// Builds an issuer. `validator` checks every token before it leaves.
    pub fn new(
        signer: Signer,
        issuer: String,
        audience: String,
        default_ttl_secs: u64,
        public_base_url: String,
        validator: Arc<TokenValidator>,
    ) -> Self {
        Self {
            signer: Arc::new(ArcSwap::from_pointee(signer)),
            issuer,
            audience,
            default_ttl_secs,
            public_base_url,
            validator,
        }
    }

    /// The `kid` issued tokens carry now.
    pub fn kid(&self) -> Option<String> {
        self.signer.load().kid().map(str::to_string)
    }

    /// The slot its signing key is in, for reloads to swap.
    pub fn signer_slot(&self) -> Arc<ArcSwap<Signer>> {
        self.signer.clone()
    }

    /// Issues a shadow's token for the live session `watched`: view-only,
    /// single-use (its reuse policy), valid for [`SHADOW_TTL_SECS`], for
    /// the same console type and target, tied to the session by its id
    /// (the shadow ends when that session does).
    pub fn issue_shadow(&self, watched: &SessionView) -> Result<Issued, ShadowError> {
        if watched.shadow_of.is_some() {
            return Err(ShadowError::OfAShadow);
        }
        let console: ConsoleType = watched
            .console
            .parse()
            .map_err(|_| ShadowError::Issue(IssueError::Internal("console type".into())))?;
        if matches!(console, ConsoleType::SpiceHtml5 | ConsoleType::SpiceDirect) {
            return Err(ShadowError::Spice);
        }
        let target: ConsoleTarget = watched
            .target
            .parse()
            .map_err(|e: &str| ShadowError::Issue(IssueError::Internal(format!("target: {e}"))))?;
        self.issue(&IssueRequest {
            instance: watched.instance.clone(),
            console,
            target,
            ttl_secs: Some(SHADOW_TTL_SECS.min(self.validator.policy().max_ttl_secs)),
            view_only: true,
            // The session it watches is recorded if it must be.
            record: false,
            shadow_of: Some(watched.id.clone()),
            // The operator who watches is in `shadow_issued`'s `by`.
            user: None,
        })
        .map_err(ShadowError::Issue)
    }

    /// `claims`, signed with the issuance key.
    fn sign(&self, claims: &ConsoleClaims) -> Result<Secret<String>, IssueError> {
        self.signer
            .load()
            .sign(claims)
            .map_err(|e| IssueError::Internal(e.to_string()))
    }

    /// Issues a playback's token for recording `id` (a serial session's):
    /// it names no console anyone may open (its target is on no
    /// allow-list, and a token with `playback` is refused as a console's),
    /// only `/playback`, for [`PLAYBACK_TTL_SECS`].
    pub fn issue_playback(&self, id: &str, console: ConsoleType) -> Result<Issued, IssueError> {
        let mint = MintRequest {
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            instance: format!("recording {id}"),
            user: None,
            console: ConsoleClaim {
                kind: console,
                host: "playback.invalid".into(),
                port: 1,
                tls_port: None,
                view_only: true,
                record: false,
            },
            ttl_secs: PLAYBACK_TTL_SECS.min(self.validator.policy().max_ttl_secs),
        };
        let mut claims = mint.claims(unix_now());
        claims.playback = Some(id.to_string());
        let token = self.sign(&claims)?;
        let url = format!("{}/playback?token={}", self.public_base_url, token.expose());
        Ok(Issued {
            token,
            jti: claims.jti,
            expires_at: claims.exp,
            url: Secret::new(url),
        })
    }

    /// Issues a token for `req`.
    pub fn issue(&self, req: &IssueRequest) -> Result<Issued, IssueError> {
        if req.instance.is_empty() || req.instance.len() > 255 {
            return Err(IssueError::BadRequest(
                "instance must be 1 to 255 characters".into(),
            ));
        }
        if req.instance.chars().any(char::is_control) {
            // It would reach every log line of its sessions.
            return Err(IssueError::BadRequest(
                "instance must not hold control characters".into(),
            ));
        }
        if req
            .user
            .as_deref()
            .is_some_and(|u| !crate::token::claims::user_fits(u))
        {
            return Err(IssueError::BadRequest(
                "user must be 1 to 255 characters, none of them control characters".into(),
            ));
        }
        let max = self.validator.policy().max_ttl_secs;
        let ttl_secs = req.ttl_secs.unwrap_or(self.default_ttl_secs);
        if ttl_secs == 0 || ttl_secs > max {
            return Err(IssueError::BadRequest(format!(
                "ttl_secs must be between 1 and {max}"
            )));
        }
        self.validator
            .allow_list()
            .check(&req.target, req.console)
            .map_err(|e| IssueError::TargetNotAllowed(e.to_string()))?;
        let mint = MintRequest {
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            instance: req.instance.clone(),
            user: req.user.clone(),
            console: ConsoleClaim {
                kind: req.console,
                host: req.target.host.clone(),
                port: req.target.port,
                tls_port: req.target.tls_port,
                view_only: req.view_only,
                record: req.record,
            },
            ttl_secs,
        };
        let now = unix_now();
        let mut claims = mint.claims(now);
        claims.shadow_of.clone_from(&req.shadow_of);
        let token = self.sign(&claims)?;
        self.validator
            .check(token.expose(), Some(req.console), now)
            .map_err(|r| {
                IssueError::Internal(format!(
                    "issued token fails validation ({r}); is the signing key in tokens.keys?"
                ))
            })?;
        let url = console_url(&self.public_base_url, req.console, token.expose());
        Ok(Issued {
            token,
            jti: claims.jti,
            expires_at: claims.exp,
            url: Secret::new(url),
        })
    }
}
