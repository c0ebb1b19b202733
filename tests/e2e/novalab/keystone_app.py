"""Keystone's WSGI app for gunicorn (config dir from OS_KEYSTONE_CONFIG_DIR)."""
import sys

# oslo.config would parse gunicorn's own command line: hide it.
sys.argv = [sys.argv[0]]
from keystone.wsgi.api import application  # noqa: E402,F401
