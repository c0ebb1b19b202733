//! A deadline on writes a peer does not take.
//!
//! hyper bounds how long a request's headers may take, but not how long a
//! response may wait on a peer that reads none of it: a client that asks
//! for a page or a file larger than the socket's buffers and then stops
//! reading would hold its connection (and its place at the gate) for
//! good. [`WriteStall`] fails a write that has waited that long with no
//! byte taken. Any progress starts the wait again, so a slow download
//! goes on. A connection upgraded to a session turns it off
//! ([`StallSwitch::off`]): the session's relays judge their client's
//! reading themselves, and must not lose a console to a deadline meant for
//! HTTP.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A stream whose writes fail once they have waited `stall` with nothing
/// taken, until it is switched off.
#[derive(Debug)]
pub struct WriteStall<I> {
    inner: I,
    stall: Duration,
    on: Arc<AtomicBool>,
    /// The running wait's deadline (made at the first write that waits,
    /// then reset: one allocation a connection at most).
    timer: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

/// Turns a [`WriteStall`]'s deadline off, from outside the stream (which
/// hyper holds by then).
#[derive(Debug, Clone)]
pub struct StallSwitch(Arc<AtomicBool>);

impl StallSwitch {
    /// No deadline from now on.
    pub fn off(&self) {
        // Release: whoever sees it off (a session's task, maybe on another
        // worker) sees everything before it.
        self.0.store(false, Ordering::Release);
    }
}

impl<I> WriteStall<I> {
    /// `inner` under a deadline of `stall`, and the switch that ends it.
    pub fn new(inner: I, stall: Duration) -> (Self, StallSwitch) {
        let on = Arc::new(AtomicBool::new(true));
        let stream = Self {
            inner,
            stall,
            on: on.clone(),
            timer: None,
            waiting: false,
        };
        (stream, StallSwitch(on))
    }

    /// After a write that did not complete (`pending`) or did: `Err` once
    /// the wait has lasted `stall`.
    fn judge<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if !r.is_pending() {
            self.waiting = false;
            return r;
        }
        if !self.on.load(Ordering::Acquire) {
            // A timer armed before the switch would wake the session once.
            self.timer = None;
            return r;
        }
        let stall = self.stall;
        let timer = match &mut self.timer {
            Some(timer) => {
                if !self.waiting {
                    timer.as_mut().reset(Instant::now() + stall);
                }
                timer
            }
            None => {
                let sleep = tokio::time::sleep_until(Instant::now() + stall);
                self.timer.insert(Box::pin(sleep))
            }
        };
        self.waiting = true;
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.waiting = false;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer took no byte of a response within the deadline",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteStall<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteStall<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.judge(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.judge(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.judge(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.judge(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const STALL: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn a_write_nobody_takes_fails_at_the_deadline() {
        let (_peer, ours) = tokio::io::duplex(1024);
        let (mut ours, _switch) = WriteStall::new(ours, STALL);
        let started = Instant::now();
        let e = ours.write_all(&[0; 4096]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), STALL);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_gets_everything() {
        let (mut peer, ours) = tokio::io::duplex(1024);
        let (mut ours, _switch) = WriteStall::new(ours, STALL);
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0; 512];
            loop {
                // Each read well within the deadline; the whole far past it.
                tokio::time::sleep(STALL / 2).await;
                match peer.read(&mut buf).await.unwrap() {
                    0 => return got,
                    n => got += n,
                }
            }
        });
        ours.write_all(&[7; 64 * 1024]).await.unwrap();
        ours.shutdown().await.unwrap();
        drop(ours);
        assert_eq!(reader.await.unwrap(), 64 * 1024);
    }

    #[tokio::test(start_paused = true)]
    async fn writes_that_wait_again_before_any_progress_share_one_deadline() {
        let (_peer, ours) = tokio::io::duplex(1024);
        let (mut ours, _switch) = WriteStall::new(ours, STALL);
        let started = Instant::now();
        let first = tokio::time::timeout(STALL / 2, ours.write_all(&[0; 4096])).await;
        assert!(first.is_err(), "waiting");
        // The next write (as hyper's flush would) takes nothing either: it
        // is judged by the same wait, not a new one.
        let e = ours.write_all(&[0; 4096]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), STALL);
    }

    #[tokio::test(start_paused = true)]
    async fn switched_off_while_waiting_the_write_waits_on() {
        let (_peer, ours) = tokio::io::duplex(1024);
        let (mut ours, switch) = WriteStall::new(ours, STALL);
        let first = tokio::time::timeout(STALL / 2, ours.write_all(&[0; 4096])).await;
        assert!(first.is_err(), "waiting");
        switch.off();
        let waited = tokio::time::timeout(STALL * 60, ours.write_all(&[0; 4096])).await;
        assert!(waited.is_err(), "still waiting, not failed");
        assert!(ours.timer.is_none(), "the armed timer is dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn switched_off_a_write_waits_as_long_as_it_takes() {
        let (_peer, ours) = tokio::io::duplex(1024);
        let (mut ours, switch) = WriteStall::new(ours, STALL);
        switch.off();
        let waited = tokio::time::timeout(STALL * 60, ours.write_all(&[0; 4096])).await;
        assert!(waited.is_err(), "still waiting, not failed");
    }
}
