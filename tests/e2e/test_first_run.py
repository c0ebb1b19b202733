"""A newcomer's first run (#10 item 11): where `npm ci` never ran in web/,
the serial page still works on Debian's xterm.js (node-xterm), and a page
whose client library is really missing says so, with the command that fixes it."""

import json
import pathlib
import shutil
import subprocess
import time

from harness import free_port
from support import HERE, ROOT, EchoBackend, Porthole, browser

DEBIAN_XTERM = pathlib.Path("/usr/share/nodejs/xterm/lib/public/Terminal.js")


def web_without_npm(tmp_path):
    """A copy of web/ as a fresh checkout has it: pages and scripts, no node_modules."""
    web = tmp_path / "web"
    for part in ("pages", "static"):
        shutil.copytree(ROOT / "web" / part, web / part)
    assert not (web / "node_modules").exists()
    return web


def test_serial_page_works_on_debians_xterm_without_npm(tmp_path, vm):
    # scripts/test installs node-xterm; without it this test proves nothing.
    assert DEBIAN_XTERM.is_file(), "Debian's node-xterm is not installed (apt-get install node-xterm)"
    web = web_without_npm(tmp_path)
    porthole = Porthole(tmp_path, web=f'root = "{web}"')
    try:
        porthole.wait_for_log("Debian's xterm.js 3.8 from /usr/share/nodejs/xterm")
        minted = porthole.mint("serial", vm.serial_port, ttl=300)
        page = subprocess.Popen(["node", "browser.mjs", "serial", minted["url"], "6000"], cwd=HERE,
                                stdout=subprocess.PIPE, text=True)
        # Chromium's start and the page's load come first: under the suite's
        # full load (a fresh-clone run of 76e48bb) that took more than 10 s.
        porthole.wait_for_log("console=serial target", timeout=60)
        # SeaBIOS prints on COM1 only while booting: reset once the page is on.
        vm.qmp("system_reset")
        out, _ = page.communicate(timeout=90)
        result = json.loads(out.strip().splitlines()[-1])
        assert result["state"] == "connected", result
        assert result["missing"] is None, result
        assert "SeaBIOS" in result["terminal"], result["terminal"]
        assert "script-src 'self'" in result["csp"] and "'unsafe-eval'" not in result["csp"]
        assert not [f for f in result["failed"] if "/vendor/" in f], result["failed"]
        # Nothing but the favicon (the pages have none) failed or threw.
        assert not [e for e in result["errors"] if "favicon.ico" not in e], result["errors"]

        # Keys the other way (xterm.js 3.8 hands them over as strings): an
        # echoing console sends them back, and the terminal shows them.
        echo = EchoBackend()
        try:
            typed = "keys-thru-xterm-3.8"
            result = browser("serial", porthole.mint("serial", echo.port)["url"], 1500, typed)
            assert result["state"] == "connected", result
            assert typed in result["terminal"], result["terminal"]
            assert result["received"] == len(typed.encode()), result
        finally:
            echo.close()
    finally:
        assert porthole.gateway.stop() == 0, porthole.log()


def test_pages_whose_library_is_missing_say_so_with_the_fix(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    porthole = Porthole(tmp_path, web=f'root = "{ROOT / "web"}"\nnovnc_dir = "{empty}"\n'
                                      f'xterm_dir = "{empty}"\nspice_html5_dir = "{empty}"')
    try:
        porthole.wait_for_log("xterm.js not found")
        # The pages stop before any socket, so nothing need listen on the target.
        for console, library, fixes in [
            ("serial", "xterm.js", ["cd web && npm ci", "sudo apt-get install node-xterm"]),
            ("novnc", "noVNC", ["sudo apt-get install novnc"]),
            ("spice-html5", "spice-html5", ["sudo apt-get install spice-html5"]),
        ]:
            minted = porthole.mint(console, free_port())
            result = browser("status", minted["url"], 500)
            assert result["http_status"] == 200, result
            assert result["state"] == "missing", result
            assert library in result["text"], result
            assert result["page"] and f"{library} is missing" in result["page"], result
            for fix in fixes:
                assert fix in result["page"], (fix, result["page"])
            assert result["opened"] == 0, result
    finally:
        assert porthole.gateway.stop() == 0, porthole.log()
