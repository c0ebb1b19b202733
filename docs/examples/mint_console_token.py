#!/usr/bin/env python3
"""Mint a Porthole console token with PyJWT: what an API server does.

Claim schema version 1 (docs/tokens.md). The private key stays with the API
server; Porthole holds only the public key (or JWK set) and checks every claim.
No credential ever goes into a token: anyone holding it can read its claims.

    pip install 'PyJWT[crypto]'
    python3 mint_console_token.py --key api.pem --kid 2026-11 --alg EdDSA \
        --type novnc --instance 3f2a... --host 10.0.0.5 --port 5901
"""

import argparse
import time
import uuid

import jwt  # PyJWT


def mint_console_token(private_key, kid, algorithm, instance_id, console_type,
                       host, port, tls_port=None, issuer="porthole",
                       audience="porthole", ttl=120, view_only=False, record=False,
                       user=None):
    """Returns a signed console token (a compact JWT string)."""
    now = int(time.time())
    console = {"type": console_type, "host": host, "port": port}
    if tls_port is not None:
        console["tls_port"] = tls_port
    if view_only:
        console["view_only"] = True  # watch, not act: Porthole drops the input
    if record:
        console["record"] = True  # must be recorded: refused or ended if it cannot be
    claims = {
        "iss": issuer,            # must be in Porthole's tokens.issuers
        "aud": audience,          # must be in Porthole's tokens.audiences
        "sub": instance_id,       # the instance (VM) id
        "iat": now,
        "nbf": now,
        "exp": now + ttl,         # keep it short: tokens are for connecting now
        "jti": uuid.uuid4().hex,  # unique: the key for reuse and revocation
        "ver": 1,                 # claim schema version
        "console": console,       # type + hypervisor target, never a password
    }
    if user is not None:
        claims["user"] = user     # who asked: in the audit trail and session list
    return jwt.encode(claims, private_key, algorithm=algorithm,
                      headers={"kid": kid})


def console_url(base_url, console_type, token):
    """The URL to hand the user (same shape as Porthole's issuance API)."""
    path = {"spice-direct": "spice-direct", "vnc-direct": "vnc-direct"}.get(
        console_type, "console")
    return f"{base_url.rstrip('/')}/{path}?token={token}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--key", required=True, help="PEM private key, or HS256 secret file")
    p.add_argument("--kid", required=True)
    p.add_argument("--alg", default="EdDSA", choices=["EdDSA", "ES256", "RS256", "HS256"])
    p.add_argument("--type", required=True, dest="console_type")
    p.add_argument("--instance", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--port", required=True, type=int)
    p.add_argument("--tls-port", type=int)
    p.add_argument("--view-only", action="store_true")
    p.add_argument("--record", action="store_true")
    p.add_argument("--user", help="the user the console is for (claim `user`)")
    p.add_argument("--issuer", default="porthole")
    p.add_argument("--audience", default="porthole")
    p.add_argument("--ttl", type=int, default=120)
    p.add_argument("--base-url", default="http://127.0.0.1:6080")
    a = p.parse_args()
    with open(a.key, "rb") as f:
        key = f.read()
    if a.alg == "HS256":
        key = key.strip()
    token = mint_console_token(key, a.kid, a.alg, a.instance, a.console_type,
                               a.host, a.port, a.tls_port, a.issuer,
                               a.audience, a.ttl, a.view_only, a.record, a.user)
    print(token)
    print(console_url(a.base_url, a.console_type, token))


if __name__ == "__main__":
    main()
