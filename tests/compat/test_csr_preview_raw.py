"""The certificate-management preview (api-version 2025-07-01-preview) with raw clients that follow the
published wire format and nothing of opendps: SAS tokens made with hmac/hashlib, the CSR with openssl,
HTTPS with httpx, MQTT with paho-mqtt; response topics parsed the way the Azure Python SDK parses them.
(The Azure Python SDK itself has no CSR support.)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import queue
import ssl
import time
import urllib.parse
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tests.conftest import run_openssl
from tests.test_device_api import namespace, svc, sym_key

SERVER_STORES = ("sqlite",)  # the wire is the subject; the domain runs on both stores in tests/unit (tests/conftest.py)

API_VERSION = "2025-07-01-preview"


def sas_token(resource: str, key_b64: str, ttl: int = 3600) -> str:
    """Azure's device SAS: HMAC-SHA256 over quote(resource) + "\\n" + expiry, keyed with the decoded key."""
    sr = urllib.parse.quote(resource, safe="")
    se = str(int(time.time()) + ttl)
    sig = base64.b64encode(hmac.new(base64.b64decode(key_b64), f"{sr}\n{se}".encode(), hashlib.sha256).digest())
    return f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig.decode(), safe='')}&se={se}&skn=registration"


def openssl_csr(directory: Path, rid: str) -> tuple[str, Path]:
    """The preview's recipe: an EC P-384 key and a DER CSR with CN = registration id, base64 without PEM armour."""
    directory.mkdir(parents=True, exist_ok=True)
    run_openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384", "-nodes", "-keyout",
                str(directory / "op.key"), "-subj", f"/CN={rid}", "-outform", "DER", "-out", str(directory / "op.csr"))
    return base64.b64encode((directory / "op.csr").read_bytes()).decode(), directory / "op.key"


def check_chain(directory: Path, state: dict, rid: str, key_file: Path) -> None:
    chain = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in state["issuedCertificateChain"]]
    assert len(chain) == 3 and chain[0].subject.rfc4514_string() == f"CN={rid}"
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    assert chain[0].public_key().public_numbers() == key.public_key().public_numbers()
    for name, cert in zip(("leaf", "ica", "root"), chain, strict=True):
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    run_openssl("verify", "-CAfile", str(directory / "root.pem"), "-untrusted", str(directory / "ica.pem"),
                str(directory / "leaf.pem"))


def enrollment(server, rid: str) -> str:
    with svc(server) as c:
        namespace(c, f"{rid}-ns", f"{rid}-p")
        return sym_key(c, f"/enrollments/{rid}", {"attestation": {"type": "symmetricKey"}, "credentialPolicyName": f"{rid}-p"})


def test_csr_preview_over_https_with_a_raw_client(server, tmp_path):
    rid = "raw-https-csr"
    key = enrollment(server, rid)
    csr, key_file = openssl_csr(tmp_path, rid)
    headers = {"Authorization": sas_token(f"{server.id_scope}/registrations/{rid}", key),
               "Content-Type": "application/json; charset=utf-8", "Accept": "application/json"}
    base = f"/{server.id_scope}/registrations/{rid}"
    with httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=server.ca_file), timeout=30) as h:
        r = h.put(f"{base}/register", params={"api-version": API_VERSION}, headers=headers,
                  content=json.dumps({"registrationId": rid, "csr": csr}))
        # assigned at once: 202 (as Azure; C# takes nothing else) whose body is the final state, no Retry-After
        assert r.status_code == 202 and r.json()["status"] == "assigned" and "Retry-After" not in r.headers, r.text
        check_chain(tmp_path, r.json()["registrationState"], rid, key_file)
        polled = h.get(f"{base}/operations/{r.json()['operationId']}", params={"api-version": API_VERSION},
                       headers=headers)
        assert polled.status_code == 200 and polled.json() == r.json(), polled.text
        # the status lookup never returns the chain, and refuses a csr
        lookup = h.post(base, params={"api-version": API_VERSION}, headers=headers, content=json.dumps({"registrationId": rid}))
        assert lookup.status_code == 200 and "issuedCertificateChain" not in lookup.json()
        refused = h.post(base, params={"api-version": API_VERSION}, headers=headers,
                         content=json.dumps({"registrationId": rid, "csr": csr}))
        assert refused.status_code == 400 and refused.json()["errorCode"] // 1000 == 400


def parse_response_topic(topic: str) -> tuple[int, dict[str, str]]:
    """As azure-iot-device parses it: split on '$'; status = parts[1].split('/')[3]; query = parts[2]."""
    parts = topic.split("$")
    status = int(parts[1].split("/")[3])
    query = dict(urllib.parse.parse_qsl(parts[2], keep_blank_values=True))
    return status, query


def test_csr_preview_over_mqtt_with_a_raw_client(server, tmp_path):
    rid = "raw-mqtt-csr"
    key = enrollment(server, rid)
    csr, key_file = openssl_csr(tmp_path, rid)
    inbox: queue.Queue = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=rid, clean_session=False, protocol=mqtt.MQTTv311)
    client.username_pw_set(f"{server.id_scope}/registrations/{rid}/api-version={API_VERSION}&ClientVersion=raw-client",
                           sas_token(f"{server.id_scope}/registrations/{rid}", key))
    client.tls_set(ca_certs=str(server.ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.on_message = lambda c, u, m: inbox.put((m.topic, m.payload))
    client.connect("localhost", server.mqtt_port, keepalive=60)
    client.loop_start()
    try:
        client.subscribe("$dps/registrations/res/#", qos=1)
        client.publish("$dps/registrations/PUT/iotdps-register/?$rid=1f1c5a4e", json.dumps(
            {"payload": None, "registrationId": rid, "csr": csr}), qos=1)
        topic, payload = inbox.get(timeout=30)
        status, query = parse_response_topic(topic)
        assert (status, query["rid"]) == (200, "1f1c5a4e") and "retry-after" not in query
        result = json.loads(payload)
        assert result["status"] == "assigned"
        check_chain(tmp_path, result["registrationState"], rid, key_file)
        client.publish(f"$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2b7d&operationId={result['operationId']}",
                       " ", qos=1)
        topic, payload = inbox.get(timeout=30)
        status, query = parse_response_topic(topic)
        assert (status, query["rid"]) == (200, "2b7d") and json.loads(payload) == result
    finally:
        client.disconnect()
        client.loop_stop()
