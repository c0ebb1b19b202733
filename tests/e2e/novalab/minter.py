"""Mints console tokens with Nova's own objects, one per JSON line on stdin:
{"instance", "type", "host", "port", "tls_port", "ttl", "base"} ->
{"token", "access_url"} (Nova's own access_url for access_url_base `base`).
One process for many tokens: importing Nova takes seconds."""
import json
import sys

from nova import monkey_patch

monkey_patch.patch(backend="threading")
from nova import config, context, exception, objects  # noqa: E402

confdir, logfile = sys.argv[1:3]
objects.register_all()
config.parse_args(["porthole-test-mint", "--config-dir", confdir, "--log-file", logfile], init_rpc=True)
ctx = context.get_admin_context()
cell = [c for c in objects.CellMappingList.get_all(ctx) if c.name == "cell1"][0]

for line in sys.stdin:
    req = json.loads(line)
    try:
        with context.target_cell(ctx, cell) as cctx:
            try:
                objects.Instance.get_by_uuid(cctx, req["instance"])
            except exception.InstanceNotFound:
                # Nova refuses tokens for an instance its cell database lacks.
                objects.Instance(context=cctx, uuid=req["instance"], project_id="porthole-test",
                                 user_id="porthole-test", display_name="porthole-test-vm",
                                 vm_state="active", power_state=1).create()
            kw = dict(context=cctx, console_type=req["type"], host=req["host"], port=int(req["port"]),
                      instance_uuid=req["instance"], access_url_base=req.get("base"))
            if req.get("tls_port") is not None:
                kw["tls_port"] = int(req["tls_port"])
            tok = objects.ConsoleAuthToken(**kw)
            token = tok.authorize(int(req["ttl"]))
            out = {"token": token, "access_url": tok.access_url if req.get("base") else None}
    except Exception as e:  # reported to the test, which fails with it
        out = {"error": repr(e)}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
