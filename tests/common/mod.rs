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
