//! The operator's admin routes: live sessions, terminating them, revoking
//! tokens. All need a bearer key; every action is audited with the caller's
//! name (`X-Porthole-Actor`, default `admin`) and reason.
//!
//! - `GET /v1/sessions[?instance=&jti=&type=&client=&target=]`: the live
//!   sessions (`target`: one console's `host:port`).
//! - `GET /v1/sessions/{id}`: one.
//! - `DELETE /v1/sessions/{id}[?reason=]`: end it (and revoke its token).
//! - `POST /v1/sessions/terminate {"instance"|"jti"|"id"|..., "reason"}`: end
//!   every session that matches (and revoke their tokens).
//! - `POST /v1/revocations {"jti"|"instance", "reason"}`: revoke tokens
//!   before they are used (kept until they can no longer be valid).
//! - `POST /v1/sessions/{id}/shadow`: a link that watches a running session
//!   (view-only, single-use, short-lived; it ends with the session).
//! - `GET /v1/recordings`: this node's recordings;
//!   `POST /v1/recordings/{id}/playback`: a link that plays one back;
//!   `GET /v1/recordings/{id}/file`: its file.

use std::collections::HashSet;

use axum::Json;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::respond::{bad_body, error};
use super::state::{AdminState, authorize};
use crate::audit::AuditEvent;
use crate::issuance::ShadowError;
use crate::session::registry::{Selector, SessionView};
use crate::token::unix_now;

pub(super) fn actor(headers: &HeaderMap) -> String {
    headers
        .get("x-porthole-actor")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().filter(|c| !c.is_control()).take(64).collect())
        .filter(|v: &String| !v.is_empty())
        .unwrap_or_else(|| "admin".to_string())
}

/// `GET /v1/sessions`.
pub async fn list(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Query(sel): Query<Selector>,
) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return r.into_response();
    }
    let all = s.sessions.registry.list(&Selector::default()).await;
    let listed = if sel.is_empty() {
        all.clone()
    } else {
        s.sessions.registry.list(&sel).await
    };
    Json(json!({ "sessions": with_shadows(listed, &all) })).into_response()
}

/// `GET /v1/sessions/{id}`.
pub async fn show(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return r.into_response();
    }
    let sel = Selector {
        id: Some(id),
        ..Selector::default()
    };
    let all = s.sessions.registry.list(&Selector::default()).await;
    let found: Vec<_> = all
        .iter()
        .filter(|v| Some(&v.id) == sel.id.as_ref())
        .cloned()
        .collect();
    match with_shadows(found, &all).into_iter().next() {
        Some(v) => Json(v).into_response(),
        None => error(StatusCode::NOT_FOUND, "not_found", "no such session"),
    }
}

/// `POST /v1/sessions/{id}/shadow`: a shadow's link for the live session
/// `id`, on whichever node it runs. Audited with who asked and from where.
pub async fn shadow(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    request: axum::extract::Request,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    if let Err(r) = authorize(&s, &headers) {
        return r.into_response();
    }
    let Some(issuer) = s.issuer.as_ref() else {
        return error(
            StatusCode::NOT_IMPLEMENTED,
            "not_enabled",
            "shadows are signed with the issuance key: configure [issuance]",
        );
    };
    let sel = Selector {
        id: Some(id.clone()),
        ..Selector::default()
    };
    let Some(watched) = s.sessions.registry.list(&sel).await.into_iter().next() else {
        return error(StatusCode::NOT_FOUND, "not_found", "no such session");
    };
    let by = actor(&headers);
    let from = peer.map(|p| p.ip().to_string());
    let issued = match issuer.issue_shadow(&watched) {
        Ok(i) => i,
        Err(ShadowError::Issue(e)) => {
            tracing::error!(session = %id, "shadow not issued: {e}");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the shadow's token could not be issued; see the gateway log",
            );
        }
        Err(e @ ShadowError::Spice) => {
            return error(StatusCode::CONFLICT, "not_shadowable", e.to_string());
        }
        Err(e @ ShadowError::OfAShadow) => {
            return error(StatusCode::CONFLICT, "is_a_shadow", e.to_string());
        }
    };
    crate::metrics::admin_action("shadow");
    tracing::info!(
        session = %id, shadow_jti = %issued.jti, by, from = from.as_deref().unwrap_or("-"),
        node = %watched.node, "shadow issued"
    );
    AuditEvent::admin("shadow_issued", &by, "shadow")
        .field("session", Some(id.as_str()))
        .field("instance", Some(watched.instance.as_str()))
        .field("console", Some(watched.console))
        .field("shadow_jti", Some(issued.jti.as_str()))
        .field("from", from)
        .field("expires_at", Some(issued.expires_at))
        .emit();
    Json(json!({
        "session": id,
        "type": watched.console,
        "url": issued.url.expose(),
        "token": issued.token.expose(),
        "jti": issued.jti,
        "expires_at": issued.expires_at,
    }))
    .into_response()
}

/// `GET /v1/recordings`: this node's recordings, newest first.
pub async fn recordings(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return r.into_response();
    }
    let Some(settings) = s.sessions.recording.as_ref() else {
        return error(
            StatusCode::NOT_FOUND,
            "not_enabled",
            "[recording] is not configured",
        );
    };
    Json(json!({ "node": crate::node::name(), "recordings": settings.list() })).into_response()
}

/// `POST /v1/recordings/{id}/playback`: a link (for five minutes) that plays
/// recording `id` in the console page it was recorded from. Audited.
pub async fn playback(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return r.into_response();
    }
    let (Some(issuer), Some(settings)) = (s.issuer.as_ref(), s.sessions.recording.as_ref()) else {
        return error(
            StatusCode::NOT_IMPLEMENTED,
            "not_enabled",
            "playback needs [recording] and [issuance] (its links are signed with the issuance key)",
        );
    };
    let Some((_, format)) = settings.path_of(&id) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such recording on this node",
        );
    };
    // The page that plays it: the one its console had.
    let console = match format {
        crate::recording::Format::Asciicast => crate::console::ConsoleType::Serial,
        crate::recording::Format::Fbs => crate::console::ConsoleType::Novnc,
        crate::recording::Format::Spice => crate::console::ConsoleType::SpiceHtml5,
    };
    let issued = match issuer.issue_playback(&id, console) {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(recording = %id, "playback not issued: {e}");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the playback's token could not be issued; see the gateway log",
            );
        }
    };
    let by = actor(&headers);
    crate::metrics::admin_action("playback");
    tracing::info!(recording = %id, jti = %issued.jti, by, "playback issued");
    AuditEvent::admin("playback_issued", &by, "playback")
        .field("recording", Some(id.as_str()))
        .field("jti", Some(issued.jti.as_str()))
        .emit();
    Json(json!({
        "recording": id,
        "url": issued.url.expose(),
        "token": issued.token.expose(),
        "expires_at": issued.expires_at,
    }))
    .into_response()
}

/// `GET /v1/recordings/{id}/file`: recording `id`'s file as written, for
/// tools that are not Porthole (`asciinema`, FBS readers). Audited.
pub async fn recording_file(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return r.into_response();
    }
    let Some(settings) = s.sessions.recording.as_ref() else {
        return error(
            StatusCode::NOT_FOUND,
            "not_enabled",
            "[recording] is not configured",
        );
    };
    let Some((path, format)) = settings.path_of(&id) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such recording on this node",
        );
    };
    let mut response = match super::playback::recording_file(&path, format).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(recording = %id, "recording unreadable: {e}");
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                "the recording could not be read",
            );
        }
    };
    let by = actor(&headers);
    crate::metrics::admin_action("download");
    tracing::info!(recording = %id, by, "recording downloaded");
    AuditEvent::admin("recording_downloaded", &by, "download")
        .field("recording", Some(id.as_str()))
        .emit();
    // A flood sharing the caller's address does not cut the download off.
    response
        .extensions_mut()
        .insert(crate::transport::listener::KeepPlaceWhileSent);
    response
}

/// Fills each view's `shadows` from `all` (every live session).
fn with_shadows(mut views: Vec<SessionView>, all: &[SessionView]) -> Vec<SessionView> {
    for v in &mut views {
        v.shadows = all
            .iter()
            .filter(|o| o.shadow_of.as_deref() == Some(v.id.as_str()))
            .map(|o| o.id.clone())
            .collect();
    }
    views
}

/// `?reason=` for DELETE.
#[derive(Debug, Deserialize)]
pub struct ReasonQuery {
    reason: Option<String>,
}

/// `DELETE /v1/sessions/{id}`.
pub async fn kill_one(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ReasonQuery>,
) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return r.into_response();
    }
    let sel = Selector {
        id: Some(id),
        ..Selector::default()
    };
    let ended = terminate(&s, &sel, &actor(&headers), q.reason.as_deref()).await;
    if ended.is_empty() {
        return error(StatusCode::NOT_FOUND, "not_found", "no such session");
    }
    Json(json!({ "terminated": ended })).into_response()
}

/// The body of `POST /v1/sessions/terminate`: a [`Selector`] and its
/// `reason`. Read in two steps rather than through `#[serde(flatten)]`,
/// past which the selector's `deny_unknown_fields` never fires: a misspelt
/// or unknown field (`"instanse"`, or `"target"` on an older node) would be
/// dropped and the rest would end more sessions than the operator named.
fn terminate_body(body: serde_json::Value) -> Result<(Selector, Option<String>), String> {
    let serde_json::Value::Object(mut fields) = body else {
        return Err("a JSON object is expected".into());
    };
    let reason = match fields.remove("reason") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(r)) => Some(r),
        Some(_) => return Err("reason: a string is expected".into()),
    };
    let selector =
        serde_json::from_value(serde_json::Value::Object(fields)).map_err(|e| e.to_string())?;
    Ok((selector, reason))
}

/// `POST /v1/sessions/terminate`.
pub async fn kill_many(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Result<Json<serde_json::Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return r.into_response();
    }
    let (selector, reason) = match body.map(|Json(v)| terminate_body(v)) {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, "bad_request", e),
        Err(e) => return bad_body(&e),
    };
    if selector.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "name the sessions: id, instance, jti, user, type, client or target",
        );
    }
    let ended = terminate(&s, &selector, &actor(&headers), reason.as_deref()).await;
    Json(json!({ "terminated": ended })).into_response()
}

/// Revokes the sessions' tokens, ends the sessions, audits each; returns their ids.
async fn terminate(s: &AdminState, sel: &Selector, by: &str, reason: Option<&str>) -> Vec<String> {
    let reason = reason.unwrap_or("terminated by an operator");
    let listed = announce_ending(s, sel, by, reason).await;
    end_listed(s, sel, listed, by, reason).await
}

/// Lists the sessions `sel` names and says, in the store, who ends them
/// and why. Before any of their tokens is revoked: their nodes may see the
/// revocation before they are told to end them, and then end them in this
/// operator's name too.
async fn announce_ending(
    s: &AdminState,
    sel: &Selector,
    by: &str,
    reason: &str,
) -> Vec<SessionView> {
    let listed = s.sessions.registry.list(sel).await;
    s.sessions.registry.ending(&listed, by, reason).await;
    listed
}

/// Revokes the tokens of the sessions `announce_ending` listed, ends the
/// sessions `sel` names now, audits each; returns their ids.
async fn end_listed(
    s: &AdminState,
    sel: &Selector,
    listed: Vec<SessionView>,
    by: &str,
    reason: &str,
) -> Vec<String> {
    let now = unix_now();
    // A killed session's token is dead: no reconnect, no new channel. It
    // dies before its session ends: a client that sees the close and asks
    // again at once (a page's preflight, a reconnect), through a balancer
    // to any node, must find the revocation already there. Ended first, a
    // session on another node closes while this node still writes it, and
    // its lease is free: the token would open a new session.
    let mut dead = HashSet::new();
    for view in &listed {
        if dead.insert(view.jti.clone()) {
            kill_token(s, &view.jti, now).await;
        }
    }
    let ended = s.sessions.registry.terminate(sel, by, reason).await;
    for live in &ended {
        // One that started between the list and the terminate.
        if dead.insert(live.jti.clone()) {
            kill_token(s, &live.jti, now).await;
        }
        terminated(&live.record(), by, reason);
    }
    // Listed, its token revoked, and gone by the terminate: its node saw
    // the revocation first and ended it (or it ended by itself in between).
    // Ended by this request either way: answered and audited as such.
    let gone: Vec<&SessionView> = listed
        .iter()
        .filter(|v| !ended.iter().any(|l| l.id == v.id))
        .collect();
    for view in &gone {
        terminated(&view.record(), by, reason);
    }
    ended
        .iter()
        .map(|l| l.id.clone())
        .chain(gone.iter().map(|v| v.id.clone()))
        .collect()
}

/// Counts, logs and audits one session an operator ended.
fn terminated(session: &crate::audit::SessionRecord<'_>, by: &str, reason: &str) {
    crate::metrics::admin_action("terminate");
    tracing::info!(session = %session.id, jti = %session.jti, instance = %session.instance, by, reason, "session terminated");
    AuditEvent::admin("session_terminated", by, reason)
        .session(session)
        .emit();
}

/// Revokes `jti` (for as long as a token can be valid) and its unused tickets.
async fn kill_token(s: &AdminState, jti: &str, now: u64) {
    let _ = s
        .validator
        .revocations()
        .revoke_jti(jti, now + s.revoke_for_secs, now)
        .await;
    s.sessions.tickets.revoke_jti(jti).await;
}

/// The body of `POST /v1/revocations`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeBody {
    jti: Option<String>,
    instance: Option<String>,
    reason: Option<String>,
    /// Let the sessions the revoked tokens run go on (default: they end).
    #[serde(default)]
    keep_sessions: bool,
}

/// What a `POST /v1/revocations` revokes.
#[derive(Debug, Clone, Copy)]
enum Revoked<'a> {
    /// One token.
    Jti(&'a str),
    /// Every token of one instance.
    Instance(&'a str),
}

/// `POST /v1/revocations`.
pub async fn revoke(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Result<Json<RevokeBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return r.into_response();
    }
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => return bad_body(&e),
    };
    let by = actor(&headers);
    let reason = body.reason.as_deref().unwrap_or("revoked by an operator");
    let now = unix_now();
    let until = now + s.revoke_for_secs;
    let revocations = s.validator.revocations();
    let named = match (&body.jti, &body.instance) {
        (Some(jti), None) => Revoked::Jti(jti),
        (None, Some(instance)) => Revoked::Instance(instance),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "give exactly one of jti, instance",
            );
        }
    };
    let selector = match named {
        Revoked::Jti(jti) => Selector {
            jti: Some(jti.to_owned()),
            ..Selector::default()
        },
        Revoked::Instance(instance) => Selector {
            instance: Some(instance.to_owned()),
            ..Selector::default()
        },
    };
    // The sessions to end are named before the revocation (as a terminate
    // does): a node that reads the revocation first ends them as this
    // operator's, not as a bare revocation.
    let listed = if body.keep_sessions {
        Vec::new()
    } else {
        announce_ending(&s, &selector, &by, reason).await
    };
    let result = match named {
        Revoked::Jti(jti) => {
            s.sessions.tickets.revoke_jti(jti).await;
            if body.keep_sessions {
                revocations
                    .revoke_jti_keeping_sessions(jti, until, now)
                    .await
            } else {
                revocations.revoke_jti(jti, until, now).await
            }
        }
        Revoked::Instance(instance) => revocations.revoke_instance(instance, until, now).await,
    };
    if let Err(e) = result {
        s.sessions.registry.not_ending(&listed).await;
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        );
    }
    crate::metrics::admin_action("revoke");
    tracing::info!(
        jti = body.jti.as_deref().unwrap_or("-"),
        instance = body.instance.as_deref().unwrap_or("-"),
        by,
        reason,
        "tokens revoked"
    );
    AuditEvent::admin("tokens_revoked", &by, reason)
        .field("jti", body.jti.clone())
        .field("instance", body.instance.clone())
        .emit();
    let ended = if body.keep_sessions {
        Vec::new()
    } else {
        end_listed(&s, &selector, listed, &by, reason).await
    };
    Json(json!({ "revoked_until": until, "terminated": ended })).into_response()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::terminate_body;

    #[test]
    fn a_terminate_body_names_its_sessions_with_known_fields_only() {
        let (sel, reason) = terminate_body(json!({
            "type": "spice-direct",
            "target": "10.0.3.17:5930",
            "reason": "host maintenance",
        }))
        .unwrap();
        assert_eq!(sel.console.as_deref(), Some("spice-direct"));
        assert_eq!(sel.target.as_deref(), Some("10.0.3.17:5930"));
        assert_eq!(reason.as_deref(), Some("host maintenance"));
        // Dropped, the misspelt field would leave `type` alone: every
        // spice-direct session would end.
        let misspelt = terminate_body(json!({"type": "spice-direct", "instanse": "vm-1"}));
        assert!(misspelt.unwrap_err().contains("instanse"));
        assert!(terminate_body(json!({"jti": "j", "reason": 7})).is_err());
        assert!(terminate_body(json!(["jti"])).is_err());
        let (sel, reason) = terminate_body(json!({"jti": "j", "reason": null})).unwrap();
        assert_eq!((sel.jti.as_deref(), reason), (Some("j"), None));
    }
}
