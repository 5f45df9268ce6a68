"""Enrollment documents: validation and normalisation of Azure's shapes, in-process."""

from __future__ import annotations

import pytest

from opendps.errors import Conflict, InvalidInput, NotFound, PreconditionFailed

SYM = {"attestation": {"type": "symmetricKey"}}


@pytest.mark.parametrize(("body", "words"), [
    ({**SYM, "namespaceName": "triple-ns", "certificatePolicyName": "triple-p"}, "partial reference"),
    ({**SYM, "credentialPolicyName": "nope"}, "credential policy 'nope' does not exist"),
    ({"attestation": {"type": "tpm"}}, "attestation.type must be one of symmetricKey, x509 (got 'tpm')"),
    ({"attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "short"}}}, "not valid base64"),
    ({**SYM, "allocationPolicy": "static"}, "exactly one hub"),
    ({**SYM, "iotHubs": ["nowhere.example"]}, "not a linked hub"),
    ({**SYM, "allocationPolicy": "custom"}, "webhookUrl"),
    ({**SYM, "provisioningStatus": "paused"}, "provisioningStatus"),
    ({**SYM, "reprovisionPolicy": {"migrateDeviceData": "yes"}}, "reprovisionPolicy.migrateDeviceData"),
    ({"attestation": {"type": "x509", "x509": {}}}, "clientCertificates.primary"),
    ({**SYM, "registrationId": "someone-else"}, "does not match 'invalid-one' in the path"),
])
def test_invalid_documents_are_refused_by_name_and_nothing_is_stored(services, body, words):
    services.registry.create_namespace("triple-ns", "triple-p")
    with pytest.raises(InvalidInput, match=words.replace("(", r"\(").replace(")", r"\)")):
        services.enrollments.put("individual", "invalid-one", body)
    assert services.enrollments.find("individual", "invalid-one") is None


def test_the_2026_policy_triple_names_the_same_policy(services):
    services.registry.create_namespace("triple-ns", "triple-p")
    view, created = services.enrollments.put("individual", "triple", {
        **SYM, "namespaceName": "triple-ns", "certificateAuthorityName": "triple-p", "certificatePolicyName": "triple-p"})
    assert created and (view.document["credentialPolicyName"], view.document["namespaceName"]) == ("triple-p", "triple-ns")
    services.registry.create_namespace("other-ns", "triple-p")
    with pytest.raises(InvalidInput, match="exists in several namespaces .other-ns, triple-ns.; also give namespaceName"):
        services.enrollments.put("individual", "ambiguous", {**SYM, "credentialPolicyName": "triple-p"})


def test_ids_are_checked_and_case_insensitive(services):
    with pytest.raises(InvalidInput, match="registration id"):
        services.enrollments.put("individual", "a" * 129, SYM)
    services.enrollments.put("individual", "Device-A", SYM)
    assert services.enrollments.get("individual", "device-a").enrollment_id == "Device-A"
    with pytest.raises(NotFound) as info:
        services.enrollments.get("group", "device-a")
    assert info.value.error_code == 404201


def test_keys_are_kept_when_a_put_omits_them_and_etags_guard_replacement(services):
    view, _ = services.enrollments.put("individual", "keyed", SYM)
    again, created = services.enrollments.put("individual", "keyed", {**SYM, "provisioningStatus": "disabled"})
    assert not created and again.keys == view.keys and not again.enabled and again.etag != view.etag
    with pytest.raises(PreconditionFailed):
        services.enrollments.put("individual", "keyed", SYM, if_match=view.etag)
    services.enrollments.put("individual", "keyed", SYM, if_match=f'"{again.etag}"')
    with pytest.raises(PreconditionFailed, match="does not exist, so If-Match cannot match"):
        services.enrollments.put("individual", "new-one", SYM, if_match="abc")
    assert "primaryKey" not in str(services.enrollments.get("individual", "keyed").to_wire())
    assert services.enrollments.get("individual", "keyed").attestation_mechanism()["symmetricKey"]["primaryKey"] == \
        view.keys[0]


def test_a_concurrent_change_between_read_and_write_is_a_conflict(services, monkeypatch):
    services.enrollments.put("individual", "raced", SYM)
    original = services.enrollments._normalise

    def meanwhile(*args, **kwargs):
        result = original(*args, **kwargs)
        monkeypatch.setattr(services.enrollments, "_normalise", original)
        services.enrollments.put("individual", "raced", {**SYM, "provisioningStatus": "disabled"})
        return result

    monkeypatch.setattr(services.enrollments, "_normalise", meanwhile)
    with pytest.raises(Conflict, match="changed concurrently; retry"):
        services.enrollments.put("individual", "raced", SYM)
    assert not services.enrollments.get("individual", "raced").enabled
