"""Etag matching (RFC 7232 If-Match) over opendps' base64 etags; how a refused name is named."""

import pytest

from opendps.errors import InvalidInput
from opendps.hub.registry import check_device_id, check_host_name
from opendps.ids import check_resource_name, etag_matches
from opendps.provisioning.access import check_policy_name
from opendps.provisioning.enrollments import check_registration_id
from opendps.registry.devices import check_lookup_id


def test_etags_match_quoted_weak_listed_and_star():
    assert etag_matches(None, "AAAAAExpNs=")
    assert etag_matches("*", "AAAAAExpNs=")
    assert etag_matches('"AAAAAExpNs="', "AAAAAExpNs=")
    assert etag_matches('W/"AAAAAExpNs="', "AAAAAExpNs=")
    assert etag_matches('"other", "AAAAAExpNs="', "AAAAAExpNs=")
    assert not etag_matches('"other"', "AAAAAExpNs=")
    assert not etag_matches("", "AAAAAExpNs=")


def test_a_quoted_star_matches_any_etag_as_azure_iot_hub_sends_it():
    # IoTHubRegistryManager.update_device_with_sas(etag="*") / update_twin() send If-Match: "*"
    assert etag_matches('"*"', "AAAAAExpNs=")


def test_a_base64_etag_that_begins_with_w_slash_matches_itself():
    # 1 etag in 4096 starts with "W/": it used to be taken for a weak validator and never matched
    assert etag_matches("W/x9k8AB3=", "W/x9k8AB3=")
    assert etag_matches('"W/x9k8AB3="', "W/x9k8AB3=")
    assert etag_matches('W/"W/x9k8AB3="', "W/x9k8AB3=")
    assert not etag_matches("W/x9k8AB3=", "x9k8AB3=")


@pytest.mark.parametrize("check", [
    lambda v: check_resource_name("namespace", v), check_device_id, check_host_name, check_registration_id,
    check_policy_name, check_lookup_id,
])
def test_a_refused_name_is_named_cut_short(check):
    """A peer chooses the length of what it sends (a URL path of 8 KB, an MQTT client id of 64 KB): the 400's message
    and the log line name its start, not all of it."""
    with pytest.raises(InvalidInput) as info:
        check("x" * 9000 + "\n")
    assert len(info.value.message) < 400 and "'xxxx" in info.value.message and "..." in info.value.message
