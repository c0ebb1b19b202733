//! How requests arrive. Thin: parse, authenticate, call into the domain, answer.

pub mod admin;
pub mod operations;
pub mod playback;
pub mod public;
pub mod readiness;
mod respond;
pub mod spice;
pub mod state;
pub mod vnc;
pub mod xterm;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::session::{self, Sessions};
use crate::transport::listener::{Accepted, ProxyHeaders};

/// A native listener's kind: what each connection it accepts is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Native {
    /// SPICE over TLS: the session layer runs TLS and the link, and
    /// proxies the channel.
    SpiceTls,
    /// SPICE on a plain port: every link is answered NEED_SECURED, so that
    /// clients retry on the TLS port and no ticket ever travels in clear.
    SpicePlain,
    /// vnc-direct: RFB, offered only VeNCrypt X509Plain with a ticket.
    Vnc,
}

/// A native listener: every connection it accepts goes to the session
/// layer's entry point for `kind` as a tracked session task, with its
/// client's address (a trusted proxy's PROXY header names it, where `proxy`
/// expects one) and the deadline its handshakes share, until `stop` fires.
/// A connection holds its place behind the gate until that deadline: by
/// then it is a session, or gone.
pub async fn serve_native(
    kind: Native,
    listener: TcpListener,
    sessions: Arc<Sessions>,
    stop: CancellationToken,
    proxy: ProxyHeaders,
) {
    let handshake = match kind {
        Native::SpiceTls | Native::SpicePlain => sessions.limits.spice_handshake,
        Native::Vnc => sessions.limits.vnc_handshake,
    };
    let serve = move |sessions, tcp, client, deadline| async move {
        match kind {
            Native::SpiceTls => session::spice::serve_native(sessions, tcp, client, deadline).await,
            Native::SpicePlain => session::spice::need_secured(tcp, deadline).await,
            Native::Vnc => session::vnc::serve_native(sessions, tcp, client, deadline).await,
        }
    };
    accept_native(listener, sessions, stop, handshake, proxy, serve).await;
}

/// [`serve_native`]'s accept loop, with `serve` for each connection.
async fn accept_native<F, Fut>(
    listener: TcpListener,
    sessions: Arc<Sessions>,
    stop: CancellationToken,
    handshake: Duration,
    proxy: ProxyHeaders,
    serve: F,
) where
    F: Fn(Arc<Sessions>, TcpStream, IpAddr, Instant) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let tracker = sessions.tracker.clone();
    let gate = sessions.pending.clone();
    let serve = Arc::new(serve);
    // A native connection may carry a session before its place is given
    // back: never closed to make room.
    crate::transport::listener::accept_loop(listener, stop, gate, proxy, false, move |arrival| {
        let sessions = sessions.clone();
        let serve = serve.clone();
        tracker.spawn(async move {
            let deadline = Instant::now() + handshake;
            let accepted = tokio::select! {
                a = arrival.client(deadline) => a,
                () = sessions.cancel.cancelled() => None,
            };
            let Some(Accepted { tcp, client, pass }) = accepted else {
                return;
            };
            if let Some(after) = sessions.limits.client_keepalive {
                crate::transport::keepalive::keep_alive(&tcp, after);
            }
            let session = serve(sessions, tcp, client.ip(), deadline);
            tokio::pin!(session);
            tokio::select! {
                () = &mut session => return,
                () = tokio::time::sleep_until(deadline) => drop(pass),
            }
            session.await;
        });
    })
    .await;
}
