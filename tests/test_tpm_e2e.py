"""TPM 2.0 attestation end to end (issue 16): swtpm + a real ``opendps serve``, every step through the CLI or SDK.

The session's swtpm (tests/swtpm.py) is the device's TPM: its EK is enrolled with ``opendps dps enrollment create
--attestation-type tpm --endorsement-key`` (printed by ``opendps device tpm-info``), ``opendps device provision --tpm``
answers DPS's challenge in the TPM over HTTPS with a CSR, and the device reaches its hub with the issued certificate
and, separately, with a SAS its TPM signs (the hub key from ``registrationState.tpm.authenticationKey``). Refusals —
unknown registration, another enrollment's EK, a challenge answered by another TPM, expired and replayed SAS, TPM
over MQTT, a disabled enrollment — each give a clear error and leave no registration, hub identity or certificate.

One server (SQLite: the TPM path has no store-specific code; the store-backed flows run on both databases elsewhere);
each test leaves no transient object in the shared swtpm (it has three slots).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import time
from pathlib import Path

import httpx
import pytest
from tests.conftest import _run_server, database
from tests.test_device_api import PREVIEW, assert_nothing_left, namespace, svc

from opendps.transport import sas

pytestmark = pytest.mark.timeout(300, func_only=True)

NS, POLICY = "tpm-ns", "tpm-policy"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One ``opendps serve`` for the module (SQLite)."""
    tmp_path = tmp_path_factory.mktemp("server-tpm")
    with database("sqlite", tmp_path) as db_url:
        yield from _run_server(db_url, tmp_path)



@pytest.fixture(scope="module")
def policy(server) -> str:
    with svc(server) as c:
        namespace(c, NS, POLICY)
    return POLICY


def _json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _fails(proc, *words: str) -> str:
    """Exit 1 with exactly one ``error:`` line on stderr containing ``words``."""
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
    return lines[0]


def tpm_info(server, tcti: str) -> dict:
    return _json(server.cli("device", "tpm-info", "--tcti", tcti, "-o", "json"))


def enroll(server, rid: str, ek: str, *extra: str) -> dict:
    return _json(server.cli("dps", "enrollment", "create", "-e", rid, "--attestation-type", "tpm",
                            "--endorsement-key", ek, *extra, "-o", "json"))


def provision(server, tcti: str, store: Path, *extra: str):
    return server.cli("device", "provision", "--tpm", "--tcti", tcti, "--store-dir", str(store), "-o", "json", *extra)


def open_tpm(tcti: str):
    from opendps.device.tpm import DeviceTpm

    return DeviceTpm(tcti)


def dps(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=server.ca_file), timeout=60)


def raw_register(server, client: httpx.Client, rid: str, tpm_body: dict, authorization: str | None = None):
    headers = {"Authorization": authorization} if authorization else {}
    return client.put(f"/{server.id_scope}/registrations/{rid}/register", params={"api-version": PREVIEW},
                      json={"registrationId": rid, "tpm": tpm_body}, headers=headers)


def hub_device(server, rid: str) -> httpx.Response:
    with svc(server) as c:
        return c.get(f"/linkedHubs/default/devices/{rid}")


# ---------------------------------------------------------------- the flow
def test_tpm_info_and_enrollment_through_the_cli(server, tcti):
    info = tpm_info(server, tcti)
    with open_tpm(tcti) as tpm:
        assert info == {"registrationId": tpm.registration_id(), "endorsementKey": tpm.endorsement_key(),
                        "storageRootKey": tpm.storage_root_key(), "tcti": tcti}
    # the TCTI from the environment, as tpm2-tools take it
    assert _json(server.cli("device", "tpm-info", "-o", "json", env={**server.env, "TPM2TOOLS_TCTI": tcti})) == info
    doc = enroll(server, "tpm-cli-enroll", info["endorsementKey"])
    assert doc["attestation"]["type"] == "tpm"
    assert doc["attestation"]["tpm"]["endorsementKey"] == info["endorsementKey"]
    # the CLI's own refusals, one line each
    _fails(server.cli("dps", "enrollment", "create", "-e", "tpm-x", "--attestation-type", "tpm"), "--endorsement-key")
    _fails(server.cli("dps", "enrollment", "create", "-e", "tpm-x", "--attestation-type", "tpm", "--endorsement-key",
                      info["endorsementKey"], "--primary-key", base64.b64encode(b"k" * 32).decode()), "do not apply")
    _fails(server.cli("dps", "enrollment", "create", "-e", "tpm-x", "--attestation-type", "symmetricKey",
                      "--endorsement-key", info["endorsementKey"]), "applies only to --attestation-type tpm")
    _fails(server.cli("dps", "enrollment", "create", "-e", "tpm-x", "--attestation-type", "tpm", "--endorsement-key",
                      "@@not base64"), "not valid base64")
    # the server's: an EK that is not an RSA TPM2B_PUBLIC
    _fails(server.cli("dps", "enrollment", "create", "-e", "tpm-x", "--attestation-type", "tpm", "--endorsement-key",
                      base64.b64encode(b"\x00\x04abcd").decode()), "endorsementKey")
    _fails(server.cli("device", "tpm-info", "--tcti", "swtpm:host=127.0.0.1,port=1"), "cannot open the TPM")


def test_provision_with_csr_connect_with_certificate_and_tpm_sas_then_renew(server, tcti, policy, tmp_path):
    from opendps.device.hub import HubClient
    from opendps.device.store import CertificateStore

    info = tpm_info(server, tcti)
    rid = info["registrationId"]  # the EK-derived id, the default of `device provision --tpm`
    enroll(server, rid, info["endorsementKey"], "--credential-policy", policy)
    store = tmp_path / "device"
    doc = _json(provision(server, tcti, store))
    assert (doc["registrationId"], doc["status"], doc["deviceId"], doc["transport"]) == (rid, "assigned", rid, "https")
    assert doc["certificate"]["subject"] == f"CN={rid}"
    key_file = store / "tpm-hmac.key"
    assert doc["tpm"] == {"registrationId": rid, "keyFile": str(key_file)}
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    stored = CertificateStore(store).current()
    assert stored is not None and stored.certificate.serial_number == int(doc["certificate"]["serialNumber"], 16)

    async def hub_session(**credential) -> dict:
        hub = HubClient(doc["assignedHub"], rid, port=server.mqtt_port, ca_file=server.ca_file, reconnect=False,
                        **credential)
        await hub.connect()
        try:
            await hub.send_telemetry({"via": next(iter(credential))}, timeout=30)
            return await hub.get_twin()
        finally:
            await hub.disconnect()

    assert "reported" in asyncio.run(hub_session(x509=stored.tls_identity))
    # a TPM device given an operational certificate is a certificateAuthority identity that keeps its TPM-held key:
    # its TPM-signed SAS opens a hub session too (the key file loads into the same TPM in a later process)
    assert hub_device(server, rid).json()["authenticationType"] == "certificateAuthority"
    with open_tpm(tcti) as tpm:
        tpm.load_key_file(key_file)
        assert "reported" in asyncio.run(hub_session(signer=tpm))
        token = tpm.sas_token(f"{server.id_scope}/registrations/{rid}", int(time.time()) + 600, "registration")
    with dps(server) as c:
        r = raw_register(server, c, rid, {"endorsementKey": info["endorsementKey"],
                                          "storageRootKey": info["storageRootKey"]}, token)
        assert r.status_code == 202, r.text

    # renewal: the same command again (a new challenge, a new key pair and certificate, the same hub identity)
    again = _json(provision(server, tcti, store))
    assert again["deviceId"] == rid and again["certificate"]["serialNumber"] != doc["certificate"]["serialNumber"]
    renewed = CertificateStore(store).current()
    assert renewed is not None and renewed.certificate.serial_number != stored.certificate.serial_number
    assert "reported" in asyncio.run(hub_session(x509=renewed.tls_identity))
    assert hub_device(server, rid).status_code == 200


def test_sdk_flow_without_csr_signs_hub_sas_in_the_tpm(server, tcti):
    """The SDK directly: no CSR (no credential policy), the hub identity authenticates by the TPM-held key only."""
    from opendps.device.hub import HubClient
    from opendps.device.mqtt import ConnectRefused
    from opendps.device.provisioning import ProvisioningClient

    rid = "tpm-sdk-sas"
    with open_tpm(tcti) as tpm:
        enroll(server, rid, tpm.endorsement_key())
        client = ProvisioningClient("localhost", server.id_scope, rid, https_port=int(server.url.rsplit(":", 1)[1]),
                                    ca_file=server.ca_file, tpm=tpm, min_wait=0.05)
        result = asyncio.run(client.register())
        assert (result.status, result.device_id, result.issued_chain) == ("assigned", rid, [])
        assert result.raw["registrationState"]["tpm"]["authenticationKey"]

        async def connect() -> None:
            hub = HubClient(result.assigned_hub or "localhost", rid, port=server.mqtt_port, ca_file=server.ca_file,
                            signer=tpm, reconnect=False)
            await hub.connect()
            try:
                await hub.send_telemetry({"tpm": True}, timeout=30)
            finally:
                await hub.disconnect()

        asyncio.run(connect())
        # an expired TPM-signed hub token is refused (CONNACK "bad user name or password")
        hub = HubClient(result.assigned_hub or "localhost", rid, port=server.mqtt_port, ca_file=server.ca_file,
                        signer=tpm, sas_ttl=-3600, reconnect=False)
        with pytest.raises(ConnectRefused) as refused:
            asyncio.run(hub.connect())
        assert refused.value.return_code == 4
    assert hub_device(server, rid).json()["authenticationType"] == "sas"


# ---------------------------------------------------------------- refusals
def test_unknown_registration_is_refused(server, tcti, tmp_path):
    rid = "tpm-never-enrolled"
    _fails(provision(server, tcti, tmp_path / "d", "--registration-id", rid), rid, "status 401")
    assert_nothing_left(server, rid)
    assert not (tmp_path / "d" / "tpm-hmac.key").exists()


def test_ek_of_another_enrollment_is_refused(server, tcti, other_tcti, tmp_path):
    rid = "tpm-other-ek"
    enroll(server, rid, tpm_info(server, other_tcti)["endorsementKey"])
    _fails(provision(server, tcti, tmp_path / "d", "--registration-id", rid), "endorsement key", "status 401")
    assert_nothing_left(server, rid)


def test_challenge_answered_by_another_tpm_is_refused(server, tcti, other_tcti):
    """An impostor knows the enrolled TPM's EK and SRK (public) and gets its challenge: its own TPM cannot open it,
    and a SAS signed with any other key is refused by the server."""
    from opendps.device.provisioning import KeySigner, ProvisioningClient, ProvisioningError

    rid = "tpm-impostor"
    with open_tpm(tcti) as victim:
        ek, srk = victim.endorsement_key(), victim.storage_root_key()
    enroll(server, rid, ek)

    with open_tpm(other_tcti) as own:
        class Impostor:  # the enrolled TPM's publics, the other TPM's activation
            def endorsement_key(self) -> str:
                return ek

            def storage_root_key(self) -> str:
                return srk

            def activate(self, blob: str, *, key_file=None) -> None:
                own.activate(blob, key_file=key_file)

        client = ProvisioningClient("localhost", server.id_scope, rid, https_port=int(server.url.rsplit(":", 1)[1]),
                                    ca_file=server.ca_file, tpm=Impostor(), min_wait=0.05)  # type: ignore[arg-type]
        with pytest.raises(ProvisioningError, match="not made for this TPM"):
            asyncio.run(client.register())
    with dps(server) as c:
        challenge = raw_register(server, c, rid, {"endorsementKey": ek, "storageRootKey": srk})
        assert challenge.status_code == 401 and challenge.json()["keyName"] == "registration"
        forged = KeySigner(base64.b64encode(os.urandom(32)).decode()).sas_token(
            f"{server.id_scope}/registrations/{rid}", int(time.time()) + 600, "registration")
        r = raw_register(server, c, rid, {"endorsementKey": ek, "storageRootKey": srk}, forged)
        assert r.status_code == 401 and "does not verify" in r.json()["message"], r.text
    assert_nothing_left(server, rid)


def test_expired_and_replayed_sas_are_refused(server, tcti):
    rid, other = "tpm-expired", "tpm-replayed"
    with open_tpm(tcti) as tpm:
        body = {"endorsementKey": tpm.endorsement_key(), "storageRootKey": tpm.storage_root_key()}
        enroll(server, rid, body["endorsementKey"])
        enroll(server, other, body["endorsementKey"])
        with dps(server) as c:
            challenge = raw_register(server, c, rid, body)
            assert challenge.status_code == 401, challenge.text
            tpm.activate(challenge.json()["authenticationKey"])
            resource = f"{server.id_scope}/registrations/{rid}"
            expired = tpm.sas_token(resource, int(time.time()) - 3600, "registration")
            r = raw_register(server, c, rid, body, expired)
            assert r.status_code == 401 and "expired" in r.json()["message"], r.text
            # a valid token of one registration replayed for another (the same TPM, another enrollment)
            valid = tpm.sas_token(resource, int(time.time()) + 600, "registration")
            r = raw_register(server, c, other, body, valid)
            assert r.status_code == 401 and "does not name" in r.json()["message"], r.text
            # and a token that is not even a SAS
            r = raw_register(server, c, rid, body, "SharedAccessSignature garbage")
            assert r.status_code == 401, r.text
    assert sas.parse(expired).expiry < time.time()
    assert_nothing_left(server, rid)
    assert_nothing_left(server, other)


def test_tpm_over_mqtt_is_refused(server, tcti, tmp_path):
    from opendps.device.provisioning import ProvisioningClient

    rid = "tpm-mqtt"
    _fails(provision(server, tcti, tmp_path / "d", "--registration-id", rid, "--transport", "mqtt"), "HTTPS only")
    with open_tpm(tcti) as tpm, pytest.raises(ValueError, match="HTTPS only"):
        ProvisioningClient("localhost", server.id_scope, rid, transport="mqtt", tpm=tpm, ca_file=server.ca_file)
    assert_nothing_left(server, rid)


def test_disabled_enrollment_is_refused(server, tcti, tmp_path):
    rid = "tpm-disabled"
    enroll(server, rid, tpm_info(server, tcti)["endorsementKey"], "--provisioning-status", "disabled")
    _fails(provision(server, tcti, tmp_path / "d", "--registration-id", rid), "disabled", "status 403")
    assert_nothing_left(server, rid)
    assert not (tmp_path / "d" / "tpm-hmac.key").exists()
