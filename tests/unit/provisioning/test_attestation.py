"""Attestation matching order, in-process: which enrollment a device's credential proves.

- an individual enrollment for the registration id wins over every group;
- X.509: the group of the nearest CA decides (the chain's intermediates in order, then verified DPS CAs up to
  a root), and the chain must validate to that group's CA;
- symmetric keys: the first group (creation order) whose derived key verifies.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from tests.unit.conftest import creds, symmetric_group
from tests.x509_helpers import Ca, make_ca, make_leaf

from opendps.errors import Conflict
from opendps.provisioning.attestation import AttestationFailed, AttestedIdentity, EnrollmentDisabled
from opendps.provisioning.attestation import x509 as x509_attestation
from opendps.transport.sas import derive_device_key


def _verified(services, name: str, ca: Ca) -> None:
    view, _ = services.ca_certificates.upload(name, ca.pem)
    view = services.ca_certificates.generate_verification_code(name, if_match=view.etag)
    proof, _ = make_leaf(view.verification_code, ca)
    services.ca_certificates.verify(name, proof.public_bytes(Encoding.PEM), if_match=view.etag)


def _x509_group(services, group_id: str, ca_name: str) -> None:
    services.enrollments.put("group", group_id, {"attestation": {"type": "x509", "x509": {
        "caReferences": {"primary": ca_name}}}})


def _attest(services, rid: str, chain: list) -> AttestedIdentity:
    result = services.provisioning.attest(creds(rid, chain=tuple(chain)))
    assert isinstance(result, AttestedIdentity)
    return result


@pytest.fixture
def hierarchy(services):
    """root -> intermediate, both uploaded and verified, a group on each."""
    root = make_ca("test root")
    intermediate = make_ca("test intermediate", root)
    _verified(services, "root", root)
    _verified(services, "intermediate", intermediate)
    _x509_group(services, "on-root", "root")
    _x509_group(services, "on-intermediate", "intermediate")
    return root, intermediate


def test_the_nearest_ca_group_decides(services, hierarchy):
    root, intermediate = hierarchy
    leaf, _ = make_leaf("dev-x1", intermediate)
    identity = _attest(services, "dev-x1", [leaf, intermediate.cert])
    assert identity.enrollment.enrollment_id == "on-intermediate"
    assert identity.details["x509"]["signingCertificateInfo"]["subjectName"] == "CN=test intermediate"
    # the device that sends only its leaf: the verified intermediate is found in DPS and still decides
    assert _attest(services, "dev-x1", [leaf]).enrollment.enrollment_id == "on-intermediate"
    # a device of the root itself
    leaf, _ = make_leaf("dev-x2", root)
    assert _attest(services, "dev-x2", [leaf]).enrollment.enrollment_id == "on-root"


def test_without_a_group_on_the_nearest_ca_the_next_one_up_decides(services, hierarchy):
    root, intermediate = hierarchy
    services.enrollments.delete("group", "on-intermediate")
    leaf, _ = make_leaf("dev-x3", intermediate)
    assert _attest(services, "dev-x3", [leaf, intermediate.cert]).enrollment.enrollment_id == "on-root"


def test_an_individual_enrollment_wins_over_the_group(services, hierarchy):
    _, intermediate = hierarchy
    leaf, _ = make_leaf("dev-x4", intermediate)
    other, _ = make_leaf("dev-x4", None)
    services.enrollments.put("individual", "dev-x4", {"attestation": {"type": "x509", "x509": {"clientCertificates": {
        "primary": {"certificate": other.public_bytes(Encoding.PEM).decode()}}}}})
    with pytest.raises(AttestationFailed, match="not the one enrolled for 'dev-x4'"):
        services.provisioning.attest(creds("dev-x4", chain=(leaf, intermediate.cert)))
    identity = _attest(services, "dev-x4", [other])
    assert identity.enrollment.kind == "individual" and identity.hub_credential.auth_type == "selfSigned"


def test_a_chain_must_validate_to_the_group_ca(services, hierarchy):
    _, intermediate = hierarchy
    stranger = make_ca("test intermediate")  # same name, other key
    leaf, _ = make_leaf("dev-x5", stranger)
    with pytest.raises(AttestationFailed, match="does not chain to a verified CA certificate"):
        services.provisioning.attest(creds("dev-x5", chain=(leaf, stranger.cert)))
    expired, _ = make_leaf("dev-x5", intermediate, not_after=timedelta(days=-1))
    with pytest.raises(AttestationFailed, match="has expired"):
        services.provisioning.attest(creds("dev-x5", chain=(expired, intermediate.cert)))
    wrong_cn, _ = make_leaf("dev-x6", intermediate)
    with pytest.raises(AttestationFailed, match="does not match registration id 'dev-x5'"):
        services.provisioning.attest(creds("dev-x5", chain=(wrong_cn, intermediate.cert)))


def test_a_path_is_validated_once_and_the_trust_decided_on_every_request(services, hierarchy, monkeypatch):
    """The MQTT register after its CONNECT, a poll: the same chain again costs no signature check; which group
    the CA backs, and whether it is enabled, is still decided each time."""
    _, intermediate = hierarchy
    validations = []
    real = x509_attestation.device_chain_verifier

    def counted(anchors, now):
        validations.append([a.subject.rfc4514_string() for a in anchors])
        return real(anchors, now)

    monkeypatch.setattr(x509_attestation, "device_chain_verifier", counted)
    leaf, _ = make_leaf("dev-cached", intermediate)
    for _ in range(3):
        assert _attest(services, "dev-cached", [leaf, intermediate.cert]).enrollment.enrollment_id == "on-intermediate"
    assert validations == [["CN=test intermediate"]]
    group = services.enrollments.get("group", "on-intermediate")
    services.enrollments.put("group", "on-intermediate", {**group.to_wire(), "provisioningStatus": "disabled"},
                             if_match=group.etag)
    with pytest.raises(EnrollmentDisabled):
        services.provisioning.attest(creds("dev-cached", chain=(leaf, intermediate.cert)))
    services.enrollments.delete("group", "on-intermediate")
    services.enrollments.delete("group", "on-root")
    with pytest.raises(AttestationFailed, match="does not chain to a verified CA certificate of any enrollment group"):
        services.provisioning.attest(creds("dev-cached", chain=(leaf, intermediate.cert)))
    assert validations == [["CN=test intermediate"]]


def test_an_unverified_ca_cannot_back_a_group(services):
    ca = make_ca("unverified")
    services.ca_certificates.upload("unverified", ca.pem)
    with pytest.raises(Exception, match="is not verified") as info:
        _x509_group(services, "g", "unverified")
    assert info.value.error_code == 400012


def test_symmetric_key_groups_are_tried_in_creation_order_and_individuals_win(services):
    first = symmetric_group(services, "first")
    symmetric_group(services, "second")
    key = derive_device_key(first, "dev-s1")
    identity = services.provisioning.attest(creds("dev-s1", key=key))
    assert identity.enrollment.enrollment_id == "first" and identity.hub_credential.keys[0] == key
    services.enrollments.put("individual", "dev-s1", {"attestation": {"type": "symmetricKey"}})
    with pytest.raises(AttestationFailed, match="does not verify with the enrollment's keys"):
        services.provisioning.attest(creds("dev-s1", key=key))  # the individual decides, even though a group would accept
    own = services.enrollments.get("individual", "dev-s1").keys[1]  # the secondary key works too
    assert services.provisioning.attest(creds("dev-s1", key=own)).enrollment.kind == "individual"


def test_a_ca_certificate_a_group_references_cannot_be_deleted(services, hierarchy):
    """Issue 12.7: deleting it would leave the group stuck (not even disabling it would pass validation)."""
    with pytest.raises(Conflict, match="referenced by enrollment group.s. on-intermediate") as info:
        services.ca_certificates.delete("intermediate")
    assert info.value.error_code == 409002
    services.enrollments.put("group", "on-intermediate", {"attestation": {"type": "x509", "x509": {
        "caReferences": {"primary": "intermediate"}}}, "provisioningStatus": "disabled"})  # still valid: it exists
    services.enrollments.delete("group", "on-intermediate")
    services.ca_certificates.delete("intermediate")
    assert [v.name for v in services.ca_certificates.list()] == ["root"]


def test_proven_cas_are_read_from_the_configuration_cache_and_a_deletion_is_seen_at_once(services, hierarchy):
    from sqlalchemy import event
    root, intermediate = hierarchy
    leaf, _ = make_leaf("dev-cached", intermediate)
    _attest(services, "dev-cached", [leaf, intermediate.cert])  # fills the cache
    statements: list[str] = []

    def seen(conn, cursor, sql, *args) -> None:
        statements.append(sql)

    event.listen(services.store.engine, "before_cursor_execute", seen)
    try:
        with services.store.config_snapshot():
            assert _attest(services, "dev-cached", [leaf, intermediate.cert]).enrollment.enrollment_id == "on-intermediate"
    finally:
        event.remove(services.store.engine, "before_cursor_execute", seen)
    assert not [s for s in statements if "dps_certificates" in s], statements
    services.enrollments.delete("group", "on-intermediate")
    services.ca_certificates.delete("intermediate")
    # the next registration sees the deletion: the device now proves the root's group through its chain
    assert _attest(services, "dev-cached", [leaf, intermediate.cert]).enrollment.enrollment_id == "on-root"


def test_the_issuing_ca_found_in_dps_costs_no_signature_check_of_its_own(services, hierarchy, monkeypatch):
    """A device sending only its leaf: its issuer is found among the verified DPS CAs by name and the path validation
    checks the signatures (once per chain, then cached); no separate signature check per request. Before: each
    request (over MQTT the CONNECT and the register) verified the leaf's and the intermediate's signatures again."""
    _, intermediate = hierarchy
    checks = []
    real = x509_attestation.issued_by
    monkeypatch.setattr(x509_attestation, "issued_by", lambda child, parent: checks.append(1) or real(child, parent))
    leaf, _ = make_leaf("dev-leaf-only", intermediate)
    for _ in range(3):
        assert _attest(services, "dev-leaf-only", [leaf]).enrollment.enrollment_id == "on-intermediate"
    assert checks == []
    namesake = make_ca("test intermediate")  # not in DPS: its leaf names the verified intermediate as issuer
    forged, _ = make_leaf("dev-forged", namesake)
    with pytest.raises(AttestationFailed, match="does not validate to CA certificate 'intermediate'"):
        services.provisioning.attest(creds("dev-forged", chain=(forged,)))


def test_of_two_verified_cas_with_one_name_the_one_that_signed_is_the_issuer(services, hierarchy):
    """A CA renewed with a new key under the same name, both verified: each device is matched to the one whose key
    signed its certificate, and each chain validates."""
    root, intermediate = hierarchy
    renewed = make_ca("test intermediate", root)  # same name, new key
    _verified(services, "intermediate-2", renewed)
    _x509_group(services, "on-intermediate-2", "intermediate-2")
    old_leaf, _ = make_leaf("dev-old-key", intermediate)
    new_leaf, _ = make_leaf("dev-new-key", renewed)
    assert _attest(services, "dev-old-key", [old_leaf]).enrollment.enrollment_id == "on-intermediate"
    assert _attest(services, "dev-new-key", [new_leaf]).enrollment.enrollment_id == "on-intermediate-2"
