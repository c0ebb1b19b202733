//! The public front end in-process: a whole gateway on free loopback ports,
//! a fake console (TCP echo) and tokio-tungstenite as the client. Fast checks of the
//! paths the end-to-end suite proves against QEMU and Chromium.

use crate::common;

use common::{Gateway, LOOPBACK_BACKEND, echo_console, spawn_gateway, tokens_toml};
use futures_util::{SinkExt, StreamExt};
use porthole::token::claims::ConsoleType;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A gateway with `websocket` in its `[websocket]` section.
async fn start(websocket: &str) -> Gateway {
    start_with("", websocket).await
}

/// A gateway with `listen` in its `[listen]` section too.
async fn start_with(listen: &str, websocket: &str) -> Gateway {
    start_in(tempfile::tempdir().unwrap(), listen, websocket).await
}

/// [`start_with`] in `dir` (its config's relative paths start there);
/// `websocket` may end with sections of its own.
async fn start_in(dir: tempfile::TempDir, listen: &str, websocket: &str) -> Gateway {
    let toml = format!(
        r#"
[listen]
public = "127.0.0.1:0"
admin = "127.0.0.1:0"
public_base_url = "https://consoles.test"
{listen}
{tokens}
[websocket]
{websocket}
{LOOPBACK_BACKEND}"#,
        tokens = tokens_toml("")
    );
    spawn_gateway(dir, toml).await
}

impl Gateway {
    /// `/route?token=…` for a `kind` console at `port`.
    fn path(&self, route: &str, kind: ConsoleType, port: u16) -> String {
        format!("/{route}?token={}", self.token(kind, port, "vm"))
    }

    /// A socket to `path` on the public listener, with its subprotocol;
    /// the HTTP status when refused.
    async fn connect(
        &self,
        path: &str,
        origin: Option<&str>,
        protocol: Option<&str>,
    ) -> Result<(Ws, Option<String>), u16> {
        let mut req = format!("ws://{}{path}", self.public)
            .into_client_request()
            .unwrap();
        if let Some(o) = origin {
            req.headers_mut().insert("Origin", o.parse().unwrap());
        }
        if let Some(p) = protocol {
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, resp)) => {
                let proto = resp
                    .headers()
                    .get("sec-websocket-protocol")
                    .map(|v| v.to_str().unwrap().to_string());
                Ok((ws, proto))
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("{e}"),
        }
    }

    /// A socket to `path`, without Origin or subprotocol, that must open.
    async fn open(&self, path: &str) -> Ws {
        self.connect(path, None, None).await.unwrap().0
    }

    /// The status a socket to `path` (without Origin or subprotocol) is
    /// refused with; `None` if it opens.
    async fn refusal(&self, path: &str) -> Option<u16> {
        self.connect(path, None, None).await.err()
    }
}

#[tokio::test]
async fn bytes_cross_both_ways_and_binary_is_echoed_only_when_offered() {
    let g = start("").await;
    let port = echo_console().await;
    // Serial consoles are relayed as raw bytes (VNC goes through the RFB
    // security proxy first, tested against QEMU in tests/e2e).
    let (mut ws, proto) = g
        .connect(
            &g.path("serial", ConsoleType::Serial, port),
            Some("https://consoles.test"),
            Some("binary"),
        )
        .await
        .unwrap();
    assert_eq!(proto.as_deref(), Some("binary"));
    let payload: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    ws.send(Message::Binary(payload.clone().into()))
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < payload.len() {
        match ws.next().await.unwrap().unwrap() {
            Message::Binary(b) => got.extend_from_slice(&b),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, payload);
    ws.close(None).await.unwrap();

    // websockify's text protocol is not served, and is refused as such (no
    // silent "yes" to a protocol Porthole does not speak).
    assert_eq!(
        g.connect(
            &g.path("serial", ConsoleType::Serial, port),
            Some("https://consoles.test"),
            Some("base64"),
        )
        .await
        .err(),
        Some(400)
    );

    // noVNC 1.3 offers no subprotocol: none is answered.
    let path = g.path("websockify", ConsoleType::Novnc, port);
    let (_ws, proto) = g.connect(&path, None, None).await.unwrap();
    assert_eq!(proto, None);
    g.stop().await;
}

#[tokio::test]
async fn refusals_are_http_errors_before_any_upgrade() {
    let g = start("").await;
    let port = echo_console().await;
    let good = g.token(ConsoleType::Novnc, port, "vm");
    assert_eq!(
        g.refusal(&format!("/vnc?token={good}")).await,
        None,
        "the good token passes"
    );
    assert_eq!(g.refusal(&format!("/serial?token={good}")).await, Some(403));
    assert_eq!(g.refusal("/vnc?token=nope").await, Some(400));
    assert_eq!(g.refusal("/vnc").await, Some(401));
    let other = g.path("vnc", ConsoleType::Novnc, port);
    assert_eq!(
        g.connect(&other, Some("https://evil.test"), None)
            .await
            .err(),
        Some(403)
    );
    // The hypervisor is down: 502 before the upgrade, nothing accepted.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let path = g.path("vnc", ConsoleType::Novnc, dead);
    assert_eq!(g.refusal(&path).await, Some(502));
    g.stop().await;
}

#[tokio::test]
async fn the_session_cap_answers_503_and_frees_its_slot() {
    let g = start("max_sessions = 1").await;
    let port = echo_console().await;
    let mut first = g.open(&g.path("vnc", ConsoleType::Novnc, port)).await;
    let second = g.path("vnc", ConsoleType::Novnc, port);
    assert_eq!(g.refusal(&second).await, Some(503));
    first.close(None).await.unwrap();
    while first.next().await.is_some() {}
    // The slot comes back once the first session has ended.
    for _ in 0..100 {
        if g.app.sessions.active() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(g.refusal(&second).await, None);
    g.stop().await;
}

#[tokio::test]
async fn per_client_and_per_token_caps_answer_429_and_count() {
    let g = start("max_sessions_per_client = 2\nmax_sessions_per_token = 1").await;
    let (a, b, c) = (
        echo_console().await,
        echo_console().await,
        echo_console().await,
    );
    let first = g.path("serial", ConsoleType::Serial, a);
    let _one = g.open(&first).await;
    // The same token again (reconnect policy would allow it once the first
    // ends): the per-token cap speaks first.
    assert_eq!(g.refusal(&first).await, Some(429));
    let _two = g.open(&g.path("serial", ConsoleType::Serial, b)).await;
    // A third console from the same address: the per-client cap.
    let third = g.path("serial", ConsoleType::Serial, c);
    assert_eq!(g.refusal(&third).await, Some(429));
    g.stop().await;
}

#[tokio::test]
async fn sessions_end_at_their_maximum_age_with_4004() {
    let g = start("max_session_age_secs = 1").await;
    let port = echo_console().await;
    let mut ws = g.open(&g.path("serial", ConsoleType::Serial, port)).await;
    let started = std::time::Instant::now();
    // A generous bound: ten times the configured age.
    let (code, reason) = close_of(&mut ws).await;
    assert_eq!(code, 4004);
    assert_eq!(reason, "maximum session age reached");
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    g.stop().await;
}

#[tokio::test]
async fn shutdown_sends_going_away() {
    let g = start("").await;
    let port = echo_console().await;
    let mut ws = g.open(&g.path("serial", ConsoleType::Serial, port)).await;
    g.app.sessions.cancel.cancel();
    match ws.next().await {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1001);
            assert_eq!(frame.reason.as_str(), "gateway shutting down");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    g.stop().await;
}

#[tokio::test]
async fn a_client_close_is_answered_and_an_invalid_code_gets_1002() {
    use tokio_tungstenite::tungstenite::protocol::{CloseFrame, frame::coding::CloseCode};
    let g = start("").await;
    let port = echo_console().await;
    for (sent, answered) in [(1000, 1000), (999, 1002), (1005, 1002), (4321, 4321)] {
        let mut ws = g.open(&g.path("serial", ConsoleType::Serial, port)).await;
        echoes(&mut ws, b"up").await;
        ws.close(Some(CloseFrame {
            code: CloseCode::from(sent),
            reason: "bye".into(),
        }))
        .await
        .unwrap();
        assert_eq!(close_of(&mut ws).await.0, answered, "client sent {sent}");
    }
    g.stop().await;
}

/// Reads until a close frame (within ten seconds); returns its code and reason.
async fn close_of(ws: &mut Ws) -> (u16, String) {
    let frame = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("no close frame within ten seconds")
    .expect("a close frame with a code");
    (u16::from(frame.code), frame.reason.to_string())
}

async fn echoes(ws: &mut Ws, what: &'static [u8]) {
    ws.send(Message::Binary(what.to_vec().into()))
        .await
        .unwrap();
    let back = tokio::time::timeout(std::time::Duration::from_secs(5), ws.next())
        .await
        .expect("an echo within five seconds")
        .unwrap()
        .unwrap();
    assert_eq!(back.into_data().as_ref(), what);
}

#[tokio::test]
async fn under_takeover_a_second_connection_ends_the_first_with_4006() {
    // Horizon's "show only console": the same URL in a new tab while the
    // iframe's socket is open. Serial also holds its console exclusively,
    // which the takeover must free too.
    let g = start("\n[tokens.reuse]\nserial = \"takeover\"").await;
    let port = echo_console().await;
    let path = g.path("serial", ConsoleType::Serial, port);
    let mut first = g.open(&path).await;
    echoes(&mut first, b"first").await;
    let (mut second, _) = g
        .connect(&path, None, None)
        .await
        .expect("the second connection takes over");
    let (code, reason) = close_of(&mut first).await;
    assert_eq!(code, 4006);
    assert_eq!(reason, "taken over by a newer connection");
    echoes(&mut second, b"second").await;
    // One token, one session, at every moment.
    let live = g.app.sessions.registry.list(&Default::default()).await;
    assert_eq!(live.len(), 1, "{live:?}");
    // And it can be taken over again (a third tab), as often as wanted.
    let mut third = g.open(&path).await;
    assert_eq!(close_of(&mut second).await.0, 4006);
    echoes(&mut third, b"third").await;
    g.stop().await;
}

#[tokio::test]
async fn a_session_ended_while_its_client_still_sends_closes_with_its_code_not_a_reset() {
    // noVNC keeps asking for updates: when a takeover (or any end) comes,
    // bytes of the client's are still unread. A socket closed over unread
    // bytes is reset, and a browser whose reply then fails reports 1006
    // ("Disconnected."), not the close frame it was sent. The close frame
    // must be followed by an orderly end: Porthole half-closes and reads
    // until the client has closed too.
    let g = start("\n[tokens.reuse]\nserial = \"takeover\"").await;
    let port = deaf_console().await;
    let path = g.path("serial", ConsoleType::Serial, port);
    let mut first = g.open(&path).await;
    // Fill every buffer between the client and the console that never reads.
    let chunk = vec![7u8; 60 * 1024];
    loop {
        let send = first.send(Message::Binary(chunk.clone().into()));
        if tokio::time::timeout(std::time::Duration::from_millis(300), send)
            .await
            .is_err()
        {
            break;
        }
    }
    let (mut second, _) = g
        .connect(&path, None, None)
        .await
        .expect("the second connection takes over");
    let (code, _) = close_of(&mut first).await;
    assert_eq!(code, 4006);
    ends_in_order(&mut first).await;
    drop(second.close(None).await);
    g.stop().await;
}

#[tokio::test]
async fn a_message_over_the_limit_closes_with_1009_not_a_reset() {
    // A paste over the message limit: tungstenite stops at the frame's
    // header, and the rest of it is still unread when the session ends.
    let g = start("max_message_bytes = 65536\nmax_frame_bytes = 65536").await;
    let port = echo_console().await;
    let mut ws = g.open(&g.path("serial", ConsoleType::Serial, port)).await;
    echoes(&mut ws, b"before").await;
    let paste = Message::Binary(vec![b'p'; 4 << 20].into());
    // Some of it may never be read: the send need not finish.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), ws.send(paste)).await;
    let (code, _) = close_of(&mut ws).await;
    assert_eq!(code, 1009);
    ends_in_order(&mut ws).await;
    g.stop().await;
}

/// After its close frame, the connection ends in order (our FIN, within
/// ten seconds), not with a reset.
async fn ends_in_order(ws: &mut Ws) {
    let end = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
        .await
        .expect("the connection ends within ten seconds of the close frame");
    assert!(
        matches!(
            end,
            None | Some(Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed))
        ),
        "after the close frame, an orderly end, not {end:?}"
    );
}

/// A console that takes connections and never reads from them.
async fn deaf_console() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    port
}

#[tokio::test]
async fn under_reconnect_a_second_connection_is_refused_and_the_first_runs_on() {
    let g = start("").await;
    let port = echo_console().await;
    let path = g.path("serial", ConsoleType::Serial, port);
    let mut first = g.open(&path).await;
    assert_eq!(g.refusal(&path).await, Some(403));
    echoes(&mut first, b"still here").await;
    g.stop().await;
}

#[tokio::test]
async fn a_spice_html5_socket_keeps_its_place_at_the_gate_until_its_link() {
    // Two places per address: a socket's connection keeps its place past
    // the upgrade, until its SPICE link (the ticket inside) is done.
    let g = start_with("max_pending_per_address = 2", "").await;
    let path = g.path("spice", ConsoleType::SpiceHtml5, 5930);
    let url = format!("ws://{}{path}", g.public);
    let first = g.open(&path).await;
    let _second = g.open(&path).await;
    // Two sockets that link nothing: a third connection of their address is
    // closed at the gate, before HTTP.
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            panic!("refused by HTTP ({}), not at the gate", r.status())
        }
        Err(_) => {}
        Ok(_) => panic!("a third socket opened beside two linking ones"),
    }
    drop(first);
    common::within("the first socket's place given back", async {
        while tokio_tungstenite::connect_async(&url).await.is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_page_its_client_stops_reading_is_given_up_at_the_deadline() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const SIZE: usize = 8 << 20;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("site/static")).unwrap();
    std::fs::write(dir.path().join("site/static/big.bin"), vec![7u8; SIZE]).unwrap();
    let g = start_in(dir, "", "upgrade_timeout_secs = 1\n[web]\nroot = \"site\"").await;
    // A small receive window: the response stops at once when unread.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut client = socket.connect(g.public).await.unwrap();
    client
        .write_all(b"GET /static/big.bin HTTP/1.1\r\nHost: consoles.test\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    client.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    // Eight deadlines without reading: Porthole has given the response up
    // (were it waiting still, reading now would fetch the whole file).
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert!(got < SIZE / 2, "{got} bytes: the whole file came");
    g.stop().await;
}

#[tokio::test]
async fn a_session_whose_client_stops_reading_outlives_the_http_deadline() {
    // The HTTP write deadline (upgrade_timeout_secs) is off once a socket
    // is a session: a console whose client pauses keeps going.
    let g = start("upgrade_timeout_secs = 1\nping_interval_secs = 0").await;
    let port = echo_console().await;
    let ws = g.open(&g.path("serial", ConsoleType::Serial, port)).await;
    let (mut sink, mut stream) = ws.split();
    const TOTAL: usize = 4 << 20;
    let sender = tokio::spawn(async move {
        for _ in 0..TOTAL / (64 * 1024) {
            let chunk = vec![5u8; 64 * 1024];
            sink.send(Message::Binary(chunk.into())).await.unwrap();
        }
        sink
    });
    // Reads nothing for four deadlines while the echo fills every buffer
    // between it and Porthole's writes to it.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let mut got = 0;
    while got < TOTAL {
        match stream.next().await {
            Some(Ok(Message::Binary(b))) => got += b.len(),
            other => panic!("after {got} bytes: {other:?}"),
        }
    }
    let _sink = sender.await.unwrap();
    g.stop().await;
}
