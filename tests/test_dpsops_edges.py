"""DPS device requests after the register: operation polls and status lookups, in-process and over MQTT.

- An operation belongs to its registration state: when the state is forgotten (service delete, or the delete of the
  individual enrollment it came through) its operations go too, so a poll cannot answer a state that no longer
  exists — to the old device, or to whoever holds the credential of an enrollment made again under that id.
- An MQTT poll must name its operation exactly once: missing, empty or repeated ``operationId`` is a 400 saying so.
"""

from __future__ import annotations

import base64
import json

import pytest
from tests.test_device_api import device_sas as http_device_sas
from tests.test_device_api import svc, sym_key
from tests.test_mqtt_hub import Client, dps_username
from tests.unit.conftest import creds, symmetric_group
from tests.x509_helpers import p384_csr

from opendps.errors import NotFound
from opendps.transport.sas import derive_device_key

pytestmark = pytest.mark.timeout(300, func_only=True)
PREVIEW = "2025-07-01-preview"
POLL = "$dps/registrations/GET/iotdps-get-operationstatus/"


def _csr(rid: str) -> str:
    return base64.b64encode(p384_csr(rid)).decode()


# ---------------------------------------------------------------- in-process (both stores)
def test_a_deleted_registration_state_takes_its_operations_with_it(services):
    services.registry.create_namespace("opsns", "opspol", validity_days=3)
    group = symmetric_group(services, "ops-group", credentialPolicyName="opspol")
    rid = "ops-dev-1"
    device = creds(rid, key=derive_device_key(group, rid))
    accepted = services.provisioning.register(device, csr=_csr(rid), api_version=PREVIEW)
    assert services.provisioning.operation(device, accepted.operation_id)["status"] == "assigned"
    services.provisioning.delete_registration(rid)
    with pytest.raises(NotFound) as info:  # was 200 with the forgotten hub, device and certificate chain
        services.provisioning.operation(device, accepted.operation_id)
    assert info.value.error_code == 404203
    # registered again: the new operation answers; the old one stays gone
    again = services.provisioning.register(device)
    assert services.provisioning.operation(device, again.operation_id)["registrationState"]["substatus"] == \
        "initialAssignment"


def test_an_enrollment_made_again_does_not_read_the_operations_of_the_deleted_one(services):
    rid = "ops-dev-2"
    view, _ = services.enrollments.put("individual", rid, {"attestation": {"type": "symmetricKey"}})
    old = creds(rid, key=view.keys[0])
    accepted = services.provisioning.register(old)
    other = services.provisioning.register(creds("ops-dev-3", key=services.enrollments.put(
        "individual", "ops-dev-3", {"attestation": {"type": "symmetricKey"}})[0].keys[0]))
    services.enrollments.delete("individual", rid)
    view2, _ = services.enrollments.put("individual", rid, {"attestation": {"type": "symmetricKey"}})
    new = creds(rid, key=view2.keys[0])
    with pytest.raises(NotFound):  # was 200: the previous holder's registrationState
        services.provisioning.operation(new, accepted.operation_id)
    with pytest.raises(NotFound):
        services.provisioning.status(new)
    # another device's operations are untouched by the delete
    assert services.provisioning.operation(creds("ops-dev-3", key=services.enrollments.get(
        "individual", "ops-dev-3").keys[0]), other.operation_id)["status"] == "assigned"


# ---------------------------------------------------------------- over MQTT (a real server)
@pytest.fixture(scope="module", params=["sqlite"])
def server(request, tmp_path_factory):
    from tests.conftest import _run_server, database
    tmp_path = tmp_path_factory.mktemp("dpsops")
    with database(request.param, tmp_path) as db_url:
        yield from _run_server(db_url, tmp_path)


def _device(server, rid: str) -> Client:
    with svc(server) as c:
        key = sym_key(c, f"/enrollments/{rid}", {"attestation": {"type": "symmetricKey"}})
    client = Client(server, rid, dps_username(server, rid), password=http_device_sas(server.id_scope, rid, key))
    assert client.rc == 0
    client.subscribe("$dps/registrations/res/#")
    return client


def _ask(client: Client, topic: str, payload: bytes = b"{}") -> tuple[str, dict]:
    client.publish(topic, payload)
    answer, body = client.expect("$dps/registrations/res/")
    return answer, json.loads(body)


def test_an_mqtt_poll_names_its_operation_exactly_once(server):
    a, b = _device(server, "ops-mqtt-a"), _device(server, "ops-mqtt-b")
    try:
        topic, body = _ask(a, "$dps/registrations/PUT/iotdps-register/?$rid=1")
        own = body["operationId"]
        _, body = _ask(b, "$dps/registrations/PUT/iotdps-register/?$rid=1")
        theirs = body["operationId"]
        for rid, query in (("2", ""), ("3", "&operationId="), ("4", f"&operationId={theirs}&operationId={own}"),
                           ("5", f"&operationId={own}&operationId={own}")):
            topic, body = _ask(a, f"{POLL}?$rid={rid}{query}", b" ")
            assert topic == f"$dps/registrations/res/400/?$rid={rid}", (query, topic, body)
            assert body["errorCode"] == 400004 and "operationId" in body["message"], body
        topic, body = _ask(a, f"{POLL}?$rid=6&operationId={theirs}", b" ")  # another device's: not found
        assert topic == "$dps/registrations/res/404/?$rid=6" and "registrationState" not in body
        topic, body = _ask(a, f"{POLL}?$rid=7&operationId={own}", b" ")
        assert topic == "$dps/registrations/res/200/?$rid=7" and body["operationId"] == own
    finally:
        a.close()
        b.close()
