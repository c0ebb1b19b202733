//! The native VNC front end (vnc-direct): a listener where native clients
//! (TigerVNC, gtk-vnc viewers) speak RFB and are offered only VeNCrypt
//! X509Plain, with a ticket as the password ([`super::serve_native`]); and
//! the exchange that gives them one (`GET /vnc-direct?token=`, JSON).

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::respond::refuse;
use super::state::{ClientAddr, PublicState, TokenQuery};
use crate::console::ConsoleType;

#[derive(Debug, Serialize)]
struct ConnectionDetails<'a> {
    r#type: &'static str,
    host: &'a str,
    port: u16,
    security: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<&'a str>,
    username: &'static str,
    ticket: &'a str,
    ticket_expires_at: u64,
    instance: &'a str,
}

/// `GET /vnc-direct?token=`: connection details and a ticket (the VNC
/// password) for a `vnc-direct` token.
pub async fn vnc_direct(
    State(s): State<PublicState>,
    ClientAddr(client): ClientAddr,
    Query(q): Query<TokenQuery>,
) -> Response {
    let Some(port) = s.vnc.port else {
        return refuse(StatusCode::NOT_IMPLEMENTED, "unavailable");
    };
    let (grant, ticket, expires_at) =
        match super::spice::exchange(&s, client, q.token(), ConsoleType::VncDirect).await {
            Ok(t) => t,
            Err(r) => return r,
        };
    let body = ConnectionDetails {
        r#type: "vnc",
        host: &s.vnc.host,
        port,
        security: "VeNCrypt X509Plain",
        ca: s.vnc.ca_pem.as_deref(),
        username: "porthole",
        ticket: ticket.expose(),
        ticket_expires_at: expires_at,
        instance: &grant.instance,
    };
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(body)).into_response()
}
