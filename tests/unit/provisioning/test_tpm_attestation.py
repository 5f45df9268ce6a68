"""TPM attestation in the domain (issue 16): enrollment, the challenge, the SAS-signed retry, the poll, refusals.

The device's TPM is the Python model of tests/unit/test_tpm_crypto.py (RSA EK and SRK keys held here, the TPM's
ActivateCredential and Import done with their private keys); tests/unit/test_tpm_crypto.py proves the same blobs
open in swtpm."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from tests.unit.conftest import creds, register
from tests.unit.test_tpm_crypto import (
    SRK_ATTRIBUTES,
    _oaep,
    _open_duplicate,
    _unprotect,
    b64,
    rsa_public_area,
)

from opendps.errors import InvalidInput
from opendps.pki.tpm import split_authentication_key, tpm2b
from opendps.provisioning.attestation import MQTT, AttestationFailed, Challenge, EnrollmentDisabled
from opendps.provisioning.registration import Accepted


class ModelTpm:
    """A TPM's EK and SRK with their private keys, opening challenges as ActivateCredential + Import would."""

    def __init__(self) -> None:
        self.ek_key = rsa.generate_private_key(65537, 2048)
        self.srk_key = rsa.generate_private_key(65537, 2048)
        self.ek = b64(tpm2b(rsa_public_area(self.ek_key.public_key())))
        self.srk = b64(tpm2b(rsa_public_area(self.srk_key.public_key(), attributes=SRK_ATTRIBUTES, policy=b"")))

    @property
    def evidence(self) -> dict:
        return {"tpm": {"endorsementKey": self.ek, "storageRootKey": self.srk}}

    def open(self, authentication_key: str) -> str:
        """The imported HMAC key, as base64 (the device never sees it: here it is the model's)."""
        from opendps.pki.tpm import StorageRootKey

        parts = split_authentication_key(authentication_key)
        seed = _oaep(self.ek_key, parts.identity_secret, b"IDENTITY\0")
        credential = _unprotect(seed, StorageRootKey.parse(self.srk).name, parts.id_object)[2:]
        dup_seed = _oaep(self.srk_key, parts.duplicate_secret, b"DUPLICATE\0")
        return base64.b64encode(_open_duplicate(parts.private, dup_seed, credential, parts.public)).decode()


@pytest.fixture(scope="module")
def device_tpm() -> ModelTpm:
    return ModelTpm()


def enroll(services, rid: str, ek: str, **doc) -> None:
    services.enrollments.put("individual", rid, {"attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}, **doc})


def test_the_challenge_round_trip_registers_a_tpm_device(services, device_tpm):
    enroll(services, "tpm-dev", device_tpm.ek)
    view = services.enrollments.find("individual", "tpm-dev")
    assert view.attestation_type == "tpm" and len(base64.b64decode(view.keys[0])) == 32
    # the key is the TPM's alone: no answer of the service API shows it
    assert view.attestation_mechanism() == {"type": "tpm", "tpm": {"endorsementKey": device_tpm.ek}}
    assert "symmetricKey" not in view.to_wire(include_keys=True)["attestation"]
    # 1. no Authorization: the challenge
    challenge = services.provisioning.register(creds("tpm-dev", evidence=device_tpm.evidence))
    assert isinstance(challenge, Challenge) and challenge.status == 401
    assert challenge.body["keyName"] == "registration"
    key = device_tpm.open(challenge.body["authenticationKey"])
    assert key == view.keys[0]  # the enrollment's key, now in the TPM
    # 2. the retry, signed with the TPM's key
    result = register(services, creds("tpm-dev", key=key, evidence=device_tpm.evidence))
    assert result["status"] == "assigned"
    state = result["registrationState"]
    assert device_tpm.open(state["tpm"]["authenticationKey"]) == key  # the hub key, for the SDK to import
    # 3. the poll carries only the SAS
    accepted = services.provisioning.register(creds("tpm-dev", key=key, evidence=device_tpm.evidence))
    assert isinstance(accepted, Accepted)
    polled = services.provisioning.operation(creds("tpm-dev", key=key), accepted.operation_id)
    assert polled["status"] == "assigned"
    # the hub identity authenticates with the same key (SAS)
    hub = services.hubs.by_host(state["assignedHub"])
    _, keys = services.hubs.device_credentials(hub.name, "tpm-dev")
    assert keys is not None and key in keys


def test_refusals_leave_nothing_behind(services, device_tpm):
    other = ModelTpm()
    enroll(services, "tpm-refused", device_tpm.ek)
    challenge = services.provisioning.register(creds("tpm-refused", evidence=device_tpm.evidence))
    key = device_tpm.open(challenge.body["authenticationKey"])
    cases = [
        (creds("tpm-unknown", evidence=device_tpm.evidence), AttestationFailed, "no TPM enrollment"),
        (creds("tpm-refused", evidence=other.evidence), AttestationFailed, "not the one enrolled"),
        (creds("tpm-refused", key=base64.b64encode(b"k" * 32).decode(), evidence=device_tpm.evidence),
         AttestationFailed, "does not verify"),
        (creds("tpm-refused", key=key, evidence=device_tpm.evidence, transport=MQTT), AttestationFailed,
         "not supported over MQTT"),
        (creds("tpm-refused", evidence={"tpm": {"endorsementKey": device_tpm.ek}}), InvalidInput, "storageRootKey"),
        (creds("tpm-refused", evidence={"tpm": {"endorsementKey": "AAAA", "storageRootKey": device_tpm.srk}}),
         InvalidInput, "tpm.endorsementKey"),
    ]
    for credentials, kind, words in cases:
        with pytest.raises(kind, match=words):
            services.provisioning.register(credentials)
    # an over-MQTT poll with the TPM's key is refused too (Azure: no TPM over MQTT)
    with pytest.raises(AttestationFailed):
        services.provisioning.attest(creds("tpm-refused", key=key, transport=MQTT))
    services.enrollments.put("individual", "tpm-refused", {"attestation": {"type": "tpm", "tpm": {
        "endorsementKey": device_tpm.ek}}, "provisioningStatus": "disabled"}, if_match="*")
    with pytest.raises(EnrollmentDisabled):
        services.provisioning.register(creds("tpm-refused", evidence=device_tpm.evidence))
    # nothing was registered for the refused id: no hub identity
    from opendps.errors import NotFound

    with pytest.raises(NotFound):
        services.hubs.get_device("default", "tpm-refused")


def test_enrollment_checks(services, device_tpm):
    with pytest.raises(InvalidInput, match="individual enrollments only"):
        services.enrollments.put("group", "tpm-group", {"attestation": {"type": "tpm", "tpm": {
            "endorsementKey": device_tpm.ek}}})
    with pytest.raises(InvalidInput, match="endorsementKey is required"):
        enroll(services, "tpm-no-ek", "")
    with pytest.raises(InvalidInput, match="not RSA-2048|truncated|endorsementKey"):
        enroll(services, "tpm-bad-ek", device_tpm.srk[:40])
    # a PUT that keeps the EK keeps the keys
    enroll(services, "tpm-keep", device_tpm.ek)
    before = services.enrollments.find("individual", "tpm-keep").keys
    services.enrollments.put("individual", "tpm-keep", {"attestation": {"type": "tpm", "tpm": {
        "endorsementKey": device_tpm.ek}}}, if_match="*")
    assert services.enrollments.find("individual", "tpm-keep").keys == before


# ---------------------------------------------------------------- edges (hostile or changed inputs)
def _tpm_round_trip(services, rid: str, tpm: ModelTpm) -> str:
    """Challenge, open it in ``tpm``, register with the key; the key (base64)."""
    challenge = services.provisioning.register(creds(rid, evidence=tpm.evidence))
    assert isinstance(challenge, Challenge), challenge
    key = tpm.open(challenge.body["authenticationKey"])
    assert register(services, creds(rid, key=key, evidence=tpm.evidence))["status"] == "assigned"
    return key


def test_a_replaced_tpm_keeps_no_key_that_registers(services, device_tpm):
    """A PUT naming another EK makes new keys: the old TPM's imported key registered (with or without its tpm
    member), and the new TPM was handed the very key the old one still held."""
    rid, new_tpm = "tpm-replaced", ModelTpm()
    enroll(services, rid, device_tpm.ek)
    old_key = _tpm_round_trip(services, rid, device_tpm)
    services.enrollments.put("individual", rid, {"attestation": {"type": "tpm", "tpm": {
        "endorsementKey": new_tpm.ek}}}, if_match="*")
    assert old_key not in services.enrollments.find("individual", rid).keys
    for evidence in ({}, new_tpm.evidence):
        with pytest.raises(AttestationFailed, match="does not verify"):
            services.provisioning.register(creds(rid, key=old_key, evidence=evidence))
    new_key = _tpm_round_trip(services, rid, new_tpm)
    assert new_key != old_key
    _, hub_keys = services.hubs.device_credentials("default", rid)
    assert hub_keys is not None and old_key not in hub_keys  # the re-registration replaced the hub identity's keys
    # a PUT that keeps the EK (any other change) keeps the TPM's key
    services.enrollments.put("individual", rid, {"attestation": {"type": "tpm", "tpm": {
        "endorsementKey": new_tpm.ek}}, "provisioningStatus": "enabled"}, if_match="*")
    assert register(services, creds(rid, key=new_key, evidence=new_tpm.evidence))["status"] == "assigned"


def test_keys_do_not_cross_attestation_types(services, device_tpm):
    """symmetricKey -> tpm: the (operator-chosen, shown) symmetric key became the TPM's key; tpm -> symmetricKey: the
    TPM's key became a symmetric key shown to the service API."""
    chosen = base64.b64encode(b"s" * 32).decode()
    services.enrollments.put("individual", "sym-then-tpm", {"attestation": {"type": "symmetricKey", "symmetricKey": {
        "primaryKey": chosen, "secondaryKey": chosen}}})
    services.enrollments.put("individual", "sym-then-tpm", {"attestation": {"type": "tpm", "tpm": {
        "endorsementKey": device_tpm.ek}}}, if_match="*")
    assert chosen not in services.enrollments.find("individual", "sym-then-tpm").keys
    with pytest.raises(AttestationFailed):
        services.provisioning.register(creds("sym-then-tpm", key=chosen))

    enroll(services, "tpm-then-sym", device_tpm.ek)
    tpm_keys = services.enrollments.find("individual", "tpm-then-sym").keys
    services.enrollments.put("individual", "tpm-then-sym", {"attestation": {"type": "symmetricKey"}}, if_match="*")
    shown = services.enrollments.find("individual", "tpm-then-sym").to_wire(include_keys=True)
    assert not set(tpm_keys) & set(shown["attestation"]["symmetricKey"].values())


def test_an_enrolled_storage_root_key_is_enforced(services, device_tpm):
    """The enrollment's storageRootKey was stored and then ignored: any SRK got a challenge and registered."""
    other = ModelTpm()
    services.enrollments.put("individual", "tpm-pinned-srk", {"attestation": {"type": "tpm", "tpm": {
        "endorsementKey": device_tpm.ek, "storageRootKey": device_tpm.srk}}})
    moved = {"tpm": {"endorsementKey": device_tpm.ek, "storageRootKey": other.srk}}
    with pytest.raises(AttestationFailed, match="storage root key sent is not the one enrolled"):
        services.provisioning.register(creds("tpm-pinned-srk", evidence=moved))
    key = _tpm_round_trip(services, "tpm-pinned-srk", device_tpm)  # the enrolled SRK works
    with pytest.raises(AttestationFailed, match="storage root key"):  # and the SAS answer is held to it too
        services.provisioning.register(creds("tpm-pinned-srk", key=key, evidence=moved))


@pytest.mark.parametrize(("value", "words"), [
    (5, "not a JSON number"), (True, "not a JSON boolean"), (["x"], "not a JSON array"),
    ({"a": 1}, "not a JSON object"), (1.5, "not a JSON number"), (0, "JSON number"), ([], "JSON array"),
])
def test_tpm_members_of_another_json_type_are_named(services, device_tpm, value, words):
    """A number, array, object or boolean was "missing" (or, when falsy, "required"; in an enrollment a falsy
    storageRootKey was dropped silently)."""
    enroll(services, "tpm-json-types", device_tpm.ek)
    for member, evidence in (("tpm.endorsementKey", {"endorsementKey": value, "storageRootKey": device_tpm.srk}),
                             ("tpm.storageRootKey", {"endorsementKey": device_tpm.ek, "storageRootKey": value})):
        with pytest.raises(InvalidInput, match=f"{member} must be a JSON string.*{words}"):
            services.provisioning.register(creds("tpm-json-types", evidence={"tpm": evidence}))
    for member, doc in (("attestation.tpm.endorsementKey", {"endorsementKey": value}),
                        ("attestation.tpm.storageRootKey", {"endorsementKey": device_tpm.ek, "storageRootKey": value})):
        with pytest.raises(InvalidInput, match=f"{member} must be a JSON string.*{words}"):
            services.enrollments.put("individual", "tpm-json-types", {"attestation": {"type": "tpm", "tpm": doc}},
                                     if_match="*")
