"""No credential in a log line or an error: a route's or the live bus's URL may carry a password or a token
(``nats://user:pw@host``, ``nats://token@host``), a database URL a password, a custom allocation webhook's URL a
password and a key in its query (an Azure Functions ``?code=``); the lines and errors name the server without them.
Checked at the source (the log records' own messages and the exceptions), not through the formatter's catch-all
redaction."""

from __future__ import annotations

import asyncio
import io
import logging
import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest
from tests.conftest import invoke_cli
from tests.unit.provisioning.test_allocation import webhook

from opendps import logs
from opendps.errors import InvalidInput, ServiceUnavailable
from opendps.hub.registry import HubView
from opendps.hub.routing import NatsRouter, check_nats_url
from opendps.instance import Settings, open_instance
from opendps.provisioning import allocation
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


def test_a_custom_allocation_webhooks_url_is_in_no_log_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx logged every webhook call at INFO with its whole URL: an Azure Functions key (``?code=``) reached the
    server's log at every registration of a custom-allocation enrollment (the formatter hid only the password)."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # configure() replaces them: restored after the test
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(logging.getLogger("httpx"), "level", logging.NOTSET)
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    logs.configure("json")
    messages: list[str] = []
    catch_all = logging.Handler(logging.DEBUG)
    catch_all.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    root.addHandler(catch_all)
    hub = HubView(1, "east", "east.hubs.test", 1, True, "etag", datetime.now(UTC))
    with webhook({"iotHubHostName": "east.hubs.test"}) as (url, seen):
        secret_url = url.replace("http://", f"http://alice:{PASSWORD}@") + f"?code={TOKEN}"
        assert allocation.custom(secret_url, {}, [hub], timeout=5).hub == hub
    assert seen  # the webhook was called, through the logging configured as serve configures it
    for message in messages:
        _no_secret(message)
    _no_secret(stream.getvalue())


def test_a_webhook_key_in_a_url_query_is_redacted_by_the_formatter_too() -> None:
    line = logs.redact(f"POST https://f.example/api/alloc?code={TOKEN}&x=1 and https://h/p?key={PASSWORD}")
    _no_secret(line)
    assert "&x=1" in line


@pytest.mark.parametrize("option, value, shown", [
    ("--db", f"postgresql+psycopg://alice:{PASSWORD}@127.0.0.1:notaport/db", "alice:***@127.0.0.1:notaport"),
    ("--bus", f"http://alice:{PASSWORD}@127.0.0.1:4222", "alice:***@127.0.0.1:4222"),
    ("--bus", f"http://{TOKEN}@127.0.0.1:4222", "http://***@127.0.0.1:4222"),
])
def test_a_mistyped_database_or_bus_url_is_refused_without_its_password(tmp_path: Path, option: str, value: str,
                                                                       shown: str) -> None:
    """The refusal of a URL that is not a database or NATS URL quoted it whole, password and all, on the terminal."""
    proc = invoke_cli({"OPENDPS_DATA_DIR": str(tmp_path / "data")}, "serve", "--https-port", "1", "--mqtt-port", "1",
                      option, value)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "is not a" in proc.stderr and shown in proc.stderr, proc.stderr
    _no_secret(proc.stdout + proc.stderr)
    assert not (tmp_path / "data").exists()  # refused before anything was written


def test_a_database_error_names_its_statement_but_not_the_values_bound_to_it(tmp_path):
    """SQLAlchemy puts a failed statement's parameters into its error message ("[parameters: ...]"), which
    tracebacks and log lines then carry: a route's or webhook's URL with its password, telemetry, a wrapped key."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from opendps.store import Store

    store = Store(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with pytest.raises(OperationalError) as caught, store.engine.begin() as conn:
            conn.execute(text("SELECT :v FROM no_such_table"), {"v": "nats://user:TopSecretPw@nats:4222"})
        assert "no_such_table" in str(caught.value) and "TopSecretPw" not in str(caught.value)
    finally:
        store.dispose()


def test_a_first_connection_refused_then_reset_names_the_refusal():
    """A NATS server closes the socket after refusing a client's credentials (-ERR 'Authorization Violation'), and a
    server may reset a later attempt outright: the error named after the first connection's deadline was the last
    one heard, so the refusal that explains it was lost behind "Connection reset by peer" now and then (a flaky CI
    run). A refusal by the server is named in preference to the transport errors around it."""
    import socket
    import struct

    from opendps.transport import nats_client

    attempts: list[int] = []

    async def fake_nats(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts.append(1)
        if len(attempts) > 1:  # every later attempt: reset at once
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
            return
        writer.write(b'INFO {"server_id":"fake","version":"2.10.0","proto":1,"max_payload":1048576,'
                     b'"auth_required":true}\r\n')
        await writer.drain()
        await reader.readline()  # CONNECT
        writer.write(b"-ERR 'Authorization Violation'\r\n")
        await writer.drain()
        writer.close()

    async def scenario() -> str:
        server = await asyncio.start_server(fake_nats, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(nats_client.NatsUnreachable) as info:
                await nats_client.connect(f"nats://opendps:wrong@127.0.0.1:{port}", name="t", within=2.5)
            return str(info.value)
        finally:
            server.close()

    message = asyncio.run(scenario())
    assert len(attempts) >= 2, attempts  # the refusal, then at least one reset attempt
    assert "Authorization Violation" in message and "wrong" not in message, message
