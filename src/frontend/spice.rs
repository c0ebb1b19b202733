//! SPICE front ends: the ticket exchange (the native listeners are
//! [`super::serve_native`]'s).
//!
//! - The TLS listener hands every connection to the session layer, which
//!   runs TLS and the SPICE link under one deadline and proxies the channel
//!   ([`crate::session::spice`]) for native clients such as remote-viewer.
//! - The plain listener, if enabled, answers every link with NEED_SECURED:
//!   clients retry on the TLS port, and no ticket ever travels in clear.
//! - The exchange (`GET /spice-direct?token=`) turns a `spice-direct` token
//!   into connection details with a fresh ticket: a `.vv` file that
//!   remote-viewer opens as it is, or JSON. `POST /spice-ticket?token=` does
//!   the same for the spice-html5 page, which passes the ticket to
//!   spice-html5 as its password.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::respond::{open_error_response, refusal_response, refuse};
use super::state::{ClientAddr, PublicState, SpiceDetails, TokenQuery};
use crate::console::ConsoleType;

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
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    Query(f): Query<FormatQuery>,
) -> Response {
    let Some(d) = s.spice.clone() else {
        return refuse(StatusCode::NOT_IMPLEMENTED, "unavailable");
    };
    if d.tls_port.is_none() {
        // No listener to send a native client to.
        return refuse(StatusCode::NOT_IMPLEMENTED, "unavailable");
    }
    let (grant, ticket, expires_at) =
        match exchange(&s, client, q.token(), ConsoleType::SpiceDirect).await {
            Ok(t) => t,
            Err(r) => return r,
        };
    connection_details(
        &d,
        &headers,
        &f,
        &grant.instance,
        ticket.expose(),
        expires_at,
    )
}

/// The connection details a native client needs, as a `.vv` (default) or
/// JSON (`?format=json`, or an `Accept` naming it).
pub(crate) fn connection_details(
    d: &SpiceDetails,
    headers: &HeaderMap,
    f: &FormatQuery,
    title: &str,
    ticket: &str,
    expires_at: u64,
) -> Response {
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
            ticket,
            ticket_expires_at: expires_at,
            instance: title,
        };
        return ([no_store], axum::Json(body)).into_response();
    }
    let vv = virt_viewer_file(d, ticket, title);
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
pub async fn spice_ticket(
    State(s): State<PublicState>,
    ClientAddr(client): ClientAddr,
    Query(q): Query<TokenQuery>,
) -> Response {
    if s.spice.is_none() {
        return refuse(StatusCode::NOT_IMPLEMENTED, "unavailable");
    }
    match exchange(&s, client, q.token(), ConsoleType::SpiceHtml5).await {
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

/// Resolves the token for `kind`, and has the session layer check it under
/// its reuse policy and issue a ticket bound to its grant.
#[allow(clippy::result_large_err)]
pub(crate) async fn exchange(
    s: &PublicState,
    client: std::net::IpAddr,
    token: Option<&str>,
    kind: ConsoleType,
) -> Result<Exchanged, Response> {
    let Some(token) = token else {
        return Err(refuse(StatusCode::UNAUTHORIZED, "refused"));
    };
    let grant = s
        .sessions
        .resolve(token, Some(kind), Some(client))
        .await
        .map_err(|r| refusal_response(r.reason))?;
    let (ticket, expires_at) = s
        .sessions
        .exchange(&grant, client)
        .await
        .map_err(|e| open_error_response(&e))?;
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
