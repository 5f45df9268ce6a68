"""Which access right each management route needs, and the SAS middleware enforcing it, in-process (issue 12.18)."""

from __future__ import annotations

import asyncio
import base64

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from opendps.frontends import build
from opendps.frontends.http.app import required_right
from opendps.frontends.http.device import DEVICE_ROUTE_PREFIX
from opendps.frontends.http.hub_service import HUB_ROUTE_PREFIX
from opendps.frontends.http.openapi import build_openapi
from opendps.provisioning.access import OWNER_POLICY, OWNER_RIGHTS
from opendps.transport import sas

# every route that needs less than ServiceConfig; any other management route needs ServiceConfig
NOT_SERVICE_CONFIG = {
    ("GET", "/enrollments/{id}"): "EnrollmentRead",
    ("POST", "/enrollments/query"): "EnrollmentRead",
    ("POST", "/enrollments/{id}/attestationmechanism"): "EnrollmentRead",
    ("PUT", "/enrollments/{id}"): "EnrollmentWrite",
    ("DELETE", "/enrollments/{id}"): "EnrollmentWrite",
    ("GET", "/enrollmentGroups/{id}"): "EnrollmentRead",
    ("POST", "/enrollmentGroups/query"): "EnrollmentRead",
    ("POST", "/enrollmentGroups/{id}/attestationmechanism"): "EnrollmentRead",
    ("PUT", "/enrollmentGroups/{id}"): "EnrollmentWrite",
    ("DELETE", "/enrollmentGroups/{id}"): "EnrollmentWrite",
    ("POST", "/enrollments"): "EnrollmentWrite",  # bulk operations
    ("POST", "/enrollmentGroups"): "EnrollmentWrite",
    ("GET", "/registrations/{id}"): "RegistrationStatusRead",
    ("POST", "/registrations/{id}/query"): "RegistrationStatusRead",
    ("DELETE", "/registrations/{id}"): "RegistrationStatusWrite",
}


def _management_routes(services) -> list[tuple[str, str, str]]:
    app = build(services, service_hosts={"localhost"}).http
    return [(r.method, r.resource.canonical, r.name or "") for r in app.router.routes()
            if r.method != "HEAD" and r.resource is not None and r.resource.canonical not in ("/openapi.json", "/healthz")
            and not (r.name or "").startswith((DEVICE_ROUTE_PREFIX, HUB_ROUTE_PREFIX))]


def test_every_management_route_needs_the_right_azure_gives_it(services):
    routes = _management_routes(services)
    documented = set(build_openapi()["paths"])  # the routes as written (the others are their spellings)
    canonical = {(m, p): required_right(m, p) for m, p, _ in routes if p in documented}
    for key, right in NOT_SERVICE_CONFIG.items():
        assert canonical.pop(key) == right, key
    assert canonical and set(canonical.values()) == {"ServiceConfig"}, canonical
    for path in ("/certificates", "/linkedHubs/{name}/keys", "/accessPolicies", "/namespaces"):
        assert ("GET", path) in canonical
    # a route's other spellings (lower-cased, trailing slash) need the same right as the route
    for method, path, _ in routes:
        original = path.rstrip("/")
        assert required_right(method, path) == required_right(method, original), (method, path)
    # a bulk operation or any other new write under /enrollments is a write, never a read
    assert required_right("POST", "/enrollments") == "EnrollmentWrite"
    assert required_right("HEAD", "/enrollmentgroups/{id}/") == "EnrollmentRead"


def _token(name: str, key: str) -> str:
    return sas.generate("localhost", key, name)


def _call(services, requests: list[tuple[str, str, str, dict | None]]) -> list[tuple[int, object]]:
    """Each (method, path, token, json) against the HTTP application on a loopback socket."""
    front = build(services, service_hosts={"localhost"})

    async def run() -> list[tuple[int, object]]:
        server = TestServer(front.http, host="127.0.0.1")
        await server.start_server()
        answers = []
        try:
            async with aiohttp.ClientSession() as http:
                for method, path, token, body in requests:
                    async with http.request(method, str(server.make_url(path)), json=body,
                                            headers={"Authorization": token}) as r:
                        answers.append((r.status, await r.json() if r.content_length else {}))
        finally:
            await server.close()
        return answers

    return asyncio.run(run())


@pytest.fixture
def tokens(services) -> dict[str, str]:
    services.access_policies.ensure(OWNER_POLICY, OWNER_RIGHTS)
    out = {"owner": _token(OWNER_POLICY, services.access_policies.keys_of(OWNER_POLICY)[0])}
    for name, rights in (("reader", "EnrollmentRead"), ("status", "RegistrationStatusRead"),
                         ("config", "ServiceConfig")):
        services.access_policies.put(name, rights)
        out[name] = _token(name, services.access_policies.keys_of(name)[1])  # the secondary key works as well
    return out


def test_the_middleware_answers_401_naming_the_missing_right(services, tokens):
    enrollment = {"attestation": {"type": "symmetricKey"}}
    answers = _call(services, [
        ("PUT", "/enrollments/mw-1", tokens["owner"], enrollment),
        ("GET", "/enrollments/mw-1", tokens["reader"], None),
        ("PUT", "/enrollments/mw-1", tokens["reader"], enrollment),
        ("GET", "/certificates", tokens["reader"], None),
        ("GET", "/registrations/mw-1", tokens["reader"], None),  # EnrollmentRead implies RegistrationStatusRead
        ("DELETE", "/registrations/mw-1", tokens["status"], None),
        ("GET", "/enrollments/mw-1", tokens["status"], None),
        ("GET", "/accessPolicies", tokens["config"], None),
        ("GET", "/enrollments/mw-1", tokens["config"], None),
        ("GET", "/devices", tokens["config"], None),  # the hub service API: the owner or a hub's iothubowner only
        ("GET", "/devices", tokens["owner"], None),
        ("GET", "/certificates", _token("reader", base64.b64encode(b"k" * 32).decode()), None),
        ("GET", "/certificates", _token("nobody", base64.b64encode(b"k" * 32).decode()), None),
    ])
    statuses = [status for status, _ in answers]
    assert statuses == [201, 200, 401, 401, 404, 401, 401, 200, 401, 401, 200, 401, 401], answers
    messages = [body.get("message", "") if isinstance(body, dict) else "" for _, body in answers]
    assert "lacks the EnrollmentWrite right needed for PUT /enrollments/{id}" in messages[2]
    assert "'reader' lacks the ServiceConfig right" in messages[3]
    assert "RegistrationStatusWrite" in messages[5] and "EnrollmentRead" in messages[6]
    assert "may not use the hub service API" in messages[9]
    assert "signature does not verify" in messages[11] and "right" not in messages[11]  # nothing said unverified
    assert "'nobody' is not an access policy" in messages[12]
    assert all(body["errorCode"] == 401002 for status, body in answers if status == 401)
