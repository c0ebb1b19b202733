//! Whether this node should be sent new consoles: `/readyz`, served on the
//! admin listener and on the public one (a balancer on another host can
//! reach only the public one: docs keep the admin listener on loopback).
//!
//! Not ready while starting or draining, and while the shared store cannot
//! answer (this node cannot admit anyone; running sessions go on). Nova
//! unreachable does not make a node unready: every node asks the same
//! Nova, so taking nodes out helps nobody, and signed tokens still open;
//! the body says so and `porthole_nova_up` is 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::store::Redis;
use crate::token::nova::NovaResolver;

/// What `/readyz` reads.
#[derive(Debug, Clone)]
pub struct Readiness {
    accepting: Arc<AtomicBool>,
    store: Option<Arc<Redis>>,
    nova: Option<Arc<NovaResolver>>,
}

impl Readiness {
    /// Not ready until [`Readiness::set_accepting`].
    pub fn new(store: Option<Arc<Redis>>, nova: Option<Arc<NovaResolver>>) -> Self {
        Self {
            accepting: Arc::new(AtomicBool::new(false)),
            store,
            nova,
        }
    }

    /// Whether the listeners take new connections (false while starting
    /// and draining).
    pub fn set_accepting(&self, accepting: bool) {
        self.accepting.store(accepting, Ordering::Relaxed);
    }

    /// The answer to `/readyz`.
    pub fn answer(&self) -> Response {
        if !self.accepting.load(Ordering::Relaxed) {
            return (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response();
        }
        if self.store.as_ref().is_some_and(|r| !r.healthy()) {
            return (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response();
        }
        if self.nova.as_ref().and_then(|n| n.reachable()) == Some(false) {
            return (
                StatusCode::OK,
                "ready (Nova unreachable: Nova tokens are refused as unavailable)\n",
            )
                .into_response();
        }
        (StatusCode::OK, "ready\n").into_response()
    }
}
