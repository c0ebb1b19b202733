//! TCP keepalive for console connections whose far end may vanish without
//! a word: a hypervisor host that lost power or its network, a native
//! client's laptop that went to sleep or changed networks. Such a peer
//! sends nothing, not even a reset, and a session waiting on it would hold
//! its slot (and its token, under the `reconnect` policy: the user could
//! not open the console again) until it idled out, or for the quarter of an
//! hour of retransmissions the kernel gives bytes it cannot deliver.
//! Browsers' sockets have WebSocket pings instead.

use std::time::Duration;

use tokio::net::TcpStream;

/// After `after` with nothing received, the kernel probes the peer, every
/// `after / 3`. The connection fails `2 × after` after its last byte from
/// the peer (TCP_USER_TIMEOUT; set, it is what ends the probing, not their
/// count), or once bytes it sent stay unacknowledged, or the peer's receive
/// window stays closed, that long (Linux 5.11 on: a peer that stops reading
/// is given up as well, though it answers the zero-window probes): its reads
/// and writes then end in an error, and its session ends as that side's
/// failure.
pub fn keep_alive(tcp: &TcpStream, after: Duration) {
    let every = (after / 3).max(Duration::from_secs(1));
    let probes = socket2::TcpKeepalive::new()
        .with_time(after)
        .with_interval(every)
        .with_retries(3);
    let sock = socket2::SockRef::from(tcp);
    if let Err(e) = sock.set_tcp_keepalive(&probes) {
        tracing::warn!("cannot set TCP keepalive on a console connection: {e}");
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = sock.set_tcp_user_timeout(Some(after * 2)) {
        tracing::warn!("cannot set TCP_USER_TIMEOUT on a console connection: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_is_probed_and_given_up_after_twice_its_keepalive() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        keep_alive(&tcp, Duration::from_secs(30));
        let sock = socket2::SockRef::from(&tcp);
        assert!(sock.keepalive().unwrap());
        assert_eq!(
            (
                sock.tcp_keepalive_time().unwrap(),
                sock.tcp_keepalive_interval().unwrap(),
                sock.tcp_keepalive_retries().unwrap(),
            ),
            (Duration::from_secs(30), Duration::from_secs(10), 3)
        );
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(60))
        );
        // Short settings (tests use them) probe every second at least.
        keep_alive(&tcp, Duration::from_secs(2));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(1)
        );
    }
}
