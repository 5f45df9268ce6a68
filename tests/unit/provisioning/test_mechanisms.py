"""The attestation mechanism registry: adding a mechanism is one module and one line (issue 11), and the
generic flow carries what TPM will need — its own enrollment member, body evidence, a transport
restriction and a challenge round trip — through the domain and the HTTPS front end unchanged."""

from __future__ import annotations

import asyncio
import base64
import secrets

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from tests.conftest import installation
from tests.unit.conftest import creds, register
from tests.unit.provisioning import demo_mechanism as demo

from opendps.errors import InvalidInput
from opendps.frontends import build
from opendps.provisioning import attestation
from opendps.provisioning.attestation import MQTT, AttestationFailed, Challenge

DEMO_MODULE = demo.__name__


@pytest.fixture
def with_demo(monkeypatch, store, keys):
    """The one line: the demo module added to the registry (then the services are wired)."""
    monkeypatch.setattr(attestation, "MODULES", (*attestation.MODULES, DEMO_MODULE))
    return installation(store, keys, "0ne00DEMO01")


def _enroll(services, rid: str) -> str:
    secret = base64.b64encode(secrets.token_bytes(32)).decode()
    services.enrollments.put("individual", rid, {"attestation": {"type": demo.NAME, demo.NAME: {"secret": secret}}})
    return secret


def test_the_registry_lists_the_built_in_mechanisms_in_matching_order():
    assert list(attestation.mechanisms()) == ["tpm", "symmetricKey", "x509"]


def test_an_unregistered_type_is_refused_by_name(services):
    with pytest.raises(InvalidInput, match="attestation.type must be one of tpm, symmetricKey, x509 .got 'demoChallenge'"):
        services.enrollments.put("individual", "d-1", {"attestation": {"type": demo.NAME, demo.NAME: {"secret": "x"}}})


def test_a_registered_mechanism_validates_its_enrollments(with_demo):
    with pytest.raises(InvalidInput, match=f"attestation.{demo.NAME}.secret"):
        with_demo.enrollments.put("individual", "d-1", {"attestation": {"type": demo.NAME, demo.NAME: {}}})
    with pytest.raises(InvalidInput, match="individual enrollments only"):
        with_demo.enrollments.put("group", "g-1", {"attestation": {"type": demo.NAME, demo.NAME: {"secret": "x"}}})
    _enroll(with_demo, "d-1")
    view = with_demo.enrollments.get("individual", "d-1")
    assert view.attestation_type == demo.NAME and view.document["attestation"] == {"type": demo.NAME, demo.NAME: {}}


def test_challenge_round_trip_in_the_domain(with_demo):
    secret = _enroll(with_demo, "d-2")
    first = with_demo.provisioning.register(creds("d-2", scope="0ne00DEMO01", evidence={"demo": {}}))
    assert isinstance(first, Challenge) and first.status == 401
    assert first.body == {"challenge": demo.challenge_for(secret, "d-2")}
    with pytest.raises(AttestationFailed, match="does not verify"):
        with_demo.provisioning.register(creds("d-2", scope="0ne00DEMO01", evidence={"demo": {"response": "bad"}}))
    answer = {"demo": {"response": demo.response_to(secret, first.body["challenge"])}}
    result = register(with_demo, creds("d-2", scope="0ne00DEMO01", evidence=answer))
    state = result["registrationState"]
    assert result["status"] == "assigned" and state["deviceId"] == "d-2" and demo.NAME in state
    identity, keys = with_demo.hubs.identity(with_demo.hubs.by_host(state["assignedHub"]), "d-2")
    assert identity.auth_type == "sas" and keys == (secret, secret)


def test_a_mechanism_refuses_the_transports_it_does_not_name(with_demo):
    _enroll(with_demo, "d-3")
    with pytest.raises(AttestationFailed, match="demoChallenge attestation is not supported over MQTT; use https"):
        with_demo.provisioning.register(creds("d-3", scope="0ne00DEMO01", evidence={"demo": {}}, transport=MQTT))


def test_the_https_front_end_carries_evidence_and_challenges_unchanged(with_demo):
    """The real device route on a loopback socket: body members reach the mechanism, a Challenge is a 401 body."""
    secret = _enroll(with_demo, "d-4")
    front = build(with_demo, service_hosts={"localhost"})

    async def conversation() -> tuple[int, dict, int, dict]:
        server = TestServer(front.http, host="127.0.0.1")
        await server.start_server()
        try:
            url = str(server.make_url("/0ne00DEMO01/registrations/d-4/register"))
            async with aiohttp.ClientSession() as http:
                async with http.put(url, json={"registrationId": "d-4", "demo": {}}) as r:
                    first_status, first = r.status, await r.json()
                answer = demo.response_to(secret, first["challenge"])
                async with http.put(url, json={"registrationId": "d-4", "demo": {"response": answer}}) as r:
                    return first_status, first, r.status, await r.json()
        finally:
            await server.close()

    first_status, first, second_status, second = asyncio.run(conversation())
    assert (first_status, first) == (401, {"challenge": demo.challenge_for(secret, "d-4")})
    # answered at once (issue 13), as 202: the only status the C# SDK accepts for register
    assert second_status == 202 and second["status"] == "assigned", second
