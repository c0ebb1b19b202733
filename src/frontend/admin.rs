//! The admin listener: health, readiness, metrics, the issuance API and key reload.
//!
//! It binds to loopback by default. Everything that changes state or issues
//! credentials needs a bearer key from configuration; health, readiness and
//! metrics are open (they carry no secrets and no per-session labels).

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::operations;
use super::respond::{bad_body, error};
use super::state::{AdminState, authorize};
use crate::console::ConsoleType;
use crate::issuance::{IssueBody, IssueError};

/// The admin router.
pub fn router(state: AdminState) -> Router {
    let protected = Router::new()
        .route("/v1/consoles", post(issue))
        .route("/v1/tokens/check", post(check_token))
        .route("/v1/tokens/connection", post(connection_details))
        .route("/v1/keys/reload", post(reload_keys))
        .route("/v1/reload", post(reload_all))
        .route("/v1/sessions", get(operations::list))
        .route(
            "/v1/sessions/{id}",
            get(operations::show).delete(operations::kill_one),
        )
        .route("/v1/sessions/{id}/shadow", post(operations::shadow))
        .route("/v1/recordings", get(operations::recordings))
        .route("/v1/recordings/{id}/playback", post(operations::playback))
        .route("/v1/recordings/{id}/file", get(operations::recording_file))
        .route("/v1/sessions/terminate", post(operations::kill_many))
        .route("/v1/revocations", post(operations::revoke))
        // The bearer key before anything else, the body included: an
        // unauthenticated caller cannot make Porthole read (or hold) a body.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_bearer,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(protected)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Largest admin request body: every admin call is a small JSON object.
pub const BODY_LIMIT: usize = 64 * 1024;

async fn require_bearer(
    State(s): State<AdminState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match authorize(&s, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refused) => refused.into_response(),
    }
}

async fn readyz(State(s): State<AdminState>) -> Response {
    s.readiness.answer()
}

async fn metrics(State(s): State<AdminState>) -> Response {
    match s.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn issue(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Result<Json<IssueBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return r.into_response();
    }
    let Some(issuer) = s.issuer.as_ref() else {
        return error(
            StatusCode::NOT_FOUND,
            "not_enabled",
            "the issuance API is not configured",
        );
    };
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => {
            crate::metrics::issuance_refused("bad_request");
            return bad_body(&e);
        }
    };
    let req = match body.into_request() {
        Ok(r) => r,
        Err(e) => {
            crate::metrics::issuance_refused("unknown_console_type");
            return error(
                StatusCode::BAD_REQUEST,
                "unknown_console_type",
                e.to_string(),
            );
        }
    };
    let console = req.console;
    match issuer.issue(&req) {
        Ok(issued) => {
            crate::metrics::token_issued(console.as_str());
            tracing::info!(jti = %issued.jti, instance = %req.instance, console = %console, target = %req.target, "console token issued");
            // Who minted which console for whom: a leaked link traces back
            // to its issuance (the token itself is never written).
            crate::audit::AuditEvent::new("token_issued")
                .field("by", Some(operations::actor(&headers)))
                .field("jti", Some(issued.jti.as_str()))
                .field("console", Some(console.as_str()))
                .field("instance", Some(req.instance.as_str()))
                .field("user", req.user.as_deref())
                .field("target", Some(req.target.to_string()))
                .field("expires_at", Some(issued.expires_at))
                .field("view_only", req.view_only.then_some(true))
                .field("record", req.record.then_some(true))
                .emit();
            Json(json!({
                "remote_console": {
                    "protocol": console.protocol(),
                    "type": console.as_str(),
                    "url": issued.url.expose(),
                },
                "token": issued.token.expose(),
                "jti": issued.jti,
                "expires_at": issued.expires_at,
            }))
            .into_response()
        }
        Err(IssueError::BadRequest(m)) => {
            crate::metrics::issuance_refused("bad_request");
            error(StatusCode::BAD_REQUEST, "bad_request", m)
        }
        Err(IssueError::TargetNotAllowed(m)) => {
            crate::metrics::issuance_refused("target_not_allowed");
            tracing::warn!(instance = %req.instance, target = %req.target, "issuance refused: {m}");
            error(StatusCode::FORBIDDEN, "target_not_allowed", m)
        }
        Err(IssueError::Internal(m)) => {
            crate::metrics::issuance_refused("internal");
            tracing::error!("issuance failed: {m}");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "token issuance failed; see the gateway log",
            )
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckBody {
    token: String,
    #[serde(default, rename = "type")]
    console: Option<String>,
}

/// The bearer check and the `{"token", "type"}` body both token routes take.
#[allow(clippy::result_large_err)]
fn token_request(
    s: &AdminState,
    headers: &HeaderMap,
    body: Result<Json<CheckBody>, axum::extract::rejection::JsonRejection>,
) -> Result<(String, Option<ConsoleType>), Response> {
    authorize(s, headers).map_err(IntoResponse::into_response)?;
    let Json(body) = body.map_err(|e| bad_body(&e))?;
    let expect = match body.console.as_deref().map(str::parse::<ConsoleType>) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "unknown_console_type",
                e.to_string(),
            ));
        }
    };
    Ok((body.token, expect))
}

/// Validates a token exactly as a console endpoint would (counted and logged),
/// and tells the trusted caller the precise reason. For API-server authors
/// debugging their tokens.
async fn check_token(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Result<Json<CheckBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let (token, expect) = match token_request(&s, &headers, body) {
        Ok(t) => t,
        Err(r) => return r,
    };
    match s.sessions.resolve(&token, expect, None).await {
        Ok(g) => {
            Json(json!({ "valid": true, "kid": g.kid, "backend": g.backend, "claims": g.claims }))
                .into_response()
        }
        Err(r) => (
            StatusCode::OK,
            Json(json!({ "valid": false, "reason": r.reason.as_str(), "detail": r.detail })),
        )
            .into_response(),
    }
}

/// `POST /v1/tokens/connection {"token": ...}`: where a valid token's
/// console lives, for trusted infrastructure (an external SPICE proxy, an
/// operator), in the shape of Nova's admin console-auth-tokens answer. No
/// credentials: Porthole's backend secrets never leave it. The token is not
/// redeemed.
async fn connection_details(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Result<Json<CheckBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let (token, expect) = match token_request(&s, &headers, body) {
        Ok(t) => t,
        Err(r) => return r,
    };
    match s.sessions.resolve(&token, expect, None).await {
        Ok(g) => Json(json!({
            "console": {
                "instance_uuid": g.instance,
                "type": g.console.as_str(),
                "host": g.target.host,
                "port": g.target.port,
                "tls_port": g.target.tls_port,
                "internal_access_path": null,
                "expires_at": g.expires_at,
            }
        }))
        .into_response(),
        Err(r) => error(
            StatusCode::from_u16(r.reason.http_status()).unwrap_or(StatusCode::FORBIDDEN),
            r.reason.as_str(),
            r.reason.client_code(),
        ),
    }
}

/// `POST /v1/reload`: what SIGHUP does, on this node only (each node of a
/// cluster reloads its own file). `200 {"node": ..., "reloaded": {...}}`
/// says which node and what changed ([`crate::reload::Reloaded`]); `422`
/// with every problem when the file is refused, and then nothing changed.
async fn reload_all(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    reload(s, &headers, "admin").await
}

/// `POST /v1/keys/reload`: the same full reload (keys cannot be reloaded
/// apart from the file that lists them); kept for callers of its old name.
async fn reload_keys(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    reload(s, &headers, "admin (keys/reload)").await
}

async fn reload(s: AdminState, headers: &HeaderMap, why: &'static str) -> Response {
    if let Err(r) = authorize(&s, headers) {
        return r.into_response();
    }
    let reloader = s.reloader.clone();
    match tokio::task::spawn_blocking(move || reloader.reload_logged(why)).await {
        // A reload acts on the node that answers, never on its peers.
        Ok(Ok(done)) => {
            Json(json!({ "node": crate::node::name(), "reloaded": done })).into_response()
        }
        Ok(Err(e)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "node": crate::node::name(), "error": {
                "code": "reload_failed",
                "message": format!("nothing changed: {e}"),
                "problems": e.problems(),
            } })),
        )
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}
