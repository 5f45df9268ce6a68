"""AMQP link addresses reduced to the node they name (the service SDKs send full URLs, paths, or $cbs)."""

from __future__ import annotations

import pytest

from opendps.frontends.amqp import CBS_NODE, node


@pytest.mark.parametrize(("address", "expected"), [
    ("amqps://hub.example:5671/messages/devicebound", "/messages/devicebound"),
    ("/messages/serviceBound/feedback/", "/messages/servicebound/feedback"),
    (CBS_NODE, CBS_NODE), ("", ""), (None, ""),
])
def test_addresses_name_their_node(address, expected):
    assert node(address) == expected


@pytest.mark.parametrize("address", ["amqps://[", "amqps://[::1/messages/devicebound", "amqp://x]y[/z"])
def test_an_address_no_url_parser_reads_names_no_node(address):
    """urlsplit raises for an unbalanced IPv6 bracket: that was an exception inside attach, not "not served"."""
    assert node(address) not in ("/messages/devicebound", CBS_NODE)
