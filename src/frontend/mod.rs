//! How requests arrive. Thin: parse, authenticate, call into the domain, answer.

pub mod admin;
pub mod operations;
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

use crate::session::Sessions;
use crate::transport::listener::{Accepted, ProxyHeaders};

/// A native listener: every connection it accepts goes to `serve` (a
/// session-layer entry point) as a tracked session task, with its client's
/// address (a trusted proxy's PROXY header names it, where `proxy` expects
/// one) and the deadline its handshakes share, until `stop` fires. A
/// connection holds its place behind the gate until that deadline: by then
/// it is a session, or gone.
pub(crate) async fn serve_native<F, Fut>(
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
