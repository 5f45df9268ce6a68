"""The HTTPS front end's route table, without a server: every route is documented in /openapi.json."""

from __future__ import annotations

import re

from opendps.frontends import build
from opendps.frontends.http.openapi import build_openapi


def _shape(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


def test_every_route_is_in_the_openapi_document_and_nothing_else(services):
    app = build(services, service_hosts={"localhost"}).http
    canonical = {_shape(path) for path in build_openapi()["paths"]} | {"/openapi.json", "/healthz"}
    routes = {(r.method.lower(), _shape(r.resource.canonical)) for r in app.router.routes()
              if r.method != "HEAD" and r.resource is not None and _shape(r.resource.canonical) in canonical}
    documented = {(method, _shape(path)) for path, ops in build_openapi()["paths"].items() for method in ops}
    assert routes - {("get", "/openapi.json"), ("get", "/healthz")} == documented
    device_ops = [op for path, ops in build_openapi()["paths"].items() if path.startswith("/{idScope}/")
                  for op in ops.values()]
    assert len(device_ops) == 3 and all(op["security"] == [] for op in device_ops)


def test_every_route_answers_to_the_spellings_sdks_use(services):
    """Issue 12.21/22: collection names case-insensitively (lower-cased), and a trailing slash."""
    app = build(services, service_hosts={"localhost"}).http
    paths = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}
    for method, path in [("POST", "/enrollmentgroups/{id}/attestationmechanism"), ("GET", "/devices/"),
                         ("PUT", "/enrollmentgroups/{id}"), ("GET", "/linkedhubs/{name}/certificates/"),
                         ("PUT", "/{idScope}/registrations/{registrationId}/register/")]:
        assert (method, path) in paths, (method, path)
    names = {r.resource.canonical: r.name for r in app.router.routes() if r.resource is not None and r.name}
    assert names["/devices/"].startswith("hub:") and names["/{idScope}/registrations/{registrationId}/register/"] \
        .startswith("device:")  # a spelling keeps its route's access rule
