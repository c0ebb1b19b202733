//! What the routes share: the admin and public routers' state (what native
//! clients are told included), and what every route of a router reads
//! alike: the bearer key on the admin side; the client's address and its
//! token on the public side.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::readiness::Readiness;
use super::respond::error;
use crate::config::{ListenConfig, WebConfig};
use crate::issuance::Issuer;
use crate::secret::Secret;
use crate::session::Sessions;
use crate::token::TokenValidator;

/// What the admin routes share.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// Validates tokens and reloads keys.
    pub validator: Arc<TokenValidator>,
    /// The issuance API; `None` answers 404.
    pub issuer: Option<Arc<Issuer>>,
    /// SHA-256 of each accepted bearer key (compared in constant time).
    pub bearer_key_hashes: Arc<Vec<[u8; 32]>>,
    /// Renders `/metrics`; `None` when no recorder is installed (tests).
    pub metrics: Option<PrometheusHandle>,
    /// What `/readyz` answers.
    pub readiness: Readiness,
    /// Live sessions (list, terminate), tickets (revoked with their token),
    /// and the resolver a token check goes through.
    pub sessions: Arc<Sessions>,
    /// How long a revocation is kept: the longest a token can still be valid.
    pub revoke_for_secs: u64,
    /// Reloads keys, certificates and backends (`POST /v1/reload`).
    pub reloader: Arc<crate::reload::Reloader>,
}

impl AdminState {
    /// Hashes bearer keys once so requests never touch the raw keys.
    pub fn hash_bearer_keys(keys: &[Secret<String>]) -> Vec<[u8; 32]> {
        keys.iter()
            .map(|k| Sha256::digest(k.expose().as_bytes()).into())
            .collect()
    }
}

/// A call without a valid bearer key.
pub(crate) struct Unauthorized;

impl IntoResponse for Unauthorized {
    fn into_response(self) -> Response {
        error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer key is required",
        )
    }
}

/// Checks `Authorization: Bearer ...` against the configured keys.
pub(crate) fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), Unauthorized> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|k| -> [u8; 32] { Sha256::digest(k.trim().as_bytes()).into() });
    let ok = presented.is_some_and(|p| {
        // Fold over every key so timing does not reveal which one matched.
        state
            .bearer_key_hashes
            .iter()
            .fold(subtle::Choice::from(0), |acc, k| acc | k.ct_eq(&p))
            .into()
    });
    if ok {
        Ok(())
    } else {
        crate::metrics::issuance_refused("unauthorized");
        tracing::info!("admin call refused: missing or unknown bearer key");
        Err(Unauthorized)
    }
}

/// What the public routes share.
#[derive(Debug, Clone)]
pub struct PublicState {
    /// Resolves tokens, admits and runs sessions.
    pub sessions: Arc<Sessions>,
    /// Origins and proxies.
    pub listen: Arc<ListenConfig>,
    /// Pages and client libraries.
    pub web: Arc<WebConfig>,
    /// What native SPICE clients are told; `None`: no SPICE at all.
    pub spice: Option<Arc<SpiceDetails>>,
    /// What native VNC clients are told.
    pub vnc: Arc<VncDetails>,
    /// What `/readyz` answers (here too: a balancer on another host cannot
    /// reach the admin listener).
    pub readiness: Readiness,
    /// Checks playbacks' tokens (they open no console: no resolver).
    pub validator: Arc<TokenValidator>,
}

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

/// What native VNC clients are told about Porthole's VNC listener.
#[derive(Debug, Clone, Default)]
pub struct VncDetails {
    /// Host clients connect to.
    pub host: String,
    /// Porthole's native VNC port, when the listener is on.
    pub port: Option<u16>,
    /// The CA certificate (PEM) to trust, when not a public one.
    pub ca_pem: Option<String>,
}

/// `?token=…`, or noVNC's `?path=websockify%3Ftoken%3D…` convention.
#[derive(Debug, Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
    path: Option<String>,
}

impl TokenQuery {
    pub(crate) fn token(&self) -> Option<&str> {
        self.token.as_deref().or_else(|| {
            let path = self.path.as_deref()?;
            let query = path.split_once('?').map_or(path, |(_, q)| q);
            query.split('&').find_map(|kv| kv.strip_prefix("token="))
        })
    }
}

/// The client's address, as every public route sees it: the peer, or the
/// last hop a trusted proxy vouches for.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub IpAddr);

impl axum::extract::FromRequestParts<PublicState> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &PublicState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
            // Served without connection info (a router in a unit test).
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        Ok(ClientAddr(client_addr(peer, &parts.headers, &s.listen)))
    }
}

/// The client's address: the peer, or the last hop a trusted proxy vouches for.
pub(crate) fn client_addr(peer: SocketAddr, headers: &HeaderMap, listen: &ListenConfig) -> IpAddr {
    let trusted = |ip: &IpAddr| listen.trusted_proxies.iter().any(|n| n.contains(ip));
    // The peer is canonical already (`listener::canonical`, at accept).
    let mut client = peer.ip();
    if !trusted(&client) {
        return client;
    }
    // Walk X-Forwarded-For from the right: every hop we trust may name the next.
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>().map(|ip| ip.to_canonical()) {
            Ok(ip) => {
                client = ip;
                if !trusted(&ip) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A `[listen]` with these origins and trusted proxies.
    pub(in crate::frontend) fn listen(
        origins: &[&str],
        proxies: &[&str],
        allow_missing: bool,
    ) -> ListenConfig {
        ListenConfig {
            public: "127.0.0.1:6080".parse().unwrap(),
            admin: "127.0.0.1:6090".parse().unwrap(),
            public_base_url: "https://consoles.example.com/p".into(),
            public_extra: vec![],
            tls: None,
            trusted_proxies: proxies.iter().map(|p| p.parse().unwrap()).collect(),
            proxy_protocol: false,
            allowed_origins: origins.iter().map(|o| o.to_string()).collect(),
            allow_missing_origin: allow_missing,
            tls13_only: false,
            max_pending_connections: 1024,
            max_pending_per_address: 32,
        }
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "198.51.100.7, 10.0.0.2".parse().unwrap());
        let peer: SocketAddr = "10.0.0.1:5555".parse().unwrap();
        assert_eq!(client_addr(peer, &h, &listen(&[], &[], true)), peer.ip());
        assert_eq!(
            client_addr(peer, &h, &listen(&[], &["10.0.0.0/8"], true)),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        let stranger: SocketAddr = "203.0.113.9:1".parse().unwrap();
        assert_eq!(
            client_addr(stranger, &h, &listen(&[], &["10.0.0.0/8"], true)),
            stranger.ip()
        );
    }

    #[test]
    fn a_mapped_address_is_the_ipv4_address_it_carries() {
        // A balancer may write a hop in mapped form (the peer itself is
        // made IPv4 at accept).
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "::ffff:198.51.100.7, ::ffff:10.0.0.2".parse().unwrap(),
        );
        let peer: SocketAddr = "10.0.0.1:5555".parse().unwrap();
        assert_eq!(
            client_addr(peer, &h, &listen(&[], &["10.0.0.0/8"], true)),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn token_comes_from_query_or_novnc_path() {
        let q = |token: Option<&str>, path: Option<&str>| TokenQuery {
            token: token.map(Into::into),
            path: path.map(Into::into),
        };
        assert_eq!(q(Some("abc"), None).token(), Some("abc"));
        assert_eq!(q(None, Some("websockify?token=xyz")).token(), Some("xyz"));
        assert_eq!(q(None, Some("?a=1&token=xyz")).token(), Some("xyz"));
        assert_eq!(q(None, Some("websockify")).token(), None);
    }
}
