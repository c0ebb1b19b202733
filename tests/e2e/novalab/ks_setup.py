"""Keystone objects for the tests: project `service`, roles, the users
`nova` (admin: Nova's keystone_authtoken user), `porthole` (only the console
role), `porthole-member` (only `member`), an application credential of
`porthole` restricted to the console role, and the compute endpoints."""
import json
import os
import sys

from keystoneauth1 import session
from keystoneauth1.identity import v3

ks, admin_pw, nova_pw, porthole_pw, role, out, nova_url = sys.argv[1:8]
s = session.Session(auth=v3.Password(auth_url=ks, username="admin", password=admin_pw, project_name="admin",
                                     user_domain_id="default", project_domain_id="default"))


def one(path, key, **q):
    r = s.get(ks + path, params=q).json()[key]
    return r[0] if r else None


def ensure(path, key, body, **q):
    return one(path, key, **q) or s.post(ks + path, json={key[:-1]: body}).json()[key[:-1]]


proj = ensure("/projects", "projects", {"name": "service", "domain_id": "default"}, name="service")
roles = {n: ensure("/roles", "roles", {"name": n}, name=n) for n in ("admin", "member", "reader", role)}
svc = ensure("/services", "services", {"type": "compute", "name": "nova"}, type="compute")
for iface in ("public", "internal", "admin"):
    s.post(ks + "/endpoints", json={"endpoint": {"service_id": svc["id"], "interface": iface,
                                                 "region_id": "RegionOne", "url": nova_url}})


def user(name, pw, rolename):
    u = s.post(ks + "/users", json={"user": {"name": name, "password": pw, "domain_id": "default",
                                            "default_project_id": proj["id"]}}).json()["user"]
    s.put(ks + "/projects/%s/users/%s/roles/%s" % (proj["id"], u["id"], roles[rolename]["id"]))
    return u


user("nova", nova_pw, "admin")
ph = user("porthole", porthole_pw, role)
user("porthole-member", porthole_pw, "member")
us = session.Session(auth=v3.Password(auth_url=ks, username="porthole", password=porthole_pw,
                                      project_name="service", user_domain_id="default",
                                      project_domain_id="default"))
ac = us.post(ks + "/users/%s/application_credentials" % ph["id"], json={"application_credential": {
    "name": "porthole-console", "roles": [{"name": role}]}}).json()["application_credential"]
with open(out, "w") as f:
    json.dump({"id": ac["id"], "secret": ac["secret"]}, f)
os.chmod(out, 0o600)
