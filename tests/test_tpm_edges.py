"""TPM attestation against hostile and changed inputs, over HTTPS against a real ``opendps serve``.

The device's TPM is the Python model of tests/unit/provisioning/test_tpm_attestation.py (its EK and SRK private
keys open the challenge as ActivateCredential + Import would; tests/unit/test_tpm_crypto.py proves the same blobs
open in swtpm). Every refusal is a 4xx with an Azure-style body naming the problem, and leaves nothing behind.
"""

from __future__ import annotations

import base64
import ssl
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tests.conftest import _run_server, database
from tests.test_device_api import PREVIEW, assert_nothing_left, device_sas, svc
from tests.test_mqtt_hub import Client, hub_username
from tests.unit.provisioning.test_tpm_attestation import ModelTpm
from tests.unit.test_tpm_crypto import SRK_ATTRIBUTES, b64, ecc_public_area, rsa_public_area

from opendps.pki.tpm import (
    ALG_AES,
    ALG_CFB,
    ALG_NULL,
    ALG_SHA1,
    DECRYPT,
    EK_DEFAULT_ATTRIBUTES,
    FIXED_TPM,
    RESTRICTED,
    hmac_key_public,
    tpm2b,
)
from opendps.transport import sas as sas_module

pytestmark = pytest.mark.timeout(300, func_only=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One ``opendps serve`` for the module (SQLite: the TPM path has no store-specific code)."""
    tmp_path = tmp_path_factory.mktemp("server-tpm-edges")
    with database("sqlite", tmp_path) as db_url:
        yield from _run_server(db_url, tmp_path)


@pytest.fixture(scope="module")
def dps(server):
    with httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=server.ca_file), timeout=60) as c:
        yield c


def register(server, dps: httpx.Client, rid: str, tpm: dict | None, authorization: str | None = None) -> httpx.Response:
    body: dict = {"registrationId": rid}
    if tpm is not None:
        body["tpm"] = tpm
    return dps.put(f"/{server.id_scope}/registrations/{rid}/register", params={"api-version": PREVIEW}, json=body,
                   headers={"Authorization": authorization} if authorization else {})


def enroll(server, rid: str, tpm: dict, *, status: int = 201) -> dict:
    with svc(server) as c:
        r = c.put(f"/enrollments/{rid}", json={"attestation": {"type": "tpm", "tpm": tpm}}, headers={"If-Match": "*"}
                  if status == 200 else {})
        assert r.status_code == status, r.text
        return r.json()


def refused(r: httpx.Response, status: int, error_code: int, *words: str) -> str:
    """``status`` with an Azure-style JSON body whose message holds ``words``."""
    assert r.status_code == status, r.text
    body = r.json()
    assert body["errorCode"] == error_code and isinstance(body["trackingId"], str), body
    for word in words:
        assert word in body["message"], body["message"]
    return body["message"]


def answer(server, dps: httpx.Client, rid: str, tpm: ModelTpm) -> str:
    """The challenge for ``tpm``, opened: the key its TPM imported (base64)."""
    r = register(server, dps, rid, tpm.evidence["tpm"])
    assert r.status_code == 401 and r.json()["keyName"] == "registration", r.text
    return tpm.open(r.json()["authenticationKey"])


@pytest.fixture(scope="module")
def device_tpm() -> ModelTpm:
    return ModelTpm()


def _srk(tpm: ModelTpm, **kwargs) -> str:
    key = kwargs.pop("key", tpm.srk_key.public_key())
    return b64(tpm2b(rsa_public_area(key, attributes=kwargs.pop("attributes", SRK_ATTRIBUTES), policy=b"", **kwargs)))


def hostile_storage_root_keys(tpm: ModelTpm) -> list[tuple[str, object, str]]:
    raw = base64.b64decode(tpm.srk)
    area = raw[2:]
    return [
        ("truncated", b64(raw[:-5]), "is truncated"),
        ("trailing bytes", b64(raw + b"\0"), "1 trailing bytes"),
        ("size too large", b64(struct.pack(">H", len(area) + 4) + area), "is truncated"),
        ("size too small", b64(struct.pack(">H", len(area) - 4) + area), "4 trailing bytes"),
        ("size 0", b64(b"\0\0"), "is empty"),
        ("size 65535", b64(b"\xff\xff" + area), "larger than 1024"),
        ("nameAlg SHA-1", _srk(tpm, name_alg=ALG_SHA1), "unsupported nameAlg SHA-1"),
        ("nameAlg 0", _srk(tpm, name_alg=0), "unsupported nameAlg 0x0000"),
        ("nameAlg unknown", _srk(tpm, name_alg=0x7777), "unsupported nameAlg 0x7777"),
        ("not restricted", _srk(tpm, attributes=SRK_ATTRIBUTES & ~RESTRICTED), "not a restricted decryption key"),
        ("not decrypt", _srk(tpm, attributes=SRK_ATTRIBUTES & ~DECRYPT), "not a restricted decryption key"),
        ("AES-192", _srk(tpm, sym=(ALG_AES, 192, ALG_CFB)), "AES-192-CFB"),
        ("no symmetric", _srk(tpm, sym=(ALG_NULL, 0, 0)), "symmetric algorithm must be"),
        ("RSA-1024", _srk(tpm, key=rsa.generate_private_key(65537, 1024).public_key(), bits=1024), "keyBits 1024"),
        ("exponent 1", _srk(tpm, exponent=1), "RSA exponent 1"),
        ("exponent 2", _srk(tpm, exponent=2), "RSA exponent 2"),
        ("exponent 2^32-1", _srk(tpm, exponent=0xFFFFFFFF), "RSA exponent 4294967295"),
        ("modulus 255 bytes", _srk(tpm, modulus=b"\xff" * 255), "255 bytes, 256 expected"),
        ("modulus even", _srk(tpm, modulus=b"\xff" * 255 + b"\x02"), "modulus is even"),
        ("P-384", b64(tpm2b(ecc_public_area(ec.generate_private_key(ec.SECP384R1()).public_key(), curve=4))),
         "unsupported curve"),
        ("point off the curve", b64(tpm2b(ecc_public_area(ec.generate_private_key(ec.SECP256R1()).public_key())[:-1]
                                         + b"\0")), "not on P-256"),
        ("keyed-hash", b64(hmac_key_public(b"k" * 32, b"s" * 32).tpm2b_public), "unsupported key type KEYEDHASH"),
        ("not base64", "@@not base64", "not valid base64"),
        ("not ASCII", "é" * 8, "not valid base64"),
        ("a JSON number", 5, "must be a JSON string"),
        ("a JSON zero", 0, "must be a JSON string"),
        ("a JSON boolean", True, "not a JSON boolean"),
        ("a JSON array", [tpm.srk], "not a JSON array"),
        ("a JSON object", {"size": 1}, "not a JSON object"),
    ]


def test_hostile_tpm_members_are_named_400s(server, dps, device_tpm):
    rid = "tpm-edges-hostile"
    enroll(server, rid, {"endorsementKey": device_tpm.ek})
    ek_key = device_tpm.ek_key.public_key()
    for case, srk, words in hostile_storage_root_keys(device_tpm):
        r = register(server, dps, rid, {"endorsementKey": device_tpm.ek, "storageRootKey": srk})
        assert "tpm.storageRootKey" in refused(r, 400, 400004, words), case
    for case, ek, words in [
        ("ECC", b64(tpm2b(ecc_public_area(ec.generate_private_key(ec.SECP256R1()).public_key(),
                                          attributes=EK_DEFAULT_ATTRIBUTES))), "type ECC"),
        ("not fixedTPM", b64(tpm2b(rsa_public_area(ek_key, attributes=EK_DEFAULT_ATTRIBUTES & ~FIXED_TPM))),
         "not bound to its TPM"),
        ("truncated", device_tpm.ek[:-8], "is truncated"),
        ("a JSON number", 12, "not a JSON number"),
        ("a JSON array", [device_tpm.ek], "not a JSON array"),
    ]:
        r = register(server, dps, rid, {"endorsementKey": ek, "storageRootKey": device_tpm.srk})
        assert "tpm.endorsementKey" in refused(r, 400, 400004, words), case
    for tpm in ("x", [1], 3, {}):
        refused(register(server, dps, rid, tpm), 400, 400004, "tpm")  # type: ignore[arg-type]
    # the same RSA key under another template is another EK
    other_template = b64(tpm2b(rsa_public_area(ek_key, policy=b"")))
    refused(register(server, dps, rid, {"endorsementKey": other_template, "storageRootKey": device_tpm.srk}),
            401, 401002, "not the one enrolled")
    with svc(server) as c:  # and in the enrollment
        for tpm, words in [({"endorsementKey": 5}, "attestation.tpm.endorsementKey must be a JSON string"),
                           ({"endorsementKey": device_tpm.ek, "storageRootKey": [1]},
                            "attestation.tpm.storageRootKey must be a JSON string"),
                           ({"endorsementKey": device_tpm.ek, "storageRootKey": 0},
                            "attestation.tpm.storageRootKey must be a JSON string")]:
            refused(c.put(f"/enrollments/{rid}", json={"attestation": {"type": "tpm", "tpm": tpm}},
                          headers={"If-Match": "*"}), 400, 400004, words)
    assert_nothing_left(server, rid)


def test_a_replaced_tpm_cannot_register_with_the_key_it_imported(server, dps, device_tpm):
    """Before: a PUT naming another EK kept the keys, so the old TPM's key (which it keeps) registered — with a SAS
    alone — and the new TPM was handed that same key."""
    rid, new_tpm = "tpm-edges-replaced", ModelTpm()
    enroll(server, rid, {"endorsementKey": device_tpm.ek})
    old_key = answer(server, dps, rid, device_tpm)
    sas = device_sas(server.id_scope, rid, old_key)
    assert register(server, dps, rid, device_tpm.evidence["tpm"], sas).json()["status"] == "assigned"
    enroll(server, rid, {"endorsementKey": new_tpm.ek}, status=200)
    refused(register(server, dps, rid, None, sas), 401, 401002, "does not verify")
    refused(register(server, dps, rid, new_tpm.evidence["tpm"], sas), 401, 401002, "does not verify")
    refused(register(server, dps, rid, device_tpm.evidence["tpm"], sas), 401, 401002, "not the one enrolled")
    # the hub identity is DPS's last assignment until the device registers again, as in Azure (an enrollment change
    # does not touch the hub: deprovisioning is disabling the device there too): the old TPM still connects with a
    # token its key signs, for the token's life (a SAS session closes when its token expires)
    old_hub_token = sas_module.generate(f"localhost/devices/{rid}", old_key, ttl=-sas_module.DEFAULT_SKEW_SECONDS + 2)
    old_session = Client(server, rid, hub_username(rid), password=old_hub_token)
    assert old_session.rc == 0
    gone = threading.Event()
    old_session.c.on_disconnect = lambda *a: gone.set()
    new_key = answer(server, dps, rid, new_tpm)
    assert new_key != old_key
    r = register(server, dps, rid, new_tpm.evidence["tpm"], device_sas(server.id_scope, rid, new_key))
    assert r.status_code == 202 and r.json()["status"] == "assigned", r.text
    # the new TPM's registration gave the identity the new TPM's key: the old one's no longer opens a session, and
    # its open one ends with its token (checked before the new TPM connects, which would displace it)
    c = Client(server, rid, hub_username(rid), password=sas_module.generate(f"localhost/devices/{rid}", old_key))
    assert c.rc == 4
    c.close()
    assert gone.wait(10), "the old TPM's session outlived its token"
    old_session.c.loop_stop()
    c = Client(server, rid, hub_username(rid), password=sas_module.generate(f"localhost/devices/{rid}", new_key))
    assert c.rc == 0
    c.close()


def test_an_enrolled_storage_root_key_is_held_to(server, dps, device_tpm):
    rid, other = "tpm-edges-srk", ModelTpm()
    enroll(server, rid, {"endorsementKey": device_tpm.ek, "storageRootKey": device_tpm.srk})
    moved = {"endorsementKey": device_tpm.ek, "storageRootKey": other.srk}
    refused(register(server, dps, rid, moved), 401, 401002, "storage root key sent is not the one enrolled")
    key = answer(server, dps, rid, device_tpm)
    sas = device_sas(server.id_scope, rid, key)
    refused(register(server, dps, rid, moved, sas), 401, 401002, "storage root key")  # changed for the answer
    assert_nothing_left(server, rid)
    assert register(server, dps, rid, device_tpm.evidence["tpm"], sas).json()["status"] == "assigned"


def test_sas_answers_signed_wrong_are_refused_and_concurrent_answers_make_one_registration(server, dps, device_tpm):
    rid = "tpm-edges-answers"
    enroll(server, rid, {"endorsementKey": device_tpm.ek})
    key = answer(server, dps, rid, device_tpm)
    tpm = device_tpm.evidence["tpm"]
    for sas, words in [(device_sas(server.id_scope, rid, base64.b64encode(b"x" * 32).decode()), "does not verify"),
                       (device_sas(server.id_scope, rid, key, ttl=-3600), "expired"),
                       (device_sas(server.id_scope, "tpm-edges-other", key), "does not name")]:
        refused(register(server, dps, rid, tpm, sas), 401, 401002, words)
    assert_nothing_left(server, rid)
    sas = device_sas(server.id_scope, rid, key)
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: register(server, dps, rid, tpm, sas), range(6)))
    assigned = [r for r in answers if r.status_code == 202]
    assert assigned and all(r.json()["status"] == "assigned" for r in assigned), [r.text for r in answers]
    for r in answers:
        if r.status_code != 202:  # the per-device limit: 429 with its body, never a 409/500
            refused(r, 429, 429001)
    assert len({r.json()["registrationState"]["deviceId"] for r in assigned}) == 1
    with svc(server) as c:
        assert c.get(f"/registrations/{rid}").json()["status"] == "assigned"
        assert c.get(f"/linkedHubs/default/devices/{rid}").status_code == 200
