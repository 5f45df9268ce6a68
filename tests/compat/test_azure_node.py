"""Microsoft's Azure IoT Node.js device SDKs against opendps: the same devices as the Python compat suite, from npm.

azure-iot-provisioning-device (HTTP and MQTT transports, symmetric-key and X.509 security clients) registers, then
azure-iot-device over MQTT (and MQTT over WebSockets) uses the assigned hub. The only changes from a device built for
Azure are the host name (``localhost``, an argument of the driver) and the trusted root (NODE_EXTRA_CA_CERTS).
The SDKs are pinned in tests/compat/node/package-lock.json and installed once into tests/compat/node/node_modules
(``npm install`` from the npm registry); without node/npm, or when the install fails, the tests skip locally and
fail under OPENDPS_REQUIRE_SERVICES=1 (CI), as the Python SDK's venv does. ``driver.js`` prints JSON lines.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from tests.compat.azure_sdk import LOCKS, SdkProcess, _exclusive, finish, start_driver
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
from tests.test_mqtt_hub import events, pending_c2d

pytestmark = pytest.mark.timeout(300, func_only=True)

NODE_DIR = Path(__file__).parent / "node"
DRIVER_JS = NODE_DIR / "driver.js"
STAMP = NODE_DIR / "node_modules" / ".opendps-stamp"


@dataclass
class NodeSdk:
    node: str
    pinned: dict[str, str]


@pytest.fixture(scope="session")
def azure_node() -> NodeSdk:
    """node, with the pinned SDKs installed in tests/compat/node/node_modules (npm, once; reused while the stamp,
    a hash of package.json and package-lock.json, matches)."""
    from tests.conftest import service_missing
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        service_missing("the Node.js SDK tests need node and npm on PATH (apt-get install nodejs npm)")
    pinned = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]
    wanted = hashlib.sha256((NODE_DIR / "package.json").read_bytes() + (NODE_DIR / "package-lock.json").read_bytes()).hexdigest()
    with _exclusive(LOCKS / "opendps-tests-azure-node.lock"):
        if not (STAMP.exists() and STAMP.read_text() == wanted):
            try:
                proc = subprocess.run([npm, "install", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True,
                                      text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as exc:
                service_missing(f"cannot install the Node.js Azure SDKs (npm install in {NODE_DIR}): {exc}")
            if proc.returncode != 0:
                service_missing(f"cannot install the Node.js Azure SDKs (npm install in {NODE_DIR}): {proc.stderr[-2000:]}")
            STAMP.write_text(wanted)
    probe = ("console.log(JSON.stringify(Object.fromEntries("
             "process.argv.slice(1).map(n => [n, require(n + '/package.json').version]))))")
    check = subprocess.run([node, "-e", probe, *pinned], cwd=NODE_DIR, capture_output=True, text=True, timeout=60)
    if check.returncode != 0 or json.loads(check.stdout or "null") != pinned:
        service_missing(f"the Node.js Azure SDKs in {NODE_DIR / 'node_modules'} are unusable: "
                        f"{check.stdout}{check.stderr[-2000:]}")
    return NodeSdk(node, pinned)


def start_node(sdk: NodeSdk, srv, command: str, args: dict) -> SdkProcess:
    """The driver with the server's root trusted the way a Node.js device would: NODE_EXTRA_CA_CERTS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_")}
    env["NODE_EXTRA_CA_CERTS"] = str(srv.ca_file)
    return start_driver([sdk.node, str(DRIVER_JS), command, json.dumps(args)], env)


def run_node(sdk: NodeSdk, srv, command: str, args: dict) -> dict:
    return finish(start_node(sdk, srv, command, args))


def require_443(srv, transport: str) -> None:
    """The HTTP provisioning transport and MQTT over WebSockets always connect to 443."""
    if transport in ("http", "websockets", "mqtt-ws") and srv.websockets:
        pytest.skip(f"the Node.js SDK's {transport} transport always connects to 443: {srv.websockets}")


def provision(sdk: NodeSdk, srv, transport: str, rid: str, **auth) -> dict:
    return run_node(sdk, srv, "provision", {"transport": transport, "rid": rid, "scope": srv.id_scope, **auth})


def assert_assigned(result: dict, rid: str) -> None:
    assert result["ok"], result
    assert (result["status"], result["assigned_hub"], result["device_id"]) == ("assigned", "localhost", rid), result


def server_state(srv, rid: str) -> tuple[dict, dict]:
    with svc(srv) as c:
        reg = c.get(f"/registrations/{rid}")
        assert reg.status_code == 200, reg.text
        dev = c.get(f"/linkedHubs/default/devices/{rid}")
        assert dev.status_code == 200, dev.text
        return reg.json(), dev.json()


def assert_refused(result: dict, transport: str) -> None:
    """A credential no enrollment accepts: 401 over HTTP; CONNACK 5 over MQTT, which the SDK passes on untranslated."""
    assert not result["ok"], result
    if transport == "http":  # 401 with the DPS error body
        assert (result["error_type"], result["status_code"]) == ("UnauthorizedError", 401), result
    else:
        assert result["error"] == "Connection refused: Not authorized", result


@pytest.mark.parametrize("transport", ["http", "mqtt", "mqtt-ws"])
def test_symmetric_key_provisioning(azure_node, compat_server, transport):
    """Custom allocation answered late (so the SDK polls the operation) with the device's payload round trip, a
    group's derived key, the group key refused, a disabled enrollment refused."""
    require_443(compat_server, transport)
    rid = f"node-sym-{transport}"
    hook = ThreadingHTTPServer(("127.0.0.1", 0), _Webhook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        custom = {"webhookUrl": f"http://127.0.0.1:{hook.server_address[1]}/allocate", "apiVersion": "2021-10-01"}
        with svc(compat_server) as c:
            key = sym_key(c, f"/enrollments/{rid}", {"attestation": {"type": "symmetricKey"}, "allocationPolicy": "custom",
                                                     "customAllocationDefinition": custom})
            group_key = sym_key(c, f"/enrollmentGroups/node-grp-{transport}", {"attestation": {"type": "symmetricKey"}})
            disabled_key = sym_key(c, f"/enrollments/node-off-{transport}", {"attestation": {"type": "symmetricKey"},
                                                                             "provisioningStatus": "disabled"})
        _Webhook.requests.clear()
        _Webhook.answers[:] = [("slow", {"iotHubHostName": "localhost", "payload": {"site": "b7", "n": [1, 2]},
                                         "initialTwin": {"tags": {"sdk": "node"}}})]
        result = provision(azure_node, compat_server, transport, rid, key=key, payload={"model": "m1"})
    finally:
        hook.shutdown()
    assert_assigned(result, rid)
    assert result["sub_status"] == "initialAssignment" and result["response_payload"] == {"site": "b7", "n": [1, 2]}
    [sent] = _Webhook.requests
    assert sent["deviceRuntimeContext"]["payload"] == {"model": "m1"}, sent
    reg, dev = server_state(compat_server, rid)
    assert reg["status"] == "assigned" and reg["etag"] == result["etag"]
    assert dev["authenticationType"] == "sas" and dev["tags"] == {"sdk": "node"}

    member = f"node-grp-{transport}-dev"
    derived = base64.b64encode(hmac.new(base64.b64decode(group_key), member.encode(), hashlib.sha256).digest()).decode()
    assert_assigned(provision(azure_node, compat_server, transport, member, key=derived), member)
    with svc(compat_server) as c:
        assert [r["registrationId"] for r in c.post(f"/registrations/node-grp-{transport}/query").json()] == [member]

    refused = provision(azure_node, compat_server, transport, f"node-grp-{transport}-x", key=group_key)
    assert_refused(refused, transport)
    assert_nothing_left(compat_server, f"node-grp-{transport}-x")
    off = provision(azure_node, compat_server, transport, f"node-off-{transport}", key=disabled_key)
    # HTTP: the REST client's error for the 403 (its IoT Hub mapping: TooManyDevicesError); MQTT: the 403 publish
    assert not off["ok"] and (off.get("status_code") or off["result"]["errorCode"] // 1000) == 403, off
    assert_nothing_left(compat_server, f"node-off-{transport}")


@pytest.mark.parametrize("transport", ["http", "mqtt"])
def test_x509_provisioning(azure_node, compat_server, tmp_path, transport):
    """A self-signed individual enrollment; a group on a verified intermediate whose device sends its chain; a
    device of an unknown CA refused."""
    require_443(compat_server, transport)
    rid = f"node-x509-{transport}"
    leaf, key = make_leaf(rid, None)
    cert_file, key_file = write_identity(tmp_path, rid, [leaf], key)
    root = make_ca(f"node-root-{transport}")
    intermediate = make_ca(f"node-ica-{transport}", root)
    with svc(compat_server) as c:
        put(c, f"/enrollments/{rid}", {"attestation": {"type": "x509", "x509": {"clientCertificates": {
            "primary": {"certificate": leaf.public_bytes(serialization.Encoding.PEM).decode()}}}}})
        upload_verified(compat_server, c, f"node-ica-{transport}", intermediate)
        put(c, f"/enrollmentGroups/node-x509-grp-{transport}", {"attestation": {"type": "x509", "x509": {
            "caReferences": {"primary": f"node-ica-{transport}"}}}})
    result = provision(azure_node, compat_server, transport, rid, cert=str(cert_file), keyfile=str(key_file))
    assert_assigned(result, rid)
    reg, dev = server_state(compat_server, rid)
    assert reg["etag"] == result["etag"] and dev["authenticationType"] == "selfSigned"

    member = f"node-x509-grp-{transport}-dev"
    mleaf, mkey = make_leaf(member, intermediate)
    cert_file, key_file = write_identity(tmp_path, member, [mleaf, intermediate.cert], mkey)
    result = provision(azure_node, compat_server, transport, member, cert=str(cert_file), keyfile=str(key_file))
    assert_assigned(result, member)
    assert server_state(compat_server, member)[1]["authenticationType"] == "certificateAuthority"

    stranger, skey = make_leaf(f"node-stranger-{transport}", make_ca(f"node-other-{transport}"))
    cert_file, key_file = write_identity(tmp_path, "stranger", [stranger], skey)
    refused = provision(azure_node, compat_server, transport, f"node-stranger-{transport}", cert=str(cert_file),
                        keyfile=str(key_file))
    assert_refused(refused, transport)
    assert_nothing_left(compat_server, f"node-stranger-{transport}")


def exercise(sdk: NodeSdk, srv, device_id: str, **auth) -> None:
    """Telemetry with properties, twin get/reported/desired, a direct method and a C2D message through the SDK."""
    p = start_node(sdk, srv, "device", {
        "hostname": "localhost", "device_id": device_id, **auth, "methods": ["reboot"],
        "message": {"data": json.dumps({"temperature": 21.5}), "message_id": f"{device_id}-m1", "correlation_id": "corr-7",
                    "content_type": "application/json", "content_encoding": "utf-8",
                    "properties": {"line": "a b", "alert": "x&y=z"}},
        "reported": {"firmware": "1.2", "nested": {"ok": True}},
        "expect": ["desired", "desired", "method", "c2d"]})
    twin = p.next("twin")
    assert "twin" in twin, (twin, p.seen)
    assert twin["twin"]["desired"]["interval"] == 60 and twin["twin"]["reported"] == {"$version": 1}, twin
    after = p.next("reported")
    assert after["twin"]["reported"]["firmware"] == "1.2" and after["twin"]["reported"]["$version"] == 2, after
    assert p.next("ready").get("event") == "ready", p.seen
    got = p.next("desired")  # the SDK hands the twin's desired properties to a new listener once
    assert got.get("patch", {}).get("interval") == 60, (got, p.seen)

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
        r = c.patch(f"/twins/{device_id}", json={"properties": {"desired": {"interval": 5}}})
        assert r.status_code == 200, r.text
        version = r.json()["properties"]["desired"]["$version"]
        got = p.next("desired")
        assert got.get("patch") == {"interval": 5, "$version": version}, (got, p.seen)
        r = c.post(f"/twins/{device_id}/methods", json={"methodName": "reboot", "payload": {"delay": 5},
                                                        "responseTimeoutInSeconds": 30})
        assert r.status_code == 200, r.text
        assert r.json() == {"status": 200, "payload": {"method": "reboot", "got": {"delay": 5}}}
        got = p.next("method")
        assert (got.get("name"), got.get("payload")) == ("reboot", {"delay": 5}), (got, p.seen)
        r = c.post(f"/devices/{device_id}/messages/deviceBound", content=b"hello device",
                   headers={"iothub-messageid": "c2d-1", "iothub-correlationid": "corr-c2d", "iothub-ack": "full",
                            "Content-Type": "text/plain", "Content-Encoding": "utf-8", "iothub-app-color": "blue green"})
        assert r.status_code == 202, r.text
    got = p.next("c2d")
    # the Node SDK maps $.mid, $.cid, $.ct, $.ce (not iothub-ack, which IoT Hub sends too: an application property)
    assert {k: got.get(k) for k in ("data", "message_id", "correlation_id", "content_type", "content_encoding", "ack",
                                    "custom_properties")} == {
        "data": "hello device", "message_id": "c2d-1", "correlation_id": "corr-c2d", "content_type": "text/plain",
        "content_encoding": "utf-8", "ack": None, "custom_properties": {"iothub-ack": "full", "color": "blue green"}}, (
        got, p.seen)
    result = finish(p)
    assert result.get("ok"), (result, p.seen)
    # completed by the SDK before it closed: the PUBACK's delete (and, with iothub-ack, its feedback record) commits
    # in the domain thread moments after the PUBACK is read, so the process may be gone first
    deadline = time.time() + 10
    while pending_c2d(srv) and time.time() < deadline:
        time.sleep(0.05)
    assert pending_c2d(srv) == 0


@pytest.mark.parametrize("transport", ["mqtt", "websockets"])
def test_sas_device_uses_the_hub(azure_node, compat_server, transport):
    require_443(compat_server, transport)
    rid = f"node-hub-sas-{transport}"
    with svc(compat_server) as c:
        key = sym_key(c, f"/enrollments/{rid}", {"attestation": {"type": "symmetricKey"},
                                                 "initialTwin": {"properties": {"desired": {"interval": 60}}}})
    assert_assigned(provision(azure_node, compat_server, "mqtt", rid, key=key), rid)
    # a Plug and Play device names its model in the user name (&model-id=dtmi:...;1, not URL-encoded by this SDK)
    pnp = {"model_id": "dtmi:com:example:Thermostat;1"} if transport == "mqtt" else {}
    exercise(azure_node, compat_server, rid, key=key, websockets=transport == "websockets", **pnp)


def upload_verified_to_hub(c, name: str, ca) -> None:
    """``upload_verified`` against the hub's own CA list (/linkedHubs/default/certificates)."""
    base = f"/linkedHubs/default/certificates/{name}"
    r = c.put(base, json={"properties": {"certificate": ca.pem}})
    assert r.status_code == 201, r.text
    r = c.post(f"{base}/generateVerificationCode", headers={"If-Match": r.json()["etag"]})
    proof, _ = make_leaf(r.json()["properties"]["verificationCode"], ca)
    r = c.post(f"{base}/verify", headers={"If-Match": r.json()["etag"]},
               json={"certificate": proof.public_bytes(serialization.Encoding.PEM).decode()})
    assert r.json()["properties"]["isVerified"] is True, r.text


@pytest.mark.parametrize("transport", ["mqtt", "websockets"])
def test_x509_device_uses_the_hub(azure_node, compat_server, tmp_path, transport):
    """Self-signed (the enrolled thumbprint) over MQTT; CA-signed, sending its chain, over WebSockets."""
    require_443(compat_server, transport)
    rid = f"node-hub-x509-{transport}"
    twin = {"initialTwin": {"properties": {"desired": {"interval": 60}}}}
    with svc(compat_server) as c:
        if transport == "mqtt":
            leaf, key = make_leaf(rid, None)
            chain = [leaf]
            put(c, f"/enrollments/{rid}", {"attestation": {"type": "x509", "x509": {"clientCertificates": {
                "primary": {"certificate": leaf.public_bytes(serialization.Encoding.PEM).decode()}}}}, **twin})
        else:
            ica = make_ca("node-hub-ica", make_ca("node-hub-root"))
            upload_verified(compat_server, c, "node-hub-ica", ica)  # to DPS, and (as IoT Hub asks) to the hub
            upload_verified_to_hub(c, "node-hub-ica", ica)
            put(c, "/enrollmentGroups/node-hub-grp", {"attestation": {"type": "x509", "x509": {
                "caReferences": {"primary": "node-hub-ica"}}}, **twin})
            leaf, key = make_leaf(rid, ica)
            chain = [leaf, ica.cert]
    cert_file, key_file = write_identity(tmp_path, rid, chain, key)
    auth = {"cert": str(cert_file), "keyfile": str(key_file)}
    assert_assigned(provision(azure_node, compat_server, "mqtt", rid, **auth), rid)
    exercise(azure_node, compat_server, rid, websockets=transport == "websockets", **auth)


def test_sas_renewal_keeps_the_subscriptions(azure_node, compat_server):
    """45 minutes into every SAS connection the Node SDK renews its token by reconnecting with clean session 0 and
    relies on the session's subscriptions, as IoT Hub keeps them (CONNACK session present 1): they were lost (hub
    sessions were never persistent), and with them desired patches, direct methods and C2D."""
    rid = "node-hub-renewal"
    with svc(compat_server) as c:
        key = sym_key(c, f"/enrollments/{rid}", {"attestation": {"type": "symmetricKey"},
                                                 "initialTwin": {"properties": {"desired": {"interval": 60}}}})
    assert_assigned(provision(azure_node, compat_server, "mqtt", rid, key=key), rid)
    p = start_node(azure_node, compat_server, "device", {
        "device_id": rid, "key": key, "renew": True, "methods": ["reboot"],
        "expect": ["desired", "desired", "method", "c2d"]})
    try:
        assert p.next("desired").get("patch", {}).get("interval") == 60, p.seen  # the initial desired properties
        assert p.next("renewed").get("event") == "renewed", p.seen  # reconnected with the new token
        assert [e["event"]["payload"] for e in events(compat_server, rid, 1)] == ["after renewal"]
        with svc(compat_server) as c:
            r = c.patch(f"/twins/{rid}", json={"properties": {"desired": {"interval": 5}}})
            assert r.status_code == 200, r.text
            assert p.next("desired", timeout=5).get("patch", {}).get("interval") == 5, p.seen
            r = c.post(f"/twins/{rid}/methods", json={"methodName": "reboot", "payload": {},
                                                      "responseTimeoutInSeconds": 10})
            assert r.status_code == 200, r.text
            r = c.post(f"/devices/{rid}/messages/deviceBound", content=b"after renewal")
            assert r.status_code == 202, r.text
        assert p.next("c2d").get("data") == "after renewal", p.seen
        assert finish(p).get("ok"), p.seen
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
