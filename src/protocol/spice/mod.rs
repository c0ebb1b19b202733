//! SPICE: the link handshake messages a SPICE link proxy reads and writes.
//! Wire facts: `shared/docs/protocols.md` §6 (all integers little-endian).

pub mod messages;
