//! Recordings in-process: a serial session on a recorded backend network,
//! written as asciicast v2, audited with its SHA-256; a size cap that stops
//! the recording and not the session. The end-to-end proof (QEMU's SeaBIOS
//! text played back by Debian's `asciinema cat`) is
//! tests/e2e/test_recording.py.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use common::{Gateway, http, spawn_gateway, tokens_toml, within};
use futures_util::StreamExt;
use porthole::token::claims::ConsoleType;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// A gateway recording backend network `lab`; the audit trail (one per
/// process: this file holds one test) goes to its folder.
async fn start(max_bytes: u64) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    porthole::audit::to_file(&dir.path().join("audit.jsonl")).unwrap();
    let toml = format!(
        r#"
[listen]
public = "127.0.0.1:0"
admin = "127.0.0.1:0"
public_base_url = "https://consoles.test"
{tokens}
[recording]
folder = "recordings"
backends = ["lab"]
max_bytes = {max_bytes}

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

/// The audit trail's events named `event`, once there is one.
async fn audited(dir: &Path, event: &str) -> Vec<Value> {
    within(event, async {
        loop {
            let events: Vec<Value> = std::fs::read_to_string(dir.join("audit.jsonl"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .filter(|e: &Value| e["event"] == event)
                .collect();
            if !events.is_empty() {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
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
    let finished = audited(g.dir.path(), "recording_finished").await;
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
    let started = audited(g.dir.path(), "session_started").await;
    assert_eq!(finished[0]["session"], started[0]["session"]);

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
    past_its_cap(&g).await;
    g.stop().await;
}

/// A recording past its cap stops, and its session goes on.
async fn past_its_cap(g: &Gateway) {
    let port = console(vec![vec![b'x'; 4096]; 8]).await;
    // The session reads all 32 KiB: the recording stopped, not the session.
    session(g, port, 8 * 4096).await;
    let stopped = audited(g.dir.path(), "recording_stopped").await;
    assert!(
        stopped[0]["why"].as_str().unwrap().contains("size cap"),
        "{stopped:?}"
    );
    // The second recording of this gateway (the first is the test's).
    let finished = within("the capped recording's end", async {
        loop {
            let all = audited(g.dir.path(), "recording_finished").await;
            if all.len() == 2 {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(finished[1]["complete"], false, "{finished:?}");
    let size = std::fs::metadata(finished[1]["path"].as_str().unwrap())
        .unwrap()
        .len();
    assert!(size <= 4096, "{size}");
    let (status, _) = http(g.admin, "GET", "/healthz", None, None).await;
    assert_eq!(status, 200);
}
