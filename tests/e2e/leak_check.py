"""Every token, ticket and password the end-to-end suite issues or configures,
and every log and audit file the Portholes it runs write: at the end of the
run, no secret may appear in any of those files, whole or in part (any 12
characters of one in a row), nor any part of a ticket's SHA-256, which is
what a store keys it by (conftest.py checks)."""

import hashlib
import pathlib
import re

SECRETS = set()
FILES = []
# A part of a secret this long in a log is a leak; shorter runs match by chance.
WINDOW = 12
WORD = re.compile(r"[A-Za-z0-9+/=_.~-]{%d,}" % WINDOW)


def remember(value):
    """A secret the suite issued or configured (values shorter than 8
    characters are ignored: they would match by chance)."""
    if isinstance(value, str) and len(value) >= 8:
        SECRETS.add(value)


def remember_ticket(value):
    """A ticket: itself, and its SHA-256 (the store's name for it)."""
    remember(value)
    if isinstance(value, str):
        SECRETS.add(hashlib.sha256(value.encode()).hexdigest())


def watch(path):
    """A file Porthole writes (its log, its audit trail)."""
    FILES.append(pathlib.Path(path))


def _windows(value):
    if len(value) < WINDOW:
        return {value}
    return {value[i:i + WINDOW] for i in range(len(value) - WINDOW + 1)}


def leaks():
    """(file, secret prefix) for every secret found, whole or in part, in a
    watched file."""
    part_of = {}
    for s in SECRETS:
        for w in _windows(s):
            part_of.setdefault(w, s)
    short = [s for s in SECRETS if len(s) < WINDOW]
    found = []
    for f in FILES:
        if not f.exists():
            continue
        text = f.read_text(errors="replace")
        hits = {s for s in short if s in text}
        for word in WORD.findall(text):
            for i in range(len(word) - WINDOW + 1):
                s = part_of.get(word[i:i + WINDOW])
                if s is not None:
                    hits.add(s)
        found.extend((str(f), s[:4] + "...") for s in sorted(hits))
    return found
