//! The public listener: console pages, static files and the WebSocket endpoints.
//!
//! Every WebSocket endpoint serves one console type (`/vnc` and noVNC's
//! default `/websockify` for `novnc`, `/serial` for `serial`, `/spice` for a
//! spice-html5 channel). A request is checked *before* the upgrade, in this
//! order: Origin, then the session layer: the token (signature, claims,
//! console type, allow-list, revocation), then admission (slot, caps, reuse
//! policy, console claim, hypervisor connect; for spice-html5, whose ticket
//! comes inside the socket, only what a ticketed channel would get). Any
//! refusal is an HTTP error with a short code; a noVNC or serial socket is
//! only accepted once the hypervisor is connected. After the 101 the
//! session layer owns the socket. A GET without upgrade headers is a
//! *preflight*: it answers what an upgrade would get, without starting a
//! session, so a page can tell its user why a socket failed (browsers hide
//! the status of a failed upgrade).

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::Router;
use axum::extract::{ConnectInfo, Extension, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;

use super::respond::{open_error_response, refusal_response, refuse};
use super::state::{ClientAddr, PublicState, TokenQuery, client_addr};
use super::{spice, vnc, xterm};
use crate::config::ListenConfig;
use crate::console::ConsoleType;
use crate::session::admission::WatchedUnknown;
use crate::token::RefusalReason;
use crate::transport::listener::AfterUpgrade;

/// The public router.
pub fn router(state: PublicState) -> Router {
    let no_dirs = |dir: PathBuf| {
        // No index files, so no directory redirects at all: nothing here can
        // turn `//evil.example` into a Location header (Nova's CVE-2021-3654).
        ServeDir::new(dir).append_index_html_on_directories(false)
    };
    let statics = Router::new()
        .nest_service("/static", no_dirs(state.web.root.join("static")))
        .nest_service("/vendor/novnc", no_dirs(state.web.novnc_dir.clone()))
        .nest_service(
            "/vendor/spice-html5",
            no_dirs(state.web.spice_html5_dir.clone()),
        )
        .merge(xterm::routes(&state.web.xterm_dir, no_dirs))
        .nest_service(
            "/vendor/asciinema-player",
            no_dirs(state.web.root.join(super::playback::PLAYER_DIR)),
        )
        .layer(SetResponseHeaderLayer::overriding(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=300"),
        ))
        // noVNC's and spice-html5's own pages (what Nova's URLs open) may be
        // framed by the allowed origins only (Horizon's console iframe),
        // like Porthole's pages; nothing else about them is restricted.
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_str(&format!(
                "frame-ancestors {}",
                frame_ancestors(&state.listen)
            ))
            .unwrap_or_else(|_| HeaderValue::from_static("frame-ancestors 'self'")),
        ));
    let mut pages = Router::new().route("/console", get(|s, c, q| console_page(None, s, c, q)));
    // A Nova token names no console type: the URL Nova hands out must.
    // Siblings of `/console`, so the page's relative URLs resolve alike.
    for kind in ConsoleType::ALL {
        if let Some(route) = kind.page_route() {
            pages = pages.route(route, get(move |s, c, q| console_page(Some(kind), s, c, q)));
        }
    }
    pages
        .route(
            "/readyz",
            get(|State(s): State<PublicState>| async move { s.readiness.answer() }),
        )
        .route(
            "/vnc",
            get(|s, c, a, h, q, w| ws_endpoint(ConsoleType::Novnc, s, c, a, h, q, w)),
        )
        .route("/websockify", get(websockify))
        .route(
            "/serial",
            get(|s, c, a, h, q, w| ws_endpoint(ConsoleType::Serial, s, c, a, h, q, w)),
        )
        .route(
            "/spice",
            get(|s, c, a, h, q, w| ws_endpoint(ConsoleType::SpiceHtml5, s, c, a, h, q, w)),
        )
        .route("/watched", get(watched))
        .route("/playback", get(super::playback::page_or_player))
        .route("/playback/file", get(super::playback::file))
        .route("/playback/serial", get(super::playback::serial))
        .route("/playback/vnc", get(super::playback::vnc))
        .route("/playback/spice", get(super::playback::spice))
        .route("/playback/vv", get(super::playback::vv))
        .route("/spice-direct", get(spice::spice_direct))
        .route("/spice-ticket", post(spice::spice_ticket))
        .route("/vnc-direct", get(vnc::vnc_direct))
        .merge(statics)
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .with_state(state)
}

/// Why a request's Origin may not open a console socket.
#[derive(Debug, thiserror::Error)]
pub(super) enum OriginRefusal {
    #[error("no Origin header")]
    Missing,
    #[error("unreadable Origin")]
    Unreadable,
    #[error("origin {0:?} not allowed")]
    NotAllowed(String),
    /// A browser sends one Origin; which of several a check should read
    /// is a guess, and a proxy may have read another.
    #[error("more than one Origin header")]
    Ambiguous,
    /// RFC 9112 §3.2: a request with more than one Host is answered 400.
    #[error("more than one Host header")]
    DuplicateHost,
}

impl OriginRefusal {
    /// The refusal's reason in metrics and the audit trail, and its status.
    pub(super) fn reason(&self) -> (&'static str, StatusCode) {
        match self {
            Self::Ambiguous => ("ambiguous_origin", StatusCode::BAD_REQUEST),
            Self::DuplicateHost => ("duplicate_host", StatusCode::BAD_REQUEST),
            _ => ("origin_not_allowed", StatusCode::FORBIDDEN),
        }
    }
}

/// Whether the request's Origin may open a console socket. The list is fixed
/// at start; nothing in a request (Host, X-Forwarded-Host) can add to it.
pub(super) fn origin_allowed(
    headers: &HeaderMap,
    listen: &ListenConfig,
) -> Result<(), OriginRefusal> {
    if headers.get_all(header::HOST).iter().nth(1).is_some() {
        return Err(OriginRefusal::DuplicateHost);
    }
    let mut origins = headers.get_all(header::ORIGIN).iter();
    match (origins.next(), origins.next()) {
        (Some(_), Some(_)) => Err(OriginRefusal::Ambiguous),
        (None, _) if listen.allow_missing_origin => Ok(()),
        (None, _) => Err(OriginRefusal::Missing),
        (Some(v), None) => {
            let origin = v.to_str().map_err(|_| OriginRefusal::Unreadable)?;
            let normalized = crate::config::origin_of(origin).unwrap_or_default();
            if !normalized.is_empty() && listen.allowed_origins.contains(&normalized) {
                Ok(())
            } else {
                Err(OriginRefusal::NotAllowed(printable(origin)))
            }
        }
    }
}

/// Peer-controlled text bound for a log line: short and printable.
fn printable(s: &str) -> String {
    s.chars()
        .take(120)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

async fn ws_endpoint(
    kind: ConsoleType,
    State(s): State<PublicState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(after): Extension<AfterUpgrade>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    mut request: Request,
) -> Response {
    let client = client_addr(peer, &headers, &s.listen);
    if let Err(why) = origin_allowed(&headers, &s.listen) {
        let (reason, status) = why.reason();
        crate::metrics::session_refused(reason);
        if crate::audit::refusal_log_allowed() {
            crate::audit::refused("websocket", reason, None, Some(client));
            tracing::info!(%client, console = %kind, "websocket refused: {why}");
        }
        return refuse(status, "refused");
    }
    // Debian's spice_auto.html (what Nova's spice-html5 URLs open) leaves
    // the token in a cookie; only the spice-html5 socket reads it, only on
    // an upgrade (browsers always send an Origin with those; a plain GET may
    // come without one, from any page) and only past the Origin check above
    // (cross-site WebSocket hijacking rides on cookies: Nova's CVE-2015-0259).
    let handshake = websocket_handshake(&headers);
    let cookie = || {
        (kind == ConsoleType::SpiceHtml5 && handshake.is_some())
            .then(|| cookie_token(&headers))
            .flatten()
    };
    let Some(token) = q.token().or_else(cookie) else {
        crate::metrics::session_refused("no_token");
        return refuse(StatusCode::UNAUTHORIZED, "refused");
    };
    let grant = match s.sessions.resolve(token, Some(kind), Some(client)).await {
        Ok(g) => g,
        Err(r) => return refusal_response(r.reason),
    };
    if kind == ConsoleType::SpiceHtml5 && s.spice.is_none() {
        return refuse(StatusCode::NOT_IMPLEMENTED, "unavailable");
    }
    let Some(handshake) = handshake else {
        // A preflight: say what an upgrade would get, start nothing.
        return match s.sessions.would_admit_browser(&grant).await {
            Ok(()) => (
                StatusCode::OK,
                axum::Json(serde_json::json!({ "status": "ok" })),
            )
                .into_response(),
            Err(e) => open_error_response(&e),
        };
    };
    if handshake.offered_other && !handshake.binary {
        // websockify's `base64` (or anything else): Porthole speaks binary
        // frames only, and says so instead of pretending to agree.
        crate::metrics::session_refused("unsupported_subprotocol");
        return refuse(StatusCode::BAD_REQUEST, "unsupported_subprotocol");
    }
    match s.sessions.admit_browser(grant, client).await {
        Ok(admitted) => {
            admitted.start(hyper::upgrade::on(&mut request), &after);
            switching_protocols(&handshake)
        }
        Err(e) => open_error_response(&e),
    }
}

/// `GET /watched?token=`: whether an operator's shadow watches the session
/// of this token now, for its page to say so (`[sessions] tell_watched`;
/// `{"told": false}` when the operator keeps it quiet). Only the token's
/// holder can ask, and learns nothing else.
async fn watched(
    State(s): State<PublicState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
) -> Response {
    let Some(token) = q.token() else {
        return refuse(StatusCode::UNAUTHORIZED, "refused");
    };
    let body = match s.sessions.watched(token).await {
        Ok(Some(told)) => {
            serde_json::json!({ "told": true, "watched": told.watched, "recorded": told.recorded })
        }
        Ok(None) => serde_json::json!({ "told": false }),
        Err(WatchedUnknown::NotGenuine) => {
            let client = client_addr(peer, &headers, &s.listen);
            tracing::debug!(%client, "watched? asked with a token that is not genuine");
            return refuse(StatusCode::UNAUTHORIZED, "refused");
        }
        // Not "no": the page keeps what it showed and asks again.
        Err(WatchedUnknown::StoreUnanswered) => {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
        }
    };
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        axum::Json(body),
    )
        .into_response()
}

/// `/websockify`: noVNC's default path (`?path=websockify?token=…`), and
/// the one Debian's spice_auto.html opens with its token in a cookie and
/// none in the URL: then it is a spice-html5 channel.
async fn websockify(
    s: State<PublicState>,
    c: ConnectInfo<SocketAddr>,
    a: Extension<AfterUpgrade>,
    headers: HeaderMap,
    q: Query<TokenQuery>,
    request: Request,
) -> Response {
    let carries_cookie =
        cookie_token(&headers).is_some() && websocket_handshake(&headers).is_some();
    let kind = if q.token().is_none() && carries_cookie {
        ConsoleType::SpiceHtml5
    } else {
        ConsoleType::Novnc
    };
    ws_endpoint(kind, s, c, a, headers, q, request).await
}

/// The `token` cookie's value (RFC 6265 §5.4 `name=value` pairs split by
/// `;`), the first one if several are sent.
fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix("token="))
        .map(|v| v.trim_matches('"'))
        .filter(|v| !v.is_empty())
}

/// The 101 answer to a checked upgrade request.
pub(super) fn switching_protocols(handshake: &Handshake) -> Response {
    let mut response = (StatusCode::SWITCHING_PROTOCOLS, ()).into_response();
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&handshake.accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if handshake.binary {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("binary"),
        );
    }
    response
}

/// What a valid WebSocket upgrade request (RFC 6455 §4.2.1) asks for.
pub(super) struct Handshake {
    /// `Sec-WebSocket-Accept` for the response.
    accept: String,
    /// The client offered the `binary` subprotocol (spice-html5, websockify
    /// clients); noVNC 1.3 offers none, and then none is answered.
    binary: bool,
    /// The client offered subprotocols (any).
    offered_other: bool,
}

/// Checks the upgrade headers; `None` means this is not a WebSocket request.
pub(super) fn websocket_handshake(headers: &HeaderMap) -> Option<Handshake> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return None;
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION)?.as_bytes() != b"13" {
        return None;
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY)?;
    Some(Handshake {
        accept: derive_accept_key(key.as_bytes()),
        binary: has_token(header::SEC_WEBSOCKET_PROTOCOL, "binary"),
        offered_other: headers.contains_key(header::SEC_WEBSOCKET_PROTOCOL),
    })
}

/// `'self'` and the allowed origins: who may frame a console page.
fn frame_ancestors(listen: &ListenConfig) -> String {
    let mut v = vec!["'self'"];
    v.extend(listen.allowed_origins.iter().map(String::as_str));
    v.join(" ")
}

/// The console page for the token's type (or the route's, `kind`); a
/// refused token gets a page saying so.
async fn console_page(
    kind: Option<ConsoleType>,
    State(s): State<PublicState>,
    ClientAddr(client): ClientAddr,
    Query(q): Query<TokenQuery>,
) -> Response {
    let resolved = match q.token() {
        Some(t) => Some(s.sessions.resolve(t, kind, Some(client)).await),
        None => None,
    };
    let page = match resolved {
        None => Err(("refused", StatusCode::UNAUTHORIZED)),
        Some(Err(r)) => Err((
            r.reason.client_code(),
            StatusCode::from_u16(r.reason.http_status()).unwrap_or(StatusCode::FORBIDDEN),
        )),
        Some(Ok(g)) => match g.console {
            ConsoleType::Novnc => Ok("vnc.html"),
            ConsoleType::Serial => Ok("serial.html"),
            ConsoleType::SpiceHtml5 if s.spice.is_some() => Ok("spice.html"),
            ConsoleType::SpiceHtml5 => Err(("unavailable", StatusCode::NOT_IMPLEMENTED)),
            // Native-client types have no browser page: refused here like
            // everywhere but their own endpoint.
            ConsoleType::SpiceDirect | ConsoleType::VncDirect => {
                crate::metrics::token_refused(RefusalReason::WrongConsoleType.as_str());
                Err((
                    RefusalReason::WrongConsoleType.client_code(),
                    StatusCode::FORBIDDEN,
                ))
            }
        },
    };
    let (file, status, code) = match page {
        Ok(file) => (file, StatusCode::OK, ""),
        Err((code, status)) => ("refused.html", status, code),
    };
    serve_page(&s, file, status, code).await
}

/// A page of `web/pages`, with `code` (one of a fixed set of words) as its
/// `{{reason}}`, and the console pages' headers.
pub(super) async fn serve_page(
    s: &PublicState,
    file: &str,
    status: StatusCode,
    code: &'static str,
) -> Response {
    page_with(s, file, status, code, "'self'").await
}

/// [`serve_page`] (200, no reason) for a page whose scripts need more
/// than `script-src 'self'`: `scripts` is that source list.
pub(super) async fn serve_page_with_scripts(
    s: &PublicState,
    file: &str,
    scripts: &'static str,
) -> Response {
    page_with(s, file, StatusCode::OK, "", scripts).await
}

/// The page, its `{{reason}}` and headers, with `script-src` `scripts`.
async fn page_with(
    s: &PublicState,
    file: &str,
    status: StatusCode,
    code: &'static str,
    scripts: &'static str,
) -> Response {
    let path = s.web.root.join("pages").join(file);
    let html = match tokio::fs::read_to_string(&path).await {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("cannot read {}: {e}", path.display());
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, "unavailable");
        }
    };
    // The code is one of a fixed set of words: safe to put in the page.
    let html = html.replace("{{reason}}", code);
    let csp = format!(
        "default-src 'none'; script-src {scripts}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
         font-src 'self'; connect-src 'self'; media-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors {}",
        frame_ancestors(&s.listen)
    );
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8".to_string()),
            (header::CACHE_CONTROL, "no-store".to_string()),
            (header::CONTENT_SECURITY_POLICY, csp),
        ],
        html,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::state::tests::listen;

    fn with_origin(o: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, o.parse().unwrap());
        h
    }

    #[test]
    fn origins_match_exactly_after_normalisation() {
        let l = listen(
            &[
                "https://consoles.example.com",
                "https://dash.example.com:8443",
            ],
            &[],
            false,
        );
        assert!(origin_allowed(&with_origin("https://consoles.example.com"), &l).is_ok());
        assert!(origin_allowed(&with_origin("https://CONSOLES.example.com:443"), &l).is_ok());
        assert!(origin_allowed(&with_origin("https://dash.example.com:8443"), &l).is_ok());
        for bad in [
            "https://consoles.example.com.evil.net",
            "http://consoles.example.com",
            "https://dash.example.com",
            "null",
            "https://evil.net",
        ] {
            assert!(origin_allowed(&with_origin(bad), &l).is_err(), "{bad}");
        }
        assert!(origin_allowed(&HeaderMap::new(), &l).is_err());
        assert!(origin_allowed(&HeaderMap::new(), &listen(&[], &[], true)).is_ok());
    }

    #[test]
    fn two_origins_or_two_hosts_are_refused_whichever_comes_first() {
        let l = listen(&["https://consoles.example.com"], &[], true);
        for pair in [
            ["https://consoles.example.com", "https://evil.net"],
            ["https://evil.net", "https://consoles.example.com"],
            [
                "https://consoles.example.com",
                "https://consoles.example.com",
            ],
        ] {
            let mut h = with_origin(pair[0]);
            h.append(header::ORIGIN, pair[1].parse().unwrap());
            let refused = origin_allowed(&h, &l).unwrap_err();
            assert_eq!(refused.reason().0, "ambiguous_origin", "{pair:?}");
        }
        let mut h = with_origin("https://consoles.example.com");
        h.append(header::HOST, "consoles.example.com".parse().unwrap());
        assert!(origin_allowed(&h, &l).is_ok());
        h.append(header::HOST, "evil.net".parse().unwrap());
        assert_eq!(
            origin_allowed(&h, &l).unwrap_err().reason().0,
            "duplicate_host"
        );
    }

    #[test]
    fn the_token_cookie_is_found_among_others_and_empty_is_none() {
        let with = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::COOKIE, v.parse().unwrap());
            }
            h
        };
        assert_eq!(cookie_token(&with(&["token=abc"])), Some("abc"));
        assert_eq!(
            cookie_token(&with(&["lang=en; token=abc-1; theme=dark"])),
            Some("abc-1")
        );
        assert_eq!(cookie_token(&with(&["lang=en", "token=\"q\""])), Some("q"));
        assert_eq!(cookie_token(&with(&["mytoken=abc; tokens=x"])), None);
        assert_eq!(cookie_token(&with(&["token="])), None);
        assert_eq!(cookie_token(&HeaderMap::new()), None);
    }
}
