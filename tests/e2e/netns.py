"""Test hosts of our own: a network namespace joined to this one by a veth
pair, with an address in 10.231.0.0/16 that only this machine routes. A
console server started there (vm.VM(host=...)) is reached over a real
link, which a test can then take away without a word to either end, as a
host that loses power or its network does: no FIN, no reset, every packet
dropped. Needs root (CI and this machine run the suite as root); fails
loudly without it."""

import ipaddress
import itertools
import os
import subprocess

NETWORK = ipaddress.ip_network("10.231.0.0/16")
_made = itertools.count()


def _ip(*args):
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {done.stderr.strip()} (test hosts need root and iproute2)")
    return done.stdout


class TestHost:
    """A namespace named ph<pid>-<n>, its end of the link at self.address,
    this machine's at self.gateway. run_there prefixes a command that must
    run inside it."""

    __test__ = False  # not a pytest test class

    def __init__(self):
        n = next(_made)
        self.name = f"ph{os.getpid()}-{n}"
        # One /30 per host, chosen from the PID so that parallel workers
        # (each its own process) do not meet; the names are per process too.
        subnets = list(NETWORK.subnets(new_prefix=30))
        subnet = subnets[(os.getpid() * 8 + n) % len(subnets)]
        self.gateway, self.address = (str(a) for a in list(subnet.hosts())[:2])
        self.outside, self.inside = f"{self.name}h", f"{self.name}v"
        self.run_there = ("ip", "netns", "exec", self.name)
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.outside, "type", "veth", "peer", "name", self.inside)
            _ip("link", "set", self.inside, "netns", self.name)
            _ip("addr", "add", f"{self.gateway}/30", "dev", self.outside)
            _ip("link", "set", self.outside, "up")
            _ip("-n", self.name, "addr", "add", f"{self.address}/30", "dev", self.inside)
            _ip("-n", self.name, "link", "set", self.inside, "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise

    def go_dark(self):
        """The host's end of the link goes down: what this machine sends it
        is dropped on the way, and nothing comes back."""
        _ip("-n", self.name, "link", "set", self.inside, "down")

    def come_back(self):
        """The host's end of the link is up again."""
        _ip("-n", self.name, "link", "set", self.inside, "up")

    def remove(self):
        subprocess.run(["ip", "link", "del", self.outside], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)
