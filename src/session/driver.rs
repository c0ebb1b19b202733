//! One driver for every sans-IO handshake machine.
//!
//! [`drive`] feeds a [`Machine`] from a stream and writes what it answers
//! until the machine has a step for its caller, all before one deadline: a
//! connection gets one deadline for its whole handshake (TLS included), not
//! one per read.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::time::Instant;

use crate::protocol::Machine;

/// Why driving a machine stopped short of a step.
#[derive(Debug)]
pub enum DriveError<F> {
    /// The machine refused the peer's bytes.
    Refused(F),
    /// The peer closed the stream.
    Closed,
    /// Reading failed.
    Read(io::Error),
    /// Writing failed.
    Write(io::Error),
    /// The deadline passed.
    TimedOut,
}

/// Runs `machine` on `io` until it has a step, writing its output as it goes.
pub async fn drive<M, S>(
    machine: &mut M,
    io: &mut S,
    deadline: Instant,
) -> Result<M::Step, DriveError<M::Failure>>
where
    M: Machine,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut buf = [0u8; 4096];
    let run = async {
        loop {
            let step = machine.poll().map_err(DriveError::Refused)?;
            let out = machine.take_output();
            if !out.is_empty() {
                write(io, &out).await.map_err(DriveError::Write)?;
            }
            if let Some(step) = step {
                return Ok(step);
            }
            match io.read(&mut buf).await {
                Ok(0) => return Err(DriveError::Closed),
                Ok(n) => machine.feed(&buf[..n]),
                Err(e) => return Err(DriveError::Read(e)),
            }
        }
    };
    tokio::time::timeout_at(deadline, run)
        .await
        .unwrap_or(Err(DriveError::TimedOut))
}

/// Writes and flushes `data` before `deadline` (answers a machine hands
/// back from a decision rather than from its output).
pub async fn send<S>(io: &mut S, data: &[u8], deadline: Instant) -> io::Result<()>
where
    S: AsyncWrite + Unpin + ?Sized,
{
    tokio::time::timeout_at(deadline, write(io, data))
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

async fn write<S: AsyncWrite + Unpin + ?Sized>(io: &mut S, data: &[u8]) -> io::Result<()> {
    io.write_all(data).await?;
    io.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::rfb::upstream::{Upstream, UpstreamAuth, UpstreamStep};
    use std::time::Duration;

    #[tokio::test]
    async fn drives_a_machine_to_its_step_and_writes_its_answers() {
        // A hypervisor offering RFB 3.8 with security type None.
        let (mut near, mut far) = tokio::io::duplex(1024);
        let server = tokio::spawn(async move {
            far.write_all(b"RFB 003.008\n").await.unwrap();
            let mut version = [0u8; 12];
            far.read_exact(&mut version).await.unwrap();
            far.write_all(&[1, 1]).await.unwrap();
            let mut choice = [0u8; 1];
            far.read_exact(&mut choice).await.unwrap();
            far.write_all(&0u32.to_be_bytes()).await.unwrap();
            (version, choice)
        });
        let mut m = Upstream::new(vec![UpstreamAuth::None], b"");
        let deadline = Instant::now() + Duration::from_secs(5);
        let step = drive(&mut m, &mut near, deadline).await.unwrap();
        assert!(matches!(
            step,
            UpstreamStep::Authenticated(UpstreamAuth::None)
        ));
        let (version, choice) = server.await.unwrap();
        assert_eq!(&version, b"RFB 003.008\n");
        assert_eq!(choice, [1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_cut_at_the_deadline() {
        let (mut near, _far) = tokio::io::duplex(1024);
        let mut m = Upstream::new(vec![UpstreamAuth::None], b"");
        let deadline = Instant::now() + Duration::from_secs(60);
        let got = drive(&mut m, &mut near, deadline).await;
        assert!(matches!(got, Err(DriveError::TimedOut)));
        assert!(Instant::now() >= deadline);
    }

    #[tokio::test]
    async fn a_closed_peer_is_told_apart_from_a_refusal() {
        let (mut near, far) = tokio::io::duplex(1024);
        drop(far);
        let mut m = Upstream::new(vec![UpstreamAuth::None], b"");
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(matches!(
            drive(&mut m, &mut near, deadline).await,
            Err(DriveError::Closed)
        ));
        let (mut near, mut far) = tokio::io::duplex(1024);
        far.write_all(b"HTTP/1.1 400\r\n\r\n").await.unwrap();
        let mut m = Upstream::new(vec![UpstreamAuth::None], b"");
        assert!(matches!(
            drive(&mut m, &mut near, deadline).await,
            Err(DriveError::Refused(_))
        ));
    }
}
