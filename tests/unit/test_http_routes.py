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


def test_the_error_middleware_names_one_tracking_id_and_answers_undecodable_bodies():
    """A 500's body carries the trackingId its message and the log name (it used to carry a second, fresh one); a
    body whose Content-Encoding does not decode is a 400 with an Azure body on a closed connection, not a 500."""
    import asyncio

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from opendps.frontends.http.errors import error_middleware

    async def broken(_request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    async def reader(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    async def main() -> tuple[dict, dict, str | None]:
        app = web.Application(middlewares=[error_middleware])
        app.router.add_get("/broken", broken)
        app.router.add_put("/reader", reader)
        client = TestClient(TestServer(app))
        await client.start_server()
        try:
            failed = await (await client.get("/broken")).json()
            r = await client.put("/reader", data=b"not compressed", headers={"Content-Encoding": "gzip"})
            assert r.status == 400
            return failed, await r.json(), r.headers.get("Connection")
        finally:
            await client.close()

    failed, undecodable, connection = asyncio.run(main())
    assert failed["errorCode"] == 500000 and f"(trackingId {failed['trackingId']})" in failed["message"]
    assert undecodable["errorCode"] == 400004 and "content-encoding: gzip" in undecodable["message"]
    assert connection == "close"
