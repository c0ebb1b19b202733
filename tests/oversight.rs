//! Oversight in-process: view-only grants and shadows of live sessions,
//! on a whole gateway with a fake serial console (a TCP server the test
//! writes to and reads from). The end-to-end proof against QEMU, noVNC and
//! the SPICE clients is tests/e2e/test_view_only.py and test_shadow.py.

use crate::common;

use std::time::Duration;

use common::{Gateway, LOOPBACK_BACKEND, http, spawn_gateway, tokens_toml, watched, within};
use futures_util::{SinkExt, StreamExt};
use porthole::token::claims::{ConsoleClaim, ConsoleType};
use porthole::token::signing::MintRequest;
use porthole::token::unix_now;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

const BEARER: &str = "oversight-bearer-0123456789abcdef";

/// A gateway whose issuance key is the tokens' key `k`. No pings: a
/// shadow that stops reading is cut by the fan-out's own rule, not by the
/// relay's liveness rule.
async fn start() -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bearer.key"), BEARER).unwrap();
    let toml = format!(
        r#"
[listen]
public = "127.0.0.1:0"
admin = "127.0.0.1:0"
public_base_url = "https://consoles.test"
[websocket]
ping_interval_secs = 0
{tokens}
[issuance]
bearer_key_files = ["bearer.key"]
signing_key = "k.key"
signing_kid = "k"
{LOOPBACK_BACKEND}"#,
        tokens = tokens_toml("")
    );
    spawn_gateway(dir, toml).await
}

/// A serial console that serves one client: what the test sends goes to
/// the client, what the client sends comes back on the receiver.
struct Console {
    port: u16,
    to_client: mpsc::UnboundedSender<Vec<u8>>,
    from_client: mpsc::UnboundedReceiver<Vec<u8>>,
}

async fn serial_console() -> Console {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (to_client, mut outgoing) = mpsc::unbounded_channel::<Vec<u8>>();
    let (seen, from_client) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let (mut r, mut w) = s.into_split();
        tokio::spawn(async move {
            while let Some(bytes) = outgoing.recv().await {
                if w.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        });
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = r.read(&mut buf).await {
            let _ = seen.send(buf[..n].to_vec());
        }
    });
    Console {
        port,
        to_client,
        from_client,
    }
}

fn token(g: &Gateway, kind: ConsoleType, port: u16, view_only: bool) -> String {
    let req = MintRequest {
        issuer: common::ISSUER.into(),
        audience: common::AUDIENCE.into(),
        instance: "vm-o".into(),
        user: None,
        console: ConsoleClaim {
            kind,
            host: "127.0.0.1".into(),
            port,
            tls_port: None,
            view_only,
            record: false,
        },
        ttl_secs: 60,
    };
    let signed = g.key.signer().sign(&req.claims(unix_now())).unwrap();
    signed.expose().clone()
}

async fn open(g: &Gateway, route: &str, token: &str) -> Result<Ws, u16> {
    let url = format!("ws://{}/{route}?token={token}", g.public);
    match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

/// Reads binary messages until `want` bytes came.
async fn read_bytes(ws: &mut Ws, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    within("console output", async {
        while got.len() < want {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
                Some(Ok(_)) => {}
                other => panic!("socket ended after {} bytes: {other:?}", got.len()),
            }
        }
    })
    .await;
    got
}

/// The close code the socket ends with.
async fn close_code(ws: &mut Ws) -> u16 {
    within("the close", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code),
                Some(Ok(_)) => {}
                other => panic!("no close frame: {other:?}"),
            }
        }
    })
    .await
}

async fn post(g: &Gateway, path: &str) -> (u16, Value) {
    let (status, body) = http(g.admin, "POST", path, Some(BEARER), Some("{}")).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// Waits until the page holding `token` is told `watched`.
async fn told(g: &Gateway, token: &str, watched_now: bool) {
    within("the page to be told", async {
        while watched(g, token).await.1["watched"] != watched_now {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// The live sessions once there are `n`, within `limit`.
async fn listed(g: &Gateway, n: usize, limit: Duration) -> Vec<Value> {
    let waiting = async {
        loop {
            let all = g.sessions(BEARER).await;
            if all.len() == n {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(limit, waiting)
        .await
        .unwrap_or_else(|_| panic!("timed out: {n} session(s) listed"))
}

async fn one_session(g: &Gateway) -> Value {
    listed(g, 1, common::WAIT).await.remove(0)
}

#[tokio::test]
async fn a_view_only_serial_client_reads_and_types_nothing() {
    let g = start().await;
    let mut console = serial_console().await;
    let mut ws = open(
        &g,
        "serial",
        &token(&g, ConsoleType::Serial, console.port, true),
    )
    .await
    .unwrap();
    assert_eq!(one_session(&g).await["view_only"], true);
    ws.send(Message::binary(b"\x1b\x1b\r".to_vec()))
        .await
        .unwrap();
    console
        .to_client
        .send(b"Press ESC for boot menu.".to_vec())
        .unwrap();
    assert_eq!(read_bytes(&mut ws, 24).await, b"Press ESC for boot menu.");
    // What the console got, once the client has left: nothing.
    ws.close(None).await.unwrap();
    let got = within("the console's end", async {
        let mut all = Vec::new();
        while let Some(b) = console.from_client.recv().await {
            all.extend(b);
        }
        all
    })
    .await;
    assert_eq!(got, b"");
    g.stop().await;
}

#[tokio::test]
async fn a_serial_shadow_sees_the_output_types_nothing_opens_once_and_ends_with_its_session() {
    let g = start().await;
    let mut console = serial_console().await;
    let owner_token = token(&g, ConsoleType::Serial, console.port, false);
    let mut owner = open(&g, "serial", &owner_token).await.unwrap();
    let id = one_session(&g).await["id"].as_str().unwrap().to_string();
    assert_eq!(
        watched(&g, &owner_token).await,
        (
            200,
            serde_json::json!({ "told": true, "watched": false, "recorded": false })
        )
    );
    assert_eq!(watched(&g, "not-a-token").await.0, 401);

    let (status, shadow) = post(&g, &format!("/v1/sessions/{id}/shadow")).await;
    assert_eq!(status, 200, "{shadow}");
    assert_eq!(shadow["type"], "serial");
    assert!(
        shadow["url"]
            .as_str()
            .unwrap()
            .starts_with("https://consoles.test/console?token=")
    );
    let shadow_token = shadow["token"].as_str().unwrap().to_string();
    let mut watcher = open(&g, "serial", &shadow_token).await.unwrap();

    // Listed under its session, and view-only.
    let listed = listed(&g, 2, common::WAIT).await;
    let owner_view = listed.iter().find(|s| s["id"] == id.as_str()).unwrap();
    let shadow_view = listed.iter().find(|s| s["id"] != id.as_str()).unwrap();
    assert_eq!(
        owner_view["shadows"],
        serde_json::json!([shadow_view["id"]])
    );
    assert_eq!(shadow_view["shadow_of"], id.as_str());
    assert_eq!(shadow_view["view_only"], true);
    // The owner's page is told while the shadow watches.
    told(&g, &owner_token, true).await;

    // Both see what the console writes; only the owner's keys reach it.
    console
        .to_client
        .send(b"SeaBIOS (version 1.16)\r\n".to_vec())
        .unwrap();
    assert_eq!(
        read_bytes(&mut owner, 24).await,
        read_bytes(&mut watcher, 24).await
    );
    watcher
        .send(Message::binary(b"\x1bshadow".to_vec()))
        .await
        .unwrap();
    owner
        .send(Message::binary(b"owner".to_vec()))
        .await
        .unwrap();
    let got = within("the owner's keys", console.from_client.recv())
        .await
        .unwrap();
    assert_eq!(got, b"owner");

    // The link opens once, and a page's preflight (no upgrade) says so.
    assert!(open(&g, "serial", &shadow_token).await.is_err());
    let preflight = format!("/serial?token={shadow_token}");
    assert_eq!(http(g.public, "GET", &preflight, None, None).await.0, 403);

    // The shadow leaves, and the page is told; then (a second shadow) the
    // owner leaves: the shadow ends with its session.
    watcher.close(None).await.unwrap();
    told(&g, &owner_token, false).await;
    let (_, again) = post(&g, &format!("/v1/sessions/{id}/shadow")).await;
    let mut watcher = open(&g, "serial", again["token"].as_str().unwrap())
        .await
        .unwrap();
    told(&g, &owner_token, true).await;
    owner.close(None).await.unwrap();
    assert_eq!(close_code(&mut watcher).await, 1000);
    // The preflight now answers as an upgrade would: the session ended
    // (the shadow's page says so, not "link not valid").
    let (status, body) = http(g.public, "GET", &preflight, None, None).await;
    assert_eq!((status, body.contains(r#""ended""#)), (410, true), "{body}");
    // A shadow of a session that has ended is refused.
    let (status, _) = post(&g, &format!("/v1/sessions/{id}/shadow")).await;
    assert_eq!(status, 404);
    g.stop().await;
}

#[tokio::test]
async fn a_stalled_shadow_is_cut_and_never_slows_its_session() {
    let g = start().await;
    let console = serial_console().await;
    let mut owner = open(
        &g,
        "serial",
        &token(&g, ConsoleType::Serial, console.port, false),
    )
    .await
    .unwrap();
    let id = one_session(&g).await["id"].as_str().unwrap().to_string();
    let (_, shadow) = post(&g, &format!("/v1/sessions/{id}/shadow")).await;
    // A shadow that never reads.
    let stalled = open(&g, "serial", shadow["token"].as_str().unwrap())
        .await
        .unwrap();
    listed(&g, 2, common::WAIT).await;
    // 16 MiB through the console: far more than the shadow's socket and
    // fan-out buffers hold. The owner gets all of it.
    let chunk = vec![b'x'; 16 * 1024];
    let total = 1024 * chunk.len();
    let writer = console.to_client.clone();
    tokio::spawn(async move {
        for _ in 0..1024 {
            writer.send(chunk.clone()).unwrap();
        }
    });
    assert_eq!(read_bytes(&mut owner, total).await.len(), total);
    // The shadow was cut (it took nothing for SHADOW_STALL;
    // one that reads too slowly falls behind the fan-out and is cut
    // there): only the owner's session is left.
    listed(&g, 1, porthole::session::oversight::SHADOW_STALL * 3).await;
    drop(stalled);
    g.stop().await;
}

#[tokio::test]
async fn a_spice_session_is_not_shadowed_and_shadows_need_a_live_session() {
    use porthole::session::registry::NewSession;
    let g = start().await;
    let live = g
        .app
        .sessions
        .registry
        .register(
            NewSession {
                console: ConsoleType::SpiceDirect,
                instance: "vm-s".into(),
                jti: "j-spice".into(),
                user: None,
                client: "192.0.2.7".parse().unwrap(),
                target: "127.0.0.1:5930 (tls 5931)".into(),
                key: None,
                view_only: false,
                shadow_of: None,
                recorded: false,
            },
            tokio_util::sync::CancellationToken::new(),
        )
        .await;
    let (status, body) = post(&g, &format!("/v1/sessions/{}/shadow", live.id)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("not_shadowable")),
        "{body}"
    );
    let (status, _) = post(&g, "/v1/sessions/s-nothing/shadow").await;
    assert_eq!(status, 404);
    g.app.sessions.registry.deregister(&live).await;
    g.stop().await;
}

#[tokio::test]
async fn a_view_only_serial_client_gives_way_to_the_consoles_user() {
    let g = start().await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    // A console that serves one client at a time, again and again.
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let mut s = s;
            let mut buf = [0u8; 64];
            while let Ok(1..) = s.read(&mut buf).await {}
        }
    });
    let mut watcher = open(&g, "serial", &token(&g, ConsoleType::Serial, port, true))
        .await
        .unwrap();
    one_session(&g).await;
    // The user who may type gets the console; the watcher is ended.
    let _user = open(&g, "serial", &token(&g, ConsoleType::Serial, port, false))
        .await
        .expect("the console's user is let in");
    assert_eq!(close_code(&mut watcher).await, 4003);
    // A watcher while the user holds it: busy (a shadow watches instead).
    assert_eq!(
        open(&g, "serial", &token(&g, ConsoleType::Serial, port, true))
            .await
            .err(),
        Some(409)
    );
    g.stop().await;
}

#[tokio::test]
async fn a_shadow_token_for_another_console_than_its_session_is_refused() {
    let g = start().await;
    let console = serial_console().await;
    let _owner = open(
        &g,
        "serial",
        &token(&g, ConsoleType::Serial, console.port, false),
    )
    .await
    .unwrap();
    let id = one_session(&g).await["id"].as_str().unwrap().to_string();
    // A trusted issuer names the session, but another VM's console.
    let other = serial_console().await;
    let req = MintRequest {
        issuer: common::ISSUER.into(),
        audience: common::AUDIENCE.into(),
        instance: "vm-o".into(),
        user: None,
        console: ConsoleClaim {
            kind: ConsoleType::Serial,
            host: "127.0.0.1".into(),
            port: other.port,
            tls_port: None,
            view_only: true,
            record: false,
        },
        ttl_secs: 60,
    };
    let mut claims = req.claims(unix_now());
    claims.shadow_of = Some(id);
    let forged = g.key.signer().sign(&claims).unwrap();
    assert_eq!(open(&g, "serial", forged.expose()).await.err(), Some(410));
    g.stop().await;
}
