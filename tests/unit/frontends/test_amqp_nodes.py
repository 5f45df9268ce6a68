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


def test_detached_links_do_not_pile_up_on_a_connection():
    """$cbs links need no token to attach; attached and detached in a loop, each stayed in the connection's list
    (with its proton link) until the connection ended."""
    from types import SimpleNamespace

    from opendps.frontends.amqp import HubConnection

    hub = HubConnection(SimpleNamespace(), SimpleNamespace())
    links = [SimpleNamespace(address=CBS_NODE, incoming=bool(i % 2), open=True) for i in range(1000)]
    for link in links:
        assert hub.attach(link) is None  # type: ignore[arg-type]
        link.open = False  # the peer detaches it
    assert len(hub.links) <= 1
    still = SimpleNamespace(address=CBS_NODE, incoming=True, open=True)
    hub.attach(still)  # type: ignore[arg-type]
    hub.attach(SimpleNamespace(address=CBS_NODE, incoming=False, open=True))  # type: ignore[arg-type]
    assert still in hub.links and len(hub.links) == 2
