"""Third-party servers the scale-out tests start on free loopback ports:
Debian's redis-server (the shared store) and HAProxy (the balancer). Each
is stopped by its own PID."""

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


class RedisServer:
    """redis-server on a free loopback port (no persistence), stopped by PID."""

    def __init__(self, port=None):
        if port is None:
            from vm import free_port
            port = free_port()
        self.port = port
        self.proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--daemonize", "no"], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not listen"
                time.sleep(0.05)

    def sections(self, node, lease_secs=3):
        """[store] on this server and [node] for one node of a cluster."""
        return f"""
[store]
url = "redis://127.0.0.1:{self.port}"
key_prefix = "e2e:"
timeout_ms = 500
lease_secs = {lease_secs}
renew_secs = 1
[node]
name = "{node}"
"""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Route:
    """One HAProxy frontend on 127.0.0.1:`front`, balanced round robin over
    Porthole listeners on 127.0.0.1 (`servers`: their ports).

    mode "tcp": each connection starts with a PROXY v2 header (the native
    SPICE/VNC listeners, or a TLS-passthrough public listener); mode "http":
    HAProxy parses HTTP (WebSocket upgrades included) and says who the client
    is in X-Forwarded-For. `check`: per server, the admin port whose /readyz
    HAProxy polls (as docs/scaling.md recommends), or nothing."""

    front: int
    servers: list
    mode: str = "tcp"
    check: list = field(default_factory=list)

    def lines(self, name):
        out = [f"frontend {name}", f"    mode {self.mode}", f"    bind 127.0.0.1:{self.front}",
               f"    default_backend {name}_nodes", f"backend {name}_nodes", f"    mode {self.mode}",
               "    balance roundrobin"]
        if self.mode == "http":
            out.append("    option forwardfor")
        if self.check:
            out += ["    option httpchk GET /readyz", "    default-server inter 500ms fall 2 rise 1"]
        for i, port in enumerate(self.servers):
            server = f"    server node-{i} 127.0.0.1:{port}"
            if self.mode == "tcp":
                server += " send-proxy-v2"
            if self.check:
                # On another port than the traffic's, HAProxy sends no PROXY
                # header on checks: the admin listener expects none.
                server += f" check port {self.check[i]}"
            out.append(server)
        return out


class HAProxy:
    """`haproxy -db` with one frontend per route (name -> Route), logging to
    tmp/haproxy.log; stopped by its PID."""

    def __init__(self, tmp, routes):
        lines = ["global", "    log stderr format raw local0 info", "defaults", "    log global",
                 "    timeout connect 5s", "    timeout client 60s", "    timeout server 60s",
                 "    timeout tunnel 1h"]
        for name, route in routes.items():
            lines += route.lines(name)
        self.cfg = tmp / "haproxy.cfg"
        self.cfg.write_text("\n".join(lines) + "\n")
        subprocess.run([HAPROXY, "-c", "-q", "-f", str(self.cfg)], check=True, timeout=30)
        self.log_path = tmp / "haproxy.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([HAPROXY, "-f", str(self.cfg), "-db"], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        for route in routes.values():
            while True:
                assert self.proc.poll() is None, self.log_path.read_text()
                try:
                    socket.create_connection(("127.0.0.1", route.front), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "HAProxy never listened"
                    time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
