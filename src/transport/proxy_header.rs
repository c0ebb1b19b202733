//! The PROXY protocol header (HAProxy's, v1 text and v2 binary) that a
//! TCP-mode load balancer sends before the client's first byte, naming the
//! client it connected for.
//!
//! The header is read exactly: nothing after it is consumed, so the socket
//! goes on to TLS (or RFB, whose server speaks first) as it was. A v2 header
//! says its length in its first 16 bytes; a v1 line is read a byte at a time
//! up to its CRLF (at most 107 bytes; v1 is the legacy form, a few dozen
//! small reads once per connection). Parsing is the `ppp` crate's. Whoever
//! calls this decides whom to believe and bounds the time it may take.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt as _};

/// The longest v2 header accepted, fixed part and TLVs: room for the
/// address block and a balancer's usual TLVs (unique id, TLS details);
/// anything longer is refused rather than buffered.
pub const MAX_V2_BYTES: usize = 1024;

/// v1's longest line (the protocol's own bound).
const MAX_V1_BYTES: usize = 107;

/// The shortest header of either version (`PROXY UNKNOWN\r\n`): read at
/// once, it cannot take a byte of what follows.
const SHORTEST: usize = 15;

/// Why no client address came out of a header.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The peer closed, or the socket failed, before the header was whole.
    #[error("connection ended in the PROXY header: {0}")]
    Io(#[from] io::Error),
    /// The connection does not start with a PROXY header.
    #[error("no PROXY protocol header")]
    Missing,
    /// A v2 header longer than [`MAX_V2_BYTES`], or a v1 line without its end.
    #[error("PROXY header too long")]
    TooLong,
    /// The header is not one the protocol allows.
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
}

impl ProxyHeaderError {
    /// A stable label for metrics and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Io(_) => "proxy_header_eof",
            Self::Missing => "proxy_header_missing",
            Self::TooLong => "proxy_header_too_long",
            Self::Malformed(_) => "proxy_header_malformed",
        }
    }
}

/// Reads one PROXY header from the start of `io`: the client's address, or
/// `None` when the header names none (v2 `LOCAL`, a balancer's own health
/// check; v1 `UNKNOWN`; a Unix socket), and the connection stands for
/// itself.
pub async fn read<R: AsyncRead + Unpin>(
    io: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut buf = vec![0u8; SHORTEST];
    io.read_exact(&mut buf).await?;
    if buf.starts_with(ppp::v2::PROTOCOL_PREFIX) {
        // 12 signature bytes, version and command, family, a 16-bit length.
        buf.resize(16, 0);
        io.read_exact(&mut buf[SHORTEST..]).await?;
        let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if 16 + len > MAX_V2_BYTES {
            return Err(ProxyHeaderError::TooLong);
        }
        buf.resize(16 + len, 0);
        io.read_exact(&mut buf[16..]).await?;
        return v2_client(&buf);
    }
    if !buf.starts_with(b"PROXY ") {
        return Err(ProxyHeaderError::Missing);
    }
    while !buf.ends_with(b"\r\n") {
        if buf.len() >= MAX_V1_BYTES {
            return Err(ProxyHeaderError::TooLong);
        }
        buf.push(io.read_u8().await?);
    }
    v1_client(&buf)
}

fn v2_client(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    use ppp::v2::{Addresses, Command, Header};
    let header = Header::try_from(bytes).map_err(|e| ProxyHeaderError::Malformed(e.to_string()))?;
    if header.command == Command::Local {
        return Ok(None);
    }
    Ok(match header.addresses {
        Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Unspecified | Addresses::Unix(_) => None,
    })
}

fn v1_client(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    use ppp::v1::{Addresses, Header};
    let header = Header::try_from(bytes).map_err(|e| ProxyHeaderError::Malformed(e.to_string()))?;
    Ok(match header.addresses {
        Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Unknown => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyHeaderError>, Vec<u8>) {
        let mut io = bytes;
        let r = read(&mut io).await;
        (r, io.to_vec())
    }

    fn v2(src: &str, dst: &str) -> Vec<u8> {
        let addrs: ppp::v2::Addresses = (
            src.parse::<SocketAddr>().unwrap(),
            dst.parse::<SocketAddr>().unwrap(),
        )
            .into();
        ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            addrs,
        )
        .build()
        .unwrap()
    }

    #[tokio::test]
    async fn v1_and_v2_name_the_client_and_leave_what_follows() {
        let mut bytes = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 6084\r\n".to_vec();
        bytes.extend_from_slice(b"\x16\x03\x01");
        let (r, rest) = parse(&bytes).await;
        assert_eq!(r.unwrap(), Some("192.0.2.7:40000".parse().unwrap()));
        assert_eq!(rest, b"\x16\x03\x01");

        let mut bytes = v2("[2001:db8::7]:40000", "[::1]:6084");
        bytes.extend_from_slice(b"RFB");
        let (r, rest) = parse(&bytes).await;
        assert_eq!(r.unwrap(), Some("[2001:db8::7]:40000".parse().unwrap()));
        assert_eq!(rest, b"RFB");

        let (r, rest) = parse(b"PROXY UNKNOWN\r\nGET").await;
        assert_eq!(r.unwrap(), None);
        assert_eq!(rest, b"GET");
    }

    #[tokio::test]
    async fn a_local_v2_header_is_the_balancer_itself() {
        let local = ppp::v2::Builder::new(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::AddressFamily::Unspecified | ppp::v2::Protocol::Unspecified,
        )
        .build()
        .unwrap();
        assert_eq!(parse(&local).await.0.unwrap(), None);
    }

    #[tokio::test]
    async fn junk_long_and_short_headers_are_refused() {
        let (r, _) = parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(matches!(r, Err(ProxyHeaderError::Missing)), "{r:?}");
        let (r, _) = parse(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03abcdefgh").await;
        assert!(matches!(r, Err(ProxyHeaderError::Missing)), "{r:?}");

        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        let (r, rest) = parse(long.as_bytes()).await;
        assert!(matches!(r, Err(ProxyHeaderError::TooLong)), "{r:?}");
        assert!(!rest.is_empty(), "stopped at the bound");

        let mut big = v2("192.0.2.7:1", "127.0.0.1:2");
        big[14..16].copy_from_slice(&60_000u16.to_be_bytes());
        let (r, _) = parse(&big).await;
        assert!(matches!(r, Err(ProxyHeaderError::TooLong)), "{r:?}");

        let (r, _) = parse(b"PROXY TCP4 192.0.2.999 127.0.0.1 1 2\r\n").await;
        assert!(matches!(r, Err(ProxyHeaderError::Malformed(_))), "{r:?}");
        let mut bad_version = v2("192.0.2.7:1", "127.0.0.1:2");
        bad_version[12] = 0x31;
        let (r, _) = parse(&bad_version).await;
        assert!(matches!(r, Err(ProxyHeaderError::Malformed(_))), "{r:?}");

        let (r, _) = parse(b"PROXY TCP4 192.0.2.7").await;
        assert!(matches!(r, Err(ProxyHeaderError::Io(_))), "{r:?}");
    }
}
