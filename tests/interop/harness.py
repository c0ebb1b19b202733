"""Helpers for the Python side of the suite: the porthole binary, key
material it generates, configs, and a running gateway."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docs" / "examples"))

ISSUER = "https://api.interop.test"
AUDIENCE = "porthole-interop"


def porthole_bin():
    path = pathlib.Path(os.environ.get("PORTHOLE_BIN", ROOT / "target" / "debug" / "porthole"))
    if not path.exists():
        pytest.fail(f"{path} does not exist: build it first (scripts/test does)")
    return str(path)


def run(*args, env=None, check=True, input=None):
    full_env = dict(os.environ)
    full_env.update(env or {})
    p = subprocess.run([porthole_bin(), *args], capture_output=True, text=True,
                       env=full_env, timeout=120, input=input)
    if check and p.returncode != 0:
        raise AssertionError(f"porthole {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


KINDS = {"EdDSA": "ed25519", "ES256": "es256", "RS256": "rs256", "HS256": "hs256"}


class Key:
    def __init__(self, folder, alg, kid):
        run("keys", "generate", "--type", KINDS[alg], "--kid", kid, "--out", str(folder))
        self.alg, self.kid, self.folder = alg, kid, pathlib.Path(folder)
        self.private = self.folder / (f"{kid}.secret" if alg == "HS256" else f"{kid}.pem")
        self.public = self.folder / f"{kid}.pub.pem"
        self.jwks = self.folder / f"{kid}.jwks.json"

    def signing_key(self):
        data = self.private.read_bytes()
        return data.strip() if self.alg == "HS256" else data

    def config_entry(self):
        if self.alg == "HS256":
            return f'[[tokens.keys]]\nkid = "{self.kid}"\nsecret_file = "{self.private}"\n'
        return (f'[[tokens.keys]]\nkid = "{self.kid}"\nalgorithm = "{self.alg}"\n'
                f'public_key = "{self.public}"\n')


def write_config(path, key_entries, admin_port=0, extra=""):
    path.write_text(f"""
[listen]
admin = "127.0.0.1:{admin_port}"
public_base_url = "https://consoles.interop.test"

[tokens]
issuers = ["{ISSUER}"]
audiences = ["{AUDIENCE}"]
allow_hmac = true

{key_entries}

[[backends]]
name = "lab"
networks = ["10.77.0.0/16", "127.0.0.0/8"]
ports = ["5900-6999"]
{extra}
""")
    return path


def _ephemeral_range():
    try:
        lo, hi = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


_handed_out = set()


def free_port():
    """A loopback port free now, for a server a test starts next. Chosen
    below the kernel's ephemeral range: a port the kernel handed out for
    bind(0) is also what it hands the next client socket as its source
    port, and a flood's thousands of client sockets then take it before the
    server binds it (EADDRINUSE). Each pytest-xdist worker draws from its
    own slice of that range, and a process never hands out one port twice:
    a port is free only until its server binds it, so a second draw before
    that bind (a Porthole's admin and SPICE ports, CI's stop 30) or another
    worker's draw could otherwise return it again."""
    import random
    lo = _ephemeral_range()[0]
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    count = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), 1)
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    per = max((lo - 10000) // count, 100)
    first = 10000 + (index % count) * per
    for _ in range(400):
        port = random.randrange(first, first + per)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {first}-{first + per - 1} after 400 draws")


def http(method, url, body=None, bearer=None, timeout=10):
    headers = {"Content-Type": "application/json"}
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Gateway:
    """A `porthole serve` process; stderr goes to a log file we can grep."""

    def __init__(self, args, log_path, env=None, admin_port=None):
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.admin = f"http://127.0.0.1:{admin_port}"
        self.proc = subprocess.Popen([porthole_bin(), "serve", *args], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=full_env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"porthole serve exited early:\n{self.output()}")
            try:
                if http("GET", self.admin + "/readyz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"porthole serve never became ready:\n{self.output()}")

    def output(self):
        self.log.flush()
        return pathlib.Path(self.log_path).read_text()

    def stop(self, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


def metric_value(text, name, **labels):
    """A counter's value from Prometheus text, or None if absent."""
    import re
    label = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}{{{re.escape(label)}}} (\d+)$", text, re.M)
    return int(m.group(1)) if m else None
