//! Shared fixtures: key material in a temp folder, a validator over it, and a
//! way to sign arbitrary (including broken) claim sets.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use porthole::hypervisor::{AllowList, BackendNetwork};
use porthole::token::signing::{GeneratedKey, KeyKind, generate};
use porthole::token::{KeySource, TokenValidator, ValidationPolicy, unix_now};
use serde_json::{Value, json};

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
