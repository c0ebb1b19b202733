//! Sans-IO protocol machinery: bytes in, values (and later decisions) out.
//!
//! Nothing here does I/O, reads a clock, or uses a global random source; no
//! async runtime, no sockets. Parsers take the bytes received so far and answer
//! [`WireError::Incomplete`] until a whole message is there, so any chunking of
//! the input (one byte at a time included) gives the same result. Every length
//! or count read from the wire is checked against a named cap before anything
//! is sized from it. No input makes a parser panic.

pub mod client_filter;
pub mod rfb;
pub mod spice;
#[cfg(test)]
pub(crate) mod transcript;

/// A handshake machine, as its driver sees it: bytes from the peer go in
/// with [`Machine::feed`]; [`Machine::poll`] answers the next step (or `None`
/// while more bytes are needed); bytes for the peer come out of
/// [`Machine::take_output`]. Machines whose answers depend on a decision of
/// the caller (the SPICE link's key, ticket and result) hand those bytes
/// back from the method that takes the decision, and have no other output.
pub trait Machine {
    /// What the caller must act on.
    type Step;
    /// Why the peer's bytes were refused.
    type Failure;

    /// Bytes received from the peer.
    fn feed(&mut self, data: &[u8]);

    /// The next complete step.
    fn poll(&mut self) -> Result<Option<Self::Step>, Self::Failure>;

    /// Bytes to send to the peer now.
    fn take_output(&mut self) -> Vec<u8> {
        Vec::new()
    }
}

/// Why bytes could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// More bytes are needed; not an error yet.
    #[error("need more bytes")]
    Incomplete,
    /// The bytes break the protocol.
    #[error("invalid: {0}")]
    Invalid(&'static str),
    /// A length or count from the wire is over its cap.
    #[error("{what} too large: {got} > {max}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// The value on the wire.
        got: u64,
        /// The cap.
        max: u64,
    },
}

/// A bounds-checked cursor over a byte slice: truncation is `Incomplete`,
/// never a panic.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Reads from the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.remaining() < n {
            return Err(WireError::Incomplete);
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    /// A little-endian u32 (SPICE).
    pub fn u32_le(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A big-endian u32 (RFB).
    pub fn u32_be(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}
