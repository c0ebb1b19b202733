//! Reloading from the config file (issue #10 items 1 and 2), over the admin
//! API of a full `App` built from a file on disk: the file's key list and
//! issuance key are what is in force after a reload; a file `config check`
//! refuses is refused and changes nothing; settings read only at start are
//! named, not applied.

use crate::common;

use std::path::PathBuf;

use common::{AUDIENCE, Gateway, ISSUER, TestKey, good_claims, spawn_gateway};
use porthole::config::{ConfigSource, ListenOverrides};
use porthole::reload::Reloadable;
use porthole::token::signing::KeyKind;
use serde_json::{Value, json};

const BEARER: &str = "test-bearer-key-0123456789";

/// A config file: `keys` (kids of `*.pub.pem` files beside it) verify
/// tokens, `signing` signs issued ones, `extra` is appended.
fn config_text(keys: &[&str], signing: &str, extra: &str) -> String {
    let mut text = format!(
        r#"
[listen]
public = "127.0.0.1:0"
admin = "127.0.0.1:0"

[tokens]
issuers = ["{ISSUER}"]
audiences = ["{AUDIENCE}"]

[issuance]
bearer_key_files = ["bearer.key"]
signing_key = "{signing}.key"
signing_kid = "{signing}"

[[backends]]
name = "compute"
networks = ["10.20.0.0/16"]
ports = ["5900-6100"]
"#
    );
    for kid in keys {
        text.push_str(&format!(
            "\n[[tokens.keys]]\nkid = \"{kid}\"\nalgorithm = \"EdDSA\"\npublic_key = \"{kid}.pub.pem\"\n"
        ));
    }
    text.push_str(extra);
    text
}

/// A gateway built from a file that `ConfigSource` reloads (`porthole.toml`
/// in its folder); keys `old` and `new` exist, `old` is configured.
async fn start(overrides: ListenOverrides) -> (Gateway, TestKey, TestKey) {
    let dir = tempfile::tempdir().unwrap();
    let old = TestKey::new(dir.path(), KeyKind::Ed25519, "old");
    let new = TestKey::new(dir.path(), KeyKind::Ed25519, "new");
    std::fs::write(dir.path().join("bearer.key"), BEARER).unwrap();
    let path = dir.path().join("porthole.toml");
    std::fs::write(&path, config_text(&["old"], "old", "")).unwrap();
    let gw = spawn_gateway(dir, ConfigSource { path, overrides }).await;
    (gw, old, new)
}

impl Gateway {
    /// Its config file.
    fn file(&self) -> PathBuf {
        self.dir.path().join("porthole.toml")
    }

    async fn admin_post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, body) = common::http(
            self.admin,
            "POST",
            path,
            Some(BEARER),
            Some(&body.to_string()),
        )
        .await;
        (status, serde_json::from_str(&body).unwrap())
    }

    fn write(&self, text: &str) {
        std::fs::write(self.file(), text).unwrap();
    }

    /// Whether a console endpoint would admit `token` (signature, claims,
    /// allow-list, revocations: the session layer's check).
    async fn admits(&self, token: &str) -> Result<(), String> {
        let (status, body) = self
            .admin_post("/v1/tokens/check", &json!({ "token": token }))
            .await;
        assert_eq!(status, 200, "{body}");
        match body["valid"].as_bool() {
            Some(true) => Ok(()),
            _ => Err(body["reason"].as_str().unwrap_or("?").to_string()),
        }
    }

    /// Issues a token through the issuance API; returns it and its header's kid.
    async fn issue(&self) -> (String, String) {
        let req = json!({
            "instance": "vm-1", "type": "novnc",
            "target": { "host": "10.20.0.5", "port": 5901 },
        });
        let (status, body) = self.admin_post("/v1/consoles", &req).await;
        assert_eq!(status, 200, "{body}");
        let token = body["token"].as_str().unwrap().to_string();
        let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
        (token, kid)
    }
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn rotating_keys_by_editing_the_file_retires_the_old_key_and_signs_with_the_new() {
    let (gw, old, new) = start(ListenOverrides::default()).await;
    let old_token = old.sign(&good_claims());
    let new_token = new.sign(&good_claims());
    gw.admits(&old_token).await.expect("old key in force");
    assert_eq!(gw.admits(&new_token).await.unwrap_err(), "unknown_key");
    assert_eq!(gw.issue().await.1, "old");

    // Publish the new key beside the old one: `POST /v1/keys/reload` is the
    // full reload under its old name.
    gw.write(&config_text(&["old", "new"], "old", ""));
    let (status, body) = gw.admin_post("/v1/keys/reload", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let r = &body["reloaded"];
    assert_eq!(strings(&r["keys_added"]), ["new"]);
    assert_eq!(strings(&r["keys_removed"]), Vec::<&str>::new());
    assert_eq!(strings(&r["kids"]), ["new", "old"]);
    assert_eq!(r["keys"], 2);
    assert_eq!(r["issuance_kid"], Value::Null);
    assert_eq!(strings(&r["restart_required"]), Vec::<&str>::new());
    gw.admits(&old_token).await.expect("old key still in force");
    gw.admits(&new_token).await.expect("new key in force");

    // Remove the old (compromised) key and sign with the new one.
    gw.write(&config_text(&["new"], "new", ""));
    let (status, body) = gw.admin_post("/v1/reload", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let r = &body["reloaded"];
    assert_eq!(strings(&r["keys_added"]), Vec::<&str>::new());
    assert_eq!(strings(&r["keys_removed"]), ["old"]);
    assert_eq!(
        r["issuance_kid"],
        json!({ "before": "old", "after": "new" })
    );
    assert_eq!(r["backends"], 1);
    assert_eq!(
        gw.admits(&old_token).await.unwrap_err(),
        "unknown_key",
        "a token of the removed key is refused"
    );
    gw.admits(&new_token).await.expect("new key in force");
    let (issued, kid) = gw.issue().await;
    assert_eq!(kid, "new", "the issuance API signs with the new kid");
    gw.admits(&issued).await.expect("issued token admitted");
    assert_eq!(gw.app.validator.kids(), ["new"]);
}

#[tokio::test]
async fn a_file_config_check_refuses_is_refused_by_reload_and_changes_nothing() {
    let (gw, old, _new) = start(ListenOverrides::default()).await;
    let token = old.sign(&good_claims());
    let missing_key = config_text(&["old", "gone"], "old", "");
    let unpublished_signer = config_text(&["old"], "new", "");
    let broken_cert = config_text(
        &["old"],
        "old",
        "\n[spice]\nlisten_tls = \"127.0.0.1:16084\"\ntls_cert = \"nothing.pem\"\ntls_key = \"nothing.key\"\n",
    );
    for (what, text, says) in [
        ("empty", "", "no token verification keys"),
        ("syntax", "[tokens\n", "(syntax)"),
        (
            "invalid",
            "[tokens]\nleeway_secs = 9999\n",
            "tokens.leeway_secs",
        ),
        ("missing key file", missing_key.as_str(), "gone.pub.pem"),
        (
            "unpublished signing key",
            unpublished_signer.as_str(),
            "would be refused",
        ),
        ("broken certificate", broken_cert.as_str(), "spice.tls_cert"),
    ] {
        gw.write(text);
        let (status, body) = gw.admin_post("/v1/reload", &json!({})).await;
        assert_eq!(status, 422, "{what}: {body}");
        assert_eq!(body["error"]["code"], "reload_failed", "{what}");
        let problems = strings(&body["error"]["problems"]);
        assert!(
            problems.iter().any(|p| p.contains(says)),
            "{what}: {problems:?}"
        );
        // `config check` refuses the same file for the same reasons.
        let checked = Reloadable::check(&gw.file()).expect_err(what);
        assert_eq!(checked.problems(), problems, "{what}");
        // Nothing changed: the backend still admits, the key still verifies,
        // the issuance API still signs with its key.
        gw.admits(&token)
            .await
            .unwrap_or_else(|r| panic!("{what}: {r}"));
        assert_eq!(gw.app.validator.kids(), ["old"], "{what}");
        assert_eq!(gw.issue().await.1, "old", "{what}");
    }
    // The same key also retires through the key list, once the file is valid.
    gw.write(&config_text(&["old"], "old", ""));
    assert_eq!(gw.admin_post("/v1/reload", &json!({})).await.0, 200);
}

#[tokio::test]
async fn settings_read_at_start_are_named_as_needing_a_restart_and_not_applied() {
    let (gw, old, _new) = start(ListenOverrides::default()).await;
    let moved = config_text(&["old"], "old", "\n[sessions]\nmax_sessions = 10\n")
        .replace("public = \"127.0.0.1:0\"", "public = \"127.0.0.1:17080\"")
        + "\n[[backends]]\nname = \"more\"\nnetworks = [\"10.30.0.0/16\"]\n";
    gw.write(&moved);
    let (status, body) = gw.admin_post("/v1/reload", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let r = &body["reloaded"];
    assert_eq!(
        strings(&r["restart_required"]),
        [
            "listen.public",
            "listen.public_base_url",
            "sessions.max_sessions"
        ],
        "the base URL follows the public address when unset"
    );
    assert_eq!(gw.app.config.listen.public.port(), 0, "not applied");
    // What a reload applies, it applied: the new backend network admits.
    assert_eq!(r["backends"], 2);
    let mut claims = good_claims();
    claims["console"]["host"] = json!("10.30.0.9");
    gw.admits(&old.sign(&claims))
        .await
        .expect("new backend in force");
    // Until a restart, every reload says so again.
    let (_, body) = gw.admin_post("/v1/reload", &json!({})).await;
    assert_eq!(
        strings(&body["reloaded"]["restart_required"]).len(),
        3,
        "{body}"
    );
}

#[tokio::test]
async fn command_line_listener_overrides_are_no_change() {
    // Another loopback address than the file's, on a free port.
    let admin: std::net::SocketAddr = "127.0.0.2:0".parse().unwrap();
    let (gw, _old, _new) = start(ListenOverrides {
        admin: Some(admin),
        ..ListenOverrides::default()
    })
    .await;
    assert_eq!(gw.app.config.listen.admin, admin);
    let (status, body) = gw.admin_post("/v1/reload", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        strings(&body["reloaded"]["restart_required"]),
        Vec::<&str>::new()
    );
}
