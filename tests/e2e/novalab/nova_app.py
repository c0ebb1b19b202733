"""Nova's compute API WSGI app for gunicorn (config dir from OS_NOVA_CONFIG_DIR)."""
import sys

# oslo.config would parse gunicorn's own command line: hide it.
sys.argv = ["nova-api-os-compute"]
from nova.wsgi.osapi_compute import application  # noqa: E402,F401
