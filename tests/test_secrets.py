"""No NATS credential in a log line or an error: a route's or the live bus's URL may carry a password or a token
(``nats://user:pw@host``, ``nats://token@host``); the lines and errors name the server without them. Checked at the
source (the log records' own messages and the exceptions), not through the formatter's catch-all redaction."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest

from opendps.errors import InvalidInput, ServiceUnavailable
from opendps.hub.routing import NatsRouter, check_nats_url
from opendps.instance import Settings, open_instance
from opendps.transport import nats_client

PASSWORD, TOKEN = "NatsPassw0rdSecret", "NatsTokenSecret12345"


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released): connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _no_secret(text: str) -> None:
    assert PASSWORD not in text and TOKEN not in text, text


def test_shown_url_keeps_the_server_and_drops_passwords_and_tokens() -> None:
    url = f"nats://alice:{PASSWORD}@n1:4222, tls://{TOKEN}@n2:4222,nats://n3:4222"
    assert nats_client.shown_url(url) == "nats://alice:***@n1:4222, tls://***@n2:4222,nats://n3:4222"


def test_an_unreachable_nats_is_named_without_its_credentials(caplog: pytest.LogCaptureFixture) -> None:
    port = _closed_port()
    url = f"nats://alice:{PASSWORD}@127.0.0.1:{port},nats://{TOKEN}@127.0.0.1:{port}"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(nats_client.NatsUnreachable) as caught:
        asyncio.run(nats_client.connect(url, name="t", within=1.0, log=logging.getLogger("opendps.test"),
                                        what="test"))
    _no_secret(str(caught.value))
    assert f"127.0.0.1:{port}" in str(caught.value)
    for record in caplog.records:
        _no_secret(record.getMessage())


def test_a_bad_route_url_is_refused_without_echoing_its_password() -> None:
    with pytest.raises(InvalidInput) as caught:
        check_nats_url(f"http://alice:{PASSWORD}@host:4222")
    _no_secret(caught.value.message)
    assert "alice:***@host" in caught.value.message


def test_a_route_refusal_names_its_nats_without_credentials(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The refusal that withholds a device's PUBACK (logged with the disconnect) named the route's whole URL."""
    inst = open_instance(Settings(data_dir=tmp_path / "data", http_port=0, amqp_port=0))
    try:
        port = _closed_port()
        routes = inst.services.routes
        routes.put("default", "secret-route", {"properties": {
            "url": f"nats://alice:{PASSWORD}@127.0.0.1:{port}", "subject": "t.secrets", "durable": True}})
        hub_id = inst.services.hubs.get("default").id
        router = NatsRouter(routes, asyncio.to_thread)

        async def deliver() -> None:
            await router.deliver(hub_id, "dev1", {}, {}, b"x", 1)

        caplog.set_level(logging.DEBUG)
        with pytest.raises(ServiceUnavailable) as caught:
            asyncio.run(deliver())
        _no_secret(caught.value.message)
        assert "alice:***@127.0.0.1" in caught.value.message
        for record in caplog.records:
            _no_secret(record.getMessage())
    finally:
        inst.close()
