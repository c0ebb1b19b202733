//! What a session lets through of its client's input, for the consoles
//! whose relay otherwise passes every byte: noVNC, vnc-direct and serial.
//! A view-only grant's client may watch and not act, and Porthole is what
//! enforces it (noVNC's own view-only switch is the user's to flip):
//!
//! - VNC: [`crate::protocol::rfb::view_only`] frames the client's messages
//!   and drops keys, pointer, clipboard, power and resize requests;
//! - serial: everything the client types is dropped;
//! - SPICE: its channel inspector (`spice::ChannelInspect`) drops the main
//!   channel's agent and mouse-mode messages, and the channels that carry
//!   input are refused at their link.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use super::{ClientTap, CloseReason, Inspect};
use crate::console::ConsoleType;
use crate::protocol::client_filter::Checked;
use crate::protocol::rfb::view_only::ViewOnly;
use crate::token::Grant;

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
            for message in &checked.dropped {
                crate::metrics::view_only_dropped(protocol, message);
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

    #[test]
    fn a_full_grant_has_no_tap() {
        assert!(ClientInput::All.client_tap().is_none());
    }
}
