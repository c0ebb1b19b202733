//! RFB (VNC): the handshake a security proxy terminates on both legs.
//! Wire facts: `shared/docs/protocols.md` §7 (all integers big-endian).
//!
//! - [`upstream`]: Porthole as the client of a hypervisor's VNC server: None,
//!   VNC authentication, VeNCrypt X509None / X509Vnc, in a preference order.
//! - [`client`]: Porthole as the server of a VNC client: only None for
//!   browsers (the token authenticated them), only VeNCrypt X509Plain (a
//!   ticket as the password, inside TLS) for native clients.
//!
//! Both machines take bytes with `feed`, report steps from `poll`, and queue
//! what to send, which the caller takes with `take_output`. TLS is the
//! caller's: a machine says when to start it, and the bytes fed after that
//! are the ones from inside TLS.

pub mod client;
pub mod upstream;
pub mod view_only;
pub mod vnc_auth;

use crate::protocol::WireError;

/// The only protocol version Porthole speaks on either leg.
pub const VERSION_3_8: &[u8; 12] = b"RFB 003.008\n";

/// Security types.
pub mod security {
    /// No authentication.
    pub const NONE: u8 = 1;
    /// DES challenge and response.
    pub const VNC_AUTH: u8 = 2;
    /// VeNCrypt: TLS, then a sub-authentication.
    pub const VENCRYPT: u8 = 19;
}

/// VeNCrypt subtypes.
pub mod vencrypt {
    /// Anonymous TLS, no sub-authentication (refused: no server identity).
    pub const TLS_NONE: u32 = 257;
    /// Anonymous TLS with VNC authentication (refused).
    pub const TLS_VNC: u32 = 258;
    /// Anonymous TLS with a username and password (refused).
    pub const TLS_PLAIN: u32 = 259;
    /// X.509 TLS, no sub-authentication.
    pub const X509_NONE: u32 = 260;
    /// X.509 TLS, then VNC authentication.
    pub const X509_VNC: u32 = 261;
    /// X.509 TLS, then a username and password.
    pub const X509_PLAIN: u32 = 262;
}

/// Longest failure reason read from a peer; past it the peer is broken
/// (Nova once read a 4 GiB one).
pub const MAX_REASON: u32 = 1024;

/// Longest username or password a client may send (gtk-vnc sends at most 99).
pub const MAX_CREDENTIAL: u32 = 255;

/// Why a handshake failed: a stable label and detail for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct RfbFailure {
    /// A stable label for logs and metrics.
    pub reason: &'static str,
    /// Detail for the log (peer strings are printable-filtered and capped).
    pub detail: String,
}

impl RfbFailure {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }

    fn wire(e: WireError) -> Self {
        match e {
            WireError::TooLarge { .. } => Self::new("oversized_message", e.to_string()),
            _ => Self::new("malformed_handshake", e.to_string()),
        }
    }
}

/// A peer's string, safe to log.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Parses `RFB xxx.yyy\n`; returns (major, minor).
fn parse_version(bytes: &[u8; 12]) -> Option<(u32, u32)> {
    if &bytes[..4] != b"RFB " || bytes[7] != b'.' || bytes[11] != b'\n' {
        return None;
    }
    let num = |b: &[u8]| -> Option<u32> {
        b.iter().try_fold(0u32, |acc, d| {
            d.is_ascii_digit().then(|| acc * 10 + u32::from(d - b'0'))
        })
    };
    Some((num(&bytes[4..7])?, num(&bytes[8..11])?))
}

/// A buffer of received bytes with big-endian readers that say `Incomplete`
/// instead of consuming half a message.
#[derive(Debug, Default)]
struct Inbox {
    buf: Vec<u8>,
}

impl Inbox {
    fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The first `n` bytes, if there, consumed.
    fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        (self.buf.len() >= n).then(|| self.buf.drain(..n).collect())
    }

    fn peek(&self, n: usize) -> Option<&[u8]> {
        self.buf.get(..n)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A u32 length then that many bytes, capped; consumed only when whole.
    fn counted(&mut self, cap: u32, what: &'static str) -> Result<Option<Vec<u8>>, WireError> {
        let Some(head) = self.peek(4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        if len > cap {
            return Err(WireError::TooLarge {
                what,
                got: len.into(),
                max: cap.into(),
            });
        }
        if self.buf.len() < 4 + len as usize {
            return Ok(None);
        }
        self.buf.drain(..4);
        Ok(self.take(len as usize))
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn into_inner(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_strictly() {
        assert_eq!(parse_version(b"RFB 003.008\n"), Some((3, 8)));
        assert_eq!(parse_version(b"RFB 003.889\n"), Some((3, 889)));
        assert_eq!(parse_version(b"RFB 00x.008\n"), None);
        assert_eq!(parse_version(b"GET / HTTP/1"), None);
    }
}
