"""`porthole serve` as a process: embedded defaults, the issuance API with a
PyJWT-verified answer, refusal counters, key reload by SIGHUP, clean SIGTERM,
and no token in any log line."""

import json
import re
import signal
import time

import jwt

from harness import (AUDIENCE, ISSUER, Gateway, Key, free_port, http, metric_value, run,
                      write_config)

BEARER = "interop-bearer-key-0123456789"


def test_embedded_defaults_bring_up_a_working_gateway(tmp_path):
    state = tmp_path / "state"
    port = free_port()
    env = {"PORTHOLE_STATE_DIR": str(state)}
    gw = Gateway(["--admin-listen", f"127.0.0.1:{port}", "--public-listen", "127.0.0.1:0", "--no-demo"],
                 tmp_path / "serve.log", env=env, admin_port=port)
    try:
        banner = gw.output()
        # The newcomer is told where things are and how to mint a token.
        assert "embedded development defaults" in banner
        assert "token mint --type novnc" in banner and "token inspect" in banner
        assert f"http://127.0.0.1:{port}/v1/consoles" in banner
        for name in ["dev-signing-key.pem", "dev-signing-key.pub.pem", "dev-jwks.json", "dev-ca.pem",
                     "server.pem", "server.key", "issuance-bearer.key"]:
            assert (state / name).exists(), name
        assert (state / "dev-signing-key.pem").stat().st_mode & 0o077 == 0, "private key is private"

        # Following the banner: mint, then inspect, with the same defaults.
        token = run("token", "mint", "--type", "novnc", "--instance", "demo", "--host", "127.0.0.1",
                    "--port", "5900", env=env).stdout.strip()
        p = run("token", "inspect", token, env=env)
        assert json.loads(p.stdout)["console"]["type"] == "novnc"

        # The banner's issuance call, as an API server would make it.
        bearer = (state / "issuance-bearer.key").read_text().strip()
        body = json.dumps({"instance": "demo", "type": "novnc", "target": {"host": "127.0.0.1", "port": 5900}})
        status, answer = http("POST", gw.admin + "/v1/consoles", body.encode(), bearer)
        assert status == 200, answer
        answer = json.loads(answer)
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/console\?token=[\w.-]+", answer["remote_console"]["url"])
        # The development JWK set verifies it in PyJWT.
        jwks = jwt.PyJWKSet.from_json((state / "dev-jwks.json").read_text())
        jwt.decode(answer["token"], jwks["porthole-dev"], algorithms=["EdDSA"], audience="porthole", issuer="porthole")

        # The development server certificate names localhost and 127.0.0.1.
        from cryptography import x509
        cert = x509.load_pem_x509_certificate((state / "server.pem").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "localhost" in san.get_values_for_type(x509.DNSName)
        assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        ca = x509.load_pem_x509_certificate((state / "dev-ca.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
    finally:
        assert gw.stop() == 0
    # A second start reuses the material: the old token still validates.
    assert run("token", "inspect", token, env=env).returncode == 0


def test_issuance_api_refusals_counters_reload_and_shutdown(tmp_path):
    old = Key(tmp_path, "EdDSA", "old")
    new = Key(tmp_path, "ES256", "new")
    jwks_path = tmp_path / "jwks.json"
    jwks_path.write_text(old.jwks.read_text())
    (tmp_path / "bearer.key").write_text(BEARER)
    port = free_port()
    config = write_config(tmp_path / "porthole.toml", f'[[tokens.keys]]\njwks = "{jwks_path}"\n', admin_port=port,
                          extra=f"""
[issuance]
bearer_key_files = ["{tmp_path / 'bearer.key'}"]
signing_key = "{old.private}"
signing_kid = "old"
ttl_secs = 60
""")
    gw = Gateway(["--config", str(config)], tmp_path / "serve.log", admin_port=port)
    seen_tokens = []
    try:
        # Issuance: an authorised request gets a token PyJWT verifies, in Nova's shape.
        req = {"instance": "vm-1", "type": "spice-html5", "target": {"host": "10.77.0.4", "port": 5930}}
        status, body = http("POST", gw.admin + "/v1/consoles", json.dumps(req).encode(), BEARER)
        assert status == 200, body
        answer = json.loads(body)
        token = answer["token"]
        seen_tokens.append(token)
        assert answer["remote_console"] == {"protocol": "spice", "type": "spice-html5",
                                            "url": f"https://consoles.interop.test/console?token={token}"}
        claims = jwt.decode(token, old.public.read_bytes(), algorithms=["EdDSA"], audience=AUDIENCE, issuer=ISSUER)
        assert claims["sub"] == "vm-1" and claims["exp"] == answer["expires_at"]
        assert http("POST", gw.admin + "/v1/consoles", json.dumps(req).encode())[0] == 401
        req["target"]["host"] = "192.0.2.1"
        assert http("POST", gw.admin + "/v1/consoles", json.dumps(req).encode(), BEARER)[0] == 403

        # Refusals are counted by reason.
        def check(tok, console=None):
            seen_tokens.append(tok)
            body = {"token": tok} if console is None else {"token": tok, "type": console}
            status, out = http("POST", gw.admin + "/v1/tokens/check", json.dumps(body).encode(), BEARER)
            assert status == 200, out
            return json.loads(out)

        assert check(token)["valid"] is True
        assert check(token, "novnc")["reason"] == "wrong_console_type"
        forged = jwt.encode(dict(claims, jti="forged"), new.signing_key(), algorithm="ES256", headers={"kid": "old"})
        assert check(forged)["reason"] == "wrong_algorithm"
        assert check(token[:-4] + "AAAA")["reason"] == "bad_signature"
        metrics = http("GET", gw.admin + "/metrics")[1]
        assert metric_value(metrics, "porthole_token_refusals_total", reason="wrong_console_type") == 1
        assert metric_value(metrics, "porthole_token_refusals_total", reason="bad_signature") == 1
        assert metric_value(metrics, "porthole_token_refusals_total", reason="expired") == 0
        assert metric_value(metrics, "porthole_tokens_issued_total", console="spice-html5") == 1

        # Rotation without restart: publish the new key, SIGHUP, both work.
        new_token = jwt.encode(dict(claims, jti="n1"), new.signing_key(), algorithm="ES256", headers={"kid": "new"})
        assert check(new_token)["reason"] == "unknown_key"
        both = {"keys": json.loads(old.jwks.read_text())["keys"] + json.loads(new.jwks.read_text())["keys"]}
        jwks_path.write_text(json.dumps(both))
        gw.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while check(new_token).get("valid") is not True:
            assert time.monotonic() < deadline, gw.output()
            time.sleep(0.1)
        assert check(token)["valid"] is True
        # A broken file on reload: rejected, the keys in force stay.
        jwks_path.write_text("{broken")
        status, out = http("POST", gw.admin + "/v1/keys/reload", b"{}", BEARER)
        assert status == 422 and "nothing changed" in out
        assert "not a JWK set" in json.loads(out)["error"]["problems"][0]
        assert check(new_token)["valid"] is True
        # Retiring the old key while the issuance API still signs with it
        # would break issuance: refused, nothing changes.
        jwks_path.write_text(new.jwks.read_text())
        status, out = http("POST", gw.admin + "/v1/keys/reload", b"{}", BEARER)
        assert status == 422 and "would be refused" in out, out
        assert check(token)["valid"] is True
        # Retire the old key and sign with the new one.
        config.write_text(config.read_text().replace(f'signing_key = "{old.private}"', f'signing_key = "{new.private}"')
                          .replace('signing_kid = "old"', 'signing_kid = "new"'))
        status, out = http("POST", gw.admin + "/v1/keys/reload", b"{}", BEARER)
        assert json.loads(out)["reloaded"]["issuance_kid"] == {"before": "old", "after": "new"}, out
        reloaded = json.loads(out)["reloaded"]
        assert status == 200 and reloaded["kids"] == ["new"] and reloaded["keys_removed"] == ["old"], out
        assert check(token)["reason"] == "unknown_key"
    finally:
        started = time.monotonic()
        code = gw.stop(timeout=30)
    assert code == 0
    assert time.monotonic() - started < 30
    log = gw.output()
    assert "token refused" in log and 'reason="bad_signature"' in log
    # No token, nor its signature part, ever reaches the log.
    for tok in seen_tokens:
        assert tok not in log
        assert tok.split(".")[2][:16] not in log
    assert BEARER not in log


def test_config_check_reports_problems_with_locations(tmp_path):
    key = Key(tmp_path, "EdDSA", "k")
    good = write_config(tmp_path / "good.toml", key.config_entry())
    p = run("config", "check", str(good))
    assert "ok" in p.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[tokens]\nleeway_secs = 9999\n\n[[tokens.keys]]\npublic_key = "x.pem"\n\n[[backends]]\nnetworks = ["10.0.0.0/33"]\n')
    p = run("config", "check", str(bad), check=False)
    assert p.returncode == 1
    assert "line 2, column 1: `tokens.leeway_secs`" in p.stdout
    assert "line 4, column 1: `tokens.keys[0]`" in p.stdout
    assert "`backends[0].networks[0]`" in p.stdout
    # A file that parses but names a missing key file: caught by loading it.
    missing = write_config(tmp_path / "missing.toml", '[[tokens.keys]]\nkid = "a"\nalgorithm = "EdDSA"\npublic_key = "/nonexistent.pem"\n')
    p = run("config", "check", str(missing), check=False)
    assert p.returncode == 1 and "/nonexistent.pem" in p.stdout
