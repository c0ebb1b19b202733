//! The Nova resolver against an in-process fake of Keystone and Nova's
//! console-auth-tokens API (the real ones are in `tests/e2e/test_nova.py`):
//! what each answer becomes, what is asked how often, and that nothing but
//! a canonical UUID ever reaches Nova.

use crate::common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use common::{Gateway, TestKey, good_claims, spawn_gateway, validator};
use porthole::secret::Secret;
use porthole::token::nova::{Credential, NovaResolver, NovaSettings, Resolvers, token_hash};
use porthole::token::signing::KeyKind;
use porthole::token::{ConsoleType, GrantResolver, RefusalReason};
use serde_json::{Value, json};

/// What the fake answers, and what it was asked.
#[derive(Default)]
struct Fake {
    /// Console tokens Nova knows.
    consoles: Mutex<HashMap<String, Value>>,
    /// Keystone tokens Nova accepts.
    valid: Mutex<Vec<String>>,
    auths: AtomicUsize,
    lookups: AtomicUsize,
    /// Nova answers this status to every lookup instead.
    status: Mutex<Option<u16>>,
    /// Nova waits this long before answering.
    delay: Mutex<Duration>,
    /// The compute endpoint the catalog names.
    compute: Mutex<String>,
}

async fn keystone(State(f): State<Arc<Fake>>, body: axum::Json<Value>) -> Response {
    let n = f.auths.fetch_add(1, Ordering::SeqCst) + 1;
    let method = &body["auth"]["identity"]["methods"][0];
    let ok = match method.as_str() {
        Some("password") => body["auth"]["identity"]["password"]["user"]["password"] == "pw-1",
        Some("application_credential") => {
            body["auth"]["identity"]["application_credential"]["secret"] == "ac-secret"
        }
        _ => false,
    };
    if !ok {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let token = format!("ks-{n}");
    f.valid.lock().unwrap().push(token.clone());
    (
        [("x-subject-token", token)],
        axum::Json(json!({"token": {
            "issued_at": "2026-12-01T12:00:00.000000Z",
            "expires_at": "2026-12-01T13:00:00.000000Z",
            "catalog": [{"type": "compute", "endpoints": [
                {"interface": "public", "region_id": "RegionOne", "url": "http://192.0.2.1:1/v2.1"},
                {"interface": "internal", "region_id": "RegionOne", "url": *f.compute.lock().unwrap()},
            ]}]
        }})),
    )
        .into_response()
}

async fn lookup(State(f): State<Arc<Fake>>, Path(token): Path<String>, h: HeaderMap) -> Response {
    f.lookups.fetch_add(1, Ordering::SeqCst);
    let delay = *f.delay.lock().unwrap();
    tokio::time::sleep(delay).await;
    if h.get("openstack-api-version").and_then(|v| v.to_str().ok()) != Some("compute 2.99") {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let ks = h
        .get("x-auth-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !f.valid.lock().unwrap().iter().any(|t| t == ks) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if let Some(s) = *f.status.lock().unwrap() {
        return StatusCode::from_u16(s).unwrap().into_response();
    }
    match f.consoles.lock().unwrap().get(&token) {
        // Sent in chunks, with no Content-Length.
        Some(c) if c["chunked"] == true => {
            let body = json!({ "console": c }).to_string().into_bytes();
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                body.chunks(8192).map(|c| Ok(c.to_vec())).collect();
            axum::body::Body::from_stream(futures_util::stream::iter(chunks)).into_response()
        }
        Some(c) => axum::Json(json!({ "console": c })).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"itemNotFound": {"code": 404}})),
        )
            .into_response(),
    }
}

/// The fake on a free loopback port; its Keystone URL.
async fn start(fake: &Arc<Fake>) -> String {
    let app = Router::new()
        .route("/v3/auth/tokens", post(keystone))
        .route("/v2.1/os-console-auth-tokens/{token}", get(lookup))
        .route(
            "/v2.1/",
            get(|| async {
                axum::Json(
                    json!({"version": {"id": "v2.1", "version": "2.104", "min_version": "2.1"}}),
                )
            }),
        )
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    *fake.compute.lock().unwrap() = format!("http://{addr}/v2.1");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/v3")
}

fn settings(auth_url: String) -> NovaSettings {
    NovaSettings {
        auth_url,
        credential: Credential::Password {
            username: "porthole".into(),
            user_domain: "Default".into(),
            password: Secret::new("pw-1".into()),
            project: "service".into(),
            project_domain: "Default".into(),
        },
        region: Some("RegionOne".into()),
        interface: "internal".into(),
        compute_url: None,
        ca_file: None,
        timeout: Duration::from_secs(2),
        token_ttl_secs: 600,
        cache_secs: 5,
        negative_cache_secs: 30,
        max_in_flight: 8,
        unseen_per_sec: 50,
        unseen_burst: 100,
        capacity: 1000,
        microversion: "2.99".into(),
    }
}

const VNC_TOKEN: &str = "0b4c2a1e-9f3d-4e2a-8b1c-5d6e7f8a9b0c";
const DIRECT_TOKEN: &str = "7d1f0c2b-1111-4aaa-8bbb-0123456789ab";
const UNKNOWN_TOKEN: &str = "00000000-0000-4000-8000-000000000000";
const INSTANCE: &str = "11111111-2222-4333-8444-555555555555";

async fn fixture() -> (Arc<Fake>, NovaSettings) {
    let fake = Arc::new(Fake::default());
    fake.consoles.lock().unwrap().extend([
        (
            VNC_TOKEN.to_string(),
            json!({"instance_uuid": INSTANCE, "host": "10.20.0.5", "port": 5901, "internal_access_path": null}),
        ),
        (
            DIRECT_TOKEN.to_string(),
            json!({"instance_uuid": INSTANCE, "host": "10.20.0.5", "port": 5930, "tls_port": 5931, "internal_access_path": null}),
        ),
    ]);
    let url = start(&fake).await;
    (fake, settings(url))
}

fn resolver(s: NovaSettings) -> NovaResolver {
    NovaResolver::new(s).expect("resolver builds")
}

#[tokio::test]
async fn a_nova_token_becomes_a_grant_of_the_routes_type_keyed_by_novas_hash() {
    let (fake, s) = fixture().await;
    let r = resolver(s);
    let allow = common::allow_list();
    let g = r
        .resolve(VNC_TOKEN, Some(ConsoleType::Novnc), &allow)
        .await
        .unwrap();
    assert_eq!(g.console, ConsoleType::Novnc);
    assert_eq!(g.jti, token_hash(VNC_TOKEN));
    assert_eq!(g.instance, INSTANCE);
    assert_eq!((g.target.host.as_str(), g.target.port), ("10.20.0.5", 5901));
    assert_eq!(
        g.expires_at,
        g.claims.iat + 600,
        "first sight plus token_ttl_secs"
    );
    assert_eq!(g.backend, "compute");
    // The same token on the serial route is a serial grant: Nova names no type.
    let g2 = r
        .resolve(VNC_TOKEN, Some(ConsoleType::Serial), &allow)
        .await
        .unwrap();
    assert_eq!(g2.console, ConsoleType::Serial);
    assert_eq!(g2.claims.iat, g.claims.iat, "first sight is kept");
    // Refused before connecting: spice-direct and vnc-direct routes.
    for k in [ConsoleType::SpiceDirect, ConsoleType::VncDirect] {
        let e = r.resolve(VNC_TOKEN, Some(k), &allow).await.unwrap_err();
        assert_eq!(e.reason, RefusalReason::WrongConsoleType, "{k}");
    }
    // A page that does not say its type cannot use a Nova token.
    let e = r.resolve(VNC_TOKEN, None, &allow).await.unwrap_err();
    assert_eq!(e.reason, RefusalReason::WrongConsoleType);
    assert_eq!(
        fake.lookups.load(Ordering::SeqCst),
        1,
        "the rest came from the cache"
    );
    assert_eq!(fake.auths.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_spice_direct_token_is_known_by_its_tls_port_and_refused_on_browser_routes() {
    let (_fake, s) = fixture().await;
    let r = resolver(s);
    let allow = common::allow_list();
    let g = r
        .resolve(DIRECT_TOKEN, Some(ConsoleType::SpiceDirect), &allow)
        .await
        .unwrap();
    assert_eq!(g.console, ConsoleType::SpiceDirect);
    assert_eq!(g.target.tls_port, Some(5931));
    for k in [
        ConsoleType::Novnc,
        ConsoleType::SpiceHtml5,
        ConsoleType::Serial,
    ] {
        let e = r.resolve(DIRECT_TOKEN, Some(k), &allow).await.unwrap_err();
        assert_eq!(e.reason, RefusalReason::WrongConsoleType, "{k}");
    }
}

#[tokio::test]
async fn an_unknown_token_is_refused_and_its_404_remembered() {
    let (fake, s) = fixture().await;
    let r = resolver(s);
    let allow = common::allow_list();
    for _ in 0..3 {
        let e = r
            .resolve(UNKNOWN_TOKEN, Some(ConsoleType::Novnc), &allow)
            .await
            .unwrap_err();
        assert_eq!(e.reason, RefusalReason::UnknownToken);
        assert_eq!(e.jti.as_deref(), Some(token_hash(UNKNOWN_TOKEN).as_str()));
        assert!(
            !e.detail.contains(UNKNOWN_TOKEN),
            "the token is never in a detail"
        );
    }
    assert_eq!(fake.lookups.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_token_seen_before_and_gone_from_nova_is_expired() {
    let (fake, mut s) = fixture().await;
    s.cache_secs = 0;
    let r = resolver(s);
    let allow = common::allow_list();
    r.resolve(VNC_TOKEN, Some(ConsoleType::Novnc), &allow)
        .await
        .unwrap();
    fake.consoles.lock().unwrap().remove(VNC_TOKEN);
    let e = r
        .resolve(VNC_TOKEN, Some(ConsoleType::Novnc), &allow)
        .await
        .unwrap_err();
    assert_eq!(e.reason, RefusalReason::Expired);
}

#[tokio::test]
async fn concurrent_lookups_of_one_token_ask_nova_once() {
    let (fake, mut s) = fixture().await;
    s.cache_secs = 0;
    *fake.delay.lock().unwrap() = Duration::from_millis(200);
    let r = Arc::new(resolver(s));
    let allow = common::allow_list();
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (r, allow) = (r.clone(), allow.clone());
            tokio::spawn(
                async move { r.resolve(VNC_TOKEN, Some(ConsoleType::Novnc), &allow).await },
            )
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(fake.lookups.load(Ordering::SeqCst), 1);
    assert_eq!(fake.auths.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_401_renews_the_keystone_token_once() {
    let (fake, mut s) = fixture().await;
    s.cache_secs = 0;
    let r = resolver(s);
    let allow = common::allow_list();
    r.resolve(VNC_TOKEN, Some(ConsoleType::Novnc), &allow)
        .await
        .unwrap();
    // Keystone revoked it (or Nova's cache dropped it).
    fake.valid.lock().unwrap().clear();
    r.resolve(VNC_TOKEN, Some(ConsoleType::Novnc), &allow)
        .await
        .unwrap();
    assert_eq!(fake.auths.load(Ordering::SeqCst), 2);
    assert_eq!(fake.lookups.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_policy_refusal_is_unavailable_and_names_the_policy() {
    let (fake, s) = fixture().await;
    *fake.status.lock().unwrap() = Some(403);
    let r = resolver(s);
    let e = r
        .resolve(VNC_TOKEN, Some(ConsoleType::Novnc), &common::allow_list())
        .await
        .unwrap_err();
    assert_eq!(e.reason, RefusalReason::Unavailable);
    assert!(
        e.detail.contains("os_compute_api:os-console-auth-tokens"),
        "{}",
        e.detail
    );
}

#[tokio::test]
async fn wrong_credentials_and_dead_services_are_unavailable_within_the_deadline() {
    let (_fake, mut s) = fixture().await;
    s.credential = Credential::ApplicationCredential {
        id: "ac".into(),
        secret: Secret::new("wrong".into()),
    };
    let e = resolver(s.clone())
        .resolve(VNC_TOKEN, Some(ConsoleType::Novnc), &common::allow_list())
        .await
        .unwrap_err();
    assert_eq!(e.reason, RefusalReason::Unavailable);
    assert!(e.detail.starts_with("Keystone"), "{}", e.detail);

    // Nothing listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v3", dead.local_addr().unwrap());
    drop(dead);
    s.auth_url = url;
    let started = std::time::Instant::now();
    let e = resolver(s)
        .resolve(VNC_TOKEN, Some(ConsoleType::Novnc), &common::allow_list())
        .await
        .unwrap_err();
    assert_eq!(e.reason, RefusalReason::Unavailable);
    assert!(started.elapsed() < Duration::from_secs(7));
}

#[tokio::test]
async fn a_slow_nova_is_unavailable_at_the_deadline() {
    let (fake, mut s) = fixture().await;
    s.timeout = Duration::from_secs(1);
    *fake.delay.lock().unwrap() = Duration::from_secs(10);
    let started = std::time::Instant::now();
    let e = resolver(s)
        .resolve(VNC_TOKEN, Some(ConsoleType::Novnc), &common::allow_list())
        .await
        .unwrap_err();
    assert_eq!(e.reason, RefusalReason::Unavailable);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn targets_outside_the_backends_and_connect_prefaces_are_refused() {
    let (fake, s) = fixture().await;
    let outside = "aaaaaaaa-0000-4000-8000-000000000001";
    let vmware = "aaaaaaaa-0000-4000-8000-000000000002";
    fake.consoles.lock().unwrap().extend([
        (outside.to_string(), json!({"instance_uuid": INSTANCE, "host": "192.0.2.9", "port": 5901, "internal_access_path": null})),
        (vmware.to_string(), json!({"instance_uuid": INSTANCE, "host": "10.20.0.5", "port": 5901, "internal_access_path": "/console?x"})),
    ]);
    let r = resolver(s);
    for t in [outside, vmware] {
        let e = r
            .resolve(t, Some(ConsoleType::Novnc), &common::allow_list())
            .await
            .unwrap_err();
        assert_eq!(e.reason, RefusalReason::TargetNotAllowed, "{}", e.detail);
    }
}

#[tokio::test]
async fn an_oversized_answer_or_field_from_nova_is_refused() {
    let (fake, s) = fixture().await;
    let padded = "aaaaaaaa-0000-4000-8000-000000000003";
    let huge = "aaaaaaaa-0000-4000-8000-000000000004";
    let long_host = "aaaaaaaa-0000-4000-8000-000000000005";
    let huge_chunked = "aaaaaaaa-0000-4000-8000-000000000006";
    let console = |extra: &str, host: &str| {
        json!({"instance_uuid": INSTANCE, "host": host, "port": 5901,
               "internal_access_path": null, "extra": extra})
    };
    fake.consoles.lock().unwrap().extend([
        (padded.to_string(), console(&"x".repeat(4000), "10.20.0.5")),
        (huge.to_string(), console(&"x".repeat(100_000), "10.20.0.5")),
        (long_host.to_string(), console("", &"h".repeat(300))),
        (huge_chunked.to_string(), {
            let mut c = console(&"x".repeat(100_000), "10.20.0.5");
            c["chunked"] = json!(true);
            c
        }),
    ]);
    let r = resolver(s);
    let allow = common::allow_list();
    // A few KiB more than Nova sends is still read.
    r.resolve(padded, Some(ConsoleType::Novnc), &allow)
        .await
        .unwrap();
    // Whether its length is announced or not.
    for t in [huge, huge_chunked] {
        let e = r
            .resolve(t, Some(ConsoleType::Novnc), &allow)
            .await
            .unwrap_err();
        assert_eq!(e.reason, RefusalReason::Unavailable, "{}", e.detail);
        assert!(e.detail.contains("over 65536 bytes"), "{}", e.detail);
    }
    let e = r
        .resolve(long_host, Some(ConsoleType::Novnc), &allow)
        .await
        .unwrap_err();
    assert_eq!(e.reason, RefusalReason::Malformed, "{}", e.detail);
}

#[tokio::test]
async fn jwts_and_nova_tokens_work_side_by_side_and_junk_never_reaches_nova() {
    let (fake, s) = fixture().await;
    let dir = tempfile::tempdir().unwrap();
    let key = TestKey::new(dir.path(), KeyKind::Ed25519, "k1");
    let jwt = Arc::new(validator(vec![key.source()], false));
    let both = Resolvers::new(jwt.clone(), Some(Arc::new(resolver(s))));
    let signed = key.sign(&good_claims());
    let g = both
        .resolve(&signed, Some(ConsoleType::Novnc))
        .await
        .unwrap();
    assert_eq!(g.issuer, common::ISSUER);
    let g = both
        .resolve(VNC_TOKEN, Some(ConsoleType::Novnc))
        .await
        .unwrap();
    assert_eq!(g.issuer, "nova");
    for junk in [
        "",
        "junk",
        &VNC_TOKEN.to_uppercase(),
        &format!("{VNC_TOKEN}x"),
    ] {
        let e = both
            .resolve(junk, Some(ConsoleType::Novnc))
            .await
            .unwrap_err();
        assert_eq!(e.reason, RefusalReason::Malformed, "{junk:?}");
    }
    assert_eq!(fake.lookups.load(Ordering::SeqCst), 1);
    // Revoking the instance refuses its Nova tokens too.
    jwt.revocations()
        .revoke_instance(
            INSTANCE,
            porthole::token::unix_now() + 60,
            porthole::token::unix_now(),
        )
        .await
        .unwrap();
    let e = both
        .resolve(VNC_TOKEN, Some(ConsoleType::Novnc))
        .await
        .unwrap_err();
    assert_eq!(e.reason, RefusalReason::Revoked);
}

#[test]
fn the_nova_section_reads_its_secret_from_a_file_and_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("nova-pw"), "s3cret\n").unwrap();
    let good = r#"
[nova]
auth_url = "https://keystone.example.com:5000/v3"
username = "porthole"
password_file = "nova-pw"
token_ttl_secs = 300
"#;
    let c = porthole::config::Config::from_toml(good, dir.path()).unwrap();
    let n = c.nova.expect("[nova]");
    assert_eq!(n.token_ttl_secs, 300);
    assert_eq!(n.interface, "internal");
    assert_eq!(n.microversion, "2.99");
    match &n.credential {
        Credential::Password {
            password, project, ..
        } => {
            assert_eq!(password.expose(), "s3cret");
            assert_eq!(project, "service");
            assert!(!format!("{n:?}").contains("s3cret"), "redacted in Debug");
        }
        other => panic!("{other:?}"),
    }
    let bad = r#"
[nova]
username = "porthole"
application_credential_id = "x"
microversion = "2.6"
"#;
    let e = porthole::config::Config::from_toml(bad, dir.path())
        .unwrap_err()
        .to_string();
    for key in ["nova.auth_url", "nova.username", "nova.microversion"] {
        assert!(e.contains(key), "{key} in {e}");
    }
}

/// [`gateway`]'s config file, with more lines in its `[[backends]]` entry.
fn gateway_toml(fake_keystone: &str, dir: &std::path::Path, backend_extra: &str) -> String {
    std::fs::write(dir.join("nova-pw"), "pw-1\n").unwrap();
    // Writes k.pub.pem, which the file names.
    TestKey::new(dir, KeyKind::Ed25519, "k");
    format!(
        r#"
[listen]
public = "127.0.0.1:0"
admin = "127.0.0.1:0"
public_base_url = "https://consoles.test"
{tokens}
[nova]
auth_url = "{fake_keystone}"
username = "porthole"
password_file = "nova-pw"
project_name = "service"
region_name = "RegionOne"
interface = "internal"
[[backends]]
networks = ["10.20.0.0/16"]
ports = ["5900-5999"]
{backend_extra}
"#,
        tokens = common::tokens_toml("")
    )
}

/// A gateway (the whole session layer) whose `[nova]` is the fake, with
/// `backend_extra` in its `[[backends]]` entry.
async fn gateway(fake_keystone: &str, backend_extra: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let toml = gateway_toml(fake_keystone, dir.path(), backend_extra);
    spawn_gateway(dir, toml).await
}

#[tokio::test]
async fn an_address_whose_nova_lookups_keep_finding_nothing_must_wait_and_nova_is_not_asked() {
    let (fake, s) = fixture().await;
    let gw = gateway(&s.auth_url, "").await;
    let sessions = &gw.app.sessions;
    let guesser: std::net::IpAddr = "192.0.2.7".parse().unwrap();
    let neighbour: std::net::IpAddr = "192.0.2.8".parse().unwrap();
    let lookups = || fake.lookups.load(Ordering::SeqCst);
    let guess = |n: u32| format!("00000000-0000-4000-8000-{n:012x}");
    // The first unknown tokens are looked up and refused, as any would be.
    for n in 1..=11 {
        let e = sessions
            .resolve(&guess(n), Some(ConsoleType::Novnc), Some(guesser))
            .await
            .unwrap_err();
        assert_eq!(e.reason, RefusalReason::UnknownToken);
    }
    assert_eq!(lookups(), 11);
    // Past the free ones, the address must wait: refused as unknown (a
    // guesser learns nothing), and Nova is not asked, even for a real token.
    for t in [guess(12), VNC_TOKEN.to_string()] {
        let e = sessions
            .resolve(&t, Some(ConsoleType::Novnc), Some(guesser))
            .await
            .unwrap_err();
        assert_eq!(e.reason, RefusalReason::UnknownToken);
        assert!(e.detail.contains("too many unknown Nova tokens"), "{e:?}");
    }
    assert_eq!(lookups(), 11, "a waiting address reaches Nova no more");
    // Another address, and the admin API, are not held up.
    let g = sessions
        .resolve(VNC_TOKEN, Some(ConsoleType::Novnc), Some(neighbour))
        .await
        .expect("another address resolves");
    assert_eq!(g.jti, token_hash(VNC_TOKEN));
    sessions
        .resolve(&guess(13), Some(ConsoleType::Novnc), None)
        .await
        .unwrap_err();
    assert_eq!(lookups(), 13);
    // Signed tokens are not Nova lookups: the waiting address still gets to
    // present one (it is refused here for its own reasons, not the wait).
    let e = sessions
        .resolve("junk", Some(ConsoleType::Novnc), Some(guesser))
        .await
        .unwrap_err();
    assert_eq!(e.reason, RefusalReason::Malformed);
}

#[tokio::test]
async fn nova_check_says_which_step_fails_and_what_to_change() {
    let (fake, s) = fixture().await;
    let steps = resolver(s.clone()).check().await;
    let words = |steps: &[porthole::token::nova::CheckStep]| {
        steps
            .iter()
            .map(|s| format!("{}: {:?}", s.what, s.outcome))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(steps.iter().all(|s| s.outcome.is_ok()), "{}", words(&steps));
    assert_eq!(steps.len(), 4, "{}", words(&steps));

    let mut too_new = s.clone();
    too_new.microversion = "2.200".into();
    let steps = resolver(too_new).check().await;
    let last = steps.last().unwrap();
    assert_eq!(last.what, "microversion");
    assert!(
        last.outcome
            .as_ref()
            .unwrap_err()
            .contains("Nova serves 2.1 to 2.104")
    );

    *fake.status.lock().unwrap() = Some(403);
    let steps = resolver(s.clone()).check().await;
    let last = steps.last().unwrap();
    assert_eq!(last.what, "policy");
    let text = last.outcome.as_ref().unwrap_err();
    assert!(
        text.contains("os_compute_api:os-console-auth-tokens") && text.contains("console_auth")
    );

    let mut wrong = s;
    wrong.credential = Credential::ApplicationCredential {
        id: "ac".into(),
        secret: Secret::new("nope".into()),
    };
    let steps = resolver(wrong).check().await;
    assert_eq!(steps.len(), 1);
    assert!(
        steps[0].outcome.as_ref().unwrap_err().contains("401"),
        "{}",
        words(&steps)
    );
}

#[tokio::test]
async fn with_ports_per_type_a_nova_token_on_the_wrong_route_is_refused_not_connected() {
    // A Nova token names no type: a noVNC token on the serial route would
    // otherwise reach a VNC server and fail in the handshake. libvirt's
    // serial consoles have ports of their own: say so, and it is a refusal.
    let (fake, s) = fixture().await;
    const SERIAL_TOKEN: &str = "5e1a1c0d-2222-4ccc-8ddd-0123456789ab";
    fake.consoles.lock().unwrap().insert(
        SERIAL_TOKEN.into(),
        json!({"instance_uuid": INSTANCE, "host": "10.20.0.5", "port": 10001, "internal_access_path": null}),
    );
    let extra = "[backends.ports_by_type]\nserial = [\"10000-10099\"]";
    let gw = gateway(&s.auth_url, extra).await;
    let app = &gw.app;
    let resolve = |token: &'static str, route| {
        let sessions = app.sessions.clone();
        async move { sessions.resolve(token, Some(route), None).await }
    };
    resolve(VNC_TOKEN, ConsoleType::Novnc)
        .await
        .expect("noVNC on its route");
    resolve(SERIAL_TOKEN, ConsoleType::Serial)
        .await
        .expect("serial on its route");
    for (token, route) in [
        (VNC_TOKEN, ConsoleType::Serial),
        (SERIAL_TOKEN, ConsoleType::Novnc),
    ] {
        let e = resolve(token, route).await.unwrap_err();
        assert_eq!(e.reason, RefusalReason::TargetNotAllowed, "{e:?}");
        assert!(e.detail.contains(&format!("for {route} consoles")), "{e:?}");
    }
    // A type the file misspells is located, not ignored.
    let bad = "[backends.ports_by_type]\nserail = [\"10000-10099\"]";
    let dir = tempfile::tempdir().unwrap();
    let toml = gateway_toml(&s.auth_url, dir.path(), bad);
    let e = porthole::config::Config::from_toml(&toml, dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("backends[0].ports_by_type.serail"), "{e}");
}

#[tokio::test]
async fn the_routes_a_typeless_refusal_names_are_the_routers_own() {
    use tower::ServiceExt as _;
    let (_fake, s) = fixture().await;
    let gw = gateway(&s.auth_url, "").await;
    let app = &gw.app;
    let e = app
        .sessions
        .resolve(VNC_TOKEN, None, None)
        .await
        .unwrap_err();
    assert_eq!(e.reason, RefusalReason::WrongConsoleType);
    let routes: Vec<&str> = e
        .detail
        .split([' ', ',', '(', ')'])
        .filter(|w| w.starts_with('/'))
        .collect();
    assert_eq!(routes.len(), 3, "{}", e.detail);
    let get = |path: String| {
        let mut req = axum::http::Request::get(path)
            .body(axum::body::Body::empty())
            .unwrap();
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(SocketAddr::from((
                [192, 0, 2, 9],
                1,
            ))));
        app.public_router().oneshot(req)
    };
    for route in &routes {
        let status = get(format!("{route}?token={VNC_TOKEN}"))
            .await
            .unwrap()
            .status();
        assert_ne!(status, StatusCode::NOT_FOUND, "{route} is not a route");
        assert_ne!(status, StatusCode::FORBIDDEN, "{route} refused the token");
    }
    let generic = get(format!("/console?token={VNC_TOKEN}"))
        .await
        .unwrap()
        .status();
    assert_eq!(
        generic,
        StatusCode::FORBIDDEN,
        "the generic page refuses it"
    );
}

#[tokio::test]
async fn a_flood_of_made_up_tokens_from_many_addresses_is_held_to_the_budget_and_a_real_token_opens()
 {
    let (fake, s) = fixture().await;
    let dir = tempfile::tempdir().unwrap();
    let toml = gateway_toml(&s.auth_url, dir.path(), "").replace(
        "[nova]\n",
        "[nova]\nunseen_lookups_per_sec = 2\nunseen_lookup_burst = 20\n",
    );
    let gw = spawn_gateway(dir, toml).await;
    let app = gw.app.clone();
    let lookups = || fake.lookups.load(Ordering::SeqCst);
    let started = std::time::Instant::now();
    // 50 addresses, 10 made-up tokens each, all at once: each address is
    // looked up at most until the per-address wait, the whole flood at most
    // at the budget's rate.
    let refused = Arc::new(AtomicUsize::new(0));
    let flood: Vec<_> = (0..50u32)
        .map(|a| {
            let app = app.clone();
            let refused = refused.clone();
            tokio::spawn(async move {
                let addr = std::net::IpAddr::from([10, 9, 0, a as u8 + 1]);
                for n in 0..10u32 {
                    let t = format!("00000000-0000-4000-8000-{a:06x}{n:06x}");
                    let e = app
                        .sessions
                        .resolve(&t, Some(ConsoleType::Novnc), Some(addr))
                        .await
                        .unwrap_err();
                    if e.reason == RefusalReason::Unavailable {
                        assert!(e.detail.contains("budget"), "{e:?}");
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for f in flood {
        f.await.unwrap();
    }
    // Every address of the flood has asked once: none of them may touch
    // the reserve now. A real user's fresh token from another address
    // opens as soon as the budget has one lookup for it (half a second at
    // 2/s; a page retries), with the flood's addresses still at it.
    let user: std::net::IpAddr = "192.0.2.50".parse().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut tries = 0;
    let grant = loop {
        tries += 1;
        for a in 0..5u8 {
            let t = format!("00000000-0000-4000-8000-ffffff{tries:04x}{a:02x}");
            let _ = app
                .sessions
                .resolve(&t, Some(ConsoleType::Novnc), Some([10, 9, 0, a + 1].into()))
                .await;
        }
        match app
            .sessions
            .resolve(VNC_TOKEN, Some(ConsoleType::Novnc), Some(user))
            .await
        {
            Ok(g) => break g,
            Err(e) => {
                assert_eq!(e.reason, RefusalReason::Unavailable, "{e:?}");
                assert!(std::time::Instant::now() < deadline, "never opened: {e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(grant.jti, token_hash(VNC_TOKEN));
    let elapsed = started.elapsed().as_secs_f64();
    let asked = lookups();
    assert!(
        asked as f64 <= 20.0 + 2.0 * elapsed + 1.0,
        "{asked} lookups in {elapsed:.1} s: over the budget"
    );
    assert!(
        refused.load(Ordering::SeqCst) > 0,
        "the budget refused nothing"
    );
    // Once seen, the real token is known: it no longer draws on the budget.
    for _ in 0..30 {
        app.sessions
            .resolve(VNC_TOKEN, Some(ConsoleType::Novnc), Some(user))
            .await
            .expect("a known token is not held to the budget");
    }
}

#[tokio::test]
async fn with_nova_slow_a_lookup_waits_one_deadline_and_a_full_queue_refuses_at_once() {
    let (fake, mut s) = fixture().await;
    s.timeout = Duration::from_secs(2);
    s.max_in_flight = 1;
    *fake.delay.lock().unwrap() = Duration::from_secs(30);
    let r = Arc::new(resolver(s));
    let allow = Arc::new(common::allow_list());
    let started = std::time::Instant::now();
    // One in flight, four waiting behind it; the rest find the queue full.
    let asks: Vec<_> = (0..8u32)
        .map(|n| {
            let (r, allow) = (r.clone(), allow.clone());
            tokio::spawn(async move {
                let t = format!("00000000-0000-4000-8000-{n:012x}");
                let e = r
                    .resolve(&t, Some(ConsoleType::Novnc), &allow)
                    .await
                    .unwrap_err();
                (e, started.elapsed())
            })
        })
        .collect();
    let mut busy = 0;
    for a in asks {
        let (e, took) = a.await.unwrap();
        assert_eq!(e.reason, RefusalReason::Unavailable, "{e:?}");
        // One deadline for the whole wait, queue included (generous bound:
        // the deadline and a half, never two).
        assert!(took < Duration::from_secs(3), "{e:?} after {took:?}");
        if e.detail.contains("in flight") {
            busy += 1;
            assert!(
                took < Duration::from_secs(1),
                "a full queue answers at once: {took:?}"
            );
        }
    }
    assert_eq!(busy, 3, "1 in flight + 4 waiting of 8");
}
