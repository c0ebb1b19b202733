//! A read buffer sized to the traffic.
//!
//! A relay that reads each side through a fixed 64 KiB buffer holds it for
//! the whole life of the connection, quiet or not: most consoles are quiet
//! most of the time. [`ElasticBuf`] waits for bytes in a small buffer (what a
//! quiet connection holds), takes a large one once a read fills the small
//! one (bytes are flowing: few system calls), and gives the large one back
//! as soon as a read finds nothing waiting.

use std::io;

use bytes::BytesMut;
use futures_util::FutureExt as _;
use tokio::io::{AsyncRead, AsyncReadExt as _};

/// A quiet connection's buffer: a console's input events (6-10 bytes
/// each), a cursor move. Small because every quiet leg holds one: a native
/// session has two, beside its TLS state (measured: 25 KiB per idle
/// vnc-direct session with 2 KiB here, 1000 sessions).
pub const SMALL: usize = 512;

/// A read buffer that is [`SMALL`] while its stream is quiet and `large`
/// while bytes flow.
#[derive(Debug)]
pub struct ElasticBuf {
    buf: BytesMut,
    large: usize,
    /// The last read filled the small buffer: the next one gets the large.
    grow: bool,
}

impl ElasticBuf {
    /// A buffer that grows to `large` bytes while bytes flow.
    pub fn new(large: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            large: large.max(SMALL),
            grow: false,
        }
    }

    /// Reads what `r` has (waiting for it with the small buffer when nothing
    /// is there); empty at the end of the stream.
    pub async fn read<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> io::Result<&[u8]> {
        self.buf.clear();
        if self.grow {
            self.grow = false;
            self.buf = BytesMut::with_capacity(self.large);
        }
        if self.buf.capacity() > SMALL {
            // Flowing: what is there now goes into the large buffer.
            if let Some(read) = r.read_buf(&mut self.buf).now_or_never() {
                read?;
                return Ok(&self.buf[..]);
            }
        }
        if self.buf.capacity() != SMALL {
            // Quiet (or new): wait with the small one.
            self.buf = BytesMut::with_capacity(SMALL);
        }
        let n = r.read_buf(&mut self.buf).await?;
        self.grow = n == SMALL;
        Ok(&self.buf[..])
    }

    /// The bytes it holds now (for a test).
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    #[tokio::test]
    async fn small_while_quiet_large_while_flowing_and_nothing_lost() {
        let (mut w, mut r) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        w.write_all(&data).await.unwrap();
        let mut buf = ElasticBuf::new(64 * 1024);
        let mut got = Vec::new();
        let mut largest = 0;
        while got.len() < data.len() {
            let chunk = buf.read(&mut r).await.unwrap();
            largest = largest.max(chunk.len());
            got.extend_from_slice(chunk);
        }
        assert_eq!(got, data);
        assert_eq!(largest, 64 * 1024, "large reads while it flows");
        // Nothing more: the next read waits with the small buffer.
        let quiet =
            tokio::time::timeout(std::time::Duration::from_millis(20), buf.read(&mut r)).await;
        assert!(quiet.is_err());
        assert_eq!(buf.capacity(), SMALL);
        w.write_all(b"key").await.unwrap();
        assert_eq!(buf.read(&mut r).await.unwrap(), b"key");
        drop(w);
        assert_eq!(buf.read(&mut r).await.unwrap(), b"");
    }
}
