"""Third-party servers the scale-out tests start on free loopback ports:
Debian's redis-server (the shared store, a primary or a replica),
redis-sentinel (which fails the primary over) and HAProxy (the balancer, and
the address that follows Redis's primary). Each is stopped by its own PID."""

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
SENTINEL = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"


class RedisServer:
    """redis-server on a free loopback port (no persistence), stopped by PID.
    replica_of: the port of a primary on 127.0.0.1 this one replicates."""

    def __init__(self, port=None, replica_of=None):
        if port is None:
            from vm import free_port
            port = free_port()
        self.port = port
        replication = ["--replicaof", "127.0.0.1", str(replica_of)] if replica_of else []
        # A replica's first sync starts at once (Redis waits 5 s by default
        # for more replicas to share a diskless transfer), and the replica
        # loads it in memory (by default it writes dump.rdb in its cwd).
        self.proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--daemonize", "no", "--repl-diskless-sync-delay", "0",
                                      "--repl-diskless-load", "swapdb", *replication], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not listen"
                time.sleep(0.05)

    def sections(self, node, lease_secs=3, port=None):
        """[store] on this server and [node] for one node of a cluster.
        port: where the node reaches the store (a balancer's frontend that
        follows the primary); default this server's own."""
        return f"""
[store]
url = "redis://127.0.0.1:{port or self.port}"
key_prefix = "e2e:"
timeout_ms = 500
lease_secs = {lease_secs}
renew_secs = 1
[node]
name = "{node}"
"""

    def command(self, *args):
        """One command on this server; its reply."""
        return redis_command(self.port, *args)

    def info(self, section):
        """INFO `section` as a dict."""
        return dict(line.split(":", 1) for line in self.command("INFO", section).splitlines()
                    if ":" in line and not line.startswith("#"))

    def stop(self):
        """SIGKILL (a crash: nothing is flushed, no replica is told)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class RedisError(Exception):
    """An error reply."""


def redis_command(port, *args, timeout=5):
    """Sends one command to the Redis or Sentinel on 127.0.0.1:`port`;
    returns its RESP2 reply (str, int, None, list), raises RedisError."""
    out = f"*{len(args)}\r\n".encode()
    for a in args:
        a = str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(out)
        reply = _read_reply(s.makefile("rb"))
    if isinstance(reply, RedisError):
        raise reply
    return reply


def _read_reply(f):
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError(f"connection closed mid-reply: {line!r}")
    kind, rest = line[:1], line[1:-2].decode()
    if kind == b"+":
        return rest
    if kind == b"-":
        return RedisError(rest)
    if kind == b":":
        return int(rest)
    if kind == b"$":
        return None if int(rest) < 0 else f.read(int(rest) + 2)[:-2].decode()
    if kind == b"*":
        return None if int(rest) < 0 else [_read_reply(f) for _ in range(int(rest))]
    raise ConnectionError(f"not RESP: {line!r}")


class Sentinel:
    """Debian's redis-sentinel on a free loopback port, watching the primary
    on 127.0.0.1:`primary` as MASTER with quorum 2; its config (which
    Sentinel rewrites) and log under `tmp`. Stopped by PID."""

    MASTER = "porthole"

    def __init__(self, tmp, primary, down_after_ms=1000, failover_timeout_ms=5000):
        from vm import free_port
        self.port = free_port()
        self.log_path = tmp / f"sentinel-{self.port}.log"
        conf = tmp / f"sentinel-{self.port}.conf"
        conf.write_text(f"""port {self.port}
bind 127.0.0.1
daemonize no
logfile ""
dir {tmp}
sentinel monitor {self.MASTER} 127.0.0.1 {primary} 2
sentinel down-after-milliseconds {self.MASTER} {down_after_ms}
sentinel failover-timeout {self.MASTER} {failover_timeout_ms}
sentinel parallel-syncs {self.MASTER} 1
""")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([SENTINEL, str(conf)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                redis_command(self.port, "PING")
                return
            except OSError:
                assert time.monotonic() < deadline, "redis-sentinel did not listen"
                time.sleep(0.05)

    def master(self):
        """SENTINEL MASTER as a dict (num-slaves, num-other-sentinels, flags...)."""
        reply = redis_command(self.port, "SENTINEL", "MASTER", self.MASTER)
        return dict(zip(reply[::2], reply[1::2]))

    def primary(self):
        """The port of the primary this Sentinel knows."""
        return int(redis_command(self.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER)[1])

    def stop(self):
        from vm import stop_process
        stop_process(self.proc, self.log)


# What HAProxy asks each Redis server to find the primary (docs/scaling.md):
# only a server answering role:master takes connections.
PRIMARY_CHECK = ["    option tcp-check", "    tcp-check connect",
                 "    tcp-check send PING\\r\\n", "    tcp-check expect string +PONG",
                 "    tcp-check send info\\ replication\\r\\n", "    tcp-check expect string role:master",
                 "    tcp-check send QUIT\\r\\n", "    tcp-check expect string +OK"]


@dataclass
class Route:
    """One HAProxy frontend on 127.0.0.1:`front`, balanced round robin over
    Porthole listeners on 127.0.0.1 (`servers`: their ports).

    mode "tcp": each connection starts with a PROXY v2 header (the native
    SPICE/VNC listeners, or a TLS-passthrough public listener); mode "http":
    HAProxy parses HTTP (WebSocket upgrades included) and says who the client
    is in X-Forwarded-For. `check`: HAProxy checks each server on its own
    port: /readyz in mode http (as docs/scaling.md recommends), a connect
    and close in mode tcp (with the PROXY header, as traffic).

    redis_primary: the servers are Redis, a primary and its replicas (mode
    tcp, no PROXY header), and only the one that answers role:master takes
    connections (PRIMARY_CHECK every 500 ms; the connections of a server
    marked down are cut), as docs/scaling.md puts HAProxy in front of
    Sentinel's Redis."""

    front: int
    servers: list
    mode: str = "tcp"
    check: bool = False
    redis_primary: bool = False

    def lines(self, name):
        out = [f"frontend {name}", f"    mode {self.mode}", f"    bind 127.0.0.1:{self.front}",
               f"    default_backend {name}_nodes", f"backend {name}_nodes", f"    mode {self.mode}",
               "    balance roundrobin"]
        if self.mode == "http":
            out.append("    option forwardfor")
        if self.check and self.mode == "http":
            out.append("    option httpchk GET /readyz")
        if self.check:
            out.append("    default-server inter 500ms fall 2 rise 1")
        if self.redis_primary:
            out += PRIMARY_CHECK + ["    default-server check inter 500ms fall 2 rise 1 on-marked-down shutdown-sessions"]
            return out + [f"    server redis-{i} 127.0.0.1:{port}" for i, port in enumerate(self.servers)]
        for i, port in enumerate(self.servers):
            server = f"    server node-{i} 127.0.0.1:{port}"
            if self.mode == "tcp":
                server += " send-proxy-v2"
            if self.check:
                server += " check"
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

    def output(self):
        """What HAProxy logged so far (connections, servers going up and down)."""
        return self.log_path.read_text()

    def stop(self):
        from vm import stop_process
        stop_process(self.proc, self.log)
