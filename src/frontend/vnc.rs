//! The native VNC front end (vnc-direct): a listener where native clients
//! (TigerVNC, gtk-vnc viewers) speak RFB and are offered only VeNCrypt
//! X509Plain, with a ticket as the password; and the exchange that gives
//! them one (`GET /vnc-direct?token=`, JSON).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::respond::refuse;
use super::state::{ClientAddr, PublicState, TokenQuery};
use crate::console::ConsoleType;
use crate::session::Sessions;
use crate::transport::listener::ProxyHeaders;

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

/// Accepts native VNC clients until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    sessions: Arc<Sessions>,
    stop: CancellationToken,
    proxy: ProxyHeaders,
) {
    let handshake = sessions.limits.vnc_handshake;
    super::serve_native(
        listener,
        sessions,
        stop,
        handshake,
        proxy,
        crate::session::vnc::serve_native,
    )
    .await;
}
