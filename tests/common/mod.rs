//! Shared fixtures: key material in a temp folder, a validator over it, a
//! way to sign arbitrary (including broken) claim sets, byte-level clients,
//! and a whole gateway in-process ([`spawn_gateway`]).

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use porthole::app::{App, Listeners};
use porthole::config::{Config, ConfigSource};
use porthole::hypervisor::{AllowList, BackendNetwork};
use porthole::token::claims::{ConsoleClaim, ConsoleType};
use porthole::token::signing::{GeneratedKey, KeyKind, MintRequest, Signer, generate};
use porthole::token::{KeySource, TokenValidator, ValidationPolicy, unix_now};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub const ISSUER: &str = "https://api.test";
pub const AUDIENCE: &str = "porthole-test";

/// A key pair written to disk.
pub struct TestKey {
    pub kid: String,
    pub algorithm: Algorithm,
    pub generated: GeneratedKey,
    pub private_path: PathBuf,
    pub public_path: Option<PathBuf>,
    pub jwks_path: Option<PathBuf>,
}

impl TestKey {
    pub fn new(dir: &Path, kind: KeyKind, kid: &str) -> TestKey {
        let generated = generate(kind, kid).expect("key generation");
        let private_path = dir.join(format!("{kid}.key"));
        std::fs::write(&private_path, generated.private.expose()).unwrap();
        let public_path = generated.public_pem.as_ref().map(|pem| {
            let p = dir.join(format!("{kid}.pub.pem"));
            std::fs::write(&p, pem).unwrap();
            p
        });
        let jwks_path = generated.jwks.as_ref().map(|jwks| {
            let p = dir.join(format!("{kid}.jwks.json"));
            std::fs::write(&p, jwks.to_string()).unwrap();
            p
        });
        TestKey {
            kid: kid.to_string(),
            algorithm: generated.algorithm,
            generated,
            private_path,
            public_path,
            jwks_path,
        }
    }

    pub fn encoding_key(&self) -> EncodingKey {
        let pem = self.generated.private.expose().as_bytes();
        match self.algorithm {
            Algorithm::EdDSA => EncodingKey::from_ed_pem(pem).unwrap(),
            Algorithm::ES256 => EncodingKey::from_ec_pem(pem).unwrap(),
            Algorithm::RS256 => EncodingKey::from_rsa_pem(pem).unwrap(),
            Algorithm::HS256 => EncodingKey::from_secret(pem),
            other => panic!("no test key for {other:?}"),
        }
    }

    /// How a config names this key.
    pub fn source(&self) -> KeySource {
        match self.algorithm {
            Algorithm::HS256 => KeySource::SharedSecret {
                kid: Some(self.kid.clone()),
                path: self.private_path.clone(),
            },
            alg => KeySource::PublicKeyPem {
                kid: Some(self.kid.clone()),
                algorithm: alg,
                path: self.public_path.clone().unwrap(),
            },
        }
    }

    /// Signs `claims` with this key and a header naming it.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        self.sign_with_header(&header, claims)
    }

    pub fn sign_with_header(&self, header: &Header, claims: &Value) -> String {
        jsonwebtoken::encode(header, claims, &self.encoding_key()).unwrap()
    }

    /// Porthole's signer over this key (the issuance API's, `token mint`'s).
    pub fn signer(&self) -> Signer {
        Signer::from_private_pem(
            self.generated.private.expose().as_bytes(),
            Some(self.kid.clone()),
        )
        .unwrap()
    }
}

/// A well-formed claim set for a novnc console on the test hypervisor network.
pub fn good_claims() -> Value {
    let now = unix_now();
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "3f2a6c1e-instance",
        "iat": now,
        "nbf": now,
        "exp": now + 60,
        "jti": format!("jti-{}", porthole::token::signing::random_token(9)),
        "console": { "type": "novnc", "host": "10.20.0.5", "port": 5901 }
    })
}

pub fn policy() -> ValidationPolicy {
    ValidationPolicy {
        issuers: vec![ISSUER.into()],
        audiences: vec![AUDIENCE.into()],
        leeway_secs: 5,
        max_ttl_secs: 600,
        max_token_bytes: 4096,
    }
}

pub fn allow_list() -> Arc<AllowList> {
    Arc::new(AllowList::new(vec![BackendNetwork {
        name: "compute".into(),
        networks: vec!["10.20.0.0/16".parse().unwrap()],
        hostnames: vec!["compute-1.test".into()],
        ports: vec!["5900-6100".parse().unwrap()],
        ports_by_type: Default::default(),
    }]))
}

pub fn validator(sources: Vec<KeySource>, allow_hmac: bool) -> TokenValidator {
    TokenValidator::new(policy(), sources, allow_hmac, allow_list()).expect("keys load")
}

/// One HTTP/1.1 request over a fresh connection; returns status and body.
/// Enough for JSON calls to the admin listener without another HTTP client crate.
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.unwrap_or("");
    let auth = bearer
        .map(|b| format!("Authorization: Bearer {b}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

/// What `GET /watched` answers the page holding `token` (its body as JSON,
/// `null` when it is not).
pub async fn watched(g: &Gateway, token: &str) -> (u16, serde_json::Value) {
    let (status, body) = http(
        g.public,
        "GET",
        &format!("/watched?token={token}"),
        None,
        None,
    )
    .await;
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

// ------------------------------------------------ byte-level test clients

/// The longest a single awaited step of a test may take.
pub const WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Awaits `work`, or panics naming `what` after [`WAIT`].
pub async fn within<T>(what: &str, work: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, work)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Bytes from a protocol transcript: hex pairs, `#` comments to the end of a line.
pub fn hex(text: &str) -> Vec<u8> {
    let digits: String = text
        .lines()
        .flat_map(|l| l.split('#').next().unwrap().split_whitespace())
        .collect();
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
        .collect()
}

/// Exactly `n` bytes, within [`WAIT`].
pub async fn read_n<S: tokio::io::AsyncRead + Unpin>(s: &mut S, n: usize) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0; n];
    within("a read", s.read_exact(&mut buf))
        .await
        .expect("the peer closed");
    buf
}

/// Reads as many bytes as `want` has and checks they are `want`.
pub async fn expect<S: tokio::io::AsyncRead + Unpin>(s: &mut S, want: &[u8]) {
    assert_eq!(read_n(s, want.len()).await, want);
}

/// Writes and flushes `bytes`.
pub async fn say<S: tokio::io::AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) {
    use tokio::io::AsyncWriteExt;
    s.write_all(bytes).await.unwrap();
    s.flush().await.unwrap();
}

/// A test CA and a certificate for `localhost` signed by it, written to
/// `dir` as `ca.pem`, `server.pem` and `server.key`.
pub struct TestPki {
    /// The CA certificate.
    pub ca_pem: String,
    /// A TLS client trusting only the CA.
    pub connector: tokio_rustls::TlsConnector,
}

impl TestPki {
    pub fn new(dir: &Path) -> TestPki {
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let server = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
        std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TestPki {
            ca_pem: ca.pem(),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        }
    }

    /// TLS over `tcp` to a server with the `localhost` certificate.
    pub async fn connect(
        &self,
        tcp: tokio::net::TcpStream,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let name = "localhost".try_into().unwrap();
        within("TLS", self.connector.connect(name, tcp))
            .await
            .unwrap()
    }
}

// ------------------------------------------------ a gateway in-process

/// The `[tokens]` section of most test gateways: tokens of [`ISSUER`] for
/// [`AUDIENCE`], verified with key `k` (which [`spawn_gateway`] writes),
/// with `extra` (more `[tokens]` keys) before the key list.
pub fn tokens_toml(extra: &str) -> String {
    format!(
        r#"
[tokens]
issuers = ["{ISSUER}"]
audiences = ["{AUDIENCE}"]
{extra}
[[tokens.keys]]
kid = "k"
algorithm = "EdDSA"
public_key = "k.pub.pem"
"#
    )
}

/// A `[[backends]]` entry admitting every unprivileged loopback port: where
/// the fake consoles of a test listen.
pub const LOOPBACK_BACKEND: &str = r#"
[[backends]]
networks = ["127.0.0.0/8"]
ports = ["1024-65535"]
"#;

/// What a test gateway is started from.
pub enum Setup {
    /// A config file's text, read with the gateway's folder as its base.
    Toml(String),
    /// A config file on disk, which `POST /v1/reload` reads again.
    File(ConfigSource),
}

impl From<String> for Setup {
    fn from(text: String) -> Self {
        Setup::Toml(text)
    }
}

impl From<&str> for Setup {
    fn from(text: &str) -> Self {
        Setup::Toml(text.to_string())
    }
}

impl From<ConfigSource> for Setup {
    fn from(source: ConfigSource) -> Self {
        Setup::File(source)
    }
}

/// A gateway run in-process the way `porthole serve` runs it
/// (`porthole::app::run`), its listeners where its config puts them (tests
/// name `127.0.0.1:0`: a free loopback port each).
pub struct Gateway {
    /// What it runs on.
    pub app: Arc<App>,
    /// The (first) public listener.
    pub public: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// The native SPICE TLS listener, when the config has one.
    pub spice_tls: Option<SocketAddr>,
    /// The native VNC listener, when the config has one.
    pub native_vnc: Option<SocketAddr>,
    /// Ends it: listeners first, then sessions, as a signal would.
    pub stop: CancellationToken,
    /// Key `k`, which [`Gateway::token`] signs with.
    pub key: TestKey,
    /// The CA of its `localhost` certificate, and a client trusting it.
    pub pki: TestPki,
    /// Its folder: the config's relative paths start here.
    pub dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Starts a gateway from `setup`, its files in `dir` (whatever the test put
/// there, and key `k` (`k.key`, `k.pub.pem`) and a `localhost` certificate
/// (`ca.pem`, `server.pem`, `server.key`) that this adds for the config to
/// name); returns once it is ready.
pub async fn spawn_gateway(dir: tempfile::TempDir, setup: impl Into<Setup>) -> Gateway {
    let key = TestKey::new(dir.path(), KeyKind::Ed25519, "k");
    let pki = TestPki::new(dir.path());
    let (config, source) = match setup.into() {
        Setup::Toml(text) => (Config::from_toml(&text, dir.path()).unwrap(), None),
        Setup::File(source) => (source.load().unwrap(), Some(source)),
    };
    let listeners = Listeners::bind(&config).await.unwrap();
    let public = listeners.public_addrs().unwrap()[0];
    let admin = listeners.admin_addr().unwrap();
    let (spice_tls, native_vnc) = (listeners.spice_addrs().0, listeners.vnc_addr());
    let app = Arc::new(App::build_for(config, Some(&listeners), source).unwrap());
    let stop = CancellationToken::new();
    let task = tokio::spawn(porthole::app::run(
        app.clone(),
        listeners,
        None,
        stop.clone(),
    ));
    within("the gateway to get ready", async {
        while app.readiness.answer().status() != axum::http::StatusCode::OK {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    Gateway {
        app,
        public,
        admin,
        spice_tls,
        native_vnc,
        stop,
        key,
        pki,
        dir,
        task,
    }
}

impl Gateway {
    /// A console token signed with key `k`: `kind` at 127.0.0.1:`port` for
    /// `instance`, valid for a minute.
    pub fn token(&self, kind: ConsoleType, port: u16, instance: &str) -> String {
        self.token_of(kind, port, instance, false)
    }

    /// [`Gateway::token`], view-only when `view_only`.
    pub fn token_of(
        &self,
        kind: ConsoleType,
        port: u16,
        instance: &str,
        view_only: bool,
    ) -> String {
        let req = MintRequest {
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            instance: instance.into(),
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
        let token = self.key.signer().sign(&req.claims(unix_now())).unwrap();
        token.expose().clone()
    }

    /// The native SPICE TLS listener (`[spice] listen_tls`).
    pub fn spice(&self) -> SocketAddr {
        self.spice_tls.expect("no [spice] listen_tls")
    }

    /// The native VNC listener (`[vnc] listen`).
    pub fn vnc(&self) -> SocketAddr {
        self.native_vnc.expect("no [vnc] listen")
    }

    /// The live sessions, as the admin API lists them to `bearer`.
    pub async fn sessions(&self, bearer: &str) -> Vec<Value> {
        let (status, body) = http(self.admin, "GET", "/v1/sessions", Some(bearer), None).await;
        assert_eq!(status, 200, "{body}");
        let list: Value = serde_json::from_str(&body).unwrap();
        list["sessions"].as_array().unwrap().clone()
    }

    /// Stops it, and waits for a clean end.
    pub async fn stop(self) {
        self.stop.cancel();
        within("shutdown", self.task).await.unwrap().unwrap();
    }
}

/// Echoes until the peer leaves.
pub async fn echo(mut s: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n @ 1..) = s.read(&mut buf).await {
        if s.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A TCP echo console on a free loopback port; returns the port.
pub async fn echo_console() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(echo(s));
        }
    });
    port
}
