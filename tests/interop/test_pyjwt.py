"""Interop with the real PyJWT an API server uses: tokens PyJWT mints by the
documented schema are accepted, and tokens Porthole mints verify in PyJWT."""

import base64
import json
import subprocess
import sys
import time

import jwt
import pytest

from harness import AUDIENCE, ISSUER, ROOT, Key, run, write_config
from mint_console_token import console_url, mint_console_token

ALGS = ["EdDSA", "ES256", "RS256", "HS256"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return {alg: Key(folder, alg, f"kid-{alg.lower()}") for alg in ALGS}


@pytest.fixture(scope="module")
def config(keys, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "porthole.toml"
    return write_config(path, "\n".join(k.config_entry() for k in keys.values()))


def pyjwt_token(key, **overrides):
    args = dict(private_key=key.signing_key(), kid=key.kid, algorithm=key.alg,
                instance_id="7b1e-instance", console_type="novnc", host="10.77.1.2",
                port=5901, issuer=ISSUER, audience=AUDIENCE, ttl=60)
    args.update(overrides)
    return mint_console_token(**args)


def inspect(config, token, *extra):
    return run("token", "inspect", "--config", str(config), *extra, "-", check=False, input=token)


def tamper(token):
    header, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["console"]["port"] = 5999
    edited = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{edited}.{sig}"


def test_a_pyjwt_minted_view_only_token_is_read_as_one(keys, config):
    token = pyjwt_token(keys["EdDSA"], view_only=True)
    p = inspect(config, token, "--type", "novnc")
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout)["console"] == {
        "type": "novnc", "host": "10.77.1.2", "port": 5901, "view_only": True}


def test_a_pyjwt_minted_token_that_asks_for_a_recording_is_read_as_one(keys, config):
    token = pyjwt_token(keys["EdDSA"], record=True)
    p = inspect(config, token, "--type", "novnc")
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout)["console"] == {
        "type": "novnc", "host": "10.77.1.2", "port": 5901, "record": True}


@pytest.mark.parametrize("alg", ALGS)
def test_pyjwt_minted_tokens_are_accepted(alg, keys, config):
    token = pyjwt_token(keys[alg])
    p = inspect(config, token, "--type", "novnc")
    assert p.returncode == 0, p.stdout + p.stderr
    claims = json.loads(p.stdout)
    assert claims["sub"] == "7b1e-instance"
    assert claims["console"] == {"type": "novnc", "host": "10.77.1.2", "port": 5901}
    assert f"key kid-{alg.lower()}" in p.stderr

    # The same PyJWT token, edited after signing, is refused with its reason.
    p = inspect(config, tamper(token))
    assert p.returncode == 1 and p.stdout.startswith("refused: bad_signature"), p.stdout
    # ...and at another console type's endpoint.
    p = inspect(config, token, "--type", "serial")
    assert p.returncode == 1 and p.stdout.startswith("refused: wrong_console_type"), p.stdout


def test_pyjwt_refusals_carry_their_reason(keys, config):
    key = keys["EdDSA"]
    now = int(time.time())
    cases = {
        "expired": jwt.encode(
            {"iss": ISSUER, "aud": AUDIENCE, "sub": "i", "iat": now - 300, "exp": now - 200,
             "jti": "j1", "console": {"type": "novnc", "host": "10.77.1.2", "port": 5901}},
            key.signing_key(), algorithm="EdDSA", headers={"kid": key.kid}),
        "wrong_audience": pyjwt_token(key, audience="someone-else"),
        "wrong_issuer": pyjwt_token(key, issuer="https://evil.test"),
        "target_not_allowed": pyjwt_token(key, host="169.254.169.254", port=80),
        "lifetime_too_long": pyjwt_token(key, ttl=365 * 86400),
    }
    assert inspect(config, pyjwt_token(key)).returncode == 0
    for reason, token in cases.items():
        p = inspect(config, token)
        assert p.returncode == 1 and p.stdout.startswith(f"refused: {reason}:"), (reason, p.stdout)
        assert token not in p.stdout + p.stderr


@pytest.mark.parametrize("alg", ALGS)
def test_porthole_minted_tokens_verify_in_pyjwt(alg, keys, tmp_path):
    key = keys[alg]
    args = ["token", "mint", "--key", str(key.private), "--kid", key.kid, "--type", "spice-direct",
            "--instance", "vm-42", "--host", "10.77.0.9", "--port", "5900", "--tls-port", "5901",
            "--issuer", ISSUER, "--audience", AUDIENCE, "--ttl", "90", "--json"]
    if alg == "HS256":
        args.append("--hmac")
    out = json.loads(run(*args).stdout)
    token = out["token"]
    assert jwt.get_unverified_header(token) == {"alg": alg, "kid": key.kid, "typ": "JWT"}
    if alg == "HS256":
        verify_key = key.signing_key()
    else:
        # Verify with the JWK set `porthole keys generate` published.
        jwks = jwt.PyJWKSet.from_json(key.jwks.read_text())
        verify_key = jwks[key.kid]
        assert verify_key.algorithm_name == alg
    claims = jwt.decode(token, verify_key, algorithms=[alg], audience=AUDIENCE, issuer=ISSUER,
                        options={"require": ["exp", "iat", "nbf", "jti", "sub", "aud", "iss"]})
    assert claims["console"] == {"type": "spice-direct", "host": "10.77.0.9", "port": 5900, "tls_port": 5901}
    assert claims["exp"] - claims["iat"] == 90
    assert claims["jti"] == out["jti"] and claims["exp"] == out["expires_at"]
    assert out["url"] == f"http://127.0.0.1:6080/spice-direct?token={token}"
    # The public PEM works in PyJWT too.
    if alg != "HS256":
        jwt.decode(token, key.public.read_bytes(), algorithms=[alg], audience=AUDIENCE, issuer=ISSUER)
    # And PyJWT refuses it with the wrong audience: the claim is really there.
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(token, verify_key, algorithms=[alg], audience="other", issuer=ISSUER)


def test_the_documented_python_example_runs_as_a_program(keys, config):
    key = keys["ES256"]
    p = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "examples" / "mint_console_token.py"),
         "--key", str(key.private), "--kid", key.kid, "--alg", "ES256", "--type", "serial",
         "--instance", "vm-serial", "--host", "10.77.3.3", "--port", "6001",
         "--issuer", ISSUER, "--audience", AUDIENCE, "--base-url", "https://consoles.test/"],
        capture_output=True, text=True, check=True, timeout=60)
    token, url = p.stdout.split()
    assert url == console_url("https://consoles.test", "serial", token) == f"https://consoles.test/console?token={token}"
    p = inspect(config, token, "--type", "serial")
    assert p.returncode == 0, p.stdout
