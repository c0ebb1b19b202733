//! The public front end in-process: a real listener on port 0, a fake
//! console (TCP echo) and tokio-tungstenite as the client. Fast checks of the
//! paths the end-to-end suite proves against QEMU and Chromium.

mod common;

use std::sync::Arc;

use common::{AUDIENCE, ISSUER, TestKey};
use futures_util::{SinkExt, StreamExt};
use porthole::app::App;
use porthole::config::Config;
use porthole::token::claims::{ConsoleClaim, ConsoleType};
use porthole::token::signing::{KeyKind, MintRequest};
use porthole::token::unix_now;
use porthole::transport::listener::{self, HttpDeadlines};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

struct Front {
    _dir: tempfile::TempDir,
    addr: std::net::SocketAddr,
    key: TestKey,
    app: Arc<App>,
    stop: CancellationToken,
}

async fn start(websocket: &str) -> Front {
    let dir = tempfile::tempdir().unwrap();
    let key = TestKey::new(dir.path(), KeyKind::Ed25519, "k");
    let toml = format!(
        r#"
[listen]
public_base_url = "https://consoles.test"
[tokens]
issuers = ["{ISSUER}"]
audiences = ["{AUDIENCE}"]
[[tokens.keys]]
kid = "k"
algorithm = "EdDSA"
public_key = "k.pub.pem"
[websocket]
{websocket}
[[backends]]
networks = ["127.0.0.0/8"]
ports = ["1024-65535"]
"#
    );
    let app = Arc::new(App::build(Config::from_toml(&toml, dir.path()).unwrap()).unwrap());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let stop = CancellationToken::new();
    let deadlines = HttpDeadlines {
        tls_handshake: std::time::Duration::from_secs(5),
        request_headers: std::time::Duration::from_secs(5),
    };
    tokio::spawn(listener::serve(
        l,
        None,
        app.public_router(),
        deadlines,
        stop.clone(),
        app.sessions.pending.clone(),
        porthole::transport::listener::ProxyHeaders::none(),
    ));
    Front {
        _dir: dir,
        addr,
        key,
        app,
        stop,
    }
}

/// A TCP echo console; returns its port.
async fn echo_console() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

impl Front {
    fn token(&self, kind: ConsoleType, port: u16) -> String {
        let signer = porthole::token::signing::Signer::from_private_pem(
            self.key.generated.private.expose().as_bytes(),
            Some("k".into()),
        )
        .unwrap();
        let req = MintRequest {
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            instance: "vm".into(),
            console: ConsoleClaim {
                kind,
                host: "127.0.0.1".into(),
                port,
                tls_port: None,
            },
            ttl_secs: 60,
        };
        signer
            .sign(&req.claims(unix_now()))
            .unwrap()
            .expose()
            .clone()
    }

    async fn connect(
        &self,
        path: &str,
        origin: Option<&str>,
        protocol: Option<&str>,
    ) -> Result<
        (
            tokio_tungstenite::WebSocketStream<
                tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
            >,
            Option<String>,
        ),
        u16,
    > {
        let mut req = format!("ws://{}{path}", self.addr)
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
}

#[tokio::test]
async fn bytes_cross_both_ways_and_binary_is_echoed_only_when_offered() {
    let f = start("").await;
    let port = echo_console().await;
    // Serial consoles are relayed as raw bytes (VNC goes through the RFB
    // security proxy first, tested against QEMU in tests/e2e).
    let (mut ws, proto) = f
        .connect(
            &format!("/serial?token={}", f.token(ConsoleType::Serial, port)),
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
        f.connect(
            &format!("/serial?token={}", f.token(ConsoleType::Serial, port)),
            Some("https://consoles.test"),
            Some("base64"),
        )
        .await
        .err(),
        Some(400)
    );

    // noVNC 1.3 offers no subprotocol: none is answered.
    let (_ws, proto) = f
        .connect(
            &format!("/websockify?token={}", f.token(ConsoleType::Novnc, port)),
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(proto, None);
    f.stop.cancel();
}

#[tokio::test]
async fn refusals_are_http_errors_before_any_upgrade() {
    let f = start("").await;
    let port = echo_console().await;
    let good = f.token(ConsoleType::Novnc, port);
    assert!(
        f.connect(&format!("/vnc?token={good}"), None, None)
            .await
            .is_ok(),
        "the good token passes"
    );
    assert_eq!(
        f.connect(&format!("/serial?token={good}"), None, None)
            .await
            .err(),
        Some(403)
    );
    assert_eq!(
        f.connect("/vnc?token=nope", None, None).await.err(),
        Some(400)
    );
    assert_eq!(f.connect("/vnc", None, None).await.err(), Some(401));
    let other = f.token(ConsoleType::Novnc, port);
    assert_eq!(
        f.connect(
            &format!("/vnc?token={other}"),
            Some("https://evil.test"),
            None
        )
        .await
        .err(),
        Some(403)
    );
    // The hypervisor is down: 502 before the upgrade, nothing accepted.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    assert_eq!(
        f.connect(
            &format!("/vnc?token={}", f.token(ConsoleType::Novnc, dead)),
            None,
            None
        )
        .await
        .err(),
        Some(502)
    );
    f.stop.cancel();
}

#[tokio::test]
async fn the_session_cap_answers_503_and_frees_its_slot() {
    let f = start("max_sessions = 1").await;
    let port = echo_console().await;
    let (mut first, _) = f
        .connect(
            &format!("/vnc?token={}", f.token(ConsoleType::Novnc, port)),
            None,
            None,
        )
        .await
        .unwrap();
    let second = f.token(ConsoleType::Novnc, port);
    assert_eq!(
        f.connect(&format!("/vnc?token={second}"), None, None)
            .await
            .err(),
        Some(503)
    );
    first.close(None).await.unwrap();
    while first.next().await.is_some() {}
    // The slot comes back once the first session has ended.
    for _ in 0..100 {
        if f.app.sessions.active() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        f.connect(&format!("/vnc?token={second}"), None, None)
            .await
            .is_ok()
    );
    f.stop.cancel();
}

#[tokio::test]
async fn per_client_and_per_token_caps_answer_429_and_count() {
    let f = start("max_sessions_per_client = 2\nmax_sessions_per_token = 1").await;
    let (a, b, c) = (
        echo_console().await,
        echo_console().await,
        echo_console().await,
    );
    let first = f.token(ConsoleType::Serial, a);
    let (_one, _) = f
        .connect(&format!("/serial?token={first}"), None, None)
        .await
        .unwrap();
    // The same token again (reconnect policy would allow it once the first
    // ends): the per-token cap speaks first.
    assert_eq!(
        f.connect(&format!("/serial?token={first}"), None, None)
            .await
            .err(),
        Some(429)
    );
    let (_two, _) = f
        .connect(
            &format!("/serial?token={}", f.token(ConsoleType::Serial, b)),
            None,
            None,
        )
        .await
        .unwrap();
    // A third console from the same address: the per-client cap.
    assert_eq!(
        f.connect(
            &format!("/serial?token={}", f.token(ConsoleType::Serial, c)),
            None,
            None
        )
        .await
        .err(),
        Some(429)
    );
    f.stop.cancel();
}

#[tokio::test]
async fn sessions_end_at_their_maximum_age_with_4004() {
    let f = start("max_session_age_secs = 1").await;
    let port = echo_console().await;
    let (mut ws, _) = f
        .connect(
            &format!("/serial?token={}", f.token(ConsoleType::Serial, port)),
            None,
            None,
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    // A generous bound: ten times the configured age.
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
    .expect("the session outlived ten times its maximum age")
    .expect("a close frame with a code");
    assert_eq!(u16::from(frame.code), 4004);
    assert_eq!(frame.reason.as_str(), "maximum session age reached");
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    f.stop.cancel();
}

#[tokio::test]
async fn shutdown_sends_going_away() {
    let f = start("").await;
    let port = echo_console().await;
    let (mut ws, _) = f
        .connect(
            &format!("/serial?token={}", f.token(ConsoleType::Serial, port)),
            None,
            None,
        )
        .await
        .unwrap();
    f.app.sessions.cancel.cancel();
    match ws.next().await {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1001);
            assert_eq!(frame.reason.as_str(), "gateway shutting down");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    f.stop.cancel();
}

#[tokio::test]
async fn a_client_close_is_answered_and_an_invalid_code_gets_1002() {
    use tokio_tungstenite::tungstenite::protocol::{CloseFrame, frame::coding::CloseCode};
    let f = start("").await;
    let port = echo_console().await;
    for (sent, answered) in [(1000, 1000), (999, 1002), (1005, 1002), (4321, 4321)] {
        let (mut ws, _) = f
            .connect(
                &format!("/serial?token={}", f.token(ConsoleType::Serial, port)),
                None,
                None,
            )
            .await
            .unwrap();
        echoes(&mut ws, b"up").await;
        ws.close(Some(CloseFrame {
            code: CloseCode::from(sent),
            reason: "bye".into(),
        }))
        .await
        .unwrap();
        assert_eq!(close_of(&mut ws).await.0, answered, "client sent {sent}");
    }
    f.stop.cancel();
}

/// Reads until a close frame; returns its code and reason.
async fn close_of(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> (u16, String) {
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

async fn echoes(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    what: &'static [u8],
) {
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
    let f = start("\n[tokens.reuse]\nserial = \"takeover\"").await;
    let port = echo_console().await;
    let path = format!("/serial?token={}", f.token(ConsoleType::Serial, port));
    let (mut first, _) = f.connect(&path, None, None).await.unwrap();
    echoes(&mut first, b"first").await;
    let (mut second, _) = f
        .connect(&path, None, None)
        .await
        .expect("the second connection takes over");
    let (code, reason) = close_of(&mut first).await;
    assert_eq!(code, 4006);
    assert_eq!(reason, "taken over by a newer connection");
    echoes(&mut second, b"second").await;
    // One token, one session, at every moment.
    let live = f.app.sessions.registry.list(&Default::default()).await;
    assert_eq!(live.len(), 1, "{live:?}");
    // And it can be taken over again (a third tab), as often as wanted.
    let (mut third, _) = f.connect(&path, None, None).await.unwrap();
    assert_eq!(close_of(&mut second).await.0, 4006);
    echoes(&mut third, b"third").await;
    f.stop.cancel();
}

#[tokio::test]
async fn under_reconnect_a_second_connection_is_refused_and_the_first_runs_on() {
    let f = start("").await;
    let port = echo_console().await;
    let path = format!("/serial?token={}", f.token(ConsoleType::Serial, port));
    let (mut first, _) = f.connect(&path, None, None).await.unwrap();
    assert_eq!(f.connect(&path, None, None).await.err(), Some(403));
    echoes(&mut first, b"still here").await;
    f.stop.cancel();
}
