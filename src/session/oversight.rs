//! Oversight inside a session: what a view-only client may send, and a
//! serial console's output fanned out to its shadows.
//!
//! [`ClientInput`] is what a session lets through of its client's input,
//! for the consoles whose relay otherwise passes every byte: noVNC,
//! vnc-direct and serial. A view-only grant's client may watch and not act,
//! and Porthole is what enforces it (noVNC's own view-only switch is the
//! user's to flip):
//!
//! - VNC: [`crate::protocol::rfb::view_only`] frames the client's messages
//!   and drops keys, pointer, clipboard, power and resize requests;
//! - serial: everything the client types is dropped;
//! - SPICE: its channel inspector (`spice::ChannelInspect`) drops the main
//!   channel's agent and mouse-mode messages, and the channels that carry
//!   input are refused at their link.
//!
//! A shadow of a VNC session is a second, view-only connection to the same
//! display (QEMU shares it). A serial chardev serves one client, so a serial
//! session sends what the hypervisor sends it to [`FanOut`]'s channel too,
//! and a shadow reads it through [`watch`]; a shadow that falls
//! [`FAN_OUT_CHUNKS`] behind, or takes nothing for [`SHADOW_STALL`], is cut:
//! the owner never waits for one.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::broadcast;

use super::registry::FAN_OUT_CHUNKS;
use super::{ClientTap, CloseReason, Inspect};
use crate::console::ConsoleType;
use crate::protocol::client_filter::Checked;
use crate::protocol::rfb::view_only::ViewOnly;
use crate::token::Grant;
use crate::transport::conn::Conn;
use tokio_util::sync::CancellationToken;

/// The client input a session passes on.
#[derive(Debug, Clone, Copy)]
pub enum ClientInput {
    /// All of it.
    All,
    /// Only what asks to see (a view-only grant), for this console type.
    ViewOnly(ConsoleType),
}

impl ClientInput {
    /// What `grant`'s session passes on.
    pub fn of(grant: &Grant) -> Self {
        if grant.view_only() {
            ClientInput::ViewOnly(grant.console)
        } else {
            ClientInput::All
        }
    }
}

impl Inspect for ClientInput {
    async fn inspect(&mut self, _chunk: &[u8]) -> Result<(), CloseReason> {
        Ok(())
    }

    fn client_tap(&self) -> Option<ClientTap> {
        let ClientInput::ViewOnly(console) = *self else {
            return None;
        };
        let told = AtomicBool::new(false);
        // Said once per session: a user holding a key down would otherwise
        // write a line per repeat.
        let tell = move |checked: &Checked, protocol: &'static str| {
            // One counter update per run of one message type: a held key
            // repeats thousands of KeyEvents.
            for run in checked.dropped.chunk_by(|a, b| a == b) {
                crate::metrics::view_only_dropped(protocol, run[0], run.len() as u64);
            }
            if !checked.dropped.is_empty() && !told.swap(true, Relaxed) {
                tracing::info!(
                    console = %console, first = checked.dropped[0],
                    "view-only: the client's input is dropped (counted in {})",
                    crate::metrics::VIEW_ONLY_DROPPED
                );
            }
            if let Some(refused) = &checked.refused {
                crate::metrics::client_stream_refused(protocol, refused.why);
                tracing::warn!(
                    blame = "client", console = %console,
                    "view-only client's side ended: {refused}"
                );
            }
        };
        match console {
            ConsoleType::Novnc | ConsoleType::VncDirect => {
                let filter = Mutex::new(ViewOnly::new());
                Some(Arc::new(move |chunk: &[u8]| {
                    let checked = filter
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .check(chunk);
                    tell(&checked, "rfb");
                    checked
                }))
            }
            ConsoleType::Serial => Some(Arc::new(move |_chunk: &[u8]| {
                let checked = Checked {
                    dropped: vec!["input"],
                    ..Checked::default()
                };
                tell(&checked, "serial");
                checked
            })),
            // SPICE channels check their own (see `spice::ChannelInspect`).
            ConsoleType::SpiceHtml5 | ConsoleType::SpiceDirect => None,
        }
    }
}

/// A session's relay inspector: its client's input as [`ClientInput`]
/// says, and (a serial session) the hypervisor's output to its shadows and
/// its recording.
#[derive(Debug)]
pub struct FanOut {
    /// What the client may send.
    pub input: ClientInput,
    /// The session's fan-out channel, if it has one.
    pub shadows: Option<broadcast::Sender<Bytes>>,
    /// The session's recording, if it is recorded.
    pub recorder: Option<crate::recording::Recorder>,
}

impl Inspect for FanOut {
    async fn inspect(&mut self, chunk: &[u8]) -> Result<(), CloseReason> {
        if let Some(recorder) = &mut self.recorder {
            // A required recording that stopped ends the session before
            // the client sees what it did not record.
            recorder
                .record(chunk)
                .map_err(|_| CloseReason::RecordingStopped)?;
        }
        if let Some(tx) = &self.shadows
            && tx.receiver_count() > 0
        {
            // Never waits: a shadow that cannot keep up lags and is cut.
            let _ = tx.send(Bytes::copy_from_slice(chunk));
        }
        Ok(())
    }

    fn client_tap(&self) -> Option<ClientTap> {
        self.input.client_tap()
    }
}

/// A shadow's view of a serial session's output, as the hypervisor
/// connection its relay reads: what `rx` receives, until the session ends,
/// the shadow's relay ends, or the shadow falls behind.
/// A cut cancels `cut`, which ends the shadow's relay even while it waits
/// to write to a client that does not read.
pub fn watch(rx: broadcast::Receiver<Bytes>, cut: CancellationToken) -> Conn {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        if pump(rx, theirs).await == Pumped::Cut {
            cut.cancel();
        }
    });
    Conn::boxed(ours)
}

/// How a shadow's output stopped.
#[derive(Debug, PartialEq, Eq)]
enum Pumped {
    /// Its session's output ended, or its relay did.
    Ended,
    /// It fell behind, or took nothing for too long.
    Cut,
}

/// How long a shadow may take nothing before it is cut: past its socket's
/// and the pipe's buffers, a shadow that does not read would otherwise hold
/// its place until the relay's liveness rule (three pings) ends it.
pub const SHADOW_STALL: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a shadow whose session's output ended waits for its relay to
/// stop by itself: the session's end reaches it as `SessionEnded`, the
/// same close every time, rather than as its console closing.
const OUTPUT_END_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

async fn pump(mut rx: broadcast::Receiver<Bytes>, mut out: tokio::io::DuplexStream) -> Pumped {
    let mut ignored = [0u8; 256];
    loop {
        tokio::select! {
            got = rx.recv() => match got {
                Ok(chunk) => match tokio::time::timeout(SHADOW_STALL, out.write_all(&chunk)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Pumped::Ended,
                    Err(_) => {
                        crate::metrics::limit_hit("shadow_stalled");
                        tracing::info!(
                            "shadow cut: it took none of the console's output for {SHADOW_STALL:?}"
                        );
                        return Pumped::Cut;
                    }
                },
                Err(broadcast::error::RecvError::Lagged(behind)) => {
                    crate::metrics::limit_hit("shadow_behind");
                    tracing::info!(
                        behind,
                        "shadow cut: it fell {FAN_OUT_CHUNKS} chunks behind the console's output"
                    );
                    return Pumped::Cut;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    let _ = tokio::time::timeout(OUTPUT_END_GRACE, out.read(&mut ignored)).await;
                    return Pumped::Ended;
                }
            },
            // The shadow's relay ended (a view-only client sends nothing
            // through: its tap drops it).
            read = out.read(&mut ignored) => if matches!(read, Ok(0) | Err(_)) {
                return Pumped::Ended;
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tap(console: ConsoleType) -> ClientTap {
        ClientInput::ViewOnly(console)
            .client_tap()
            .expect("a view-only tap")
    }

    #[test]
    fn a_view_only_vnc_client_gets_pixels_and_no_keys_through() {
        let tap = tap(ConsoleType::Novnc);
        // FramebufferUpdateRequest, then a KeyEvent (Escape down).
        let checked = tap(&[3, 1, 0, 0, 0, 0, 4, 0, 3, 0, 4, 1, 0, 0, 0, 0, 0xff, 0x1b]);
        assert_eq!(checked.forward, [3, 1, 0, 0, 0, 0, 4, 0, 3, 0]);
        assert_eq!(checked.dropped, ["key_event"]);
    }

    #[test]
    fn a_view_only_serial_client_types_nothing() {
        let checked = tap(ConsoleType::Serial)(b"\x1b\r\n");
        assert!(checked.forward.is_empty());
        assert!(checked.refused.is_none());
    }

    #[tokio::test]
    async fn a_shadow_sees_the_output_and_one_that_falls_behind_is_cut() {
        let (tx, _) = broadcast::channel(FAN_OUT_CHUNKS);
        let mut owner = FanOut {
            input: ClientInput::All,
            shadows: Some(tx.clone()),
            recorder: None,
        };
        let (mut from, _to) = watch(tx.subscribe(), CancellationToken::new()).split();
        owner.inspect(b"SeaBIOS").await.unwrap();
        from.ready().await.unwrap();
        let mut buf = bytes::BytesMut::new();
        from.try_read_buf(&mut buf).unwrap();
        assert_eq!(&buf[..], b"SeaBIOS");
        // Nobody reads: the pump blocks on the pipe, the channel fills,
        // the owner goes on, the shadow is cut and its stream ends.
        for _ in 0..(FAN_OUT_CHUNKS * 2) {
            owner.inspect(&[b'x'; 1024]).await.unwrap();
            tokio::task::yield_now().await;
        }
        let mut total = 0;
        loop {
            from.ready().await.unwrap();
            let mut buf = bytes::BytesMut::new();
            match from.try_read_buf(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert!(
            total < FAN_OUT_CHUNKS * 2 * 1024,
            "cut before the end: {total}"
        );
    }

    #[test]
    fn a_full_grant_has_no_tap() {
        assert!(ClientInput::All.client_tap().is_none());
    }
}
