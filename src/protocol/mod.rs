//! Sans-IO protocol machinery: bytes in, values (and later decisions) out.
//!
//! Nothing here does I/O, reads a clock, or uses a global random source; no
//! async runtime, no sockets. Parsers take the bytes received so far and answer
//! [`WireError::Incomplete`] until a whole message is there, so any chunking of
//! the input (one byte at a time included) gives the same result. Every length
//! or count read from the wire is checked against a named cap before anything
//! is sized from it. No input makes a parser panic.

pub mod rfb;
pub mod spice;
#[cfg(test)]
pub(crate) mod transcript;

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
