"""The load tool's real Keystone and Nova (benches/load/nova.rs): starts the
e2e harness's NovaLab (tests/e2e/nova.py: Keystone 30 and Nova 34 from
target/nova-venv under gunicorn, SQLite, free loopback ports) in FOLDER,
mints COUNT console tokens with Nova's own objects for a VNC console at
127.0.0.1:PORT, and prints one JSON line:

    {"auth_url", "username", "password", "project", "nova_pid", "tokens": [...]}

(nova_pid: gunicorn's master of Nova's API, for its CPU time.)

Then, for each line "N" on stdin, mints N more and prints {"tokens": [...]}.
When stdin closes (the tool ended, or died), it stops Keystone and Nova.

    target/venv/bin/python benches/load/novalab.py FOLDER PORT COUNT
"""

import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from nova import NovaLab  # noqa: E402

# Longer than any run: a token must not expire in Nova between its minting
# and its use (Porthole's own clock starts at first sight).
TTL = 3600


def mint(lab, port, n):
    return [lab.mint("novnc", "127.0.0.1", port, ttl=TTL)[0] for _ in range(n)]


def main():
    folder, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    started = time.monotonic()
    lab = NovaLab(folder)
    try:
        up = time.monotonic() - started
        t = time.monotonic()
        tokens = mint(lab, port, count)
        minted = time.monotonic() - t
        print(json.dumps({"auth_url": lab.ks_url, "username": "porthole",
                          "password": lab.porthole_password, "project": "service",
                          "nova_pid": lab.procs["nova"].pid, "started_secs": round(up, 1),
                          "mint_secs": round(minted, 1),
                          "tokens": tokens}), flush=True)
        for line in sys.stdin:
            n = int(line.strip() or 0)
            print(json.dumps({"tokens": mint(lab, port, n)}), flush=True)
    finally:
        lab.stop()


if __name__ == "__main__":
    main()
