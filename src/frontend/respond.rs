//! How the front ends say no: the admin API's JSON error bodies, and the
//! public routes' refusals (a status and a short code, the words the pages
//! show).

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::session::OpenError;
use crate::token::RefusalReason;

/// A JSON error body: a stable code and a human message.
pub(crate) fn error(
    status: StatusCode,
    code: &'static str,
    message: impl Into<String>,
) -> Response {
    (
        status,
        Json(json!({ "error": { "code": code, "message": message.into() } })),
    )
        .into_response()
}

/// The answer to a body that is not the JSON a call takes: 413 past the
/// admin API's body limit, 400 otherwise.
pub(crate) fn bad_body(e: &JsonRejection) -> Response {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.body_text())
    } else {
        error(StatusCode::BAD_REQUEST, "bad_request", e.body_text())
    }
}

/// A refusal as the client sees it: a status and a short code.
pub(crate) fn refuse(status: StatusCode, code: &'static str) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({ "error": code })),
    )
        .into_response()
}

/// A refused token, as the client sees it.
pub(crate) fn refusal_response(reason: RefusalReason) -> Response {
    let status = StatusCode::from_u16(reason.http_status()).unwrap_or(StatusCode::FORBIDDEN);
    refuse(status, reason.client_code())
}

/// A session that could not be opened, as the client sees it.
pub(crate) fn open_error_response(e: &OpenError) -> Response {
    match e {
        OpenError::Refused(r) => refusal_response(r.reason),
        OpenError::Busy => refuse(StatusCode::CONFLICT, "busy"),
        OpenError::Limited(_) => refuse(StatusCode::TOO_MANY_REQUESTS, "busy"),
        OpenError::Overloaded
        | OpenError::ShuttingDown
        | OpenError::Unavailable(_)
        | OpenError::ShadowUnreachable => refuse(StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        OpenError::Unreachable(_) => refuse(StatusCode::BAD_GATEWAY, "unavailable"),
        OpenError::ShadowedEnded => refuse(StatusCode::GONE, "ended"),
    }
}
