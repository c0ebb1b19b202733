//! Verification keys: where they come from, and the ring that selects one per token.
//!
//! The algorithm is pinned per key by the operator and never taken from the
//! token: a token whose header names another algorithm is refused before any
//! signature check. Keys are selected by `kid` from an in-memory map only (never
//! used as a path or URL). When more than one key is loaded every key must have
//! a `kid`, so several keys can be active at once during a rotation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::ValidationPolicy;

/// One place verification keys are read from (the `[[tokens.keys]]` entries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A public key in PEM (SPKI) form, for one pinned asymmetric algorithm.
    PublicKeyPem {
        /// Key id tokens name in their header; optional only for a lone key.
        kid: Option<String>,
        /// The one algorithm this key verifies.
        algorithm: Algorithm,
        /// PEM file.
        path: PathBuf,
    },
    /// A JWK set file (`{"keys": [...]}`); every key needs a `kid`.
    Jwks {
        /// JSON file.
        path: PathBuf,
    },
    /// A shared HMAC secret (HS256); only with `tokens.allow_hmac = true`.
    SharedSecret {
        /// Key id; optional only for a lone key.
        kid: Option<String>,
        /// File holding the secret (surrounding whitespace is trimmed).
        path: PathBuf,
    },
}

/// Why keys could not be loaded or used. Loading errors keep the old ring on reload.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File that failed.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The file was read but holds no usable key.
    #[error("{path}: {message}")]
    Invalid {
        /// File that failed.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The file was read but its key cannot verify tokens.
    #[error("{path}: {error}")]
    Unusable {
        /// File that failed.
        path: PathBuf,
        /// What is wrong with its key.
        error: KeyFormatError,
    },
    /// The set of keys as a whole is unusable.
    #[error("{0}")]
    Ring(String),
}

/// Why a PEM public key or a JWK cannot verify tokens (the file is named by
/// [`KeyError::Unusable`]).
#[derive(Debug, thiserror::Error)]
pub enum KeyFormatError {
    /// The file is not text.
    #[error("not a PEM file")]
    NotPem,
    /// A private key where a public one belongs.
    #[error("this is a private key; give Porthole the public key")]
    PrivateKey,
    /// The pinned algorithm takes no PEM public key (HMAC).
    #[error("algorithm {0:?} does not use a PEM public key")]
    NoPemForAlgorithm(Algorithm),
    /// The PEM is no public key of the pinned algorithm.
    #[error("not a {algorithm:?} public key: {error}")]
    NotPublicKey {
        /// The pinned algorithm.
        algorithm: Algorithm,
        /// jsonwebtoken's reason.
        error: jsonwebtoken::errors::Error,
    },
    /// A JWK without `kid`.
    #[error("every key in a JWK set needs a `kid`")]
    JwkWithoutKid,
    /// A JWK whose `alg` is no signature algorithm.
    #[error("key `{kid}`: algorithm {alg:?} cannot sign tokens")]
    JwkAlgorithmUnusable {
        /// The key.
        kid: String,
        /// Its `alg`.
        alg: jsonwebtoken::jwk::KeyAlgorithm,
    },
    /// A JWK whose `alg` is not its key type's.
    #[error("key `{kid}`: `alg` {alg:?} does not match its key type")]
    JwkAlgorithmMismatch {
        /// The key.
        kid: String,
        /// Its `alg`.
        alg: Algorithm,
    },
    /// A JWK of a key type that fits several algorithms, without `alg`.
    #[error("key `{kid}`: set `alg` for this key type")]
    JwkNeedsAlgorithm {
        /// The key.
        kid: String,
    },
    /// jsonwebtoken refused the JWK.
    #[error("key `{kid}`: {error}")]
    Jwk {
        /// The key.
        kid: String,
        /// jsonwebtoken's reason.
        error: jsonwebtoken::errors::Error,
    },
}

impl KeyError {
    fn invalid(path: &Path, message: impl Into<String>) -> Self {
        KeyError::Invalid {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    fn unusable(path: &Path, error: KeyFormatError) -> Self {
        KeyError::Unusable {
            path: path.to_path_buf(),
            error,
        }
    }
}

/// Algorithms Porthole accepts at all. `none` does not exist in jsonwebtoken;
/// HS* additionally needs an explicit opt-in.
pub fn is_supported_algorithm(alg: Algorithm) -> bool {
    matches!(
        alg,
        Algorithm::EdDSA
            | Algorithm::ES256
            | Algorithm::ES384
            | Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512
            | Algorithm::HS256
            | Algorithm::HS384
            | Algorithm::HS512
    )
}

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// A key ready to verify tokens: its pinned algorithm and the jsonwebtoken
/// validation built for it once, at load time.
pub(crate) struct VerifyingKey {
    pub(crate) kid: Option<String>,
    pub(crate) algorithm: Algorithm,
    pub(crate) key: DecodingKey,
    pub(crate) validation: Validation,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// The loaded keys. Immutable; a reload builds a new ring and swaps it in.
#[derive(Debug, Default)]
pub struct KeyRing {
    by_kid: HashMap<String, VerifyingKey>,
    /// The lone key without a `kid`; only allowed when it is the only key.
    unnamed: Option<VerifyingKey>,
}

/// A key ring with the sources and the HMAC opt-in it was loaded from: what
/// a reload replaces as one, so the file's key list is what is in force.
#[derive(Debug)]
pub struct LoadedKeys {
    /// The `[[tokens.keys]]` entries the ring was read from.
    pub(crate) sources: Vec<KeySource>,
    /// Whether HS256 keys were allowed.
    pub(crate) allow_hmac: bool,
    /// The keys.
    pub(crate) ring: KeyRing,
}

impl LoadedKeys {
    /// Loads every source (see [`KeyRing::load`]).
    pub fn load(
        sources: Vec<KeySource>,
        allow_hmac: bool,
        policy: &ValidationPolicy,
    ) -> Result<LoadedKeys, KeyError> {
        let ring = KeyRing::load(&sources, allow_hmac, policy)?;
        Ok(LoadedKeys {
            sources,
            allow_hmac,
            ring,
        })
    }

    /// The ring.
    pub fn ring(&self) -> &KeyRing {
        &self.ring
    }
}

/// What a token's `kid` selects.
pub(crate) enum Selected<'a> {
    Key(&'a VerifyingKey),
    Unknown(String),
}

impl KeyRing {
    /// Loads every source. Fails as a whole: a reload never half-applies.
    pub fn load(
        sources: &[KeySource],
        allow_hmac: bool,
        policy: &ValidationPolicy,
    ) -> Result<KeyRing, KeyError> {
        let mut loaded = Vec::new();
        for source in sources {
            match source {
                KeySource::PublicKeyPem {
                    kid,
                    algorithm,
                    path,
                } => {
                    let pem = read(path)?;
                    let key = decoding_key_from_pem(&pem, *algorithm)
                        .map_err(|e| KeyError::unusable(path, e))?;
                    loaded.push((kid.clone(), *algorithm, key));
                }
                KeySource::SharedSecret { kid, path } => {
                    let secret = read(path)?;
                    let secret = secret.trim_ascii();
                    if secret.len() < 32 {
                        return Err(KeyError::invalid(
                            path,
                            "an HMAC secret must be at least 32 bytes",
                        ));
                    }
                    loaded.push((
                        kid.clone(),
                        Algorithm::HS256,
                        DecodingKey::from_secret(secret),
                    ));
                }
                KeySource::Jwks { path } => {
                    let json = read(path)?;
                    let set: JwkSet = serde_json::from_slice(&json)
                        .map_err(|e| KeyError::invalid(path, format!("not a JWK set: {e}")))?;
                    if set.keys.is_empty() {
                        return Err(KeyError::invalid(path, "the JWK set holds no keys"));
                    }
                    for jwk in &set.keys {
                        let (kid, alg, key) =
                            from_jwk(jwk).map_err(|e| KeyError::unusable(path, e))?;
                        loaded.push((Some(kid), alg, key));
                    }
                }
            }
        }
        if loaded.is_empty() {
            return Err(KeyError::Ring(
                "no token verification keys are configured".into(),
            ));
        }
        let lone = loaded.len() == 1;
        let mut ring = KeyRing::default();
        for (kid, algorithm, key) in loaded {
            if !is_supported_algorithm(algorithm) {
                return Err(KeyError::Ring(format!(
                    "algorithm {algorithm:?} is not supported"
                )));
            }
            if is_hmac(algorithm) && !allow_hmac {
                return Err(KeyError::Ring(
                    "an HMAC (shared secret) key needs `tokens.allow_hmac = true`".into(),
                ));
            }
            let validation = policy.jsonwebtoken_validation(algorithm);
            let vk = VerifyingKey {
                kid: kid.clone(),
                algorithm,
                key,
                validation,
            };
            match kid {
                Some(kid) => {
                    if ring.by_kid.insert(kid.clone(), vk).is_some() {
                        return Err(KeyError::Ring(format!("key id `{kid}` is used twice")));
                    }
                }
                None if lone => ring.unnamed = Some(vk),
                None => {
                    return Err(KeyError::Ring(
                        "every key needs a `kid` when more than one key is configured".into(),
                    ));
                }
            }
        }
        Ok(ring)
    }

    /// Number of keys loaded.
    pub fn len(&self) -> usize {
        self.by_kid.len() + usize::from(self.unnamed.is_some())
    }

    /// Whether the ring is empty (never true for a loaded ring).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Key ids in the ring, sorted (for logs and `inspect`).
    pub fn kids(&self) -> Vec<String> {
        let mut kids: Vec<String> = self.by_kid.keys().cloned().collect();
        kids.sort();
        kids
    }

    /// Whether `token`'s signature verifies with the key its header selects,
    /// claims unchecked: whether tokens signed like it can be accepted at all
    /// (the issuance API's signing key must be one of the ring's).
    pub fn verifies_signature(&self, token: &str) -> Result<(), String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
        let key = match self.select(header.kid.as_deref()) {
            Selected::Key(k) => k,
            Selected::Unknown(why) => return Err(why),
        };
        if header.alg != key.algorithm {
            return Err(format!(
                "it signs with {:?}, the key with its kid is pinned to {:?}",
                header.alg, key.algorithm
            ));
        }
        let mut signature_only = Validation::new(key.algorithm);
        signature_only.required_spec_claims.clear();
        signature_only.validate_exp = false;
        signature_only.validate_aud = false;
        jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &signature_only)
            .map(|_| ())
            .map_err(|_| "the key with its kid does not verify its signature".to_string())
    }

    pub(crate) fn select(&self, kid: Option<&str>) -> Selected<'_> {
        match kid {
            Some(kid) => match self.by_kid.get(kid) {
                Some(k) => Selected::Key(k),
                None => Selected::Unknown(format!("no key with kid `{}`", printable(kid))),
            },
            // A token without `kid` is only accepted when the choice is unambiguous:
            // trying every key would multiply the cost of a forged token.
            None => match (&self.unnamed, self.by_kid.len()) {
                (Some(k), _) => Selected::Key(k),
                (None, 1) => Selected::Key(self.by_kid.values().next().expect("one key")),
                _ => Selected::Unknown("the token has no kid and several keys are loaded".into()),
            },
        }
    }
}

/// A kid comes from the attacker: keep what reaches logs short and printable.
fn printable(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn decoding_key_from_pem(pem: &[u8], alg: Algorithm) -> Result<DecodingKey, KeyFormatError> {
    let text = std::str::from_utf8(pem).map_err(|_| KeyFormatError::NotPem)?;
    if text.contains("PRIVATE KEY") {
        // Porthole only ever needs the public half; refusing private keys here
        // keeps signing material off gateway hosts by mistake.
        return Err(KeyFormatError::PrivateKey);
    }
    let key = match alg {
        Algorithm::EdDSA => DecodingKey::from_ed_pem(pem),
        Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem),
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => DecodingKey::from_rsa_pem(pem),
        other => return Err(KeyFormatError::NoPemForAlgorithm(other)),
    };
    key.map_err(|error| KeyFormatError::NotPublicKey {
        algorithm: alg,
        error,
    })
}

fn from_jwk(jwk: &Jwk) -> Result<(String, Algorithm, DecodingKey), KeyFormatError> {
    let kid = jwk
        .common
        .key_id
        .clone()
        .ok_or(KeyFormatError::JwkWithoutKid)?;
    let declared = match jwk.common.key_algorithm {
        Some(a) => Some(a.to_string().parse::<Algorithm>().map_err(|_| {
            KeyFormatError::JwkAlgorithmUnusable {
                kid: kid.clone(),
                alg: a,
            }
        })?),
        None => None,
    };
    // Only the unambiguous key types may omit `alg`.
    let inferred = match &jwk.algorithm {
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Some(Algorithm::EdDSA)
        }
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
            Some(Algorithm::ES256)
        }
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => {
            Some(Algorithm::ES384)
        }
        _ => None,
    };
    let alg = match (declared, inferred) {
        (Some(d), Some(i)) if d != i => {
            return Err(KeyFormatError::JwkAlgorithmMismatch { kid, alg: d });
        }
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => return Err(KeyFormatError::JwkNeedsAlgorithm { kid }),
    };
    let key = match DecodingKey::from_jwk(jwk) {
        Ok(key) => key,
        Err(error) => return Err(KeyFormatError::Jwk { kid, error }),
    };
    if !alg_fits_family(alg, &key) {
        return Err(KeyFormatError::JwkAlgorithmMismatch { kid, alg });
    }
    Ok((kid, alg, key))
}

fn alg_fits_family(alg: Algorithm, key: &DecodingKey) -> bool {
    key.family().algorithms().contains(&alg)
}
