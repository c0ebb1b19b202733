"""A real OpenStack Keystone and Nova compute API (from PyPI, SQLite,
gunicorn) on free loopback ports, for Nova's console tokens: enough to serve
GET /v2.1/os-console-auth-tokens/{token} to Porthole. No compute, conductor
or message bus. Tokens are minted with Nova's own objects
(ConsoleAuthToken(...).authorize(ttl)) by one long-lived helper process,
and their URLs are Nova's own access_url.

    python3 tests/e2e/nova.py install    # the venv (target/nova-venv), cached by its lockfile

Keystone users (project `service`, domain Default): `porthole` with only the
`console_auth` role (Nova's policy lets that role resolve tokens, nothing
else), `porthole-member` with only `member` (the negative control), and an
application credential of `porthole` restricted to `console_auth`.
"""

import concurrent.futures
import json
import os
import pathlib
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
LAB = HERE / "novalab"
VENV = ROOT / "target" / "nova-venv"
STAMP = VENV / ".lock-stamp"
CONSOLE_ROLE = "console_auth"
INSTANCE = "11111111-2222-4333-8444-555555555555"


def _lock_text():
    return (LAB / "requirements.txt").read_text() + (LAB / "constraints.txt").read_text()


def install():
    """Creates target/nova-venv from the lockfile unless it is there already
    for this very lockfile (~60 s when it is not)."""
    if STAMP.exists() and STAMP.read_text() == _lock_text():
        return
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run(["python3", "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "-c", str(LAB / "constraints.txt"), "-r", str(LAB / "requirements.txt")], check=True)
    STAMP.write_text(_lock_text())


def _free_port():
    from vm import free_port
    return free_port()


def _wait_http(url, timeout=90, proc=None, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{url}: the server exited: {log.read_text()[-3000:] if log else ''}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout} s")


class NovaLab:
    """Keystone and Nova, configured and started in `folder`; stop() stops both."""

    def __init__(self, folder, nova_conf_extra=""):
        install()
        self.dir = pathlib.Path(folder)
        self.etc, self.data, self.log = self.dir / "etc", self.dir / "data", self.dir / "log"
        for d in (self.etc / "keystone", self.etc / "nova", self.data / "nova" / "lock", self.log):
            d.mkdir(parents=True, exist_ok=True)
        self.ks_port, self.nova_port = _free_port(), _free_port()
        while self.nova_port == self.ks_port:
            self.nova_port = _free_port()
        self.ks_url = f"http://127.0.0.1:{self.ks_port}/v3"
        self.nova_url = f"http://127.0.0.1:{self.nova_port}/v2.1"
        self.admin_password = secrets.token_hex(12)
        self.nova_password = secrets.token_hex(12)
        self.porthole_password = secrets.token_hex(12)
        self.env = {**os.environ, "PYTHONWARNINGS": "ignore",
                    "OS_KEYSTONE_CONFIG_DIR": str(self.etc / "keystone"),
                    "OS_NOVA_CONFIG_DIR": str(self.etc / "nova")}
        self.procs = {}
        self._minter = None
        self._write_configs(nova_conf_extra)
        # Keystone's setup and Nova's are independent until a request
        # reaches Nova (its users and endpoints are Keystone's): each is a
        # chain of Python processes (most of their time is imports), run
        # side by side: 42 s became 24 s on a quiet machine. test_nova's is
        # the slowest file; with a fourth worker it would end the step last.
        try:
            with concurrent.futures.ThreadPoolExecutor(2) as both:
                nova = both.submit(self._nova_side)
                self._keystone_side()
                nova.result()
        except BaseException:
            self.stop()  # a server the other side started
            raise

    def _keystone_side(self):
        ksm = [self._bin("keystone-manage"), "--config-file", str(self.etc / "keystone" / "keystone.conf")]
        user = ["--keystone-user", str(os.getuid()), "--keystone-group", str(os.getgid())]
        with concurrent.futures.ThreadPoolExecutor(3) as keys:
            steps = [keys.submit(self._run, *ksm, *step)
                     for step in (["fernet_setup", *user], ["credential_setup", *user], ["db_sync"])]
        for step in steps:
            step.result()
        self._run(*ksm, "bootstrap", "--bootstrap-password", self.admin_password,
                  "--bootstrap-username", "admin", "--bootstrap-project-name", "admin",
                  "--bootstrap-role-name", "admin", "--bootstrap-region-id", "RegionOne",
                  "--bootstrap-admin-url", self.ks_url, "--bootstrap-internal-url", self.ks_url,
                  "--bootstrap-public-url", self.ks_url)
        self.start_keystone()
        self._keystone_objects()

    def _nova_side(self):
        nm = [self._bin("nova-manage"), "--config-dir", str(self.etc / "nova"),
              "--log-file", str(self.log / "nova-manage.log")]
        self._run(*nm, "api_db", "sync")
        self._run(*nm, "cell_v2", "map_cell0", "--database_connection", f"sqlite:///{self.data}/nova_cell0.sqlite")
        self._run(*nm, "cell_v2", "create_cell", "--name", "cell1",
                  "--database_connection", f"sqlite:///{self.data}/nova_cell1.sqlite", "--transport-url", "fake://")
        self._run(*nm, "db", "sync")
        self.start_nova()

    def _bin(self, name):
        return str(VENV / "bin" / name)

    def _write_configs(self, nova_conf_extra):
        d, log = self.data, self.log
        (self.etc / "keystone" / "keystone.conf").write_text(f"""
[DEFAULT]
log_dir = {log}
log_file = keystone.log
[database]
connection = sqlite:///{d}/keystone.sqlite
[token]
provider = fernet
expiration = 3600
[fernet_tokens]
key_repository = {d}/fernet-keys
max_active_keys = 3
[fernet_receipts]
key_repository = {d}/fernet-keys
[credential]
key_repository = {d}/credential-keys
# tests only: cheap bcrypt (12 rounds cost ~250 ms per password auth)
[identity]
password_hash_rounds = 4
# one worker: an in-process cache is coherent and validation is fast
[cache]
enabled = true
backend = dogpile.cache.memory
""")
        (self.etc / "nova" / "nova.conf").write_text(f"""
[DEFAULT]
host = novalab
state_path = {d}/nova
log_dir = {log}
log_file = nova-api.log
# no message bus: a token lookup makes no RPC call
transport_url = fake://
concurrency_backend = threading
[api]
auth_strategy = keystone
[api_database]
connection = sqlite:///{d}/nova_api.sqlite
[database]
connection = sqlite:///{d}/nova_cell1.sqlite
[keystone_authtoken]
www_authenticate_uri = {self.ks_url}
auth_url = {self.ks_url}
auth_type = password
username = nova
password = {self.nova_password}
project_name = service
user_domain_name = Default
project_domain_name = Default
[oslo_messaging_notifications]
driver = noop
[oslo_concurrency]
lock_path = {d}/nova/lock
[oslo_policy]
policy_file = {self.etc}/nova/policy.yaml
[wsgi]
api_paste_config = {self.etc}/nova/api-paste.ini
{nova_conf_extra}
""")
        shutil.copy(VENV / "etc" / "nova" / "api-paste.ini", self.etc / "nova" / "api-paste.ini")
        # Least privilege: the console proxy's role may resolve tokens, nothing else is widened.
        (self.etc / "nova" / "policy.yaml").write_text(
            f'"os_compute_api:os-console-auth-tokens": "rule:context_is_admin or role:{CONSOLE_ROLE}"\n')

    def _run(self, *args):
        with open(self.log / "setup.log", "a") as out:
            subprocess.run(args, check=True, env=self.env, stdout=out, stderr=subprocess.STDOUT, timeout=300)

    def _start(self, name, port, module):
        if name in self.procs and self.procs[name].poll() is None:
            return
        out = open(self.log / f"{name}-gunicorn.log", "a")
        # Its own session, so stop() signals only this server's process group.
        self.procs[name] = subprocess.Popen(
            [self._bin("gunicorn"), "--chdir", str(LAB), "--bind", f"127.0.0.1:{port}", "--workers", "1",
             "--worker-class", "gthread", "--threads", "4", "--timeout", "120", "--graceful-timeout", "5",
             "--no-control-socket", "--name", f"porthole-test-{name}", f"{module}:application"],
            env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        _wait_http(f"http://127.0.0.1:{port}/", proc=self.procs[name], log=self.log / f"{name}-gunicorn.log")

    def start_keystone(self):
        self._start("keystone", self.ks_port, "keystone_app")

    def start_nova(self):
        self._start("nova", self.nova_port, "nova_app")

    def stop_one(self, name):
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def stop(self):
        if self._minter is not None and self._minter.poll() is None:
            self._minter.stdin.close()
            try:
                self._minter.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._minter.kill()
                self._minter.wait()
        for name in list(self.procs):
            self.stop_one(name)

    def _keystone_objects(self):
        self.appcred_file = self.dir / "appcred.json"
        subprocess.run([self._bin("python"), str(LAB / "ks_setup.py"), self.ks_url, self.admin_password,
                        self.nova_password, self.porthole_password, CONSOLE_ROLE, str(self.appcred_file),
                        self.nova_url], check=True, env=self.env, timeout=120,
                       stdout=open(self.log / "setup.log", "a"), stderr=subprocess.STDOUT)

    def appcred(self):
        return json.loads(self.appcred_file.read_text())

    def mint(self, console_type, host, port, tls_port=None, ttl=600, base_url=None):
        """A console token authorized by Nova's own objects; returns
        (token, Nova's access_url for base_url or None)."""
        if self._minter is None or self._minter.poll() is not None:
            self._minter = subprocess.Popen(
                [self._bin("python"), str(LAB / "minter.py"), str(self.etc / "nova"), str(self.log / "mint.log")],
                env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log / "mint.err", "a"),
                text=True)
        self._minter.stdin.write(json.dumps({"instance": INSTANCE, "type": console_type, "host": host,
                                             "port": port, "tls_port": tls_port, "ttl": ttl,
                                             "base": base_url}) + "\n")
        self._minter.stdin.flush()
        # One line per request: nothing is buffered ahead of it.
        if not select.select([self._minter.stdout], [], [], 120)[0]:
            self._minter.kill()
            raise AssertionError(f"the mint helper did not answer: {(self.log / 'mint.err').read_text()[-3000:]}")
        line = self._minter.stdout.readline()
        if not line:
            raise AssertionError(f"the mint helper died: {(self.log / 'mint.err').read_text()[-3000:]}")
        answer = json.loads(line)
        if "error" in answer:
            raise AssertionError(answer["error"])
        return answer["token"], answer["access_url"]


if __name__ == "__main__":
    if sys.argv[1:] == ["install"]:
        install()
        print("nova venv:", VENV)
    else:
        sys.exit(__doc__)
