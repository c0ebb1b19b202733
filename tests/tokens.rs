//! Token validation: every refusal reason, each beside a good token on the same path.
//!
//! Each test first shows a good token passing the exact validator and console
//! type it then presents the bad token to, so no test can pass by accident.

use crate::common;

use common::{AUDIENCE, ISSUER, TestKey, good_claims, validator};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use porthole::token::signing::KeyKind;
use porthole::token::{ConsoleType, KeySource, RefusalReason, TokenValidator, unix_now};
use serde_json::{Value, json};

struct Fixture {
    _dir: tempfile::TempDir,
    key: TestKey,
    other: TestKey,
    v: TokenValidator,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let key = TestKey::new(dir.path(), KeyKind::Ed25519, "k1");
    // Same kid, different key: not loaded; signs forgeries.
    let other = TestKey::new(dir.path(), KeyKind::Ed25519, "k1-impostor");
    let v = validator(vec![key.source()], false);
    Fixture {
        _dir: dir,
        key,
        other,
        v,
    }
}

/// Asserts the good token passes and `bad` is refused with `want`, both for `expect`.
fn good_passes_bad_refused(
    f: &Fixture,
    bad: &str,
    expect: Option<ConsoleType>,
    want: RefusalReason,
) {
    let good = f.key.sign(&good_claims());
    let grant =
        f.v.check(&good, expect, unix_now())
            .expect("the good token passes the same path");
    assert_eq!(grant.console, ConsoleType::Novnc);
    let refusal =
        f.v.check(bad, expect, unix_now())
            .expect_err("the bad token is refused");
    assert_eq!(refusal.reason, want, "detail: {}", refusal.detail);
    // The detail is for operators; it must never echo the token.
    assert!(
        !refusal.detail.contains(bad),
        "refusal detail leaks the token"
    );
}

fn with(mut claims: Value, f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    f(claims.as_object_mut().unwrap());
    claims
}

#[test]
fn too_large_is_refused_before_parsing() {
    let f = fixture();
    let huge = with(good_claims(), |c| {
        c.insert("padding".into(), json!("x".repeat(5000)));
    });
    good_passes_bad_refused(&f, &f.key.sign(&huge), None, RefusalReason::TooLarge);
    // Not even a JWT, but too large: still `too_large`, proving the cap comes first.
    good_passes_bad_refused(&f, &"A".repeat(10_000), None, RefusalReason::TooLarge);
}

#[test]
fn malformed_tokens_are_refused() {
    let f = fixture();
    good_passes_bad_refused(&f, "not-a-jwt", None, RefusalReason::Malformed);
    good_passes_bad_refused(&f, "a.b.c", None, RefusalReason::Malformed);
    for claim in ["jti", "iat", "console", "exp", "sub", "aud", "iss"] {
        let missing = with(good_claims(), |c| {
            c.remove(claim);
        });
        good_passes_bad_refused(&f, &f.key.sign(&missing), None, RefusalReason::Malformed);
    }
    // A string `exp` must not be read as "absent" (CVE-2026-25537's class of bug).
    let string_exp = with(good_claims(), |c| {
        c.insert("exp".into(), json!("99999999999"));
    });
    good_passes_bad_refused(&f, &f.key.sign(&string_exp), None, RefusalReason::Malformed);
    // Credentials never travel in a token: unknown console fields are refused.
    let with_password = with(good_claims(), |c| {
        c["console"]["password"] = json!("s3cret");
    });
    good_passes_bad_refused(
        &f,
        &f.key.sign(&with_password),
        None,
        RefusalReason::Malformed,
    );
    let unknown_type = with(good_claims(), |c| {
        c["console"]["type"] = json!("rdp");
    });
    good_passes_bad_refused(
        &f,
        &f.key.sign(&unknown_type),
        None,
        RefusalReason::Malformed,
    );
    let future_version = with(good_claims(), |c| {
        c.insert("ver".into(), json!(2));
    });
    good_passes_bad_refused(
        &f,
        &f.key.sign(&future_version),
        None,
        RefusalReason::Malformed,
    );
    // A line break in a claim that log lines carry would forge a log line.
    for (claim, value) in [
        ("sub", "vm-1\r\n2026-12-01T00:00:00Z INFO forged"),
        ("jti", "abc\u{1b}[2J"),
        ("user", "alice\n{\"event\":\"forged\"}"),
    ] {
        let forged = with(good_claims(), |c| {
            c.insert(claim.into(), json!(value));
        });
        good_passes_bad_refused(&f, &f.key.sign(&forged), None, RefusalReason::Malformed);
    }
    // Header parameters that would let the token choose its own key.
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("k1".into());
    header.jku = Some("https://evil.example/jwks.json".into());
    good_passes_bad_refused(
        &f,
        &f.key.sign_with_header(&header, &good_claims()),
        None,
        RefusalReason::Malformed,
    );
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("k1".into());
    header.crit = Some(vec!["exp".into()]);
    good_passes_bad_refused(
        &f,
        &f.key.sign_with_header(&header, &good_claims()),
        None,
        RefusalReason::Malformed,
    );
}

#[test]
fn a_user_claim_is_granted_as_it_is_and_bounded() {
    let f = fixture();
    let alice = with(good_claims(), |c| {
        c.insert("user".into(), json!("alice@example.org"));
    });
    let grant =
        f.v.check(&f.key.sign(&alice), None, unix_now())
            .expect("a token naming its user passes");
    assert_eq!(grant.user(), Some("alice@example.org"));
    let grant = f.v.check(&f.key.sign(&good_claims()), None, unix_now());
    assert_eq!(grant.unwrap().user(), None, "optional");
    for bad in [json!(""), json!("u".repeat(256)), json!(7)] {
        let token = f.key.sign(&with(good_claims(), |c| {
            c.insert("user".into(), bad.clone());
        }));
        good_passes_bad_refused(&f, &token, None, RefusalReason::Malformed);
    }
}

#[test]
fn unknown_key_is_refused() {
    let f = fixture();
    good_passes_bad_refused(
        &f,
        &f.other.sign(&good_claims()),
        None,
        RefusalReason::UnknownKey,
    );
}

#[test]
fn wrong_algorithm_is_refused() {
    let f = fixture();
    // The classic confusion: HS256 keyed with the verifier's public key bytes.
    let public_pem = f.key.generated.public_pem.clone().unwrap();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("k1".into());
    let confused = jsonwebtoken::encode(
        &header,
        &good_claims(),
        &EncodingKey::from_secret(public_pem.as_bytes()),
    )
    .unwrap();
    good_passes_bad_refused(&f, &confused, None, RefusalReason::WrongAlgorithm);
    // `alg: none` is not an algorithm at all: the header does not parse.
    let none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","kid":"k1"}"#),
        b64(&good_claims().to_string())
    );
    good_passes_bad_refused(&f, &none, None, RefusalReason::Malformed);
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[test]
fn bad_signatures_are_refused() {
    let f = fixture();
    // Signed by another key that claims the loaded kid.
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("k1".into());
    good_passes_bad_refused(
        &f,
        &f.other.sign_with_header(&header, &good_claims()),
        None,
        RefusalReason::BadSignature,
    );
    // A good token whose payload was edited (another host) after signing.
    let good = f.key.sign(&good_claims());
    let parts: Vec<&str> = good.split('.').collect();
    let edited = with(good_claims(), |c| {
        c["console"]["port"] = json!(5999);
    });
    let tampered = format!("{}.{}.{}", parts[0], b64(&edited.to_string()), parts[2]);
    good_passes_bad_refused(&f, &tampered, None, RefusalReason::BadSignature);
    // An empty signature and an all-zero one.
    good_passes_bad_refused(
        &f,
        &format!("{}.{}.", parts[0], parts[1]),
        None,
        RefusalReason::BadSignature,
    );
    let zeros = b64(&"\0".repeat(64));
    good_passes_bad_refused(
        &f,
        &format!("{}.{}.{zeros}", parts[0], parts[1]),
        None,
        RefusalReason::BadSignature,
    );
}

#[test]
fn expired_tokens_are_refused_past_the_leeway_only() {
    let f = fixture();
    let now = unix_now();
    let expired = with(good_claims(), |c| {
        c.insert("iat".into(), json!(now - 120));
        c.insert("nbf".into(), json!(now - 120));
        c.insert("exp".into(), json!(now - 60));
    });
    good_passes_bad_refused(&f, &f.key.sign(&expired), None, RefusalReason::Expired);
    // Within the 5 s leeway it still passes.
    let just_expired = with(good_claims(), |c| {
        c.insert("exp".into(), json!(now - 1));
        c.insert("iat".into(), json!(now - 30));
    });
    f.v.check(&f.key.sign(&just_expired), None, now)
        .expect("within leeway");
}

#[test]
fn not_yet_valid_tokens_are_refused() {
    let f = fixture();
    let now = unix_now();
    let later = with(good_claims(), |c| {
        c.insert("nbf".into(), json!(now + 120));
        c.insert("exp".into(), json!(now + 180));
    });
    good_passes_bad_refused(&f, &f.key.sign(&later), None, RefusalReason::NotYetValid);
    let issued_in_future = with(good_claims(), |c| {
        c.insert("iat".into(), json!(now + 120));
        c.insert("exp".into(), json!(now + 180));
        c.remove("nbf");
    });
    good_passes_bad_refused(
        &f,
        &f.key.sign(&issued_in_future),
        None,
        RefusalReason::NotYetValid,
    );
}

#[test]
fn a_token_valid_for_a_year_is_refused() {
    let f = fixture();
    let now = unix_now();
    let year = with(good_claims(), |c| {
        c.insert("exp".into(), json!(now + 365 * 86_400));
    });
    good_passes_bad_refused(&f, &f.key.sign(&year), None, RefusalReason::LifetimeTooLong);
    // A back-dated `iat` cannot stretch the window either.
    let backdated = with(good_claims(), |c| {
        c.insert("iat".into(), json!(now - 3000));
        c.insert("exp".into(), json!(now + 3000));
    });
    good_passes_bad_refused(
        &f,
        &f.key.sign(&backdated),
        None,
        RefusalReason::LifetimeTooLong,
    );
}

#[test]
fn wrong_audience_is_refused() {
    let f = fixture();
    let other = with(good_claims(), |c| {
        c.insert("aud".into(), json!("another-gateway"));
    });
    good_passes_bad_refused(&f, &f.key.sign(&other), None, RefusalReason::WrongAudience);
    // A list works when it names us.
    let list = with(good_claims(), |c| {
        c.insert("aud".into(), json!(["x", AUDIENCE]));
    });
    f.v.check(&f.key.sign(&list), None, unix_now())
        .expect("aud list naming us");
}

#[test]
fn wrong_issuer_is_refused() {
    let f = fixture();
    let other = with(good_claims(), |c| {
        c.insert("iss".into(), json!(format!("{ISSUER}.evil")));
    });
    good_passes_bad_refused(&f, &f.key.sign(&other), None, RefusalReason::WrongIssuer);
}

#[test]
fn wrong_console_type_is_refused_everywhere_else() {
    let f = fixture();
    let token = f.key.sign(&good_claims()); // novnc
    f.v.check(&token, Some(ConsoleType::Novnc), unix_now())
        .expect("right endpoint");
    for other in ConsoleType::ALL
        .into_iter()
        .filter(|t| *t != ConsoleType::Novnc)
    {
        // A token minted for another type, presented at the novnc endpoint...
        let other_token = f.key.sign(&with(good_claims(), |c| {
            c["console"]["type"] = json!(other.as_str());
        }));
        good_passes_bad_refused(
            &f,
            &other_token,
            Some(ConsoleType::Novnc),
            RefusalReason::WrongConsoleType,
        );
        f.v.check(&other_token, Some(other), unix_now())
            .expect("valid at its own endpoint");
        // ...and the novnc token presented at the other type's endpoint.
        let refusal = f.v.check(&token, Some(other), unix_now()).unwrap_err();
        assert_eq!(refusal.reason, RefusalReason::WrongConsoleType, "{other}");
    }
}

#[test]
fn targets_outside_the_allow_list_are_refused() {
    let f = fixture();
    for (host, port, tls_port) in [
        ("169.254.169.254", 80, None),
        ("10.99.0.1", 5901, None),
        ("10.20.0.5", 22, None),
        ("10.20.0.5", 5901, Some(6379)),
        ("internal.evil", 5901, None),
    ] {
        let bad = with(good_claims(), |c| {
            c["console"] =
                json!({ "type": "novnc", "host": host, "port": port, "tls_port": tls_port });
            if tls_port.is_none() {
                c["console"].as_object_mut().unwrap().remove("tls_port");
            }
        });
        good_passes_bad_refused(
            &f,
            &f.key.sign(&bad),
            Some(ConsoleType::Novnc),
            RefusalReason::TargetNotAllowed,
        );
    }
    let by_name = with(good_claims(), |c| {
        c["console"]["host"] = json!("compute-1.test");
    });
    f.v.check(&f.key.sign(&by_name), None, unix_now())
        .expect("allow-listed host name");
}

#[test]
fn replayed_and_revoked_tokens_are_refused_by_the_store() {
    use futures_util::FutureExt as _;
    use porthole::token::{MemoryRedemptions, Redemption, ReusePolicy};
    use std::sync::Arc;
    let f = fixture();
    let store: Arc<MemoryRedemptions> = Arc::new(MemoryRedemptions::new(100, 5));
    let token = f.key.sign(&good_claims());
    let grant =
        f.v.check(&token, Some(ConsoleType::Novnc), unix_now())
            .unwrap();
    let redeem = || {
        Redemption::begin(
            store.clone(),
            &grant.jti,
            grant.expires_at,
            ReusePolicy::Reconnect,
            None,
            unix_now(),
        )
        .now_or_never()
        .expect("the memory store answers at once")
        .map_err(|e| e.reason)
    };
    let session = redeem().expect("first session");
    assert_eq!(redeem().unwrap_err(), RefusalReason::Replayed);
    drop(session);
    let session = redeem().expect("reconnect after the first session ended");
    store
        .revoke(&grant.jti, grant.expires_at, unix_now())
        .unwrap();
    drop(session);
    assert_eq!(redeem().unwrap_err(), RefusalReason::Revoked);
}

#[test]
fn every_supported_algorithm_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let keys = [
        TestKey::new(dir.path(), KeyKind::Ed25519, "ed"),
        TestKey::new(dir.path(), KeyKind::Es256, "ec"),
        TestKey::new(dir.path(), KeyKind::Rs256, "rsa"),
        TestKey::new(dir.path(), KeyKind::Hs256, "hmac"),
    ];
    let v = validator(keys.iter().map(TestKey::source).collect(), true);
    for k in &keys {
        let grant = v
            .check(&k.sign(&good_claims()), None, unix_now())
            .expect("valid");
        assert_eq!(grant.kid.as_deref(), Some(k.kid.as_str()));
        // Another key's kid on this key's signature is a bad signature or a wrong algorithm, never a pass.
        for other in keys.iter().filter(|o| o.kid != k.kid) {
            let mut header = Header::new(k.algorithm);
            header.kid = Some(other.kid.clone());
            let r = v
                .check(
                    &k.sign_with_header(&header, &good_claims()),
                    None,
                    unix_now(),
                )
                .unwrap_err();
            assert!(
                matches!(
                    r.reason,
                    RefusalReason::BadSignature | RefusalReason::WrongAlgorithm
                ),
                "{r}"
            );
        }
    }
    // JWK sets load too, alg and kid taken from the set.
    let jwks = keys
        .iter()
        .filter_map(|k| k.jwks_path.clone())
        .map(|path| KeySource::Jwks { path })
        .collect();
    let v = validator(jwks, false);
    for k in keys.iter().filter(|k| k.algorithm != Algorithm::HS256) {
        v.check(&k.sign(&good_claims()), None, unix_now())
            .expect("valid via JWKS");
    }
}

#[test]
fn hmac_keys_need_an_explicit_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let k = TestKey::new(dir.path(), KeyKind::Hs256, "hmac");
    let err = TokenValidator::new(
        common::policy(),
        vec![k.source()],
        false,
        common::allow_list(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("allow_hmac"), "{err}");
    validator(vec![k.source()], true);
}

#[test]
fn a_token_without_kid_needs_an_unambiguous_key() {
    let dir = tempfile::tempdir().unwrap();
    let a = TestKey::new(dir.path(), KeyKind::Ed25519, "a");
    let b = TestKey::new(dir.path(), KeyKind::Ed25519, "b");
    let no_kid = |k: &TestKey| k.sign_with_header(&Header::new(Algorithm::EdDSA), &good_claims());
    // One key: a token without kid is fine.
    validator(vec![a.source()], false)
        .check(&no_kid(&a), None, unix_now())
        .expect("lone key");
    // Two keys: a token must say which.
    let v = validator(vec![a.source(), b.source()], false);
    v.check(&a.sign(&good_claims()), None, unix_now())
        .expect("with kid");
    assert_eq!(
        v.check(&no_kid(&a), None, unix_now()).unwrap_err().reason,
        RefusalReason::UnknownKey
    );
}

#[test]
fn rotation_two_keys_by_kid_then_one_retired_by_reload() {
    let dir = tempfile::tempdir().unwrap();
    let old = TestKey::new(dir.path(), KeyKind::Ed25519, "2026-10");
    let new = TestKey::new(dir.path(), KeyKind::Es256, "2026-11");
    let jwks_path = dir.path().join("jwks.json");
    let set = |keys: &[&TestKey]| {
        let keys: Vec<Value> = keys
            .iter()
            .map(|k| k.generated.jwks.as_ref().unwrap()["keys"][0].clone())
            .collect();
        std::fs::write(&jwks_path, json!({ "keys": keys }).to_string()).unwrap();
    };
    set(&[&old]);
    let v = validator(
        vec![KeySource::Jwks {
            path: jwks_path.clone(),
        }],
        false,
    );
    let old_token = old.sign(&good_claims());
    let new_token = new.sign(&good_claims());
    v.check(&old_token, None, unix_now())
        .expect("old key active");
    assert_eq!(
        v.check(&new_token, None, unix_now()).unwrap_err().reason,
        RefusalReason::UnknownKey
    );

    // The issuer publishes the new key: both are active at once, no restart.
    set(&[&old, &new]);
    assert_eq!(v.reload().unwrap(), 2);
    v.check(&old_token, None, unix_now())
        .expect("old key still active");
    v.check(&new_token, None, unix_now())
        .expect("new key active");

    // A broken file is rejected and the ring in force stays.
    std::fs::write(&jwks_path, "{ not json").unwrap();
    assert!(v.reload().is_err());
    v.check(&new_token, None, unix_now())
        .expect("old ring kept after a bad reload");

    // The old key is retired.
    set(&[&new]);
    assert_eq!(v.reload().unwrap(), 1);
    assert_eq!(
        v.check(&old_token, None, unix_now()).unwrap_err().reason,
        RefusalReason::UnknownKey
    );
    v.check(&new_token, None, unix_now())
        .expect("new key active");
}

#[test]
fn private_keys_are_not_accepted_as_verification_keys() {
    let dir = tempfile::tempdir().unwrap();
    let k = TestKey::new(dir.path(), KeyKind::Ed25519, "k");
    let src = KeySource::PublicKeyPem {
        kid: Some("k".into()),
        algorithm: Algorithm::EdDSA,
        path: k.private_path.clone(),
    };
    let err =
        TokenValidator::new(common::policy(), vec![src], false, common::allow_list()).unwrap_err();
    assert!(err.to_string().contains("private key"), "{err}");
}
