"""pytest picks this folder up; the helpers live in harness.py."""
