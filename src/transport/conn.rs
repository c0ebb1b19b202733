//! A connection as a byte stream: plain TCP, or anything boxed (TLS).
//!
//! Handshakes read and write it as one stream. Relays split it: a plain TCP
//! socket is read only once readable, so an idle session holds no read
//! buffer; a boxed stream keeps a buffer while it waits.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Most pieces in one vectored write ([`ConnWriter::write_all_pieces`]
/// makes one per this many; a relay's burst stops at it).
pub const PIECES_PER_WRITE: usize = 64;

/// A byte stream either way: TCP, TLS, or a WebSocket seen as bytes.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A TCP socket, or any other stream.
pub enum Conn {
    /// A plain socket.
    Tcp(TcpStream),
    /// Any other stream (TLS over TCP, mostly).
    Boxed(Box<dyn Io>),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conn::Tcp(_) => "Conn::Tcp",
            Conn::Boxed(_) => "Conn::Boxed",
        })
    }
}

impl Conn {
    /// Wraps any stream.
    pub fn boxed(io: impl Io + 'static) -> Self {
        Conn::Boxed(Box::new(io))
    }

    /// Splits it for a relay.
    pub fn split(self) -> (ConnReader, ConnWriter) {
        match self {
            Conn::Tcp(t) => {
                let (r, w) = t.into_split();
                (ConnReader::Tcp(r), ConnWriter::Tcp(w))
            }
            Conn::Boxed(s) => {
                let (r, w) = tokio::io::split(s);
                (ConnReader::Boxed(r, None), ConnWriter::Boxed(w))
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(t) => Pin::new(t).poll_read(cx, buf),
            Conn::Boxed(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(t) => Pin::new(t).poll_write(cx, buf),
            Conn::Boxed(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(t) => Pin::new(t).poll_flush(cx),
            Conn::Boxed(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(t) => Pin::new(t).poll_shutdown(cx),
            Conn::Boxed(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The read half of a split [`Conn`].
pub enum ConnReader {
    /// A plain socket's read half.
    Tcp(OwnedReadHalf),
    /// The stream, and a chunk read while waiting for readiness.
    Boxed(ReadHalf<Box<dyn Io>>, Option<BytesMut>),
}

impl ConnReader {
    /// Waits until bytes (or the end) can be taken. Cancel-safe.
    pub async fn ready(&mut self) -> io::Result<()> {
        match self {
            ConnReader::Tcp(t) => t.readable().await,
            ConnReader::Boxed(r, pending) => {
                if pending.is_none() {
                    // A quiet connection waits with a small buffer; the
                    // reads that follow take the rest in large ones.
                    let mut buf = BytesMut::with_capacity(crate::transport::elastic::SMALL);
                    r.read_buf(&mut buf).await?;
                    *pending = Some(buf);
                }
                Ok(())
            }
        }
    }

    /// A read that returns less than it had room for emptied the socket
    /// (a plain socket; a stream that decrypts returns a record at a time).
    pub fn short_read_empties(&self) -> bool {
        matches!(self, ConnReader::Tcp(_))
    }

    /// Takes what is ready without waiting: `Ok(0)` is the end,
    /// `WouldBlock` means nothing more now, or (on a plain socket) that the
    /// task has used up its turn and should let others run first.
    pub fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            // Through `poll_read`, not `try_read_buf`: a read short of its
            // room marks the socket not ready, so the next one waits for
            // the kernel to say more came instead of asking at once.
            ConnReader::Tcp(t) => match t.read_buf(buf).now_or_never() {
                Some(result) => result,
                None => Err(io::ErrorKind::WouldBlock.into()),
            },
            ConnReader::Boxed(r, pending) => {
                if let Some(p) = pending.take() {
                    let n = p.len();
                    buf.extend_from_slice(&p);
                    return Ok(n);
                }
                match r.read_buf(buf).now_or_never() {
                    Some(result) => result,
                    None => Err(io::ErrorKind::WouldBlock.into()),
                }
            }
        }
    }
}

impl ConnReader {
    /// Joins the halves of one [`Conn`] again, with the bytes this half had
    /// read and not handed out. `None` for halves of different connections.
    pub fn reunite(self, writer: ConnWriter) -> Option<(Conn, Vec<u8>)> {
        match (self, writer) {
            (ConnReader::Tcp(r), ConnWriter::Tcp(w)) => {
                r.reunite(w).ok().map(|t| (Conn::Tcp(t), Vec::new()))
            }
            (ConnReader::Boxed(r, pending), ConnWriter::Boxed(w)) if r.is_pair_of(&w) => Some((
                Conn::Boxed(r.unsplit(w)),
                pending.map(|p| p.to_vec()).unwrap_or_default(),
            )),
            _ => None,
        }
    }
}

/// The write half of a split [`Conn`].
pub enum ConnWriter {
    /// A plain socket's write half.
    Tcp(OwnedWriteHalf),
    /// Any other stream's.
    Boxed(WriteHalf<Box<dyn Io>>),
}

impl ConnWriter {
    /// Writes all of `data` (and flushes a buffered stream).
    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            ConnWriter::Tcp(t) => t.write_all(data).await,
            ConnWriter::Boxed(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
        }
    }

    /// Writes all of `pieces`, in order: a plain socket with vectored
    /// writes (nothing is copied to join them), any other stream piece by
    /// piece, then flushed.
    pub async fn write_all_pieces(&mut self, pieces: &[Bytes]) -> io::Result<()> {
        match self {
            ConnWriter::Tcp(t) => {
                for group in pieces.chunks(PIECES_PER_WRITE) {
                    let mut slices = [IoSlice::new(&[]); PIECES_PER_WRITE];
                    for (slice, piece) in slices.iter_mut().zip(group) {
                        *slice = IoSlice::new(piece);
                    }
                    let mut left = &mut slices[..group.len()];
                    while !left.is_empty() {
                        let n = t.write_vectored(left).await?;
                        if n == 0 {
                            return Err(io::ErrorKind::WriteZero.into());
                        }
                        IoSlice::advance_slices(&mut left, n);
                    }
                }
                Ok(())
            }
            ConnWriter::Boxed(s) => {
                for piece in pieces {
                    s.write_all(piece).await?;
                }
                s.flush().await
            }
        }
    }

    /// Half-closes it.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            ConnWriter::Tcp(t) => t.shutdown().await,
            ConnWriter::Boxed(s) => s.shutdown().await,
        }
    }
}
