//! Signing keys: generating key pairs and minting console tokens.
//!
//! Porthole mostly *verifies*; API servers sign. Signing lives here for
//! `porthole keys generate`, `porthole token mint`, the issuance API and the
//! development key created on first start.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::RngCore;
use rand::rngs::OsRng;

use super::claims::{Audience, ConsoleClaim, ConsoleClaims, SCHEMA_VERSION};
use super::keys::KeyError;
use crate::secret::Secret;

/// Key types `porthole keys generate` can make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyKind {
    /// Ed25519 (JWT `alg` EdDSA): small, fast, the default.
    Ed25519,
    /// ECDSA P-256 (JWT `alg` ES256).
    Es256,
    /// RSA 2048 (JWT `alg` RS256).
    Rs256,
    /// A random shared secret (JWT `alg` HS256); needs `tokens.allow_hmac`.
    Hs256,
}

impl KeyKind {
    /// The JWT algorithm for this key type.
    pub fn algorithm(self) -> Algorithm {
        match self {
            KeyKind::Ed25519 => Algorithm::EdDSA,
            KeyKind::Es256 => Algorithm::ES256,
            KeyKind::Rs256 => Algorithm::RS256,
            KeyKind::Hs256 => Algorithm::HS256,
        }
    }
}

/// A freshly generated key pair (or shared secret).
#[derive(Debug)]
pub struct GeneratedKey {
    /// The JWT algorithm it signs with.
    pub algorithm: Algorithm,
    /// Key id written into the JWK and into minted tokens.
    pub kid: String,
    /// PKCS#8 PEM private key, or the shared secret for HS256.
    pub private: Secret<String>,
    /// SPKI PEM public key; `None` for a shared secret.
    pub public_pem: Option<String>,
    /// The public JWK set (`{"keys":[...]}`); `None` for a shared secret.
    pub jwks: Option<serde_json::Value>,
}

/// Generates a key pair of the given kind.
pub fn generate(kind: KeyKind, kid: &str) -> Result<GeneratedKey, KeyError> {
    use ed25519_dalek::pkcs8::EncodePrivateKey as _;
    use ed25519_dalek::pkcs8::spki::EncodePublicKey as _;
    use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;

    let fail = |what: &str, e: &dyn std::fmt::Display| {
        KeyError::Ring(format!("cannot generate {what} key: {e}"))
    };
    let (private, public_pem, jwk) = match kind {
        KeyKind::Ed25519 => {
            let sk = ed25519_dalek::SigningKey::generate(&mut OsRng);
            // PKCS#8 v1 (no embedded public key): Python's `cryptography`, and
            // so PyJWT, refuse the v2 form ed25519-dalek writes by default.
            let v1 = ed25519_dalek::pkcs8::KeypairBytes {
                secret_key: sk.to_bytes(),
                public_key: None,
            };
            let private = v1
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| fail("Ed25519", &e))?;
            let vk = sk.verifying_key();
            let public = vk
                .to_public_key_pem(LineEnding::LF)
                .map_err(|e| fail("Ed25519", &e))?;
            let jwk = serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "x": B64URL.encode(vk.as_bytes()),
            });
            (private.to_string(), Some(public), Some(jwk))
        }
        KeyKind::Es256 => {
            use p256::elliptic_curve::sec1::ToEncodedPoint as _;
            let sk = p256::SecretKey::random(&mut OsRng);
            let private = sk
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| fail("P-256", &e))?;
            let pk = sk.public_key();
            let public = pk
                .to_public_key_pem(LineEnding::LF)
                .map_err(|e| fail("P-256", &e))?;
            let point = pk.to_encoded_point(false);
            let (x, y) = (
                point.x().ok_or_else(|| fail("P-256", &"identity point"))?,
                point.y().ok_or_else(|| fail("P-256", &"identity point"))?,
            );
            let jwk = serde_json::json!({
                "kty": "EC", "crv": "P-256", "x": B64URL.encode(x), "y": B64URL.encode(y),
            });
            (private.to_string(), Some(public), Some(jwk))
        }
        KeyKind::Rs256 => {
            use rsa::traits::PublicKeyParts as _;
            let sk = rsa::RsaPrivateKey::new(&mut OsRng, 2048).map_err(|e| fail("RSA", &e))?;
            let private = rsa::pkcs8::EncodePrivateKey::to_pkcs8_pem(&sk, LineEnding::LF)
                .map_err(|e| fail("RSA", &e))?;
            let pk = sk.to_public_key();
            let public = rsa::pkcs8::EncodePublicKey::to_public_key_pem(&pk, LineEnding::LF)
                .map_err(|e| fail("RSA", &e))?;
            let jwk = serde_json::json!({
                "kty": "RSA",
                "n": B64URL.encode(pk.n().to_bytes_be()),
                "e": B64URL.encode(pk.e().to_bytes_be()),
            });
            (private.to_string(), Some(public), Some(jwk))
        }
        KeyKind::Hs256 => (random_token(32), None, None),
    };
    let algorithm = kind.algorithm();
    let jwks = jwk.map(|mut jwk| {
        jwk["kid"] = kid.into();
        jwk["alg"] = format!("{algorithm:?}").into();
        jwk["use"] = "sig".into();
        serde_json::json!({ "keys": [jwk] })
    });
    Ok(GeneratedKey {
        algorithm,
        kid: kid.to_string(),
        private: Secret::new(private),
        public_pem,
        jwks,
    })
}

/// `n` random bytes as unpadded base64url: token ids, secrets, bearer keys.
///
/// From the thread's CSPRNG (ChaCha, seeded and reseeded from the OS):
/// one open names a session and may mint a ticket, and a system call for
/// each was a measurable part of the CPU an open costs.
pub fn random_token(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut bytes);
    B64URL.encode(bytes)
}

/// Why a signing key could not be loaded, or a token not signed.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    /// The key file could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The key file.
        path: PathBuf,
        /// Why (in the message, so not a `source` that `{:#}` would print twice).
        error: std::io::Error,
    },
    /// The PEM is no private key Porthole can sign with.
    #[error("{NOT_A_SIGNING_KEY}")]
    NotASigningKey,
    /// The key file holds no private key Porthole can sign with.
    #[error("{path}: {NOT_A_SIGNING_KEY}")]
    NotASigningKeyFile {
        /// The key file.
        path: PathBuf,
    },
    /// jsonwebtoken could not sign (a key that loaded always signs; a bug).
    #[error("signing failed: {0}")]
    Sign(jsonwebtoken::errors::Error),
}

const NOT_A_SIGNING_KEY: &str = "not an Ed25519, P-256 or RSA private key in PKCS#8 PEM form";

/// A jsonwebtoken constructor for one key family.
type PemLoader = fn(&[u8]) -> jsonwebtoken::errors::Result<EncodingKey>;

/// A key that signs console tokens.
pub struct Signer {
    kid: Option<String>,
    algorithm: Algorithm,
    key: EncodingKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads a PKCS#8 PEM private key; the algorithm follows from the key
    /// (Ed25519 → EdDSA, P-256 → ES256, RSA → RS256).
    pub fn from_private_pem(pem: &[u8], kid: Option<String>) -> Result<Signer, SigningError> {
        let candidates: [(Algorithm, PemLoader); 3] = [
            (Algorithm::EdDSA, EncodingKey::from_ed_pem),
            (Algorithm::ES256, EncodingKey::from_ec_pem),
            (Algorithm::RS256, EncodingKey::from_rsa_pem),
        ];
        for (algorithm, load) in candidates {
            if let Ok(key) = load(pem) {
                // jsonwebtoken classifies PEM leniently; a test signature proves
                // the key really works with the algorithm before we trust it.
                let signer = Signer {
                    kid: kid.clone(),
                    algorithm,
                    key,
                };
                if jsonwebtoken::encode(&signer.header(), &serde_json::json!({}), &signer.key)
                    .is_ok()
                {
                    return Ok(signer);
                }
            }
        }
        Err(SigningError::NotASigningKey)
    }

    /// Loads a private key file (see [`Signer::from_private_pem`]).
    pub fn from_private_pem_file(path: &Path, kid: Option<String>) -> Result<Signer, SigningError> {
        let pem = std::fs::read(path).map_err(|error| SigningError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::from_private_pem(&pem, kid).map_err(|e| match e {
            SigningError::NotASigningKey => SigningError::NotASigningKeyFile {
                path: path.to_path_buf(),
            },
            other => other,
        })
    }

    /// An HS256 signer from a shared secret.
    pub fn from_secret(secret: &[u8], kid: Option<String>) -> Signer {
        Signer {
            kid,
            algorithm: Algorithm::HS256,
            key: EncodingKey::from_secret(secret.trim_ascii()),
        }
    }

    /// The algorithm tokens are signed with.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The key id written into token headers.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    fn header(&self) -> Header {
        let mut header = Header::new(self.algorithm);
        header.kid = self.kid.clone();
        header
    }

    /// Signs a claim set.
    pub fn sign(&self, claims: &ConsoleClaims) -> Result<Secret<String>, SigningError> {
        jsonwebtoken::encode(&self.header(), claims, &self.key)
            .map(Secret::new)
            .map_err(SigningError::Sign)
    }
}

/// What to put in a token.
#[derive(Debug, Clone)]
pub struct MintRequest {
    /// `iss`.
    pub issuer: String,
    /// `aud`.
    pub audience: String,
    /// `sub`: the instance id.
    pub instance: String,
    /// `user`: who the console is for, if the caller says.
    pub user: Option<String>,
    /// `console`: type and target.
    pub console: ConsoleClaim,
    /// Lifetime in seconds (`exp - iat`).
    pub ttl_secs: u64,
}

impl MintRequest {
    /// The claim set for this request, issued at `now` with a fresh `jti`.
    pub fn claims(&self, now: u64) -> ConsoleClaims {
        ConsoleClaims {
            iss: self.issuer.clone(),
            aud: Audience::One(self.audience.clone()),
            sub: self.instance.clone(),
            user: self.user.clone(),
            exp: now + self.ttl_secs,
            nbf: Some(now),
            iat: now,
            jti: random_token(16),
            ver: Some(SCHEMA_VERSION),
            console: self.console.clone(),
            shadow_of: None,
            playback: None,
        }
    }
}
