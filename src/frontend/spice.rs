//! SPICE front ends: the native listeners and the ticket exchange.
//!
//! - The TLS listener speaks SPICE (inside rustls) to native clients such as
//!   remote-viewer; every channel goes through the link proxy
//!   ([`crate::session::spice`]).
//! - The plain listener, if enabled, answers every link with NEED_SECURED:
//!   clients retry on the TLS port, and no ticket ever travels in clear.
//! - The exchange (`GET /spice-direct?token=`) turns a `spice-direct` token
//!   into connection details with a fresh ticket: a `.vv` file that
//!   remote-viewer opens as it is, or JSON. `POST /spice-ticket?token=` does
//!   the same for the spice-html5 page, which passes the ticket to
//!   spice-html5 as its password.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::public::{PublicState, TokenQuery, open_error_response, refusal_response, refuse};
use crate::session::spice::{ClientLeg, SpiceProxy};
use crate::token::{ConsoleType, unix_now};

/// What native clients are told about Porthole's SPICE listener.
#[derive(Debug, Clone, Default)]
pub struct SpiceDetails {
    /// Host clients connect to.
    pub host: String,
    /// Porthole's SPICE TLS port, when the listener is on.
    pub tls_port: Option<u16>,
    /// Porthole's plain SPICE port (NEED_SECURED only), when on.
    pub port: Option<u16>,
    /// The CA certificate (PEM) to trust, when not a public one.
    pub ca_pem: Option<String>,
    /// The certificate's subject, for clients that check it instead of the host.
    pub host_subject: Option<String>,
}

/// The SPICE side of the public listener.
#[derive(Debug)]
pub struct SpiceFront {
    /// The link proxy.
    pub proxy: Arc<SpiceProxy>,
    /// Connection details for native clients.
    pub details: SpiceDetails,
    /// Time-to-live of a fresh ticket.
    pub ticket_ttl_secs: u64,
}

/// The JSON form of the connection details.
#[derive(Debug, Serialize)]
struct ConnectionDetails<'a> {
    r#type: &'static str,
    host: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    tls_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host_subject: Option<&'a str>,
    ticket: &'a str,
    ticket_expires_at: u64,
    instance: &'a str,
}

/// `?format=vv|json` beside the token.
#[derive(Debug, Deserialize)]
pub struct FormatQuery {
    format: Option<String>,
}

/// Every SPICE channel over TLS, so that virt-viewer never falls back to clear.
const SECURE_CHANNELS: &str = "main;display;inputs;cursor;playback;record;smartcard;usbredir";

/// `GET /spice-direct?token=`: connection details and a ticket for a
/// `spice-direct` token, as a `.vv` file (default) or JSON.
pub async fn spice_direct(
    State(s): State<PublicState>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    Query(f): Query<FormatQuery>,
) -> Response {
    let Some(front) = s.spice.clone() else {
        return refuse(StatusCode::NOT_IMPLEMENTED, "unavailable");
    };
    if front.details.tls_port.is_none() {
        // No listener to send a native client to.
        return refuse(StatusCode::NOT_IMPLEMENTED, "unavailable");
    }
    let (grant, ticket, expires_at) =
        match exchange(&s, &front, q.token(), ConsoleType::SpiceDirect) {
            Ok(t) => t,
            Err(r) => return r,
        };
    let d = &front.details;
    let wants_json = match f.format.as_deref() {
        Some("json") => true,
        Some("vv") => false,
        Some(_) => return refuse(StatusCode::BAD_REQUEST, "bad_format"),
        None => headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("application/json")),
    };
    let no_store = (header::CACHE_CONTROL, "no-store");
    if wants_json {
        let body = ConnectionDetails {
            r#type: "spice",
            host: &d.host,
            port: d.port,
            tls_port: d.tls_port,
            ca: d.ca_pem.as_deref(),
            host_subject: d.host_subject.as_deref(),
            ticket: ticket.expose(),
            ticket_expires_at: expires_at,
            instance: &grant.instance,
        };
        return ([no_store], axum::Json(body)).into_response();
    }
    let vv = virt_viewer_file(d, ticket.expose(), &grant.instance);
    (
        [
            no_store,
            (header::CONTENT_TYPE, "application/x-virt-viewer"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"console.vv\"",
            ),
        ],
        vv,
    )
        .into_response()
}

/// `POST /spice-ticket?token=`: a ticket for a `spice-html5` token (the
/// console page hands it to spice-html5 as the SPICE password).
pub async fn spice_ticket(State(s): State<PublicState>, Query(q): Query<TokenQuery>) -> Response {
    let Some(front) = s.spice.clone() else {
        return refuse(StatusCode::NOT_IMPLEMENTED, "unavailable");
    };
    match exchange(&s, &front, q.token(), ConsoleType::SpiceHtml5) {
        Ok((_, ticket, expires_at)) => (
            [(header::CACHE_CONTROL, "no-store")],
            axum::Json(serde_json::json!({
                "ticket": ticket.expose(),
                "ticket_expires_at": expires_at,
            })),
        )
            .into_response(),
        Err(r) => r,
    }
}

pub(crate) type Exchanged = (crate::token::Grant, crate::secret::Secret<String>, u64);

/// Validates the token for `kind`, redeems it under its reuse policy and
/// issues a ticket bound to its grant.
#[allow(clippy::result_large_err)]
pub(crate) fn exchange(
    s: &PublicState,
    front: &SpiceFront,
    token: Option<&str>,
    kind: ConsoleType,
) -> Result<Exchanged, Response> {
    let Some(token) = token else {
        return Err(refuse(StatusCode::UNAUTHORIZED, "refused"));
    };
    let grant = s
        .validator
        .validate(token, Some(kind))
        .map_err(|r| refusal_response(r.reason))?;
    s.sessions
        .redeem_for_ticket(&grant)
        .map_err(|e| open_error_response(&e))?;
    let now = unix_now();
    let ticket = front
        .proxy
        .tickets
        .issue(grant.clone(), front.ticket_ttl_secs, now)
        .map_err(|e| {
            tracing::warn!(jti = %grant.jti, "no ticket issued: {e}");
            refuse(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        })?;
    crate::metrics::ticket_issued(kind.as_str());
    let expires_at = (now + front.ticket_ttl_secs).min(grant.expires_at);
    tracing::info!(jti = %grant.jti, instance = %grant.instance, console = %kind, "ticket issued");
    Ok((grant, ticket, expires_at))
}

/// A `.vv` file for remote-viewer. Values come from config and a signed
/// token; line breaks in them could still add keys, so they are dropped.
fn virt_viewer_file(d: &SpiceDetails, ticket: &str, instance: &str) -> String {
    let clean = |v: &str| v.chars().filter(|c| !c.is_control()).collect::<String>();
    let mut vv = String::from("[virt-viewer]\ntype=spice\n");
    vv.push_str(&format!("host={}\n", clean(&d.host)));
    if let Some(p) = d.tls_port {
        vv.push_str(&format!("tls-port={p}\n"));
    }
    vv.push_str(&format!("password={}\n", clean(ticket)));
    if let Some(ca) = &d.ca_pem {
        // The PEM on one line, its line breaks written as `\n`.
        vv.push_str(&format!(
            "ca={}\n",
            ca.trim_end().replace('\r', "").replace('\n', "\\n")
        ));
    }
    if let Some(subject) = &d.host_subject {
        vv.push_str(&format!("host-subject={}\n", clean(subject)));
    }
    vv.push_str(&format!("secure-channels={SECURE_CHANNELS}\n"));
    vv.push_str(&format!("title={} (Porthole)\n", clean(instance)));
    vv.push_str("delete-this-file=1\n");
    vv
}

/// Accepts native SPICE clients over TLS until `stop` fires.
pub async fn serve_tls(
    listener: TcpListener,
    tls: crate::transport::listener::TlsSlot,
    proxy: Arc<SpiceProxy>,
    handshake_timeout: Duration,
    stop: CancellationToken,
) {
    let tracker = proxy.sessions.tracker.clone();
    accept_loop(listener, stop, tracker, move |tcp, peer| {
        // The certificate in force now: a reload takes effect for the next client.
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
        let proxy = proxy.clone();
        async move {
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    crate::metrics::spice_link_refused("tls_handshake", "client");
                    tracing::info!(client = %peer, "spice tls handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    crate::metrics::spice_link_refused("handshake_timeout", "client");
                    return;
                }
            };
            proxy.serve(tls, peer.ip(), ClientLeg::Native).await;
        }
    })
    .await;
}

/// Answers every link on a plain port with NEED_SECURED until `stop` fires.
pub async fn serve_plain(
    listener: TcpListener,
    proxy: Arc<SpiceProxy>,
    handshake_timeout: Duration,
    stop: CancellationToken,
) {
    let tracker = proxy.sessions.tracker.clone();
    accept_loop(listener, stop, tracker, move |tcp, _peer| async move {
        SpiceProxy::need_secured(tcp, handshake_timeout).await;
    })
    .await;
}

/// Accepts until `stop` fires; each connection runs `handle` as a tracked
/// session task (shutdown waits for them).
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    stop: CancellationToken,
    tracker: tokio_util::task::TaskTracker,
    handle: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            got = listener.accept() => match got {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        tracker.spawn(handle(tcp, peer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vv_file_has_the_keys_remote_viewer_reads_and_no_injected_lines() {
        let d = SpiceDetails {
            host: "127.0.0.1".into(),
            tls_port: Some(6084),
            port: None,
            ca_pem: Some("-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n".into()),
            host_subject: Some("O=Porthole,CN=localhost".into()),
        };
        let vv = virt_viewer_file(&d, "T1cket", "vm-1\nhost=evil.example");
        let lines: Vec<&str> = vv.lines().collect();
        assert_eq!(lines[0], "[virt-viewer]");
        assert!(lines.contains(&"type=spice"));
        assert!(lines.contains(&"host=127.0.0.1"));
        assert!(lines.contains(&"tls-port=6084"));
        assert!(lines.contains(&"password=T1cket"));
        assert!(
            lines.contains(&"ca=-----BEGIN CERTIFICATE-----\\nAAA\\n-----END CERTIFICATE-----")
        );
        assert!(lines.contains(&"host-subject=O=Porthole,CN=localhost"));
        assert!(lines.contains(&"delete-this-file=1"));
        assert_eq!(
            lines.iter().filter(|l| l.starts_with("host=")).count(),
            1,
            "a line break in the instance id adds no key"
        );
        assert!(
            !lines.iter().any(|l| l.starts_with("port=")),
            "no clear port"
        );
    }
}
