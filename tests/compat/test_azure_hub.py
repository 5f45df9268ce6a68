"""azure-iot-device 2.14.0's IoTHubDeviceClient and azure-iot-hub's IoTHubRegistryManager against opendps.

Devices are provisioned first (with the SDK, or — for an operational certificate, which needs a CSR the
Python SDK cannot send — over raw HTTPS as tests/test_device_api.py does), then exercise the hub through
the SDK while the test drives and checks the service side (``/events``, ``/twins``, methods, C2D).
"""

from __future__ import annotations

import base64
import json
import secrets
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tests.compat.azure_sdk import run_sdk, start_sdk
from tests.test_device_api import csr_b64, device, device_sas, namespace, register, svc, sym_key
from tests.test_mqtt_hub import events, pending_c2d

pytestmark = pytest.mark.timeout(300, func_only=True)


def provision_sas(python, srv, rid: str, websockets: bool = False) -> str:
    """An individual symmetric-key enrollment provisioned with the SDK; returns the device's key."""
    with svc(srv) as c:
        key = sym_key(c, f"/enrollments/{rid}", {"attestation": {"type": "symmetricKey"},
                                                 "initialTwin": {"properties": {"desired": {"interval": 60}}}})
    result = run_sdk(python, "provision", {"rid": rid, "scope": srv.id_scope, "ca": srv.ca_pem, "key": key,
                                           "websockets": websockets})
    assert result["ok"] and result["assigned_hub"] == "localhost", result
    return key


def exercise(python, srv, device_id: str, **auth) -> None:
    """Telemetry with properties, twin get/reported/desired, a direct method and a C2D message through the SDK."""
    sdk = start_sdk(python, "device", {
        "hostname": "localhost", "device_id": device_id, "ca": srv.ca_pem, **auth,
        "message": {"data": json.dumps({"temperature": 21.5}), "message_id": f"{device_id}-m1", "correlation_id": "corr-7",
                    "content_type": "application/json", "content_encoding": "utf-8",
                    "properties": {"line": "a b", "alert": "x&y=z"}},
        "reported": {"firmware": "1.2", "nested": {"ok": True}},
        "expect": ["desired", "desired", "method", "c2d"]})
    twin = sdk.next("twin")
    assert "twin" in twin, (twin, sdk.seen)
    assert twin["twin"]["desired"]["interval"] == 60 and twin["twin"]["desired"]["$version"] >= 1, twin
    assert twin["twin"]["reported"] == {"$version": 1}, twin
    after = sdk.next("reported")
    assert "twin" in after, (after, sdk.seen)
    assert after["twin"]["reported"]["firmware"] == "1.2" and after["twin"]["reported"]["$version"] == 2, after
    assert sdk.next("ready").get("event") == "ready", sdk.seen
    # ensure_desired_properties (on by default): the SDK reads the twin when it subscribes and hands the desired
    # properties to the patch handler once
    got = sdk.next("desired")
    assert got.get("patch") == {"interval": 60, "$version": 1}, (got, sdk.seen)

    # telemetry: body and every property as the SDK set them, seen by a consumer
    [event] = events(srv, device_id, 1)
    assert event["event"]["payload"] == {"temperature": 21.5}
    assert event["event"]["properties"]["application"] == {"line": "a b", "alert": "x&y=z"}
    system = event["event"]["properties"]["system"]
    assert {k: system.get(k) for k in ("message-id", "correlation-id", "content-type", "content-encoding",
                                       "iothub-connection-device-id")} == {
        "message-id": f"{device_id}-m1", "correlation-id": "corr-7", "content-type": "application/json",
        "content-encoding": "utf-8", "iothub-connection-device-id": device_id}
    with svc(srv) as c:
        twin = c.get(f"/twins/{device_id}").json()
        assert twin["properties"]["reported"]["firmware"] == "1.2" and twin["properties"]["reported"]["nested"] == {"ok": True}
        # desired patch pushed to the SDK's handler
        r = c.patch(f"/twins/{device_id}", json={"properties": {"desired": {"interval": 5}}})
        assert r.status_code == 200, r.text
        version = r.json()["properties"]["desired"]["$version"]
        got = sdk.next("desired")
        assert got.get("patch") == {"interval": 5, "$version": version}, (got, sdk.seen)
        # direct method answered by the SDK's send_method_response
        r = c.post(f"/twins/{device_id}/methods", json={"methodName": "reboot", "payload": {"delay": 5},
                                                        "responseTimeoutInSeconds": 30})
        assert r.status_code == 200, r.text
        assert r.json() == {"status": 200, "payload": {"method": "reboot", "got": {"delay": 5}}}
        got = sdk.next("method")
        assert (got.get("name"), got.get("payload")) == ("reboot", {"delay": 5}), (got, sdk.seen)
        # C2D with system and application properties
        r = c.post(f"/devices/{device_id}/messages/deviceBound", content=b"hello device",
                   headers={"iothub-messageid": "c2d-1", "iothub-correlationid": "corr-c2d", "iothub-ack": "full",
                            "Content-Type": "text/plain", "Content-Encoding": "utf-8", "iothub-app-color": "blue green"})
        assert r.status_code == 202, r.text
    got = sdk.next("c2d")
    assert {k: got.get(k) for k in ("data", "message_id", "correlation_id", "content_type", "content_encoding", "ack",
                                    "custom_properties")} == {
        "data": "hello device", "message_id": "c2d-1", "correlation_id": "corr-c2d", "content_type": "text/plain",
        "content_encoding": "utf-8", "ack": "full", "custom_properties": {"color": "blue green"}}, (got, sdk.seen)
    result = sdk.result()
    assert result.get("ok"), (result, sdk.seen)


@pytest.mark.parametrize("websockets", [False, True], ids=["mqtt", "websockets"])
def test_sas_device_uses_the_hub(azure_python, compat_server, websockets):
    if websockets:
        compat_server.require_websockets()
    device_id = f"az-hub-sas-{'ws' if websockets else 'mqtt'}"
    key = provision_sas(azure_python, compat_server, device_id, websockets=websockets)
    exercise(azure_python, compat_server, device_id, key=key, websockets=websockets)


@pytest.mark.parametrize("websockets", [False, True], ids=["mqtt", "websockets"])
def test_x509_device_with_the_operational_certificate_of_the_csr_flow(azure_python, compat_server, tmp_path, websockets):
    if websockets:
        compat_server.require_websockets()
    suffix = "ws" if websockets else "mqtt"
    rid = f"az-hub-x509-{suffix}"
    with svc(compat_server) as c:
        namespace(c, f"az-ns-{suffix}", f"az-policy-{suffix}")
        key = sym_key(c, f"/enrollments/{rid}", {"attestation": {"type": "symmetricKey"},
                                                 "credentialPolicyName": f"az-policy-{suffix}",
                                                 "initialTwin": {"properties": {"desired": {"interval": 60}}}})
    # the Azure Python SDK cannot send a CSR: provision over raw HTTPS (as the C SDK's preview branch would)
    with device(compat_server) as d:
        _, status = register(compat_server, d, rid, headers={"Authorization": device_sas(compat_server.id_scope, rid, key)},
                             body={"registrationId": rid, "csr": csr_b64(tmp_path, rid)})
    assert status["status"] == "assigned", status
    chain = [x509.load_der_x509_certificate(base64.b64decode(d)) for d in status["registrationState"]["issuedCertificateChain"]]
    chain_file = tmp_path / f"{rid}-chain.pem"
    chain_file.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain[:2]))  # leaf + issuing CA
    with svc(compat_server) as c:
        assert c.get(f"/linkedHubs/default/devices/{rid}").json()["authenticationType"] == "certificateAuthority"
    exercise(azure_python, compat_server, rid, cert=str(chain_file), keyfile=str(tmp_path / f"{rid}-op.key"),
             websockets=websockets)


def test_registry_manager_devices_twins_and_methods(azure_python, compat_server):
    """IoTHubRegistryManager (REST through msrest, trusting the server CA via REQUESTS_CA_BUNDLE)."""
    cs, ca_file = compat_server.hub_connection_string, str(compat_server.ca_file)
    primary, secondary = (base64.b64encode(secrets.token_bytes(32)).decode() for _ in range(2))
    out = run_sdk(azure_python, "registry", {"connection_string": cs, "ca_file": ca_file, "calls": [
        ["create_device_with_sas", {"device_id": "az-rm-dev", "primary_key": primary, "secondary_key": secondary,
                                    "status": "enabled"}],
        ["get_device", {"device_id": "az-rm-dev"}],
        ["update_device_with_sas", {"device_id": "az-rm-dev", "etag": "*", "primary_key": secondary,
                                    "secondary_key": primary, "status": "disabled"}],
        ["get_twin", {"device_id": "az-rm-dev"}],
        ["update_twin", {"device_id": "az-rm-dev", "twin": {"tags": {"site": "b7"}, "desired": {"interval": 9}}}],
    ]})
    assert out["ok"], out
    created, fetched, updated, twin, patched = (r["value"] for r in out["results"])
    assert created["device_id"] == "az-rm-dev" and created["status"] == "enabled"
    assert created["authentication"]["symmetric_key"] == {"primary_key": primary, "secondary_key": secondary}
    assert fetched["etag"] == created["etag"] and fetched["authentication"]["type"] == "sas"
    assert updated["status"] == "disabled" and updated["authentication"]["symmetric_key"]["primary_key"] == secondary
    assert twin["device_id"] == "az-rm-dev" and twin["status"] == "disabled"
    assert patched["tags"] == {"site": "b7"} and patched["properties"]["desired"]["interval"] == 9
    with svc(compat_server) as c:
        dev = c.get("/devices/az-rm-dev", params={"hub": "default"}).json()
        assert dev["status"] == "disabled" and dev["authentication"]["symmetricKey"]["primaryKey"] == secondary
        t = c.get("/twins/az-rm-dev", params={"hub": "default"}).json()
        assert t["tags"] == {"site": "b7"} and t["properties"]["desired"]["interval"] == 9
    out = run_sdk(azure_python, "registry", {"connection_string": cs, "ca_file": ca_file, "calls": [
        ["delete_device", {"device_id": "az-rm-dev"}], ["get_device", {"device_id": "az-rm-dev"}]]})
    deleted, missing = out["results"]
    assert deleted["ok"] and not missing["ok"] and missing["status_code"] == 404, out
    with svc(compat_server) as c:
        assert c.get("/devices/az-rm-dev", params={"hub": "default"}).status_code == 404

    # a direct method on a device connected with the device SDK, invoked with the registry manager
    key = provision_sas(azure_python, compat_server, "az-rm-method")
    sdk = start_sdk(azure_python, "device", {"hostname": "localhost", "device_id": "az-rm-method", "ca": compat_server.ca_pem,
                                             "key": key, "expect": ["method"]})
    # invoked while the device SDK may still be connecting and subscribing: connect_timeout_in_seconds waits for it,
    # as IoT Hub does; a device that does not exist is DeviceNotFound (404001) at once
    out = run_sdk(azure_python, "registry", {"connection_string": cs, "ca_file": ca_file, "calls": [
        ["invoke_device_method", {"device_id": "az-rm-method", "method": {"name": "blink", "payload": {"times": 3},
                                                                         "connect_timeout": 60}}],
        ["invoke_device_method", {"device_id": "az-rm-nobody", "method": {"name": "blink", "connect_timeout": 30}}]]})
    assert sdk.next("ready").get("event") == "ready", sdk.seen
    assert out["results"][0]["value"] == {"status": 200, "payload": {"method": "blink", "got": {"times": 3}}}, out
    missing = out["results"][1]
    assert not missing["ok"] and missing["status_code"] == 404 and "404001" in missing["body"], out
    got = sdk.next("method")
    assert (got.get("name"), got.get("payload")) == ("blink", {"times": 3}), sdk.seen
    assert sdk.result().get("ok"), sdk.seen


def test_registry_manager_sends_c2d_over_amqp(azure_python, compat_server):
    """IoTHubRegistryManager.send_c2d_message (uamqp: TLS to 5671, SASL ANONYMOUS, CBS put-token, a link to
    /messages/devicebound) reaches a device connected with the device SDK, properties and content type intact."""
    compat_server.require_amqp()
    cs, ca_file = compat_server.hub_connection_string, str(compat_server.ca_file)
    key = provision_sas(azure_python, compat_server, "az-rm-c2d")
    sdk = start_sdk(azure_python, "device", {"hostname": "localhost", "device_id": "az-rm-c2d", "ca": compat_server.ca_pem,
                                             "key": key, "expect": ["c2d"]})
    assert sdk.next("ready").get("event") == "ready", sdk.seen
    out = run_sdk(azure_python, "registry", {"connection_string": cs, "ca_file": ca_file, "calls": [
        ["send_c2d_message", {"device_id": "az-rm-c2d", "message": "switch on", "properties": {
            "contentType": "text/plain", "contentEncoding": "utf-8", "messageId": "az-c2d-1", "correlationId": "az-corr",
            "color": "blue green", "alert": "x&y=z"}}],
        ["send_c2d_message", {"device_id": "az-rm-nobody", "message": "lost"}]]})
    sent, unknown = out["results"]
    assert sent["ok"], out
    assert not unknown["ok"] and "C2D message send failure" in unknown["error"], out  # rejected: no such device
    got = sdk.next("c2d")
    assert {k: got.get(k) for k in ("data", "message_id", "correlation_id", "content_type", "content_encoding",
                                    "custom_properties")} == {
        "data": "switch on", "message_id": "az-c2d-1", "correlation_id": "az-corr", "content_type": "text/plain",
        "content_encoding": "utf-8", "custom_properties": {"color": "blue green", "alert": "x&y=z"}}, (got, sdk.seen)
    assert sdk.result().get("ok"), sdk.seen
    deadline = time.time() + 10
    while pending_c2d(compat_server) and time.time() < deadline:  # the device's PUBACK deletes it
        time.sleep(0.1)
    assert pending_c2d(compat_server) == 0


def test_sas_renewal_keeps_desired_patches_methods_and_c2d(azure_python, compat_server):
    """azure-iot-device renews its hub SAS token 120 s before it expires by reconnecting (clean session 0, no new
    SUBSCRIBE) with the new token. With sastoken_ttl=125 (the SDK has no minimum; below 120 s it would renew in a
    loop) that is 5 s after connecting, then every 5 s: desired patches, methods and C2D must reach it across each
    renewal, as IoT Hub keeps the session's subscriptions (the Node SDK's renewal lost them before they were kept)."""
    device_id = "az-hub-sas-renewal"
    key = provision_sas(azure_python, compat_server, device_id)
    sdk = start_sdk(azure_python, "device", {
        "hostname": "localhost", "device_id": device_id, "ca": compat_server.ca_pem, "key": key, "sastoken_ttl": 125,
        "expect": ["desired", "desired", "method", "c2d", "desired"], "timeout": 120})
    try:
        assert sdk.next("ready").get("event") == "ready", sdk.seen
        assert sdk.next("desired").get("patch") == {"interval": 60, "$version": 1}, sdk.seen

        def renewed() -> float:
            """Wait for a reconnect (a disconnect, then a connect): its time."""
            while sdk.next("connection", timeout=30).get("connected", True):
                pass
            back = sdk.next("connection", timeout=30)
            assert back.get("connected") is True, sdk.seen
            return back["at"]

        renewed()
        with svc(compat_server) as c:
            r = c.patch(f"/twins/{device_id}", json={"properties": {"desired": {"interval": 7}}})
            assert r.status_code == 200, r.text
            assert sdk.next("desired", timeout=10).get("patch", {}).get("interval") == 7, sdk.seen
            r = c.post(f"/twins/{device_id}/methods", json={"methodName": "reboot", "payload": {"n": 1},
                                                            "responseTimeoutInSeconds": 10})
            assert r.status_code == 200 and r.json()["payload"]["got"] == {"n": 1}, r.text
            r = c.post(f"/devices/{device_id}/messages/deviceBound", content=b"across the renewal")
            assert r.status_code == 202, r.text
            assert sdk.next("c2d", timeout=10).get("data") == "across the renewal", sdk.seen
        renewed()  # and the next renewal too
        with svc(compat_server) as c:
            r = c.patch(f"/twins/{device_id}", json={"properties": {"desired": {"interval": 8}}})
            assert r.status_code == 200, r.text
        assert sdk.next("desired", timeout=10).get("patch", {}).get("interval") == 8, sdk.seen
        result = sdk.result()
        assert result.get("ok"), (result, sdk.seen)
    finally:
        if sdk.proc.poll() is None:
            sdk.proc.kill()
