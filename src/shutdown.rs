//! One shutdown path: a [`CancellationToken`] cancelled by SIGTERM or Ctrl-C.
//!
//! Every listener takes the token, so tests trigger shutdown by cancelling it.

use tokio_util::sync::CancellationToken;

/// Returns a token cancelled on SIGTERM or SIGINT, and keeps SIGHUP from
/// ending the process before the app listens for it (to reload). Must be
/// called within the runtime.
///
/// The handlers are installed here, before this returns (and before
/// anything is served), not by the task that waits on them: a handler
/// installed only when a spawned task first ran left a window, after
/// Porthole said it was ready if that task had not been scheduled yet (a
/// loaded machine), in which a SIGTERM took its default action and killed
/// the process instead of shutting it down (seen in CI: exit by signal 15
/// where a test expected 0, and no "SIGTERM: shutting down" logged).
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let fire = token.clone();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{Signal, SignalKind, signal};
        let listen = |kind: SignalKind, name: &str| {
            signal(kind)
                .map_err(|e| tracing::warn!("cannot listen for {name}: {e}"))
                .ok()
        };
        let term = listen(SignalKind::terminate(), "SIGTERM");
        let int = listen(SignalKind::interrupt(), "SIGINT");
        // SIGHUP reloads, once the app listens for it. Until then (the
        // start-up) its default action would end the process, leaving a
        // demo VM behind: a stream made and dropped leaves tokio's handler
        // installed for good, so an early SIGHUP is ignored instead.
        drop(listen(SignalKind::hangup(), "SIGHUP"));
        // A signal that cannot be listened for, or whose stream ends,
        // never fires.
        async fn received(signal: Option<Signal>) {
            if let Some(mut s) = signal
                && s.recv().await.is_some()
            {
                return;
            }
            std::future::pending().await
        }
        tokio::spawn(async move {
            tokio::select! {
                () = received(term) => tracing::info!("SIGTERM: shutting down"),
                () = received(int) => tracing::info!("SIGINT: shutting down"),
            }
            fire.cancel();
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        fire.cancel();
    });
    token
}

#[cfg(all(test, unix))]
mod tests {
    use std::time::Duration;

    /// Sends `signal` (kill(1)'s `-NAME`) to this test process.
    fn signal_this_process(signal: &str) {
        let sent = std::process::Command::new("kill")
            .args([signal, &std::process::id().to_string()])
            .status()
            .expect("kill(1)");
        assert!(sent.success());
    }

    #[test]
    fn a_sigterm_before_the_waiting_task_first_runs_shuts_down_instead_of_killing() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let stop = super::on_signals();
            // The one thread has not yielded: the task that waits on the
            // signal has not run yet. Without a handler by now the default
            // action ends this whole test process (signal 15).
            signal_this_process("-TERM");
            tokio::time::timeout(Duration::from_secs(10), stop.cancelled())
                .await
                .expect("the token is cancelled by the SIGTERM");
        });
    }

    #[test]
    fn a_sighup_before_the_app_listens_for_reloads_is_ignored() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let _stop = super::on_signals();
            // Nothing listens for SIGHUP yet. Without a handler by now its
            // default action ends this whole test process (signal 1).
            signal_this_process("-HUP");
            // Delivered on this process's next return to user space.
            tokio::time::sleep(Duration::from_millis(300)).await;
        });
    }
}
