"""DPS over MQTT and the hub's device endpoint (issue 4), with real clients against ``opendps serve``.

paho-mqtt (not the project's code) provisions over MQTT with X.509 and with a symmetric key, sends a
CSR, then connects to the hub with the issued operational chain and exercises telemetry, twin,
methods and C2D; mosquitto_pub publishes telemetry with the operational certificate; the hub's
refusals are checked at CONNECT.
"""

from __future__ import annotations

import asyncio
import base64
import json
import queue
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import aiohttp
import httpx
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import func, select
from tests.conftest import REQUIRE_SERVICES, run_openssl
from tests.test_device_api import (
    PREVIEW,
    csr_b64,
    device_sas,
    make_ca,
    make_leaf,
    namespace,
    put,
    svc,
    sym_key,
    upload_verified,
    write_identity,
)

from opendps.pki import serial_hex
from opendps.store import CloudToDeviceMessage, Store
from opendps.transport import sas
from opendps.transport.mqtt.codec import (
    Connack,
    Connect,
    Decoder,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Suback,
    Subscribe,
    encode,
)

pytestmark = pytest.mark.timeout(300, func_only=True)
HUB = "localhost"
# MQTT 5 reason code → the MQTT 3.1.1 CONNACK return code the server sent
V311_RC = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}


class Client:
    """A paho-mqtt 3.1.1 client with a queue of received messages."""

    def __init__(self, server, client_id: str, username: str, *, password: str | None = None,
                 cert: Path | None = None, key: Path | None = None, clean_session: bool = False,
                 websocket: bool = False, ws_path: str = "/$iothub/websocket"):
        self.messages: queue.Queue = queue.Queue()
        self.connack = threading.Event()
        self.rc: int | None = None
        self.session_present: bool | None = None
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                             protocol=mqtt.MQTTv311, transport="websockets" if websocket else "tcp")
        if websocket:
            self.c.ws_set_options(path=ws_path)
        self.c.username_pw_set(username, password)
        self.c.tls_set(ca_certs=str(server.ca_file), certfile=str(cert) if cert else None,
                       keyfile=str(key) if key else None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.c.on_connect = self._on_connect
        self.c.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        port = int(server.url.rsplit(":", 1)[1]) if websocket else server.mqtt_port
        self.c.connect("localhost", port, keepalive=30)
        self.c.loop_start()
        assert self.connack.wait(30), "no CONNACK"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.rc = V311_RC.get(reason_code.value, reason_code.value)  # paho 2 reports MQTT 5 reason codes
        self.session_present = bool(flags.session_present)
        self.connack.set()

    def subscribe(self, *filters: str) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda *a: done.set()
        self.c.subscribe([(f, 1) for f in filters])
        assert done.wait(30), "no SUBACK"

    def unsubscribe(self, *filters: str) -> None:
        done = threading.Event()
        self.c.on_unsubscribe = lambda *a: done.set()
        self.c.unsubscribe(list(filters))
        assert done.wait(30), "no UNSUBACK"

    def publish(self, topic: str, payload: bytes | str = b"", qos: int = 1) -> None:
        self.c.publish(topic, payload, qos=qos).wait_for_publish(30)

    def publish_refused(self, topic: str, payload: bytes | str, timeout: float = 20) -> None:
        """A QoS 1 PUBLISH the hub does not accept: the connection closes and no PUBACK came for it."""
        gone, acked = threading.Event(), threading.Event()
        self.c.on_disconnect = lambda *a: gone.set()
        self.c.on_publish = lambda *a: acked.set()
        self.c.publish(topic, payload, qos=1)
        assert gone.wait(timeout), "the connection stayed open"
        self.c.loop_stop()
        assert not acked.is_set(), "the refused message was acknowledged"

    def expect(self, prefix: str, timeout: float = 30) -> tuple[str, bytes]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                topic, payload = self.messages.get(timeout=max(0.05, deadline - time.time()))
            except queue.Empty:
                break
            if topic.startswith(prefix):
                return topic, payload
        pytest.fail(f"no message on {prefix!r} within {timeout} s")

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def dps_username(server, rid: str) -> str:
    return f"{server.id_scope}/registrations/{rid}/api-version={PREVIEW}&ClientVersion=tests"


def hub_username(device_id: str) -> str:
    return f"{HUB}/{device_id}/?api-version=2021-04-12"


def sas_device(server, device_id: str) -> str:
    """A SAS device made in the hub through the service API: its primary key."""
    with svc(server) as c:
        assert c.put(f"/devices/{device_id}", json={"deviceId": device_id}).status_code == 200
        return c.get(f"/devices/{device_id}").json()["authentication"]["symmetricKey"]["primaryKey"]


def sas_client(server, device_id: str, key: str) -> Client:
    """The device connected to the hub with a SAS token of ``key``."""
    return Client(server, device_id, hub_username(device_id), password=sas.generate(f"{HUB}/devices/{device_id}", key))


def provision_over_mqtt(server, rid: str, tmp_path: Path, **auth) -> tuple[dict, Path, Path]:
    """Register with a CSR over MQTT; return (registrationState, chain file, operational key file)."""
    c = Client(server, rid, dps_username(server, rid), **auth)
    assert c.rc == 0
    c.subscribe("$dps/registrations/res/#")
    csr = csr_b64(tmp_path, rid)
    c.publish("$dps/registrations/PUT/iotdps-register/?$rid=r1", json.dumps({"registrationId": rid, "csr": csr}))
    topic, payload = c.expect("$dps/registrations/res/")
    # assigned at once: the register is answered with the final state, no retry-after (issue 13) ...
    assert topic == "$dps/registrations/res/200/?$rid=r1", (topic, payload)
    answered = json.loads(payload)
    op = answered["operationId"]
    c.publish(f"$dps/registrations/GET/iotdps-get-operationstatus/?$rid=r2&operationId={op}", " ")
    topic, payload = c.expect("$dps/registrations/res/")
    c.close()
    # ... and the operation stays pollable with the same answer
    assert topic == "$dps/registrations/res/200/?$rid=r2" and json.loads(payload) == answered, (topic, payload)
    result = json.loads(payload)
    assert result["status"] == "assigned"
    state = result["registrationState"]
    chain = [x509.load_der_x509_certificate(base64.b64decode(d)) for d in state["issuedCertificateChain"]]
    chain_file = tmp_path / f"{rid}-chain.pem"
    chain_file.write_bytes(b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in chain[:2]))
    return state, chain_file, tmp_path / f"{rid}-op.key"


def events(server, device_id: str, count: int, timeout: float = 10) -> list[dict]:
    with svc(server) as c:
        r = c.get("/events", params={"from": "earliest", "deviceId": device_id, "count": count, "timeout": timeout})
        assert r.status_code == 200, r.text
        return [json.loads(line) for line in r.text.splitlines() if line.strip()]


def pending_c2d(server) -> int:
    store = Store(server.db_url)
    try:
        with store.session() as s:
            return s.scalar(select(func.count()).select_from(CloudToDeviceMessage)) or 0
    finally:
        store.dispose()


def exercise_hub(server, device_id: str, **auth) -> None:
    """Telemetry, twin, a direct method and C2D (with offline queueing) for a connected device."""
    d = Client(server, device_id, hub_username(device_id), **auth)
    assert d.rc == 0
    d.subscribe(f"devices/{device_id}/messages/devicebound/#", "$iothub/methods/POST/#", "$iothub/twin/res/#",
                "$iothub/twin/PATCH/properties/desired/#")
    # telemetry with system and application properties, seen by a consumer
    d.publish(f"devices/{device_id}/messages/events/%24.mid=m-1&%24.ct=application%2Fjson&%24.ce=utf-8&line=a%20b",
              json.dumps({"temperature": 21.5}))
    [event] = events(server, device_id, 1)
    assert event["event"]["payload"] == {"temperature": 21.5}
    assert event["event"]["properties"]["application"] == {"line": "a b"}
    system = event["event"]["properties"]["system"]
    assert (system["message-id"], system["content-type"], system["iothub-connection-device-id"]) == (
        "m-1", "application/json", device_id)
    # twin: get, reported patch, desired push
    d.publish("$iothub/twin/GET/?$rid=t1", " ")
    topic, payload = d.expect("$iothub/twin/res/")
    assert topic == "$iothub/twin/res/200/?$rid=t1"
    twin = json.loads(payload)
    assert twin["desired"]["$version"] >= 1 and twin["reported"] == {"$version": 1}
    d.publish("$iothub/twin/PATCH/properties/reported/?$rid=t2", json.dumps({"firmware": "1.2", "certificate": {
        "validUntil": "x"}}))
    topic, _ = d.expect("$iothub/twin/res/")
    assert topic == "$iothub/twin/res/204/?$rid=t2&$version=2"
    with svc(server) as c:
        assert c.get(f"/twins/{device_id}").json()["properties"]["reported"]["firmware"] == "1.2"
        r = c.patch(f"/twins/{device_id}", json={"properties": {"desired": {"interval": 5}}})
        assert r.status_code == 200, r.text
        version = r.json()["properties"]["desired"]["$version"]
    topic, payload = d.expect("$iothub/twin/PATCH/properties/desired/")
    assert topic == f"$iothub/twin/PATCH/properties/desired/?$version={version}"
    assert json.loads(payload) == {"interval": 5, "$version": version}

    # direct method round trip: the device answers from its message loop
    def answer() -> None:
        topic, payload = d.expect("$iothub/methods/POST/")
        name, _, query = topic[len("$iothub/methods/POST/"):].partition("/?$rid=")
        d.publish(f"$iothub/methods/res/201/?$rid={query}", json.dumps({"method": name, "got": json.loads(payload)}))

    t = threading.Thread(target=answer)
    t.start()
    with svc(server) as c:
        r = c.post(f"/twins/{device_id}/methods", json={"methodName": "reboot", "payload": {"delay": 5},
                                                        "responseTimeoutInSeconds": 20})
    t.join(30)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": 201, "payload": {"method": "reboot", "got": {"delay": 5}}}
    # C2D while offline: queued, delivered on connect, removed on PUBACK
    d.close()
    with svc(server) as c:
        r = c.post(f"/devices/{device_id}/messages/deviceBound", content=b"hello device",
                   headers={"iothub-messageid": "c2d-1", "iothub-app-color": "blue"})
        assert r.status_code == 202, r.text
        r = c.post(f"/twins/{device_id}/methods", json={"methodName": "ping", "responseTimeoutInSeconds": 5})
        assert r.status_code == 404 and r.json()["errorCode"] // 1000 == 404
    assert pending_c2d(server) >= 1
    d = Client(server, device_id, hub_username(device_id), **auth)
    d.subscribe(f"devices/{device_id}/messages/devicebound/#")
    topic, payload = d.expect(f"devices/{device_id}/messages/devicebound/")
    assert payload == b"hello device"
    assert "%24.mid=c2d-1" in topic and "color=blue" in topic
    deadline = time.time() + 10
    while pending_c2d(server) and time.time() < deadline:
        time.sleep(0.1)
    assert pending_c2d(server) == 0
    d.close()


def test_x509_device_provisions_over_mqtt_and_uses_the_hub(server, tmp_path):
    root = make_ca("mqtt-x509-root")
    with svc(server) as c:
        upload_verified(server, c, "mqtt-x509-root", root)
        namespace(c, "mqtt-ns", "mqtt-p")
        put(c, "/enrollmentGroups/mqtt-x509", {"credentialPolicyName": "mqtt-p", "initialTwin": {
            "properties": {"desired": {"interval": 60}}}, "attestation": {"type": "x509", "x509": {
                "caReferences": {"primary": "mqtt-x509-root"}}}})
    leaf, key = make_leaf("mqtt-x509-dev", root)
    boot_cert, boot_key = write_identity(tmp_path, "boot", [leaf], key)
    state, chain, op_key = provision_over_mqtt(server, "mqtt-x509-dev", tmp_path, cert=boot_cert, key=boot_key)
    assert state["assignedHub"] == HUB and state["x509"]["enrollmentGroupId"] == "mqtt-x509"
    # the bootstrap certificate does not open the hub: its CA is not one the hub trusts
    refused = Client(server, "mqtt-x509-dev", hub_username("mqtt-x509-dev"), cert=boot_cert, key=boot_key)
    assert refused.rc == 5
    refused.close()
    exercise_hub(server, "mqtt-x509-dev", cert=chain, key=op_key)


def test_symmetric_key_device_provisions_over_mqtt_and_uses_the_hub(server, tmp_path):
    with svc(server) as c:
        namespace(c, "mqtt-sym-ns", "mqtt-sym-p")
        key = sym_key(c, "/enrollments/mqtt-sym-dev", {"attestation": {"type": "symmetricKey"},
                                                        "credentialPolicyName": "mqtt-sym-p"})
    # the credential is checked at CONNECT: a bad SAS, or none, never opens a DPS session (CONNACK 5)
    bad = Client(server, "mqtt-sym-dev", dps_username(server, "mqtt-sym-dev"),
                 password=device_sas(server.id_scope, "mqtt-sym-dev", base64.b64encode(b"k" * 32).decode()))
    assert bad.rc == 5
    bad.close()
    # ... so nobody can take over a device's authenticated session
    good = Client(server, "mqtt-sym-dev", dps_username(server, "mqtt-sym-dev"),
                  password=device_sas(server.id_scope, "mqtt-sym-dev", key))
    assert good.rc == 0
    good.subscribe("$dps/registrations/res/#")
    intruder = Client(server, "mqtt-sym-dev", dps_username(server, "mqtt-sym-dev"))
    assert intruder.rc == 5
    intruder.close()
    good.publish("$dps/registrations/PUT/iotdps-register/?$rid=x1", json.dumps({"registrationId": "mqtt-sym-dev"}))
    topic, _ = good.expect("$dps/registrations/res/")
    good.close()
    assert topic.startswith("$dps/registrations/res/200/?$rid=x1"), topic
    state, chain, op_key = provision_over_mqtt(server, "mqtt-sym-dev", tmp_path,
                                               password=device_sas(server.id_scope, "mqtt-sym-dev", key))
    assert state["symmetricKey"] == {}
    exercise_hub(server, "mqtt-sym-dev", cert=chain, key=op_key)


def test_sas_device_and_hub_refusals(server, tmp_path):
    with svc(server) as c:
        key = sym_key(c, "/enrollments/sas-hub-dev", {"attestation": {"type": "symmetricKey"}})
        namespace(c, "other-ns", "other-p")
        # other-p is linked to the hub too, so its issuing CA is trusted: only the per-device check refuses
        sym_key(c, "/enrollments/other-linker", {"attestation": {"type": "symmetricKey"}, "credentialPolicyName": "other-p"})
        namespace(c, "refuse-ns", "refuse-p")
        rkey = sym_key(c, "/enrollments/refuse-dev", {"attestation": {"type": "symmetricKey"},
                                                       "credentialPolicyName": "refuse-p"})
    with httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=server.ca_file), timeout=30) as d:
        r = d.put(f"/{server.id_scope}/registrations/sas-hub-dev/register", params={"api-version": PREVIEW}, json={},
                  headers={"Authorization": device_sas(server.id_scope, "sas-hub-dev", key)})
        assert r.status_code == 202 and r.json()["status"] == "assigned"
    hub_sas = sas.generate(f"{HUB}/devices/sas-hub-dev", key)
    ok = Client(server, "sas-hub-dev", hub_username("sas-hub-dev"), password=hub_sas)
    assert ok.rc == 0
    ok.close()
    # deleting a connected device drops its session within a second
    doomed = sas_client(server, "deleted-dev", sas_device(server, "deleted-dev"))
    assert doomed.rc == 0
    dropped = threading.Event()
    doomed.c.on_disconnect = lambda *a: dropped.set()
    with svc(server) as c:
        assert c.delete("/devices/deleted-dev").status_code == 204
    assert dropped.wait(1.5), "deleted device still connected"
    doomed.c.loop_stop()
    wrong = sas.generate(f"{HUB}/devices/sas-hub-dev", base64.b64encode(b"w" * 32).decode())
    for client_id, username, password, code in [
        ("sas-hub-dev", hub_username("sas-hub-dev"), wrong, 4),  # bad SAS
        ("someone-else", hub_username("sas-hub-dev"), hub_sas, 2),  # client id is not the device
        ("sas-hub-dev", "nohub.example/sas-hub-dev/?api-version=2021-04-12", hub_sas, 5),  # unknown hub
        ("ghost", hub_username("ghost"), hub_sas, 5),  # no such device
    ]:
        c = Client(server, client_id, username, password=password)
        assert c.rc == code, (client_id, username, c.rc)
        c.close()
    state, chain, op_key = provision_over_mqtt(server, "refuse-dev", tmp_path,
                                               password=device_sas(server.id_scope, "refuse-dev", rkey))
    # a certificate from another namespace, with the right CN
    other = tmp_path / "other"
    other_csr = csr_b64(other, "refuse-dev")
    from opendps.instance import Settings, open_instance

    inst = open_instance(Settings.load(server.data_dir, db=server.db_url, lint=False), create=False, migrate=False)
    try:
        registry, issuance = inst.services.registry, inst.services.issuance
        foreign = issuance.issue(registry.issuer(registry.find_policy("other-p", "other-ns").policy_id),
                                 base64.b64decode(other_csr), "refuse-dev")
        past = datetime.now(UTC) - timedelta(days=30)
        expired = issuance.issue(registry.issuer(registry.find_policy("refuse-p", "refuse-ns").policy_id),
                                 base64.b64decode(csr_b64(tmp_path / "old", "refuse-dev")), "refuse-dev", now=past)
    finally:
        inst.close()
    foreign_file = write_pem(tmp_path / "foreign.pem", foreign.certificates[:2])
    expired_file = write_pem(tmp_path / "expired.pem", expired.certificates[:2])
    for cert, key_file in [(foreign_file, other / "refuse-dev-op.key"),
                           (expired_file, tmp_path / "old" / "refuse-dev-op.key")]:
        c = Client(server, "refuse-dev", hub_username("refuse-dev"), cert=cert, key=key_file)
        assert c.rc == 5, cert
        c.close()
    # the operational certificate with a client id that is not its CN
    c = Client(server, "not-the-cn", hub_username("refuse-dev"), cert=chain, key=op_key)
    assert c.rc == 2
    c.close()
    # disabled: refused at CONNECT, and a live session is dropped within a second
    live = Client(server, "refuse-dev", hub_username("refuse-dev"), cert=chain, key=op_key)
    assert live.rc == 0
    gone = threading.Event()
    live.c.on_disconnect = lambda *a: gone.set()
    with svc(server) as c:
        dev = c.get("/devices/refuse-dev").json()
        dev["status"] = "disabled"
        assert c.put("/devices/refuse-dev", json=dev, headers={"If-Match": "*"}).status_code == 200
    assert gone.wait(1.5), "disabled device still connected"
    live.c.loop_stop()
    again = Client(server, "refuse-dev", hub_username("refuse-dev"), cert=chain, key=op_key)
    assert again.rc == 5
    again.close()


def test_a_sas_session_closes_when_its_token_expires(server):
    """IoT Hub disconnects a device when its SAS token expires (its 401003 troubleshooting page; some SDKs renew only
    then). Before, the token was checked at CONNECT only: the session lived on for as long as the device stayed, also
    after its key was regenerated. The CONNECT check allows se + 300 s of clock skew, so the session lasts as long."""
    device_id = "sas-expiring"
    key = sas_device(server, device_id)
    skew = sas.DEFAULT_SKEW_SECONDS
    lapsing = sas.generate(f"{HUB}/devices/{device_id}", key, ttl=-skew + 2)  # still accepted, for 2 s more
    c = Client(server, device_id, hub_username(device_id), password=lapsing)
    assert c.rc == 0
    gone = threading.Event()
    c.c.on_disconnect = lambda *a: gone.set()
    c.subscribe("$iothub/methods/POST/#")
    assert gone.wait(10), "the session outlived its SharedAccessSignature"
    c.c.loop_stop()
    again = Client(server, device_id, hub_username(device_id), password=lapsing)
    assert again.rc == 4, again.rc  # and the token opens nothing any more
    again.close()
    # a token far in the future (any integer se) keeps its session: the timer does not overflow or fire early
    lasting = Client(server, device_id, hub_username(device_id),
                     password=sas.token(f"{HUB}/devices/{device_id}",
                                        sas.sign(key, f"{HUB}%2Fdevices%2F{device_id}\n{10**30}"), 10**30))
    assert lasting.rc == 0
    lasting.subscribe("$iothub/methods/POST/#")
    lasting.close()


def test_hub_sas_edge_cases_and_policy_tokens(server):
    """Device tokens at the hub: what IoT Hub takes (any case of the host and id, either key — also once they are
    swapped — and a token of the hub's iothubowner policy, which has DeviceConnect: its token services mint such
    tokens) and what it refuses with CONNACK 4 (bad user name or password). Before, ``skn`` was ignored: a token of
    the hub's policy was refused, and a device-key token naming any policy was taken."""
    device_id = "sas-edges"
    key = sas_device(server, device_id)
    with svc(server) as c:
        secondary = c.get(f"/devices/{device_id}").json()["authentication"]["symmetricKey"]["secondaryKey"]
        owner = c.get("/linkedHubs/default/keys").json()
    resource = f"{HUB}/devices/{device_id}"
    se = int(time.time()) + 3600

    def signed(sr: str, with_key: str, expiry: object = se, extra: str = "") -> str:
        """A token over ``sr`` exactly as given (its encoding, its case) and ``se`` as given (any text)."""
        signature = quote(sas.sign(with_key, f"{sr}\n{expiry}"), safe="")
        return f"SharedAccessSignature sr={sr}&sig={signature}&se={expiry}{extra}"

    encoded = quote(resource, safe="")
    cases = [
        ("device key", sas.generate(resource, key), 0),
        ("secondary key", sas.generate(resource, secondary), 0),
        ("upper-case host, lower-case hex (the C SDK)", signed(f"{HUB.upper()}%2fdevices%2f{device_id}", key), 0),
        ("policy token", sas.generate(resource, owner["primaryKey"], "iothubowner"), 0),
        ("policy token, secondary key", sas.generate(resource, owner["secondaryKey"], "iothubowner"), 0),
        ("device key naming the policy", sas.generate(resource, key, "iothubowner"), 4),
        ("device key naming another policy", sas.generate(resource, key, "device"), 4),
        ("policy key without skn", sas.generate(resource, owner["primaryKey"]), 4),
        ("policy of another name", sas.generate(resource, owner["primaryKey"], "service"), 4),
        ("expired", sas.generate(resource, key, ttl=-sas.DEFAULT_SKEW_SECONDS - 5), 4),
        ("se not a number", signed(encoded, key, "soon"), 4),
        ("se past any clock", signed(encoded, key, "9" * 5000), 4),
        ("se negative", signed(encoded, key, -1), 4),
        ("se given twice", signed(encoded, key, extra=f"&se={se}"), 4),
        ("sig not base64", f"SharedAccessSignature sr={encoded}&sig=%%%ZZ&se={se}", 4),
        ("trailing slash", sas.generate(resource + "/", key), 4),
        ("the hub only", sas.generate(HUB, key), 4),
        ("another device", sas.generate(f"{HUB}/devices/sas-edges-other", key), 4),
        ("another hub", sas.generate(f"elsewhere.example/devices/{device_id}", key), 4),
        ("the DPS audience", sas.generate(f"{server.id_scope}/registrations/{device_id}", key), 4),
        ("not a token", "hunter2", 4),
    ]
    for case, password, code in cases:
        c = Client(server, device_id, hub_username(device_id), password=password)
        assert c.rc == code, (case, c.rc)
        c.close()
    # keys swapped (Azure's key regeneration flow: the old primary is the secondary now) still sign; new keys do not
    with svc(server) as c:
        r = c.put(f"/devices/{device_id}", headers={"If-Match": "*"}, json={
            "deviceId": device_id, "authentication": {"type": "sas", "symmetricKey": {
                "primaryKey": secondary, "secondaryKey": key}}})
        assert r.status_code == 200, r.text
    for password, code in [(sas.generate(resource, key), 0), (sas.generate(resource, secondary), 0)]:
        c = Client(server, device_id, hub_username(device_id), password=password)
        assert c.rc == code
        c.close()
    with svc(server) as c:
        r = c.put(f"/devices/{device_id}", headers={"If-Match": "*"}, json={
            "deviceId": device_id, "authentication": {"type": "sas", "symmetricKey": {
                "primaryKey": base64.b64encode(b"n" * 32).decode(), "secondaryKey": base64.b64encode(b"m" * 32).decode()}}})
        assert r.status_code == 200, r.text
    c = Client(server, device_id, hub_username(device_id), password=sas.generate(resource, key))
    assert c.rc == 4
    c.close()


def write_pem(path: Path, certs: list[x509.Certificate]) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


def test_mosquitto_clients_publish_telemetry_with_the_operational_certificate(server, tmp_path):
    if shutil.which("mosquitto_pub") is None:
        if REQUIRE_SERVICES:
            pytest.fail("mosquitto_pub is not installed (apt-get install mosquitto-clients)")
        pytest.skip("mosquitto_pub is not installed (apt-get install mosquitto-clients)")
    with svc(server) as c:
        namespace(c, "mosq-ns", "mosq-p")
        key = sym_key(c, "/enrollments/mosq-dev", {"attestation": {"type": "symmetricKey"},
                                                    "credentialPolicyName": "mosq-p"})
    _, chain, op_key = provision_over_mqtt(server, "mosq-dev", tmp_path,
                                           password=device_sas(server.id_scope, "mosq-dev", key))
    proc = subprocess.run(
        ["mosquitto_pub", "-h", "localhost", "-p", str(server.mqtt_port), "--cafile", str(server.ca_file),
         "--cert", str(chain), "--key", str(op_key), "-i", "mosq-dev", "-u", hub_username("mosq-dev"), "-q", "1",
         "-V", "mqttv311", "-t", "devices/mosq-dev/messages/events/source=mosquitto", "-m", '{"from": "mosquitto"}'],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    [event] = events(server, "mosq-dev", 1)
    assert event["event"]["payload"] == {"from": "mosquitto"}
    assert event["event"]["properties"]["application"] == {"source": "mosquitto"}
    # mosquitto_sub receives a C2D message with the same credentials
    with svc(server) as c:
        assert c.post("/devices/mosq-dev/messages/deviceBound", content=b"to-mosquitto").status_code == 202
    sub = subprocess.run(
        ["mosquitto_sub", "-h", "localhost", "-p", str(server.mqtt_port), "--cafile", str(server.ca_file),
         "--cert", str(chain), "--key", str(op_key), "-i", "mosq-dev", "-u", hub_username("mosq-dev"), "-q", "1",
         "-V", "mqttv311", "-t", "devices/mosq-dev/messages/devicebound/#", "-C", "1", "-W", "20"],
        capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0 and sub.stdout.strip() == "to-mosquitto", (sub.returncode, sub.stdout, sub.stderr)


def test_renewal_through_the_hub_credentials_topic(server, tmp_path):
    with svc(server) as c:
        namespace(c, "renew-hub-ns", "renew-hub-p")
        key = sym_key(c, "/enrollments/renew-hub-dev", {"attestation": {"type": "symmetricKey"},
                                                         "credentialPolicyName": "renew-hub-p"})
    state, chain, op_key = provision_over_mqtt(server, "renew-hub-dev", tmp_path,
                                               password=device_sas(server.id_scope, "renew-hub-dev", key))
    first = x509.load_der_x509_certificate(base64.b64decode(state["issuedCertificateChain"][0]))
    d = Client(server, "renew-hub-dev", hub_username("renew-hub-dev"), cert=chain, key=op_key)
    d.subscribe("$iothub/credentials/res/#")
    new_csr = csr_b64(tmp_path / "new", "renew-hub-dev")
    d.publish("$iothub/credentials/POST/issueCertificate/?$rid=req-0001",
              json.dumps({"id": "renew-hub-dev", "csr": new_csr}))
    topic, payload = d.expect("$iothub/credentials/res/")
    assert topic == "$iothub/credentials/res/202/?$rid=req-0001" and "correlationId" in json.loads(payload)
    topic, payload = d.expect("$iothub/credentials/res/")
    assert topic == "$iothub/credentials/res/200/?$rid=req-0001", payload
    certs = [x509.load_der_x509_certificate(base64.b64decode(b)) for b in json.loads(payload)["certificates"]]
    assert certs[0].serial_number != first.serial_number and certs[0].subject == first.subject
    d.publish("$iothub/credentials/POST/issueCertificate/?$rid=req-0002", json.dumps({"id": "not-me", "csr": new_csr}))
    topic, payload = d.expect("$iothub/credentials/res/")
    assert topic == "$iothub/credentials/res/400/?$rid=req-0002" and json.loads(payload)["errorCode"] == 400006
    for n, odd in enumerate((5, None, ["x"], {"pem": new_csr})):  # refused at once: no 202 first
        d.publish(f"$iothub/credentials/POST/issueCertificate/?$rid=req-odd{n}",
                  json.dumps({"id": "renew-hub-dev", "csr": odd}))
        topic, payload = d.expect("$iothub/credentials/res/")
        assert topic == f"$iothub/credentials/res/400/?$rid=req-odd{n}" and "csr must be a string" in payload.decode()
    d.close()
    for n, cert in enumerate(certs):
        (tmp_path / f"c{n}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    run_openssl("verify", "-CAfile", str(tmp_path / "c2.pem"), "-untrusted", str(tmp_path / "c1.pem"),
                str(tmp_path / "c0.pem"))
    renewed = write_pem(tmp_path / "renewed.pem", certs[:2])
    old = Client(server, "renew-hub-dev", hub_username("renew-hub-dev"), cert=chain, key=op_key)
    assert old.rc == 0  # renewed but not used yet: the old certificate still works (nothing is locked out)
    old.close()
    d = Client(server, "renew-hub-dev", hub_username("renew-hub-dev"), cert=renewed,
               key=tmp_path / "new" / "renew-hub-dev-op.key")
    assert d.rc == 0
    d.close()
    # issue 17.2: the renewed certificate's first session superseded the old one, which the hub now refuses
    refused = Client(server, "renew-hub-dev", hub_username("renew-hub-dev"), cert=chain, key=op_key)
    assert refused.rc == 5
    refused.close()
    shown = json.loads(server.cli("certificate", "show", "--serial-number", serial_hex(first), "-o", "json",
                                  check=True).stdout)
    assert (shown["revoked"], shown["revocationReason"]) == (True, "superseded"), shown


def test_a_revoked_certificate_is_dropped_live_refused_and_the_next_one_connects(server, tmp_path):
    """Issue 17: `opendps certificate revoke` drops the live session at once, the certificate is refused at the next
    CONNECT (CONNACK 5), and the device's next certificate (re-provisioned) connects."""
    with svc(server) as c:
        namespace(c, "revoke-ns", "revoke-p")
        key = sym_key(c, "/enrollments/revoke-dev", {"attestation": {"type": "symmetricKey"},
                                                      "credentialPolicyName": "revoke-p"})
    password = device_sas(server.id_scope, "revoke-dev", key)
    state, chain, op_key = provision_over_mqtt(server, "revoke-dev", tmp_path, password=password)
    serial = serial_hex(x509.load_der_x509_certificate(base64.b64decode(state["issuedCertificateChain"][0])))
    d = Client(server, "revoke-dev", hub_username("revoke-dev"), cert=chain, key=op_key)
    assert d.rc == 0
    dropped = threading.Event()
    d.c.on_disconnect = lambda *a: dropped.set()
    done = server.cli("certificate", "revoke", "--serial-number", serial, "--reason", "keyCompromise", "-o", "json",
                      check=True)
    revoked_at = time.monotonic()
    assert json.loads(done.stdout)["revocationReason"] == "keyCompromise", done.stdout
    assert dropped.wait(1), "the live session was not dropped within 1 s"
    assert time.monotonic() - revoked_at < 1
    d.c.loop_stop()
    again = server.cli("certificate", "revoke", "--serial-number", serial)
    assert again.returncode != 0 and "already revoked" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    refused = Client(server, "revoke-dev", hub_username("revoke-dev"), cert=chain, key=op_key)
    assert refused.rc == 5
    refused.close()
    _, new_chain, new_key = provision_over_mqtt(server, "revoke-dev", tmp_path / "again", password=password)
    d = Client(server, "revoke-dev", hub_username("revoke-dev"), cert=new_chain, key=new_key)
    assert d.rc == 0
    d.close()
    listed = json.loads(server.cli("certificate", "list", "--device-id", "revoke-dev", "-o", "json", check=True).stdout)
    assert [(x["serialNumber"] == serial, x["revoked"]) for x in listed] == [(False, False), (True, True)]


def test_publishing_outside_own_topics_closes_the_session(server, tmp_path):
    with svc(server) as c:
        key = sym_key(c, "/enrollments/nosy-dev", {"attestation": {"type": "symmetricKey"}})
        sym_key(c, "/enrollments/victim-dev", {"attestation": {"type": "symmetricKey"}})
    with httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=server.ca_file), timeout=30) as d:
        assert d.put(f"/{server.id_scope}/registrations/nosy-dev/register", params={"api-version": PREVIEW}, json={},
                     headers={"Authorization": device_sas(server.id_scope, "nosy-dev", key)}).status_code == 202
    c = Client(server, "nosy-dev", hub_username("nosy-dev"), password=sas.generate(f"{HUB}/devices/nosy-dev", key))
    gone = threading.Event()
    c.c.on_disconnect = lambda *a: gone.set()
    c.c.publish("devices/victim-dev/messages/events/", b"spoofed", qos=1)
    assert gone.wait(10)
    c.c.loop_stop()
    assert events(server, "victim-dev", 1, timeout=1) == []


def test_telemetry_that_is_not_stored_is_not_acknowledged(server, tmp_path):
    """A message over IoT Hub's 256 KB is refused: no PUBACK, the connection closes (the device redelivers or
    learns), nothing stored — never an acknowledgement for a message that is not durable."""
    with svc(server) as c:
        key = sym_key(c, "/enrollments/big-dev", {"attestation": {"type": "symmetricKey"}})
    with httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=server.ca_file), timeout=30) as d:
        assert d.put(f"/{server.id_scope}/registrations/big-dev/register", params={"api-version": PREVIEW}, json={},
                     headers={"Authorization": device_sas(server.id_scope, "big-dev", key)}).status_code == 202
    c = Client(server, "big-dev", hub_username("big-dev"), password=sas.generate(f"{HUB}/devices/big-dev", key))
    c.publish_refused("devices/big-dev/messages/events/", b"x" * (256 * 1024 + 1), timeout=10)
    assert events(server, "big-dev", 1, timeout=1) == []


def test_dps_and_hub_sessions_with_one_client_id_coexist_and_keep_no_mqtt_state(server, tmp_path):
    with svc(server) as c:
        key = sym_key(c, "/enrollments/cohab-dev", {"attestation": {"type": "symmetricKey"}})
    dps = Client(server, "cohab-dev", dps_username(server, "cohab-dev"),
                 password=device_sas(server.id_scope, "cohab-dev", key))
    dps.subscribe("$dps/registrations/res/#")
    dps.publish("$dps/registrations/PUT/iotdps-register/?$rid=1", json.dumps({"registrationId": "cohab-dev"}))
    assert dps.expect("$dps/registrations/res/")[0].startswith("$dps/registrations/res/200/")
    hub = Client(server, "cohab-dev", hub_username("cohab-dev"), password=sas.generate(f"{HUB}/devices/cohab-dev", key))
    assert hub.rc == 0 and hub.session_present is False
    hub.subscribe("$iothub/twin/res/#")
    hub.close()
    again = Client(server, "cohab-dev", hub_username("cohab-dev"), password=sas.generate(f"{HUB}/devices/cohab-dev", key))
    assert again.rc == 0 and again.session_present is True  # clean session 0: its subscriptions kept (in the store)
    # the DPS session was not taken over by the hub sessions of the same client id
    dps.publish("$dps/registrations/PUT/iotdps-register/?$rid=2", json.dumps({"registrationId": "cohab-dev"}))
    assert dps.expect("$dps/registrations/res/")[0].startswith("$dps/registrations/res/200/?$rid=2")
    again.close()
    dps.close()


def test_a_clean_session_0_reconnect_keeps_the_subscriptions_and_a_clean_session_ends_them(server):
    """As IoT Hub: a clean-session-0 reconnect holds the subscriptions of the device's last such session (session
    present 1) without subscribing again — Microsoft's Node.js SDK renews its SAS token so and relies on it — and the
    C2D message that waited meanwhile goes out; a clean-session-1 CONNECT ends them."""
    key = sas_device(server, "kept-dev")

    def connect(clean: bool) -> Client:
        return Client(server, "kept-dev", hub_username("kept-dev"), clean_session=clean,
                      password=sas.generate(f"{HUB}/devices/kept-dev", key))

    first = connect(False)
    assert first.session_present is False
    first.subscribe("devices/kept-dev/messages/devicebound/#", "$iothub/twin/PATCH/properties/desired/#")
    first.close()
    with svc(server) as c:
        assert c.post("/devices/kept-dev/messages/deviceBound", content=b"while away").status_code == 202
    again = connect(False)  # subscribes to nothing
    assert again.session_present is True
    assert again.expect("devices/kept-dev/messages/devicebound/")[1] == b"while away"
    with svc(server) as c:
        assert c.patch("/twins/kept-dev", json={"properties": {"desired": {"interval": 7}}}).status_code == 200
    assert json.loads(again.expect("$iothub/twin/PATCH/properties/desired/")[1])["interval"] == 7
    again.unsubscribe("devices/kept-dev/messages/devicebound/#")  # Node's disableC2D: kept without it from now on
    again.close()
    fewer = connect(False)
    assert fewer.session_present is True
    with svc(server) as c:
        assert c.post("/devices/kept-dev/messages/deviceBound", content=b"unsubscribed").status_code == 202
        assert c.patch("/twins/kept-dev", json={"properties": {"desired": {"interval": 8}}}).status_code == 200
    assert json.loads(fewer.expect("$iothub/twin/PATCH/properties/desired/")[1])["interval"] == 8
    assert fewer.messages.empty(), fewer.messages.get_nowait()  # the C2D message waits in the store
    fewer.close()
    clean = connect(True)
    assert clean.session_present is False
    clean.close()
    after = connect(False)
    assert after.session_present is False  # the clean session ended what was kept
    with pytest.raises(pytest.fail.Exception):  # held by nothing: the waiting message stays in the store
        after.expect("devices/kept-dev/messages/devicebound/", timeout=1)
    after.close()


def test_mqtt_over_websockets_on_the_https_listener(server, tmp_path):
    with svc(server) as c:
        key = sym_key(c, "/enrollments/ws-dev", {"attestation": {"type": "symmetricKey"}})
    # /$iothub/websocket (every SDK's hub path, Node and C DPS), / (C# DPS: wss://host:443/), /mqtt (Java DPS: Paho's default)
    for n, path in enumerate(("/$iothub/websocket", "/", "/mqtt")):
        dps = Client(server, "ws-dev", dps_username(server, "ws-dev"), password=device_sas(server.id_scope, "ws-dev", key),
                     websocket=True, ws_path=path)
        assert dps.rc == 0, path
        dps.subscribe("$dps/registrations/res/#")
        dps.publish(f"$dps/registrations/PUT/iotdps-register/?$rid=w{n}", json.dumps({"registrationId": "ws-dev"}))
        assert dps.expect("$dps/registrations/res/")[0].startswith(f"$dps/registrations/res/200/?$rid=w{n}"), path
        dps.close()
    # / and /mqtt are MQTT only for a WebSocket upgrade: a plain request there is still a 404
    with httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=server.ca_file), timeout=30) as h:
        for path in ("/", "/mqtt"):
            r = h.get(path)
            assert r.status_code == 404 and r.json()["errorCode"] == 404001, (path, r.text)

    async def upper_case_subprotocol() -> tuple[str | None, Packet]:
        """The C SDK asks for subprotocol "MQTT": the server agrees to that spelling and speaks MQTT."""
        ctx = ssl.create_default_context(cafile=str(server.ca_file))
        async with aiohttp.ClientSession() as session, session.ws_connect(
                f"{server.url.replace('https://', 'wss://')}/$iothub/websocket", protocols=("MQTT",), ssl=ctx) as ws:
            password = device_sas(server.id_scope, "ws-dev", key).encode()
            await ws.send_bytes(encode(Connect("ws-dev", True, 30, dps_username(server, "ws-dev"), password)))
            msg = await ws.receive(timeout=30)
            return ws.protocol, Decoder().feed(msg.data)[0]

    assert asyncio.run(upper_case_subprotocol()) == ("MQTT", Connack(False, 0))
    hub = Client(server, "ws-dev", hub_username("ws-dev"), password=sas.generate(f"{HUB}/devices/ws-dev", key),
                 websocket=True)
    assert hub.rc == 0
    hub.publish("devices/ws-dev/messages/events/via=ws", b"over websockets")
    [event] = events(server, "ws-dev", 1)
    assert event["event"]["payload"] == "over websockets" and event["event"]["properties"]["application"] == {"via": "ws"}
    hub.close()


def test_c2d_queue_is_bounded_and_messages_expire(server, tmp_path):
    with svc(server) as c:
        key = sym_key(c, "/enrollments/c2d-bound-dev", {"attestation": {"type": "symmetricKey"}})
    with httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=server.ca_file), timeout=30) as d:
        assert d.put(f"/{server.id_scope}/registrations/c2d-bound-dev/register", params={"api-version": PREVIEW},
                     json={}, headers={"Authorization": device_sas(server.id_scope, "c2d-bound-dev", key)}).status_code == 202
    with svc(server) as c:
        r = c.post("/devices/c2d-bound-dev/messages/deviceBound", content=b"short-lived", headers={"iothub-ttl": "1"})
        assert r.status_code == 202
        time.sleep(1.5)
        for n in range(50):
            r = c.post("/devices/c2d-bound-dev/messages/deviceBound", content=f"m{n}".encode())
            assert r.status_code == 202, (n, r.text)
        r = c.post("/devices/c2d-bound-dev/messages/deviceBound", content=b"one too many")
        assert r.status_code == 403 and r.json()["errorCode"] == 403004
        assert c.post("/devices/nobody/messages/deviceBound", content=b"x").status_code == 404
    d = Client(server, "c2d-bound-dev", hub_username("c2d-bound-dev"),
               password=sas.generate(f"{HUB}/devices/c2d-bound-dev", key))
    d.subscribe("devices/c2d-bound-dev/messages/devicebound/#")
    received = [d.expect("devices/c2d-bound-dev/messages/devicebound/")[1] for _ in range(50)]
    d.close()
    assert received == [f"m{n}".encode() for n in range(50)]  # in order, the expired one never delivered


def test_devices_of_a_ca_uploaded_to_the_hub(server, tmp_path):
    own = make_ca("hub-own-root")
    leaf, key = make_leaf("own-ca-dev", own)
    cert_file, key_file = write_identity(tmp_path, "own", [leaf], key)
    with svc(server) as c:
        assert c.put("/devices/own-ca-dev", json={"authentication": {"type": "certificateAuthority"}}).status_code == 200
        r = c.put("/linkedHubs/default/certificates/own-root", json={"properties": {"certificate": own.pem}})
        assert r.status_code == 201 and r.json()["properties"]["isVerified"] is False
        etag = r.json()["etag"]
    unverified = Client(server, "own-ca-dev", hub_username("own-ca-dev"), cert=cert_file, key=key_file)
    assert unverified.rc == 5  # uploaded but not proven: not trusted
    unverified.close()
    with svc(server) as c:
        r = c.post("/linkedHubs/default/certificates/own-root/generateVerificationCode", headers={"If-Match": etag})
        proof, _ = make_leaf(r.json()["properties"]["verificationCode"], own)
        r = c.post("/linkedHubs/default/certificates/own-root/verify", headers={"If-Match": r.json()["etag"]},
                   json={"certificate": proof.public_bytes(serialization.Encoding.PEM).decode()})
        assert r.json()["properties"]["isVerified"] is True, r.text
        listed = {v["name"]: v["properties"]["source"] for v in c.get("/linkedHubs/default/certificates").json()["value"]}
        assert listed["own-root"] == "uploaded"
        assert c.get("/certificates/own-root").status_code == 404  # a hub CA is not a DPS CA
    trusted = Client(server, "own-ca-dev", hub_username("own-ca-dev"), cert=cert_file, key=key_file)
    assert trusted.rc == 0
    trusted.close()


def test_deep_json_over_mqtt_is_answered_not_logged_as_a_traceback(server):
    """Issue 12.5 over MQTT: a reported patch or a renewal request the parser cannot follow gets a 400 answer."""
    with svc(server) as c:
        assert c.put("/devices/deep-mqtt", json={"deviceId": "deep-mqtt"}).status_code == 200
        key = c.get("/devices/deep-mqtt").json()["authentication"]["symmetricKey"]["primaryKey"]
    d = Client(server, "deep-mqtt", hub_username("deep-mqtt"), password=sas.generate(f"{HUB}/devices/deep-mqtt", key))
    assert d.rc == 0
    d.subscribe("$iothub/twin/res/#", "$iothub/credentials/res/#")
    deep = "[" * 30000 + "]" * 30000
    d.publish("$iothub/twin/PATCH/properties/reported/?$rid=deep1", deep)
    topic, payload = d.expect("$iothub/twin/res/")
    assert topic == "$iothub/twin/res/400/?$rid=deep1" and "nested more than" in json.loads(payload)["message"]
    eleven = {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": {"j": {"k": {"l": 1}}}}}}}}}}}}  # 11 below
    d.publish("$iothub/twin/PATCH/properties/reported/?$rid=deep2", json.dumps(eleven))
    topic, payload = d.expect("$iothub/twin/res/")
    assert topic == "$iothub/twin/res/400/?$rid=deep2" and "more than 10 levels" in json.loads(payload)["message"]
    d.publish("$iothub/credentials/POST/issueCertificate/?$rid=deep3", deep)
    topic, payload = d.expect("$iothub/credentials/res/")
    assert topic == "$iothub/credentials/res/400/?$rid=deep3"
    d.close()
    log = (server.data_dir.parent / "server.log").read_text()
    assert "Traceback" not in log and "RecursionError" not in log


def test_direct_method_timeouts_limits_and_a_device_that_subscribes_after_the_call(server):
    """IoT Hub's Invoke Device Method: connectTimeoutInSeconds (0-300, default 0) waits for a device that is not
    listening yet — it was ignored (and not even checked): a device subscribing a moment after the call was a 404; a
    device that does not exist is 404001 DeviceNotFound, not 404103 "not connected"; a payload over IoT Hub's 128 KB
    is refused (it was handed to the device, up to the 1 MB body limit)."""
    key = sas_device(server, "late-sub")
    with svc(server) as c:
        def invoke(device: str, **body):
            return c.post(f"/twins/{device}/methods", json={"methodName": "ping", **body})

        r = invoke("nobody-at-all", connectTimeoutInSeconds=5)
        assert (r.status_code, r.json()["errorCode"]) == (404, 404001), r.text
        assert invoke("nobody-at-all").json()["errorCode"] == 404001
        assert invoke("late-sub").json()["errorCode"] == 404103  # exists, not connected
        for bad in (301, -1, "5", True):
            r = invoke("late-sub", connectTimeoutInSeconds=bad)
            assert r.status_code == 400 and "connectTimeoutInSeconds must be within [0; 300]" in r.text, r.text
        r = invoke("late-sub", payload="x" * (128 * 1024))
        assert r.status_code == 400 and "'payload' must be at most 131072 bytes" in r.text, r.text
        started = time.monotonic()
        r = invoke("late-sub", connectTimeoutInSeconds=1, responseTimeoutInSeconds=5)
        assert r.json()["errorCode"] == 404103 and "timed out waiting for device 'late-sub'" in r.text, r.text
        assert 1 <= time.monotonic() - started < 4
        d = sas_client(server, "late-sub", key)  # connected, not subscribed yet

        def subscribe_and_answer() -> None:
            time.sleep(0.5)
            d.subscribe("$iothub/methods/POST/#")
            topic, payload = d.expect("$iothub/methods/POST/")
            d.publish(f"$iothub/methods/res/200/?$rid={topic.partition('$rid=')[2]}", payload)

        t = threading.Thread(target=subscribe_and_answer)
        t.start()
        try:
            r = invoke("late-sub", payload={"big": "y" * 100_000}, connectTimeoutInSeconds=20, responseTimeoutInSeconds=20)
        finally:
            t.join(30)
            d.close()
        assert r.status_code == 200 and r.json() == {"status": 200, "payload": {"big": "y" * 100_000}}, r.text[:300]


def test_twin_rules_as_iot_hub_documents_them_and_concurrent_patches_reach_the_device_in_order(server):
    """IoT Hub's documented deepest valid twin (tags.one...ten holding a property) was refused, and so were reported
    properties of 12,000 CJK characters (their JSON escapes were counted); concurrent desired PATCHes reached the
    device out of version order now and then (a later value overwritten on the device by an earlier one)."""
    documented: dict = {"property": "value"}
    for name in ("ten", "nine", "eight", "seven", "six", "five", "four", "three", "two", "one"):
        documented = {name: documented}
    key = sas_device(server, "order-dev")
    d = sas_client(server, "order-dev", key)
    try:
        d.subscribe("$iothub/twin/res/#", "$iothub/twin/PATCH/properties/desired/#")
        d.publish("$iothub/twin/PATCH/properties/reported/?$rid=big", json.dumps({"text": "漢" * 12_000, **documented}))
        assert d.expect("$iothub/twin/res/")[0].startswith("$iothub/twin/res/204/?$rid=big&$version="), "refused"
        with svc(server) as c:
            r = c.patch("/twins/order-dev", json={"tags": documented, "properties": {"desired": {"start": 0}}})
            assert r.status_code == 200, r.text
            first = r.json()["properties"]["desired"]["$version"]

            def patch(i: int) -> int:
                with svc(server) as each:
                    answer = each.patch("/twins/order-dev", json={"properties": {"desired": {"same": i}}})
                    assert answer.status_code == 200, answer.text
                    return answer.json()["properties"]["desired"]["$version"]

            with ThreadPoolExecutor(16) as pool:
                versions = sorted(pool.map(patch, range(48)))
            assert versions == list(range(first + 1, first + 49))
            last = c.get("/twins/order-dev").json()["properties"]["desired"]["same"]
        pushed = []
        while len(pushed) < 49:
            topic, payload = d.expect("$iothub/twin/PATCH/properties/desired/")
            pushed.append((int(topic.rpartition("=")[2]), json.loads(payload)))
        assert [v for v, _ in pushed] == list(range(first, first + 49)), [v for v, _ in pushed]
        assert pushed[-1][1] == {"same": last, "$version": first + 48}  # the device ends with the twin's value
    finally:
        d.close()


class RawMqtt:
    """A blocking MQTT client over TLS built on the codec, for what paho hides: granted and sent QoS, packet ids,
    acknowledging (or not) as a particular SDK does."""

    def __init__(self, server) -> None:
        ctx = ssl.create_default_context(cafile=str(server.ca_file))
        self.sock = ctx.wrap_socket(socket.create_connection(("localhost", server.mqtt_port), timeout=30),
                                    server_hostname="localhost")
        self.decoder = Decoder()
        self.packets: deque[Packet] = deque()

    def send(self, *items: Packet | bytes) -> None:
        self.sock.sendall(b"".join(i if isinstance(i, bytes) else encode(i) for i in items))

    def recv(self) -> Packet:
        while not self.packets:
            data = self.sock.recv(65536)
            assert data, "connection closed by the server"
            self.packets.extend(self.decoder.feed(data))
        return self.packets.popleft()

    def close(self) -> None:
        self.sock.close()


def test_dps_answers_at_the_granted_qos_and_a_puback_0_is_ignored(server):
    """Azure answers DPS at the QoS granted to $dps/registrations/res/# (1 for every SDK). The C# SDK PUBACKs every
    answer, QoS 0 ones with packet id 0 (DotNetty writes it unchecked): that must not cost it the connection."""
    rid = "dps-qos-dev"
    with svc(server) as c:
        key = sym_key(c, f"/enrollments/{rid}", {"attestation": {"type": "symmetricKey"}})
    for granted in (1, 0):
        raw = RawMqtt(server)
        try:
            raw.send(Connect(rid, True, 60, dps_username(server, rid), device_sas(server.id_scope, rid, key).encode()))
            assert raw.recv() == Connack(False, 0)
            raw.send(Subscribe(1, [("$dps/registrations/res/#", granted)]))
            assert raw.recv() == Suback(1, [granted])
            raw.send(Publish("$dps/registrations/PUT/iotdps-register/?$rid=1",
                             json.dumps({"registrationId": rid}).encode(), 1, packet_id=2))
            answer = raw.recv()  # published by the handler before the request's PUBACK
            assert isinstance(answer, Publish) and answer.topic == "$dps/registrations/res/200/?$rid=1", answer
            assert answer.qos == granted and (answer.packet_id is not None) == bool(granted)
            assert raw.recv() == Puback(2)
            # as C# does: PUBACK with the answer's packet id, which is 0 for a QoS 0 answer
            raw.send(b"\x40\x02" + (answer.packet_id or 0).to_bytes(2, "big"))
            if granted:
                raw.send(b"\x40\x02\x00\x00")  # a stray PUBACK 0 is ignored too
            op = json.loads(answer.payload)["operationId"]
            raw.send(Publish(f"$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId={op}", b" ", 1,
                             packet_id=3))
            polled = raw.recv()
            assert isinstance(polled, Publish) and polled.topic == "$dps/registrations/res/200/?$rid=2", polled
            assert polled.qos == granted and json.loads(polled.payload)["status"] == "assigned"
            assert raw.recv() == Puback(3)
            raw.send(Pingreq())  # the connection is still open
            assert raw.recv() == Pingresp()
            raw.send(Disconnect())
        finally:
            raw.close()


def _closed_by_server(raw: RawMqtt) -> bool:
    """The server ended the connection (no PUBACK, no answer first)."""
    try:
        return raw.sock.recv(1) == b""
    except (ConnectionError, ssl.SSLError):
        return True


def test_a_request_id_no_answer_topic_can_carry_closes_the_connection_before_anything_is_done(server):
    """``$rid`` is URL-decoded and echoed in the answer's topic: ``%23`` ('#'), ``%2B`` ('+'), ``%00`` or an id longer
    than a topic name can hold made the answer fail in the MQTT core after the work was done: a traceback, a reported
    patch stored without a reply, a registration assigned without one. Now the connection closes first, with one line."""
    dkey = sas_device(server, "rid-dev")
    with svc(server) as c:
        key = sym_key(c, "/enrollments/rid-dps-dev", {"attestation": {"type": "symmetricKey"}})
    requests = [("rid-dev", "$iothub/twin/PATCH/properties/reported/?$rid=%23", b'{"written": 1}'),
                ("rid-dev", "$iothub/twin/GET/?$rid=%2B", b""),
                ("rid-dev", "$iothub/twin/GET/?$rid=a%00", b""),
                ("rid-dev", "$iothub/twin/GET/?$rid=" + "r" * 65_512, b""),  # its answer's topic: 65,539 bytes
                ("rid-dev", "$iothub/credentials/POST/issueCertificate/?$rid=%23", b"{}"),
                ("rid-dps-dev", "$dps/registrations/PUT/iotdps-register/?$rid=%23", b'{"registrationId": "rid-dps-dev"}'),
                ("rid-dps-dev", "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=%00&operationId=x", b"")]
    for client, topic, payload in requests:
        raw = RawMqtt(server)
        try:
            if client == "rid-dev":
                raw.send(Connect(client, True, 60, hub_username(client),
                                 sas.generate(f"{HUB}/devices/{client}", dkey).encode()))
                filters = ["$iothub/twin/res/#", "$iothub/credentials/res/#"]
            else:
                raw.send(Connect(client, True, 60, dps_username(server, client),
                                 device_sas(server.id_scope, client, key).encode()))
                filters = ["$dps/registrations/res/#"]
            assert raw.recv() == Connack(False, 0)
            raw.send(Subscribe(1, [(f, 1) for f in filters]))
            assert raw.recv() == Suback(1, [1] * len(filters))
            raw.send(Publish(topic, payload, 1, packet_id=2))
            assert _closed_by_server(raw), topic[:80]
        finally:
            raw.close()
    with svc(server) as c:
        assert "written" not in c.get("/twins/rid-dev").json()["properties"]["reported"]
        assert c.get("/registrations/rid-dps-dev").status_code == 404
    log = (server.data_dir.parent / "server.log").read_text()
    assert "Traceback" not in log and "on_publish failed" not in log
    assert "refused: request id '#' holds '+', '#' or U+0000" in log and "request id is longer than 4096 bytes" in log


def test_nan_infinity_and_numbers_past_a_double_are_not_json_and_get_a_400(server):
    """Python's parser reads NaN, Infinity and 1e309 (inf): a reported patch holding one was stored and read back as
    ``NaN`` (a twin no JSON client can parse), and PostgreSQL's json column refused it (a traceback, no answer)."""
    d = sas_client(server, "nan-dev", sas_device(server, "nan-dev"))
    assert d.rc == 0
    try:
        d.subscribe("$iothub/twin/res/#")
        for i, (text, words) in enumerate((("NaN", "NaN is not a JSON number"), ("-Infinity", "-Infinity is not a JSON"),
                                           ("1e309", "number 1e309 is out of range"), ("[1, -1E400]", "out of range"))):
            d.publish(f"$iothub/twin/PATCH/properties/reported/?$rid=n{i}", f'{{"v": {text}}}')
            topic, payload = d.expect("$iothub/twin/res/")
            assert topic == f"$iothub/twin/res/400/?$rid=n{i}" and words in json.loads(payload)["message"], payload
        d.publish("$iothub/twin/PATCH/properties/reported/?$rid=ok", '{"v": 1.5e308, "w": 1e-400}')
        assert d.expect("$iothub/twin/res/")[0].startswith("$iothub/twin/res/204/?$rid=ok")
        d.publish("$iothub/twin/GET/?$rid=get", b"")
        _, payload = d.expect("$iothub/twin/res/")
        assert json.loads(payload)["reported"] == {"v": 1.5e308, "w": 0.0, "$version": 2}
    finally:
        d.close()
    assert "Traceback" not in (server.data_dir.parent / "server.log").read_text()


def test_the_event_stream_refuses_what_is_not_a_position_or_a_number_with_a_400(server):
    """GET /events: a position past a 64-bit column, "²" (str.isdigit says yes, int() says no), a negative or
    infinite timeout and a count that is not a whole number are 400s naming the parameter, not 500s."""
    with svc(server) as c:
        for params, words in (({"from": "9" * 19}, "from must be earliest, latest or a position"),
                              ({"from": "\u00b2"}, "from must be earliest, latest or a position"),
                              ({"from": "-1"}, "from must be earliest, latest or a position"),
                              ({"timeout": "-1"}, "timeout must be a number of seconds"),
                              ({"timeout": "inf"}, "timeout must be a number of seconds"),
                              ({"timeout": "nan"}, "timeout must be a number of seconds"),
                              ({"count": "1.5"}, "count a whole number")):
            r = c.get("/events", params={"timeout": "1", **params})
            assert r.status_code == 400 and words in r.text, (params, r.status_code, r.text)
        assert c.get("/events", params={"from": "9" * 18, "timeout": "0.1"}).status_code == 200


def test_unsubscribe_stops_deliveries_and_a_trailing_slash_is_not_part_of_a_property(server):
    d = sas_client(server, "unsub-dev", sas_device(server, "unsub-dev"))
    assert d.rc == 0
    try:
        # the C# SDK ends the telemetry topic with '/' after a property bag
        d.publish("devices/unsub-dev/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8&k=v/", b'{"t": 1}')
        [event] = events(server, "unsub-dev", 1)
        props = event["event"]["properties"]
        assert props["application"] == {"k": "v"} and props["system"]["content-encoding"] == "utf-8", props
        c2d = "devices/unsub-dev/messages/devicebound/#"
        desired = "$iothub/twin/PATCH/properties/desired/#"
        d.subscribe(c2d, desired, "$iothub/methods/POST/#")
        with svc(server) as c:
            assert c.post("/devices/unsub-dev/messages/deviceBound", content=b"first").status_code == 202
            assert d.expect("devices/unsub-dev/messages/devicebound/")[1] == b"first"
            assert c.patch("/twins/unsub-dev", json={"properties": {"desired": {"n": 1}}}).status_code == 200
            d.expect("$iothub/twin/PATCH/properties/desired/")
        # Node disableC2D / disableTwinDesiredPropertiesUpdates / disableMethods: UNSUBSCRIBE, then nothing more
        d.unsubscribe(c2d, desired, "$iothub/methods/POST/#")
        with svc(server) as c:
            assert c.post("/devices/unsub-dev/messages/deviceBound", content=b"second").status_code == 202
            assert c.patch("/twins/unsub-dev", json={"properties": {"desired": {"n": 2}}}).status_code == 200
            r = c.post("/twins/unsub-dev/methods", json={"methodName": "ping", "responseTimeoutInSeconds": 5})
            assert r.status_code == 404 and r.json()["errorCode"] // 1000 == 404, r.text
        time.sleep(1)
        assert d.messages.empty(), d.messages.get_nowait()
        # the message stayed queued (not marked delivered): it comes once the device subscribes again
        d.subscribe(c2d)
        assert d.expect("devices/unsub-dev/messages/devicebound/")[1] == b"second"
    finally:
        d.close()


def test_refused_subscriptions_write_one_log_line_per_connection(server):
    """Found by fuzzing: every refused filter was an INFO line, and one SUBSCRIBE may carry tens of thousands of them
    (a 256 KB packet of 60,000 made 60,000 lines; a client looping wrote 265 MB of log a minute). Now the first refusal
    of a connection names the device and filter at INFO, the rest go to DEBUG; the SUBACK still refuses each."""
    dkey = sas_device(server, "subflood-dev")
    raw = RawMqtt(server)
    try:
        raw.send(Connect("subflood-dev", True, 60, hub_username("subflood-dev"),
                         sas.generate(f"{HUB}/devices/subflood-dev", dkey).encode()))
        assert raw.recv() == Connack(False, 0)
        raw.send(Subscribe(1, [(f"not/allowed/{i}", 1) for i in range(2000)] + [("$iothub/twin/res/#", 1)]))
        assert raw.recv() == Suback(1, [0x80] * 2000 + [1])
        raw.send(Pingreq())  # the session stays up
        assert raw.recv() == Pingresp()
    finally:
        raw.close()
    log = (server.data_dir.parent / "server.log").read_text()
    assert log.count("device 'subflood-dev': subscription to") == 1, log.count("device 'subflood-dev': subscription to")
    assert "device 'subflood-dev': subscription to 'not/allowed/0' refused" in log


def test_c2d_purge_and_a_deleted_device_take_its_queue_with_them(server):
    """``DELETE /devices/{id}/commands`` (IoT Hub's purge, C#'s ``PurgeMessageQueueAsync``) empties one device's queue;
    deleting a device deletes its queue, so a device created again with the id is not handed the old one's messages
    (it was: no foreign key ties the queue to the identity)."""
    sas_device(server, "purge-dev")
    with svc(server) as c:
        for body in (b"old-1", b"old-2"):
            assert c.post("/devices/purge-dev/messages/deviceBound", content=body).status_code == 202
        r = c.delete("/devices/Purge-Dev/commands")
        assert r.status_code == 200 and r.json()["totalMessagesPurged"] == 2, r.text
        r = c.delete("/devices/nobody-dev/commands")
        assert r.status_code == 404 and r.json()["errorCode"] // 1000 == 404, r.text
        assert c.post("/devices/purge-dev/messages/deviceBound", content=b"before-delete").status_code == 202
        assert c.delete("/devices/purge-dev").status_code == 204
    key = sas_device(server, "purge-dev")
    with svc(server) as c:
        assert c.post("/devices/purge-dev/messages/deviceBound", content=b"fresh").status_code == 202
    d = sas_client(server, "purge-dev", key)
    try:
        d.subscribe("devices/purge-dev/messages/devicebound/#")
        assert d.expect("devices/purge-dev/messages/devicebound/")[1] == b"fresh"  # first: nothing purged or deleted
    finally:
        d.close()
