//! What a check of a client's stream decides about the bytes it was given:
//! which go to the hypervisor now, which messages were dropped, and the
//! message (if any) at which the client's side must end. The SPICE client
//! check and the view-only filters answer in this one shape, so the relays
//! apply any of them the same way.

/// A client message the hypervisor must not see, at which the client's
/// side ends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("client message of type {kind} with a {size}-byte body: {why}")]
pub struct Refused {
    /// Its type.
    pub kind: u16,
    /// Its length as far as it is known (SPICE: its body).
    pub size: u32,
    /// What is wrong with it.
    pub why: &'static str,
}

/// What of the client's bytes may reach the hypervisor now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Checked {
    /// Whole checked messages, and bodies of streamed ones; a message
    /// being checked waits until it is whole.
    pub forward: Vec<u8>,
    /// Messages left out of `forward` on purpose (a view-only client's
    /// input), by name, one entry per message.
    pub dropped: Vec<&'static str>,
    /// A message that must not go came after `forward`: the client's side
    /// ends here.
    pub refused: Option<Refused>,
}
