//! A read buffer that exists only while data is flowing.
//!
//! tungstenite reads its socket in chunks of its `read_buffer_size`, which it
//! allocates up front for every connection: large chunks cost memory on every
//! idle session (128 KiB by default), small chunks cost one system call per
//! few KiB when a client uploads fast. [`LazyRead`] sits between the two: it
//! reads the socket in large chunks into a buffer it allocates when bytes
//! arrive and frees as soon as they are consumed, and hands tungstenite small
//! reads from memory. Idle sessions hold no buffer; busy ones make few calls.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Wraps a stream; reads go through a lazily allocated buffer of `chunk` bytes.
#[derive(Debug)]
pub struct LazyRead<S> {
    inner: S,
    chunk: usize,
    /// Bytes read from `inner` and not yet handed out; `None` when drained.
    buffered: Option<BytesMut>,
}

impl<S> LazyRead<S> {
    /// Reads `inner` in chunks of up to `chunk` bytes.
    pub fn new(inner: S, chunk: usize) -> Self {
        Self {
            inner,
            chunk,
            buffered: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for LazyRead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buffered.is_none() {
            // A caller asking for at least a chunk gets it straight from the socket.
            if out.remaining() >= this.chunk {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            let mut buf = BytesMut::zeroed(this.chunk);
            let mut read = ReadBuf::new(&mut buf);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    buf.truncate(n);
                    this.buffered = Some(buf);
                }
                // Nothing arrived: the allocation goes away with `buf`.
                other => return other,
            }
        }
        let buf = this.buffered.as_mut().expect("filled above");
        let n = buf.len().min(out.remaining());
        out.put_slice(&buf[..n]);
        buf.advance(n);
        if buf.is_empty() {
            this.buffered = None;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for LazyRead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_come_from_one_large_read_and_nothing_is_lost() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        a.write_all(&data).await.unwrap();
        drop(a);
        let mut r = LazyRead::new(b, 64 * 1024);
        let mut got = Vec::new();
        let mut small = [0u8; 1000];
        loop {
            let n = r.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, data);
        assert!(r.buffered.is_none(), "drained buffer is freed");
    }

    #[tokio::test]
    async fn an_idle_stream_holds_no_buffer() {
        let (_a, b) = tokio::io::duplex(1024);
        let mut r = LazyRead::new(b, 64 * 1024);
        let mut small = [0u8; 16];
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(50), r.read(&mut small)).await;
        assert!(pending.is_err());
        assert!(r.buffered.is_none());
    }
}
