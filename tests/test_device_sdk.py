"""The device SDK (``opendps.device``) against a real ``opendps serve`` (SQLite and PostgreSQL), no mocks.

Provisioning over HTTPS and MQTT with every bootstrap credential and a CSR made by ``device.keys``;
the on-disk certificate store; the hub client (telemetry, twin, desired, methods, C2D, renewal,
reconnect, certificate switch with rollback); the sync wrappers; and that the package imports without
any server code.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from tests.test_device_api import make_ca, make_leaf, namespace, openssl_verify_chain, put, svc, sym_key, upload_verified
from tests.test_device_api import write_identity as write_boot_identity
from tests.test_mqtt_hub import events, pending_c2d

from opendps.device import keys
from opendps.device.hub import C2dMessage, HubClient, HubError, decode_property_bag, encode_property_bag
from opendps.device.mqtt import ConnectionLost, ConnectRefused
from opendps.device.provisioning import ProvisioningClient, ProvisioningError, RegistrationResult
from opendps.device.store import CertificateStore, StoreError
from opendps.device.sync import SyncHubClient, provision

SERVER_STORES = ("sqlite",)  # the CLI/SDK/front end is the subject, not the store (tests/conftest.py)

pytestmark = pytest.mark.timeout(120, func_only=True)
HUB = "localhost"
FAST = {"min_wait": 0.0, "max_wait": 0.05}  # honour Retry-After, but shrunk for tests


def https_port(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def client(server, rid: str, transport: str = "https", **credential) -> ProvisioningClient:
    return ProvisioningClient(HUB, server.id_scope, rid, https_port=https_port(server), mqtt_port=server.mqtt_port,
                              ca_file=server.ca_file, transport=transport, **FAST, **credential)


def policy_ica(c, ns: str, policy: str) -> x509.Certificate:
    doc = c.get(f"/namespaces/{ns}/credentials/default/policies/{policy}").json()
    return x509.load_pem_x509_certificate(
        doc["properties"]["certificate"]["certificateAuthorityConfiguration"]["certificate"].encode())


def check_issued(result: RegistrationResult, key, rid: str, ica: x509.Certificate, directory: Path) -> None:
    chain = result.issued_chain
    assert [result.status, result.device_id, result.assigned_hub] == ["assigned", rid, HUB]
    assert len(chain) == 3
    leaf, issuing, root = chain
    assert keys.public_keys_match(key, leaf)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == rid
    assert leaf.issuer == issuing.subject and issuing.issuer == root.subject and root.issuer == root.subject
    assert issuing == ica
    directory.mkdir(parents=True, exist_ok=True)
    openssl_verify_chain(directory, chain)


# ---------------------------------------------------------------- no server
def test_package_imports_without_server_code():
    code = """
import sys
BLOCKED = ("opendps.frontends", "opendps.services", "opendps.hub", "opendps.provisioning", "opendps.store",
           "opendps.pki", "opendps.registry",
           "opendps.instance", "opendps.server", "opendps.cli", "opendps.transport.tls", "opendps.transport.mqtt.server",
           "sqlalchemy", "aiohttp", "OpenSSL")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED or name.startswith(tuple(b + "." for b in BLOCKED)):
            raise ImportError(f"blocked import of {name}")
        return None
sys.meta_path.insert(0, Block())
import opendps.device, opendps.device.keys, opendps.device.store, opendps.device.mqtt
import opendps.device.provisioning, opendps.device.hub, opendps.device.sync
print(" ".join(sorted(m for m in sys.modules if m.startswith("opendps"))))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == sorted([
        "opendps", "opendps.device", "opendps.device.hub", "opendps.device.keys", "opendps.device.mqtt",
        "opendps.device.provisioning", "opendps.device.store", "opendps.device.sync", "opendps.files", "opendps.transport",
        "opendps.transport.mqtt", "opendps.transport.mqtt.codec", "opendps.transport.sas"])


def test_a_status_in_a_response_topic_that_is_not_a_number_is_no_status():
    """A server's response topic names its status; what int() refuses ("²" passes str.isdigit) must not raise in
    the client's receive callback."""
    from opendps.device.hub import TWIN_RES
    from opendps.device.mqtt import response_status, topic_query
    from opendps.device.provisioning import RESPONSE_PREFIX

    for prefix in (TWIN_RES, RESPONSE_PREFIX):  # the hub's twin answers and DPS's answers share the parse
        assert response_status(f"{prefix}204/?$rid=1", prefix) == 204
        for bad in ("\u00b2", "9" * 5000, "abc", ""):
            assert response_status(f"{prefix}{bad}/?$rid=1", prefix) == 0
    assert topic_query(f"{RESPONSE_PREFIX}202/?$rid=7&retry-after=3") == {"$rid": "7", "retry-after": "3"}


def test_keys_csr_and_summary():
    key, csr = keys.new_key_and_csr("dev-1")
    parsed = x509.load_der_x509_csr(base64.b64decode(csr))
    assert parsed.is_signature_valid and parsed.signature_hash_algorithm.name == "sha384"
    assert parsed.public_key().curve.name == "secp384r1" and keys.public_keys_match(key, parsed)
    assert parsed.subject.rfc4514_string() == "CN=dev-1"
    assert keys.generate_key("P-256").curve.name == "secp256r1"
    with pytest.raises(ValueError, match="curve"):
        keys.generate_key("P-521")  # type: ignore[arg-type]
    # Azure's documented example of a derived key (openssl sha256 -mac HMAC recipe), computed independently here
    group = base64.b64encode(b"g" * 64).decode()
    proc = subprocess.run(["openssl", "dgst", "-sha256", "-mac", "HMAC", "-macopt", f"hexkey:{(b'g' * 64).hex()}",
                           "-binary"], input=b"dev-1", capture_output=True, check=True)
    assert keys.derive_device_key(group, "dev-1") == base64.b64encode(proc.stdout).decode()
    leaf, _ = make_leaf("summary", make_ca("summary-ca"))
    summary = keys.certificate_summary(leaf)
    assert summary == {"validFrom": leaf.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
                       "validUntil": leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
                       "serialNumber": f"{leaf.serial_number:X}",
                       "thumbprint": leaf.fingerprint(hashes.SHA256()).hex().upper(), "issuer": "CN=summary-ca"}
    start = leaf.not_valid_before_utc
    assert keys.renewal_time(leaf) == start + (leaf.not_valid_after_utc - start) * 0.8
    assert not keys.renewal_due(leaf, now=keys.renewal_time(leaf) - timedelta(seconds=1))
    assert keys.renewal_due(leaf, now=keys.renewal_time(leaf))
    bag = encode_property_bag({"line": "a b", "flag": None}, message_id="m/1", content_type="application/json")
    assert bag == "%24.mid=m%2F1&%24.ct=application%2Fjson&line=a%20b&flag"
    assert decode_property_bag(bag + "&iothub-ack=full") == ({"mid": "m/1", "ct": "application/json", "ack": "full"},
                                                             {"line": "a b", "flag": None})


def _issued(ca, key, cn: str) -> list[x509.Certificate]:
    """A chain [leaf for ``key``, CA] like the one DPS returns (the store only needs leaf + issuer)."""
    now = datetime.now(UTC)
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=7))
            .sign(ca.key, hashes.SHA256()))
    return [leaf, ca.cert, ca.cert]


def test_certificate_store_atomic_writes_previous_confirm_and_rollback(tmp_path, monkeypatch):
    ca = make_ca("store-ca")
    store = CertificateStore(tmp_path / "creds")
    assert store.current() is None and not store.pending
    with pytest.raises(StoreError, match="no previous"):
        store.rollback()
    k1 = keys.generate_key()
    first_chain = _issued(ca, k1, "store-dev")
    first = store.save(k1, first_chain)
    assert stat.S_IMODE(first.key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(first.chain_file.stat().st_mode) == 0o644
    assert keys.load_certificates(first.chain_file) == first_chain[:2]
    assert keys.load_certificates(first.fullchain_file) == first_chain
    assert keys.load_certificates(first.cert_file) == first_chain[:1]
    assert keys.public_keys_match(keys.load_private_key(first.key_file), first.certificate)
    assert not store.pending  # nothing to go back to after the first save
    with pytest.raises(ValueError, match="does not certify"):
        store.save(keys.generate_key(), first_chain)
    # a second set: the first moves to previous/ until confirm()
    k2 = keys.generate_key()
    second = store.save(k2, _issued(ca, k2, "store-dev"))
    assert store.pending and second.certificate != first.certificate
    assert (tmp_path / "creds/previous/device.pem").read_bytes() == first_chain[0].public_bytes(serialization.Encoding.PEM)
    assert stat.S_IMODE((tmp_path / "creds/previous/device.key").stat().st_mode) == 0o600
    # a retried renewal before confirmation keeps the last *confirmed* set as previous
    k3 = keys.generate_key()
    store.save(k3, _issued(ca, k3, "store-dev"))
    assert store.rollback().certificate == first.certificate and not store.pending
    assert keys.public_keys_match(keys.load_private_key(first.key_file), first_chain[0])
    second = store.save(k2, _issued(ca, k2, "store-dev"))
    store.confirm()
    assert not store.pending and not (tmp_path / "creds/previous").exists()
    assert store.current().certificate == second.certificate
    # no temporary file is ever left behind, and every file parses
    assert sorted(p.name for p in (tmp_path / "creds").iterdir()) == ["chain.pem", "device.key", "device.pem",
                                                                      "fullchain.pem"]
    # a crash in the middle of a renewal (after the leaf was replaced, before the key): the set is refused, and
    # rollback() restores the confirmed one; the failed write leaves no temporary file
    real_replace = os.replace

    def crash_on_chain(src, dst):
        if Path(dst) == tmp_path / "creds" / "chain.pem":
            raise OSError("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr("opendps.files.os.replace", crash_on_chain)
    k4 = keys.generate_key()
    with pytest.raises(OSError, match="power cut"):
        store.save(k4, _issued(ca, k4, "store-dev"))
    monkeypatch.setattr("opendps.files.os.replace", real_replace)
    assert not [p for p in (tmp_path / "creds").rglob("*") if p.name.endswith(".tmp")]
    with pytest.raises(StoreError, match="does not match"):
        store.current()
    assert store.rollback().certificate == second.certificate


def test_connection_errors_are_retried_then_reported(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connection refused
    ca = make_ca("nowhere-ca")
    (tmp_path / "ca.pem").write_text(ca.pem)
    for transport in ("https", "mqtt"):
        c = ProvisioningClient("localhost", "0ne00000000", "dev", https_port=port, mqtt_port=port, ca_file=tmp_path / "ca.pem",
                               transport=transport, symmetric_key=base64.b64encode(b"k" * 32).decode(), max_retries=2,
                               backoff_base=0.01)
        with pytest.raises(ProvisioningError, match="giving up after 3 attempts") as info:
            asyncio.run(c.register())
        assert info.value.status == 503
    with pytest.raises(ValueError, match="exactly one"):
        ProvisioningClient("h", "s", "r", symmetric_key="a", group_key="b")


# ---------------------------------------------------------------- provisioning against the server
@pytest.mark.parametrize("transport", ["https", "mqtt"])
def test_provisioning_with_csr_for_every_bootstrap_credential(server, tmp_path, transport):
    ns, policy = f"sdk-{transport}-ns", f"sdk-{transport}-p"
    root = make_ca(f"sdk-{transport}-boot-root")
    with svc(server) as c:
        namespace(c, ns, policy)
        ica = policy_ica(c, ns, policy)
        individual = sym_key(c, f"/enrollments/{transport}-sym-dev", {"attestation": {"type": "symmetricKey"},
                                                                       "credentialPolicyName": policy})
        group = sym_key(c, f"/enrollmentGroups/{transport}-sym-group", {"attestation": {"type": "symmetricKey"},
                                                                         "credentialPolicyName": policy})
        upload_verified(server, c, f"sdk-{transport}-boot-root", root)
        put(c, f"/enrollmentGroups/{transport}-x509-group", {"credentialPolicyName": policy, "attestation": {
            "type": "x509", "x509": {"caReferences": {"primary": f"sdk-{transport}-boot-root"}}}})
    boot_leaf, boot_key = make_leaf(f"{transport}-x509-dev", root)
    boot = write_boot_identity(tmp_path, "boot", [boot_leaf], boot_key)
    cases = [(f"{transport}-sym-dev", {"symmetric_key": individual}, None),
             (f"{transport}-grp-dev", {"group_key": group}, "symmetricKey"),
             (f"{transport}-x509-dev", {"x509": boot}, "x509")]
    for rid, credential, group_kind in cases:
        key, csr = keys.new_key_and_csr(rid)
        result = asyncio.run(client(server, rid, transport, **credential).register(csr, payload={"model": "x1"}))
        check_issued(result, key, rid, ica, tmp_path / rid)
        state = result.raw["registrationState"]
        if group_kind is not None:
            expected = f"{transport}-sym-group" if group_kind == "symmetricKey" else f"{transport}-x509-group"
            assert state[group_kind]["enrollmentGroupId"] == expected
        assert result.substatus == "initialAssignment"
    # without a CSR: assigned, no chain (and the plain api-version is accepted)
    again = asyncio.run(client(server, f"{transport}-sym-dev", transport, symmetric_key=individual).register())
    assert again.status == "assigned" and again.issued_chain == []


@pytest.mark.parametrize("transport", ["https", "mqtt"])
def test_a_final_answer_to_register_is_taken_without_polling(server, transport, monkeypatch):
    """HTTPS answers register with 202 (all C# accepts), MQTT with res/200: either way a body whose status is final
    ends the registration; only ``assigning``/``unassigned`` is polled."""
    rid = f"sdk-no-poll-{transport}"
    with svc(server) as c:
        key = sym_key(c, f"/enrollments/{rid}", {"attestation": {"type": "symmetricKey"}})
    firsts: list[dict] = []
    fetched: list[str] = []
    original = ProvisioningClient._poll

    async def spy(self, first, retry_after, fetch):
        firsts.append(first)

        async def counted(operation_id: str):
            fetched.append(operation_id)
            return await fetch(operation_id)

        return await original(self, first, retry_after, counted)

    monkeypatch.setattr(ProvisioningClient, "_poll", spy)
    result = asyncio.run(client(server, rid, transport, symmetric_key=key).register())
    assert result.status == "assigned" and result.device_id == rid
    assert [f["status"] for f in firsts] == ["assigned"] and fetched == []


def test_refusals_raise_provisioning_error_with_the_service_code(server):
    with svc(server) as c:
        sym_key(c, "/enrollments/sdk-bad-key-dev", {"attestation": {"type": "symmetricKey"}})
        key = sym_key(c, "/enrollments/sdk-disabled-dev", {"attestation": {"type": "symmetricKey"},
                                                            "provisioningStatus": "disabled"})
    wrong = base64.b64encode(b"w" * 32).decode()
    for transport in ("https", "mqtt"):
        with pytest.raises(ProvisioningError) as info:
            asyncio.run(client(server, "sdk-bad-key-dev", transport, symmetric_key=wrong).register())
        if transport == "https":
            assert (info.value.status, info.value.error_code) == (401, 401002), info.value
        else:  # MQTT checks the credential at CONNECT: no session, so no error body either
            assert (info.value.status, info.value.error_code) == (401, None) and "return code 5" in str(info.value)
        with pytest.raises(ProvisioningError) as info:
            asyncio.run(client(server, "sdk-disabled-dev", transport, symmetric_key=key).register())
        assert (info.value.status, info.value.error_code) == (403, 403003), info.value
        assert "disabled" in info.value.message


@pytest.mark.parametrize("transport", ["https", "mqtt"])
def test_throttling_is_retried_after_retry_after(server, transport):
    import time

    rid = f"sdk-throttled-{transport}"
    with svc(server) as c:
        key = sym_key(c, f"/enrollments/{rid}", {"attestation": {"type": "symmetricKey"}})
    for _ in range(10):  # the eleventh registration within a minute is throttled (429 + Retry-After)
        assert asyncio.run(client(server, rid, transport, symmetric_key=key).register()).status == "assigned"
    slow = ProvisioningClient(HUB, server.id_scope, rid, https_port=https_port(server), mqtt_port=server.mqtt_port,
                              ca_file=server.ca_file, transport=transport, symmetric_key=key, min_wait=0.0, max_wait=1.0,
                              backoff_base=0.01, max_retries=1)
    started = time.monotonic()
    with pytest.raises(ProvisioningError, match="giving up after 2 attempts") as info:
        asyncio.run(slow.register())
    # the service's Retry-After (>= 1 s) was honoured up to max_wait, not the 10 ms backoff
    assert info.value.status == 429 and time.monotonic() - started >= 1.0


# ---------------------------------------------------------------- hub
async def _wait_for(predicate, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def test_hub_client_end_to_end_with_renewal_and_certificate_switch(server, tmp_path):
    rid = "sdk-hub-dev"
    with svc(server) as c:
        namespace(c, "sdk-hub-ns", "sdk-hub-p")
        enrollment_key = sym_key(c, f"/enrollments/{rid}", {
            "attestation": {"type": "symmetricKey"}, "credentialPolicyName": "sdk-hub-p",
            "initialTwin": {"properties": {"desired": {"interval": 60}}}})
    store = CertificateStore(tmp_path / "creds")
    key, csr = keys.new_key_and_csr(rid)
    result = asyncio.run(client(server, rid, symmetric_key=enrollment_key).register(csr))
    current = store.save(key, result.issued_chain)
    first_serial = current.certificate.serial_number

    async def scenario() -> dict:
        seen: dict = {"desired": asyncio.Queue(), "c2d": asyncio.Queue()}
        hub = HubClient(result.assigned_hub, result.device_id, port=server.mqtt_port, ca_file=server.ca_file,
                        x509=current.tls_identity, backoff_base=0.05, backoff_max=0.2)
        hub.on_desired(seen["desired"].put)

        async def reboot(name: str, payload: dict) -> tuple[int, dict]:
            twin = await hub.get_twin()  # a handler may use the client itself
            return 201, {"method": name, "got": payload, "interval": twin["desired"]["interval"]}

        hub.on_method("reboot", reboot)
        hub.on_c2d(seen["c2d"].put)
        await hub.connect()
        await hub.send_telemetry({"temperature": 21.5}, {"line": "a b"}, message_id="m-1")
        twin = await hub.get_twin()
        assert twin["desired"]["interval"] == 60 and twin["reported"] == {"$version": 1}
        summary = keys.certificate_summary(current.certificate)
        assert await hub.report_certificate(current.certificate) == 2
        with svc(server) as c:
            assert c.get(f"/twins/{rid}").json()["properties"]["reported"]["certificate"] == summary
            r = c.patch(f"/twins/{rid}", json={"properties": {"desired": {"interval": 5}}})
            version = r.json()["properties"]["desired"]["$version"]
        assert await asyncio.wait_for(seen["desired"].get(), 10) == {"interval": 5, "$version": version}

        def invoke(method: str) -> dict:
            with svc(server) as c:
                r = c.post(f"/twins/{rid}/methods", json={"methodName": method, "payload": {"delay": 3},
                                                          "responseTimeoutInSeconds": 10})
                return r.json()

        assert await asyncio.to_thread(invoke, "reboot") == {
            "status": 201, "payload": {"method": "reboot", "got": {"delay": 3}, "interval": 5}}
        unknown = await asyncio.to_thread(invoke, "selfdestruct")
        assert unknown["status"] == 404 and "not implemented" in unknown["payload"]["message"]

        def send_c2d() -> int:
            with svc(server) as c:
                return c.post(f"/devices/{rid}/messages/deviceBound", content=b"hello device",
                              headers={"iothub-messageid": "c2d-1", "iothub-app-color": "blue"}).status_code

        assert await asyncio.to_thread(send_c2d) == 202
        message: C2dMessage = await asyncio.wait_for(seen["c2d"].get(), 10)
        assert (message.body, message.message_id, message.properties) == (b"hello device", "c2d-1", {"color": "blue"})
        await _wait_for(lambda: pending_c2d(server) == 0)  # acknowledged after the callback

        # the connection drops: telemetry queued meanwhile is delivered after the automatic reconnect
        await hub._client.close(ConnectionLost("network cut (test)"))
        lost_while_down = hub.queue_telemetry(b"during outage", {"n": "2"})
        await asyncio.wait_for(lost_while_down, 15)
        assert hub.reconnects == 1 and hub.pending_telemetry == 0

        # renewal through the hub, then switch to the new certificate; confirm once connected
        new_key, new_csr = keys.new_key_and_csr(rid)
        renewed = await hub.renew_certificate(new_csr)
        assert renewed[0].serial_number != first_serial and keys.public_keys_match(new_key, renewed[0])
        assert renewed[0].subject == current.certificate.subject and renewed[1:] == result.issued_chain[1:]
        openssl_verify_chain(tmp_path, renewed)
        new = store.save(new_key, renewed)
        assert store.pending
        queued = hub.queue_telemetry(b"across the switch", {"n": "3"})
        await hub.switch_credentials(x509=new.tls_identity)
        store.confirm()
        await asyncio.wait_for(queued, 15)
        assert hub.connected and not store.pending
        with pytest.raises(HubError) as info:
            await hub.renew_certificate("bm90IGEgY3Ny")  # "not a csr"
        assert info.value.status == 400 and info.value.error_code // 1000 == 400

        # a certificate the hub does not trust: refused, the client goes back to the old one, the store rolls back
        rogue_key = keys.generate_key()
        store.save(rogue_key, _issued(make_ca("rogue-ca"), rogue_key, rid))
        with pytest.raises(ConnectRefused) as refused:
            await hub.switch_credentials(x509=store.current().tls_identity)
        assert refused.value.return_code == 5
        assert store.rollback().certificate.serial_number == renewed[0].serial_number
        assert hub.connected
        await hub.send_telemetry("after rollback", {"n": "4"})
        await hub.disconnect()
        return {"renewed": renewed}

    asyncio.run(scenario())
    got = events(server, rid, 4)
    assert [e["event"]["payload"] for e in got] == [{"temperature": 21.5}, "during outage", "across the switch",
                                                    "after rollback"]
    first = got[0]["event"]["properties"]
    assert first["application"] == {"line": "a b"}
    assert (first["system"]["message-id"], first["system"]["content-type"]) == ("m-1", "application/json")
    assert [e["event"]["properties"]["application"].get("n") for e in got[1:]] == ["2", "3", "4"]
    with svc(server) as c:
        record = c.get(f"/namespaces/sdk-hub-ns/devices/{rid}").json()["properties"]["operationalCertificate"]
    assert int(record["serialNumber"], 16) == store.current().certificate.serial_number


def test_a_sas_hub_client_renews_its_token_before_it_expires(server):
    """The hub closes a SAS session when its token lapses, as IoT Hub does: the client reconnects with a fresh token
    before that (a fifth of its lifetime ahead, at most 120 s), as a planned change (no on_connection call), and
    keeps its subscriptions and queued telemetry. Before: a token was signed per CONNECT only, so every expiry was a
    dropped connection and a gap."""
    rid = "sdk-sas-renewal"
    with svc(server) as c:
        key = sym_key(c, f"/enrollments/{rid}", {"attestation": {"type": "symmetricKey"}})
    assert asyncio.run(client(server, rid, symmetric_key=key).register()).status == "assigned"

    async def scenario() -> tuple[bool, list, dict, int]:
        hub = HubClient(HUB, rid, port=server.mqtt_port, ca_file=server.ca_file, symmetric_key=key, sas_ttl=2)
        desired: asyncio.Queue = asyncio.Queue()
        hub.on_desired(desired.put_nowait)
        changes: list = []
        hub.on_connection(lambda up, reason: changes.append((up, reason)))
        await hub.connect()
        try:
            deadline = asyncio.get_running_loop().time() + 15
            while getattr(hub, "token_renewals", 0) < 2 and asyncio.get_running_loop().time() < deadline:  # 1.6 s each
                await asyncio.sleep(0.05)
            await asyncio.wait_for(hub.queue_telemetry({"after": "renewals"}), 10)
            with svc(server) as c:
                assert c.patch(f"/twins/{rid}", json={"properties": {"desired": {"rate": 3}}}).status_code == 200
            patch = await asyncio.wait_for(desired.get(), 10)
            return hub.connected, changes, patch, getattr(hub, "token_renewals", 0)
        finally:
            await hub.disconnect()

    connected, changes, patch, renewals = asyncio.run(scenario())
    assert connected and changes == [] and patch["rate"] == 3 and renewals >= 2
    log = (server.data_dir.parent / "server.log").read_text()
    assert log.count(f"device {rid!r} connected to hub") >= 3  # the first CONNECT and one per renewal
    [event] = events(server, rid, 1)
    assert event["event"]["payload"] == {"after": "renewals"}


def test_hub_refuses_a_wrong_key_and_sync_wrappers(server, tmp_path):
    rid = "sdk-sync-dev"
    with svc(server) as c:
        namespace(c, "sdk-sync-ns", "sdk-sync-p")
        group = sym_key(c, "/enrollmentGroups/sdk-sync-group", {"attestation": {"type": "symmetricKey"},
                                                                 "credentialPolicyName": "sdk-sync-p"})
    key, csr = keys.new_key_and_csr(rid)
    result = provision(HUB, server.id_scope, rid, csr_b64=csr, https_port=https_port(server), ca_file=server.ca_file,
                       group_key=group, **FAST)
    assert result.device_id == rid and keys.public_keys_match(key, result.issued_chain[0])
    creds = CertificateStore(tmp_path / "creds").save(key, result.issued_chain)

    async def wrong_sas() -> None:
        hub = HubClient(HUB, rid, port=server.mqtt_port, ca_file=server.ca_file,
                        symmetric_key=base64.b64encode(b"w" * 32).decode())
        await hub.connect()

    with pytest.raises(ConnectRefused) as info:
        asyncio.run(wrong_sas())
    assert info.value.return_code == 4

    async def idle_beyond_keepalive() -> tuple[int, int]:
        hub = HubClient(HUB, rid, port=server.mqtt_port, ca_file=server.ca_file, x509=creds.tls_identity, keepalive=1)
        await hub.connect()
        await asyncio.sleep(1.8)  # the server drops a client silent for 1.5 x keepalive; PINGREQs keep it
        version = (await hub.get_twin())["reported"]["$version"]
        await hub.disconnect()
        return version, hub.reconnects

    assert asyncio.run(idle_beyond_keepalive()) == (1, 0)

    answered = threading.Event()
    with SyncHubClient(HUB, rid, port=server.mqtt_port, ca_file=server.ca_file, x509=creds.tls_identity) as hub:

        def status(name: str, payload: object) -> tuple[int, dict]:
            reported = hub.get_twin()["reported"]  # a blocking call from inside a sync handler
            answered.set()
            return 200, {"reportedVersion": reported["$version"], "echo": payload}

        hub.on_method(None, status)
        hub.connect()
        hub.send_telemetry(json.dumps({"sync": True}).encode(), {"via": "sync"}, content_type="application/json")
        assert hub.patch_reported({"firmware": "2.0"}) == 2
        with svc(server) as c:
            r = c.post(f"/twins/{rid}/methods", json={"methodName": "status", "payload": [1],
                                                      "responseTimeoutInSeconds": 10})
        assert r.json() == {"status": 200, "payload": {"reportedVersion": 2, "echo": [1]}} and answered.is_set()
    [event] = events(server, rid, 1)
    assert event["event"]["payload"] == {"sync": True} and event["event"]["properties"]["application"] == {"via": "sync"}
