"""Etag matching (RFC 7232 If-Match) over opendps' base64 etags."""

from opendps.ids import etag_matches


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
