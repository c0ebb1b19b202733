//! How requests arrive. Thin: parse, authenticate, call into the domain, answer.

pub mod admin;
pub mod operations;
pub mod public;
pub mod spice;
pub mod vnc;
pub mod xterm;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::session::Sessions;

/// A native listener: every connection it accepts goes to `serve` (a
/// session-layer entry point) as a tracked session task, until `stop` fires.
/// A connection holds its place behind the gate until its handshake
/// deadline: by then it is a session, or gone.
pub(crate) async fn serve_native<F, Fut>(
    listener: TcpListener,
    sessions: Arc<Sessions>,
    stop: CancellationToken,
    handshake: Duration,
    serve: F,
) where
    F: Fn(Arc<Sessions>, TcpStream, IpAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let tracker = sessions.tracker.clone();
    let gate = sessions.pending.clone();
    crate::transport::listener::accept_loop(listener, stop, gate, move |tcp, peer, pass| {
        let session = serve(sessions.clone(), tcp, peer.ip());
        tracker.spawn(async move {
            tokio::pin!(session);
            tokio::select! {
                () = &mut session => return,
                () = tokio::time::sleep(handshake) => drop(pass),
            }
            session.await;
        });
    })
    .await;
}
