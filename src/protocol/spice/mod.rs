//! SPICE: what a link proxy reads and writes on each channel connection.
//! Wire facts: `shared/docs/protocols.md` §6 (all integers little-endian).
//!
//! - [`messages`]: link header, `SpiceLinkMess`, `SpiceLinkReply`, capabilities.
//! - [`link`]: the handshake machines, facing the client and the hypervisor.
//! - [`crypto`]: RSA-OAEP ticket encryption, with spice-html5's realignment.
//! - [`main_watch`]: the main channel's INIT (session id) and migration messages.

pub mod crypto;
pub mod link;
pub mod main_watch;
pub mod messages;
