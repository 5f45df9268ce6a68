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


def _feedback_link(closed: list[object]):
    from types import SimpleNamespace

    return SimpleNamespace(address="/messages/servicebound/feedback", incoming=False, open=True,
                           close=closed.append)


def test_a_token_expiry_follows_the_wall_clock_when_it_is_stepped():
    """A token's expiry is wall-clock time, its timer the loop's: with the clock stepped back an hour the timer fired,
    found the token still valid and never looked again (its links outlived it by any length); stepped forward, the
    links stay until the next look (expiry_check) at most. A token with a huge se (10**400) was an OverflowError."""
    import asyncio
    import time
    from types import SimpleNamespace

    from opendps.frontends.amqp import HubConnection
    from opendps.frontends.service_auth import SasPrincipal
    from opendps.transport.sas import DEFAULT_SKEW_SECONDS

    async def scenario() -> None:
        wall = [time.time()]
        hub = HubConnection(SimpleNamespace(), SimpleNamespace(peer="test"))  # type: ignore[arg-type]
        hub.clock = lambda: wall[0]
        hub.expiry_check = 0.1
        closed: list[object] = []
        # valid for 0.2 s more (se is whole seconds: the wall clock is put 0.2 s before its end)
        se = int(wall[0]) + 10
        wall[0] = se + DEFAULT_SKEW_SECONDS - 0.2
        hub._grant(SasPrincipal("iothubowner", "hub", se))
        assert hub.attach(_feedback_link(closed)) is None  # type: ignore[arg-type]
        wall[0] -= 3600  # NTP steps the clock back an hour
        await asyncio.sleep(0.5)  # the loop's timer has fired: still valid by the wall clock
        assert closed == [] and hub.authorised()
        wall[0] += 3600 + 1  # the hour has passed (the clock stepped forward again, or time went by)
        for _ in range(100):
            if closed:
                break
            await asyncio.sleep(0.05)
        assert len(closed) == 1 and not hub.authorised()
        hub._grant(SasPrincipal("iothubowner", "hub", 10**400))  # far beyond a float
        assert hub.authorised() and hub.attach(_feedback_link(closed)) is None  # type: ignore[arg-type]
        hub.closed()

    asyncio.run(scenario())
