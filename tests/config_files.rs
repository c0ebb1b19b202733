//! Config files: fixtures under `tests/data/config/{valid,invalid}` and the
//! example config. Invalid fixtures state what they expect in `# expect:`
//! lines: `KEY @ LINE:COL MESSAGE-FRAGMENT`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use porthole::config::Config;

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/config")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    // A data-driven test that found no data proves nothing.
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
}

#[test]
fn valid_fixtures_validate() {
    for file in fixtures("valid") {
        Config::load(&file).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn invalid_fixtures_report_every_problem_with_its_location() {
    for file in fixtures("invalid") {
        let text = std::fs::read_to_string(&file).unwrap();
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(
            !expected.is_empty(),
            "{} states no expectation",
            file.display()
        );
        let err = Config::load(&file).expect_err("invalid fixture must fail");
        assert_eq!(
            err.issues.len(),
            expected.len(),
            "{}: {err}",
            file.display()
        );
        for want in expected {
            let (key, rest) = want.split_once(" @ ").unwrap();
            let (at, fragment) = rest.split_once(' ').unwrap();
            let (line, col) = at.split_once(':').unwrap();
            let at = Some((line.parse().unwrap(), col.parse().unwrap()));
            assert!(
                err.issues
                    .iter()
                    .any(|i| i.key == key && i.at == at && i.message.contains(fragment)),
                "{}: expected `{want}`, got:\n{err}",
                file.display()
            );
        }
    }
}

#[test]
fn the_example_config_documents_a_valid_setup() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("porthole.example.toml");
    let text = std::fs::read_to_string(&example).unwrap();
    // The example names key files under keys/; give it a folder that has the
    // bearer key it reads at validation time.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    std::fs::write(
        dir.path().join("keys/issuance-bearer.key"),
        "0123456789abcdef0123",
    )
    .unwrap();
    std::fs::write(dir.path().join("keys/nova-password"), "nova-secret\n").unwrap();
    let config = Config::from_toml(&text, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.nova.as_ref().map(|n| n.token_ttl_secs), Some(600));
    assert_eq!(
        config.store.as_ref().map(|s| s.lease),
        Some(std::time::Duration::from_secs(30))
    );
    assert_eq!(
        config.listen.public_base_url,
        "https://consoles.example.com/porthole"
    );
    assert_eq!(config.tokens.keys.len(), 2);
    assert_eq!(config.allow.backends().len(), 1);
    assert!(config.issuance.is_some());
    assert_eq!(
        config.listen.allowed_origins,
        [
            "https://consoles.example.com",
            "https://dashboard.example.com"
        ]
    );
    assert_eq!(config.listen.public_extra.len(), 1);
    assert!(config.listen.tls.is_some());
    assert_eq!(config.sessions.max_sessions, 5000);
    assert!(config.sessions.tell_watched);
    let recording = config
        .recording
        .as_ref()
        .expect("[recording] is documented");
    assert!(recording.backends.is_empty() && recording.required.is_empty());
    // The example uses no deprecated name.
    assert_eq!(config.warnings, []);
}

/// A file from before `[sessions]`: every old `[websocket]` name still
/// counts, and each says where it moved.
#[test]
fn old_websocket_session_names_still_work_with_a_warning() {
    let text = "\
[websocket]
max_sessions = 7
max_sessions_per_client = 3
max_sessions_per_token = 2
connect_timeout_secs = 4
shutdown_grace_secs = 6
max_session_age_secs = 60
idle_timeout_secs = 30
ping_interval_secs = 5
";
    let config = Config::from_toml(text, Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
    let s = &config.sessions;
    assert_eq!(
        (
            s.max_sessions,
            s.max_sessions_per_client,
            s.max_sessions_per_token
        ),
        (7, 3, 2)
    );
    assert_eq!(s.connect_timeout, Duration::from_secs(4));
    assert_eq!(s.shutdown_grace, Duration::from_secs(6));
    assert_eq!(s.max_session_age, Some(Duration::from_secs(60)));
    // Alone, the WebSocket idle timeout still ends idle native sessions too.
    assert_eq!(s.idle_timeout, Some(Duration::from_secs(30)));
    assert_eq!(config.websocket.idle_timeout, Some(Duration::from_secs(30)));
    assert_eq!(config.websocket.ping_interval, Some(Duration::from_secs(5)));
    let warned: Vec<(&str, Option<(usize, usize)>)> = config
        .warnings
        .iter()
        .map(|w| (w.key.as_str(), w.at))
        .collect();
    assert_eq!(
        warned,
        [
            ("websocket.max_sessions", Some((2, 1))),
            ("websocket.max_sessions_per_client", Some((3, 1))),
            ("websocket.max_sessions_per_token", Some((4, 1))),
            ("websocket.connect_timeout_secs", Some((5, 1))),
            ("websocket.shutdown_grace_secs", Some((6, 1))),
            ("websocket.max_session_age_secs", Some((7, 1))),
            ("websocket.idle_timeout_secs", Some((8, 1))),
        ]
    );
    for w in &config.warnings[..6] {
        let new = w.key.replace("websocket.", "sessions.");
        assert!(w.message.contains(&format!("moved to `{new}`")), "{w}");
    }
    assert!(
        config.warnings[6]
            .message
            .contains("sessions.idle_timeout_secs")
    );
}

/// `[sessions]` holds every session's caps and timers; `[websocket]` keeps
/// only what is about WebSockets, its idle timeout for browser sessions alone.
#[test]
fn the_sessions_section_sets_caps_and_timers_for_every_session() {
    let text = "\
[sessions]
max_sessions = 9
max_sessions_per_client = 4
max_sessions_per_token = 3
connect_timeout_secs = 2
idle_timeout_secs = 600
max_session_age_secs = 0
shutdown_grace_secs = 1
hypervisor_keepalive_secs = 0
client_keepalive_secs = 15

[websocket]
idle_timeout_secs = 0
";
    let config = Config::from_toml(text, Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
    let s = &config.sessions;
    assert_eq!(
        (
            s.max_sessions,
            s.max_sessions_per_client,
            s.max_sessions_per_token
        ),
        (9, 4, 3)
    );
    assert_eq!(s.connect_timeout, Duration::from_secs(2));
    assert_eq!(s.shutdown_grace, Duration::from_secs(1));
    assert_eq!(s.max_session_age, None);
    assert_eq!(s.idle_timeout, Some(Duration::from_secs(600)));
    assert_eq!(s.hypervisor_keepalive, None, "0: off");
    assert_eq!(s.client_keepalive, Some(Duration::from_secs(15)));
    assert_eq!(config.websocket.idle_timeout, None, "browser sessions: off");
    assert_eq!(config.warnings, []);

    // Without its own, a browser session has the sessions' idle timeout.
    let config = Config::from_toml("[sessions]\nidle_timeout_secs = 60\n", Path::new("."))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.websocket.idle_timeout, Some(Duration::from_secs(60)));

    // Defaults.
    let config = Config::from_toml("", Path::new(".")).unwrap();
    let s = &config.sessions;
    assert_eq!(
        (
            s.max_sessions,
            s.max_sessions_per_client,
            s.max_sessions_per_token
        ),
        (5000, 64, 16)
    );
    assert_eq!(s.connect_timeout, Duration::from_secs(5));
    assert_eq!(s.idle_timeout, Some(Duration::from_secs(3600)));
    assert_eq!(
        config.websocket.idle_timeout,
        Some(Duration::from_secs(3600))
    );
    assert_eq!(s.max_session_age, None);
    assert_eq!(s.shutdown_grace, Duration::from_secs(10));
    assert_eq!(s.hypervisor_keepalive, Some(Duration::from_secs(30)));
    assert_eq!(s.client_keepalive, Some(Duration::from_secs(30)));
}

/// A native listener and its certificate are one value: a listener with a
/// certificate from any of the places it may come from is ready to use.
#[test]
fn native_listeners_carry_their_certificates() {
    let text = "\
[listen]
tls_cert = \"public.pem\"
tls_key = \"public.key\"
tls_min_version = \"1.3\"

[spice]
listen_tls = \"127.0.0.1:5931\"

[vnc]
listen = \"127.0.0.1:5999\"
tls_cert = \"vnc.pem\"
tls_key = \"vnc.key\"
tls_min_version = \"1.2\"
";
    let config = Config::from_toml(text, Path::new("/etc/porthole")).unwrap();
    let spice = config.spice.listen_tls.expect("the SPICE listener is on");
    assert_eq!(spice.addr, "127.0.0.1:5931".parse().unwrap());
    assert_eq!(spice.cert.cert, Path::new("/etc/porthole/public.pem"));
    assert_eq!(spice.cert.key, Path::new("/etc/porthole/public.key"));
    assert!(
        spice.tls13_only,
        "the public listener's floor is the default"
    );
    let vnc = config.vnc.listen.expect("the VNC listener is on");
    assert_eq!(vnc.cert.cert, Path::new("/etc/porthole/vnc.pem"));
    assert!(!vnc.tls13_only);
    assert_eq!(config.spice.listen_plain, None);
}
