"""The HTTPS front end's route table, without a server: every route is documented in /openapi.json."""

from __future__ import annotations

import re

from opendps.frontends import build
from opendps.frontends.http.openapi import build_openapi


def _shape(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


def test_every_route_is_in_the_openapi_document_and_nothing_else(services):
    app = build(services, service_hosts={"localhost"}, policy_keys=lambda name: ("", "")).http
    routes = {(r.method.lower(), _shape(r.resource.canonical)) for r in app.router.routes()
              if r.method != "HEAD" and r.resource is not None}
    documented = {(method, _shape(path)) for path, ops in build_openapi()["paths"].items() for method in ops}
    assert routes - {("get", "/openapi.json"), ("get", "/healthz")} == documented
    device_ops = [op for path, ops in build_openapi()["paths"].items() if path.startswith("/{idScope}/")
                  for op in ops.values()]
    assert len(device_ops) == 3 and all(op["security"] == [] for op in device_ops)
