//! The issuance API and the rest of the admin listener, over a real socket.

use crate::common;

use common::{AUDIENCE, Gateway, ISSUER, TestKey, spawn_gateway};
use porthole::frontend::admin;
use porthole::token::signing::KeyKind;
use porthole::token::{ConsoleType, unix_now};
use serde_json::{Value, json};

const BEARER: &str = "test-bearer-key-0123456789";
/// The admin listener's header deadline: `[websocket] upgrade_timeout_secs`.
const HEADER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(1);

/// A gateway whose issuance API signs with key `issuer-1`.
async fn start() -> Gateway {
    start_with_deadline(HEADER_DEADLINE).await
}

/// [`start`] with another header deadline.
async fn start_with_deadline(header_deadline: std::time::Duration) -> Gateway {
    start_with(header_deadline, "").await
}

/// [`start_with_deadline`] with `extra` sections (before `[[backends]]`).
async fn start_with(header_deadline: std::time::Duration, extra: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    TestKey::new(dir.path(), KeyKind::Ed25519, "issuer-1");
    std::fs::write(dir.path().join("bearer.key"), BEARER).unwrap();
    let toml = format!(
        r#"
[listen]
public = "127.0.0.1:0"
admin = "127.0.0.1:0"
public_base_url = "https://consoles.example.test/porthole/"

[websocket]
upgrade_timeout_secs = {}

[tokens]
issuers = ["{ISSUER}"]
audiences = ["{AUDIENCE}"]

[[tokens.keys]]
kid = "issuer-1"
algorithm = "EdDSA"
public_key = "issuer-1.pub.pem"

[issuance]
bearer_key_files = ["bearer.key"]
signing_key = "issuer-1.key"
signing_kid = "issuer-1"
ttl_secs = 90
{extra}
[[backends]]
name = "compute"
networks = ["10.20.0.0/16"]
ports = ["5900-6100"]
"#,
        header_deadline.as_secs()
    );
    spawn_gateway(dir, toml).await
}

impl Gateway {
    /// An authorised `POST /v1/consoles` on a connection of its own, its
    /// body sent up to its tenth byte; the rest of the body.
    async fn half_sent_issue(&self) -> (tokio::net::TcpStream, Vec<u8>) {
        use tokio::io::AsyncWriteExt as _;
        let body = request("novnc", "10.20.0.5", 5900).to_string().into_bytes();
        let mut s = tokio::net::TcpStream::connect(self.admin).await.unwrap();
        let head = format!(
            "POST /v1/consoles HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {BEARER}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&body[..10]).await.unwrap();
        (s, body[10..].to_vec())
    }

    /// Fills the admin gate from 127.0.0.1 behind the connections a test
    /// already holds, then a newcomer from 127.0.0.2 is answered and the
    /// first of the filling connections (the oldest idle one) is the one
    /// closed. Those still held, the newcomer's too: the gate stays full.
    async fn fill_admin_gate_and_make_room(&self) -> Vec<tokio::net::TcpStream> {
        let mut held = Vec::new();
        for _ in 1..porthole::app::ADMIN_MAX_CONNECTIONS {
            held.push(tokio::net::TcpStream::connect(self.admin).await.unwrap());
        }
        let newcomer = self.healthz_from("127.0.0.2").await;
        let evicted = answer_within(&mut held[0], std::time::Duration::from_secs(10)).await;
        assert_eq!(
            evicted.as_deref(),
            Some(""),
            "the oldest idle one is closed"
        );
        let mut held = held.split_off(1);
        held.push(newcomer);
        held
    }

    /// `GET /healthz` on the admin listener from `source`: answered 200.
    /// Its connection, still open.
    async fn healthz_from(&self, source: &str) -> tokio::net::TcpStream {
        use tokio::io::AsyncWriteExt as _;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(std::net::SocketAddr::new(source.parse().unwrap(), 0))
            .unwrap();
        let mut s = socket.connect(self.admin).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
            .await
            .unwrap();
        let got = answer_within(&mut s, std::time::Duration::from_secs(10)).await;
        assert!(
            got.as_deref()
                .is_some_and(|g| g.starts_with("HTTP/1.1 200")),
            "{got:?}"
        );
        s
    }

    async fn post(&self, path: &str, bearer: Option<&str>, body: &Value) -> (u16, Value) {
        let (status, body) =
            common::http(self.admin, "POST", path, bearer, Some(&body.to_string())).await;
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }
}

fn request(console: &str, host: &str, port: u16) -> Value {
    json!({ "instance": "9d1c1b8a-vm", "type": console, "target": { "host": host, "port": port } })
}

#[tokio::test]
async fn an_authorised_request_gets_a_valid_token_and_a_nova_shaped_answer() {
    let a = start().await;
    for (console, protocol, path) in [
        ("novnc", "vnc", "console"),
        ("spice-html5", "spice", "console"),
        ("serial", "serial", "console"),
        ("spice-direct", "spice", "spice-direct"),
        ("vnc-direct", "vnc", "vnc-direct"),
    ] {
        let (status, body) = a
            .post(
                "/v1/consoles",
                Some(BEARER),
                &request(console, "10.20.3.4", 5901),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let rc = &body["remote_console"];
        assert_eq!(rc["protocol"], protocol);
        assert_eq!(rc["type"], console);
        let token = body["token"].as_str().unwrap();
        let url = rc["url"].as_str().unwrap();
        assert_eq!(
            url,
            format!("https://consoles.example.test/porthole/{path}?token={token}")
        );
        let grant = a
            .app
            .validator
            .check(
                token,
                Some(console.parse::<ConsoleType>().unwrap()),
                unix_now(),
            )
            .expect("issued token validates");
        assert_eq!(grant.instance, "9d1c1b8a-vm");
        assert_eq!(grant.target.port, 5901);
        assert_eq!(grant.jti, body["jti"].as_str().unwrap());
        let exp = body["expires_at"].as_u64().unwrap();
        assert_eq!(exp, grant.expires_at);
        assert!(
            exp <= unix_now() + 90 && exp + 10 >= unix_now() + 90,
            "configured ttl applies"
        );
    }
    // A shorter lifetime on request; a longer one than allowed is refused.
    let mut req = request("novnc", "10.20.3.4", 5901);
    req["ttl_secs"] = json!(30);
    let (status, body) = a.post("/v1/consoles", Some(BEARER), &req).await;
    assert_eq!(status, 200);
    assert!(body["expires_at"].as_u64().unwrap() <= unix_now() + 30);
    req["ttl_secs"] = json!(100_000);
    assert_eq!(a.post("/v1/consoles", Some(BEARER), &req).await.0, 400);
}

#[tokio::test]
async fn unauthenticated_requests_are_refused() {
    let a = start().await;
    let req = request("novnc", "10.20.3.4", 5901);
    assert_eq!(
        a.post("/v1/consoles", Some(BEARER), &req).await.0,
        200,
        "the same request with the key passes"
    );
    let (status, body) = a.post("/v1/consoles", None, &req).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "unauthorized");
    assert!(body.get("token").is_none());
    assert_eq!(
        a.post("/v1/consoles", Some("wrong-key-0123456789"), &req)
            .await
            .0,
        401
    );
    assert_eq!(
        a.post("/v1/consoles", Some(&BEARER[..BEARER.len() - 1]), &req)
            .await
            .0,
        401
    );
    assert_eq!(a.post("/v1/keys/reload", None, &json!({})).await.0, 401);
    assert_eq!(
        a.post("/v1/tokens/check", None, &json!({"token": "x"}))
            .await
            .0,
        401
    );
}

#[tokio::test]
async fn disallowed_targets_are_refused() {
    let a = start().await;
    assert_eq!(
        a.post(
            "/v1/consoles",
            Some(BEARER),
            &request("novnc", "10.20.3.4", 5901)
        )
        .await
        .0,
        200
    );
    for (host, port) in [
        ("169.254.169.254", 80),
        ("10.21.0.1", 5901),
        ("10.20.3.4", 22),
        ("db.internal", 5432),
    ] {
        let (status, body) = a
            .post("/v1/consoles", Some(BEARER), &request("novnc", host, port))
            .await;
        assert_eq!(status, 403, "{host}:{port}");
        assert_eq!(body["error"]["code"], "target_not_allowed");
        assert!(body.get("token").is_none());
    }
}

#[tokio::test]
async fn instance_ids_with_control_characters_are_refused() {
    let a = start().await;
    let mut body = request("novnc", "10.20.3.4", 5901);
    body["instance"] = json!("vm-1\nINFO forged log line");
    let (status, answer) = a.post("/v1/consoles", Some(BEARER), &body).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.get("token").is_none());
}

#[tokio::test]
async fn a_user_named_at_issuance_is_in_the_token_and_bounded() {
    let a = start().await;
    let mut body = request("novnc", "10.20.3.4", 5901);
    body["user"] = json!("alice@example.org");
    let (status, answer) = a.post("/v1/consoles", Some(BEARER), &body).await;
    assert_eq!(status, 200, "{answer}");
    let grant = a
        .app
        .validator
        .check(answer["token"].as_str().unwrap(), None, unix_now())
        .expect("issued token validates");
    assert_eq!(grant.user(), Some("alice@example.org"));
    for bad in [json!(""), json!("u".repeat(256)), json!("alice\nforged")] {
        body["user"] = bad.clone();
        let (status, answer) = a.post("/v1/consoles", Some(BEARER), &body).await;
        assert_eq!(status, 400, "{bad}: {answer}");
        assert!(answer.get("token").is_none());
    }
}

#[tokio::test]
async fn unknown_console_types_are_refused() {
    let a = start().await;
    assert_eq!(
        a.post(
            "/v1/consoles",
            Some(BEARER),
            &request("serial", "10.20.3.4", 5901)
        )
        .await
        .0,
        200
    );
    for console in ["rdp", "", "NOVNC", "spice"] {
        let (status, body) = a
            .post(
                "/v1/consoles",
                Some(BEARER),
                &request(console, "10.20.3.4", 5901),
            )
            .await;
        assert_eq!(status, 400, "{console}");
        assert_eq!(body["error"]["code"], "unknown_console_type");
    }
    // A request carrying a password is refused outright: credentials never travel in tokens.
    let mut with_password = request("novnc", "10.20.3.4", 5901);
    with_password["target"]["password"] = json!("hunter2");
    assert_eq!(
        a.post("/v1/consoles", Some(BEARER), &with_password).await.0,
        400
    );
}

#[tokio::test]
async fn token_check_reports_the_precise_reason_to_trusted_callers() {
    let a = start().await;
    let (_, issued) = a
        .post(
            "/v1/consoles",
            Some(BEARER),
            &request("novnc", "10.20.3.4", 5901),
        )
        .await;
    let token = issued["token"].as_str().unwrap();
    let (status, body) = a
        .post(
            "/v1/tokens/check",
            Some(BEARER),
            &json!({ "token": token, "type": "novnc" }),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["valid"], true);
    assert_eq!(body["claims"]["sub"], "9d1c1b8a-vm");
    let (_, body) = a
        .post(
            "/v1/tokens/check",
            Some(BEARER),
            &json!({ "token": token, "type": "serial" }),
        )
        .await;
    assert_eq!(body["valid"], false);
    assert_eq!(body["reason"], "wrong_console_type");
}

#[tokio::test]
async fn trusted_callers_get_a_tokens_connection_details_without_credentials() {
    let a = start().await;
    let (_, issued) = a
        .post(
            "/v1/consoles",
            Some(BEARER),
            &json!({"instance": "vm-7", "type": "spice-direct",
                    "target": {"host": "10.20.3.4", "port": 5930, "tls_port": 5931}}),
        )
        .await;
    let token = issued["token"].as_str().unwrap();
    let (status, body) = a
        .post(
            "/v1/tokens/connection",
            Some(BEARER),
            &json!({ "token": token }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let c = &body["console"];
    assert_eq!(c["instance_uuid"], "vm-7");
    assert_eq!(c["type"], "spice-direct");
    assert_eq!(
        (
            c["host"].as_str(),
            c["port"].as_u64(),
            c["tls_port"].as_u64()
        ),
        (Some("10.20.3.4"), Some(5930), Some(5931))
    );
    assert!(c["internal_access_path"].is_null());
    assert!(!body.to_string().contains("password"));
    // Its own checks still apply: the wrong type, no bearer.
    let (status, body) = a
        .post(
            "/v1/tokens/connection",
            Some(BEARER),
            &json!({ "token": token, "type": "novnc" }),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("wrong_console_type"))
    );
    assert_eq!(
        a.post("/v1/tokens/connection", None, &json!({ "token": token }))
            .await
            .0,
        401
    );
}

#[tokio::test]
async fn health_and_readiness() {
    let a = start().await;
    assert_eq!(
        common::http(a.admin, "GET", "/healthz", None, None).await.0,
        200
    );
    assert_eq!(
        common::http(a.admin, "GET", "/readyz", None, None).await.0,
        200
    );
    assert_eq!(
        common::http(a.admin, "GET", "/nope", None, None).await.0,
        404
    );
}

/// Reads what the server sends until it closes (or `within` passes: `None`).
async fn answer_within(
    s: &mut tokio::net::TcpStream,
    within: std::time::Duration,
) -> Option<String> {
    use tokio::io::AsyncReadExt as _;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(4).any(|w| w == b"\r\n\r\n") {
                        return;
                    }
                }
            }
        }
    };
    tokio::time::timeout(within, read).await.ok()?;
    Some(String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test]
async fn an_unauthenticated_call_is_refused_before_its_body_is_read() {
    use tokio::io::AsyncWriteExt as _;
    let a = start().await;
    // A 2 MB body announced and never sent: the answer comes at once, from
    // the headers alone (nothing waits for, or buffers, the body).
    let mut s = tokio::net::TcpStream::connect(a.admin).await.unwrap();
    s.write_all(
        b"POST /v1/consoles HTTP/1.1\r\nHost: admin\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n{",
    )
    .await
    .unwrap();
    let got = answer_within(&mut s, std::time::Duration::from_secs(5))
        .await
        .expect("an answer before any body arrived");
    assert!(got.starts_with("HTTP/1.1 401"), "{got}");
}

#[tokio::test]
async fn an_oversized_body_is_refused() {
    let a = start().await;
    let mut body = request("novnc", "10.20.3.4", 5901);
    body["instance"] = json!("x".repeat(admin::BODY_LIMIT + 1));
    let (status, _) = a.post("/v1/consoles", Some(BEARER), &body).await;
    assert_eq!(status, 413);
}

#[tokio::test]
async fn an_idle_admin_connection_is_cut_at_the_header_deadline() {
    let a = start().await;
    let mut idle = tokio::net::TcpStream::connect(a.admin).await.unwrap();
    let closed = answer_within(&mut idle, HEADER_DEADLINE * 5).await;
    assert_eq!(closed.as_deref(), Some(""), "closed without an answer");
}

#[tokio::test]
async fn admin_connections_are_capped_and_a_flood_cannot_keep_another_address_out() {
    use tokio::io::AsyncWriteExt as _;
    // A deadline far past the test: nothing here is closed by it.
    let a = start_with_deadline(std::time::Duration::from_secs(120)).await;
    let healthz = b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..porthole::app::ADMIN_MAX_CONNECTIONS {
        held.push(tokio::net::TcpStream::connect(a.admin).await.unwrap());
    }
    // Every place is held by 127.0.0.1: another connection of it is closed
    // unanswered...
    let mut late = tokio::net::TcpStream::connect(a.admin).await.unwrap();
    let _ = late.write_all(healthz).await;
    let closed = answer_within(&mut late, std::time::Duration::from_secs(10)).await;
    assert_eq!(closed.as_deref(), Some(""), "closed without an answer");
    // ...while one from another address takes the place of the flood's
    // oldest connection, and is served.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut other = socket.connect(a.admin).await.unwrap();
    other.write_all(healthz).await.unwrap();
    let got = answer_within(&mut other, std::time::Duration::from_secs(10))
        .await
        .expect("served while the flood holds its places");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    let evicted = answer_within(&mut held[0], std::time::Duration::from_secs(10)).await;
    assert_eq!(evicted.as_deref(), Some(""), "the oldest is closed");
    let newest = held.last_mut().unwrap();
    newest.write_all(healthz).await.unwrap();
    let got = answer_within(newest, std::time::Duration::from_secs(10))
        .await
        .expect("the newest is still served");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

#[tokio::test]
async fn an_admin_request_being_handled_keeps_its_place_when_room_is_made() {
    use tokio::io::AsyncWriteExt as _;
    let a = start_with_deadline(std::time::Duration::from_secs(120)).await;
    // The oldest connection: an authorised call whose body is still coming.
    let (mut busy, rest) = a.half_sent_issue().await;
    // Its handler is waiting for the rest (generously: it starts once the
    // head is in).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    // Another address makes room: the oldest idle connection goes, not the
    // one being handled.
    a.fill_admin_gate_and_make_room().await;
    busy.write_all(&rest).await.unwrap();
    let got = answer_within(&mut busy, std::time::Duration::from_secs(10))
        .await
        .expect("the call was answered");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

#[tokio::test]
async fn an_admin_download_on_its_way_keeps_its_place_when_room_is_made() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const SIZE: usize = 8 << 20;
    let a = start_with(
        std::time::Duration::from_secs(120),
        "[recording]\nfolder = \"recordings\"\nbackends = [\"compute\"]\n",
    )
    .await;
    let folder = a.dir.path().join("recordings");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("big-one.cast"), vec![b'x'; SIZE]).unwrap();
    // The oldest connection: a recording's download, its answer begun,
    // far more of it than the sockets' buffers hold still to come.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let mut download = socket.connect(a.admin).await.unwrap();
    download
        .write_all(
            format!(
                "GET /v1/recordings/big-one/file HTTP/1.1\r\nHost: admin\r\n\
                 Authorization: Bearer {BEARER}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = [0u8; 12];
    download.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    // Another address makes room: the oldest idle connection goes, not the
    // download.
    let _held = a.fill_admin_gate_and_make_room().await;
    // The whole file comes.
    let mut got = head.to_vec();
    let mut buf = vec![0u8; 64 * 1024];
    let whole = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        loop {
            let body = got
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|at| got.len() - at - 4);
            if body == Some(SIZE) {
                return true;
            }
            match download.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert_eq!(
        whole,
        Ok(true),
        "the download was cut after {} bytes",
        got.len()
    );
    // Sent, its connection is idle again, and the oldest of the address
    // holding the most: the next newcomer takes its place.
    let _third = a.healthz_from("127.0.0.3").await;
    let closed = answer_within(&mut download, std::time::Duration::from_secs(10)).await;
    assert_eq!(
        closed.as_deref(),
        Some(""),
        "the sent download's connection is closed"
    );
}

#[tokio::test]
async fn an_admin_request_whose_body_stops_coming_is_answered_at_the_deadline() {
    let a = start().await;
    let (mut stalled, _rest) = a.half_sent_issue().await;
    let got = answer_within(&mut stalled, HEADER_DEADLINE * 10)
        .await
        .expect("answered, not left waiting");
    assert!(got.starts_with("HTTP/1.1 4"), "{got}");
}
