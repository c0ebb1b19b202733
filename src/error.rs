//! Who is at fault when something goes wrong.
//!
//! Every error that ends a request or a session carries a [`Blame`]. It picks
//! the log level (a client sending junk is routine, a dead hypervisor is worth
//! a warning, a bug is an error) and the metric label. It never decides whether
//! internals reach the client: they never do.

/// The party responsible for a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Blame {
    /// The client sent something wrong: a bad token, a junk handshake.
    Client,
    /// The hypervisor (or another upstream) misbehaved or is unreachable.
    Backend,
    /// Porthole itself: a bug, an exhausted resource, a broken store.
    Internal,
}

impl Blame {
    /// A stable label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Blame::Client => "client",
            Blame::Backend => "backend",
            Blame::Internal => "internal",
        }
    }
}
