"""azure-iot-device 2.14.0's ProvisioningDeviceClient against opendps (DPS over MQTT on 8883 / WebSockets on 443).

Each case checks the SDK's result and the server's side (registration state, hub identity) through the
service REST API.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from http.server import ThreadingHTTPServer

import pytest
from cryptography.hazmat.primitives import serialization
from tests.compat.azure_sdk import run_sdk
from tests.test_device_api import (
    _Webhook,
    assert_nothing_left,
    make_ca,
    make_leaf,
    put,
    svc,
    sym_key,
    upload_verified,
    write_identity,
)

pytestmark = pytest.mark.timeout(300, func_only=True)


def provision(python, srv, rid: str, **auth) -> dict:
    return run_sdk(python, "provision", {"rid": rid, "scope": srv.id_scope, "ca": srv.ca_pem, **auth})


def assert_assigned(result: dict, rid: str) -> None:
    assert result["ok"], result
    assert (result["status"], result["assigned_hub"], result["device_id"]) == ("assigned", "localhost", rid), result


def server_state(srv, rid: str) -> tuple[dict, dict]:
    """(registration state, hub twin) as the service API shows them."""
    with svc(srv) as c:
        reg = c.get(f"/registrations/{rid}")
        assert reg.status_code == 200, reg.text
        dev = c.get(f"/linkedHubs/default/devices/{rid}")
        assert dev.status_code == 200, dev.text
        return reg.json(), dev.json()


@pytest.mark.parametrize("websockets", [False, True], ids=["mqtt", "websockets"])
def test_symmetric_key_individual_enrollment(azure_python, compat_server, websockets):
    if websockets:
        compat_server.require_websockets()
    rid = f"az-sym-{'ws' if websockets else 'mqtt'}"
    with svc(compat_server) as c:
        key = sym_key(c, f"/enrollments/{rid}", {"attestation": {"type": "symmetricKey"},
                                                 "initialTwin": {"tags": {"sdk": "azure"}}})
    result = provision(azure_python, compat_server, rid, key=key, payload={"model": "m1"}, websockets=websockets)
    assert_assigned(result, rid)
    assert result["sub_status"] == "initialAssignment" and json.loads(result["response_payload"]) is None
    reg, dev = server_state(compat_server, rid)
    assert reg["status"] == "assigned" and reg["deviceId"] == rid and reg["etag"] == result["etag"]
    assert dev["authenticationType"] == "sas" and dev["tags"] == {"sdk": "azure"}


def test_symmetric_key_group_with_derived_key(azure_python, compat_server):
    rid = "az-grp-dev-1"
    with svc(compat_server) as c:
        group_key = sym_key(c, "/enrollmentGroups/az-sym-group", {"attestation": {"type": "symmetricKey"}})
    derived = base64.b64encode(hmac.new(base64.b64decode(group_key), rid.encode(), hashlib.sha256).digest()).decode()
    result = provision(azure_python, compat_server, rid, key=derived)
    assert_assigned(result, rid)
    reg, _ = server_state(compat_server, rid)
    assert reg["status"] == "assigned" and reg["etag"] == result["etag"]
    with svc(compat_server) as c:
        assert [r["registrationId"] for r in c.post("/registrations/az-sym-group/query").json()] == [rid]
    # the group key itself is not the device's key: the credential is refused at CONNECT (CONNACK 5), which the
    # SDK reports as a CredentialError
    refused = provision(azure_python, compat_server, "az-grp-dev-2", key=group_key)
    assert not refused["ok"] and refused["error_type"] == "azure.iot.device.exceptions.CredentialError", refused
    assert_nothing_left(compat_server, "az-grp-dev-2")


@pytest.mark.parametrize("kind", ["self-signed", "ca-signed"])
def test_x509_individual_enrollment(azure_python, compat_server, tmp_path, kind):
    rid = f"az-x509-{kind}"
    leaf, key = make_leaf(rid, None if kind == "self-signed" else make_ca(f"{rid}-unuploaded-ca"))
    cert_file, key_file = write_identity(tmp_path, rid, [leaf], key)
    pem = leaf.public_bytes(serialization.Encoding.PEM).decode()
    with svc(compat_server) as c:
        put(c, f"/enrollments/{rid}", {"attestation": {"type": "x509", "x509": {"clientCertificates": {
            "primary": {"certificate": pem}}}}})
    result = provision(azure_python, compat_server, rid, cert=str(cert_file), keyfile=str(key_file))
    assert_assigned(result, rid)
    reg, dev = server_state(compat_server, rid)
    assert reg["status"] == "assigned" and reg["etag"] == result["etag"]
    assert dev["authenticationType"] == "selfSigned"  # pinned to the enrolled certificate's thumbprint


def test_x509_group_on_verified_intermediate_device_sends_chain(azure_python, compat_server, tmp_path):
    root = make_ca("az-x509-root")
    intermediate = make_ca("az-x509-intermediate", root)
    with svc(compat_server) as c:
        upload_verified(compat_server, c, "az-x509-intermediate", intermediate)
        put(c, "/enrollmentGroups/az-x509-group", {"attestation": {"type": "x509", "x509": {
            "caReferences": {"primary": "az-x509-intermediate"}}}})
    rid = "az-x509-grp-dev"
    leaf, key = make_leaf(rid, intermediate)
    cert_file, key_file = write_identity(tmp_path, rid, [leaf, intermediate.cert], key)
    result = provision(azure_python, compat_server, rid, cert=str(cert_file), keyfile=str(key_file))
    assert_assigned(result, rid)
    reg, dev = server_state(compat_server, rid)
    assert reg["etag"] == result["etag"] and dev["authenticationType"] == "certificateAuthority"
    with svc(compat_server) as c:
        assert [r["registrationId"] for r in c.post("/registrations/az-x509-group/query").json()] == [rid]
    # a device of another CA is refused at CONNECT and the SDK says so
    stranger, skey = make_leaf("az-x509-stranger", make_ca("az-x509-other-root"))
    cert_file, key_file = write_identity(tmp_path, "stranger", [stranger], skey)
    refused = provision(azure_python, compat_server, "az-x509-stranger", cert=str(cert_file), keyfile=str(key_file))
    assert not refused["ok"] and refused["error_type"] == "azure.iot.device.exceptions.CredentialError", refused
    assert_nothing_left(compat_server, "az-x509-stranger")


def test_custom_allocation_webhook_payload_round_trip(azure_python, compat_server):
    hook = ThreadingHTTPServer(("127.0.0.1", 0), _Webhook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{hook.server_address[1]}/allocate"
        with svc(compat_server) as c:
            custom = {"webhookUrl": url, "apiVersion": "2021-10-01"}
            key = sym_key(c, "/enrollments/az-custom", {"attestation": {"type": "symmetricKey"}, "allocationPolicy": "custom",
                                                       "customAllocationDefinition": custom})
        _Webhook.requests.clear()
        _Webhook.answers[:] = [(200, {"iotHubHostName": "localhost", "payload": {"site": "b7", "n": [1, 2]},
                                      "initialTwin": {"tags": {"from": "webhook"}}})]
        result = provision(azure_python, compat_server, "az-custom", key=key, payload={"model": "x1", "fw": 3})
    finally:
        hook.shutdown()
    assert_assigned(result, "az-custom")
    assert json.loads(result["response_payload"]) == {"site": "b7", "n": [1, 2]}
    [sent] = _Webhook.requests
    assert sent["deviceRuntimeContext"]["registrationId"] == "az-custom"
    assert sent["deviceRuntimeContext"]["payload"] == {"model": "x1", "fw": 3}
    reg, dev = server_state(compat_server, "az-custom")
    assert reg["payload"] == {"site": "b7", "n": [1, 2]} and dev["tags"] == {"from": "webhook"}


def test_disabled_enrollment_gives_the_sdk_error(azure_python, compat_server):
    with svc(compat_server) as c:
        key = sym_key(c, "/enrollments/az-disabled", {"attestation": {"type": "symmetricKey"},
                                                     "provisioningStatus": "disabled"})
    result = provision(azure_python, compat_server, "az-disabled", key=key)
    assert not result["ok"], result
    # the SDK wraps the service's 403 as ClientError("Unexpected failure") caused by a ServiceError naming the status
    assert result["error_type"] == "azure.iot.device.exceptions.ClientError", result
    assert result["cause_type"] == "azure.iot.device.exceptions.ServiceError", result
    assert "403" in result["cause"], result
    assert_nothing_left(compat_server, "az-disabled")


def test_reprovisioning_keeps_one_identity(azure_python, compat_server):
    rid = "az-reprov"
    with svc(compat_server) as c:
        key = sym_key(c, f"/enrollments/{rid}", {"attestation": {"type": "symmetricKey"},
                                                 "reprovisionPolicy": {"updateHubAssignment": True, "migrateDeviceData": False},
                                                 "initialTwin": {"properties": {"desired": {"mode": "initial"}}}})
    first = provision(azure_python, compat_server, rid, key=key)
    assert_assigned(first, rid)
    with svc(compat_server) as c:
        r = c.patch(f"/twins/{rid}", json={"properties": {"desired": {"mode": "changed"}}})
        assert r.status_code == 200, r.text
    second = provision(azure_python, compat_server, rid, key=key)
    assert_assigned(second, rid)
    assert second["operation_id"] != first["operation_id"]
    reg, dev = server_state(compat_server, rid)
    assert second["sub_status"] == reg["substatus"] == "deviceDataReset", (second, reg)
    assert reg["etag"] == second["etag"] != first["etag"]
    assert dev["properties"]["desired"]["mode"] == "initial"  # reset to the initial twin, no migration
    with svc(compat_server) as c:
        assert [d["deviceId"] for d in c.get("/linkedHubs/default/devices").json()["value"] if d["deviceId"] == rid] == [rid]
