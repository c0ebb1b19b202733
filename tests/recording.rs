//! Recordings in-process: a serial session on a recorded backend network,
//! written as asciicast v2, audited with its SHA-256; a size cap that stops
//! the recording and not the session. The end-to-end proof (QEMU's SeaBIOS
//! text played back by Debian's `asciinema cat`) is
//! tests/e2e/test_recording.py.

use crate::common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use common::{Gateway, http, spawn_gateway, tokens_toml, within};
use futures_util::{SinkExt, StreamExt};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
use porthole::token::claims::ConsoleType;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// A gateway recording backend network `lab`; the audit trail (one per
/// process: this file holds one test) goes to its folder.
const BEARER: &str = "recording-bearer-0123456789abcdef";

async fn start(max_bytes: u64) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    porthole::audit::to_file(&dir.path().join("audit.jsonl")).unwrap();
    std::fs::write(dir.path().join("bearer.key"), BEARER).unwrap();
    let toml = format!(
        r#"
[listen]
public = "127.0.0.1:0"
admin = "127.0.0.1:0"
public_base_url = "https://consoles.test"
{tokens}
[issuance]
bearer_key_files = ["bearer.key"]
signing_key = "k.key"
signing_kid = "k"

[recording]
folder = "recordings"
backends = ["lab"]
max_bytes = {max_bytes}

[sessions]
max_sessions_per_client = 4

[websocket]
ping_interval_secs = 2

[[backends]]
name = "lab"
networks = ["127.0.0.0/8"]
ports = ["1024-65535"]
"#,
        tokens = tokens_toml("")
    );
    spawn_gateway(dir, toml).await
}

/// A serial console that writes `chunks` to its one client, then waits for
/// it to leave.
async fn console(chunks: Vec<Vec<u8>>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        for c in chunks {
            s.write_all(&c).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut sink = [0u8; 64];
        while let Ok(1..) = tokio::io::AsyncReadExt::read(&mut s, &mut sink).await {}
    });
    port
}

/// The audit trail's events named `event`, once there are `at_least`.
async fn audited(dir: &Path, event: &str, at_least: usize) -> Vec<Value> {
    within(event, async {
        loop {
            let events: Vec<Value> = std::fs::read_to_string(dir.join("audit.jsonl"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .filter(|e: &Value| e["event"] == event)
                .collect();
            if events.len() >= at_least {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// The admin API's playback link for recording `id`.
async fn playback_link(g: &Gateway, id: &str) -> Value {
    let path = format!("/v1/recordings/{id}/playback");
    let (status, body) = http(g.admin, "POST", &path, Some(BEARER), Some("{}")).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// A serial session that reads `want` bytes, then leaves.
async fn session(g: &Gateway, port: u16, want: usize) {
    let url = format!(
        "ws://{}/serial?token={}",
        g.public,
        g.token(ConsoleType::Serial, port, "vm-r")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut got = 0;
    within("the console's output", async {
        while got < want {
            if let Some(Ok(Message::Binary(b))) = ws.next().await {
                got += b.len();
            }
        }
    })
    .await;
    ws.close(None).await.unwrap();
}

/// One test: the audit trail is one per process.
#[tokio::test]
async fn a_serial_session_is_recorded_as_asciicast_audited_with_its_hash_and_capped() {
    let g = start(4096).await;
    // "é" cut between two chunks: the recording has it whole.
    let port = console(vec![
        b"SeaBIOS (version 1.16)\r\nCaf\xc3".to_vec(),
        b"\xa9 \x1b[0m\r\n".to_vec(),
    ])
    .await;
    session(&g, port, 36).await;
    let finished = audited(g.dir.path(), "recording_finished", 1).await;
    let path = finished[0]["path"].as_str().unwrap();
    assert!(path.starts_with(&g.dir.path().join("recordings").display().to_string()));
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let folder = std::fs::metadata(g.dir.path().join("recordings")).unwrap();
    assert_eq!(folder.permissions().mode() & 0o777, 0o700);
    // The audit trail's hash is the file's; the session's id names both.
    let hash: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(finished[0]["sha256"], hash.as_str());
    assert_eq!(finished[0]["bytes"], bytes.len());
    assert_eq!(finished[0]["complete"], true);
    // (The trail is the process's: other tests' sessions start in it too.)
    let started = audited(g.dir.path(), "session_started", 1).await;
    assert!(
        started
            .iter()
            .any(|e| e["session"] == finished[0]["session"] && e["instance"] == "vm-r"),
        "no session_started names the recording's session: {started:?}"
    );

    let text = String::from_utf8(bytes).unwrap();
    let mut lines = text.lines();
    let header: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(
        (header["version"].as_u64(), header["width"].as_u64()),
        (Some(2), Some(80))
    );
    let mut shown = String::new();
    let mut last = 0.0;
    for line in lines {
        let event: Value = serde_json::from_str(line).unwrap();
        let at = event[0].as_f64().unwrap();
        assert!(at >= last, "events in time order");
        last = at;
        assert_eq!(event[1], "o");
        shown.push_str(event[2].as_str().unwrap());
    }
    assert_eq!(shown, "SeaBIOS (version 1.16)\r\nCafé \u{1b}[0m\r\n");
    let id = finished[0]["session"].as_str().unwrap();
    plays_back(&g, id, &shown).await;
    let token = vnc_is_recorded_and_plays_back(&g).await;
    past_its_cap(&g).await;
    playbacks_count_against_their_clients_cap(&g, &token).await;
    its_page_is_told_it_is_recorded(&g).await;
    g.stop().await;
}

/// A running session of a recorded network: `GET /watched` with its token
/// says `recorded` (the session's own wiring, from its grant to the
/// registry; tests/oversight.rs has the unrecorded answer).
async fn its_page_is_told_it_is_recorded(g: &Gateway) {
    let port = console(vec![b"login: ".to_vec()]).await;
    let token = g.token(ConsoleType::Serial, port, "vm-told");
    let url = format!("ws://{}/serial?token={token}", g.public);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    within("the console's prompt", async {
        while !matches!(ws.next().await, Some(Ok(Message::Binary(_)))) {}
    })
    .await;
    assert_eq!(
        common::watched(g, &token).await,
        (
            200,
            serde_json::json!({ "told": true, "watched": false, "recorded": true })
        )
    );
    ws.close(None).await.unwrap();
}

/// Recording `id` is listed, and its playback link plays `shown` in the
/// serial page's socket and opens nothing else.
async fn plays_back(g: &Gateway, id: &str, shown: &str) {
    let (status, body) = http(g.admin, "GET", "/v1/recordings", Some(BEARER), None).await;
    assert_eq!(status, 200, "{body}");
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["recordings"][0]["id"], id, "{list}");
    assert_eq!(list["recordings"][0]["format"], "asciicast-v2");
    let answer = playback_link(g, id).await;
    let token = answer["token"].as_str().unwrap();
    assert!(
        answer["url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/playback?token={token}"))
    );
    let (status, _) = http(
        g.admin,
        "POST",
        "/v1/recordings/nothing/playback",
        Some(BEARER),
        Some("{}"),
    )
    .await;
    assert_eq!(status, 404);

    // The page, and the socket that plays the recording to its end.
    let (status, page) = http(
        g.public,
        "GET",
        &format!("/playback?token={token}"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(page.contains("cast.js"), "asciinema-player's page");
    let (status, page) = http(
        g.public,
        "GET",
        &format!("/playback?token={token}&client=terminal"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(page.contains("serial.js"), "the serial page");
    downloads(g, id, token).await;
    let url = format!("ws://{}/playback/serial?token={token}", g.public);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut played = Vec::new();
    let code = within("the playback's end", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => played.extend_from_slice(&b),
                Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code),
                Some(Ok(_)) => {}
                other => panic!("{other:?}"),
            }
        }
    })
    .await;
    assert_eq!(
        (code, String::from_utf8(played).unwrap()),
        (1000, shown.to_string())
    );
    still_sending_after_the_end(g, token).await;

    // A playback's token opens no console; a console's token plays nothing.
    let (status, _) = http(
        g.public,
        "GET",
        &format!("/serial?token={token}"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 400);
    let console = g.token(ConsoleType::Serial, 4555, "vm-r");
    let (status, _) = http(
        g.public,
        "GET",
        &format!("/playback?token={console}"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 400);
}

/// A player that still sends after the playback's close frame (here a
/// message over the playback's 64 KiB limit, which tungstenite stops
/// reading at once it has the message whole, and another behind it) has it
/// read and dropped until its FIN, and the connection ends in order: a
/// socket closed over unread bytes answers with a reset, which can overtake
/// the close frame in a browser.
async fn still_sending_after_the_end(g: &Gateway, token: &str) {
    use tokio::io::AsyncReadExt as _;
    let url = format!("ws://{}/playback/serial?token={token}", g.public);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    within("the playback's close frame", async {
        while let Some(m) = ws.next().await {
            if m.unwrap().is_close() {
                return;
            }
        }
        panic!("no close frame");
    })
    .await;
    // Two masked binary frames of 1 MiB each, written under tungstenite.
    let len: u64 = 1 << 20;
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    frame.resize(frame.len() + len as usize, 0);
    frame.extend_from_within(..);
    let tcp = ws.get_mut();
    let end = within("the connection's end", async {
        tcp.write_all(&frame).await?;
        tcp.shutdown().await?;
        let mut buf = [0u8; 4096];
        while tcp.read(&mut buf).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
    assert!(end.is_ok(), "{end:?}");
}

/// Recording `id`'s file, as asciinema-player (the playback's `token`) and
/// the admin API (the bearer key) download it; nothing without either.
async fn downloads(g: &Gateway, id: &str, token: &str) {
    let file = std::fs::read_to_string(g.dir.path().join(format!("recordings/{id}.cast"))).unwrap();
    let (status, body) = http(
        g.public,
        "GET",
        &format!("/playback/file?token={token}"),
        None,
        None,
    )
    .await;
    assert_eq!((status, body.as_str()), (200, file.as_str()));
    let admin = format!("/v1/recordings/{id}/file");
    let (status, body) = http(g.admin, "GET", &admin, Some(BEARER), None).await;
    assert_eq!((status, body.as_str()), (200, file.as_str()));
    let (status, _) = http(g.admin, "GET", &admin, None, None).await;
    assert_eq!(status, 401);
    let (status, _) = http(
        g.admin,
        "GET",
        "/v1/recordings/nothing/file",
        Some(BEARER),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let console = g.token(ConsoleType::Serial, 4555, "vm-r");
    for refused in ["", "?token=x.y.z", &format!("?token={console}")] {
        let (status, body) = http(
            g.public,
            "GET",
            &format!("/playback/file{refused}"),
            None,
            None,
        )
        .await;
        assert!(
            matches!(status, 400 | 401 | 403) && !body.contains("SeaBIOS"),
            "{refused}: {status} {body}"
        );
    }
}

/// The ServerInit of the fake VNC console: 1x1, 32 bpp, named "vm".
const SERVER_INIT: &[u8] = b"\x00\x01\x00\x01\x20\x18\x00\x01\x00\xff\x00\xff\x00\xff\x10\x08\x00\x00\x00\x00\x00\x00\x00\x02vm";
/// A FramebufferUpdate of one raw pixel.
const UPDATE: &[u8] =
    b"\x00\x00\x00\x01\x00\x00\x00\x00\x00\x01\x00\x01\x00\x00\x00\x00\x11\x22\x33\x00";

/// A VNC console with no authentication that sends one update after its
/// ServerInit, then waits for its client to leave.
async fn rfb_console() -> u16 {
    use tokio::io::AsyncReadExt;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 12];
        s.write_all(b"RFB 003.008\n").await.unwrap();
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(&[1, 1]).await.unwrap();
        s.read_exact(&mut buf[..1]).await.unwrap();
        s.write_all(&[0, 0, 0, 0]).await.unwrap();
        s.read_exact(&mut buf[..1]).await.unwrap();
        s.write_all(SERVER_INIT).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.write_all(UPDATE).await.unwrap();
        let mut sink = [0u8; 64];
        while let Ok(1..) = s.read(&mut sink).await {}
    });
    port
}

/// `n` more bytes from `ws`, beyond what `got` holds.
async fn read_n(ws: &mut Ws, got: &mut Vec<u8>, n: usize) -> Vec<u8> {
    while got.len() < n {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    got.drain(..n).collect()
}

/// An RFB client's handshake (security None, shared) over `ws`; then the
/// server's next `n` bytes.
async fn rfb_client(ws: &mut Ws, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    assert_eq!(read_n(ws, &mut got, 12).await, b"RFB 003.008\n");
    ws.send(Message::binary(b"RFB 003.008\n".to_vec()))
        .await
        .unwrap();
    assert_eq!(
        read_n(ws, &mut got, 2).await,
        [1, 1],
        "one security type: None"
    );
    ws.send(Message::binary(vec![1])).await.unwrap();
    assert_eq!(read_n(ws, &mut got, 4).await, [0, 0, 0, 0]);
    ws.send(Message::binary(vec![1])).await.unwrap();
    read_n(ws, &mut got, n).await
}

/// A VNC session is recorded as FBS; its playback serves the same
/// ServerInit and update to an RFB client.
async fn vnc_is_recorded_and_plays_back(g: &Gateway) -> String {
    let port = rfb_console().await;
    let url = format!(
        "ws://{}/vnc?token={}",
        g.public,
        g.token(ConsoleType::Novnc, port, "vm-v")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let live = within(
        "the live session",
        rfb_client(&mut ws, SERVER_INIT.len() + UPDATE.len()),
    )
    .await;
    assert_eq!(live, [SERVER_INIT, UPDATE].concat());
    ws.close(None).await.unwrap();
    let finished = audited(g.dir.path(), "recording_finished", 2).await;
    let id = finished[1]["session"].as_str().unwrap();
    let path = finished[1]["path"].as_str().unwrap();
    assert!(path.ends_with(".fbs"), "{path}");
    assert!(std::fs::read(path).unwrap().starts_with(b"FBS 001.000\n"));
    let (_, body) = http(g.admin, "GET", "/v1/recordings", Some(BEARER), None).await;
    assert!(body.contains("fbs-001"), "{body}");
    let token = playback_link(g, id).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, page) = http(
        g.public,
        "GET",
        &format!("/playback?token={token}"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(page.contains("vnc.js"), "the noVNC page");
    let url = format!("ws://{}/playback/vnc?token={token}", g.public);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let played = within(
        "the playback",
        rfb_client(&mut ws, SERVER_INIT.len() + UPDATE.len()),
    )
    .await;
    assert_eq!(played, live);
    token
}

/// A playback's socket holds a place in its client's count while it plays
/// (an FBS playback keeps its last frame up afterwards): one link opens no
/// more of them than the client may hold sessions (4 here). Last of the
/// chain: the places it takes are given back as their sockets' ends reach
/// the gateway.
async fn playbacks_count_against_their_clients_cap(g: &Gateway, token: &str) {
    let url = format!("ws://{}/playback/vnc?token={token}", g.public);
    let playing = || async {
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.ok()?;
        rfb_client(&mut ws, SERVER_INIT.len() + UPDATE.len()).await;
        Some(ws)
    };
    // The earlier sessions' and playbacks' places may still be held for a
    // moment after their sockets closed.
    let mut held = Vec::new();
    within("four playbacks of one client", async {
        while held.len() < 4 {
            match playing().await {
                Some(ws) => held.push(ws),
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 429),
        other => panic!("a fifth playback socket of one client: {other:?}"),
    }
    held.pop().unwrap().close(None).await.unwrap();
    within("a place given back", async {
        while playing().await.is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // The others, never read again, answer none of the pings sent while
    // the last frame stays up (for an hour): each is cut three intervals
    // after its first unanswered ping (8 s here). Read before that, a
    // socket answers its pings (tungstenite does as it reads), so the test
    // reads them well after.
    tokio::time::sleep(Duration::from_secs(20)).await;
    for mut ws in held {
        within("an unanswering playback client cut", async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    }
}

/// A recording past its cap stops, and its session goes on.
async fn past_its_cap(g: &Gateway) {
    let port = console(vec![vec![b'x'; 4096]; 8]).await;
    // The session reads all 32 KiB: the recording stopped, not the session.
    session(g, port, 8 * 4096).await;
    let stopped = audited(g.dir.path(), "recording_stopped", 1).await;
    assert!(
        stopped[0]["why"].as_str().unwrap().contains("size cap"),
        "{stopped:?}"
    );
    // The third recording of this gateway (serial, VNC, then this one).
    let finished = audited(g.dir.path(), "recording_finished", 3).await;
    assert_eq!(finished[2]["complete"], false, "{finished:?}");
    let size = std::fs::metadata(finished[2]["path"].as_str().unwrap())
        .unwrap()
        .len();
    assert!(size <= 4096, "{size}");
    let (status, _) = http(g.admin, "GET", "/healthz", None, None).await;
    assert_eq!(status, 200);
}
