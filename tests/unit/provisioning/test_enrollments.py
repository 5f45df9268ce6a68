"""Enrollment documents: validation and normalisation of Azure's shapes, in-process."""

from __future__ import annotations

import pytest

from opendps.errors import Conflict, InvalidInput, NotFound, PreconditionFailed

SYM = {"attestation": {"type": "symmetricKey"}}


@pytest.mark.parametrize(("body", "words"), [
    ({**SYM, "namespaceName": "triple-ns", "certificatePolicyName": "triple-p"}, "partial reference"),
    ({**SYM, "credentialPolicyName": "nope"}, "credential policy 'nope' does not exist"),
    ({"attestation": {"type": "none"}}, "attestation.type must be one of tpm, symmetricKey, x509 (got 'none')"),
    ({"attestation": {"type": "tpm"}}, "attestation.tpm.endorsementKey is required"),
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


def test_bulk_operations_apply_each_item_on_its_own_and_report_the_refused(services):
    """Azure's bulk enrollment operation (every SDK has it): create, update, updateIfMatchETag, delete."""
    bulk = services.enrollments.bulk
    docs = [{**SYM, "registrationId": f"bulk-{n}"} for n in range(3)]
    assert bulk("individual", "create", docs) == []
    etags = {n: services.enrollments.get("individual", f"bulk-{n}").etag for n in range(3)}

    again = bulk("individual", "create", [docs[0], {**SYM, "registrationId": "bulk-3"}])
    assert [(e.enrollment_id, e.error_code // 1000) for e in again] == [("bulk-0", 409)]
    assert services.enrollments.find("individual", "bulk-3") is not None  # the other item was applied

    assert bulk("individual", "update", [{**SYM, "registrationId": "bulk-1", "provisioningStatus": "disabled"}]) == []
    assert not services.enrollments.get("individual", "bulk-1").enabled
    stale = bulk("individual", "updateIfMatchETag", [{**SYM, "registrationId": "bulk-1", "etag": etags[1]},
                                                     {**SYM, "registrationId": "bulk-2", "etag": etags[2]},
                                                     {**SYM, "registrationId": "bulk-0"}])
    assert [(e.enrollment_id, e.error_code // 1000) for e in stale] == [("bulk-1", 412), ("bulk-0", 412)]
    assert services.enrollments.get("individual", "bulk-2").etag != etags[2]

    gone = bulk("individual", "delete", [{"registrationId": "bulk-0"}, {"registrationId": "nobody"}, "junk"])
    assert [(e.enrollment_id, e.error_code // 1000) for e in gone] == [("nobody", 404), ("", 400)]
    assert services.enrollments.find("individual", "bulk-0") is None

    bad = {**SYM, "registrationId": "bulk-bad", "allocationPolicy": "static"}
    refused = bulk("individual", "create", [bad])
    assert refused[0].enrollment_id == "bulk-bad" and "exactly one hub" in refused[0].error_status
    assert bulk("group", "create", [{**SYM, "enrollmentGroupId": "bulk-group"}]) == []
    assert services.enrollments.find("group", "bulk-group") is not None
    for mode, items, words in [("upsert", docs, "mode must be one of"), ("create", [], "non-empty"),
                               ("create", [docs[0]] * 11, "at most 10"), ("delete", {"registrationId": "x"}, "array")]:
        with pytest.raises(InvalidInput, match=words):
            bulk("individual", mode, items)


def test_bulk_items_with_an_id_no_enrollment_can_have_are_refused_before_any_lookup(services):
    """An item's id is checked before it is looked up or deleted: a NUL in it was PostgreSQL's DataError (the whole
    bulk operation a 500), and on SQLite a 404 instead of naming the id as invalid."""
    for mode in ("create", "update", "delete"):
        refused = services.enrollments.bulk("individual", mode, [{**SYM, "registrationId": "bad\x00id"},
                                                                 {**SYM, "registrationId": "bad-id\n"}])
        assert [(e.enrollment_id, e.error_code // 1000) for e in refused] == [("bad\x00id", 400), ("bad-id\n", 400)]
        assert all("registrationId" in e.error_status for e in refused)
    refused = services.enrollments.bulk("group", "delete", [{"enrollmentGroupId": "bad\x00id"}])
    assert [(e.error_code, "enrollmentGroupId" in e.error_status) for e in refused] == [(400004, True)]


def test_a_query_window_unwraps_only_its_own_keys(services, monkeypatch):
    """The Azure query route pages with an offset: a page of 2 out of 7 keyed enrollments unwraps 2 keys, not 7."""
    for i in range(7):
        services.enrollments.put("individual", f"win-{i}", SYM)
    services.enrollments.put("group", "win-group", SYM)  # another kind: never in the window
    unwrapped = []
    unwrap = services.enrollments.keys.unwrap
    monkeypatch.setattr(services.enrollments.keys, "unwrap", lambda blob, label: unwrapped.append(label) or
                        unwrap(blob, label))
    first, more = services.enrollments.window("individual", 0, 2)
    assert [v.enrollment_id for v in first] == ["win-0", "win-1"] and more
    assert len(unwrapped) == 2 and all(v.keys for v in first)
    middle, more = services.enrollments.window("individual", 2, 4)
    assert [v.enrollment_id for v in middle] == ["win-2", "win-3", "win-4", "win-5"] and more
    last, more = services.enrollments.window("individual", 6, 4)
    assert [v.enrollment_id for v in last] == ["win-6"] and not more
    assert services.enrollments.window("individual", 7, 4) == ((), False)
    assert len(unwrapped) == 2 + 4 + 1
