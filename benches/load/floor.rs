//! The floor: what relaying a WebSocket upload costs with nothing but the
//! protocol's own work (`--relay LISTEN FAR --floor`; target `floor`).
//!
//! A browser's bytes reach a console only after three passes over them that
//! no WebSocket relay can skip: the kernel's copy out of the client's socket,
//! the unmask (RFC 6455 §5.3: every client frame is masked), and the kernel's
//! copy into the far side's socket. This relay does those and as little else
//! as a relay can: one read buffer of Porthole's largest read size, allocated
//! once and so always warm (`--floor-fresh`, target `floor+fresh`: a new one
//! for every read, freed once written, as Porthole does); frame headers parsed in place; payloads unmasked
//! in place and written with one vectored write per read; no message
//! assembly, no buffer but that one, no limits, no control frames (a client of the
//! load tool sends none). It is not a proxy anyone should run: it is the
//! measure of how far below relay+opts a relay of this machine's WebSocket
//! uploads can go (benches/README.md, "The floor of a WebSocket upload").
//!
//! The downstream direction is the plain relay's: one read from the far side,
//! one unmasked binary frame to the client.

use std::io::IoSlice;
use std::net::SocketAddr;

use bytes::{Buf as _, BytesMut};
use porthole::transport::ws_bypass::unmask;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Porthole's largest socket read on the upload path (`READ_CHUNK_MAX` in
/// `src/transport/ws_bypass.rs`).
const READ: usize = 256 * 1024;

/// One client: the HTTP upgrade, the far side, then both directions. With
/// `fresh`, every read goes into a buffer of its own, freed once its
/// payloads are written (as Porthole's are, so that an idle console holds
/// none), instead of the one warm buffer.
pub(super) async fn serve(
    mut client: TcpStream,
    far: SocketAddr,
    fresh: bool,
) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    socket2::SockRef::from(&client).set_tcp_notsent_lowat(super::PORTHOLE_NOTSENT_LOWAT)?;
    upgrade(&mut client).await?;
    let far = TcpStream::connect(far).await?;
    far.set_nodelay(true)?;
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut far_rd, mut far_wr) = far.into_split();
    let up = async {
        let mut buf = BytesMut::with_capacity(READ);
        let mut frames = Frames::default();
        let mut runs = Vec::new();
        loop {
            // Into the buffer's spare capacity, after the start of a header
            // the last read cut.
            let n = client_rd.read_buf(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            let Some(used) = frames.unmask(&mut buf[..], &mut runs) else {
                return Ok(()); // a close, or a frame this floor does not relay
            };
            write_runs(&mut far_wr, &buf, &runs).await?;
            runs.clear();
            if fresh {
                let mut next = BytesMut::with_capacity(READ);
                next.extend_from_slice(&buf[used..]);
                buf = next;
            } else {
                // The same allocation: what is kept moves to its front.
                buf.advance(used);
                buf.reserve(READ - buf.len());
            }
        }
    };
    let down = async {
        // A read of at most 65,535 bytes: its header (two bytes, or four
        // with a 16-bit length) fits the four in front of it.
        let mut buf = vec![0u8; 4 + usize::from(u16::MAX)];
        loop {
            let n = far_rd.read(&mut buf[4..]).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            let start = if n < 126 {
                buf[2] = 0x82;
                buf[3] = n as u8;
                2
            } else {
                buf[0] = 0x82;
                buf[1] = 126;
                buf[2..4].copy_from_slice(&(n as u16).to_be_bytes());
                0
            };
            client_wr.write_all(&buf[start..4 + n]).await?;
        }
    };
    tokio::select! { r = up => r, r = down => r }
}

/// Reads the client's upgrade request and answers 101 (no subprotocol, as
/// the relays answer).
async fn upgrade(client: &mut TcpStream) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = client.read(&mut chunk).await?;
        if n == 0 || request.len() + n > 8192 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        request.extend_from_slice(&chunk[..n]);
    }
    let key = std::str::from_utf8(&request)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.trim()
                    .eq_ignore_ascii_case("sec-websocket-key")
                    .then(|| value.trim().to_owned())
            })
        })
        .ok_or(std::io::ErrorKind::InvalidData)?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    client
        .write_all(
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
}

/// Where the client's frames stand between reads.
#[derive(Default)]
struct Frames {
    /// Payload bytes of the current frame not yet read.
    left: u64,
    mask: [u8; 4],
    /// How far into its payload the current frame is, modulo 4.
    phase: usize,
}

impl Frames {
    /// Unmasks every payload byte in `buf` in place and lists where they
    /// lie in `runs`; returns how much of `buf` it used (the rest is the
    /// start of a header), or `None` at a frame that is not binary data.
    fn unmask(&mut self, buf: &mut [u8], runs: &mut Vec<(usize, usize)>) -> Option<usize> {
        let mut at = 0;
        loop {
            if self.left > 0 {
                let take = (buf.len() - at).min(usize::try_from(self.left).unwrap_or(usize::MAX));
                if take == 0 {
                    return Some(at);
                }
                // Porthole's own unmask.
                unmask(&mut buf[at..at + take], self.mask, self.phase as u64);
                runs.push((at, at + take));
                self.phase = (self.phase + take) % 4;
                self.left -= take as u64;
                at += take;
                continue;
            }
            let head = &buf[at..];
            if head.len() < 2 {
                return Some(at);
            }
            // Binary (2) or continuation (0), masked; anything else ends it.
            if !matches!(head[0] & 0x0f, 0 | 2) || head[1] & 0x80 == 0 {
                return None;
            }
            let (len, len_bytes) = match head[1] & 0x7f {
                126 if head.len() >= 4 => (u64::from(u16::from_be_bytes([head[2], head[3]])), 2),
                127 if head.len() >= 10 => (
                    u64::from_be_bytes(head[2..10].try_into().expect("8 bytes")),
                    8,
                ),
                126 | 127 => return Some(at),
                n => (u64::from(n), 0),
            };
            let header = 2 + len_bytes + 4;
            if head.len() < header {
                return Some(at);
            }
            self.mask = head[header - 4..header].try_into().expect("4 bytes");
            self.left = len;
            self.phase = 0;
            at += header;
        }
    }
}

/// Writes `buf`'s `runs` in order, one vectored write while they fit.
async fn write_runs(
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    buf: &[u8],
    runs: &[(usize, usize)],
) -> std::io::Result<()> {
    let (mut i, mut skip) = (0, 0);
    while i < runs.len() {
        let slices: Vec<IoSlice<'_>> = runs[i..]
            .iter()
            .enumerate()
            .map(|(k, &(a, b))| IoSlice::new(&buf[a + if k == 0 { skip } else { 0 }..b]))
            .collect();
        let mut n = to.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while i < runs.len() && n > 0 {
            let rest = runs[i].1 - runs[i].0 - skip;
            if n >= rest {
                n -= rest;
                i += 1;
                skip = 0;
            } else {
                skip += n;
                n = 0;
            }
        }
    }
    Ok(())
}
