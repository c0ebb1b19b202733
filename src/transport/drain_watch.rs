//! Whether a client drains what is sent to it.
//!
//! A client is alive while it reads: that is what a relay needs to know,
//! and neither frames the client sends nor bytes the kernel accepts prove it
//! (a client that never reads still has a socket buffer to fill, and may
//! send pongs nobody asked for). [`Watched`] wraps the client's socket and
//! notes when a write has to wait (the client's window and our socket buffer
//! are full: it *owes* us a read) and when a waiting write goes through
//! again (it *drained*). A slow reader stalls and drains all the time; one
//! that stopped reading stalls and stays stalled.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// What a [`Watched`] socket saw, shared with whoever judges the client.
#[derive(Debug)]
pub struct DrainWatch {
    origin: Instant,
    /// Milliseconds after `origin` (plus one; zero: not stalled) since when
    /// a write has been waiting.
    stalled_since: AtomicU64,
    /// Milliseconds after `origin` (plus one; zero: never) a waiting write
    /// last went through.
    drained_at: AtomicU64,
}

impl DrainWatch {
    /// A watch with nothing seen yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            stalled_since: AtomicU64::new(0),
            drained_at: AtomicU64::new(0),
        })
    }

    fn stamp(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    fn at(&self, stamp: u64) -> Option<Instant> {
        (stamp != 0).then(|| self.origin + std::time::Duration::from_millis(stamp - 1))
    }

    /// Since when a write has been waiting for the client, if one is.
    pub fn stalled_since(&self) -> Option<Instant> {
        self.at(self.stalled_since.load(Relaxed))
    }

    /// When the client last made room for a waiting write.
    pub fn drained_at(&self) -> Option<Instant> {
        self.at(self.drained_at.load(Relaxed))
    }

    fn waiting(&self) {
        if self.stalled_since.load(Relaxed) == 0 {
            self.stalled_since.store(self.stamp(), Relaxed);
        }
    }

    fn wrote(&self) {
        if self.stalled_since.swap(0, Relaxed) != 0 {
            self.drained_at.store(self.stamp(), Relaxed);
        }
    }
}

/// A socket whose writes are watched.
pub trait Drains {
    /// What its writes showed.
    fn drain_watch(&self) -> &Arc<DrainWatch>;
}

/// Wraps a client's socket; reads pass through, writes are watched.
#[derive(Debug)]
pub struct Watched<S> {
    inner: S,
    watch: Arc<DrainWatch>,
}

impl<S> Watched<S> {
    /// Watches the writes to `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            watch: DrainWatch::new(),
        }
    }

    fn note<T>(&self, polled: &Poll<io::Result<T>>, wrote: impl Fn(&T) -> bool) {
        match polled {
            Poll::Pending => self.watch.waiting(),
            Poll::Ready(Ok(n)) if wrote(n) => self.watch.wrote(),
            Poll::Ready(_) => {}
        }
    }
}

impl<S> Drains for Watched<S> {
    fn drain_watch(&self) -> &Arc<DrainWatch> {
        &self.watch
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.note(&polled, |n| *n > 0);
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.note(&polled, |n| *n > 0);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        // A flush that waits is the client's too (TLS buffers ahead of TCP).
        this.note(&polled, |_| true);
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    #[tokio::test(start_paused = true)]
    async fn a_write_that_waits_is_owed_and_one_that_goes_through_again_drained() {
        let (ours, mut theirs) = tokio::io::duplex(8);
        let mut w = Watched::new(ours);
        let watch = w.drain_watch().clone();
        w.write_all(b"1234").await.unwrap();
        assert_eq!((watch.stalled_since(), watch.drained_at()), (None, None));
        // The pipe holds 8 bytes: the next write waits for the reader.
        let started = Instant::now();
        let mut write = Box::pin(w.write_all(b"56789abc"));
        assert!(futures_util::poll!(write.as_mut()).is_pending());
        assert_eq!(watch.stalled_since(), Some(started));
        tokio::time::advance(std::time::Duration::from_secs(5)).await;
        let mut buf = [0u8; 8];
        tokio::io::AsyncReadExt::read(&mut theirs, &mut buf)
            .await
            .unwrap();
        write.await.unwrap();
        assert_eq!(watch.stalled_since(), None);
        assert_eq!(
            watch.drained_at(),
            Some(started + std::time::Duration::from_secs(5))
        );
    }
}
