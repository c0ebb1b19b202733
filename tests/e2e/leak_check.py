"""Every token, ticket and password the end-to-end suite issues or configures,
and every log and audit file the Portholes it runs write: at the end of the
run, no secret may appear in any of those files (conftest.py checks)."""

import pathlib

SECRETS = set()
FILES = []


def remember(value):
    """A secret the suite issued or configured (short values are ignored:
    they would match by chance)."""
    if isinstance(value, str) and len(value) >= 8:
        SECRETS.add(value)


def watch(path):
    """A file Porthole writes (its log, its audit trail)."""
    FILES.append(pathlib.Path(path))


def leaks():
    """(file, secret prefix) for every secret found in a watched file."""
    found = []
    for f in FILES:
        if not f.exists():
            continue
        text = f.read_text(errors="replace")
        for s in SECRETS:
            if s in text:
                found.append((str(f), s[:12] + "..."))
    return found
