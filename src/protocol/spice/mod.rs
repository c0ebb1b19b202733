//! SPICE: what a link proxy reads and writes on each channel connection.
//! Wire facts: `shared/docs/protocols.md` §6 (all integers little-endian).
//!
//! - [`messages`]: link header, `SpiceLinkMess`, `SpiceLinkReply`, capabilities.
//! - [`link`]: the handshake machines, facing the client and the hypervisor.
//! - [`crypto`]: RSA-OAEP ticket encryption, with spice-html5's realignment.
//! - [`framing`]: data messages after the link (mini or full headers), followed by count.
//! - [`main_watch`]: the main channel's INIT (session id) and migration messages.
//! - [`display_drain`]: a display channel's flow control, kept up after its client left.

pub mod client_check;
pub mod crypto;
pub mod display_drain;
pub mod framing;
pub mod link;
pub mod main_watch;
pub mod messages;
